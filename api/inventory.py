"""GraphQL binding of the InventoryItem entity."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import strawberry

from api.common import (
    CommandPayload,
    Consistency,
    EntityState,
    IdempotencyKey,
    Long,
    ReadConsistency,
    Wait,
    read_entity,
    read_fields,
    receipt_fields,
    send_command,
)
from api.context import Info
from api.gateway import EntityRead, Receipt
from api.pacing import paced
from api.read_plans import entity_read_field
from api.response_size import bounded
from entities import inventory as domain
from entities.inventory import InventoryOptions, InventoryState
from entities.runtime.entity import Command
from entities.runtime.policy import Role

ENTITY = domain.inventory.name


_DEFAULTS = InventoryOptions()  # the options of every item the API stocks


@strawberry.type(description="Units held for a while, until committed, released or expired.")
class Reservation:
    reservation_id: str
    quantity: Long
    expires_at: datetime


@strawberry.type(description="A correction of the count, with its reason.")
class StockAdjustment:
    delta: Long
    reason: str
    at: datetime


@strawberry.type(description="Stock of one SKU. `available` never goes below zero.")
class InventoryItem(EntityState):
    sku: str
    name: str
    unit_price: Long | None = strawberry.field(
        description="What a customer's cart pays for a unit; null until a restock sets it."
    )
    on_hand: Long = strawberry.field(description="Units in stock, reserved ones included.")
    reserved: Long
    available: Long = strawberry.field(description="On hand less reserved.")
    sold: Long = strawberry.field(description="Units sold through committed reservations.")
    adjustments: list[StockAdjustment] = bounded(
        _DEFAULTS.adjustment_memory, description="The latest ones."
    )
    held: strawberry.Private[list[Reservation]]

    @bounded(
        _DEFAULTS.max_reservations,
        description="The units held; empty for a customer, since a checkout's reservation "
        "is named after its cart.",
    )
    def reservations(self, info: Info) -> list[Reservation]:
        # Customers may read every item (the catalogue), not the carts holding its units.
        # Hidden rather than FORBIDDEN: a policy decides whole entities (`read`), not fields,
        # and a refused non-null field would null the whole item; so, like a sender's subject
        # in `history`, what is not the caller's is left out of an entity it may read.
        return [] if info.context.principal.role is Role.CUSTOMER else self.held

    @classmethod
    def from_read(cls, read: EntityRead) -> InventoryItem:
        state = InventoryState.model_validate(read.snapshot.state)
        return cls(
            **read_fields(read),
            sku=state.sku,
            name=state.name,
            unit_price=None if state.unit_price is None else Long(state.unit_price),
            on_hand=Long(state.on_hand),
            reserved=Long(state.reserved),
            available=Long(state.available),
            sold=Long(state.sold),
            held=paced(
                Reservation(
                    reservation_id=r.reservation_id,
                    quantity=Long(r.quantity),
                    expires_at=r.expires_at,
                )
                for r in state.reservations
            ),
            adjustments=paced(
                StockAdjustment(delta=Long(a.delta), reason=a.reason, at=a.at)
                for a in state.adjustments
            ),
        )


@strawberry.type(
    description="A command sent to an inventory item; `inventoryItem` is set when waited for."
)
class InventoryCommandPayload(CommandPayload):
    sku: str
    inventory_item: InventoryItem | None

    @classmethod
    def from_receipt(cls, receipt: Receipt) -> InventoryCommandPayload:
        return cls(
            sku=receipt.entity_id,
            **receipt_fields(receipt),
            inventory_item=InventoryItem.from_read(receipt.read) if receipt.read else None,
        )


async def _command(
    info: Info,
    sku: str,
    command: Command[Any, Any, Any],
    idempotency_key: str | None,
    wait: bool,
    **payload: object,
) -> InventoryCommandPayload:
    receipt = await send_command(info, command, sku, payload, idempotency_key, wait)
    return InventoryCommandPayload.from_receipt(receipt)


@strawberry.type
class InventoryQuery:
    @strawberry.field(description="An inventory item, or null when its SKU was never stocked.")
    async def inventory_item(
        self, info: Info, sku: str, consistency: ReadConsistency = Consistency.CACHED
    ) -> InventoryItem | None:
        read = await read_entity(info, ENTITY, sku, consistency)
        return InventoryItem.from_read(read) if read else None


entity_read_field("inventoryItem", ENTITY, id_argument="sku")


@strawberry.type
class InventoryMutation:
    @strawberry.mutation(description="Receive units; the first restock of a SKU creates it.")
    async def restock(
        self,
        info: Info,
        sku: str,
        quantity: Long,
        name: str | None = None,
        unit_price: Annotated[
            Long | None,
            strawberry.argument(
                description="What a customer pays for a unit from now on (minor units); "
                "unchanged when left out."
            ),
        ] = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        priced = {} if unit_price is None else {"unit_price": unit_price}
        return await _command(
            info, sku, domain.restock, idempotency_key, wait, quantity=quantity, name=name, **priced
        )

    @strawberry.mutation(
        description="Set what a customer's cart pays for a unit from now on; lines already in "
        "carts keep theirs."
    )
    async def set_price(
        self,
        info: Info,
        sku: str,
        unit_price: Long,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        return await _command(
            info, sku, domain.set_price, idempotency_key, wait, unit_price=unit_price
        )

    @strawberry.mutation(description="Correct the count, never below what is reserved.")
    async def adjust_stock(
        self,
        info: Info,
        sku: str,
        delta: Long,
        reason: str,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        return await _command(
            info, sku, domain.adjust_stock, idempotency_key, wait, delta=delta, reason=reason
        )

    @strawberry.mutation(
        description="Hold units until committed or released, or for `ttlSeconds`; "
        "a repeated reservation id holds them once."
    )
    async def reserve_stock(
        self,
        info: Info,
        sku: str,
        reservation_id: str,
        quantity: Long,
        ttl_seconds: float | None = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        return await _command(
            info,
            sku,
            domain.reserve_stock,
            idempotency_key,
            wait,
            reservation_id=reservation_id,
            quantity=quantity,
            ttl_seconds=ttl_seconds,
        )

    @strawberry.mutation(description="Give reserved units back.")
    async def release_reservation(
        self,
        info: Info,
        sku: str,
        reservation_id: str,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        return await _command(
            info,
            sku,
            domain.release_reservation,
            idempotency_key,
            wait,
            reservation_id=reservation_id,
        )

    @strawberry.mutation(description="Turn reserved units into a sale.")
    async def commit_reservation(
        self,
        info: Info,
        sku: str,
        reservation_id: str,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        return await _command(
            info,
            sku,
            domain.commit_reservation,
            idempotency_key,
            wait,
            reservation_id=reservation_id,
        )

    @strawberry.mutation(
        description="Take back a committed sale: its units return to stock. A reservation "
        "held or released has nothing to take back and is unchanged; one the item no longer "
        "remembers (it keeps its last 500 settlements by default) is INVALID_TRANSITION: count "
        "its units back with adjustStock."
    )
    async def return_reservation(
        self,
        info: Info,
        sku: str,
        reservation_id: str,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> InventoryCommandPayload | None:
        return await _command(
            info,
            sku,
            domain.return_reservation,
            idempotency_key,
            wait,
            reservation_id=reservation_id,
        )
