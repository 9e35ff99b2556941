"""The worker's /metrics for Prometheus, as an operator scrapes it: the Temporal SDK's own
and Tenure's (commands, continue-as-new, publishing, sagas), from one SDK runtime."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import MetricMeter

from deploy.embedded import EmbeddedRedis, free_port
from entities.errors import TenureError
from entities.runtime.envelope import RuntimeOptions
from entities.runtime.saga import SagaStatus
from tests.api.test_accounts_api import DEPOSIT, open_active
from tests.api.test_metrics import Scrape
from tests.conftest import GraphQLClient, api_client, cache_of, serving
from tests.entities.failing_checkout import failed_checkout
from tests.entities.shop import Shop, eventually, new_id, shop_settings
from tests.workers.test_webhook_delivery import REGISTER, REMOVE
from workers.cache import SnapshotCache, connect_redis
from workers.settings import Settings
from workers.temporal import connect_temporal
from workers.worker import TenureWorker, build_worker, worker_runtime


def metrics_settings(settings: Settings, **changes: object) -> Settings:
    update = {"worker_metrics_port": free_port(), "worker_health_host": "127.0.0.1", **changes}
    return settings.model_copy(update=update)


async def scrape(settings: Settings) -> Scrape:
    url = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    return Scrape(response.text)


async def tasks_run_again(client: Client, workflow_id: str) -> int:
    """Workflow tasks of every run of `workflow_id` that timed out or failed, and so ran
    again as new."""
    again = 0
    run_id: str | None = None  # the latest run first, then each one it continued from
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        again += sum(
            event.event_type
            in (
                EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
                EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
            )
            for event in history.events
        )
        started = history.events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return again
        run_id = started.continued_execution_run_id


async def test_commands_continue_as_new_publishing_and_sagas_are_counted_beside_the_sdk(
    settings: Settings, temporal_client: Client, cache: SnapshotCache
) -> None:
    worker_settings = shop_settings(
        metrics_settings(settings, runtime=RuntimeOptions(max_commands_per_run=4))
    )
    client = await connect_temporal(worker_settings, runtime=worker_runtime(worker_settings))
    shop = Shop(temporal_client, cache, worker_settings)
    async with build_worker(client, worker_settings, cache):
        account_id = await shop.account(balance=1000)  # open, verify, deposit
        with pytest.raises(TenureError) as refused:  # the fourth command ends the run
            await shop.send("account", account_id, "withdraw", amount=10**9)
        assert refused.value.code == "INSUFFICIENT_FUNDS"
        sku = await shop.stock(5)
        cart_id = await shop.cart(account_id, (sku, 2, 100))
        done = await shop.finished(await shop.checkout(cart_id))
        assert done.status is SagaStatus.COMPLETED

        metrics = await eventually(
            lambda: scrape(worker_settings),
            lambda m: (
                m.value("tenure_publish_lag_seconds_count", entity_type="cart") >= 1
                and m.value("tenure_continue_as_new_total") >= 1
            ),
        )

    commands = "tenure_commands_total"
    # A workflow task that timed out or failed (a loaded machine) is run again, not replayed,
    # and counts its commands again: exact counts hold only where no task was run twice.
    again = await tasks_run_again(temporal_client, f"account:{account_id}")
    # Three applied by hand, and the checkout's withdrawal.
    applied = metrics.value(commands, entity_type="account", outcome="applied", code="OK")
    assert 4 <= applied <= 4 + again
    rejected = metrics.value(
        commands, entity_type="account", outcome="rejected", code="INSUFFICIENT_FUNDS"
    )
    assert 1 <= rejected <= 1 + again
    assert metrics.value(commands, outcome="rejected") == rejected
    # Restock, then the checkout's reservation and commit.
    stocked = metrics.value(commands, entity_type="inventory", outcome="applied")
    assert 3 <= stocked <= 3 + await tasks_run_again(temporal_client, f"inventory:{sku}")
    assert metrics.labels(commands, "workflow_type") >= {"Account", "InventoryItem", "Cart"}
    # A continue-as-new refused because a command overtook it (UNHANDLED_COMMAND) is run
    # again, and counted again.
    continued = metrics.value("tenure_continue_as_new_total", entity_type="account")
    assert 1 <= continued <= 1 + again
    assert metrics.value("tenure_saga_outcomes_total", status="COMPLETED") == 1
    assert metrics.value("tenure_publish_failures_total") == 0
    lag = "tenure_publish_lag_seconds_bucket"
    assert metrics.value("tenure_publish_lag_seconds_count", entity_type="account") >= 1
    assert "0.005" in metrics.labels(lag, "le") and "300" in metrics.labels(lag, "le")
    # The SDK's own, in the same exporter: counters with _total, durations in milliseconds.
    names = {name for name, _, _ in metrics.samples}
    assert {
        "temporal_request_total",
        "temporal_workflow_completed_total",
        "temporal_sticky_cache_size",
        "temporal_workflow_task_schedule_to_start_latency_bucket",
        "temporal_activity_schedule_to_start_latency_bucket",
    } <= names
    assert metrics.value("temporal_workflow_completed_total", workflow_type="Checkout") == 1
    # Waits for the worker in buckets from 1 ms: the SDK's own began at 100, where a
    # healthy worker's tasks (started within a few ms) read as p99 99 ms.
    for waits in ("workflow_task", "activity"):
        buckets = metrics.labels(f"temporal_{waits}_schedule_to_start_latency_bucket", "le")
        assert {"1", "10", "100", "1000", "60000"} <= buckets, buckets


async def test_a_publish_that_fails_is_counted(
    settings: Settings, temporal_client: Client, cache: SnapshotCache, own_redis: EmbeddedRedis
) -> None:
    worker_settings = metrics_settings(settings)
    client = await connect_temporal(worker_settings, runtime=worker_runtime(worker_settings))
    worker_redis = connect_redis(worker_settings.model_copy(update={"redis_url": own_redis.url}))
    shop = Shop(temporal_client, cache, worker_settings)
    account_id = new_id("acct")
    try:
        worker_cache = SnapshotCache(worker_redis, worker_settings.redis_prefix)
        async with build_worker(client, worker_settings, worker_cache):
            own_redis.stop()
            await shop.send("account", account_id, "open", owner_name="Ada", email="a@b.cd")
            metrics = await eventually(
                lambda: scrape(worker_settings),
                lambda m: m.value("tenure_publish_failures_total", entity_type="account") >= 1,
            )
            assert metrics.value("tenure_publish_lag_seconds_count") == 0
            failed = time.monotonic()  # after the change: its publish failed
            await asyncio.sleep(1.0)
            down = time.monotonic() - failed
            await own_redis.start()
            # The snapshot reaches the cache once Redis is back: written back by the worker
            # that kept it, or by the publish's retry, whichever comes first. Its lag shows
            # the outage.
            lag = "tenure_publish_lag_seconds"
            after = await eventually(
                lambda: scrape(worker_settings),
                lambda m: m.value(f"{lag}_count", entity_type="account") >= 1,
            )
    finally:
        await worker_redis.aclose()
    assert after.value(f"{lag}_count", entity_type="account") == 1
    assert after.labels(f"{lag}_count", "by") <= {"write_back", "activity"}
    assert after.value(f"{lag}_sum", entity_type="account") >= down


async def test_a_checkout_is_counted_failed_when_it_needs_an_operator_not_when_it_ends(
    settings: Settings, temporal_client: Client, cache: SnapshotCache
) -> None:
    """The page (`TenureCheckoutFailed`) must come while the checkout waits for an operator:
    it once came only when the wait ended, days later, or never once it was resolved."""
    worker_settings = shop_settings(metrics_settings(settings))
    client = await connect_temporal(worker_settings, runtime=worker_runtime(worker_settings))
    shop = Shop(temporal_client, cache, worker_settings)

    @contextlib.asynccontextmanager
    async def run_worker(chosen: Settings | None = None) -> AsyncIterator[TenureWorker]:
        chosen = chosen or worker_settings
        async with cache_of(chosen) as own, build_worker(client, chosen, own) as worker:
            yield worker

    def failed_series(metrics: Scrape) -> list[tuple[dict[str, str], float]]:
        """The FAILED series of the checkouts' task queue (the failing checkout also runs
        a worker on a queue of its own, which exports its own at 0)."""
        return [
            (labels, value)
            for name, labels, value in metrics.samples
            if name == "tenure_saga_outcomes_total"
            and labels.get("status") == "FAILED"
            and labels.get("task_queue") == worker_settings.task_queue
        ]

    async with run_worker():
        # Exported at 0 from the worker's start, so that the first FAILED is an increase
        # Prometheus sees, even after a restart under the same instance label.
        (before,) = failed_series(await scrape(worker_settings))
        assert before[1] == 0
    async with failed_checkout(shop, run_worker) as failed:
        assert failed.state.awaiting_operator_until is not None
        metrics = await eventually(
            lambda: scrape(worker_settings),
            lambda m: m.value("tenure_saga_outcomes_total", status="FAILED") >= 1,
        )
        # The checkout counted on that same series, not on one of its own beside it.
        assert failed_series(metrics) == [(before[0], 1)]
        assert metrics.value("tenure_saga_outcomes_total") == 1


def test_no_metrics_port_no_exporter(settings: Settings) -> None:
    runtime = worker_runtime(settings.model_copy(update={"worker_metrics_port": 0}))
    assert runtime.metric_meter is MetricMeter.noop


def test_a_metrics_port_taken_leaves_the_worker_working_unmeasured(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = worker_runtime(metrics_settings(settings, worker_metrics_port=port))
    assert runtime.metric_meter is MetricMeter.noop
    assert "worker metrics not served" in caplog.text


async def test_webhooks_dead_lettered_and_a_subscriber_lost_are_counted(
    settings: Settings, temporal_client: Client, cache: SnapshotCache
) -> None:
    """An integration's webhooks dead-lettered, or its subscription lost with a Redis that
    restarted empty, said nothing but a warning in the worker's log: its receiver got
    nothing more. Each is counted now, for an alert (deploy/compose/alerts.yml); a removal
    is not a loss."""
    worker_settings = metrics_settings(
        settings, webhook_backoff_seconds=0.2, webhook_retry_for_seconds=1.0
    )
    client = await connect_temporal(worker_settings, runtime=worker_runtime(worker_settings))
    async with (
        serving(Starlette(routes=[Route("/hook", refuse, methods=["POST"])])) as url,
        build_worker(client, worker_settings, cache),
        api_client(worker_settings, temporal_client) as http,
    ):
        gql = GraphQLClient(http)
        account_id = new_id("acct")
        await open_active(gql, account_id)
        ids = []
        for _ in range(2):
            registered = await gql.data(
                REGISTER, url=f"{url}/hook", events={"account": ["deposit"]}
            )
            ids.append(registered["registerWebhookSubscriber"]["subscriber"]["id"])
        await gql.data(DEPOSIT, id=account_id, amount=7)
        metrics = await eventually(
            lambda: scrape(worker_settings),
            lambda m: m.value("tenure_webhooks_total", outcome="dead_lettered") >= 2,
        )
        assert metrics.value("tenure_webhook_subscribers_lost_total") == 0
        # One removed, one lost as a Redis that restarted empty loses it.
        await gql.data(REMOVE, id=ids[0])
        await cache.client.hdel(f"{worker_settings.redis_prefix}webhooks:subscribers", ids[1])
        for subscriber_id in ids:
            handle = temporal_client.get_workflow_handle(f"webhook:{subscriber_id}")
            await asyncio.wait_for(handle.result(), 30)  # its delivery ended
        metrics = await scrape(worker_settings)
        assert metrics.value("tenure_webhook_subscribers_lost_total") == 1


async def refuse(_request: Request) -> Response:
    return Response(status_code=500)
