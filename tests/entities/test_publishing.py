"""Publishing snapshots to the cache: at once after a quiet spell, at most once per interval
under a stream of commands, and never leaving the cache behind the entity."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from api.gateway import EntityGateway
from entities.runtime.envelope import RuntimeOptions
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import until_cached
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache
from workers.settings import Settings


async def events(client: Client, workflow_id: str, event_type: EventType.ValueType) -> list[Any]:
    """The events of one type in the workflow's current run."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [event for event in history.events if event.event_type == event_type]


async def publishes(client: Client, workflow_id: str) -> int:
    """Publish activities scheduled in the workflow's current run."""
    scheduled = await events(client, workflow_id, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    return sum(
        1
        for event in scheduled
        if event.activity_task_scheduled_event_attributes.activity_type.name == "publish_snapshot"
    )


def with_interval(
    settings: Settings, client: Client, cache: SnapshotCache, seconds: float
) -> tuple[Settings, EntityGateway]:
    """Settings that start entities with this publish interval, and a gateway using them."""
    runtime = RuntimeOptions(publish_interval_seconds=seconds)
    settings = settings.model_copy(update={"runtime": runtime})
    return settings, EntityGateway(client, cache, settings)


async def test_a_stream_of_commands_is_published_once_per_interval_and_in_full(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings, gateway = with_interval(settings, temporal_client, cache, 2.0)
    account_id = new_id()
    async with run_worker(settings):
        started = time.monotonic()
        await open_active(gateway, account_id)
        await until_cached(cache, "account", account_id, 2)
        # Forty deposits in quick succession: the last one reaches the cache, by the
        # interval's trailing publish, though no command follows it.
        for amount in range(1, 41):
            await gateway.send("account", account_id, "deposit", {"amount": amount})
        hit = await until_cached(cache, "account", account_id, 42)
        assert hit.snapshot.revision == 42 and hit.snapshot.state is not None
        assert hit.snapshot.state["balance"] == sum(range(1, 41))
        elapsed = time.monotonic() - started
        published = await publishes(temporal_client, f"account:{account_id}")
    # A publish per workflow task would be one for most of the 42 commands (17 seen here);
    # throttled, it is a burst of two and then one per interval.
    assert 2 <= published <= 2 + elapsed // 2.0, (published, elapsed)


async def test_a_change_after_a_quiet_spell_is_published_at_once(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # An interval far longer than the test: only the leading publish can update the cache.
    settings, gateway = with_interval(settings, temporal_client, cache, 3600.0)
    account_id = new_id()
    async with run_worker(settings):
        await gateway.send(
            "account", account_id, "open", {"owner_name": "Ada", "email": "ada@example.com"}
        )
        await until_cached(cache, "account", account_id, 1)


async def test_after_an_idle_interval_changes_are_published_without_waiting_again(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings, gateway = with_interval(settings, temporal_client, cache, 0.5)
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)  # two publishes: the burst is spent
        await until_cached(cache, "account", account_id, 2)
        await asyncio.sleep(1.2)  # idle for over two intervals: the burst is back
        for amount in (1, 2):
            await gateway.send("account", account_id, "deposit", {"amount": amount})
        await until_cached(cache, "account", account_id, 4)
        timers = await events(
            temporal_client, f"account:{account_id}", EventType.EVENT_TYPE_TIMER_STARTED
        )
    # Only the account's dormancy timer: no publish had to wait for one.
    assert len(timers) == 1, timers
