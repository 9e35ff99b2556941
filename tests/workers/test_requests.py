"""The request activity against real servers: outcomes, refusals as non-retryable errors with
the entity's code, a repeat after the command finished its entity, and the snapshot its
command made published by the request, or by the entity when the request cannot."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.client import Client, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from deploy.embedded import EmbeddedRedis
from entities.errors import ErrorCode
from entities.runtime.envelope import CommandEnvelope, CommandResult, OutcomeStatus
from entities.runtime.requests import EntityRequest, _failure
from entities.runtime.workflow import EntityWorkflow
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import Shop, until_cached, until_idle
from tests.entities.test_publishing import publishes
from tests.workers.test_change_stream import entries_of, revisions, until_streamed
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


def withdrawal_as_a_saga_sends_it() -> CommandEnvelope:
    """A withdrawal of 20 as a saga's request sends it: the sender publishes the answer."""
    return CommandEnvelope(
        command_id="w1",
        name="withdraw",
        payload={"amount": 20},
        reads_large_state=True,
        publishes=True,
    )


async def published_account(client: Client, cache: SnapshotCache, settings: Settings) -> str:
    """An account opened, verified and funded with 50 (revision 3), and in the cache."""
    account_id = await Shop(client, cache, settings).account(50)
    await until_cached(cache, "account", account_id, 3)
    return account_id


async def refusal(requests: EntityRequests, req: EntityRequest) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(requests.request_entity, req)
    return info.value


async def test_outcomes_and_refusals(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    requests = EntityRequests(temporal_client, settings, cache)
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
    requests = EntityRequests(temporal_client, settings, cache)
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


async def test_a_request_publishes_what_its_entity_hands_over(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A saga's request publishes the snapshot and change its command made, as it returns;
    the entity schedules no publish activity of its own for it (each cost the entity an
    activity and a workflow task, a third of a checkout's history)."""
    requests = EntityRequests(temporal_client, settings, cache)
    run = ActivityEnvironment().run
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        workflow_id = f"account:{account_id}"
        await until_idle(temporal_client, workflow_id)
        before = await publishes(temporal_client, workflow_id)

        applied = await run(
            requests.request_entity, request(account_id, "w1", "withdraw", amount=20)
        )

        hit = await cache.get("account", account_id)  # no waiting: it was published
        assert hit is not None and hit.snapshot.revision == applied.revision == 4
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await entries_of(cache, "account", account_id)) == [1, 2, 3, 4]
        await until_idle(temporal_client, workflow_id)
        assert await publishes(temporal_client, workflow_id) == before

        # Repeated, it is published again (idempotent), and still streamed once.
        assert (
            await run(requests.request_entity, request(account_id, "w1", "withdraw", amount=20))
            == applied
        )
        assert revisions(await entries_of(cache, "account", account_id)) == [1, 2, 3, 4]


async def test_a_request_that_cannot_publish_leaves_it_to_its_entity(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
    own_cache: SnapshotCache,
) -> None:
    """With its cache out of reach, a request asks the entity to publish, which it does
    as it publishes its other changes: nothing handed over is left unpublished."""
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        own_redis.stop()
        requests = EntityRequests(temporal_client, settings, own_cache)
        applied = await ActivityEnvironment().run(
            requests.request_entity, request(account_id, "w1", "withdraw", amount=20)
        )
        hit = await until_cached(cache, "account", account_id, applied.revision)
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await entries_of(cache, "account", account_id)) == [1, 2, 3, 4]


@pytest.mark.parametrize("repeated_by", ["signal", "a sender that does not publish"])
async def test_a_handed_over_command_repeated_is_published_by_its_entity(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    run_worker: WorkerFactory,
    repeated_by: str,
) -> None:
    """A sender handed a snapshot that it never published (it died), retrying by signal or
    from older code that does not publish, gets nothing to publish: the entity publishes it
    then."""
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        handle = temporal_client.get_workflow_handle(f"account:{account_id}")
        envelope = withdrawal_as_a_saga_sends_it()
        handed = await handle.execute_update(
            EntityWorkflow.apply, envelope, result_type=CommandResult
        )
        assert handed.publication() is not None  # and never published
        await until_idle(temporal_client, handle.id)
        hit = await cache.get("account", account_id)
        assert hit is not None and hit.snapshot.revision == 3

        if repeated_by == "signal":
            await handle.signal(EntityWorkflow.command, envelope)
        else:
            older = envelope.model_copy(update={"publishes": False})
            again = await handle.execute_update(
                EntityWorkflow.apply, older, result_type=CommandResult
            )
            assert again.publication() is None
        await until_cached(cache, "account", account_id, 4)
        assert revisions(await until_streamed(cache, "account", account_id, 4)) == [1, 2, 3, 4]


async def test_a_reservation_made_by_a_request_expires(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """An entity arms its deadline in the task that changed it, whoever publishes the
    change: a reservation a saga made, with no publish of the entity's own to wake it,
    still expires and gives its units back."""
    requests = EntityRequests(temporal_client, settings, cache)
    async with run_worker():
        sku = await Shop(temporal_client, cache, settings).stock(5)
        reserve = EntityRequest(
            entity_type="inventory",
            entity_id=sku,
            command_id="r1",
            command="reserveStock",
            payload={"reservation_id": "r1", "quantity": 3, "ttl_seconds": 0.5},
        )
        reserved = await ActivityEnvironment().run(requests.request_entity, reserve)
        assert reserved.status is OutcomeStatus.APPLIED
        expired = await until_cached(cache, "inventory", sku, reserved.revision + 1, timeout=10)
        assert expired.snapshot.state is not None
        assert expired.snapshot.state["reservations"] == []
        assert expired.snapshot.state["settled"]["r1"]["settlement"] == "EXPIRED"


async def test_an_answer_handed_to_a_sender_that_gave_up_is_published(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """An update its sender gave up on (its worker was down) is still applied, and its
    answer handed to nobody; the sender's retry came by signal first. The entity publishes
    it all the same."""
    shop = Shop(temporal_client, cache, settings)
    bank, account_id = await shop.unserved_account(run_worker, 50)
    handle = temporal_client.get_workflow_handle(f"account:{account_id}")
    envelope = withdrawal_as_a_saga_sends_it()
    await handle.signal(EntityWorkflow.command, envelope)  # the retry, first
    with pytest.raises((RPCError, WorkflowUpdateRPCTimeoutOrCancelledError)):
        await handle.execute_update(
            EntityWorkflow.apply,
            envelope,
            result_type=CommandResult,
            rpc_timeout=timedelta(seconds=0.5),
        )
    async with run_worker(bank.settings):
        hit = await until_cached(cache, "account", account_id, 4)
    assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
