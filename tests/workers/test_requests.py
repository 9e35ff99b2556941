"""The request activity against real servers: outcomes, refusals as non-retryable errors with
the entity's code, and a repeat after the command finished its entity."""

from __future__ import annotations

import pytest
from temporalio.client import Client
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import ActivityEnvironment

from entities.errors import ErrorCode
from entities.runtime.envelope import OutcomeStatus
from entities.runtime.requests import EntityRequest, _failure
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import Shop
from workers.cache import SnapshotCache
from workers.requests import EntityRequests
from workers.settings import Settings


def request(entity_id: str, command_id: str, command: str, **payload: object) -> EntityRequest:
    return EntityRequest(
        entity_type="account",
        entity_id=entity_id,
        command_id=command_id,
        command=command,
        payload=payload,
    )


async def refusal(requests: EntityRequests, req: EntityRequest) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(requests.request_entity, req)
    return info.value


async def test_outcomes_and_refusals(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    requests = EntityRequests(temporal_client, settings)
    run = ActivityEnvironment().run
    async with run_worker():
        account_id = await Shop(temporal_client, cache, settings).account(50)

        applied = await run(
            requests.request_entity, request(account_id, "w1", "withdraw", amount=20)
        )
        again = await run(requests.request_entity, request(account_id, "w1", "withdraw", amount=20))
        assert applied == again
        assert applied.status is OutcomeStatus.APPLIED

        refused = await refusal(requests, request(account_id, "w2", "withdraw", amount=999))
        assert (refused.type, refused.non_retryable) == (ErrorCode.INSUFFICIENT_FUNDS, True)
        missing = await refusal(requests, request(new_id(), "w3", "withdraw", amount=1))
        assert (missing.type, missing.non_retryable) == (ErrorCode.NOT_FOUND, True)
        unknown = await refusal(requests, request(account_id, "x", "teleport"))
        assert (unknown.type, unknown.non_retryable) == (ErrorCode.INVALID_INPUT, True)

        # the command that closes the account may be retried: its outcome stands
        await run(requests.request_entity, request(account_id, "w4", "withdraw", amount=30))
        closed = await run(requests.request_entity, request(account_id, "c1", "close"))
        assert closed == await run(requests.request_entity, request(account_id, "c1", "close"))
        after = await refusal(requests, request(account_id, "d1", "deposit", amount=1))
        assert (after.type, after.non_retryable) == (ErrorCode.INVALID_TRANSITION, True)


async def test_an_entity_that_does_not_answer_is_a_retryable_failure(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    requests = EntityRequests(temporal_client, settings)
    async with run_worker():
        account_id = await Shop(temporal_client, cache, settings).account(50)
    silent = await refusal(requests, request(account_id, "w1", "withdraw", amount=1))
    assert (silent.type, silent.non_retryable) == (ErrorCode.UNAVAILABLE, False)


def test_an_internal_failure_reaches_a_saga_as_unavailable_with_nothing_internal() -> None:
    """A saga keeps a failed step's message as its reason, which clients read: an internal
    failure's text (a workflow id, a host) stays in the worker's log."""
    internal = RuntimeError("account:ada on temporal-frontend.internal:7233 failed")
    failure = _failure(activity_failed_by(internal))
    assert failure.code == ErrorCode.UNAVAILABLE
    assert failure.message == "the entity could not be reached"
    refused = ApplicationError("only 2 left", type="INSUFFICIENT_STOCK")
    assert _failure(activity_failed_by(refused)).message == "only 2 left"


def activity_failed_by(cause: BaseException) -> ActivityError:
    failed = ActivityError(
        "activity failed",
        scheduled_event_id=5,
        started_event_id=6,
        identity="worker@host-17",
        activity_type="request_entity",
        activity_id="1",
        retry_state=None,
    )
    failed.__cause__ = cause
    return failed
