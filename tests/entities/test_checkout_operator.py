"""A FAILED checkout waits for an operator: a retry runs its refused compensations again, a
resolve settles it, and with neither in time it ends FAILED."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from entities.checkout import CheckoutState, CheckoutWorkflow
from entities.checkout_input import (
    CheckoutInput,
    CheckoutLine,
    CheckoutOptions,
    checkout_workflow_id,
)
from entities.errors import ErrorCode
from entities.inventory import inventory
from entities.runtime.envelope import RuntimeOptions
from entities.runtime.requests import RequestPolicy
from entities.runtime.saga import (
    MAX_OPERATOR_ACTIONS,
    CompensationRecord,
    OperatorActionKind,
    OperatorRequest,
    SagaStatus,
    StepStatus,
)
from tests.conftest import WorkerFactory, new_id
from tests.entities.failing_checkout import BALANCE, failed_checkout
from tests.entities.shop import Shop, eventually, shop_settings
from workers.cache import SnapshotCache
from workers.sandbox import entity_replayer
from workers.settings import Settings
from workers.worker import TenureWorker

RETRY = OperatorRequest(action=OperatorActionKind.RETRY, reason="limit lifted", by="admin:ops")


@pytest.fixture
def shop(temporal_client: Client, cache: SnapshotCache, settings: Settings) -> Shop:
    return Shop(temporal_client, cache, shop_settings(settings))


def refund_of(state: CheckoutState) -> CompensationRecord:
    return next(c for c in state.compensations if c.name == "refund")


def handle_of(shop: Shop, checkout_id: str) -> WorkflowHandle[CheckoutWorkflow, CheckoutState]:
    return shop.client.get_workflow_handle_for(
        CheckoutWorkflow.run, checkout_workflow_id(checkout_id)
    )


async def test_a_refused_refund_leaves_the_checkout_failed_until_a_retry_after_the_fix(
    shop: Shop, run_worker: WorkerFactory
) -> None:
    async with failed_checkout(shop, run_worker) as failed:
        state = failed.state
        # The commit it never reached is undone too (an earlier attempt, lost, may have
        # made it): nothing to undo.
        assert [(c.name, c.status, c.code) for c in state.compensations] == [
            (f"return:{failed.sku}", StepStatus.DONE, None),
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
                and refund_of(p).at > refund_of(state).at
            ),
        )
        assert again is not None and refund_of(again).code == ErrorCode.LIMIT_REACHED

        await failed.fix()
        await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        done = await asyncio.wait_for(handle.result(), 30)

        assert done.status is SagaStatus.COMPENSATED
        assert [(c.name, c.status) for c in done.compensations] == [
            (f"return:{failed.sku}", StepStatus.DONE),
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
        with pytest.raises(RPCError) as ended:
            await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        assert ended.value.status is RPCStatusCode.NOT_FOUND, ended.value
        replayer = entity_replayer(pydantic_data_converter)
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
        assert refund_of(done).status is StepStatus.FAILED  # nothing ran again


async def test_retries_made_before_the_fix_leave_the_last_action_for_a_resolve(
    shop: Shop, run_worker: WorkerFactory
) -> None:
    """An operator retrying a FAILED checkout before its cause is fixed: each retry fails
    again. Twenty of them filled the actions it records (MAX_OPERATOR_ACTIONS), and from then
    on a resolve was refused LIMIT_REACHED as well: nothing could settle it. The last action
    is now kept for a resolve; a retry past the others is refused unrecorded."""
    async with failed_checkout(shop, run_worker) as failed:
        handle = handle_of(shop, failed.checkout_id)
        for n in range(1, MAX_OPERATOR_ACTIONS):
            await handle.execute_update(CheckoutWorkflow.operate, RETRY)
            await eventually(
                lambda: shop.progress(failed.checkout_id),
                lambda state, n=n: (
                    state is not None  # type: ignore[misc]
                    and state.awaiting_operator_until is not None
                    and len(state.operator_actions) == n
                ),
                30,
            )
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        assert isinstance(refused.value.cause, ApplicationError)
        assert refused.value.cause.type == ErrorCode.LIMIT_REACHED
        resolve = RETRY.model_copy(
            update={"action": OperatorActionKind.RESOLVE, "reason": "refunded by hand"}
        )
        await handle.execute_update(CheckoutWorkflow.operate, resolve)
        done = await asyncio.wait_for(handle.result(), 30)
    assert done.status is SagaStatus.RESOLVED
    assert len(done.operator_actions) == MAX_OPERATOR_ACTIONS
    assert done.operator_actions[-1].action is OperatorActionKind.RESOLVE


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
        assert refund_of(done).status is StepStatus.FAILED


def _handlers_and_timers_in_one_batch(worker: TenureWorker) -> None:
    """The SDK's single-batch activations (its flag PROCESS_WORKFLOW_ACTIVATION_JOBS_AS_SINGLE
    _BATCH, which a later release turns on by default): a timer that fired runs its callback
    beside the task's update handlers, before any condition is checked again. Through a
    private setter: should it go, this test fails, and needs the new way to turn it on."""
    from temporalio.worker._workflow_instance import _WorkflowLogicFlag

    for each in worker.workers:
        each._workflow_worker._set_default_workflow_logic_flag(  # type: ignore[union-attr]
            _WorkflowLogicFlag.PROCESS_WORKFLOW_ACTIVATION_JOBS_AS_SINGLE_BATCH, enabled=True
        )


async def test_a_retry_that_comes_with_the_end_of_the_wait_is_run(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """An operator's retry that reaches the checkout in the task in which its wait runs out
    (no worker at the deadline) is answered as accepted: it must run, not be dropped as the
    checkout ends FAILED."""
    settings = settings.model_copy(update={"sticky_timeout": 1.0})
    fast = RequestPolicy(
        timeout_seconds=5, attempts=2, initial_interval_seconds=0.1, maximum_interval_seconds=0.2
    )
    checkout_id = f"{new_id()}-1"
    # Nothing it names exists: the reservation is refused, and so is the report to the cart.
    handle = await temporal_client.start_workflow(
        CheckoutWorkflow.run,
        CheckoutInput(
            checkout_id=checkout_id,
            cart_id=new_id(),
            account_id=new_id(),
            lines=[CheckoutLine(sku=new_id(), quantity=1, unit_price=1)],
            options=CheckoutOptions(
                step=fast,
                compensation=fast.model_copy(update={"attempts": 0}),
                operator_wait_seconds=4.0,
            ),
            started_at=int(datetime.now(UTC).timestamp() * 1000),
        ),
        id=checkout_workflow_id(checkout_id),
        task_queue=settings.task_queue,
    )
    async with run_worker(settings) as worker:
        _handlers_and_timers_in_one_batch(worker)
        failed = await eventually(
            lambda: handle.query(CheckoutWorkflow.status),
            lambda s: s.status is SagaStatus.FAILED and s.awaiting_operator_until is not None,
            30,
        )
    until = failed.awaiting_operator_until
    assert until is not None
    # No worker: the wait's timer fires, and the retry comes, before either is taken up.
    await asyncio.sleep(max((until - datetime.now(UTC)).total_seconds(), 0) + 2.0)
    asked = asyncio.create_task(handle.execute_update(CheckoutWorkflow.operate, RETRY))
    await asyncio.sleep(1.5)
    async with run_worker(settings) as worker:
        _handlers_and_timers_in_one_batch(worker)
        answered = await asyncio.wait_for(asked, 30)
        done = await asyncio.wait_for(handle.result(), 30)
    assert answered.operator_actions[-1].refused is None  # told it was taken
    report = [step for step in done.steps if step.name == "report"][-1]
    assert report.at > until  # and the report ran again after the wait ran out
    assert [a.action for a in done.operator_actions] == [OperatorActionKind.RETRY]


async def test_a_sale_its_item_forgot_before_the_checkout_took_it_back_leaves_it_failed(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A checkout's return of a sale that comes after its item has forgotten the sale (an
    item remembers its last `settled_memory` settlements). Before, the item answered
    "returned" and changed nothing: the checkout ended COMPENSATED, the customer was
    refunded, and the units stayed sold with no sign. The return is now refused, the
    checkout FAILED for an operator, who counts the units back and resolves it."""
    # The kettle's reservations last a second, so its commit is refused (expired), and the
    # teapot's sale, committed, is returned. The teapot lives on a queue of its own and
    # remembers one settlement; the account on another, to hold the saga at its withdrawal.
    shop = Shop(temporal_client, cache, shop_settings(settings, inventory={"max_ttl_seconds": 1}))
    depot = shop.elsewhere()
    depot = Shop(
        temporal_client,
        cache,
        depot.settings.model_copy(
            update={
                "entity_options": {
                    **depot.settings.entity_options,
                    "inventory": {"settled_memory": 1},
                }
            }
        ),
    )
    bank = depot.elsewhere()
    async with run_worker(bank.settings):
        account_id = await bank.account(BALANCE)
    async with run_worker(shop.settings):
        kettle = await shop.stock(5)
        async with run_worker(depot.settings):
            teapot = await depot.stock(5)
            cart_id = await shop.cart(account_id, (teapot, 2, 100), (kettle, 1, 100))
            checkout_id = await shop.checkout(cart_id)
            await shop.steps_taken(checkout_id, 2)  # both reserved; at the withdrawal
        # The teapot's worker is down: its commit waits. The kettle's reservation expires.
        await eventually(lambda: shop.item(kettle), lambda item: not item.reservations, 10)
        async with run_worker(bank.settings):
            # The commit waits at the teapot; behind it, another reservation, settled, takes
            # the checkout's sale out of what the teapot remembers.
            teapot_id = inventory.workflow_id(teapot)
            await eventually(lambda: signalled(shop, teapot_id, "commitReservation"), bool, 30)
            await depot.gateway.send(
                "inventory", teapot, "reserveStock", {"reservation_id": "walk-in", "quantity": 1}
            )
            await depot.gateway.send(
                "inventory", teapot, "releaseReservation", {"reservation_id": "walk-in"}
            )
            async with run_worker(depot.settings):
                failed = await eventually(
                    lambda: shop.progress(checkout_id),
                    lambda p: p is not None and p.awaiting_operator_until is not None,
                    60,
                )
                assert failed is not None and failed.status is SagaStatus.FAILED
                [refused] = failed.refused()
                assert (refused.name, refused.code) == (
                    f"return:{teapot}",
                    ErrorCode.INVALID_TRANSITION,
                )
                assert refused.message is not None and "not remembered" in refused.message
                item = await depot.item(teapot)
                assert (item.on_hand, item.sold) == (3, 2)  # sold, not taken back
                assert await bank.balance(account_id) == BALANCE  # the refund was made

                # A retry before the units are counted back fails again. The saga's release
                # of the same reservation came after the refused return, and the item, not
                # knowing it, remembered it as released: the retried return was answered
                # "nothing to take back", and the checkout ended COMPENSATED, units sold.
                handle = handle_of(shop, checkout_id)
                await handle.execute_update(CheckoutWorkflow.operate, RETRY)
                again = await eventually(
                    lambda: shop.progress(checkout_id),
                    lambda p: (
                        p is not None
                        and p.awaiting_operator_until is not None
                        and p.awaiting_operator_until != failed.awaiting_operator_until
                    ),
                    60,
                )
                assert again is not None and again.status is SagaStatus.FAILED
                assert [(step.name, step.code) for step in again.refused()] == [
                    (f"return:{teapot}", ErrorCode.INVALID_TRANSITION)
                ]
                assert (await depot.item(teapot)).sold == 2

                # The operator counts the units back and settles the checkout.
                await depot.send(
                    "inventory", teapot, "adjustStock", delta=2, reason=f"{checkout_id} returned"
                )
                resolve = RETRY.model_copy(
                    update={"action": OperatorActionKind.RESOLVE, "reason": "units counted back"}
                )
                await handle.execute_update(CheckoutWorkflow.operate, resolve)
                done = await asyncio.wait_for(handle.result(), 30)
                assert done.status is SagaStatus.RESOLVED
                assert (await depot.item(teapot)).available == 5


async def signalled(shop: Shop, workflow_id: str, command: str) -> bool:
    """Whether the workflow's history holds a signal carrying `command`."""
    history = await shop.client.get_workflow_handle(workflow_id).fetch_history()
    return any(
        command.encode() in event.workflow_execution_signaled_event_attributes.SerializeToString()
        for event in history.events
        if event.HasField("workflow_execution_signaled_event_attributes")
    )


async def test_a_refund_retried_after_the_account_forgot_the_withdrawal_is_not_taken_as_done(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """The withdrawal's outcome was unknown to the saga, so its refund undoes it by id. An
    operator's retry came once the account's ledger (16 commands here) had forgotten it: the
    refund was answered "nothing to undo", the checkout ended COMPENSATED, and the customer
    was never paid back. The refund is refused now, the checkout FAILED again, telling why."""
    small = shop_settings(settings).model_copy(update={"runtime": RuntimeOptions(ledger_size=16)})
    shop = Shop(temporal_client, cache, small)
    async with failed_checkout(shop, run_worker) as failed:
        await failed.fix()  # ten withdrawals, past what the ledger holds since the first
        handle = handle_of(shop, failed.checkout_id)
        await handle.execute_update(CheckoutWorkflow.operate, RETRY)
        again = await eventually(
            lambda: shop.progress(failed.checkout_id),
            lambda p: p is not None and len(p.operator_actions) == 1 and p.refused() != [],
            30,
        )
        assert again is not None and again.status is SagaStatus.FAILED
        [refund] = again.refused()
        assert (refund.name, refund.code) == ("refund", ErrorCode.CONFLICT)
        assert refund.message is not None and "cannot tell whether" in refund.message
        assert await failed.bank.balance(failed.account_id) == BALANCE - 600  # not paid back
