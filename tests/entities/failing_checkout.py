"""A checkout driven to FAILED on real servers: its refund refused, for tests of what an
operator does next."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from entities.checkout import CheckoutState
from entities.errors import ErrorCode
from entities.runtime.entity import MAX_MONEY
from entities.runtime.saga import SagaStatus
from tests.conftest import WorkerFactory
from tests.entities.shop import Shop, eventually

BALANCE = 1_000
PRICE = 300  # two units: the checkout's total is 600
# Lands between the withdrawal and its refund, which would then lift the balance past the
# most an account holds: the refund is refused (LIMIT_REACHED).
FILLER = MAX_MONEY - BALANCE + 1
MOST_MOVED = 10**15  # a deposit or a withdrawal moves at most this much


def filler_parts() -> list[int]:
    whole, rest = divmod(FILLER, MOST_MOVED)
    return [MOST_MOVED] * whole + [rest]


@dataclass
class FailedCheckout:
    shop: Shop
    bank: Shop
    account_id: str
    sku: str
    cart_id: str
    checkout_id: str
    state: CheckoutState

    async def fix(self) -> None:
        """Take the filler out again, so that the refund fits."""
        for amount in filler_parts():
            await self.bank.send("account", self.account_id, "withdraw", amount=amount)


@contextlib.asynccontextmanager
async def failed_checkout(
    shop: Shop,
    run_worker: WorkerFactory,
    cart_id: str | None = None,
    while_running: Callable[[str], Awaitable[None]] | None = None,
) -> AsyncIterator[FailedCheckout]:
    """A checkout whose refund was refused, FAILED and waiting for an operator, with the
    workers of its entities running. The account's worker is down while the saga withdraws,
    so the withdrawal is delivered and then given up (UNAVAILABLE); a deposit sent meanwhile
    lands after it, and the refund after both. `while_running` is given the checkout id
    while its saga is still stuck at the withdrawal."""
    bank, account_id = await shop.unserved_account(run_worker, BALANCE)
    async with run_worker(shop.settings):
        sku = await shop.stock(5)
        cart_id = await _two_attempts(shop).cart(account_id, (sku, 2, PRICE), cart_id=cart_id)
        checkout_id = await shop.checkout(cart_id)
        await eventually(lambda: shop.pending_attempt(checkout_id), lambda n: n >= 2, 60)
        if while_running is not None:
            await while_running(checkout_id)
        for amount in filler_parts():
            await bank.gateway.send("account", account_id, "deposit", {"amount": amount})
        await eventually(
            lambda: shop.progress(checkout_id),
            lambda p: p is not None and p.failure_code == ErrorCode.UNAVAILABLE,
            60,
        )
        async with run_worker(bank.settings):
            state = await eventually(
                lambda: shop.progress(checkout_id),
                lambda p: p is not None and p.status is SagaStatus.FAILED,
                60,
            )
            assert state is not None
            yield FailedCheckout(shop, bank, account_id, sku, cart_id, checkout_id, state)


def _two_attempts(shop: Shop) -> Shop:
    """`shop`, making carts whose checkouts give a step up after two attempts, not three:
    the withdrawal sent to an account nobody serves is delivered in the first and waited for
    in the second, and each attempt waits out the delivery's whole wait (6 s here), which
    took a third of each test's time."""
    options = copy.deepcopy(shop.settings.entity_options)
    checkout = options.setdefault("cart", {}).setdefault("checkout", {})
    checkout["step"] = {**checkout.get("step", {}), "attempts": 2}
    return Shop(
        shop.client, shop.cache, shop.settings.model_copy(update={"entity_options": options})
    )
