"""Cart: its rules as pure transitions, then abandonment and checkout on real servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import Client

from entities.cart import CartOptions, CartState, CartStatus, cart
from entities.checkout_input import CheckoutInput
from entities.errors import ErrorCode, Rejected
from entities.runtime import CommandContext
from entities.runtime.effects import StartWorkflow
from entities.runtime.envelope import RuntimeOptions
from entities.runtime.saga import SagaStatus
from tests.conftest import WorkerFactory
from tests.entities.shop import Shop, eventually, shop_settings
from workers.cache import SnapshotCache
from workers.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OPTIONS = CartOptions(abandon_after_seconds=3600)


def ctx(at: datetime = T0) -> CommandContext[CartOptions]:
    return CommandContext("c1", at, OPTIONS, "cmd")


def apply(state: CartState | None, name: str, at: datetime = T0, **payload: Any) -> CartState:
    return cart.apply(state, name, payload, ctx(at))


def rejected(state: CartState | None, name: str, **payload: Any) -> ErrorCode:
    with pytest.raises(Rejected) as info:
        apply(state, name, **payload)
    return info.value.code


def with_lines(*lines: tuple[str, int, int]) -> CartState:
    state = apply(None, "createCart", account_id="a1")
    for sku, quantity, unit_price in lines:
        state = apply(state, "addCartItem", sku=sku, quantity=quantity, unit_price=unit_price)
    return state


def checking_out() -> CartState:
    return apply(with_lines(("s1", 2, 300)), "checkoutCart")


def test_adding_a_sku_twice_adds_units_at_the_latest_price() -> None:
    state = with_lines(("s1", 2, 300), ("s2", 1, 50), ("s1", 3, 250))
    assert [(x.sku, x.quantity, x.unit_price) for x in state.lines] == [
        ("s1", 5, 250),
        ("s2", 1, 50),
    ]
    assert state.total == 5 * 250 + 50


def test_line_changes() -> None:
    state = with_lines(("s1", 2, 300), ("s2", 1, 50))
    assert [
        x.quantity for x in apply(state, "setCartItemQuantity", sku="s1", quantity=7).lines
    ] == [
        7,
        1,
    ]
    assert [x.sku for x in apply(state, "setCartItemQuantity", sku="s1", quantity=0).lines] == [
        "s2"
    ]
    assert [x.sku for x in apply(state, "removeCartItem", sku="s2").lines] == ["s1"]
    assert apply(state, "removeCartItem", sku="absent").lines == state.lines
    assert apply(state, "clearCart").lines == []
    assert rejected(state, "setCartItemQuantity", sku="absent", quantity=1) is ErrorCode.NOT_FOUND
    assert rejected(state, "addCartItem", sku="s1", quantity=0, unit_price=1) is (
        ErrorCode.INVALID_INPUT
    )
    assert rejected(state, "addCartItem", sku="s1", quantity=1, unit_price=-1) is (
        ErrorCode.INVALID_INPUT
    )
    assert rejected(state, "addCartItem", sku="no spaces", quantity=1, unit_price=1) is (
        ErrorCode.INVALID_INPUT
    )
    assert rejected(None, "addCartItem", sku="s1", quantity=1, unit_price=1) is (
        ErrorCode.NOT_FOUND
    )
    assert rejected(state, "createCart", account_id="a1") is ErrorCode.ALREADY_EXISTS


def test_checkout_starts_the_saga_with_an_id_from_the_cart_and_attempt() -> None:
    state = with_lines(("s1", 2, 300))
    context = ctx()
    after = cart.apply(state, "checkoutCart", {}, context)
    assert after.status is CartStatus.CHECKING_OUT
    assert after.checkout_id == "c1-1"
    [effect] = context.effects
    assert isinstance(effect, StartWorkflow)
    assert (effect.workflow, effect.workflow_id) == ("Checkout", "checkout:c1-1")
    started = CheckoutInput.model_validate(effect.input)
    assert (started.cart_id, started.account_id) == ("c1", "a1")
    assert [(x.sku, x.quantity, x.unit_price) for x in started.lines] == [("s1", 2, 300)]

    failed = apply(after, "failCheckout", checkout_id="c1-1", code="X", reason="no")
    assert (failed.status, failed.failure_code, failed.failure_reason) == (
        CartStatus.OPEN,
        "X",
        "no",
    )
    again = apply(failed, "checkoutCart")
    assert (again.checkout_id, again.failure_code) == ("c1-2", None)


def test_while_checking_out_the_lines_cannot_change() -> None:
    state = checking_out()
    changes: list[tuple[str, dict[str, Any]]] = [
        ("addCartItem", {"sku": "s2", "quantity": 1, "unit_price": 1}),
        ("removeCartItem", {"sku": "s1"}),
        ("setCartItemQuantity", {"sku": "s1", "quantity": 1}),
        ("clearCart", {}),
        ("checkoutCart", {}),
    ]
    for name, payload in changes:
        assert rejected(state, name, **payload) is ErrorCode.CHECKOUT_IN_PROGRESS


def test_only_the_running_checkout_settles_the_cart() -> None:
    state = checking_out()
    assert rejected(state, "completeCheckout", checkout_id="c1-9", order_id="o") is (
        ErrorCode.CONFLICT
    )
    assert rejected(with_lines(("s1", 1, 1)), "failCheckout", checkout_id="c1-1") is (
        ErrorCode.CONFLICT
    )
    done = apply(state, "completeCheckout", checkout_id="c1-1", order_id="o-1")
    assert (done.status, done.order_id) == (CartStatus.CHECKED_OUT, "o-1")
    assert cart.is_terminal(done)
    assert rejected(done, "addCartItem", sku="s2", quantity=1, unit_price=1) is (
        ErrorCode.INVALID_TRANSITION
    )


def test_an_idle_open_cart_is_abandoned_keeping_its_lines_and_revived_by_a_command() -> None:
    state = with_lines(("s1", 2, 300))
    due = cart.deadline(state, OPTIONS)
    assert due == T0 + timedelta(hours=1)
    assert cart.deadline(checking_out(), OPTIONS) is None
    abandoned = cart.fire_deadline(state, ctx(due))
    assert abandoned.status is CartStatus.ABANDONED
    assert abandoned.lines == state.lines
    assert cart.deadline(abandoned, OPTIONS) is None
    later = due + timedelta(days=3)
    revived = apply(abandoned, "addCartItem", at=later, sku="s2", quantity=1, unit_price=5)
    assert revived.status is CartStatus.OPEN
    assert [x.sku for x in revived.lines] == ["s1", "s2"]
    assert cart.deadline(revived, OPTIONS) == later + timedelta(hours=1)


async def test_abandonment_on_a_real_server_with_a_short_period(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    settings = shop_settings(settings, cart={"abandon_after_seconds": 1})
    shop = Shop(temporal_client, cache, settings)
    async with run_worker(settings):
        cart_id = await shop.cart("a1", ("s1", 2, 300))
        assert (await shop.cart_state(cart_id)).status is CartStatus.OPEN
        abandoned = await eventually(
            lambda: shop.cart_state(cart_id), lambda s: s.status is CartStatus.ABANDONED, 10
        )
        assert [(x.sku, x.quantity) for x in abandoned.lines] == [("s1", 2)]
        assert abandoned.abandoned_at is not None

        await shop.send("cart", cart_id, "setCartItemQuantity", sku="s1", quantity=3)
        revived = await shop.cart_state(cart_id)
        assert revived.status is CartStatus.OPEN
        assert [(x.sku, x.quantity) for x in revived.lines] == [("s1", 3)]
        # and the timer is armed again for the revived cart
        await eventually(
            lambda: shop.cart_state(cart_id), lambda s: s.status is CartStatus.ABANDONED, 10
        )


async def test_a_checkout_that_crosses_the_continue_as_new_threshold_still_starts(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    # createCart, addCartItem, checkoutCart: the third command ends the run, before the
    # saga has been started; the next run must start it.
    settings = shop_settings(settings).model_copy(
        update={"runtime": RuntimeOptions(max_commands_per_run=3)}
    )
    shop = Shop(temporal_client, cache, settings)
    async with run_worker(settings):
        account = await shop.account(1000)
        sku = await shop.stock(5)
        cart_id = await shop.cart(account, (sku, 1, 100))
        checkout_id = await shop.checkout(cart_id)
        assert (await shop.finished(checkout_id, timeout=20)).status is SagaStatus.COMPLETED
        assert (await shop.cart_state(cart_id)).status is CartStatus.CHECKED_OUT


def test_a_cart_total_stays_within_what_its_checkout_can_charge() -> None:
    """At most what one withdrawal takes (10^15): a larger total, which a cart once took, was
    refused by its checkout's withdrawal every time, after its stock was reserved."""
    big = 10**12  # the highest unit price
    state = apply(None, "createCart", account_id="acct")
    state = apply(state, "addCartItem", sku="s0", quantity=1000, unit_price=big)  # 10^15
    for refused in (
        {"sku": "s1", "quantity": 1, "unit_price": 1},
        {"sku": "s0", "quantity": 1001, "unit_price": big},
    ):
        assert rejected(state, "addCartItem", **refused) == ErrorCode.LIMIT_REACHED
    assert rejected(state, "setCartItemQuantity", sku="s0", quantity=1001) == (
        ErrorCode.LIMIT_REACHED
    )


def test_a_run_begun_before_the_charge_bound_keeps_to_what_a_long_promises() -> None:
    before = CommandContext("c1", T0, OPTIONS, "cmd", strict_inputs=2)
    big = 10**12
    state = cart.apply(None, "createCart", {"account_id": "acct"}, before)
    for n in range(9):
        line = {"sku": f"s{n}", "quantity": 1000, "unit_price": big}
        state = cart.apply(state, "addCartItem", line, before)
    with pytest.raises(Rejected) as refused:
        line = {"sku": "s9", "quantity": 1000, "unit_price": big}
        cart.apply(state, "addCartItem", line, before)
    assert refused.value.code == ErrorCode.LIMIT_REACHED
    assert sum(line.quantity * line.unit_price for line in state.lines) <= 2**53 - 1


def test_a_cleanup_discards_only_an_abandoned_cart_when_it_says_so() -> None:
    """A cleanup by a listing, which may lag, must not discard a cart its customer came
    back to: with `only_if_abandoned` an open cart is kept, refused INVALID_TRANSITION."""
    state = with_lines(("s1", 2, 300))
    assert rejected(state, "discardCart", only_if_abandoned=True) is ErrorCode.INVALID_TRANSITION
    due = cart.deadline(state, OPTIONS)
    assert due is not None
    abandoned = cart.fire_deadline(state, ctx(due))
    discarded = apply(abandoned, "discardCart", only_if_abandoned=True)
    assert discarded.status is CartStatus.DISCARDED and cart.is_terminal(discarded)
    assert apply(state, "discardCart").status is CartStatus.DISCARDED  # by its customer
    assert rejected(checking_out(), "discardCart") is ErrorCode.CHECKOUT_IN_PROGRESS
