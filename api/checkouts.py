"""GraphQL view of checkouts: the saga's status, steps and compensations, and what operators
did to it."""

from __future__ import annotations

import asyncio
from datetime import datetime

import strawberry

from api.carts import MAX_CART_LINES, CartLine
from api.common import Long, authorize
from api.context import Info
from api.gateway import QUERY_BUDGET, check_entity_id, unbudgeted
from api.history import sender_shown
from api.pacing import paced
from api.response_size import bounded
from entities.cart import CartState, CartStatus
from entities.checkout import CheckoutState, CheckoutWorkflow
from entities.checkout_input import checkout_workflow_id
from entities.errors import ErrorCode, TenureError
from entities.runtime.policy import READ, Principal, Role
from entities.runtime.saga import (
    MAX_OPERATOR_ACTIONS,
    OperatorActionKind,
    SagaStatus,
    StepRecord,
    StepStatus,
)

strawberry.enum(
    SagaStatus,
    name="CheckoutStatus",
    description="RUNNING, then COMPLETED, or COMPENSATED after a failure was undone; FAILED "
    "when something could not be undone and needs an operator; RESOLVED when an operator "
    "settled a FAILED checkout by hand.",
)
strawberry.enum(StepStatus, name="CheckoutStepStatus")
strawberry.enum(OperatorActionKind, name="CheckoutOperatorActionKind")


# Each line is reserved and then committed, between them the withdrawal, and the report
# at the end; each step registers at most one compensation.
MAX_SAGA_RECORDS = 2 * MAX_CART_LINES + 4


@strawberry.type(description="A step the checkout took, and why it failed when it did.")
class CheckoutStep:
    name: str
    status: StepStatus
    at: datetime
    code: str | None
    message: str | None

    @classmethod
    def of(cls, record: StepRecord) -> CheckoutStep:
        return cls(
            name=record.name,
            status=record.status,
            at=record.at,
            code=record.code,
            message=record.message,
        )


@strawberry.type(description="A step undone after a later one failed.")
class CheckoutCompensation:
    name: str
    status: StepStatus
    at: datetime
    reason: str = strawberry.field(description="The failure that set it off.")
    code: str | None
    message: str | None


@strawberry.type(description="An operator's retry or resolve of a FAILED checkout.")
class CheckoutOperatorAction:
    action: OperatorActionKind
    reason: str
    by: str = strawberry.field(
        description="Who: `role:subject`, such as `admin:ops-1`; to a customer, the role alone."
    )
    at: datetime
    refused: str | None = strawberry.field(
        description="Why the checkout did not take it up (it was not waiting for an "
        "operator); null when it did."
    )


@strawberry.type(description="One attempt to check a cart out.")
class Checkout:
    id: strawberry.ID
    cart_id: strawberry.ID
    account_id: strawberry.ID
    status: SagaStatus
    lines: list[CartLine] = bounded(MAX_CART_LINES)
    total: Long
    order_id: str | None
    failure_code: str | None
    failure_reason: str | None
    steps: list[CheckoutStep] = bounded(MAX_SAGA_RECORDS, description="In the order taken.")
    compensations: list[CheckoutCompensation] = bounded(
        MAX_SAGA_RECORDS,
        description="In the order run; one run again by an operator shows its latest outcome.",
    )
    operator_actions: list[CheckoutOperatorAction] = bounded(
        MAX_OPERATOR_ACTIONS, description="Oldest first, refusals included."
    )
    refused: list[CheckoutStep] = bounded(
        MAX_SAGA_RECORDS,
        description="While FAILED, why it waits for an operator: each compensation refused, "
        "then the final report when it was refused; what a retry runs again. Empty otherwise.",
    )
    awaiting_operator_until: datetime | None = strawberry.field(
        description="While FAILED, until when it waits for an operator's retry or resolve; "
        "null when it does not (any more): then it can no longer be retried or resolved."
    )

    @classmethod
    def from_state(cls, state: CheckoutState, caller: Principal) -> Checkout:
        """The checkout as `caller` may see it: an operator's name is not a customer's to
        know (as in an entity's history)."""
        return cls(
            id=strawberry.ID(state.checkout_id),
            cart_id=strawberry.ID(state.cart_id),
            account_id=strawberry.ID(state.account_id),
            status=state.status,
            lines=paced(CartLine.of(line) for line in state.lines),
            total=Long(state.total),
            order_id=state.order_id,
            failure_code=state.failure_code,
            failure_reason=state.failure_reason,
            steps=paced(CheckoutStep.of(step) for step in state.steps),
            compensations=paced(
                CheckoutCompensation(
                    name=c.name,
                    status=c.status,
                    at=c.at,
                    reason=c.reason,
                    code=c.code,
                    message=c.message,
                )
                for c in state.compensations
            ),
            operator_actions=[
                CheckoutOperatorAction(
                    action=a.action,
                    reason=a.reason,
                    by=_shown(a.by, caller),
                    at=a.at,
                    refused=a.refused,
                )
                for a in state.operator_actions
            ],
            refused=[CheckoutStep.of(step) for step in state.refused()],
            awaiting_operator_until=state.awaiting_operator_until,
        )


def _shown(sent_by: str, caller: Principal) -> str:
    role, subject = sender_shown(sent_by, caller)
    return role if subject is None else f"{role}:{subject}"


def checked_checkout_id(checkout_id: str) -> str:
    """`checkout_id` if it is one (`<cart id>-<attempt>`), else INVALID_INPUT."""
    cart_id, _, attempt = checkout_id.rpartition("-")
    if not (attempt.isascii() and attempt.isdigit()):  # isdigit alone takes other scripts' digits
        raise TenureError(
            ErrorCode.INVALID_INPUT, "a checkout id is a cart id and an attempt: <cart>-<n>"
        )
    check_entity_id(cart_id)
    return checkout_id


STARTING_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)
"""Pauses between asks for a checkout its cart has started and Temporal not yet made: the
cart answers checkoutCart, then starts the checkout as a child, a moment later."""


async def read_checkout(info: Info, checkout_id: str) -> Checkout | None:
    """The checkout asked of its saga (a LIVE read), for whoever may read its cart."""
    checkout_id = checked_checkout_id(checkout_id)
    cart_id = checkout_id.rpartition("-")[0]
    # A checkout is its cart's: whoever may read the cart may read its checkouts.
    await authorize(info, "cart", cart_id, READ)
    gateway = info.context.gateway
    workflow_id = checkout_workflow_id(checkout_id)
    state = await gateway.read_workflow(workflow_id, CheckoutWorkflow.status, CheckoutState)
    if state is None:
        # Answered null, "never existed", right after checkoutCart answered its id.
        if not await _starting(info, cart_id, checkout_id):
            return None
        state = await _started(info, workflow_id, checkout_id)
    if info.context.principal.role is Role.CUSTOMER:
        # And it pays from its account: a cart id made again for another account (a
        # checkout waits days for an operator, its cart long gone) showed the new holder
        # the first holder's order. Staff and services read what their scopes let them.
        try:
            await authorize(info, "account", state.account_id, READ)
        except TenureError as exc:
            if exc.code is not ErrorCode.FORBIDDEN:
                raise
            # To this cart's holder, the first holder's checkout is none: answered FORBIDDEN,
            # it told which of the cart id's earlier checkouts existed.
            return None
    return Checkout.from_state(state, info.context.principal)


async def _started(info: Info, workflow_id: str, checkout_id: str) -> CheckoutState:
    """The checkout its cart has started, once Temporal has made it. These asks are bounded
    here (STARTING_PAUSES), not charged to the request's LIVE reads, and one read of a
    request waits at most: aliases do not multiply them."""
    # Once per operation (its budget), not per context: a WebSocket's serves them all.
    budget = QUERY_BUDGET.get()
    first = budget is None or not budget.waited_for_a_start
    if budget is not None:
        budget.waited_for_a_start = True
    with unbudgeted():
        for pause in STARTING_PAUSES if first else ():
            await asyncio.sleep(pause)
            state = await info.context.gateway.read_workflow(
                workflow_id, CheckoutWorkflow.status, CheckoutState
            )
            if state is not None:
                return state
    raise TenureError(
        ErrorCode.UNAVAILABLE, f"checkout {checkout_id} is starting: ask again shortly"
    )


async def _starting(info: Info, cart_id: str, checkout_id: str) -> bool:
    """Whether the cart is checking out `checkout_id`: started, its workflow perhaps not yet
    made (one that ended and was since deleted leaves its cart past it)."""
    read = await info.context.gateway.read("cart", cart_id)
    if read is None or read.snapshot.state is None:
        return False
    cart = CartState.model_validate(read.snapshot.state)
    return cart.status is CartStatus.CHECKING_OUT and cart.checkout_id == checkout_id


@strawberry.type
class CheckoutQuery:
    @strawberry.field(description="A checkout, live while it runs; null when it never existed.")
    async def checkout(self, info: Info, id: strawberry.ID) -> Checkout | None:
        return await read_checkout(info, id)
