"""Checkout sagas: carts checked out over GraphQL against inventory items and accounts, and
what the same number of raw signals would have cost.

Setting up the stock, accounts and carts is not measured, so it goes through the gateway's
own delivery path (`workers.delivery.CommandDelivery`) from the benchmark process.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from bench.checks import QUERY_TIMEOUT
from bench.scenarios import Bench, Result
from entities import catalog
from entities.checkout import CheckoutState
from entities.checkout_input import checkout_workflow_id
from entities.runtime.envelope import CommandEnvelope, Snapshot
from entities.runtime.saga import SagaStatus
from workers.cache import SnapshotCache
from workers.delivery import CommandDelivery

CHECKOUT = """mutation($id: ID!, $key: String) {
  checkoutCart(cartId: $id, idempotencyKey: $key) { checkoutId } }"""
SKUS = 10
LINES = 2
UNIT_PRICE = 100
FUNDS = 1_000_000
# The cart's checkout command, then per line a reservation and a commit, one withdrawal and
# the saga's report to the cart: what a checkout costs in commands, each a raw signal.
SIGNALS_PER_CHECKOUT = 1 + 2 * LINES + 1 + 1
ACCOUNT_REVISION = 4  # open, verify, deposit, the saga's withdrawal
LOAD_POLL = 0.05
"""While a checkout's workflow is not started yet under load: asked again this often (a
NOT_FOUND answer costs the server little, but 32 clients asking every 5 ms, as the idle row
does, would cost it more than the checkouts it measures)."""
RESULT_TIMEOUT = timedelta(seconds=60)


class Sender:
    """Sends commands through the gateway's own delivery path and reads snapshots, for setup
    and checks that are not measured."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.delivery = CommandDelivery(bench.stack.client, bench.stack.settings)
        self.cache = SnapshotCache(bench.stack.redis, bench.stack.settings.redis_prefix)
        self.types = catalog.entity_types()

    async def __call__(
        self, entity_type: str, entity_id: str, command: str, payload: dict[str, Any]
    ) -> None:
        key = "-".join([entity_type, entity_id, command, *map(str, payload.values())])
        envelope = CommandEnvelope(command_id=key[:128], name=command, payload=payload)
        await self.delivery.deliver(self.types[entity_type], entity_id, envelope)

    async def snapshot(self, entity_type: str, entity_id: str) -> Snapshot:
        handle = self.bench.stack.client.get_workflow_handle(f"{entity_type}:{entity_id}")
        result: Snapshot = await handle.query(
            "snapshot", result_type=Snapshot, rpc_timeout=QUERY_TIMEOUT
        )
        return result


async def checkouts(bench: Bench) -> Result:
    send = Sender(bench)
    count = bench.scale.checkouts
    tag = bench.tag
    skus = [f"{tag}-sku{i}" for i in range(SKUS)]
    carts = [f"{tag}-cart{i}" for i in range(count)]
    accounts = [f"{tag}-buyer{i}" for i in range(count)]
    lines = [[skus[(i + j) % SKUS] for j in range(LINES)] for i in range(count)]
    stock = count * LINES

    await bench.setup(SKUS, lambda i: send("inventory", skus[i], "restock", {"quantity": stock}))

    async def prepare(i: int) -> None:
        account = accounts[i]
        await send("account", account, "open", {"owner_name": "Buyer", "email": "b@example.com"})
        await send("account", account, "verify", {})
        await send("account", account, "deposit", {"amount": FUNDS})
        await send("cart", carts[i], "createCart", {"account_id": account})
        for sku in lines[i]:
            await send(
                "cart",
                carts[i],
                "addCartItem",
                {
                    "sku": sku,
                    "quantity": 1,
                    "unit_price": UNIT_PRICE,
                },
            )

    await bench.setup(count, prepare)

    async def check_out(i: int) -> None:
        """One customer: checks a cart out and waits for its order, as the idle row's does;
        the client's next checkout starts after it. Its latency is the customer's: from the
        command sent to the saga's end."""
        data = await bench.gql.command(CHECKOUT, id=carts[i], key=f"{tag}-checkout-{i}")
        checkout_id = data["checkoutCart"]["checkoutId"]
        state = await saga_ended(bench.stack.client, checkout_id, poll=LOAD_POLL)
        if state.status is not SagaStatus.COMPLETED:
            raise RuntimeError(f"checkout {checkout_id} ended {state.status.value}")

    window = bench.stack.window(bench.stack.worker)
    with window:
        started = time.perf_counter()
        measured = await bench.drive(check_out, count)
        elapsed = time.perf_counter() - started
    problems: list[str] = []
    sold = {sku: sum(cart_lines.count(sku) for cart_lines in lines) for sku in skus}
    try:
        problems += await _check_accounts(send, accounts, FUNDS - LINES * UNIT_PRICE)
        problems += await _check_stock(send, stock, sold)
    except RPCError as exc:
        problems.append(f"accounts and stock could not be checked: {exc}")
    return Result(
        "checkouts",
        "checkout sagas",
        "checkouts",
        measured,
        baseline="raw_signals",
        signals_per_op=SIGNALS_PER_CHECKOUT,
        ops_per_s=measured.ops / elapsed,
        window=window,
        problems=problems[:5],
        details={
            "lines_per_checkout": LINES,
            "skus": SKUS,
            "requests_per_s": round(measured.ops_per_s, 1),
        },
    )


async def saga_ended(client: Client, checkout_id: str, poll: float) -> CheckoutState:
    """The checkout's final state, as soon as its workflow returns it: the run ends in the
    workflow task that sets the status, so this is when the status stops being RUNNING. The
    cart starts the workflow just after acknowledging the command, so it may not exist yet:
    asked again every `poll` seconds until it does."""
    handle: WorkflowHandle[Any, CheckoutState] = client.get_workflow_handle(
        checkout_workflow_id(checkout_id), result_type=CheckoutState
    )
    while True:
        try:
            return await handle.result(rpc_timeout=RESULT_TIMEOUT)
        except RPCError as exc:
            if exc.status is not RPCStatusCode.NOT_FOUND:
                raise
            await asyncio.sleep(poll)


async def _check_accounts(send: Sender, accounts: list[str], balance: int) -> list[str]:
    problems = []
    for account_id in accounts:
        snapshot = await send.snapshot("account", account_id)
        got = (snapshot.state or {}).get("balance")
        if got != balance or snapshot.revision != ACCOUNT_REVISION:
            problems.append(
                f"account {account_id}: balance {got} revision {snapshot.revision}, "
                f"expected {balance} and {ACCOUNT_REVISION}"
            )
    return problems


async def _check_stock(send: Sender, stock: int, sold: dict[str, int]) -> list[str]:
    problems = []
    for sku, units in sold.items():
        state = (await send.snapshot("inventory", sku)).state or {}
        if state.get("sold") != units or state.get("on_hand") != stock - units:
            problems.append(
                f"inventory {sku}: sold {state.get('sold')} on hand {state.get('on_hand')}, "
                f"expected {units} and {stock - units}"
            )
    return problems
