"""InventoryItem: stock of one SKU, with reservations that are committed, released or expire.

Available stock is what is on hand less what is reserved, and it never goes below zero: a
reservation is refused rather than overselling. Reservation ids are remembered after a
reservation settles, so each command is idempotent by its reservation id.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from entities.errors import ErrorCode, Rejected
    from entities.runtime import CommandContext, EntityRunInput, EntityType, EntityWorkflow
    from entities.runtime.entity import (
        AT_THE_EDGE,
        MAX_MONEY,
        PRINTABLE,
        SHOWN_AS_WRITTEN,
        strict_bound,
    )
    from entities.runtime.envelope import Snapshot
    from entities.runtime.policy import READ

Quantity = Annotated[int, Field(gt=0, le=10**9, strict=True)]
UnitPrice = Annotated[int, Field(ge=1, le=10**12, strict=True, description="minor units")]
"""As a cart line's (entities/cart.py), which also took 0 before its bounds."""
MAX_RESERVATION_ID = 128
RESERVATION_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:\-]{{0,{MAX_RESERVATION_ID - 1}}}")
"""The id a new reservation is made under: at most 128 letters, digits and . _ : -, as an
entity id (a checkout shortens a longer key of its own, `checkout.py`)."""
HeldReservationId = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,200}$")]
"""The id of a reservation already held: any an item ever accepted, so that one made before
the stricter `ReservationId` can still be released, committed or returned."""
ReservationId = Annotated[
    HeldReservationId,
    strict_bound(
        lambda rid: RESERVATION_ID.fullmatch(rid) is not None,
        "1 to 128 letters, digits and . _ : -, starting with a letter or digit",
    ),
]
"""The id a new reservation is made under."""
MAX_TTL_SECONDS = 30 * 24 * 3600
"""The longest a reservation may be asked to last. An item holds it for at most its own
`max_ttl_seconds` (7 days by default): a longer ask is held that long, as it always was, so
that a checkout configured to hold stock longer than some item allows still checks out."""
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=PRINTABLE),
    SHOWN_AS_WRITTEN,
]
Reason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=PRINTABLE),
    SHOWN_AS_WRITTEN,
]


class Reservation(BaseModel):
    reservation_id: str
    quantity: int
    expires_at: datetime


class Settlement(StrEnum):
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    RETURNED = "RETURNED"


class Settled(BaseModel):
    """What became of a reservation that is no longer held."""

    settlement: Settlement
    quantity: int = 0


class Adjustment(BaseModel):
    delta: int
    reason: str
    at: datetime


class InventoryState(BaseModel):
    sku: str
    name: str
    unit_price: int | None = Field(
        default=None,
        description="What a customer pays for a unit (minor units), set by a restock; a "
        "customer's cart takes it, and cannot add the item while it has none.",
    )
    on_hand: int = 0
    sold: int = 0
    reservations: list[Reservation] = Field(default_factory=list)
    settled: dict[str, Settled] = Field(default_factory=dict)
    adjustments: list[Adjustment] = Field(default_factory=list)

    @property
    def reserved(self) -> int:
        return sum(r.quantity for r in self.reservations)

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def reservation(self, reservation_id: str) -> Reservation | None:
        return next((r for r in self.reservations if r.reservation_id == reservation_id), None)


class InventoryOptions(BaseModel):
    default_ttl_seconds: float = Field(default=15 * 60, gt=0)
    max_ttl_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    settled_memory: int = Field(
        default=500, ge=1, description="How many settled reservation ids are remembered."
    )
    adjustment_memory: int = Field(default=20, ge=1)
    max_reservations: int = Field(
        default=1000,
        ge=1,
        description="Reservations held at once: each is kept in the item's state, which must "
        "stay far under Temporal's 2 MB payload limit; one more is LIMIT_REACHED.",
    )


class Restock(BaseModel, extra="forbid"):
    quantity: Quantity
    name: Name | None = None
    unit_price: UnitPrice | None = None


class SetPrice(BaseModel, extra="forbid"):
    unit_price: UnitPrice


class AdjustStock(BaseModel, extra="forbid"):
    # Not zero, at the API's edge too: an adjustment of nothing was accepted unwaited, and
    # refused only by the item, its refusal stored. Runs refuse it in `adjust_stock`.
    delta: Annotated[
        int,
        Field(ge=-(10**9), le=10**9, strict=True),
        strict_bound(lambda delta: delta != 0, "must not be zero", since=AT_THE_EDGE),
    ]
    reason: Reason


class ReserveStock(BaseModel, extra="forbid"):
    reservation_id: ReservationId
    quantity: Quantity
    ttl_seconds: (
        Annotated[
            float,
            Field(gt=0),
            strict_bound(
                lambda ttl: math.isfinite(ttl) and ttl <= MAX_TTL_SECONDS,
                f"at most {MAX_TTL_SECONDS} seconds",
            ),
        ]
        | None
    ) = None


class ReservationCommand(BaseModel, extra="forbid"):
    reservation_id: HeldReservationId


inventory: EntityType[InventoryState, InventoryOptions] = EntityType(
    "inventory", state=InventoryState, options=InventoryOptions
)

Ctx = CommandContext[InventoryOptions]


def _remember(
    settled: dict[str, Settled], reservation_id: str, record: Settled, options: InventoryOptions
) -> dict[str, Settled]:
    """The settled reservations with this one as the latest, the oldest forgotten first."""
    remembered = {k: v for k, v in settled.items() if k != reservation_id}
    remembered[reservation_id] = record
    while len(remembered) > options.settled_memory:
        del remembered[next(iter(remembered))]
    return remembered


def _without(state: InventoryState, reservation_id: str) -> list[Reservation]:
    return [r for r in state.reservations if r.reservation_id != reservation_id]


@inventory.command(Restock, creates=True, name="restock")
def restock(state: InventoryState | None, cmd: Restock, ctx: Ctx) -> InventoryState:
    """Receive units; the first restock of a SKU creates its item."""
    if state is None:
        state = InventoryState(sku=ctx.entity_id, name=cmd.name or ctx.entity_id)
    if state.on_hand + state.sold + cmd.quantity > MAX_MONEY:
        # Counts are Longs, which promise 2^53 - 1 at most: received ever, sold included.
        raise Rejected(ErrorCode.LIMIT_REACHED, f"an item counts at most {MAX_MONEY} units")
    priced = {} if cmd.unit_price is None else {"unit_price": cmd.unit_price}
    return state.model_copy(
        update={"on_hand": state.on_hand + cmd.quantity, "name": cmd.name or state.name, **priced}
    )


@inventory.command(SetPrice, name="setPrice")
def set_price(state: InventoryState, cmd: SetPrice, ctx: Ctx) -> InventoryState:
    """Set what a customer's cart pays for a unit from now on; lines already in carts keep
    theirs."""
    return state.model_copy(update={"unit_price": cmd.unit_price})


@inventory.command(AdjustStock, name="adjustStock")
def adjust_stock(state: InventoryState, cmd: AdjustStock, ctx: Ctx) -> InventoryState:
    """Correct the count (a stocktake, damage), never below what is reserved."""
    if cmd.delta == 0:
        raise Rejected(ErrorCode.INVALID_INPUT, "delta: must not be zero")
    if state.available + cmd.delta < 0:
        raise Rejected(
            ErrorCode.INSUFFICIENT_STOCK,
            f"cannot remove {-cmd.delta}: {state.available} available, {state.reserved} reserved",
        )
    if state.on_hand + state.sold + cmd.delta > MAX_MONEY:
        raise Rejected(ErrorCode.LIMIT_REACHED, f"an item counts at most {MAX_MONEY} units")
    adjustments = [*state.adjustments, Adjustment(delta=cmd.delta, reason=cmd.reason, at=ctx.now)]
    return state.model_copy(
        update={
            "on_hand": state.on_hand + cmd.delta,
            "adjustments": adjustments[-ctx.options.adjustment_memory :],
        }
    )


@inventory.command(ReserveStock, name="reserveStock")
def reserve_stock(state: InventoryState, cmd: ReserveStock, ctx: Ctx) -> InventoryState:
    """Hold units for a while; a repeated reservation id holds them once."""
    held = state.reservation(cmd.reservation_id)
    if held is not None:
        if held.quantity != cmd.quantity:
            raise Rejected(
                ErrorCode.CONFLICT,
                f"reservation {cmd.reservation_id} already holds {held.quantity}",
            )
        return state
    if cmd.reservation_id in state.settled:
        settled = state.settled[cmd.reservation_id].settlement.value.lower()
        raise Rejected(ErrorCode.CONFLICT, f"reservation {cmd.reservation_id} was {settled}")
    if len(state.reservations) >= ctx.options.max_reservations:
        raise Rejected(
            ErrorCode.LIMIT_REACHED,
            f"{state.sku} holds {len(state.reservations)} reservations, its most; "
            "settle some first",
        )
    if cmd.quantity > state.available:
        raise Rejected(
            ErrorCode.INSUFFICIENT_STOCK,
            f"{state.available} of {state.sku} available, {cmd.quantity} requested",
        )
    ttl = min(cmd.ttl_seconds or ctx.options.default_ttl_seconds, ctx.options.max_ttl_seconds)
    reservation = Reservation(
        reservation_id=cmd.reservation_id,
        quantity=cmd.quantity,
        expires_at=ctx.now + timedelta(seconds=ttl),
    )
    return state.model_copy(update={"reservations": [*state.reservations, reservation]})


@inventory.command(ReservationCommand, name="releaseReservation")
def release_reservation(state: InventoryState, cmd: ReservationCommand, ctx: Ctx) -> InventoryState:
    """Give held units back. Releasing an unknown id remembers it, so a reservation that
    arrives late under that id is refused; releasing a settled one changes nothing."""
    held = state.reservation(cmd.reservation_id)
    if held is None and cmd.reservation_id in state.settled:
        return state
    settled = Settled(settlement=Settlement.RELEASED, quantity=held.quantity if held else 0)
    return state.model_copy(
        update={
            "reservations": _without(state, cmd.reservation_id),
            "settled": _remember(state.settled, cmd.reservation_id, settled, ctx.options),
        }
    )


@inventory.command(ReservationCommand, name="commitReservation")
def commit_reservation(state: InventoryState, cmd: ReservationCommand, ctx: Ctx) -> InventoryState:
    """Turn held units into a sale: they leave the stock for good."""
    held = state.reservation(cmd.reservation_id)
    if held is None:
        settled = state.settled.get(cmd.reservation_id)
        if settled is not None and settled.settlement is Settlement.COMMITTED:
            return state
        what = settled.settlement.value.lower() if settled else "unknown"
        raise Rejected(ErrorCode.INVALID_TRANSITION, f"reservation {cmd.reservation_id} is {what}")
    settled = Settled(settlement=Settlement.COMMITTED, quantity=held.quantity)
    return state.model_copy(
        update={
            "on_hand": state.on_hand - held.quantity,
            "sold": state.sold + held.quantity,
            "reservations": _without(state, cmd.reservation_id),
            "settled": _remember(state.settled, cmd.reservation_id, settled, ctx.options),
        }
    )


@inventory.command(ReservationCommand, name="returnReservation")
def return_reservation(state: InventoryState, cmd: ReservationCommand, ctx: Ctx) -> InventoryState:
    """Take back a committed sale: its units return to stock. A reservation still held, or
    settled otherwise, is unchanged, since there is no sale to take back. One the item no
    longer remembers is refused: its sale, if it had one, may not have been taken back, and
    an item that answered "returned" would leave its units sold with no sign (a checkout's
    late compensation then ended COMPENSATED); its units are counted back with adjustStock.
    Runs begun before this rule (`RULES_1_PATCH`) changed nothing for it. Nor is one it was
    told to release without knowing it (remembered RELEASED with no units): it may have sold
    it and forgotten it, and an operator's retry of a checkout's refused return, after the
    saga's release of the same reservation, ended COMPENSATED with the units still sold.
    Runs begun before that rule (`RULES_2_PATCH`) took it for a release."""
    settled = state.settled.get(cmd.reservation_id)
    unknown = settled is None and state.reservation(cmd.reservation_id) is None
    released_unknown = (
        settled is not None and settled.settlement is Settlement.RELEASED and not settled.quantity
    )
    if (unknown and ctx.rules_from(1)) or (released_unknown and ctx.rules_from(2)):
        raise Rejected(
            ErrorCode.INVALID_TRANSITION,
            f"reservation {cmd.reservation_id} is not remembered (an item remembers its last "
            f"{ctx.options.settled_memory} settled reservations): a sale under it cannot be "
            "taken back here; count its units back with adjustStock",
        )
    if settled is None or settled.settlement is not Settlement.COMMITTED:
        return state
    returned = Settled(settlement=Settlement.RETURNED, quantity=settled.quantity)
    return state.model_copy(
        update={
            "on_hand": state.on_hand + settled.quantity,
            "sold": state.sold - settled.quantity,
            "settled": _remember(state.settled, cmd.reservation_id, returned, ctx.options),
        }
    )


def _next_expiry(state: InventoryState, options: InventoryOptions) -> datetime | None:
    return min((r.expires_at for r in state.reservations), default=None)


@inventory.timer(_next_expiry)
def expire_reservations(state: InventoryState, ctx: Ctx) -> InventoryState:
    """Reservations neither committed nor released in time give their units back."""
    remembered = state.settled
    for reservation in state.reservations:
        if reservation.expires_at <= ctx.now:
            record = Settled(settlement=Settlement.EXPIRED, quantity=reservation.quantity)
            remembered = _remember(remembered, reservation.reservation_id, record, ctx.options)
    return state.model_copy(
        update={
            "reservations": [r for r in state.reservations if r.expires_at > ctx.now],
            "settled": remembered,
        }
    )


inventory.permit(
    actions=[
        READ,
        restock,
        set_price,
        adjust_stock,
        reserve_stock,
        release_reservation,
        commit_reservation,
        return_reservation,
    ],
    customer=[READ],  # every customer may see the stock; only staff and services change it
)


inventory.listing(text=lambda s: [s.name], numbers={"available": lambda s: s.available})


@workflow.defn(name="InventoryItem")
class InventoryWorkflow(EntityWorkflow):
    """The InventoryItem actor."""

    entity = inventory

    @workflow.run
    async def run(self, input: EntityRunInput) -> Snapshot:
        return await self.run_entity()
