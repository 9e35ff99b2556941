"""Activities: the only code that does I/O on behalf of workflows. Each is idempotent."""

from __future__ import annotations

import logging

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.service import RPCError

from entities.runtime.backlog import NEXT_TASK_ACTIVITY
from entities.runtime.effects import RUNNING_INPUT_ACTIVITY, RunningInput
from entities.runtime.envelope import Publication
from entities.runtime.publisher import PUBLISH_ACTIVITY
from workers.cache import CacheUnavailable, SnapshotCache
from workers.failures import is_missing
from workers.logs import RepeatedLogFilter
from workers.publish_lag import BY_ACTIVITY, lag_histogram, record_lag

log = logging.getLogger(__name__)
# Redis down: every entity's publish fails at once, and is retried. Said once in a while,
# with how often it happened meanwhile.
log.addFilter(RepeatedLogFilter(window=10.0))

PUBLISH_FAILURES = "tenure_publish_failures"


@NEXT_TASK_ACTIVITY.defn
async def next_task() -> None:
    """Nothing: an entity catching up on held commands waits for it to get its next
    workflow task (entities/runtime/backlog.py)."""


class RunningInputs:
    """What a workflow that kept an entity's effect from starting was started with
    (entities/runtime/effects.py)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @RUNNING_INPUT_ACTIVITY.defn
    async def running_workflow_input(self, workflow_id: str) -> RunningInput:
        """The input of the workflow running under `workflow_id`; None if none runs."""
        try:
            description = await self._client.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            if is_missing(exc):
                return RunningInput()
            raise
        if description.status is not WorkflowExecutionStatus.RUNNING:
            return RunningInput()
        handle = self._client.get_workflow_handle(workflow_id, run_id=description.run_id)
        async for event in handle.fetch_history_events(page_size=1):
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            if not payloads:
                return RunningInput(input={})
            [started_with] = await self._client.data_converter.decode(payloads[:1], [dict])
            return RunningInput(input=started_with)
        return RunningInput()


class CacheActivities:
    """Publishing entity snapshots to the last-seen cache, and their changes to the change
    stream."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    @PUBLISH_ACTIVITY.defn
    async def publish_snapshot(self, publication: Publication) -> bool:
        """Write the snapshot if it is newer than what the cache holds, and stream the
        changes not streamed yet; safe to repeat. Counts each attempt that fails, and how
        long the change took to reach the cache when this publish stored it
        (`workers/publish_lag.py`)."""
        try:
            return await self.publish(publication)
        except CacheUnavailable as exc:
            # Redis down: expected, retried, counted. Benign, the SDK logs it at debug, where
            # each attempt of every entity logged a warning with its traceback (675 in a 25 s
            # outage); this process says it once in a while instead (the filter above).
            log.warning(
                "publishing to the cache failed (Redis unavailable: %s); the entities retry, "
                "and tenure_publish_failures_total counts every attempt",
                exc,
            )
            raise ApplicationError(
                f"the cache is unavailable: {exc}",
                type="CacheUnavailable",
                category=ApplicationErrorCategory.BENIGN,
            ) from None

    async def publish(self, publication: Publication) -> bool:
        """`publish_snapshot`'s work, from any activity: whether the cache took the snapshot.
        Raises CacheUnavailable, or what else failed, having counted it."""
        snapshot = publication.snapshot
        meter = activity.metric_meter()
        try:
            written = await self._cache.put_publication(publication)
        except Exception:
            meter.create_counter(
                PUBLISH_FAILURES, "Attempts to publish a snapshot to the cache that failed."
            ).add(1, {"entity_type": snapshot.entity_type})
            raise
        if written:
            record_lag(lag_histogram(meter), snapshot, BY_ACTIVITY)
        return written
