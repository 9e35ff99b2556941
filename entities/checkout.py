"""Checkout: the saga that turns a cart into an order across inventory items and an account.

Steps, each registering its compensation before it runs: reserve every line on its
InventoryItem, withdraw the total from the Account, commit every reservation, and report the
outcome to the Cart. A failure undoes the steps already taken, last first on each entity and
the entities at once, so that one that does not answer holds back only its own. Every request
carries a command id derived from the checkout id and the step, so a retried activity or a
replayed saga never reserves or charges twice.

A checkout left FAILED (a compensation or the report refused) waits for an operator, up to
`operator_wait_seconds`: a retry runs what failed again, a resolve ends it RESOLVED (settled
by hand), and nothing ends it FAILED. Its status is kept in Temporal's visibility (the
`TenureCheckoutStatus` search attribute), so operators can list the failed ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from pydantic import Field
from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from entities.account import refund, withdraw
    from entities.cart import complete_checkout, fail_checkout
    from entities.checkout_input import (
        CHECKOUT_WORKFLOW,
        CheckoutInput,
        CheckoutLine,
        checkout_workflow_id,
    )
    from entities.errors import ErrorCode
    from entities.inventory import (
        MAX_RESERVATION_ID,
        commit_reservation,
        release_reservation,
        reserve_stock,
        return_reservation,
    )
    from entities.runtime.effects import saga_sender
    from entities.runtime.entity import Command
    from entities.runtime.envelope import Outcome
    from entities.runtime.patches import PatchSet
    from entities.runtime.requests import (
        LOCAL_TRY,
        EntityRequest,
        RequestFailed,
        RequestPolicy,
        request_entity,
    )
    from entities.runtime.saga import (
        MAX_OPERATOR_ACTIONS,
        MAX_RECORDED_REFUSALS,
        Compensation,
        OperatorAction,
        OperatorActionKind,
        OperatorRequest,
        Saga,
        SagaLog,
        SagaStatus,
        Step,
    )

SAGA_OUTCOMES_METRIC = "tenure_saga_outcomes"
SAGA_OUTCOMES_DESCRIPTION = (
    "Sagas by outcome: each end, and each time one became FAILED (operator needed)."
)
STATUS_ATTRIBUTE = SearchAttributeKey.for_keyword("TenureCheckoutStatus")
"""The checkout's SagaStatus in Temporal's visibility; registered on every Temporal server
Tenure uses (deploy/embedded.py, docs/operations.md)."""
# Checkouts that ran their conclusion under older code neither wait for an operator nor set
# their status in visibility.
OPERATOR_TOOLS = "checkout-operator-tools"
# Checkouts that reached their commits under older code commit one line after another.
PARALLEL_COMMITS = "checkout-parallel-commits"
# Checkouts whose key is longer than a reservation id, begun under older code, reserve under
# the whole key.
SHORT_RESERVATION_IDS = "checkout-short-reservation-ids"

# Checkouts that took an operator's action before actions had keys recorded one sent again
# a second time; asked only where one comes again.
OPERATOR_KEYS = "checkout-operator-keys"
SENT_AGAIN = "OPERATOR_ACTION_SENT_AGAIN"
"""How `operate` refuses an operator's action sent again under its key, before it is
recorded: not a code of Tenure's, its sender answers it as the action was taken."""

# Checkouts begun under older code reserve one line after another.
PARALLEL_RESERVATIONS = "checkout-parallel-reservations"

# Checkouts begun under older code undid only the steps they had reached.
UNDO_UNREACHED = "checkout-undo-unreached-steps"

# Checkouts begun under older code ran every compensation one after another: an item that did
# not answer held back the refund.
COMPENSATIONS_APART = "checkout-compensations-apart"

CHECKOUT_PATCHES = PatchSet(
    "checkout-patch-set-4",
    [COMPENSATIONS_APART],
    after=PatchSet(
        "checkout-patch-set-3",
        [UNDO_UNREACHED],
        after=PatchSet(
            "checkout-patch-set-2",
            [PARALLEL_RESERVATIONS],
            after=PatchSet(
                "checkout-patch-set-1",
                [OPERATOR_TOOLS, PARALLEL_COMMITS, SHORT_RESERVATION_IDS, LOCAL_TRY],
            ),
        ),
    ),
)
"""Checkouts from here on record one patch marker, where they recorded one for each of these
(`PatchSet`)."""

MAX_REFUSED_LISTED = 5
"""Refused steps a list's row shows (kept in the memo); the checkout itself has them all."""


class CheckoutState(SagaLog):
    """A checkout as its `status` query answers: the saga log with what it is about."""

    checkout_id: str
    cart_id: str
    account_id: str
    lines: list[CheckoutLine]
    total: int
    order_id: str | None = None
    reservation_id: str | None = Field(
        default=None, description="The id its stock is reserved under, on every line's item."
    )


@workflow.defn(name=CHECKOUT_WORKFLOW)
class CheckoutWorkflow:
    """One checkout attempt of one cart."""

    @workflow.init
    def __init__(self, input: CheckoutInput) -> None:
        self._input = input
        self._options = input.options
        self._state = CheckoutState(
            checkout_id=input.checkout_id,
            cart_id=input.cart_id,
            account_id=input.account_id,
            lines=input.lines,
            total=sum(line.quantity * line.unit_price for line in input.lines),
            reservation_id=input.key,
        )
        self._asked: OperatorRequest | None = None
        self._first_sent: dict[str, datetime] = {}
        """When each request id was first sent: an entity that may have forgotten it since
        refuses it rather than apply it twice (`CommandEnvelope.first_sent`)."""

    @workflow.query(name="status")
    def status(self) -> CheckoutState:
        """Where the checkout is: steps taken, compensations run, and why."""
        return self._state

    @workflow.update(name="operate")
    def operate(self, request: OperatorRequest) -> CheckoutState:
        """An operator's retry or resolve, recorded with who asked and why, refusals too;
        `run` takes it up. Answers the checkout as it is then (still FAILED)."""
        actions = self._state.operator_actions
        earlier = request.recorded_in(actions)
        # Asked only where an action came again under its key: runs that took one before
        # recorded it a second time, and replay so.
        if earlier is not None and workflow.patched(OPERATOR_KEYS):
            return self._answer_again(request, earlier)
        if len(actions) >= MAX_OPERATOR_ACTIONS:
            # An update's error fails the update only, never the workflow.
            raise ApplicationError(
                f"checkout {self._input.checkout_id} has recorded {len(actions)} operator "
                "actions, the most it records",
                type=ErrorCode.LIMIT_REACHED,
                non_retryable=True,
            )
        refused = self._refusal()
        actions.append(OperatorAction(**request.model_dump(), at=workflow.now(), refused=refused))
        if refused is not None:
            raise ApplicationError(refused, type=ErrorCode.INVALID_TRANSITION, non_retryable=True)
        self._asked = request
        return self._state

    def _answer_again(self, request: OperatorRequest, earlier: OperatorAction) -> CheckoutState:
        """`request` sent again under its key: answered as `earlier` was, nothing recorded;
        another action or reason under that key is refused. The validator refuses repeats
        before they come here; two sent at once may both pass it."""
        refused = request.refused_again(earlier, f"checkout {self._input.checkout_id}")
        if refused is not None:
            code, message = refused
            raise ApplicationError(message, type=code, non_retryable=True)
        return self._state

    @operate.validator
    def _refused_unrecorded(self, request: OperatorRequest) -> None:
        """Refuse, before it is recorded, an action the checkout could not take once
        MAX_RECORDED_REFUSALS such refusals are recorded: early clicks, double clicks and
        two operators at once never use up the actions an operator has left (20 recorded
        refusals locked a FAILED checkout for good). And keep the last of the
        MAX_OPERATOR_ACTIONS for a resolve. And refuse an action sent again under its key
        (SENT_AGAIN), unrecorded. Validators are not run in a replay, so runs replay as they
        were made."""
        earlier = request.recorded_in(self._state.operator_actions)
        if earlier is not None:
            self._answer_again(request, earlier)  # refused: the key used again
            # Sent again: refused here, so that no repeat, however often, enters the
            # history (Temporal takes 2,000 updates a run); its sender answers it as the
            # recorded action was (api/checkout_operations.py).
            raise ApplicationError(
                f"{request.action.value} {request.key!r} was taken already",
                type=SENT_AGAIN,
                non_retryable=True,
            )
        refused = self._refusal()
        recorded = sum(action.refused is not None for action in self._state.operator_actions)
        if refused is not None and recorded >= MAX_RECORDED_REFUSALS:
            raise ApplicationError(
                f"{refused} (not recorded: {recorded} refusals are)",
                type=ErrorCode.INVALID_TRANSITION,
                non_retryable=True,
            )
        actions = len(self._state.operator_actions)
        settles = request.action is OperatorActionKind.RESOLVE and refused is None
        if actions >= MAX_OPERATOR_ACTIONS - 1 and not settles:
            # The last action it records is kept for a resolve: twenty retries made before
            # the cause was fixed left a FAILED checkout that nothing could settle.
            raise ApplicationError(
                f"checkout {self._input.checkout_id} has recorded {actions} operator actions: "
                "the last it records is kept for resolving it",
                type=ErrorCode.LIMIT_REACHED,
                non_retryable=True,
            )

    def _refusal(self) -> str | None:
        """Why an operator's action cannot be taken now, or None."""
        if self._state.awaiting_operator_until is None or self._asked is not None:
            return (
                f"checkout {self._input.checkout_id} is {self._state.status.value}, "
                "not waiting for an operator"
            )
        return None

    @workflow.run
    async def run(self, input: CheckoutInput) -> CheckoutState:
        saga = Saga(self._state)
        try:
            await self._take_steps(saga)
        except RequestFailed as failure:
            if not failure.refused and CHECKOUT_PATCHES.patched(UNDO_UNREACHED):
                self._undo_unreached(saga)
            # Each entity's compensations in order, the entities' at once: the refund does
            # not wait for an item that does not answer.
            await saga.compensate(apart=CHECKOUT_PATCHES.patched(COMPENSATIONS_APART))
            report = partial(
                self._report,
                fail_checkout,
                code=self._state.failure_code,
                reason=self._state.failure_reason,
            )
        else:
            self._state.order_id = f"order-{input.key}"
            report = partial(self._report, complete_checkout, order_id=self._state.order_id)
        await saga.conclude("report", report)
        if not CHECKOUT_PATCHES.patched(OPERATOR_TOOLS):
            self._count_outcome()
            return self._state
        await self._await_operator(saga)
        if self._state.status is not SagaStatus.FAILED:  # counted when it became FAILED
            self._count_outcome()
        return self._state

    def _count_outcome(self) -> None:
        """Count the checkout's status: the one it ends with, and FAILED each time it
        becomes FAILED, when an operator must act, not when the wait for one ends (days
        later, or never counted as FAILED once resolved). Not counted in a replay."""
        workflow.metric_meter().create_counter(SAGA_OUTCOMES_METRIC, SAGA_OUTCOMES_DESCRIPTION).add(
            1, {"status": self._state.status.value}
        )

    async def _await_operator(self, saga: Saga) -> None:
        """While FAILED, wait for an operator, up to `operator_wait_seconds` from each
        failure: a retry runs what failed again, a resolve settles it (RESOLVED); nothing
        in time leaves it FAILED for good. Visibility shows each status on the way."""
        while self._state.status is SagaStatus.FAILED:
            self._count_outcome()
            wait = timedelta(seconds=self._options.operator_wait_seconds)
            self._state.awaiting_operator_until = workflow.now() + wait
            self._show_status()
            try:
                await workflow.wait_condition(lambda: self._asked is not None, timeout=wait)
            except TimeoutError:
                # An action that came in the task in which the wait ran out was accepted,
                # and its operator told so: it is taken up all the same.
                if self._asked is None:
                    break
            asked, self._asked = self._asked, None
            self._state.awaiting_operator_until = None
            if asked is not None and asked.action is OperatorActionKind.RESOLVE:
                self._state.status = SagaStatus.RESOLVED
            else:
                self._state.status = SagaStatus.RUNNING
                self._show_status()
                await saga.retry()
        self._state.awaiting_operator_until = None
        self._show_status()

    def _show_status(self) -> None:
        """The status in visibility, to list checkouts by; the rest of a list's row in the
        memo."""
        workflow.upsert_search_attributes([STATUS_ATTRIBUTE.value_set(self._state.status.value)])
        until = self._state.awaiting_operator_until
        workflow.upsert_memo(
            {
                "account_id": self._state.account_id,
                "total": self._state.total,
                "failure_code": self._state.failure_code,
                "failure_reason": self._state.failure_reason,
                "awaiting_operator_until": until.isoformat() if until else None,
                "refused": [
                    step.model_dump(mode="json")
                    for step in self._state.refused()[:MAX_REFUSED_LISTED]
                ],
            }
        )

    async def _take_steps(self, saga: Saga) -> None:
        self._state.reservation_id = self._reservation_id()
        reservation = {"reservation_id": self._state.reservation_id}
        # Every line is reserved at once: each reservation is on its own item and needs no
        # other. Should one be refused, the others are released all the same, last line
        # first, once every reservation has answered.
        reserves = [self._reserve(line, reservation) for line in self._input.lines]
        if CHECKOUT_PATCHES.patched(PARALLEL_RESERVATIONS):
            await saga.steps(reserves)
        else:
            for reserve in reserves:
                await saga.step(reserve)
        if self._state.total > 0:
            pay = self._withdraw()
            await saga.step(pay)
        # Once paid for, the lines are committed at once: each commit is to its own item and
        # needs no other. Their returns, should one fail, still run last line first.
        commits = [self._commit(line.sku, reservation) for line in self._input.lines]
        if CHECKOUT_PATCHES.patched(PARALLEL_COMMITS):
            await saga.steps(commits)
        else:
            for commit in commits:
                await saga.step(commit)

    def _undo_unreached(self, saga: Saga) -> None:
        """Undo, as well, the steps after the one whose outcome is not known: an earlier
        attempt at this run, whose workflow task was lost with its worker, may have taken
        them in local tries its history never recorded. Each is undone only if its entity
        applied it (`CommandEnvelope.undoes`), last first. Undoing only the steps reached,
        a run that withdrew and committed, lost, then ran out of attempts at the withdrawal
        again refunded the customer and left the units sold."""
        # Sent, if at all, since the run began: an entity that may have forgotten a command
        # since then cannot tell whether the lost attempt made the step, and refuses the
        # undo (FAILED, for an operator) rather than cancel a step it made.
        since = workflow.info().workflow_start_time
        reservation = {"reservation_id": self._state.reservation_id}
        later = [self._withdraw(since)] if self._state.total > 0 else []
        later += [self._commit(line.sku, reservation, since) for line in self._input.lines]
        saga.register_unreached(later)

    def _withdraw(self, sent_since: datetime | None = None) -> Step[Outcome]:
        amount = {"amount": self._state.total}
        account_id = self._input.account_id
        return Step(
            "withdraw",
            partial(self._step, withdraw, account_id, "withdraw", amount),
            ("refund", self._undo(refund, account_id, "withdraw", amount, sent_since)),
            lane=f"account:{account_id}",
        )

    def _reservation_id(self) -> str:
        """What its stock is reserved under: its key, or a key too long for a reservation id
        (a cart id near 128 characters, with the attempt and start time) cut short and made
        unique again by a digest of the whole. Checkouts that began before ids were bounded
        keep their whole key, as their histories say."""
        key = self._input.key
        if len(key) <= MAX_RESERVATION_ID or not CHECKOUT_PATCHES.patched(SHORT_RESERVATION_IDS):
            return key
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return f"{key[: MAX_RESERVATION_ID - len(digest) - 1]}.{digest}"

    def _reserve(self, line: CheckoutLine, reservation: dict[str, Any]) -> Step[Outcome]:
        step = f"reserve:{line.sku}"
        reserve = {
            **reservation,
            "quantity": line.quantity,
            "ttl_seconds": self._options.reservation_ttl_seconds,
        }
        return Step(
            step,
            partial(self._step, reserve_stock, line.sku, step, reserve),
            (f"release:{line.sku}", self._undo(release_reservation, line.sku, step, reservation)),
            lane=f"inventory:{line.sku}",
        )

    def _commit(
        self, sku: str, reservation: dict[str, Any], sent_since: datetime | None = None
    ) -> Step[Outcome]:
        step = f"commit:{sku}"
        return Step(
            step,
            partial(self._step, commit_reservation, sku, step, reservation),
            (f"return:{sku}", self._undo(return_reservation, sku, step, reservation, sent_since)),
            lane=f"inventory:{sku}",
        )

    def _command_id(self, step: str) -> str:
        return f"{checkout_workflow_id(self._input.key)}:{step}"

    def _request(
        self,
        command: Command[Any, Any, Any],
        entity_id: str,
        command_id: str,
        payload: dict[str, Any],
        policy: RequestPolicy,
        undoes: str | None = None,
        undoes_since: datetime | None = None,
        guarded: bool = True,
    ) -> Awaitable[Outcome]:
        """Send a request. Unless not `guarded` (the report, which the cart takes once by
        the checkout's id), it says when its id was first sent, so that an entity that may
        have forgotten it refuses it rather than apply it twice (`first_sent`)."""
        resent = command_id in self._first_sent
        first_sent = self._first_sent.setdefault(command_id, workflow.now())
        request = EntityRequest(
            entity_type=command.entity_type,
            entity_id=entity_id,
            command_id=command_id,
            command=command.name,
            payload=payload,
            undoes=undoes,
            undoes_since=undoes_since,
            first_sent=first_sent if guarded else None,
            resent=resent,
            sent_by=saga_sender(workflow.info().workflow_id),
        )
        return request_entity(request, policy, CHECKOUT_PATCHES.patched)

    def _step(
        self, command: Command[Any, Any, Any], entity_id: str, step: str, payload: dict[str, Any]
    ) -> Awaitable[Outcome]:
        return self._request(
            command, entity_id, self._command_id(step), payload, self._options.step
        )

    def _undo(
        self,
        command: Command[Any, Any, Any],
        entity_id: str,
        step: str,
        payload: dict[str, Any],
        sent_since: datetime | None = None,
    ) -> Compensation:
        """Take `step` back with `command`. Unless the step is known to have completed, the
        entity applies it only if the step's command was applied, and cancels that command
        if it never arrived; since the step is sent once this is made (or after
        `sent_since`), the entity can tell whether it has forgotten it
        (`CommandEnvelope.undoes_since`)."""
        since = sent_since or workflow.now()

        def undo(step_completed: bool, retry: int) -> Awaitable[Outcome]:
            return self._request(
                command,
                entity_id,
                self._command_id(_retried(f"undo-{step}", retry)),
                payload,
                self._options.compensation,
                undoes=None if step_completed else self._command_id(step),
                undoes_since=None if step_completed else since,
            )

        return undo

    def _report(
        self, command: Command[Any, Any, Any], retry: int, **payload: Any
    ) -> Awaitable[Outcome]:
        """Tell the cart the outcome: a local try, in the workflow task of the steps before
        it. Sent once those are in the history (an activity) it cost a checkout one more
        workflow task, about 15% of its CPU (2026-12-06), against a case that takes a
        worker dying in the few milliseconds before that task is recorded and a step of
        the next attempt then running out of attempts: that checkout ends FAILED, its steps
        undone and its cart checked out, for an operator (docs/operations.md)."""
        return self._request(
            command,
            self._input.cart_id,
            self._command_id(_retried("report", retry)),
            {"checkout_id": self._input.checkout_id, **payload},
            self._options.compensation,
            guarded=False,
        )


def _retried(step: str, retry: int) -> str:
    """A request's name in an operator's retry: its own, since the entity remembers the
    refusal of the first."""
    return step if retry == 0 else f"{step}-retry-{retry}"
