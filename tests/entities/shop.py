"""A customer's-eye driver for carts, stock and accounts in tests: commands go through the
gateway as the API sends them, reads are live."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.gateway import Consistency, EntityGateway, Receipt
from entities.account import AccountState
from entities.cart import CartState
from entities.checkout import CheckoutState
from entities.checkout_input import checkout_workflow_id
from entities.errors import ErrorCode, TenureError
from entities.inventory import InventoryState
from tests.conftest import WorkerFactory
from workers.cache import CachedSnapshot, SnapshotCache
from workers.settings import Settings

T = TypeVar("T")

FAST_STEP = {
    "timeout_seconds": 10,
    "attempts": 3,
    "initial_interval_seconds": 0.1,
    "maximum_interval_seconds": 0.5,
}
FAST_COMPENSATION = {**FAST_STEP, "attempts": 0}


def shop_settings(
    settings: Settings, *, checkout: dict[str, Any] | None = None, **entity_options: Any
) -> Settings:
    """`settings` with checkouts that retry quickly, plus any entity options given
    (`cart={...}`, `inventory={...}`)."""
    cart = {
        "checkout": {"step": FAST_STEP, "compensation": FAST_COMPENSATION, **(checkout or {})},
        **entity_options.pop("cart", {}),
    }
    options = {**settings.entity_options, "cart": cart, **entity_options}
    return settings.model_copy(update={"entity_options": options})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 20.0
) -> T:
    """Ask `probe` until `ok` holds for its answer; fail with the last answer after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not there after {timeout}s: {value!r}")
        await asyncio.sleep(0.05)


async def send_as_a_client(
    gateway: EntityGateway,
    entity_type: str,
    entity_id: str,
    command: str,
    payload: dict[str, Any],
    *,
    key: str,
    wait: bool = False,
    sends: int = 5,
) -> Receipt:
    """Send a command as a client told to retry does: again with the same key while it is
    answered UNAVAILABLE (accepted, not applied within a command's wait), up to `sends`
    times; any other refusal, or the last UNAVAILABLE, is raised."""
    for attempt in range(sends):
        try:
            return await gateway.send(
                entity_type, entity_id, command, payload, idempotency_key=key, wait=wait
            )
        except TenureError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE or attempt == sends - 1:
                raise
    raise AssertionError("unreachable")


async def until_idle(client: Client, workflow_id: str, timeout: float = 10.0) -> None:
    """Once the workflow has no workflow task and no activity pending (a publish in flight
    would bring a task when it ends), so that the next worker to touch it finds nothing
    waiting."""
    handle = client.get_workflow_handle(workflow_id)
    await eventually(
        handle.describe,
        lambda d: (
            not d.raw_description.HasField("pending_workflow_task")
            and not d.raw_description.pending_activities
        ),
        timeout,
    )


async def until_cached(
    cache: SnapshotCache, entity_type: str, entity_id: str, revision: int, timeout: float = 15.0
) -> CachedSnapshot:
    """The entity's cache entry once it holds `revision` or a later one."""
    hit = await eventually(
        lambda: cache.get(entity_type, entity_id),
        lambda hit: hit is not None and hit.snapshot.revision >= revision,
        timeout,
    )
    assert hit is not None
    return hit


class Shop:
    """Accounts, stock and carts for one test, on its task queue."""

    def __init__(self, client: Client, cache: SnapshotCache, settings: Settings) -> None:
        self.client = client
        self.cache = cache
        self.settings = settings
        self.gateway = EntityGateway(client, cache, settings)

    def elsewhere(self, place: str = "elsewhere") -> Shop:
        """A shop whose new entities live on a task queue of their own (named after `place`),
        so that a test can stop and start their worker apart from the rest."""
        queue = f"{self.settings.task_queue}-{place}"
        return Shop(self.client, self.cache, self.settings.model_copy(update={"task_queue": queue}))

    async def unserved_account(self, run_worker: WorkerFactory, balance: int) -> tuple[Shop, str]:
        """An account opened elsewhere whose worker is then stopped: Temporal accepts its
        commands, nothing answers them until `run_worker(bank.settings)` runs again.
        Returns that shop (the bank) and the account id."""
        bank = self.elsewhere()
        async with run_worker(bank.settings):
            return bank, await bank.account(balance)

    async def send(self, entity_type: str, entity_id: str, command: str, **payload: Any) -> None:
        await self.gateway.send(entity_type, entity_id, command, payload, wait=True)

    async def account(self, balance: int, account_id: str | None = None) -> str:
        account_id = account_id or new_id("acct")
        await self.send("account", account_id, "open", owner_name="Ada", email="ada@example.com")
        await self.send("account", account_id, "verify")
        if balance:
            await self.send("account", account_id, "deposit", amount=balance)
        return account_id

    async def stock(self, units: int, sku: str | None = None) -> str:
        sku = sku or new_id("sku")
        await self.send("inventory", sku, "restock", quantity=units, name=f"Item {sku}")
        return sku

    async def cart(
        self, account_id: str, *lines: tuple[str, int, int], cart_id: str | None = None
    ) -> str:
        """A cart of (sku, quantity, unit price) lines."""
        cart_id = cart_id or new_id("cart")
        await self.send("cart", cart_id, "createCart", account_id=account_id)
        for sku, quantity, unit_price in lines:
            await self.send(
                "cart", cart_id, "addCartItem", sku=sku, quantity=quantity, unit_price=unit_price
            )
        return cart_id

    async def checkout(self, cart_id: str) -> str:
        """Start checking the cart out; its checkout id."""
        receipt = await self.gateway.send("cart", cart_id, "checkoutCart", {}, wait=True)
        assert receipt.read is not None and receipt.read.snapshot.state is not None
        checkout_id: str = receipt.read.snapshot.state["checkout_id"]
        return checkout_id

    async def finished(self, checkout_id: str, timeout: float = 60.0) -> CheckoutState:
        """The checkout's final state. The cart starts it just after taking the command, so
        it may not exist yet when asked."""
        handle = self.client.get_workflow_handle(
            checkout_workflow_id(checkout_id), result_type=CheckoutState
        )

        async def started() -> bool:
            try:
                await handle.describe()
            except RPCError as exc:
                if exc.status is RPCStatusCode.NOT_FOUND:
                    return False
                raise
            return True

        await eventually(started, bool, timeout=10)
        return await asyncio.wait_for(handle.result(), timeout)

    async def pending_attempt(self, checkout_id: str) -> int:
        """The attempt number of the checkout's activity in flight, 0 when there is none
        (or no checkout yet: the cart starts it after answering checkoutCart)."""
        handle = self.client.get_workflow_handle(checkout_workflow_id(checkout_id))
        try:
            pending = (await handle.describe()).raw_description.pending_activities
        except RPCError as exc:
            if exc.status is not RPCStatusCode.NOT_FOUND:
                raise
            return 0
        return max((activity.attempt for activity in pending), default=0)

    async def steps_taken(self, checkout_id: str, count: int) -> CheckoutState:
        """The checkout once it has taken at least `count` steps."""
        state = await eventually(
            lambda: self.progress(checkout_id),
            lambda p: p is not None and len(p.steps) >= count,
        )
        assert state is not None
        return state

    async def progress(self, checkout_id: str) -> CheckoutState | None:
        """The checkout's status query, or None while it cannot answer."""
        handle = self.client.get_workflow_handle(checkout_workflow_id(checkout_id))
        try:
            state: CheckoutState = await handle.query(
                "status", result_type=CheckoutState, rpc_timeout=timedelta(seconds=2)
            )
        except RPCError:
            return None
        return state

    async def _state(self, entity_type: str, entity_id: str) -> dict[str, Any]:
        read = await self.gateway.read(entity_type, entity_id, Consistency.LIVE)
        assert read is not None and read.snapshot.state is not None, (entity_type, entity_id)
        return read.snapshot.state

    async def balance(self, account_id: str) -> int:
        return AccountState.model_validate(await self._state("account", account_id)).balance

    async def account_state(self, account_id: str) -> AccountState:
        return AccountState.model_validate(await self._state("account", account_id))

    async def item(self, sku: str) -> InventoryState:
        return InventoryState.model_validate(await self._state("inventory", sku))

    async def cart_state(self, cart_id: str) -> CartState:
        return CartState.model_validate(await self._state("cart", cart_id))
