"""Offers: an entity's changes between its publishes by activity reach the cache and the
change stream through its worker, and the ones an offer lost still reach both, once each."""

from __future__ import annotations

import asyncio
import json

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from api.gateway import EntityGateway
from entities.runtime.envelope import Publication, RuntimeOptions
from entities.runtime.offers import Offer
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import until_cached
from tests.entities.test_publishing import events
from tests.workers.test_change_stream import (
    applied,
    entries_of,
    revisions,
    snapshot,
    until_streamed,
)
from workers.cache import SnapshotCache
from workers.offers import SETTLE_SECONDS, OfferedPublishes
from workers.settings import Settings

DEPOSITS = 30


async def burst(gateway: EntityGateway, account_id: str) -> None:
    """Open, verify and DEPOSITS deposits, none waited for: revision DEPOSITS + 2."""
    opening = {"owner_name": "Ada", "email": "ada@example.com"}
    await gateway.send("account", account_id, "open", opening)
    await gateway.send("account", account_id, "verify", {})
    for amount in range(1, DEPOSITS + 1):
        await gateway.send("account", account_id, "deposit", {"amount": amount})


async def published_revisions(client: Client, workflow_id: str) -> list[int]:
    """The revision of each snapshot the entity's run published by activity."""
    scheduled = await events(client, workflow_id, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    return [
        json.loads(event.activity_task_scheduled_event_attributes.input.payloads[0].data)[
            "snapshot"
        ]["revision"]
        for event in scheduled
        if event.activity_task_scheduled_event_attributes.activity_type.name == "publish_snapshot"
    ]


async def test_a_burst_reaches_the_cache_and_the_stream_between_publishes(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # An interval far longer than the test: what reaches the cache after the burst's two
    # publishes came by offers.
    settings = settings.model_copy(
        update={"runtime": RuntimeOptions(publish_interval_seconds=3600.0)}
    )
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    last = DEPOSITS + 2
    async with run_worker(settings):
        await burst(gateway, account_id)
        hit = await until_cached(cache, "account", account_id, last)
        assert hit.snapshot.state is not None
        assert hit.snapshot.state["balance"] == sum(range(1, DEPOSITS + 1))
        entries = await until_streamed(cache, "account", account_id, last)
        by_activity = await published_revisions(temporal_client, f"account:{account_id}")
    assert revisions(entries) == list(range(1, last + 1))  # each once, in order, no gap
    # The burst's two publishes by activity, and none since: the last revision, and most of
    # the changes, came through the worker's offers.
    assert len(by_activity) <= 2 and last not in by_activity, by_activity


async def test_changes_whose_offers_were_lost_are_published_by_activity_once_each(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker that loses every offer (as one killed before it wrote them would), under the
    # default interval.
    lost: list[Offer] = []
    monkeypatch.setattr(OfferedPublishes, "hold", lambda self, run_id, made: lost.extend(made))
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    last = DEPOSITS + 2
    async with run_worker(settings):
        await burst(gateway, account_id)
        hit = await until_cached(cache, "account", account_id, last)
        assert hit.snapshot.state is not None
        assert hit.snapshot.state["balance"] == sum(range(1, DEPOSITS + 1))
        entries = await until_streamed(cache, "account", account_id, last)
        by_activity = await published_revisions(temporal_client, f"account:{account_id}")
    assert lost, "no offer was made"
    assert revisions(entries) == list(range(1, last + 1))
    # The interval's trailing publish carried the last of them.
    assert last in by_activity, by_activity


def offer_of(entity_id: str, revision: int) -> Offer:
    publication = Publication(
        snapshot=snapshot(entity_id, revision), since=revision - 1, changes=applied(revision)
    )
    return Offer("account", entity_id, revision, publication.model_dump_json().encode())


async def test_an_offer_is_written_only_once_its_task_was_recorded_and_not_evicted(
    cache: SnapshotCache,
) -> None:
    """Offers wait for Temporal to take their task's completion: one whose run is evicted
    meanwhile (the server refused the completion, and the task will run again, maybe
    otherwise) never reaches the cache or the stream."""
    offered = OfferedPublishes(cache)
    offered.watching = True
    offered.start()
    try:
        refused, settled, late = new_id(), new_id(), new_id()
        offered.hold("run-refused", [offer_of(refused, 1)])
        offered.hold("run-settled", [offer_of(settled, 1)])
        offered.hold("run-late", [offer_of(late, 1)])
        await asyncio.sleep(0)  # `hold` hands over through the loop, as from a thread
        offered.evicted("run-refused")  # before its completion was taken
        offered.completed("run-refused")
        offered.completed("run-settled")
        offered.completed("run-late")
        offered.evicted("run-late")  # taken, then evicted within the settling time
        hit = await until_cached(cache, "account", settled, 1)
        assert hit.snapshot.revision == 1
        await asyncio.sleep(2 * SETTLE_SECONDS)
        for gone in (refused, late):
            assert await cache.get("account", gone) is None, gone
            assert await entries_of(cache, "account", gone) == [], gone
        assert revisions(await entries_of(cache, "account", settled)) == [1]
    finally:
        await offered.stop()
