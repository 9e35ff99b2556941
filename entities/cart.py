"""Cart: an account's basket of lines, checked out by the checkout saga, abandoned when idle."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, ValidationInfo, model_validator
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from entities.checkout_input import (
        CHECKOUT_WORKFLOW,
        CheckoutInput,
        CheckoutLine,
        CheckoutOptions,
        checkout_workflow_id,
    )
    from entities.errors import ErrorCode, Rejected
    from entities.runtime import CommandContext, EntityRunInput, EntityType, EntityWorkflow
    from entities.runtime.effects import IfOtherRunning, StartWorkflow
    from entities.runtime.entity import (
        MAX_AMOUNT,
        MAX_MONEY,
        Action,
        EntityId,
        at_the_edge,
        strict_bound,
    )
    from entities.runtime.envelope import Snapshot
    from entities.runtime.policy import READ

MAX_QUANTITY = 10_000
Quantity = Annotated[int, Field(gt=0, le=MAX_QUANTITY, strict=True)]
UnitPrice = Annotated[
    int,
    Field(ge=0, le=10**12, strict=True, description="minor units, e.g. cents"),
    strict_bound(lambda price: price >= 1, "a price is at least 1 (minor units)"),
]


class CartStatus(StrEnum):
    OPEN = "OPEN"
    CHECKING_OUT = "CHECKING_OUT"
    CHECKED_OUT = "CHECKED_OUT"
    ABANDONED = "ABANDONED"
    DISCARDED = "DISCARDED"


class CartLine(BaseModel):
    sku: str
    quantity: int
    unit_price: int


MAX_STARTS_REMEMBERED = 16
"""checkoutCart commands a cart remembers the checkout of (`CartState.started_by`)."""


class CartState(BaseModel):
    account_id: str
    status: CartStatus = CartStatus.OPEN
    lines: list[CartLine] = Field(default_factory=list)
    last_activity_at: datetime
    checkout_attempts: int = 0
    checkout_id: str | None = None
    order_id: str | None = None
    failure_code: str | None = None
    failure_reason: str | None = None
    abandoned_at: datetime | None = None
    started_by: dict[str, str] = Field(
        default_factory=dict,
        description="The checkout each of the latest checkoutCart commands started, by "
        "command id (MAX_STARTS_REMEMBERED): a late repeat of one is answered with its own "
        "checkout, not the cart's latest. Empty for checkouts started before it was kept.",
    )

    @property
    def total(self) -> int:
        return sum(line.quantity * line.unit_price for line in self.lines)


class CartOptions(BaseModel):
    abandon_after_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    max_lines: int = Field(default=100, ge=1)
    checkout: CheckoutOptions = Field(default_factory=CheckoutOptions)


class CreateCart(BaseModel, extra="forbid"):
    account_id: EntityId


def _chargeable(quantity: int, unit_price: int | None, info: ValidationInfo) -> None:
    """At the API's edge: a line alone worth more than a cart may total is refused with
    nothing stored (runs refuse it as LIMIT_REACHED, as they always did)."""
    if at_the_edge(info) and unit_price is not None and quantity * unit_price > MAX_AMOUNT:
        raise ValueError(
            f"a line's quantity times its unit price is at most {MAX_AMOUNT} minor units, "
            "what a cart's checkout can charge"
        )


class AddCartItem(BaseModel, extra="forbid"):
    sku: EntityId
    quantity: Quantity
    unit_price: UnitPrice

    @model_validator(mode="after")
    def _within_a_cart(self, info: ValidationInfo) -> AddCartItem:
        _chargeable(self.quantity, self.unit_price, info)
        return self


class RemoveCartItem(BaseModel, extra="forbid"):
    sku: EntityId


class SetCartItemQuantity(BaseModel, extra="forbid"):
    sku: EntityId
    quantity: Annotated[int, Field(ge=0, le=MAX_QUANTITY, strict=True)]
    unit_price: UnitPrice | None = Field(
        default=None,
        description="The item's price now, which the line takes when its quantity rises "
        "(a customer's change); without it the line keeps its price (staff's).",
    )
    priced: bool = Field(
        default=False,
        description="More units need `unit_price` (a customer's change): without it, the item "
        "having no price, the quantity may only fall.",
    )
    # No `_chargeable` here: fewer units keep the line's own price, which only the cart knows.


class ClearCart(BaseModel, extra="forbid"):
    pass


class CheckoutCart(BaseModel, extra="forbid"):
    pass


class DiscardCart(BaseModel, extra="forbid"):
    only_if_abandoned: bool = Field(
        default=False,
        description="Refuse (INVALID_TRANSITION) unless the cart is ABANDONED: a cleanup by "
        "a listing, which may lag, must not discard a cart its customer came back to.",
    )


class CompleteCheckout(BaseModel, extra="forbid"):
    checkout_id: str
    order_id: str


class FailCheckout(BaseModel, extra="forbid"):
    checkout_id: str
    code: str | None = None
    reason: str | None = None


cart: EntityType[CartState, CartOptions] = EntityType(
    "cart",
    state=CartState,
    options=CartOptions,
    is_terminal=lambda s: s.status in (CartStatus.CHECKED_OUT, CartStatus.DISCARDED),
)

Ctx = CommandContext[CartOptions]


def _touched(state: CartState, ctx: Ctx, **changes: object) -> CartState:
    """The cart after a customer's command: revived if it was abandoned, and active now.
    While it is checking out, its lines are the checkout's and cannot change."""
    if state.status is CartStatus.CHECKING_OUT:
        raise Rejected(
            ErrorCode.CHECKOUT_IN_PROGRESS,
            f"cart {ctx.entity_id} is checking out ({state.checkout_id}); wait for its outcome",
        )
    lines = changes.get("lines")
    # Runs before level 3 took totals up to MAX_MONEY, which no checkout could charge.
    most = MAX_AMOUNT if ctx.strict_inputs >= 3 else MAX_MONEY
    if isinstance(lines, list) and sum(line.quantity * line.unit_price for line in lines) > most:
        raise Rejected(
            ErrorCode.LIMIT_REACHED,
            f"a cart's total is at most {most} minor units, what its checkout can charge",
        )
    return state.model_copy(
        update={
            "status": CartStatus.OPEN,
            "abandoned_at": None,
            "last_activity_at": ctx.now,
            **changes,
        }
    )


def _line(state: CartState, sku: str) -> CartLine | None:
    return next((line for line in state.lines if line.sku == sku), None)


@cart.command(CreateCart, creates=True, name="createCart")
def create_cart(state: CartState | None, cmd: CreateCart, ctx: Ctx) -> CartState:
    if state is not None:
        raise Rejected(ErrorCode.ALREADY_EXISTS, f"cart {ctx.entity_id} already exists")
    return CartState(account_id=cmd.account_id, last_activity_at=ctx.now)


@cart.command(AddCartItem, name="addCartItem")
def add_cart_item(state: CartState, cmd: AddCartItem, ctx: Ctx) -> CartState:
    """Add units of a SKU; a SKU already in the cart gets more units at the new price."""
    existing = _line(state, cmd.sku)
    quantity = cmd.quantity + (existing.quantity if existing else 0)
    if quantity > MAX_QUANTITY:
        raise Rejected(ErrorCode.INVALID_INPUT, f"quantity: at most {MAX_QUANTITY} of a SKU")
    if existing is None and len(state.lines) >= ctx.options.max_lines:
        raise Rejected(
            ErrorCode.INVALID_INPUT, f"a cart holds at most {ctx.options.max_lines} lines"
        )
    line = CartLine(sku=cmd.sku, quantity=quantity, unit_price=cmd.unit_price)
    if existing is None:
        lines = [*state.lines, line]
    else:
        lines = [line if other.sku == cmd.sku else other for other in state.lines]
    return _touched(state, ctx, lines=lines)


@cart.command(RemoveCartItem, name="removeCartItem")
def remove_cart_item(state: CartState, cmd: RemoveCartItem, ctx: Ctx) -> CartState:
    """Drop a SKU's line; removing one that is not there changes nothing but the clock."""
    return _touched(state, ctx, lines=[line for line in state.lines if line.sku != cmd.sku])


@cart.command(SetCartItemQuantity, name="setCartItemQuantity")
def set_cart_item_quantity(state: CartState, cmd: SetCartItemQuantity, ctx: Ctx) -> CartState:
    """Set a line's quantity; zero removes it. More units of a line cost the price the
    command carries, when it carries one: a line staff priced for one unit, or one added
    before the item's price rose, was raised to a hundred at its old price."""
    existing = _line(state, cmd.sku)
    if existing is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"cart {ctx.entity_id} has no line for {cmd.sku}")
    changed: dict[str, int] = {"quantity": cmd.quantity}
    if cmd.quantity > existing.quantity and cmd.unit_price is not None:
        changed["unit_price"] = cmd.unit_price
    elif cmd.quantity > existing.quantity and cmd.priced:
        raise Rejected(
            ErrorCode.INVALID_TRANSITION,
            f"{cmd.sku} has no price: its line may be lowered or removed, not raised",
        )
    lines = [
        line.model_copy(update=changed) if line.sku == cmd.sku else line for line in state.lines
    ]
    return _touched(state, ctx, lines=[line for line in lines if line.quantity > 0])


@cart.command(ClearCart, name="clearCart")
def clear_cart(state: CartState, cmd: ClearCart, ctx: Ctx) -> CartState:
    return _touched(state, ctx, lines=[])


@cart.command(DiscardCart, name="discardCart")
def discard_cart(state: CartState, cmd: DiscardCart, ctx: Ctx) -> CartState:
    """Give the cart up for good: its workflow ends, and it no longer counts towards its
    account's carts (`TENURE_MAX_CARTS_PER_ACCOUNT`). An abandoned cart stayed, and counted,
    until checked out: an account with as many as it may have could make no more, and
    `clearCart` revived one rather than freeing its place."""
    if state.status is CartStatus.CHECKING_OUT:
        raise Rejected(
            ErrorCode.CHECKOUT_IN_PROGRESS,
            f"cart {ctx.entity_id} is checking out ({state.checkout_id}); wait for its outcome",
        )
    if cmd.only_if_abandoned and state.status is not CartStatus.ABANDONED:
        raise Rejected(
            ErrorCode.INVALID_TRANSITION,
            f"cart {ctx.entity_id} is {state.status.value}, not ABANDONED: kept",
        )
    return state.model_copy(update={"status": CartStatus.DISCARDED, "last_activity_at": ctx.now})


@cart.command(CheckoutCart, name="checkoutCart")
def checkout_cart(state: CartState, cmd: CheckoutCart, ctx: Ctx) -> CartState:
    """Start the checkout saga for the cart's lines as they are now."""
    if not state.lines:
        raise Rejected(ErrorCode.INVALID_TRANSITION, f"cart {ctx.entity_id} is empty")
    attempt = state.checkout_attempts + 1
    checkout_id = f"{ctx.entity_id}-{attempt}"
    started_by = {**state.started_by, ctx.command_id: checkout_id}
    while len(started_by) > MAX_STARTS_REMEMBERED:
        del started_by[next(iter(started_by))]
    checked_out = _touched(
        state,
        ctx,
        status=CartStatus.CHECKING_OUT,
        checkout_attempts=attempt,
        checkout_id=checkout_id,
        failure_code=None,
        failure_reason=None,
        started_by=started_by,
    )
    checkout = CheckoutInput(
        checkout_id=checkout_id,
        cart_id=ctx.entity_id,
        account_id=state.account_id,
        lines=[CheckoutLine.model_validate(line.model_dump()) for line in state.lines],
        options=ctx.options.checkout,
        # The same at a reset's re-application of this command (rules level 3).
        started_at=ctx.incarnation if ctx.rules_from(3) else int(ctx.now.timestamp() * 1000),
    )
    ctx.effects.append(
        StartWorkflow(
            workflow=CHECKOUT_WORKFLOW,
            workflow_id=checkout_workflow_id(checkout_id),
            input=checkout.model_dump(mode="json"),
            # An earlier cart of this id's checkout of this number, FAILED and waiting for
            # an operator: this one cannot start, and the cart is open again.
            if_other_running=IfOtherRunning(
                command=fail_checkout.name,
                payload=FailCheckout(
                    checkout_id=checkout_id,
                    code=ErrorCode.CONFLICT.value,
                    reason=f"checkout {checkout_id} could not start: a checkout of that id, "
                    "of an earlier cart of this id, is still running; check out again",
                ).model_dump(),
                same_if=["cart_id", "started_at"],
                # Its own, named after the time the cart took checkoutCart (rules before
                # level 3), starts at or after the cart's incarnation; an earlier cart's,
                # before it.
                same_since=["started_at"],
            ),
        )
    )
    return checked_out


def _checking_out(state: CartState, checkout_id: str, ctx: Ctx) -> None:
    if state.status is not CartStatus.CHECKING_OUT or state.checkout_id != checkout_id:
        raise Rejected(
            ErrorCode.CONFLICT,
            f"cart {ctx.entity_id} is not checking out {checkout_id} (it is {state.status.value}"
            f", checkout {state.checkout_id})",
        )


@cart.command(CompleteCheckout, name="completeCheckout", internal=True)
def complete_checkout(state: CartState, cmd: CompleteCheckout, ctx: Ctx) -> CartState:
    """The checkout saga's report of success: the cart becomes an order."""
    _checking_out(state, cmd.checkout_id, ctx)
    return state.model_copy(
        update={
            "status": CartStatus.CHECKED_OUT,
            "order_id": cmd.order_id,
            "last_activity_at": ctx.now,
        }
    )


@cart.command(FailCheckout, name="failCheckout", internal=True)
def fail_checkout(state: CartState, cmd: FailCheckout, ctx: Ctx) -> CartState:
    """The checkout saga's report of failure, after it undid what it had done: the cart is
    open again, with the reason."""
    _checking_out(state, cmd.checkout_id, ctx)
    return state.model_copy(
        update={
            "status": CartStatus.OPEN,
            "failure_code": cmd.code,
            "failure_reason": cmd.reason,
            "last_activity_at": ctx.now,
        }
    )


def _abandoned_after(state: CartState, options: CartOptions) -> datetime | None:
    if state.status is not CartStatus.OPEN:
        return None
    return state.last_activity_at + timedelta(seconds=options.abandon_after_seconds)


@cart.timer(_abandoned_after)
def abandon(state: CartState, ctx: Ctx) -> CartState:
    """Idle too long: marked abandoned, lines kept for analytics, revived by any command."""
    return state.model_copy(update={"status": CartStatus.ABANDONED, "abandoned_at": ctx.now})


_SHOPPING: list[Action] = [
    create_cart,
    add_cart_item,
    remove_cart_item,
    set_cart_item_quantity,
    clear_cart,
    checkout_cart,
    discard_cart,
]

cart.permit(
    # completeCheckout and failCheckout are the checkout saga's report, sent by the worker.
    actions=[READ, *_SHOPPING, complete_checkout, fail_checkout],
    customer=[READ, *_SHOPPING],
    # A cart is its account's: from its state, or from the createCart that makes it.
    owner=lambda _, data: str(data["account_id"]) if data and "account_id" in data else None,
)


cart.listing(
    status=lambda s: s.status.value,
    tags={"account_id": lambda s: s.account_id},
    owned_by="account_id",
)


@workflow.defn(name="Cart")
class CartWorkflow(EntityWorkflow):
    """The Cart actor."""

    entity = cart

    @workflow.run
    async def run(self, input: EntityRunInput) -> Snapshot:
        return await self.run_entity()
