"""Offers: an entity's changes between its publishes by activity reach the cache and the
change stream through its worker, and the ones an offer lost still reach both, once each."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.service import RPCError

from api.gateway import EntityGateway
from entities.runtime.envelope import Publication, RuntimeOptions, Snapshot
from entities.runtime.offers import Offer
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import eventually, until_cached
from tests.entities.test_backlog import run_histories
from tests.entities.test_publishing import events
from tests.workers.test_change_stream import (
    applied,
    entries_of,
    revisions,
    snapshot,
    until_streamed,
)
from tests.workers.test_metrics import metrics_settings, scrape
from workers import offers as offers_module
from workers.activities import CacheActivities
from workers.cache import SnapshotCache
from workers.offers import SETTLE_SECONDS, OfferedPublishes
from workers.settings import Settings
from workers.temporal import connect_temporal
from workers.worker import build_worker, worker_runtime

DEPOSITS = 30


async def burst(gateway: EntityGateway, account_id: str) -> None:
    """Open, verify and DEPOSITS deposits, none waited for: revision DEPOSITS + 2."""
    opening = {"owner_name": "Ada", "email": "ada@example.com"}
    await gateway.send("account", account_id, "open", opening)
    await gateway.send("account", account_id, "verify", {})
    for amount in range(1, DEPOSITS + 1):
        await gateway.send("account", account_id, "deposit", {"amount": amount})


async def published_revisions(client: Client, workflow_id: str) -> list[int]:
    """The revision of each snapshot the entity's latest run published by activity."""
    return revisions_published(await client.get_workflow_handle(workflow_id).fetch_history())


def revisions_published(history: WorkflowHistory) -> list[int]:
    """The revision of each snapshot a run published by activity."""
    return [
        json.loads(event.activity_task_scheduled_event_attributes.input.payloads[0].data)[
            "snapshot"
        ]["revision"]
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and event.activity_task_scheduled_event_attributes.activity_type.name == "publish_snapshot"
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
    handle = temporal_client.get_workflow_handle(f"account:{account_id}")

    async def live_reads() -> None:
        # Queries that come with the burst's tasks: a task then has more than one
        # activation, and its offers wait for the last, which the core reports.
        for _ in range(40):
            with contextlib.suppress(RPCError):
                await handle.query("snapshot")

    async with run_worker(settings):
        await asyncio.gather(burst(gateway, account_id), live_reads())
        hit = await until_cached(cache, "account", account_id, last)
        assert hit.snapshot.state is not None
        assert hit.snapshot.state["balance"] == sum(range(1, DEPOSITS + 1))
        assert hit.snapshot == await handle.query("snapshot", result_type=Snapshot)
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
    monkeypatch.setattr(
        OfferedPublishes, "hold", lambda self, run_id, history_length, made: lost.extend(made)
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
    assert lost, "no offer was made"
    assert revisions(entries) == list(range(1, last + 1))
    # The interval's trailing publish carried the last of them.
    assert last in by_activity, by_activity


async def test_offers_across_continue_as_new_with_commands_racing_each_run_s_end(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """Runs of 8 commands, under four senders at once and live reads (Temporal refuses
    some of the tasks that end a run, a command having come meanwhile): the cache and the
    stream get every change once, in order, across the runs' ends, most of them through
    offers. A refused task run again here makes the same states, so this cannot tell
    whether its offers were taken back; `test_an_offer_is_written_only_once_...` holds
    that rule."""
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=8)})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    workflow_id = f"account:{account_id}"
    senders, each = 4, 15
    last = 2 + senders * each
    handle = temporal_client.get_workflow_handle(workflow_id)

    async def send(sender: int) -> None:
        for i in range(each):
            # Each amount once, so the balance tells whether any was applied twice.
            amount = 1 + sender * each + i
            await gateway.send("account", account_id, "deposit", {"amount": amount})

    async def live_reads() -> None:
        for _ in range(40):
            with contextlib.suppress(RPCError):
                await handle.query("snapshot")

    async with run_worker(settings):
        opening = {"owner_name": "Ada", "email": "ada@example.com"}
        await gateway.send("account", account_id, "open", opening)
        await gateway.send("account", account_id, "verify", {})
        await asyncio.gather(*(send(sender) for sender in range(senders)), live_reads())
        hit = await until_cached(cache, "account", account_id, last)
        entries = await until_streamed(cache, "account", account_id, last)
        assert hit.snapshot == await handle.query("snapshot", result_type=Snapshot)
        runs = await run_histories(temporal_client, workflow_id)
        by_activity = [revision for run in runs for revision in revisions_published(run)]
    assert hit.snapshot.state is not None
    assert hit.snapshot.state["balance"] == sum(range(1, senders * each + 1))
    assert revisions(entries) == list(range(1, last + 1))  # each once, in order, no gap
    assert len(runs) >= 3, len(runs)
    # Publishes by activity carried fewer revisions than there were: offers brought the rest.
    assert len(set(by_activity)) < last / 2, sorted(by_activity)


async def test_an_entity_offers_its_changes_while_a_publish_by_activity_is_in_flight(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A publish by activity that takes long (a slow Redis, retries) does not hold back the
    changes made meanwhile: they are offered, and reach the cache before it ends."""
    release = asyncio.Event()
    publish = CacheActivities.publish

    async def slow_publish(self: CacheActivities, publication: Publication) -> bool:
        await release.wait()
        return await publish(self, publication)

    monkeypatch.setattr(CacheActivities, "publish", slow_publish)
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    workflow_id = f"account:{account_id}"
    last = DEPOSITS + 2
    async with run_worker(settings):
        try:
            await burst(gateway, account_id)
            hit = await until_cached(cache, "account", account_id, last)
            completed = await events(
                temporal_client, workflow_id, EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            )
        finally:
            release.set()
        entries = await until_streamed(cache, "account", account_id, last)
    assert hit.snapshot.state is not None
    assert hit.snapshot.state["balance"] == sum(range(1, DEPOSITS + 1))
    assert completed == [], "a publish by activity ended before the cache had the burst"
    assert revisions(entries) == list(range(1, last + 1))


def offer_of(entity_id: str, revision: int) -> Offer:
    publication = Publication(
        snapshot=snapshot(entity_id, revision), since=revision - 1, changes=applied(revision)
    )
    return Offer("account", entity_id, revision, publication.model_dump_json().encode())


async def test_an_offer_is_written_only_once_its_task_was_recorded_and_not_evicted(
    cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offers wait for Temporal to take their task's completion: one whose run is evicted
    (the server refused the completion, and the task will run again, maybe otherwise),
    whose activation failed, or whose task ends the run never reaches the cache or the
    stream; one whose task had more activations waits for the last, which the core reports,
    even when the core hands that one over before it returns from the first; a later task
    proves it at once."""
    settle = 1.0  # long, so that what goes at once is told apart from what settled
    monkeypatch.setattr(offers_module, "SETTLE_SECONDS", settle)
    offered = OfferedPublishes(cache)
    offered.watching = True
    offered.start()
    names = ("refused", "settled", "late", "failed", "ends", "proved", "same", "raced", "next")
    ids = {name: new_id() for name in names}

    async def hold(name: str, run: str | None = None) -> None:
        offered.hold(run or f"run-{name}", 5, [offer_of(ids[name], 1)])
        await asyncio.sleep(0)  # `hold` hands over through the loop, as from a thread

    def complete(name: str, successful: bool = True, ends_run: bool = False) -> None:
        run = f"run-{name}"
        offered.completed(run, offered.take_held(run), successful, ends_run)

    async def cached(name: str) -> bool:
        return await cache.get("account", ids[name]) is not None

    try:
        for name in names:
            await hold(name)
        offered.polled("run-refused", 5, eviction=True)  # refused: evicted at once
        complete("refused")  # the eviction's own completion
        for name in ("settled", "late", "proved", "same"):
            complete(name)
        complete("failed", successful=False)
        complete("ends", ends_run=True)
        # The core hands over the same task's query, then returns from the first completion.
        raced = offered.take_held("run-raced")
        offered.polled("run-raced", 5, eviction=False)
        offered.completed("run-raced", raced, True, False)
        # The core hands over the run's next task before it returns: proved at once.
        following = offered.take_held("run-next")
        offered.polled("run-next", 9, eviction=False)
        offered.completed("run-next", following, True, False)
        offered.polled("run-proved", 9, eviction=False)  # its next task: recorded
        for name in ("proved", "next"):
            await until_cached(cache, "account", ids[name], 1)
        assert not await cached("settled")  # not before the settling time
        offered.polled("run-late", 5, eviction=True)  # evicted within the settling time
        offered.polled("run-same", 5, eviction=False)  # a query of the same task
        await until_cached(cache, "account", ids["settled"], 1)
        await asyncio.sleep(1.5 * settle)
        for gone in ("refused", "late", "failed", "ends", "same", "raced"):
            assert not await cached(gone), gone
            assert await entries_of(cache, "account", ids[gone]) == [], gone
        assert revisions(await entries_of(cache, "account", ids["settled"])) == [1]
        # The same task's last activation reported it: now they go.
        complete("same")
        complete("raced")
        for name in ("same", "raced"):
            await until_cached(cache, "account", ids[name], 1, timeout=3 * settle)
    finally:
        await offered.stop()


async def test_a_run_s_eviction_ends_with_its_own_completion_not_one_begun_before(
    cache: SnapshotCache,
) -> None:
    """A completion that went to the core before its run's eviction was polled (a
    deadlocked activation's failure) does not end the eviction: an activation that still
    ends after it, offering, is dropped, and only the eviction's own completion ends it."""
    offered = OfferedPublishes(cache)
    offered.watching = True
    offered.start()
    entity_id = new_id()
    try:
        before = offered.take_held("run-x")  # the deadlocked activation's failure
        offered.polled("run-x", 5, eviction=True)
        offered.completed("run-x", before, False, False)
        offered.hold("run-x", 5, [offer_of(entity_id, 1)])  # the stuck thread ends
        await asyncio.sleep(0)
        own = offered.take_held("run-x")
        assert own.batches == [] and own.evicting
        offered.completed("run-x", own, True, False)
        await asyncio.sleep(3 * SETTLE_SECONDS)
        assert await cache.get("account", entity_id) is None
    finally:
        await offered.stop()


async def test_a_worker_counts_the_offers_it_wrote_and_the_lag_of_the_write_that_stored_each(
    settings: Settings, temporal_client: Client, cache: SnapshotCache
) -> None:
    worker_settings = metrics_settings(settings)
    client = await connect_temporal(worker_settings, runtime=worker_runtime(worker_settings))
    gateway = EntityGateway(temporal_client, cache, worker_settings)
    account_id = new_id()
    workflow_id = f"account:{account_id}"
    last = DEPOSITS + 2
    async with build_worker(client, worker_settings, cache):
        await burst(gateway, account_id)
        await until_cached(cache, "account", account_id, last)
        # The interval's trailing publish by activity, carrying what offers already wrote.
        by_activity = await eventually(
            lambda: published_revisions(temporal_client, workflow_id),
            lambda revisions: last in revisions,
        )
        await eventually(
            lambda: events(
                temporal_client, workflow_id, EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            ),
            lambda completed: len(completed) >= len(by_activity),
        )
        metrics = await eventually(
            lambda: scrape(worker_settings),
            lambda m: m.value("tenure_offered_publishes_total", outcome="published") >= 1,
        )
    assert metrics.value("tenure_offered_publishes_total", outcome="dropped") == 0
    # Labelled as an activity's metrics are: by its queue.
    queues = metrics.labels("tenure_offered_publishes_total", "task_queue")
    assert queues == {worker_settings.task_queue}
    lag = "tenure_publish_lag_seconds_count"
    assert metrics.value(lag, entity_type="account", by="offer") >= 1
    # A publish by activity that found its snapshot written by an offer is not counted: it
    # read as the interval (about 2 s) where the cache had the change within milliseconds.
    counted = metrics.value(lag, entity_type="account", by="activity")
    assert counted < len(by_activity), (counted, by_activity)
