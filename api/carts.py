"""GraphQL binding of the Cart entity."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Annotated, Any

import strawberry

from api.common import (
    CREATE_GUARDS,
    CommandPayload,
    Consistency,
    EntityState,
    IdempotencyKey,
    Long,
    ReadConsistency,
    Wait,
    authorize,
    check_client_key,
    in_graphql_terms,
    new_entity_id,
    read_entity,
    read_fields,
    readable,
    receipt_fields,
    require_open,
    send_command,
    send_unread,
    told_of_state,
    unread_refusal,
)
from api.context import Info
from api.errors import TooManyQueries
from api.gateway import EntityGateway, EntityRead, Receipt, check_entity_id
from api.pacing import paced
from api.read_plans import entity_read_field
from api.response_size import bounded
from entities import cart as domain
from entities.account import account
from entities.cart import CartLine as CartLineState
from entities.cart import CartOptions, CartState, CartStatus
from entities.checkout_input import CheckoutLine
from entities.errors import ErrorCode, TenureError
from entities.inventory import InventoryState, inventory
from entities.runtime.entity import Command
from entities.runtime.envelope import sender_key
from entities.runtime.policy import READ, Role
from workers.cache import CacheUnavailable
from workers.creations import Creations

ENTITY = domain.cart.name

strawberry.enum(
    CartStatus, description="Where a cart is: open, checking out, an order, idle, given up."
)


MAX_CART_LINES: int = CartOptions.model_fields["max_lines"].default
"""The most lines a cart the API creates can hold."""


@strawberry.type(description="Units of one SKU at a unit price.")
class CartLine:
    sku: str
    quantity: int
    unit_price: Long = strawberry.field(description="In minor units of the account's currency.")
    line_total: Long

    @classmethod
    def of(cls, line: CartLineState | CheckoutLine) -> CartLine:
        return cls(
            sku=line.sku,
            quantity=line.quantity,
            unit_price=Long(line.unit_price),
            line_total=Long(line.quantity * line.unit_price),
        )


@strawberry.type(description="An account's basket; checked out by a checkout saga.")
class Cart(EntityState):
    account_id: strawberry.ID
    status: CartStatus
    lines: list[CartLine] = bounded(MAX_CART_LINES)
    total: Long
    last_activity_at: datetime
    checkout_attempts: int
    checkout_id: strawberry.ID | None = strawberry.field(
        description="The latest checkout; see `checkout(id)`."
    )
    order_id: str | None = strawberry.field(description="Set once CHECKED_OUT.")
    failure_code: str | None = strawberry.field(description="Why the latest checkout failed.")
    failure_reason: str | None
    abandoned_at: datetime | None

    @classmethod
    def from_read(cls, read: EntityRead) -> Cart:
        state = CartState.model_validate(read.snapshot.state)
        return cls(
            **read_fields(read),
            account_id=strawberry.ID(state.account_id),
            status=state.status,
            lines=paced(CartLine.of(line) for line in state.lines),
            total=Long(state.total),
            last_activity_at=state.last_activity_at,
            checkout_attempts=state.checkout_attempts,
            checkout_id=strawberry.ID(state.checkout_id) if state.checkout_id else None,
            order_id=state.order_id,
            failure_code=state.failure_code,
            failure_reason=state.failure_reason,
            abandoned_at=state.abandoned_at,
        )


@strawberry.type(description="A command sent to a cart; `cart` is set when waited for.")
class CartCommandPayload(CommandPayload):
    cart_id: strawberry.ID
    cart: Cart | None

    @classmethod
    def from_receipt(cls, receipt: Receipt) -> CartCommandPayload:
        return cls(
            cart_id=strawberry.ID(receipt.entity_id),
            **receipt_fields(receipt),
            cart=Cart.from_read(receipt.read) if receipt.read else None,
        )


@strawberry.type(description="A checkout started: follow it with `checkout(id)`.")
class CheckoutCartPayload:
    cart_id: strawberry.ID
    command_id: str
    checkout_id: strawberry.ID
    cart: Cart | None = strawberry.field(
        description="The cart after the command; null for a caller that may check it out "
        "but not read it."
    )


async def _command(
    info: Info,
    cart_id: str,
    command: Command[Any, Any, Any],
    idempotency_key: str | None,
    wait: bool,
    filled: Collection[str] = (),
    **payload: object,
) -> CartCommandPayload:
    receipt = await send_command(info, command, cart_id, payload, idempotency_key, wait, filled)
    return CartCommandPayload.from_receipt(receipt)


def _price_filled(info: Info, given: int | None) -> tuple[str, ...]:
    """`unit_price` when the API fills it in (the item's, for a customer whatever it
    sent), which the command's fingerprint leaves out: a customer's retry under its key
    after the price changed was refused IDEMPOTENCY_KEY_REUSED, "not applied: send it with a
    new key", though the first was applied."""
    named = given is not None and info.context.principal.role is not Role.CUSTOMER
    return () if named else ("unit_price",)


@strawberry.type
class CartQuery:
    @strawberry.field(description="A cart, or null when it never existed.")
    async def cart(
        self, info: Info, id: strawberry.ID, consistency: ReadConsistency = Consistency.CACHED
    ) -> Cart | None:
        read = await read_entity(info, ENTITY, id, consistency)
        return Cart.from_read(read) if read else None


entity_read_field("cart", ENTITY)


_NOT_CHECKED_OUT = frozenset(
    {CartStatus.OPEN.value, CartStatus.CHECKING_OUT.value, CartStatus.ABANDONED.value}
)


async def _room_for_a_cart(gateway: EntityGateway, account_id: str, cart_id: str) -> None:
    """Refuse a new cart (LIMIT_REACHED) for an account that has as many not checked out
    as it may: each is a workflow that lives until it is, so one customer could otherwise
    make thousands (a probe made 2,610 in 100 s). Counted from the listing index and the
    creates it does not show yet (workers/creations.py), so that a burst of creates passes
    the bound by no more than those racing the index's update. When the index cannot tell
    (Redis out of reach; before Redis 7, an account of thousands of carts), the cart is
    made."""
    limit = gateway.settings.max_carts_per_account
    creations = Creations.of(gateway.cache)
    try:
        held = await creations.held_with(
            ENTITY, "account_id", account_id, cart_id, _NOT_CHECKED_OUT
        )
        if held is None or held <= limit:
            return
        await creations.forget(ENTITY, "account_id", account_id, cart_id)
    except CacheUnavailable:
        return
    raise TenureError(
        ErrorCode.LIMIT_REACHED,
        f"account {account_id} has {held - 1} carts not checked out, the most: check out, "
        "discard or reuse one (discardCart)",
    )


_MAY_HAVE_MADE_IT = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.OUTCOME_UNKNOWN, ErrorCode.INTERNAL}
)
"""Answers to a create that may have made the cart all the same."""


async def _guard_create(gateway: EntityGateway, cart_id: str, payload: Mapping[str, Any]) -> None:
    """A new cart's account must exist and not be closed, and have room for one more cart;
    checked for every create, from a mutation or an inbound webhook (bulk commands send no
    createCart). The caller may create this cart: it is theirs or no one's."""
    # A create the entity would refuse as sent holds no room (`held_with`): 100 creates of
    # bad ids for one account left none for a minute.
    gateway.checked(ENTITY, cart_id, domain.create_cart.name, payload)
    account_id = payload["account_id"]
    try:
        owner = await require_open(gateway, account.name, account_id)
        _in_shop_currency(gateway, account_id, owner)
        await _room_for_a_cart(gateway, account_id, cart_id)
    except TenureError:
        # A create retried after the account closed (or filled up) is still answered by
        # the cart it made (its original outcome); only a new cart needs the room. It is
        # read without the READ check, which would refuse a customer one that does not exist.
        try:
            made = await gateway.read(ENTITY, cart_id)
        except (TenureError, TooManyQueries):
            made = None
        if made is None:
            raise


async def _made_for(
    gateway: EntityGateway, cart_id: str, account_id: str, refused: TenureError
) -> bool:
    """Whether a create refused ALREADY_EXISTS met this very cart, made for this account by
    a create beside it (a client's retry without a key, or two at once): its place is that
    cart's, which the index may not show yet. Given back, the account could pass its bound
    by a cart for each such pair until the index caught up."""
    if refused.code is not ErrorCode.ALREADY_EXISTS:
        return False
    try:
        made = await gateway.read(ENTITY, cart_id)
    except (TenureError, TooManyQueries):
        return True  # cannot tell: the place stays held, for a minute at most
    state = made.snapshot.state if made is not None else None
    return state is not None and state.get("account_id") == account_id


def _in_shop_currency(gateway: EntityGateway, account_id: str, owner: EntityRead) -> None:
    """Refuse a cart for an account in another currency than the shop's prices
    (`TENURE_SHOP_CURRENCY`): a cart pays its items' prices, in minor units, from its
    account, and a JPY account paid a 15.00 EUR teapot as 1,500 yen."""
    shop = gateway.settings.shop_currency
    state = owner.snapshot.state or {}
    currency = state.get("currency")
    if shop is not None and currency is not None and currency != shop:
        raise TenureError(
            ErrorCode.INVALID_TRANSITION,
            f"account {account_id} is in {currency}, and the shop's prices are in {shop}: "
            f"a cart needs an account in {shop}",
        )


CREATE_GUARDS[(ENTITY, domain.create_cart.name)] = _guard_create


UnitPrice = Annotated[
    Long | None,
    strawberry.argument(
        description="The item's own price by default. Staff and services may name another "
        "(a discount); a customer's, when given, must be the item's."
    ),
]


async def _unit_price(
    info: Info,
    cart_id: str,
    sku: str,
    given: int | None,
    command: str = domain.add_cart_item.name,
    idempotency_key: str | None = None,
) -> int:
    """A new line's unit price: the one staff or a service names, else the item's own. A
    customer's is always the item's: a customer who named the price bought any item for 1
    minor unit. An item with no price is not for customers to add. A customer's retry of a
    command the cart applied, under its key, passes whatever the price is now: the cart
    answers it as the first (the price is not part of its fingerprint), where it was refused
    INVALID_INPUT after a price change, and a client that took that for "not applied" and
    sent it under a new key added the units twice."""
    if given is not None and info.context.principal.role is not Role.CUSTOMER:
        return given
    # Before the item is looked up, so a refusal tells nothing about what exists.
    await authorize(info, ENTITY, cart_id, command)
    try:
        check_entity_id(sku)
    except TenureError as exc:  # named as the caller knows it: not the cart's id
        raise TenureError(exc.code, f"sku: {exc.message}") from None
    read = await info.context.gateway.read(inventory.name, sku)
    if read is None:
        raise TenureError(ErrorCode.NOT_FOUND, f"inventory item {sku} does not exist")
    price = InventoryState.model_validate(read.snapshot.state).unit_price
    if price is None:
        raise TenureError(
            ErrorCode.INVALID_TRANSITION,
            f"inventory item {sku} has no price yet (a restock with unitPrice sets it)",
        )
    if given is not None and given != price:
        check_client_key(idempotency_key)  # a key Temporal is asked about must be one
        if idempotency_key is not None and await info.context.gateway.recorded(
            ENTITY, cart_id, idempotency_key, info.context.principal.sender
        ):
            return price
        raise TenureError(
            ErrorCode.INVALID_INPUT, f"unitPrice: {sku} costs {price}; leave unitPrice out"
        )
    return price


def _started(info: Info, receipt: Receipt, cart: Cart) -> str | None:
    """The checkout the checkoutCart command of `receipt` started: the one the cart recorded
    for its id (under its sender's own, where another's command took it first), else, for a
    checkout started before carts recorded them, the cart's latest. A repeat of an earlier
    checkoutCart was answered with the cart's latest checkout, someone else's order."""
    assert receipt.read is not None  # `cart` was read from it
    started: dict[str, str] = (receipt.read.snapshot.state or {}).get("started_by") or {}
    sender = info.context.principal.sender
    for command_id in (sender_key(sender, receipt.command_id), receipt.command_id):
        if command_id in started:
            return started[command_id]
    return cart.checkout_id


@strawberry.type
class CartMutation:
    @strawberry.mutation(
        description="Open an empty cart for an account, which must exist and not be closed "
        "(checked when the cart is created, not held afterwards). Without an `id`, it is "
        "named after the caller and its `idempotencyKey`: a retry names the same cart."
    )
    async def create_cart(
        self,
        info: Info,
        account_id: strawberry.ID,
        id: strawberry.ID | None = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> CartCommandPayload | None:
        cart_id = id if id is not None else new_entity_id(info, idempotency_key)
        check_client_key(idempotency_key)  # before its room is held (`_guard_create`)
        # Before anything is looked up, so a refusal tells nothing about what exists.
        await authorize(info, ENTITY, cart_id, domain.create_cart.name, {"account_id": account_id})
        try:
            await _guard_create(info.context.gateway, cart_id, {"account_id": account_id})
        except TenureError as exc:
            if told_of_state(exc.code) and not await info.context.authorizer.allows(
                info.context.principal, account.name, account_id, READ
            ):
                # A service scoped to `cart:createCart` alone read an account's currency and
                # its count of open carts from the refusal: it learns the code, as a refused
                # command tells a caller that may not read the entity.
                raise TenureError(
                    exc.code, unread_refusal(account.name, account_id, "a new cart", exc.code)
                ) from None
            # As the mutation's caller knows the field (`accountId`), not the command's.
            raise in_graphql_terms(exc) from None
        try:
            return await _command(
                info, cart_id, domain.create_cart, idempotency_key, wait, account_id=account_id
            )
        except TenureError as exc:
            gateway = info.context.gateway
            if exc.code not in _MAY_HAVE_MADE_IT and not await _made_for(
                gateway, cart_id, account_id, exc
            ):
                # Refused (an id taken, a key reused): it holds no room. It held one for a
                # minute, and a few such refusals left a customer none.
                with contextlib.suppress(CacheUnavailable):
                    await Creations.of(gateway.cache).forget(
                        ENTITY, "account_id", account_id, cart_id
                    )
            raise

    @strawberry.mutation(description="Add units of a SKU; more of a SKU already there adds up.")
    async def add_cart_item(
        self,
        info: Info,
        cart_id: strawberry.ID,
        sku: str,
        quantity: int,
        unit_price: UnitPrice = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> CartCommandPayload | None:
        if unit_price is not None and unit_price < 1:
            # The entity's own model takes 0, as carts recorded before this bound did (their
            # histories must replay); a new line is priced from 1.
            raise TenureError(ErrorCode.INVALID_INPUT, "unitPrice: at least 1")
        if not 0 < quantity <= domain.MAX_QUANTITY:  # refused as such before a price is looked up
            raise TenureError(
                ErrorCode.INVALID_INPUT, f"quantity: 1 to {domain.MAX_QUANTITY} units"
            )
        return await _command(
            info,
            cart_id,
            domain.add_cart_item,
            idempotency_key,
            wait,
            _price_filled(info, unit_price),
            sku=sku,
            quantity=quantity,
            unit_price=await _unit_price(
                info, cart_id, sku, unit_price, idempotency_key=idempotency_key
            ),
        )

    @strawberry.mutation(description="Drop a SKU's line.")
    async def remove_cart_item(
        self,
        info: Info,
        cart_id: strawberry.ID,
        sku: str,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> CartCommandPayload | None:
        return await _command(
            info, cart_id, domain.remove_cart_item, idempotency_key, wait, sku=sku
        )

    @strawberry.mutation(
        description="Set a line's quantity; zero removes it. A customer who raises it pays "
        "the item's price now for the whole line; staff and services keep the line's price."
    )
    async def set_cart_item_quantity(
        self,
        info: Info,
        cart_id: strawberry.ID,
        sku: str,
        quantity: int,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> CartCommandPayload | None:
        price: dict[str, object] = {}
        if quantity > 0 and info.context.principal.role is Role.CUSTOMER:
            # The cart takes it only if the quantity rises: fewer units keep the line's, and
            # a line of an item with no price (staff's, or gone) may still be lowered.
            price["priced"] = True
            try:
                price["unit_price"] = await _unit_price(
                    info, cart_id, sku, None, domain.set_cart_item_quantity.name
                )
            except TenureError as exc:
                if exc.code not in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_TRANSITION):
                    raise
        return await _command(
            info,
            cart_id,
            domain.set_cart_item_quantity,
            idempotency_key,
            wait,
            _price_filled(info, None),
            sku=sku,
            quantity=quantity,
            **price,
        )

    @strawberry.mutation(description="Remove every line.")
    async def clear_cart(
        self,
        info: Info,
        cart_id: strawberry.ID,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> CartCommandPayload | None:
        return await _command(info, cart_id, domain.clear_cart, idempotency_key, wait)

    @strawberry.mutation(
        description="Give the cart up for good (not while it is checking out): it is "
        "DISCARDED, takes no more commands, and no longer counts towards its account's carts."
    )
    async def discard_cart(
        self,
        info: Info,
        cart_id: strawberry.ID,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> CartCommandPayload | None:
        return await _command(info, cart_id, domain.discard_cart, idempotency_key, wait)

    @strawberry.mutation(
        description="Start checking the cart out: reserve stock, charge the account, sell. "
        "Returns once the cart is CHECKING_OUT, with the checkout's id."
    )
    async def checkout_cart(
        self, info: Info, cart_id: strawberry.ID, idempotency_key: IdempotencyKey = None
    ) -> CheckoutCartPayload | None:
        receipt = await send_unread(
            info, domain.checkout_cart, cart_id, {}, idempotency_key, wait=True
        )
        checked_out = Cart.from_read(receipt.read) if receipt.read is not None else None
        checkout_id = _started(info, receipt, checked_out) if checked_out is not None else None
        if checked_out is None or checkout_id is None:
            # Applied, but the cart has moved on since (another checkout's report came).
            raise TenureError(
                ErrorCode.CONFLICT, f"cart {receipt.entity_id} is no longer checking out"
            )
        shown = await readable(info, domain.checkout_cart.entity_type, receipt)
        return CheckoutCartPayload(
            cart_id=strawberry.ID(receipt.entity_id),
            command_id=receipt.command_id,
            checkout_id=strawberry.ID(checkout_id),
            cart=checked_out if shown.read is not None else None,
        )
