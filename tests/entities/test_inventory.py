"""InventoryItem: its rules as pure transitions, then reservations on real servers."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import Client

from entities.errors import ErrorCode, Rejected, TenureError
from entities.inventory import InventoryOptions, InventoryState, Settlement, inventory
from entities.runtime import CommandContext
from entities.runtime.entity import STRICTEST
from tests.conftest import WorkerFactory
from tests.entities.shop import Shop, eventually, shop_settings
from workers.cache import SnapshotCache
from workers.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OPTIONS = InventoryOptions(default_ttl_seconds=60, settled_memory=3, adjustment_memory=2)


def ctx(at: datetime = T0) -> CommandContext[InventoryOptions]:
    return CommandContext("sku-1", at, OPTIONS, "cmd")


def apply(
    state: InventoryState | None, command: str, /, at: datetime = T0, **payload: Any
) -> InventoryState:
    return inventory.apply(state, command, payload, ctx(at))


def rejected(state: InventoryState | None, command: str, /, **payload: Any) -> ErrorCode:
    with pytest.raises(Rejected) as info:
        apply(state, command, **payload)
    return info.value.code


def stocked(units: int = 10) -> InventoryState:
    return apply(None, "restock", quantity=units, name="Teapot")


def test_restock_creates_the_item_and_adds_units() -> None:
    state = stocked(10)
    assert (state.sku, state.name, state.on_hand, state.available) == ("sku-1", "Teapot", 10, 10)
    assert apply(state, "restock", quantity=5).on_hand == 15
    assert apply(None, "restock", quantity=1).name == "sku-1"
    assert rejected(state, "restock", quantity=0) is ErrorCode.INVALID_INPUT
    assert rejected(None, "reserveStock", reservation_id="r", quantity=1) is ErrorCode.NOT_FOUND


def test_adjustments_keep_a_reason_and_never_take_reserved_units() -> None:
    state = apply(stocked(10), "reserveStock", reservation_id="r1", quantity=6)
    state = apply(state, "adjustStock", delta=-4, reason="broken in transit")
    assert (state.on_hand, state.available) == (6, 0)
    assert rejected(state, "adjustStock", delta=-1, reason="lost") is ErrorCode.INSUFFICIENT_STOCK
    assert rejected(state, "adjustStock", delta=0, reason="none") is ErrorCode.INVALID_INPUT
    assert rejected(state, "adjustStock", delta=1, reason="") is ErrorCode.INVALID_INPUT
    state = apply(state, "adjustStock", delta=2, reason="found")
    state = apply(state, "adjustStock", delta=1, reason="found again")
    assert [(a.delta, a.reason) for a in state.adjustments] == [(2, "found"), (1, "found again")]


def test_a_reservation_is_idempotent_by_its_id_and_never_oversells() -> None:
    state = apply(stocked(5), "reserveStock", reservation_id="r1", quantity=3)
    assert (state.reserved, state.available) == (3, 2)
    assert apply(state, "reserveStock", reservation_id="r1", quantity=3) == state
    assert rejected(state, "reserveStock", reservation_id="r1", quantity=2) is ErrorCode.CONFLICT
    assert rejected(state, "reserveStock", reservation_id="r2", quantity=3) is (
        ErrorCode.INSUFFICIENT_STOCK
    )
    state = apply(state, "reserveStock", reservation_id="r2", quantity=2)
    assert state.available == 0


def test_release_commit_and_return() -> None:
    state = apply(stocked(5), "reserveStock", reservation_id="r1", quantity=3)
    released = apply(state, "releaseReservation", reservation_id="r1")
    assert (released.on_hand, released.available, released.reservations) == (5, 5, [])
    assert apply(released, "releaseReservation", reservation_id="r1") == released
    assert rejected(released, "commitReservation", reservation_id="r1") is (
        ErrorCode.INVALID_TRANSITION
    )
    assert rejected(released, "reserveStock", reservation_id="r1", quantity=1) is (
        ErrorCode.CONFLICT
    )

    sold = apply(state, "commitReservation", reservation_id="r1")
    assert (sold.on_hand, sold.sold, sold.available, sold.reservations) == (2, 3, 2, [])
    assert apply(sold, "commitReservation", reservation_id="r1") == sold
    assert apply(sold, "releaseReservation", reservation_id="r1") == sold

    returned = apply(sold, "returnReservation", reservation_id="r1")
    assert (returned.on_hand, returned.sold) == (5, 0)
    assert apply(returned, "returnReservation", reservation_id="r1") == returned
    # nothing was sold under an active reservation, so there is nothing to return
    assert apply(state, "returnReservation", reservation_id="r1") == state


def test_releasing_an_unknown_reservation_fences_off_a_late_one() -> None:
    state = apply(stocked(5), "releaseReservation", reservation_id="late")
    assert rejected(state, "reserveStock", reservation_id="late", quantity=1) is (
        ErrorCode.CONFLICT
    )
    assert rejected(state, "commitReservation", reservation_id="never") is (
        ErrorCode.INVALID_TRANSITION
    )


def test_a_sale_the_item_no_longer_remembers_is_not_taken_back_as_if_returned() -> None:
    """Its return is refused, so that a checkout's late compensation is FAILED for an
    operator: the item answered "returned" and changed nothing, and the units stayed sold."""
    sold = apply(
        apply(stocked(5), "reserveStock", reservation_id="r1", quantity=2),
        "commitReservation",
        reservation_id="r1",
    )
    state = sold
    for n in range(OPTIONS.settled_memory):
        state = apply(state, "releaseReservation", reservation_id=f"other-{n}")
    assert "r1" not in state.settled
    with pytest.raises(Rejected) as info:
        apply(state, "returnReservation", reservation_id="r1")
    assert info.value.code is ErrorCode.INVALID_TRANSITION
    assert "not remembered" in info.value.message and "adjustStock" in info.value.message
    assert rejected(stocked(5), "returnReservation", reservation_id="never-made") is (
        ErrorCode.INVALID_TRANSITION
    )
    # A run begun before the rule changed nothing, and replays so.
    before = CommandContext("sku-1", T0, OPTIONS, "cmd", rules_from=lambda level: level < 1)
    assert inventory.apply(state, "returnReservation", {"reservation_id": "r1"}, before) == state
    # Remembered, a sale still comes back once; a reservation released or still held has
    # nothing to take back.
    assert apply(sold, "returnReservation", reservation_id="r1").on_hand == 5
    held = apply(stocked(5), "reserveStock", reservation_id="r2", quantity=1)
    assert apply(held, "returnReservation", reservation_id="r2") == held
    released = apply(held, "releaseReservation", reservation_id="r2")
    assert apply(released, "returnReservation", reservation_id="r2") == released


def test_a_sale_released_after_the_item_forgot_it_is_not_taken_back_as_if_released() -> None:
    """A checkout's return refused (the item had forgotten the sale) is followed by the
    saga's release of the same reservation, which the item, not knowing it, remembers as
    released with no units. An operator's retry of the return was then answered "nothing to
    take back": the checkout ended COMPENSATED, the customer refunded, the units still sold."""
    state = apply(
        apply(stocked(5), "reserveStock", reservation_id="r1", quantity=2),
        "commitReservation",
        reservation_id="r1",
    )
    for n in range(OPTIONS.settled_memory):
        state = apply(state, "releaseReservation", reservation_id=f"other-{n}")
    assert rejected(state, "returnReservation", reservation_id="r1") is (
        ErrorCode.INVALID_TRANSITION
    )
    state = apply(state, "releaseReservation", reservation_id="r1")
    assert state.settled["r1"].settlement is Settlement.RELEASED
    with pytest.raises(Rejected) as info:
        apply(state, "returnReservation", reservation_id="r1")
    assert info.value.code is ErrorCode.INVALID_TRANSITION
    assert "adjustStock" in info.value.message
    assert state.sold == 2  # counted back by hand (adjustStock), as the runbook says
    # A run begun before the rule took it for a release, and replays so.
    before = CommandContext("sku-1", T0, OPTIONS, "cmd", rules_from=lambda level: level < 2)
    assert inventory.apply(state, "returnReservation", {"reservation_id": "r1"}, before) == state


def test_settled_reservation_ids_are_remembered_up_to_a_bound() -> None:
    state = stocked(10)
    for n in range(5):
        state = apply(state, "releaseReservation", reservation_id=f"r{n}")
    assert list(state.settled) == ["r2", "r3", "r4"]


def test_reservations_expire_at_their_ttl() -> None:
    state = apply(stocked(5), "reserveStock", reservation_id="short", quantity=2, ttl_seconds=10)
    state = apply(state, "reserveStock", reservation_id="long", quantity=1)
    assert inventory.deadline(state, OPTIONS) == T0 + timedelta(seconds=10)
    expired = inventory.fire_deadline(state, ctx(T0 + timedelta(seconds=10)))
    assert [r.reservation_id for r in expired.reservations] == ["long"]
    assert expired.available == 4
    assert expired.settled["short"].settlement is Settlement.EXPIRED
    assert inventory.deadline(expired, OPTIONS) == T0 + timedelta(seconds=60)
    assert rejected(expired, "commitReservation", reservation_id="short") is (
        ErrorCode.INVALID_TRANSITION
    )


def test_no_sequence_of_commands_oversells() -> None:
    rng = random.Random(11)
    state = stocked(20)
    restocked = 20
    for step in range(2000):
        rid = f"r{rng.randrange(30)}"
        ops: list[tuple[str, dict[str, Any]]] = [
            ("reserveStock", {"reservation_id": rid, "quantity": rng.randint(1, 8)}),
            ("releaseReservation", {"reservation_id": rid}),
            ("commitReservation", {"reservation_id": rid}),
            ("returnReservation", {"reservation_id": rid}),
            ("restock", {"quantity": rng.randint(1, 3)}),
            ("adjustStock", {"delta": rng.randint(-3, 3) or 1, "reason": "count"}),
        ]
        name, payload = rng.choice(ops)
        at = T0 + timedelta(seconds=step)
        try:
            state = apply(state, name, at, **payload)
        except Rejected:
            continue
        if name == "restock":
            restocked += payload["quantity"]
        if name == "adjustStock":
            restocked += payload["delta"]
        if rng.random() < 0.05 and inventory.deadline(state, OPTIONS) is not None:
            state = inventory.fire_deadline(state, ctx(at + timedelta(seconds=60)))
        assert state.available >= 0
        assert state.on_hand + state.sold == restocked


async def test_a_reservation_expires_on_a_real_server_and_its_units_come_back(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    shop = Shop(temporal_client, cache, shop_settings(settings))
    async with run_worker():
        sku = await shop.stock(5)
        await shop.send(
            "inventory", sku, "reserveStock", reservation_id="r1", quantity=3, ttl_seconds=0.5
        )
        await shop.send(
            "inventory", sku, "reserveStock", reservation_id="r2", quantity=1, ttl_seconds=600
        )
        assert (await shop.item(sku)).available == 1
        expired = await eventually(lambda: shop.item(sku), lambda s: s.available == 4, 10)
        assert [r.reservation_id for r in expired.reservations] == ["r2"]
        assert expired.settled["r1"].settlement is Settlement.EXPIRED
        with pytest.raises(TenureError) as info:
            await shop.send("inventory", sku, "commitReservation", reservation_id="r1")
        assert info.value.code is ErrorCode.INVALID_TRANSITION
        await shop.send("inventory", sku, "commitReservation", reservation_id="r2")
        assert (await shop.item(sku)).model_dump(include={"on_hand", "sold"}) == {
            "on_hand": 4,
            "sold": 1,
        }


async def test_a_repeated_reservation_reserves_once_on_a_real_server(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    shop = Shop(temporal_client, cache, shop_settings(settings))
    async with run_worker():
        sku = await shop.stock(5)
        # different idempotency keys, same reservation id: the entity itself dedupes
        for _ in range(3):
            await shop.send("inventory", sku, "reserveStock", reservation_id="r1", quantity=2)
        assert (await shop.item(sku)).available == 3


def test_counts_stay_within_what_a_long_promises() -> None:
    almost = stocked(1).model_copy(update={"on_hand": 2**53 - 11, "sold": 10})
    assert rejected(almost, "restock", quantity=1) == ErrorCode.LIMIT_REACHED
    assert rejected(almost, "adjustStock", delta=1, reason="found one") == ErrorCode.LIMIT_REACHED
    assert apply(almost, "adjustStock", delta=-1, reason="lost one").on_hand == 2**53 - 12


def test_an_adjustment_of_nothing_is_refused_at_the_edge_and_by_runs_as_before() -> None:
    """Refused where a command comes in (nothing stored), and in a run by its transition,
    NOT_FOUND or INVALID_INPUT as it always was: the bound is the edge's alone."""
    with pytest.raises(Rejected) as at_the_edge:
        inventory.parse("adjustStock", {"delta": 0, "reason": "x"})
    assert at_the_edge.value.code is ErrorCode.INVALID_INPUT
    in_a_run = inventory.parse("adjustStock", {"delta": 0, "reason": "x"}, strict=STRICTEST)
    assert in_a_run.model_dump() == {"delta": 0, "reason": "x"}
