"""Building and running the Tenure worker: every entity workflow and every activity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.converter import DataConverter
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.worker import Worker, WorkflowRunner
from temporalio.worker._worker import load_default_build_id  # the SDK's default build id

from entities import catalog
from entities.bulk import BulkCommandWorkflow
from entities.checkout import SAGA_OUTCOMES_DESCRIPTION, SAGA_OUTCOMES_METRIC
from entities.checkout_input import CHECKOUT_WORKFLOW
from entities.runtime.saga import SagaStatus
from workers.activities import CacheActivities, RunningInputs, next_task
from workers.answer_budget import AnswerBudgetRunner
from workers.bulk import BulkActivities
from workers.cache import SnapshotCache, connect_redis
from workers.changes import Retention
from workers.forgetting import EndedEntities, ended_retention
from workers.handovers import Handovers, OverdueHandovers
from workers.offers import OfferedPublishes, OfferingRunner
from workers.publish_lag import (
    BY_WRITE_BACK,
    PUBLISH_LAG,
    PUBLISH_LAG_BUCKETS,
    lag_histogram,
    record_lag,
)
from workers.query_guard import QueryGuardRunner
from workers.requests import EntityRequests
from workers.sandbox import workflow_runner
from workers.search_attributes import check_search_attributes
from workers.settings import Settings
from workers.temporal import (
    connect_temporal,
    until_reachable,
    until_unreachable,
)
from workers.watchdog import StuckEntityWatchdog
from workers.webhook_delivery import WebhookDelivery

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = timedelta(seconds=10)

SCHEDULE_TO_START = (
    "workflow_task_schedule_to_start_latency",
    "activity_schedule_to_start_latency",
)
"""The SDK's histograms of how long tasks wait for the worker (`temporal_` before each)."""
SCHEDULE_TO_START_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 60000)
"""Milliseconds. The SDK's own start at 100: a healthy worker, its tasks started within a
few ms, read as p50 50 ms and p99 99 ms, beside the hundreds that say it falls behind."""


def worker_runtime(settings: Settings, core_logs: logging.Logger | None = None) -> Runtime:
    """The SDK runtime of a worker: its metrics, the SDK's own and Tenure's (recorded with
    the workflow and activity metric meters), served for Prometheus at
    `worker_health_host:worker_metrics_port/metrics`, unless that port is 0; its core's
    warnings forwarded to `core_logs`, when given. Counters are named with `_total`, as
    Prometheus names them; durations of the SDK's own are in milliseconds."""
    logs = LoggingConfig.default
    if core_logs is not None:
        logs = LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=core_logs),
        )
    if settings.worker_metrics_port:
        host = settings.worker_health_host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        metrics = PrometheusConfig(
            bind_address=f"{host}:{settings.worker_metrics_port}",
            counters_total_suffix=True,
            histogram_bucket_overrides={
                PUBLISH_LAG: PUBLISH_LAG_BUCKETS,
                **dict.fromkeys(SCHEDULE_TO_START, SCHEDULE_TO_START_BUCKETS),
            },
        )
        try:
            return Runtime(telemetry=TelemetryConfig(logging=logs, metrics=metrics))
        except ValueError as exc:  # the port is taken: the worker works on, unmeasured
            log.error("worker metrics not served: %s", exc)
    return Runtime(telemetry=TelemetryConfig(logging=logs))


def activity_functions(client: Client, cache: SnapshotCache, settings: Settings) -> Sequence[Any]:
    """Every activity the worker serves, bound to its clients."""
    return [
        CacheActivities(cache).publish_snapshot,
        next_task,
        RunningInputs(client).running_workflow_input,
        EntityRequests(client, settings, cache).request_entity,
        *BulkActivities(client, cache, settings).activities(),
        WebhookDelivery(cache, settings).deliver_webhooks,
    ]


def guarded_runner(
    settings: Settings, data_converter: DataConverter, offered: OfferedPublishes | None = None
) -> WorkflowRunner:
    """The workflow runner of `workers.sandbox`, with the worker's guards around it: no
    events ahead of their task (`query_guard`), no more query answers than a task's
    completion may carry (`answer_budget`); and the entities' offers collected for
    `offered` to publish, when given."""
    runner: WorkflowRunner = AnswerBudgetRunner(
        QueryGuardRunner(workflow_runner(settings, data_converter))
    )
    return OfferingRunner(runner, offered) if offered is not None else runner


def queue_meter_of(client: Client, settings: Settings) -> MetricMeter:
    """The client's runtime's metric meter, labelled as the SDK labels an activity's or a
    workflow's metrics, but for the settings' task queue."""
    meter = (client.service_client.config.runtime or Runtime.default()).metric_meter
    return meter.with_additional_attributes(
        {"namespace": client.namespace, "task_queue": settings.task_queue}
    )


def build_worker(client: Client, settings: Settings, cache: SnapshotCache) -> TenureWorker:
    """A worker hosting every workflow declared in `entities` on the settings' task queue,
    and the bulk commands on their own (`Settings.bulk_task_queue`)."""
    common: dict[str, Any] = {
        # A task waiting on the queue of a worker that is gone (killed, or its queue lost
        # in a Temporal restart) goes to the shared queue after this. Not sooner than a
        # busy worker gets to it: a task moved is run by replaying its entity's history,
        # which slows the workers further (docs/operations.md, "Sticky timeout").
        "sticky_queue_schedule_to_start_timeout": timedelta(seconds=settings.sticky_timeout),
        "graceful_shutdown_timeout": timedelta(seconds=settings.worker_shutdown_grace),
    }
    queue_meter = queue_meter_of(client, settings)
    lag = lag_histogram(queue_meter)
    cache.written_back = lambda snapshot: record_lag(lag, snapshot, BY_WRITE_BACK)
    offered = OfferedPublishes(cache, queue_meter)
    entities = Worker(
        client,
        task_queue=settings.task_queue,
        # Bulk commands started on the entities' queue, before they had their own, end here.
        workflows=catalog.workflows(),
        activities=activity_functions(client, cache, settings),
        max_cached_workflows=settings.max_cached_workflows,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        workflow_runner=guarded_runner(settings, client.data_converter, offered),
        **common,
    )
    offered.watch(entities)
    _count_failed_checkouts_from_zero(queue_meter)
    bulk_commands = Worker(
        client,
        task_queue=settings.bulk_task_queue,
        workflows=[BulkCommandWorkflow],
        activities=BulkActivities(client, cache, settings).activities(),
        workflow_runner=guarded_runner(settings, client.data_converter),
        **common,
    )
    return TenureWorker(
        [entities, bulk_commands],
        shutdown_bound=settings.worker_shutdown_grace + SHUTDOWN_TIMEOUT.total_seconds(),
        offered=offered,
    )


def _count_failed_checkouts_from_zero(queue_meter: MetricMeter) -> None:
    """Export the series of checkouts become FAILED at 0 from the worker's start, labelled
    as a checkout's own metric meter labels it. The first FAILED then takes it from 0 to 1,
    which the page's `increase()` sees. Born at 1, a series was seen only as new: a worker
    restarted under the same instance label, whose old process had counted one, had its
    first FAILED within 15 minutes hidden behind the old one (deploy/compose/alerts.yml)."""
    queue_meter.create_counter(SAGA_OUTCOMES_METRIC, SAGA_OUTCOMES_DESCRIPTION).add(
        0, {"workflow_type": CHECKOUT_WORKFLOW, "status": SagaStatus.FAILED.value}
    )


STUCK_SHUTDOWN_TIMEOUT = 2.0
"""Seconds a shutdown may go on once a workflow is found that the SDK cannot evict."""
EVICTION_CHECK_INTERVAL = 1.0


class TenureWorker:
    """Temporal workers on each of Tenure's task queues, run and shut down together: one
    failing stops the others."""

    def __init__(
        self,
        workers: list[Worker],
        shutdown_bound: float | None = None,
        offered: OfferedPublishes | None = None,
    ) -> None:
        self.workers = workers
        self._shutdown_bound = shutdown_bound
        self._stack = contextlib.AsyncExitStack()
        self._offered = offered

    async def run(self) -> None:
        """Run until every worker is shut down; a worker's failure is raised at once, and
        `shutdown` (bounded by the caller) stops the others."""
        if self._offered is not None:
            self._offered.start()
        try:
            running = [asyncio.create_task(w.run()) for w in self.workers]
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            await asyncio.gather(*running)
        finally:
            if self._offered is not None:
                await self._offered.stop()

    def stuck_evictions(self) -> int:
        """Workflows that the SDK could not drop from its cache, and that therefore get no
        more workflow tasks here: those whose activation overran the SDK's 2 s (a worker short
        of CPU, or a slow step) and was interrupted mid-way (temporalio/sdk-python#806). The
        SDK keeps no public count of them; 0 when it keeps none at all."""
        return sum(
            getattr(getattr(w, "_workflow_worker", None), "_could_not_evict_count", 0) or 0
            for w in self.workers
        )

    async def shutdown(self) -> None:
        """Shut every worker down at once; a worker that failed already is logged."""
        results = await asyncio.gather(
            *(w.shutdown() for w in self.workers), return_exceptions=True
        )
        for worker, result in zip(self.workers, results, strict=True):
            if isinstance(result, Exception):
                log.warning("worker on %r shut down with %r", worker.task_queue, result)

    async def __aenter__(self) -> TenureWorker:
        try:
            if self._offered is not None:
                self._offered.start()
                self._stack.push_async_callback(self._offered.stop)
            for worker in self.workers:
                await self._stack.enter_async_context(worker)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if await self.shut_down_within(self._shutdown_bound):
            await self._stack.aclose()
        # Else its Temporal workers cannot finish: they are left to the process.

    async def shut_down_within(self, bound: float | None) -> bool:
        """Shut down, or give up: STUCK_SHUTDOWN_TIMEOUT after the SDK is found holding a
        workflow it cannot evict (its shutdown waits for that eviction for good), or at
        `bound` seconds (None: no bound). Whether it finished; if not, the next worker takes
        the entities over."""
        shutting = asyncio.ensure_future(self.shutdown())
        stuck = asyncio.ensure_future(until_eviction_stuck(self))
        try:
            await asyncio.wait(
                [shutting, stuck], timeout=bound, return_when=asyncio.FIRST_COMPLETED
            )
            if stuck.done() and not shutting.done():
                await asyncio.wait([shutting], timeout=STUCK_SHUTDOWN_TIMEOUT)
        finally:
            stuck.cancel()
        if not shutting.done():
            shutting.cancel()
            log.error(
                "the worker did not shut down in time (%d workflows it could not evict): "
                "going on without it",
                self.stuck_evictions(),
            )
            return False
        shutting.result()
        return True


@dataclass
class WorkerStatus:
    """What the worker is doing, for its `/readyz` (ready while it polls its task queue)
    and its exit status (`drained`: every shutdown finished within its bound)."""

    polling: bool = False
    drained: bool = True


async def run_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    status: WorkerStatus | None = None,
    tracer_provider: TracerProvider | None = None,
) -> None:
    """Connect to Temporal and Redis and serve until `stop` is set (or forever), then drain:
    no more tasks are taken, and running activities get `worker_shutdown_grace` seconds to
    finish before they are cancelled (and retried elsewhere).

    When Temporal stops answering, the worker is shut down and a new one started once it
    answers again. A workflow task whose completion an outage lost can leave the SDK's
    cached workflows ahead of their histories; a task applied on top of that afterwards
    records commands that the history then cannot replay (the soak froze entities so, with
    "No command scheduled for event ActivityTaskScheduled"). A new worker has an empty cache
    and replays every entity from its history.
    """
    client = await connect_temporal(settings, tracer_provider=tracer_provider)
    await check_search_attributes(client, settings.temporal_namespace)
    redis_client = connect_redis(settings)
    cache = SnapshotCache(redis_client, settings.redis_prefix, Retention.of(settings))
    watchdog = StuckEntityWatchdog(
        client,
        cache,
        settings.task_queue,
        settings.watchdog_interval,
        settings.auto_repair,
        # The SDK's default, which the workers built here take: no build id is set.
        build_id=load_default_build_id(),
        meter=queue_meter_of(client, settings),
    )
    watching = asyncio.create_task(watchdog.run()) if settings.watchdog_interval else None
    handovers = OverdueHandovers(
        client,
        Handovers(redis_client, settings.redis_prefix),
        overdue=max(HANDOVER_OVERDUE, 3 * settings.command_wait_timeout),
    )
    taking_up = asyncio.create_task(handovers.run())
    forgetting = asyncio.create_task(
        EndedEntities(cache).run(partial(ended_retention, client, settings))
    )
    stopping = asyncio.create_task((stop or asyncio.Event()).wait())
    status = status or WorkerStatus()
    replaced_at: float | None = None
    try:
        while not stopping.done():
            worker = build_worker(client, settings, cache)
            log.info(
                "worker polling task queues %r and %r at %s",
                settings.task_queue,
                settings.bulk_task_queue,
                settings.temporal_address,
            )
            running = asyncio.create_task(worker.run())
            status.polling = True
            lost = asyncio.create_task(until_unreachable(client))
            stuck = asyncio.create_task(until_eviction_stuck(worker, replaced_at))
            await asyncio.wait(
                [running, lost, stuck, stopping], return_when=asyncio.FIRST_COMPLETED
            )
            status.polling = False
            lost.cancel()
            stuck.cancel()
            if stuck.done() and not stuck.cancelled() and not stopping.done():
                # Its shutdown waits for that eviction, for good: bounded short.
                log.error(
                    "an entity could not be dropped from the worker's cache after its "
                    "activation overran 2 s, and would get no task here again: starting a "
                    "new worker, whose cache is empty"
                )
                await _shut_down(worker, running, STUCK_SHUTDOWN_TIMEOUT)
                replaced_at = time.monotonic()
                continue
            if stopping.done():
                log.info(
                    "stopping: running activities have %g s to finish",
                    settings.worker_shutdown_grace,
                )
                bound = settings.worker_shutdown_grace + SHUTDOWN_TIMEOUT.total_seconds()
            else:
                bound = SHUTDOWN_TIMEOUT.total_seconds()
            status.drained = await _shut_down(worker, running, bound) and status.drained
            if lost.done() and not lost.cancelled() and not stopping.done():
                log.warning("Temporal is not answering: worker stopped, its cache dropped")
                await asyncio.wait(
                    [asyncio.create_task(until_reachable(client)), stopping],
                    return_when=asyncio.FIRST_COMPLETED,
                )
    finally:
        stopping.cancel()
        if watching is not None:
            watching.cancel()
        taking_up.cancel()
        forgetting.cancel()
        await cache.aclose()
        await redis_client.aclose()


HANDOVER_OVERDUE = 60.0
"""Seconds after which a publish an API process promised and did not keep is taken up
(workers/handovers.py): a waited command's promise is kept within its wait
(`command_wait_timeout`) unless the process stopped or lost the answer."""

STUCK_REPLACEMENTS_APART = 30.0
"""Seconds at least between two replacements for a stuck eviction: a worker so short of CPU
that its evictions time out too would otherwise drop its whole cache again and again."""


async def until_eviction_stuck(worker: TenureWorker, replaced_at: float | None = None) -> None:
    """Return once the worker holds a workflow it cannot drop from its cache (see
    `TenureWorker.stuck_evictions`): that entity is frozen until this worker is replaced.
    Not sooner than STUCK_REPLACEMENTS_APART after the last replacement, at `replaced_at`."""
    if replaced_at is not None:
        await asyncio.sleep(max(0.0, replaced_at + STUCK_REPLACEMENTS_APART - time.monotonic()))
    while not worker.stuck_evictions():
        await asyncio.sleep(EVICTION_CHECK_INTERVAL)


async def _shut_down(worker: TenureWorker, running: asyncio.Task[None], bound: float) -> bool:
    """Whether the worker shut down within `bound` seconds. Activities in flight are
    idempotent (publishing, entity requests) and the server retries a cancelled one
    elsewhere. A workflow task that cannot complete (an entity stuck on a failing task,
    Temporal gone) must not keep the process up for good: bounded."""
    drained = await worker.shut_down_within(bound)
    failed = running.exception() if running.done() and not running.cancelled() else None
    running.cancel()
    if failed is not None:
        raise failed
    return drained
