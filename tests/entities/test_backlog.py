"""A workflow task applies at most `max_commands_per_task` commands; the rest are held and
applied in the tasks after it, in order (entities/runtime/backlog.py). Without the bound, a
backlog that built up while no worker ran came in one task that outlasted the SDK's 2 s
deadlock bound on every retry, and the entity was stuck for good."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client, WorkflowHistory

from api.gateway import Consistency, EntityGateway
from entities.runtime.backlog import Backlog
from entities.runtime.envelope import CommandEnvelope, RuntimeOptions
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import send_as_a_client
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache
from workers.sandbox import entity_replayer
from workers.settings import Settings

PER_TASK = 10
DEPOSITS = 150
SENDS = 5  # a command sent again with its key, at most


async def test_a_backlog_is_applied_a_task_at_a_time_in_order_and_once(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """With no worker, 150 deposits of 1 and then a withdrawal of all of them wait in the
    account's history. A worker then takes them ten a task, in order (the withdrawal,
    last, finds the money), while waited commands, repeats and reads come in; the run
    continues as new meanwhile."""
    settings, gateway, account_id = await an_account_left_without_a_worker(
        temporal_client,
        settings,
        cache,
        run_worker,
        RuntimeOptions(max_commands_per_task=PER_TASK, max_commands_per_run=60),
    )
    gate = asyncio.Semaphore(16)

    async def deposit(n: int, wait: bool = False) -> None:
        # Waited, behind the backlog, longer than a command waits: UNAVAILABLE, "retry with
        # the same idempotencyKey", as a client does.
        async with gate:
            await send_as_a_client(
                gateway,
                "account",
                account_id,
                "deposit",
                {"amount": 1},
                key=f"d{n}",
                wait=wait,
                sends=SENDS,
            )

    await asyncio.gather(*(deposit(n) for n in range(DEPOSITS)))
    await gateway.send(
        "account", account_id, "withdraw", {"amount": DEPOSITS}, idempotency_key="all"
    )
    async with run_worker(settings):
        waited = asyncio.gather(*(deposit(n, wait=True) for n in range(DEPOSITS, DEPOSITS + 20)))
        repeats = asyncio.gather(*(deposit(n) for n in range(0, DEPOSITS, 3)))
        reads = [await gateway.read("account", account_id, Consistency.LIVE) for _ in range(5)]
        await asyncio.gather(waited, repeats)
        last = await gateway.send(
            "account", account_id, "deposit", {"amount": 1}, idempotency_key="d-last", wait=True
        )
        withdrawal = await gateway.send(
            "account",
            account_id,
            "withdraw",
            {"amount": DEPOSITS},
            idempotency_key="all",
            wait=True,
        )
        histories = await run_histories(temporal_client, f"account:{account_id}")
    assert withdrawal.applied
    assert last.read is not None and last.read.snapshot.state is not None
    # Every deposit once (the repeats changed nothing), the withdrawal after the first 150.
    assert last.read.snapshot.state["balance"] == 20 + 1
    assert all(r is not None for r in reads)
    assert len(histories) >= 2  # it continued as new, once every held command was applied
    replayer = entity_replayer(temporal_client.data_converter)
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, result.replay_failure
        # No task failed, but for the server's refusal of a continue-as-new that new
        # commands overtook (its protocol: look at them first).
        causes = {
            e.workflow_task_failed_event_attributes.cause
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        }
        assert causes <= {WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND}


async def an_account_left_without_a_worker(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    runtime: RuntimeOptions,
) -> tuple[Settings, EntityGateway, str]:
    """An active account run with `runtime`, its worker then stopped: the settings, a
    gateway and the account's id."""
    settings = settings.model_copy(update={"runtime": runtime})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
    return settings, gateway, account_id


async def run_histories(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """Every run's history, the current run's first, back through continue-as-new."""
    histories: list[WorkflowHistory] = []
    run_id: str | None = None
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(history)
        started = history.events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return histories
        run_id = started.continued_execution_run_id


def envelope(n: int) -> CommandEnvelope:
    return CommandEnvelope(command_id=f"c{n}", name="deposit", payload={"amount": 1})


def test_a_task_admits_its_most_then_holds_the_rest_in_order() -> None:
    backlog = Backlog(per_task=2)
    assert backlog.admits(task=10)
    backlog.applied()
    assert backlog.admits(task=10)
    backlog.applied()
    assert not backlog.admits(task=10)  # the task is full
    assert [backlog.hold(envelope(n)) for n in range(5)] == [1, 2, 3, 4, 5]
    assert not backlog.admits(task=14)  # a new task, but older commands are held
    assert [e.command_id for e in backlog.next_slice(task=14)] == ["c0", "c1"]
    assert backlog.released(2) and not backlog.released(3)
    assert backlog.next_slice(task=14) == []  # that task is full now
    assert [e.command_id for e in backlog.next_slice(task=17)] == ["c2", "c3"]
    assert [e.command_id for e in backlog.next_slice(task=20)] == ["c4"]
    assert not backlog and backlog.admits(task=20)


def test_the_oldest_held_command_tells_when_it_came_batch_or_not() -> None:
    backlog: Backlog[list[int]] = Backlog(
        per_task=2, unpack=lambda batch: [envelope(n) for n in batch]
    )
    assert backlog.front_mark() is None
    backlog.hold([1, 2, 3], mark=4)
    backlog.hold(envelope(9), mark=7)
    backlog.hold(envelope(10), mark=8)
    assert backlog.front_mark() == 4
    assert [e.command_id for e in backlog.next_slice(task=1)] == ["c1", "c2"]
    assert backlog.front_mark() == 4  # c3, of the batch that came at 4
    assert [e.command_id for e in backlog.next_slice(task=2)] == ["c3", "c9"]
    assert backlog.front_mark() == 8
    backlog.next_slice(task=3)
    assert backlog.front_mark() is None


def test_a_batch_is_held_as_it_came_and_unpacked_only_at_its_turn() -> None:
    """A flood of batches costs the task that brings it one hold each: a batch is unpacked
    when it reaches the front, its commands in order, none applied past the task's bound;
    an empty batch is gone at the first slice that reaches it, whatever room is left."""
    unpacked: list[str] = []

    def unpack(batch: list[int]) -> list[CommandEnvelope]:
        unpacked.append(",".join(map(str, batch)))
        return [envelope(n) for n in batch]

    backlog: Backlog[list[int]] = Backlog(per_task=2, unpack=unpack)
    backlog.admits(task=10)
    backlog.applied()
    backlog.applied()
    assert backlog.hold([0, 1, 2]) == 1
    assert backlog.hold(envelope(3)) == 2
    assert backlog.hold([]) == 3
    assert backlog.hold([4]) == 4
    assert unpacked == []  # holding decodes nothing
    assert backlog.next_slice(task=10) == [] and unpacked == ["0,1,2"]  # the task is full
    assert [e.command_id for e in backlog.next_slice(task=13)] == ["c0", "c1"]
    assert not backlog.released(1) and unpacked == ["0,1,2"]
    assert [e.command_id for e in backlog.next_slice(task=16)] == ["c2", "c3"]
    assert backlog.released(2) and not backlog.released(4)
    # The empty batch went in that slice, with no task of its own; the batch behind it,
    # at the front now, was unpacked, and its command waits for room.
    assert unpacked == ["0,1,2", "", "4"]
    assert backlog.next_slice(task=16) == []
    assert [e.command_id for e in backlog.next_slice(task=19)] == ["c4"]
    assert not backlog and backlog.released(4) and backlog.admits(task=19)


async def test_a_batch_that_is_not_commands_is_dropped_and_the_entity_goes_on(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """A `commands` signal from outside whose payload is not a list of envelopes is dropped,
    as the SDK drops any signal it cannot decode, whether it came when the entity could
    apply it or was held to be decoded later: no workflow task fails over it."""
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_task=2)})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
    handle = temporal_client.get_workflow_handle(f"account:{account_id}")

    def batch(*numbers: int) -> list[dict[str, object]]:
        return [envelope(n).model_dump() for n in numbers]

    # No worker: they all come in one task, which applies two and holds the rest.
    await handle.signal("commands", batch(0, 1, 2))
    await handle.signal("commands", [{"bogus": True}])
    await handle.signal("commands", "not a list")
    await handle.signal("commands", batch(3))
    async with run_worker(settings):
        await handle.signal("commands", [{"name": 5}])  # nothing held now: decoded at once
        # The entity's first task may wait out the stopped worker's sticky queue (10 s)
        # while a command waits 6: sent again with the same key, as a client does.
        receipt = await send_as_a_client(
            gateway,
            "account",
            account_id,
            "deposit",
            {"amount": 1},
            key="after",
            wait=True,
            sends=SENDS,
        )
        histories = await run_histories(temporal_client, f"account:{account_id}")
    assert receipt.read is not None and receipt.read.snapshot.state is not None
    assert receipt.read.snapshot.state["balance"] == 5
    failures = [
        e.workflow_task_failed_event_attributes.cause
        for history in histories
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    ]
    assert set(failures) <= {WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND}


async def test_a_retry_held_behind_a_backlog_deeper_than_the_ledger_is_applied_once(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """A deposit, thirty more, then the first deposit's retry under its key wait with no
    worker. The account remembers its last sixteen commands: when the retry's turn comes,
    thirty deposits later, its ledger has forgotten the first copy, which it still
    remembered when the retry came. The retry is still its repeat: the money arrives once."""
    settings, gateway, account_id = await an_account_left_without_a_worker(
        temporal_client,
        settings,
        cache,
        run_worker,
        RuntimeOptions(max_commands_per_task=PER_TASK, ledger_size=16),
    )

    async def deposit(key: str, amount: int) -> None:
        await gateway.send(
            "account", account_id, "deposit", {"amount": amount}, idempotency_key=key
        )

    await deposit("first", 1000)
    for n in range(30):
        await deposit(f"d{n}", 1)
    await deposit("first", 1000)  # its sender did not hear back, and sends it again
    async with run_worker(settings):
        last = await send_as_a_client(
            gateway, "account", account_id, "deposit", {"amount": 1}, key="last", wait=True
        )
        histories = await run_histories(temporal_client, f"account:{account_id}")
    assert last.read is not None and last.read.snapshot.state is not None
    assert last.read.snapshot.state["balance"] == 1000 + 30 + 1
    replayer = entity_replayer(temporal_client.data_converter)
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, result.replay_failure
