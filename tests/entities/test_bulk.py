"""BulkCommand on real servers: every target gets the command exactly once, through worker
deaths, pauses and continue-as-new, and what became of each is counted."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import ActivityEnvironment

import workers.bulk
from entities import catalog
from entities.account import AccountState
from entities.bulk import (
    PAGE_ACTIVITY,
    BulkCommandWorkflow,
    BulkInput,
    BulkProgress,
    BulkStatus,
    PageRequest,
    PageToSend,
    PageToSettle,
    TargetPage,
    bulk_command_id,
    bulk_workflow_id,
)
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import CommandEnvelope, OutcomeStatus, RuntimeOptions, Snapshot
from tests.conftest import WorkerFactory
from tests.entities.shop import eventually
from workers.bulk import BulkActivities
from workers.cache import SnapshotCache
from workers.delivery import CommandDelivery
from workers.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """An index of the test's own (a filter sees only its accounts), and a worker whose
    activities are cut short when it stops, as a killed one's are."""
    return settings.model_copy(
        update={
            "redis_prefix": f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:",
            "worker_shutdown_grace": 0.0,
        }
    )


async def send(
    delivery: CommandDelivery, entity_id: str, command: str, payload: dict[str, Any]
) -> None:
    account = catalog.entity_types()["account"]
    envelope = CommandEnvelope(command_id=uuid.uuid4().hex, name=command, payload=payload)
    for attempt in range(5):  # a loaded machine answers late; the same id applies once
        try:
            result = await delivery.request(account, entity_id, envelope)
            break
        except TenureError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE or attempt == 4:
                raise
    assert result.outcome.status is OutcomeStatus.APPLIED, result.outcome


async def open_accounts(client: Client, settings: Settings, n: int) -> list[str]:
    """`n` new accounts, opened and verified."""
    delivery = CommandDelivery(client, settings)
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i:04d}" for i in range(n)]
    window = asyncio.Semaphore(50)

    async def open_one(account_id: str) -> None:
        async with window:
            await send(delivery, account_id, "open", {"owner_name": "Bulk", "email": "b@x.io"})
            await send(delivery, account_id, "verify", {})

    await asyncio.gather(*(open_one(i) for i in ids))
    return ids


_QUERIES = asyncio.Semaphore(50)  # thousands at once exceed the server's limit of pollers


async def balance(client: Client, account_id: str) -> int:
    async with _QUERIES:
        snapshot = await client.get_workflow_handle(f"account:{account_id}").query(
            "snapshot", result_type=Snapshot
        )
    return AccountState.model_validate(snapshot.state).balance


async def start_bulk(
    client: Client, settings: Settings, command: str, payload: dict[str, Any], **fields: Any
) -> WorkflowHandle[BulkCommandWorkflow, BulkProgress]:
    """A bulk command sending `command` with `payload` to the accounts `fields` name (`ids`
    or a `filter`), paged and paced as they say."""
    bulk_id = uuid.uuid4().hex[:12]
    return await client.start_workflow(
        BulkCommandWorkflow.run,
        BulkInput(
            bulk_id=bulk_id,
            sent_by="admin:ops",
            entity_type="account",
            command=command,
            payload=payload,
            **fields,
        ),
        id=bulk_workflow_id(bulk_id),
        task_queue=settings.bulk_task_queue,
    )


async def start_deposits(
    client: Client, settings: Settings, amount: int, **fields: Any
) -> WorkflowHandle[BulkCommandWorkflow, BulkProgress]:
    """A bulk command depositing `amount` into the accounts `fields` name."""
    return await start_bulk(client, settings, "deposit", {"amount": amount}, **fields)


async def progress(handle: WorkflowHandle[BulkCommandWorkflow, BulkProgress]) -> BulkProgress:
    return await handle.query(BulkCommandWorkflow.progress)


# `make bulk-soak` runs the next test over BULK_ENTITIES (10,000) targets: that many ids, the
# most a bulk command may name, all but one of them accounts opened first.
ENTITIES = int(os.environ.get("BULK_ENTITIES", "300"))
PAGE = max(60, ENTITIES // 5)


async def test_a_worker_killed_midway_leaves_every_entity_credited_exactly_once(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    async with run_worker():
        ids = await open_accounts(temporal_client, settings, ENTITIES - 1)
        bulk = await start_deposits(
            temporal_client,
            settings,
            amount=7,
            ids=[*ids, "never-opened"],
            page_size=min(PAGE, 1000),
            window=20,
            pages_per_run=2,
        )
        # Stopped past its first page, its activities cut short mid-page.
        await eventually(lambda: progress(bulk), lambda p: p.done >= PAGE, timeout=60 + ENTITIES)
    async with run_worker():
        done = await bulk.result()
        balances = await asyncio.gather(*(balance(temporal_client, i) for i in ids))
    assert sorted(set(balances)) == [7]
    assert done.status is BulkStatus.COMPLETED
    n = ENTITIES
    assert (done.total, done.delivered, done.done, done.applied, done.failed) == (n, n, n, n - 1, 0)
    assert done.rejected == {"NOT_FOUND": 1}
    assert [f.entity_id for f in done.failures] == ["never-opened"]
    assert done.pages == -(-n // min(PAGE, 1000))
    assert done.started_at and done.delivered_at and done.ended_at
    assert done.started_at <= done.delivered_at <= done.ended_at
    # It continued as new every two pages: the last run sent at most two.
    last_run = await temporal_client.get_workflow_handle(bulk.id).fetch_history()
    started = last_run.events[0].workflow_execution_started_event_attributes
    assert started.continued_execution_run_id
    sent = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in last_run.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert 1 <= sent.count("bulk_deliver") <= 2


async def test_commands_are_all_sent_before_entities_apply_them_and_counted_as_they_do(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """Sending keeps Temporal's pace, not the entities': with no worker applying commands,
    a bulk command still hands every one to Temporal, and counts each outcome once the
    entities apply them."""
    bulk_settings = settings.model_copy(update={"task_queue": f"{settings.task_queue}-apart"})
    async with run_worker():
        ids = await open_accounts(temporal_client, settings, 30)
    async with run_worker(bulk_settings):  # the bulk's own activities, no entity's workflow
        bulk = await start_deposits(
            temporal_client, bulk_settings, amount=2, ids=ids, page_size=7, window=5
        )
        sent = await eventually(lambda: progress(bulk), lambda p: p.delivered == 30)
        assert (sent.status, sent.done, sent.applied, sent.pages) == (BulkStatus.RUNNING, 0, 0, 5)
        assert sent.delivered_at is not None
        async with run_worker():  # the entities' workflows run again
            done = await bulk.result()
            balances = await asyncio.gather(*(balance(temporal_client, i) for i in ids))
    assert (done.status, done.total, done.done, done.applied, done.failed) == (
        BulkStatus.COMPLETED,
        30,
        30,
        30,
        0,
    )
    assert done.delivered_at == sent.delivered_at
    assert sorted(set(balances)) == [2]


async def test_a_filter_pages_the_index_and_a_paused_bulk_resumes_where_it_stopped(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory, cache: SnapshotCache
) -> None:
    async with run_worker():
        # Enough that the bulk cannot end between the test seeing 10 done and its pause
        # landing: 30 deposits were all applied within 0.3 s once their changes reached the
        # stream within milliseconds (offers).
        ids = await open_accounts(temporal_client, settings, 120)
        delivery = CommandDelivery(temporal_client, settings)
        suspended = ids[::4]
        active = len(ids) - len(suspended)
        for account_id in suspended:
            await send(delivery, account_id, "suspend", {"reason": "review"})
        # Listed once their last snapshots are in the index.
        await eventually(
            lambda: cache.get("account", suspended[-1]),
            lambda hit: hit is not None and (hit.snapshot.state or {}).get("status") == "SUSPENDED",
        )
        bulk = await start_deposits(
            temporal_client,
            settings,
            amount=3,
            filter={"tags": {"status": ["ACTIVE"]}},
            page_size=5,
            window=5,
            paused=True,
        )
        paused = await eventually(lambda: progress(bulk), lambda p: p.status is BulkStatus.PAUSED)
        assert paused.done == 0
        await bulk.signal("resume")
        await eventually(lambda: progress(bulk), lambda p: p.done >= 10)
        await bulk.signal("pause")
        stopped = await eventually(lambda: progress(bulk), lambda p: p.status is BulkStatus.PAUSED)
        await asyncio.sleep(1.0)
        still = await progress(bulk)
        assert (still.done, still.cursor) == (stopped.done, stopped.cursor)
        assert still.done < active
        assert still.paused_at is not None and still.paused_seconds > 0  # the first pause
        await bulk.signal("resume")
        done = await bulk.result()
        balances = {i: await balance(temporal_client, i) for i in ids}
    assert done.status is BulkStatus.COMPLETED
    assert (done.total, done.done, done.applied) == (active, active, active)
    # Both pauses are kept apart from its working time, for its eta: 1 s at least.
    assert done.paused_at is None and done.paused_seconds >= 1.0
    assert {i for i, b in balances.items() if b == 3} == set(ids) - set(suspended)
    assert all(balances[i] == 0 for i in suspended)


async def test_a_cancelled_bulk_sends_no_further_page(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    async with run_worker():
        ids = await open_accounts(temporal_client, settings, 20)
        bulk = await start_deposits(
            temporal_client,
            settings,
            amount=1,
            ids=ids,
            page_size=5,
            paused=True,
        )
        await bulk.signal("cancel")
        done = await bulk.result()
        balances = await asyncio.gather(*(balance(temporal_client, i) for i in ids))
    assert done.status is BulkStatus.CANCELLED and done.done == 0
    assert set(balances) == {0}


async def test_outcomes_seen_in_the_change_stream_and_asked_of_entities_add_up(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A page learns applied commands from the change stream, and asks the entities about
    the rest: a rejection (which streams nothing) and a closed entity are counted as such,
    once, beside the applied ones, and every command was applied at most once."""
    async with run_worker():
        ids = await open_accounts(temporal_client, settings, 12)
        delivery = CommandDelivery(temporal_client, settings)
        suspended, closed = ids[0], ids[1]
        await send(delivery, suspended, "suspend", {"reason": "review"})
        await send(delivery, closed, "close", {})
        bulk = await start_deposits(
            temporal_client,
            settings,
            amount=4,
            ids=ids,
            page_size=12,
            window=5,
        )
        done = await bulk.result()
        balances = await asyncio.gather(*(balance(temporal_client, i) for i in ids[2:]))
    assert sorted(set(balances)) == [4]
    assert (done.status, done.total, done.done, done.applied, done.failed) == (
        BulkStatus.COMPLETED,
        12,
        12,
        10,
        0,
    )
    assert done.rejected == {"INVALID_TRANSITION": 2}
    assert sorted(f.entity_id for f in done.failures) == sorted([suspended, closed])


def elsewhere(settings: Settings) -> Settings:
    """Entities on a task queue of their own, whose worker a test stops and starts: Temporal
    takes their commands while it is down, and a bulk command waits to count them."""
    return settings.model_copy(update={"task_queue": f"{settings.task_queue}-elsewhere"})


async def open_account(delivery: CommandDelivery, account_id: str) -> None:
    await send(delivery, account_id, "open", {"owner_name": "Bulk", "email": "b@x.io"})
    await send(delivery, account_id, "verify", {})


async def listed(cache: SnapshotCache, statuses: dict[str, str]) -> None:
    """Until the cache, which the listing index follows, shows each account's status."""

    async def shown() -> dict[str, str | None]:
        hits = await asyncio.gather(*(cache.get("account", i) for i in statuses))
        return {
            i: (hit.snapshot.state or {}).get("status") if hit is not None else None
            for i, hit in zip(statuses, hits, strict=True)
        }

    await eventually(shown, lambda now: now == statuses)


async def test_a_cancel_once_every_target_was_sent_leaves_the_bulk_completed(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """Nothing is left to cancel once the last page is sent: it ended CANCELLED all the same,
    with every target sent its command and applying it."""
    unserved = elsewhere(settings)
    async with run_worker(unserved):
        ids = await open_accounts(temporal_client, unserved, 3)
    async with run_worker():
        bulk = await start_deposits(temporal_client, settings, amount=2, ids=ids)
        sent = await eventually(lambda: progress(bulk), lambda p: p.delivered_at is not None)
        assert sent.done == 0  # their worker is down: nothing counted yet
        await bulk.signal("cancel")
        asked = await eventually(lambda: progress(bulk), lambda p: p.cancel_requested)
        assert asked.status is BulkStatus.RUNNING
        async with run_worker(unserved):
            done = await bulk.result()
            balances = await asyncio.gather(*(balance(temporal_client, i) for i in ids))
    assert done.status is BulkStatus.COMPLETED
    assert (done.total, done.done, done.applied) == (3, 3, 3)
    assert set(balances) == {2}


async def test_a_filter_s_total_follows_entities_that_come_to_match_ahead_of_its_cursor(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory, cache: SnapshotCache
) -> None:
    """The total was fixed when the first page was read: entities reactivated ahead of the
    cursor took `done` past it (20 of 10), and the eta into the past. It is raised to what
    was sent, and exact at the end."""
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i:04d}" for i in range(20)]
    unserved = elsewhere(settings)
    async with run_worker(unserved):
        await open_account(CommandDelivery(temporal_client, unserved), ids[0])
        await listed(cache, {ids[0]: "ACTIVE"})
    async with run_worker():
        delivery = CommandDelivery(temporal_client, settings)
        await asyncio.gather(*(open_account(delivery, i) for i in ids[1:]))
        late = ids[10:]
        await asyncio.gather(*(send(delivery, i, "suspend", {"reason": "review"}) for i in late))
        await listed(cache, {i: "ACTIVE" if i not in late else "SUSPENDED" for i in ids})
        # The first page goes to the unserved account among others: the run waits to count
        # it before it goes on, while the rest come to match.
        bulk = await start_deposits(
            temporal_client,
            settings,
            amount=1,
            filter={"tags": {"status": ["ACTIVE"]}},
            page_size=5,
            pages_per_run=1,
        )
        first = await eventually(lambda: progress(bulk), lambda p: p.pages == 1)
        assert first.total == 10
        await asyncio.gather(*(send(delivery, i, "reactivate", {}) for i in late))
        await listed(cache, dict.fromkeys(late, "ACTIVE"))
        async with run_worker(unserved):
            done = await bulk.result()
    assert done.status is BulkStatus.COMPLETED
    assert (done.total, done.delivered, done.done, done.applied) == (20, 20, 20, 20)


async def test_a_command_asked_about_after_its_entity_forgot_it_is_not_applied_twice(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory, cache: SnapshotCache
) -> None:
    """Counting a page asks an entity about a command the change stream did not show, and
    asking sends it again. Asked after the entity's ledger (4 commands here) had forgotten
    it, the entity applied it a second time: a deposit made twice. The page's commands sent
    again say when the page was first sent, and the entity refuses it, OUTCOME_UNKNOWN."""
    small = settings.model_copy(update={"runtime": RuntimeOptions(ledger_size=4)})
    async with run_worker(small):
        [account_id] = await open_accounts(temporal_client, small, 1)
        delivery = CommandDelivery(temporal_client, small)
        bulk_id = uuid.uuid4().hex[:12]
        page = PageToSend(
            bulk_id=bulk_id,
            entity_type="account",
            command="deposit",
            payload={"amount": 5},
            ids=[account_id],
            sent_by="admin:ops",
            window=1,
            sent_at=datetime.now(UTC),
        )
        first = CommandEnvelope(
            command_id=bulk_command_id(bulk_id, account_id), name="deposit", payload={"amount": 5}
        )
        await delivery.request(catalog.entity_types()["account"], account_id, first)
        for _ in range(5):
            await send(delivery, account_id, "deposit", {"amount": 1})
        counting = BulkActivities(temporal_client, cache, small)
        counted = await ActivityEnvironment().run(
            counting.bulk_settle, PageToSettle(page=page, position=None)
        )
        assert counted.rejected == {ErrorCode.OUTCOME_UNKNOWN.value: 1}
        assert await balance(temporal_client, account_id) == 10  # once, and five ones


class _Unreachable(CommandDelivery):
    """Temporal unavailable to one entity's commands for their first `times` hand-overs."""

    def __init__(self, client: Client, settings: Settings, entity_id: str, times: int) -> None:
        super().__init__(client, settings)
        self._entity_id, self._left = entity_id, times

    async def deliver(self, entity: Any, entity_id: str, envelope: CommandEnvelope) -> Any:
        if entity_id == self._entity_id and self._left > 0:
            self._left -= 1
            raise TenureError(ErrorCode.UNAVAILABLE, "Temporal is restarting")
        return await super().deliver(entity, entity_id, envelope)


async def test_a_command_temporal_could_not_take_while_sending_is_sent_again_while_counting(
    temporal_client: Client,
    settings: Settings,
    run_worker: WorkerFactory,
    cache: SnapshotCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Temporal unavailable for the few seconds a page's sending tries one entity's command
    (a restart): it was counted failed there and then, never sent again nor asked about, and
    the entity went without its deposit for good, one of "failed" that no rerun under the
    same key could reach. It now waits for the page's counting, which sends it again."""
    monkeypatch.setattr(workers.bulk, "RETRY_SECONDS", 0.01)
    async with run_worker():
        ids = await open_accounts(temporal_client, settings, 3)
        activities = BulkActivities(temporal_client, cache, settings)
        activities._delivery = _Unreachable(
            temporal_client, settings, ids[0], workers.bulk.UNKNOWN_ATTEMPTS
        )
        page = PageToSend(
            bulk_id=uuid.uuid4().hex[:12],
            entity_type="account",
            command="deposit",
            payload={"amount": 7},
            ids=ids,
            sent_by="admin:ops",
            window=3,
            sent_at=datetime.now(UTC),
        )
        delivered = await ActivityEnvironment().run(activities.bulk_deliver, page)
        counted = await ActivityEnvironment().run(
            activities.bulk_settle,
            PageToSettle(
                page=page.model_copy(update={"ids": delivered.waiting}),
                position=delivered.position,
            ),
        )
        balances = await asyncio.gather(*(balance(temporal_client, i) for i in ids))
    assert delivered.settled.applied + counted.applied == 3
    assert delivered.settled.failed + counted.failed == 0
    assert balances == [7, 7, 7]


async def test_a_total_the_first_page_could_not_count_stays_null_until_the_last(
    temporal_client: Client,
    settings: Settings,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A filter too wide for the index to count at the first page (over 500 candidates):
    each later page asked for a count again, and once the bulk's own commands had taken
    entities out of the filter, the index counted those left. `total` became about what
    was sent (9 of 12 here), and the progress bar read full with a page to go. It stays
    null until the last page makes it exact.

    The index's answers are scripted (the page activity, not Temporal or Redis): a real one
    counts the entities left only once their changes are indexed, which a run of this size
    outpaces."""
    async with run_worker():
        ids = sorted(await open_accounts(temporal_client, settings, 12))
    asked: list[bool] = []
    looked = asyncio.Event()

    @PAGE_ACTIVITY.defn
    async def scripted(self: BulkActivities, given: Any) -> TargetPage:
        request = PageRequest.model_validate(given)  # a local function's hints go unread
        asked.append(request.count_total)
        start = int(request.cursor or 0)
        if start == 9:
            await looked.wait()  # the last page, once the test has read the progress
        end = start + 3
        left = len(ids) - start  # what still matches: the bulk suspended the others
        return TargetPage(
            ids=ids[start:end],
            cursor=str(end) if end < len(ids) else None,
            total=left if request.count_total and start > 0 else None,
        )

    monkeypatch.setattr(BulkActivities, "bulk_page", scripted)
    async with run_worker():
        bulk = await start_bulk(
            temporal_client,
            settings,
            "suspend",
            {"reason": "review"},
            filter={"tags": {"status": ["ACTIVE"]}},
            page_size=3,
            window=3,
        )
        midway = await eventually(lambda: progress(bulk), lambda p: p.delivered == 9)
        looked.set()
        done = await bulk.result()
    assert midway.total is None, midway
    assert done.status is BulkStatus.COMPLETED and done.total == done.delivered == 12
    assert asked[0] and not any(asked[1:]), asked
