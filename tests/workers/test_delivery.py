"""Delivering commands while an entity continues as new over and over: every command sent
from many API processes at once is applied once, none refused; waited commands as updates,
and by signal when Temporal refuses or does not answer the update."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode

from api.gateway import Consistency, EntityGateway, Receipt
from deploy.embedded import EmbeddedTemporal
from entities.account import account
from entities.bulk import BULK_WORKFLOW, BulkInput
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandResult,
    Outcome,
    OutcomeStatus,
    RuntimeOptions,
    Snapshot,
    sender_key,
)
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import eventually
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache
from workers.coalescing import SignalCoalescer
from workers.delivery import CommandDelivery, _of_this_command
from workers.settings import Settings
from workers.temporal import within


async def test_commands_racing_a_run_that_closes_are_all_applied(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # A new run every five commands, and 32 gateways (as 32 API processes would) each
    # sending its own signals: many arrive while a run is closing.
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=5)})
    gateways = [EntityGateway(temporal_client, cache, settings) for _ in range(32)]
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateways[0], account_id)
        await asyncio.gather(
            *(
                gateways[i % 32].send(
                    "account", account_id, "deposit", {"amount": 1}, idempotency_key=f"d{i}"
                )
                for i in range(2000)
            )
        )
        await gateways[0].send("account", account_id, "deposit", {"amount": 1}, wait=True)
        read = await gateways[0].read("account", account_id, Consistency.LIVE)
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["balance"] == 2001
    assert read.snapshot.revision == 2 + 2001


async def kinds_of_delivery(client: Client, workflow_id: str) -> tuple[int, int]:
    """How many commands reached the entity's runs as updates, and how many as signals."""
    updates = signals = 0
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            updates += 1
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signals += 1
    return updates, signals


async def test_a_waited_command_is_one_update_and_its_retry_after_a_new_run_is_not_applied(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=4)})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    workflow_id = gateway.entity("account").workflow_id(account_id)
    async with run_worker(settings):
        await open_active(gateway, account_id)  # open starts the entity with its update
        first = await gateway.send(
            "account", account_id, "deposit", {"amount": 7}, idempotency_key="k", wait=True
        )
        assert first.read is not None and first.read.snapshot.state is not None
        assert first.read.snapshot.state["balance"] == 7
        # open, verify and deposit: three updates, no signal
        assert await kinds_of_delivery(temporal_client, workflow_id) == (3, 0)
        handle = temporal_client.get_workflow_handle(workflow_id)
        first_run = (await handle.describe()).run_id
        for _ in range(4):  # past the run's four commands: a new run
            await gateway.send("account", account_id, "deposit", {"amount": 1}, wait=True)
        again = await gateway.send(
            "account", account_id, "deposit", {"amount": 7}, idempotency_key="k", wait=True
        )
        read = await gateway.read("account", account_id, Consistency.LIVE)
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["balance"] == 7 + 4
    assert again.read is not None and again.read.snapshot.revision == read.snapshot.revision
    assert (await handle.describe()).run_id != first_run


async def test_many_waited_commands_at_once_to_one_entity_across_new_runs_are_each_applied_once(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # One process sends an entity 2 updates at a time (Temporal takes 10), the rest by
    # signal with their outcomes queried; an update that reaches a run as it closes is
    # refused and goes by signal too: 60 waited commands at once, a third of them sent
    # twice, to one account that starts a new run every 20.
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=20)})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    keys = [f"w{n}" for n in range(60)] + [f"w{n}" for n in range(0, 60, 3)]

    async def deposit(key: str) -> Receipt:
        # As a client does: an outcome not known in time (UNAVAILABLE) is asked again with
        # the same key. A loaded machine answers some of 80 queries at once late.
        for _ in range(5):
            try:
                return await gateway.send(
                    "account", account_id, "deposit", {"amount": 1}, idempotency_key=key, wait=True
                )
            except TenureError as exc:
                assert exc.code is ErrorCode.UNAVAILABLE, exc
        raise AssertionError(f"{key} never answered")

    async with run_worker(settings):
        await open_active(gateway, account_id)
        receipts = await asyncio.gather(*(deposit(k) for k in keys))
        read = await gateway.read("account", account_id, Consistency.LIVE)
    assert all(r.applied for r in receipts)
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["balance"] == 60
    assert read.snapshot.revision == 2 + 60


async def test_waited_commands_beyond_the_updates_in_flight_go_together_in_the_next(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """40 waited commands at once to one entity, from one process: two updates go at once,
    and the rest wait and go together in the next ones (`apply_batch`), each applied once
    and answered with its own outcome; none goes by signal, whose outcome would be asked
    with queries over and over."""
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    workflow_id = gateway.entity("account").workflow_id(account_id)
    async with run_worker(settings):
        await open_active(gateway, account_id)
        receipts = await asyncio.gather(
            *(
                gateway.send(
                    "account",
                    account_id,
                    "deposit",
                    {"amount": n},
                    idempotency_key=f"d{n}",
                    wait=True,
                )
                for n in range(1, 41)
            )
        )
        repeated = await gateway.send(
            "account", account_id, "deposit", {"amount": 7}, idempotency_key="d7", wait=True
        )
        read = await gateway.read("account", account_id, Consistency.LIVE)
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["balance"] == sum(range(1, 41))
    assert sorted(r.revision for r in receipts) == list(range(3, 43))  # one each
    assert repeated.revision == receipts[6].revision
    updates, signals = await kinds_of_delivery(temporal_client, workflow_id)
    assert signals == 0
    assert updates < 2 + 40  # open and verify, then fewer updates than commands


async def test_a_waited_command_whose_update_goes_unanswered_is_applied_once_by_signal(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # No worker: the update is never answered. The command goes by signal, durably, and
    # the sender is told to retry; once a worker is back it is applied once, though both
    # the update and the signal may reach the entity.
    account_id = new_id()
    # Opened with the usual wait: a worker's first task can take longer than the test's.
    async with run_worker(settings):
        await open_active(EntityGateway(temporal_client, cache, settings), account_id)
    settings = settings.model_copy(update={"command_wait_timeout": 1.0})
    gateway = EntityGateway(temporal_client, cache, settings)
    with pytest.raises(TenureError) as refused:
        await gateway.send(
            "account", account_id, "deposit", {"amount": 5}, idempotency_key="late", wait=True
        )
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "retry with the same idempotencyKey" in refused.value.message
    async with run_worker(settings):

        async def retry() -> Receipt | None:
            try:
                return await gateway.send(
                    "account",
                    account_id,
                    "deposit",
                    {"amount": 5},
                    idempotency_key="late",
                    wait=True,
                )
            except TenureError as exc:
                assert exc.code is ErrorCode.UNAVAILABLE  # the worker is still starting
                return None

        # Retried as a client would, until the worker back is answering.
        retried = await eventually(retry, lambda receipt: receipt is not None, 30)
        read = await gateway.read("account", account_id, Consistency.LIVE)
    assert retried is not None and retried.read is not None
    assert retried.read.snapshot.state is not None
    assert retried.read.snapshot.state["balance"] == 5
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["balance"] == 5
    assert read.snapshot.revision == 2 + 1


class _Behind(CommandDelivery):
    """Every signal refused as backpressure refuses one to an entity far behind."""

    async def deliver(self, *args: Any, **kwargs: Any) -> Any:
        raise TenureError(ErrorCode.UNAVAILABLE, "account is behind; nothing was stored")


async def test_a_waited_command_whose_update_and_signal_both_fail_is_not_said_unstored(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """A waited command's update goes unanswered (here no worker answers it) and is sent
    again by signal, which is refused: that refusal ("nothing was stored") was its answer,
    though the update may still be applied, and a client without a key sent it again, a
    second deposit. It is answered UNAVAILABLE with the command's id: retry with the key."""
    account_id = new_id()
    # Opened with the usual wait: a worker's first task can take longer than the test's.
    async with run_worker(settings):
        await open_active(EntityGateway(temporal_client, cache, settings), account_id)
    short = settings.model_copy(update={"command_wait_timeout": 1.0})
    envelope = CommandEnvelope(command_id=new_id(), name="deposit", payload={"amount": 5})
    with pytest.raises(TenureError) as answered:
        await _Behind(temporal_client, short).request(account, account_id, envelope)
    assert answered.value.code is ErrorCode.UNAVAILABLE
    assert envelope.command_id in answered.value.message
    assert "retry with the same idempotencyKey" in answered.value.message
    assert "nothing was stored" not in answered.value.message


OPEN = {"owner_name": "Ada", "email": "ada@example.com"}


async def test_a_waited_open_of_a_closed_account_is_refused_and_the_first_open_still_answers(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A waited create goes as update-with-start; on an ended entity the start is refused and
    # the command goes the signal path, which answers from the closed entity's ledger.
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings):
        first = await gateway.send(
            "account", account_id, "open", OPEN, idempotency_key="o1", wait=True
        )
        await gateway.send("account", account_id, "verify", {}, wait=True)
        await gateway.send("account", account_id, "close", {}, wait=True)
        with pytest.raises(TenureError) as refused:
            await gateway.send("account", account_id, "open", OPEN, idempotency_key="o2", wait=True)
        again = await gateway.send(
            "account", account_id, "open", OPEN, idempotency_key="o1", wait=True
        )
    assert refused.value.code is ErrorCode.INVALID_TRANSITION
    assert first.applied and again.applied
    assert again.read is not None and again.read.snapshot.state is not None
    assert again.read.snapshot.state["status"] == "CLOSED"
    gc.collect()
    # The refused start's error was taken, not left for asyncio to log as an ERROR.
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize("updates_refused", [False, True], ids=["by-update", "by-signal"])
async def test_a_waited_command_answers_within_its_wait_when_temporal_does_not_answer(
    settings: Settings, cache: SnapshotCache, updates_refused: bool
) -> None:
    """A Temporal that takes requests and never answers (frozen): the update is given up
    with time kept for the signal that would carry the command durably, and that signal is
    given up at the wait's end too, so the sender has UNAVAILABLE within the wait (it had
    it after the wait and a signal's 5 s more). The same for an entity whose updates were
    refused before, whose waited commands go by signal at once (an update refused at once
    by a frozen Temporal took that path, and its signal had its own 5 s)."""
    settings = settings.model_copy(update={"command_wait_timeout": 3.0})
    account_id = new_id()
    async with EmbeddedTemporal() as server:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        gateway = EntityGateway(client, cache, settings)
        if updates_refused:
            gateway._delivery._refused(gateway.entity("account").workflow_id(account_id), "failed")
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            # Frozen indeed: a server that had exited would have taken no signal, and its
            # port could be another's (CI saw a NOT_FOUND answered here).
            assert _stopped(server.process.pid) == "T"
            started = time.monotonic()
            with pytest.raises(TenureError) as refused:
                await gateway.send(
                    "account", account_id, "deposit", {"amount": 5}, idempotency_key="k", wait=True
                )
            waited = time.monotonic() - started
        finally:
            server.process.send_signal(signal.SIGCONT)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert waited < settings.command_wait_timeout + 1.0, waited


async def test_a_start_temporal_does_not_answer_says_it_may_have_started(
    settings: Settings, cache: SnapshotCache
) -> None:
    """startBulkCommand answered "unavailable; try again" when Temporal had started the
    bulk and not answered in time: taken for not started. The answer says it may have."""
    settings = settings.model_copy(update={"live_read_timeout": 1.0})
    async with EmbeddedTemporal() as server:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        gateway = EntityGateway(client, cache, settings)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            assert _stopped(server.process.pid) == "T"
            with pytest.raises(TenureError) as refused:
                bulk = BulkInput(bulk_id="b", entity_type="account", command="deposit", ids=[])
                await gateway.start_workflow(BULK_WORKFLOW, bulk, "bulk:b", bulk=True)
        finally:
            server.process.send_signal(signal.SIGCONT)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "may have started" in refused.value.message


class _SlowSignal(CommandDelivery):
    """A Temporal slow to take a signal: two seconds."""

    async def deliver(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(2.0)
        return await super().deliver(*args, **kwargs)


async def test_a_waited_command_asks_its_outcome_within_what_is_left_of_its_wait(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """Its signal slow (2 s of a 4 s wait), and no worker to answer: the outcome was then
    asked for a whole wait more, and the sender answered after 6 s. It is asked for what is
    left, and the sender has UNAVAILABLE, the command's id in it, within the wait."""
    account_id = new_id()
    async with run_worker(settings):  # opened with the usual wait
        await open_active(EntityGateway(temporal_client, cache, settings), account_id)
    settings = settings.model_copy(update={"command_wait_timeout": 4.0})
    delivery = _SlowSignal(temporal_client, settings)
    delivery._refused(account.workflow_id(account_id), "failed")  # it goes by signal
    envelope = CommandEnvelope(command_id=new_id(), name="deposit", payload={"amount": 5})
    started = time.monotonic()
    with pytest.raises(TenureError) as answered:
        await delivery.request(account, account_id, envelope)
    waited = time.monotonic() - started
    assert answered.value.code is ErrorCode.UNAVAILABLE
    assert envelope.command_id in answered.value.message
    assert waited < settings.command_wait_timeout + 1.0, waited


async def test_a_signal_refused_as_missing_to_an_entity_that_runs_is_no_closed_entity(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """A signal answered NOT_FOUND (sent as the entity's run was starting: an open racing
    the command) was taken for an entity closed whenever Temporal described it at all: a
    new account refused as closed, for good to a client. It was not sent; retry."""
    account_id = new_id()
    async with run_worker(settings):
        await open_active(EntityGateway(temporal_client, cache, settings), account_id)
    delivery = CommandDelivery(temporal_client, settings)

    async def missing(workflow_id: str, batch: list[CommandEnvelope]) -> None:
        raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")

    delivery._coalescer = SignalCoalescer(missing)
    envelope = CommandEnvelope(command_id=new_id(), name="deposit", payload={"amount": 5})
    with pytest.raises(TenureError) as answered:
        await delivery.deliver(account, account_id, envelope)
    assert answered.value.code is ErrorCode.UNAVAILABLE
    assert "retry" in answered.value.message


def _stopped(pid: int, timeout: float = 2.0) -> str:
    """The process's state letter in /proc once it reads T (stopped), or after `timeout`;
    "gone" when it has no entry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return "gone"
        state = stat.rsplit(")", 1)[1].split()[0]
        if state == "T" or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


class _Converted(Exception):
    pass


async def _converting() -> None:
    """As the SDK's update call does: cancelled, it raises an error of its own."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        raise _Converted("timed out or cancelled") from None


async def test_a_call_whose_caller_is_cancelled_leaves_no_error_for_asyncio_to_log() -> None:
    """A request cancelled (its worker stopping) while it waits on an update: the update's
    own error, raised in place of the cancellation, was left on `within`'s inner task, and
    asyncio logged it as an ERROR with its traceback; the caller still sees the
    cancellation."""
    logged: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    try:
        caller = asyncio.create_task(within(30, _converting()))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(handler)
    assert logged == []
    with pytest.raises(RPCError) as late:  # given up at its deadline: as a deadline's error
        await within(0.05, asyncio.sleep(60))
    assert late.value.status is RPCStatusCode.DEADLINE_EXCEEDED


def test_an_answer_that_does_not_know_the_command_is_no_acknowledgement() -> None:
    """An entity's answer whose outcome for the command is UNKNOWN (it has not applied it)
    tells the sender to retry with the same key; it never passes for the command's
    outcome, which the gateway would report applied."""
    envelope = CommandEnvelope(command_id="k-1", name="deposit", payload={"amount": 1})
    unknown = CommandResult(
        outcome=Outcome(command_id="k-1", status=OutcomeStatus.UNKNOWN, revision=7),
        snapshot=Snapshot(entity_type="account", entity_id="a", revision=7),
    )
    with pytest.raises(TenureError) as refused:
        _of_this_command(envelope, unknown)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "retry with the same idempotencyKey" in refused.value.message
    applied = unknown.model_copy(
        update={"outcome": unknown.outcome.model_copy(update={"status": OutcomeStatus.APPLIED})}
    )
    assert _of_this_command(envelope, applied) is applied


async def test_a_command_whose_key_another_sender_holds_is_asked_again_until_its_own_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waited command that went by signal, under a key another sender's command took
    first: the entity records it under its sender's own id. While that is not applied yet
    the sender was answered with the other command's outcome (IDEMPOTENCY_KEY_REUSED, "send
    it with a new key"), and a resend under a new key applied it twice. The entity's
    answers are given here (the decision alone is tested); the rest is
    tests/api/test_idempotency_keys.py on the real stack."""
    monkeypatch.setattr("workers.delivery.asyncio.sleep", _no_pause)
    sender, other = "customer:ada", "service:billing"
    envelope = CommandEnvelope(
        command_id="k-1", name="deposit", payload={"amount": 1}, sent_by=sender
    )
    own = sender_key(sender, "k-1")

    def answer(command_id: str, status: OutcomeStatus, by: str | None, revision: int) -> Any:
        return CommandResult(
            outcome=Outcome(
                command_id=command_id,
                status=status,
                revision=revision,
                sent_by=by,
                fingerprint=envelope.fingerprint if by == sender else "another",
            ),
            snapshot=Snapshot(entity_type="account", entity_id="a", revision=revision),
        )

    answers = {
        "k-1": [answer("k-1", OutcomeStatus.APPLIED, other, 3)] * 3,
        own: [answer(own, OutcomeStatus.UNKNOWN, None, 4)] * 2
        + [answer(own, OutcomeStatus.APPLIED, sender, 5)],
    }
    asked: list[str] = []

    async def outcome(_handle: object, command_id: str, _deadline: float | None) -> CommandResult:
        asked.append(command_id)
        return answers[command_id].pop(0)

    delivery = CommandDelivery.__new__(CommandDelivery)
    monkeypatch.setattr(delivery, "_outcome", outcome)
    result = await delivery.await_outcome(None, envelope)  # type: ignore[arg-type]
    assert (result.outcome.command_id, result.outcome.revision) == (own, 5)
    assert asked == ["k-1", own] * 3


async def _no_pause(_seconds: float) -> None:
    return None
