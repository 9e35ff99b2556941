"""A FAILED checkout waits for an operator: a retry runs its refused compensations again, a
resolve settles it, and with neither in time it ends FAILED."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from entities import catalog
from entities.checkout import CheckoutState, CheckoutWorkflow
from entities.checkout_input import checkout_workflow_id
from entities.errors import ErrorCode
from entities.runtime.saga import OperatorActionKind, OperatorRequest, SagaStatus, StepStatus
from tests.conftest import WorkerFactory
from tests.entities.failing_checkout import BALANCE, failed_checkout
from tests.entities.shop import Shop, eventually, shop_settings
from workers.cache import SnapshotCache
from workers.settings import Settings

RETRY = OperatorRequest(action=OperatorActionKind.RETRY, reason="limit lifted", by="admin:ops")


@pytest.fixture
def shop(temporal_client: Client, cache: SnapshotCache, settings: Settings) -> Shop:
    return Shop(temporal_client, cache, shop_settings(settings))


def handle_of(shop: Shop, checkout_id: str) -> WorkflowHandle[CheckoutWorkflow, CheckoutState]:
    return shop.client.get_workflow_handle_for(
        CheckoutWorkflow.run, checkout_workflow_id(checkout_id)
    )


async def test_a_refused_refund_leaves_the_checkout_failed_until_a_retry_after_the_fix(
    shop: Shop, run_worker: WorkerFactory
) -> None:
    async with failed_checkout(shop, run_worker) as failed:
        state = failed.state
        assert [(c.name, c.status, c.code) for c in state.compensations] == [
            ("refund", StepStatus.FAILED, ErrorCode.LIMIT_REACHED),
            (f"release:{failed.sku}", StepStatus.DONE, None),
        ]
        assert state.awaiting_operator_until is not None
        handle = handle_of(shop, failed.checkout_id)

        # Retried before the cause is fixed: refused again, and waiting again.
        await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        again = await eventually(
            lambda: shop.progress(failed.checkout_id),
            lambda p: (
                p is not None
                and p.status is SagaStatus.FAILED
                and p.awaiting_operator_until is not None
                and p.compensations[0].at > state.compensations[0].at
            ),
        )
        assert again is not None and again.compensations[0].code == ErrorCode.LIMIT_REACHED

        await failed.fix()
        await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        done = await asyncio.wait_for(handle.result(), 30)

        assert done.status is SagaStatus.COMPENSATED
        assert [(c.name, c.status) for c in done.compensations] == [
            ("refund", StepStatus.DONE),
            (f"release:{failed.sku}", StepStatus.DONE),
        ]
        assert [(a.action, a.by, a.refused) for a in done.operator_actions] == [
            (OperatorActionKind.RETRY, "admin:ops", None),
            (OperatorActionKind.RETRY, "admin:ops", None),
        ]
        assert done.awaiting_operator_until is None
        assert await failed.bank.balance(failed.account_id) == BALANCE
        item = await shop.item(failed.sku)
        assert (item.on_hand, item.available, item.sold) == (5, 5, 0)

        # An ended checkout takes no more actions; its history replays on today's code.
        with pytest.raises(Exception):  # noqa: B017 - the server's error for a closed workflow
            await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        replayer = Replayer(workflows=catalog.workflows(), data_converter=pydantic_data_converter)
        result = await replayer.replay_workflow(await handle.fetch_history())
        assert result.replay_failure is None


async def test_a_resolve_settles_a_failed_checkout_as_it_is(
    shop: Shop, run_worker: WorkerFactory
) -> None:
    async with failed_checkout(shop, run_worker) as failed:
        handle = handle_of(shop, failed.checkout_id)
        resolve = RETRY.model_copy(
            update={"action": OperatorActionKind.RESOLVE, "reason": "refunded by bank transfer"}
        )
        answered = await handle.execute_update(CheckoutWorkflow.operate, resolve)
        assert answered.operator_actions[-1].reason == "refunded by bank transfer"
        done = await asyncio.wait_for(handle.result(), 30)

        assert done.status is SagaStatus.RESOLVED
        assert [(a.action, a.by, a.refused) for a in done.operator_actions] == [
            (OperatorActionKind.RESOLVE, "admin:ops", None)
        ]
        assert done.compensations[0].status is StepStatus.FAILED  # nothing ran again


async def test_an_operator_action_on_a_running_checkout_is_refused_and_recorded(
    shop: Shop, run_worker: WorkerFactory
) -> None:
    _, account_id = await shop.unserved_account(run_worker, BALANCE)
    async with run_worker(shop.settings):
        sku = await shop.stock(5)
        checkout_id = await shop.checkout(await shop.cart(account_id, (sku, 1, 100)))
        await shop.steps_taken(checkout_id, 1)  # waiting at the withdrawal
        handle = handle_of(shop, checkout_id)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(CheckoutWorkflow.operate, RETRY)

        assert isinstance(refused.value.cause, ApplicationError)
        assert refused.value.cause.type == ErrorCode.INVALID_TRANSITION
        state = await shop.progress(checkout_id)
        assert state is not None and state.status is SagaStatus.RUNNING
        [action] = state.operator_actions
        assert (action.action, action.by) == (OperatorActionKind.RETRY, "admin:ops")
        assert action.refused is not None and "not waiting for an operator" in action.refused


async def test_a_failed_checkout_no_operator_answers_ends_failed(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    shop = Shop(
        temporal_client, cache, shop_settings(settings, checkout={"operator_wait_seconds": 1})
    )
    async with failed_checkout(shop, run_worker) as failed:
        done = await asyncio.wait_for(handle_of(shop, failed.checkout_id).result(), 30)
        assert done.status is SagaStatus.FAILED
        assert done.awaiting_operator_until is None
        assert done.compensations[0].status is StepStatus.FAILED
