"""Commands sent straight through Temporal whose envelopes cannot be read: refused under their
ids, where the SDK dropped them with no outcome, and a batch applied around them."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter

from api.gateway import EntityGateway
from entities.errors import ErrorCode
from entities.runtime.envelope import CommandEnvelope, CommandResult, OutcomeStatus
from entities.runtime.inbox import Unreadable, read_command, read_commands
from entities.runtime.workflow import EntityWorkflow
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import until_idle
from tests.entities.test_backlog import run_histories
from tests.entities.test_runtime import live, open_active
from workers.cache import SnapshotCache
from workers.sandbox import entity_replayer
from workers.settings import Settings

CONVERTER = pydantic_data_converter.payload_converter


def payload(value: Any) -> Any:
    return CONVERTER.to_payload(value)


def deposit(command_id: str, amount: int, **more: Any) -> dict[str, Any]:
    return {"command_id": command_id, "name": "deposit", "payload": {"amount": amount}, **more}


def test_an_envelope_that_reads_is_a_command() -> None:
    received = read_command(CONVERTER, payload(deposit("d-1", 5)))
    assert isinstance(received, CommandEnvelope) and received.payload == {"amount": 5}


@pytest.mark.parametrize(
    ("sent", "command_id", "why"),
    [
        ({**deposit("p-1", 1), "payload": [100]}, "p-1", "payload"),
        (deposit("s-1", 1, sent_by="x" * 161), "s-1", "sent_by"),
        ({"command_id": "n-1", "payload": {"amount": 1}}, "n-1", "name"),
        (deposit("", 1), None, "command_id"),
        (deposit("x" * 513, 1), None, "command_id"),
        (deposit("tab\there", 1), None, "command_id"),
        ({**deposit("ok", 1), "command_id": 12345}, None, "command_id"),
        ("not an envelope", None, "envelope"),
    ],
)
def test_an_envelope_that_does_not_read_says_its_id_only_if_sound(
    sent: Any, command_id: str | None, why: str
) -> None:
    received = read_command(CONVERTER, payload(sent))
    assert isinstance(received, Unreadable)
    assert received.command_id == command_id
    assert why in received.reason and len(received.reason) <= 300


def test_a_batch_is_read_envelope_by_envelope() -> None:
    read = read_commands(
        CONVERTER, payload([deposit("a", 1), {"command_id": "b"}, deposit("c", 2)])
    )
    assert read is not None
    assert [type(item).__name__ for item in read] == [
        "CommandEnvelope",
        "Unreadable",
        "CommandEnvelope",
    ]
    assert read_commands(CONVERTER, payload("not a list")) is None


async def test_an_unreadable_command_is_refused_under_its_id_and_a_batch_goes_on_around_it(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    workflow_id = f"account:{account_id}"
    handle = temporal_client.get_workflow_handle(workflow_id)

    async def outcome(command_id: str) -> CommandResult:
        return await handle.query(EntityWorkflow.outcome, command_id, result_type=CommandResult)

    async with run_worker(settings):
        await open_active(gateway, account_id)
        for name, sent in [
            ("command", {**deposit("bad-payload", 1), "payload": [100]}),
            ("command", deposit("bad-sender", 1, sent_by="x" * 161)),
            ("command", {"name": "deposit", "payload": {"amount": 1}}),  # no id: nowhere
            ("command", deposit("spaced id", 2)),  # printable ASCII: applied
            (
                "commands",
                [deposit("b1", 4), {**deposit("b2", 1), "payload": "x"}, deposit("b3", 8)],
            ),
            ("command", {**deposit("bad-payload", 1), "payload": [100]}),  # the same again
        ]:
            await until_idle(temporal_client, workflow_id)
            await handle.signal(name, sent)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(EntityWorkflow.apply, CommandEnvelope(**deposit("", 16)))
        assert "command_id" in str(refused.value.cause)
        # As the signal refuses it, an update's fingerprint too long to record: the ledger
        # would forget every other command to hold it.
        heavy = CommandEnvelope(**deposit("heavy", 32), fingerprint="f" * 600_000)
        with pytest.raises(WorkflowUpdateFailedError) as outsized:
            await handle.execute_update(EntityWorkflow.apply, heavy)
        assert "fingerprint: at most 64 characters" in str(outsized.value.cause)
        await until_idle(temporal_client, workflow_id)
        heavy_outcome = await outcome("heavy")
        snapshot = await live(gateway, account_id)
        outcomes = {key: await outcome(key) for key in ("bad-payload", "bad-sender", "b2")}
        histories = await run_histories(temporal_client, workflow_id)

    assert snapshot.state is not None and snapshot.state["balance"] == 2 + 4 + 8
    assert heavy_outcome.outcome.status is OutcomeStatus.UNKNOWN  # nothing recorded
    for key, result in outcomes.items():
        assert result.outcome.status is OutcomeStatus.REJECTED, key
        assert result.outcome.code == ErrorCode.INVALID_INPUT, key
        assert result.outcome.message is not None and "unreadable command" in result.outcome.message
    assert "payload" in (outcomes["bad-payload"].outcome.message or "")
    assert outcomes["bad-sender"].outcome.command == "deposit"
    replayer = entity_replayer(pydantic_data_converter)
    for history in histories:
        await replayer.replay_workflow(history)
