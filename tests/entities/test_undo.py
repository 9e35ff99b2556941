"""Compensating commands on a real server: a command that `undoes` another is applied only
if that one was, and cancels one that never arrived."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from entities.account import account
from entities.errors import ErrorCode
from entities.runtime import EntityWorkflow
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandResult,
    OutcomeStatus,
    RuntimeOptions,
)
from entities.runtime.requests import EntityRequest, RequestFailed
from tests.conftest import WorkerFactory
from tests.entities.shop import Shop
from workers.cache import SnapshotCache
from workers.delivery import CommandDelivery
from workers.requests import EntityRequests
from workers.settings import Settings


async def test_a_compensation_applies_only_when_what_it_undoes_was_applied(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    shop = Shop(temporal_client, cache, settings)
    delivery = CommandDelivery(temporal_client, settings)

    async def command(
        command_id: str, name: str, amount: int, undoes: str | None = None
    ) -> CommandResult:
        envelope = CommandEnvelope(
            command_id=command_id, name=name, payload={"amount": amount}, undoes=undoes
        )
        return await delivery.request(account, account_id, envelope)

    async with run_worker():
        account_id = await shop.account(100)

        await command("w-1", "withdraw", 30)
        undone = await command("r-1", "refund", 30, undoes="w-1")
        assert undone.outcome.status is OutcomeStatus.APPLIED
        assert await shop.balance(account_id) == 100

        refused = await command("w-2", "withdraw", 1000)
        assert refused.outcome.code == ErrorCode.INSUFFICIENT_FUNDS
        nothing = await command("r-2", "refund", 1000, undoes="w-2")
        assert nothing.outcome.status is OutcomeStatus.APPLIED
        assert nothing.outcome.message == "nothing to undo: w-2 was not applied"
        assert nothing.outcome.revision == undone.outcome.revision
        assert await shop.balance(account_id) == 100

        # the withdrawal never arrived: it is cancelled, so arriving late changes nothing
        await command("r-3", "refund", 40, undoes="w-3")
        late = await command("w-3", "withdraw", 40)
        assert (late.outcome.status, late.outcome.code) == (
            OutcomeStatus.REJECTED,
            ErrorCode.CONFLICT,
        )
        assert await shop.balance(account_id) == 100


async def test_a_compensation_whose_undone_command_may_be_forgotten_is_refused(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """The undone withdrawal left the ledger (4 commands here): it was answered "nothing to
    undo", and the refund was never made. It is refused now, each time it comes, and what
    was sent after the newest command the ledger forgot is still told apart."""
    small = settings.model_copy(update={"runtime": RuntimeOptions(ledger_size=4)})
    shop = Shop(temporal_client, cache, small)
    delivery = CommandDelivery(temporal_client, small)

    async def command(
        command_id: str, name: str, amount: int, undoes: str | None = None, since: Any = None
    ) -> CommandResult:
        envelope = CommandEnvelope(
            command_id=command_id,
            name=name,
            payload={"amount": amount},
            undoes=undoes,
            undoes_since=since,
        )
        return await delivery.request(account, account_id, envelope)

    async with run_worker(small):
        account_id = await shop.account(100)  # open, verify, deposit
        await command("w-1", "withdraw", 30)
        for n in range(4):
            await command(f"d-{n}", "deposit", 1)
        for attempt in ("r-1", "r-1-retry-1"):
            refused = await command(attempt, "refund", 30, undoes="w-1")
            assert (refused.outcome.status, refused.outcome.code) == (
                OutcomeStatus.REJECTED,
                ErrorCode.CONFLICT,
            )
            assert refused.outcome.message is not None
            assert "cannot tell whether w-1 was applied" in refused.outcome.message
        assert await shop.balance(account_id) == 74
        # Cancelled all the same: sent again, it never applies twice.
        again = await command("w-1", "withdraw", 30)
        assert (again.outcome.status, again.outcome.code) == (
            OutcomeStatus.REJECTED,
            ErrorCode.OUTCOME_UNKNOWN,
        )
        # One never sent, undone with no time given: refused, and cancelled should it come
        # late (an attempt still running after its timeout), once its compensation gave up.
        unsure = await command("r-9", "refund", 30, undoes="w-9")
        assert unsure.outcome.code == ErrorCode.CONFLICT
        late = await command("w-9", "withdraw", 30)
        assert late.outcome.code == ErrorCode.OUTCOME_UNKNOWN
        assert await shop.balance(account_id) == 74

        # Sent after what it forgot: its absence shows it never came, as before.
        since = datetime.now(UTC)
        nothing = await command("r-2", "refund", 40, undoes="w-2", since=since)
        assert nothing.outcome.status is OutcomeStatus.APPLIED
        assert nothing.outcome.message == "nothing to undo: w-2 was not applied"
        late = await command("w-2", "withdraw", 40)
        assert late.outcome.code == ErrorCode.CONFLICT
        assert await shop.balance(account_id) == 74


async def test_a_command_first_sent_before_what_the_ledger_forgot_is_not_applied_again(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A saga's step retried under its id after the entity's ledger (4 commands here) forgot
    it was applied a second time: the customer charged twice. Sent with when it was first
    sent, it is refused OUTCOME_UNKNOWN, which its saga takes as an outcome it cannot know,
    and its compensation is refused as well, for an operator."""
    small = settings.model_copy(update={"runtime": RuntimeOptions(ledger_size=4)})
    shop = Shop(temporal_client, cache, small)
    delivery = CommandDelivery(temporal_client, small)

    async def command(command_id: str, name: str, amount: int, **fields: Any) -> CommandResult:
        envelope = CommandEnvelope(
            command_id=command_id, name=name, payload={"amount": amount}, **fields
        )
        return await delivery.request(account, account_id, envelope)

    async with run_worker(small):
        account_id = await shop.account(100)
        first = datetime.now(UTC)
        applied = await command("w-1", "withdraw", 30, first_sent=first)
        assert applied.outcome.status is OutcomeStatus.APPLIED
        for n in range(4):
            await command(f"d-{n}", "deposit", 1)
        for _ in range(2):  # retried, and retried again
            again = await command("w-1", "withdraw", 30, first_sent=first)
            assert (again.outcome.status, again.outcome.code) == (
                OutcomeStatus.REJECTED,
                ErrorCode.OUTCOME_UNKNOWN,
            )
        assert await shop.balance(account_id) == 74  # charged once
        undo = await command("r-1", "refund", 30, undoes="w-1", undoes_since=first)
        assert undo.outcome.code == ErrorCode.CONFLICT
        assert await shop.balance(account_id) == 74

        # First sent after what the ledger forgot: applied, as any new command.
        fresh = await command("w-2", "withdraw", 4, first_sent=datetime.now(UTC))
        assert fresh.outcome.status is OutcomeStatus.APPLIED
        assert await shop.balance(account_id) == 70
    assert not RequestFailed(ErrorCode.OUTCOME_UNKNOWN, "x").refused  # the saga may undo it


async def test_a_time_without_its_offset_is_refused_as_unreadable_and_the_entity_goes_on(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A signal sender's `first_sent` with no offset failed every workflow task of the
    entity, once its ledger had forgotten anything (naive against aware): it served nothing
    more. It is refused INVALID_INPUT under its id, and the entity goes on."""
    small = settings.model_copy(update={"runtime": RuntimeOptions(ledger_size=4)})
    shop = Shop(temporal_client, cache, small)
    delivery = CommandDelivery(temporal_client, small)

    async def deposit(command_id: str) -> CommandResult:
        envelope = CommandEnvelope(command_id=command_id, name="deposit", payload={"amount": 1})
        return await delivery.request(account, account_id, envelope)

    async with run_worker(small):
        account_id = await shop.account(100)
        for n in range(5):
            await deposit(f"d-{n}")
        handle = temporal_client.get_workflow_handle(account.workflow_id(account_id))
        for field in ("first_sent", "undoes_since"):
            naive = {
                "command_id": f"w-{field}",
                "name": "withdraw",
                "payload": {"amount": 1},
                field: "2026-01-01T00:00:00",
                **({"undoes": "w-0"} if field == "undoes_since" else {}),
            }
            await handle.signal("command", naive)
        after = await asyncio.wait_for(deposit("d-after"), 30)
        assert after.outcome.status is OutcomeStatus.APPLIED
        for field in ("first_sent", "undoes_since"):
            answer = await handle.query(
                EntityWorkflow.outcome, f"w-{field}", result_type=CommandResult
            )
            assert answer.outcome.code == ErrorCode.INVALID_INPUT, answer.outcome
        assert await shop.balance(account_id) == 106


async def test_a_saga_request_s_first_delivery_is_not_taken_for_a_repeat(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """Every saga request carried when it was first sent, so a first delivery behind a
    backlog (here, past what a ledger of 4 holds) was refused OUTCOME_UNKNOWN as if it were
    a repeat, and its checkout FAILED where nothing went wrong (8 checkouts of one item). A
    request tells it only when it sends its id again: after a local try, or by an operator's
    retry (`resent`), or at a later attempt."""
    small = settings.model_copy(update={"runtime": RuntimeOptions(ledger_size=4)})
    shop = Shop(temporal_client, cache, small)
    requests = EntityRequests(temporal_client, small, cache)
    async with run_worker(small):
        account_id = await shop.account(100)
        first_sent = datetime.now(UTC)
        for _ in range(5):  # what the ledger held at that time is forgotten
            await shop.send("account", account_id, "deposit", amount=1)
        request = EntityRequest(
            entity_type="account",
            entity_id=account_id,
            command_id="checkout:c-1:withdraw",
            command="withdraw",
            payload={"amount": 30},
            first_sent=first_sent,
        )
        applied = await ActivityEnvironment().run(requests.request_entity, request)
        assert applied.status is OutcomeStatus.APPLIED
        repeat = request.model_copy(update={"command_id": "checkout:c-2:withdraw", "resent": True})
        with pytest.raises(ApplicationError) as refused:
            await ActivityEnvironment().run(requests.request_entity, repeat)
        assert refused.value.type == ErrorCode.OUTCOME_UNKNOWN
        assert await shop.balance(account_id) == 75
