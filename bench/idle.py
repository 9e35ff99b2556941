"""Single operations on an idle stack: one client, one operation at a time, a pause after
each so that what it left running (snapshot publishes, a saga's report) is done before the
next starts. Latency, not throughput: a checkout of a two-line cart until its saga ends, a
`wait: true` deposit beside the raw SDK's update of a counter workflow, an account opened
with `wait: true`, and the raw SDK's start of a workflow with a start signal beside the
last."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import Client, WorkflowHandle

from bench.counter import WORKFLOW, CounterInput
from bench.graphql import DEPOSIT_WAIT, OPEN
from bench.load import Measured
from bench.sagas import CHECKOUT, FUNDS, UNIT_PRICE, Sender, saga_ended
from bench.scenarios import RPC_TIMEOUT, Bench, Result
from bench.stack import Window
from entities.runtime.saga import SagaStatus

WARM_UP = 5  # rounds run first and not counted: first workflow of a type, first connection
PAUSE = 0.05  # seconds between operations, untimed
CHECKOUT_PAUSE = 0.2  # after a checkout: the cart, the items and the account publish
POLL = 0.005  # while the checkout's workflow is not started yet
LINES = 2


@dataclass
class _Kind:
    """One kind of operation, timed alone: its latencies and the CPU the stack spent on it."""

    key: str
    title: str
    unit: str
    operation: Callable[[int], Awaitable[object]]
    window: Window
    pause: float = PAUSE
    baseline: str | None = None
    measured: Measured = field(default_factory=Measured)

    async def run_once(self, i: int, counted: bool) -> None:
        gc.collect()
        gc.disable()
        try:
            with self.window:
                started = time.perf_counter()
                try:
                    await self.operation(i)
                except Exception as exc:
                    self.measured.errors += 1
                    self.measured.first_error = (
                        self.measured.first_error or f"{type(exc).__name__}: {exc}"
                    )
                else:
                    latency = time.perf_counter() - started
                    if counted:
                        self.measured.latencies.append(latency)
                        self.measured.ops += 1
                        # Serial operations: the rate is one over the mean latency.
                        self.measured.elapsed += latency
        finally:
            gc.enable()
        await asyncio.sleep(self.pause)

    def result(self) -> Result:
        return Result(
            self.key,
            self.title,
            self.unit,
            self.measured,
            baseline=self.baseline,
            window=self.window,
            details={"runs": self.measured.ops, "one_at_a_time": True},
        )


async def idle(bench: Bench) -> list[Result]:
    """Each kind in turn, one operation of each per round, `scale.idle_runs` rounds counted
    after the warm-up rounds; everything an operation needs is prepared before."""
    runs = WARM_UP + bench.scale.idle_runs
    tag = f"{bench.tag}-idle"
    send = Sender(bench)
    client = bench.stack.client
    raw = bench.stack.raw_client
    gql = bench.gql

    skus = [f"{tag}-sku{j}" for j in range(LINES)]
    carts = [f"{tag}-cart{i}" for i in range(runs)]
    buyer, depositor = f"{tag}-buyer", f"{tag}-depositor"
    for sku in skus:
        await send("inventory", sku, "restock", {"quantity": runs})
    await send("account", buyer, "open", {"owner_name": "Buyer", "email": "b@example.com"})
    await send("account", buyer, "verify", {})
    await send("account", buyer, "deposit", {"amount": FUNDS})
    await gql.open_account(depositor, wait=True)

    async def prepare(i: int) -> None:
        await send("cart", carts[i], "createCart", {"account_id": buyer})
        for sku in skus:
            await send(
                "cart",
                carts[i],
                "addCartItem",
                {"sku": sku, "quantity": 1, "unit_price": UNIT_PRICE},
            )

    await bench.setup(runs, prepare)
    await asyncio.sleep(1.0)  # the setup's publishes end before the first timed operation

    completed = 0

    async def check_out(i: int) -> None:
        nonlocal completed
        data = await gql.command(CHECKOUT, id=carts[i], key=f"{tag}-checkout-{i}")
        state = await saga_ended(client, data["checkoutCart"]["checkoutId"], POLL)
        if state.status is not SagaStatus.COMPLETED:
            raise RuntimeError(f"checkout {state.checkout_id} ended {state.status.value}")
        completed += 1

    async def deposit(i: int) -> None:
        data = await gql.command(DEPOSIT_WAIT, id=depositor, amount=1, key=f"{tag}-deposit-{i}")
        payload = data["depositToAccount"]
        if payload["status"] != "APPLIED" or payload["account"]["balance"] != i + 1:
            raise RuntimeError(f"deposit {i} not seen applied: {payload}")

    counted = await _start_counter(bench, raw, f"counter:{tag}-updated")

    async def raw_update(i: int) -> None:
        value = await counted.execute_update(
            "add_and_read", 1, result_type=int, rpc_timeout=RPC_TIMEOUT
        )
        if value != i + 2:  # its start signal added one
            raise RuntimeError(f"{counted.id}: value {value} after update {i}")

    async def open_account(i: int) -> None:
        await gql.command(OPEN, id=f"{tag}-opened{i}", key=f"{tag}-open-{i}", wait=True)

    async def raw_start(i: int) -> None:
        await _start_counter(bench, raw, f"counter:{tag}-s{i}")

    async def raw_start_query(i: int) -> None:
        handle = await _start_counter(bench, raw, f"counter:{tag}-q{i}")
        value = await handle.query("value", result_type=int, rpc_timeout=RPC_TIMEOUT)
        if value != 1:
            raise RuntimeError(f"{handle.id}: value {value} after its start signal")

    tenure, counter = bench.stack.worker, bench.stack.counter_worker
    kinds = [
        _Kind(
            "idle_checkout",
            f"one checkout, {LINES} lines, idle",
            "checkouts",
            check_out,
            bench.stack.window(tenure),
            pause=CHECKOUT_PAUSE,
        ),
        _Kind(
            "idle_deposit_wait",
            "one deposit, wait: true, idle",
            "commands",
            deposit,
            bench.stack.window(tenure),
            baseline="idle_raw_update",
        ),
        _Kind(
            "idle_raw_update",
            "raw SDK update of a counter, idle",
            "commands",
            raw_update,
            bench.stack.window(counter),
        ),
        _Kind(
            "idle_raw_start",
            "raw SDK start with a start signal, idle",
            "starts",
            raw_start,
            bench.stack.window(counter),
        ),
        _Kind(
            "idle_raw_start_query",
            "raw SDK start with a signal, then query",
            "starts",
            raw_start_query,
            bench.stack.window(counter),
        ),
        _Kind(
            "idle_open_account",
            "one openAccount, wait: true, idle",
            "accounts",
            open_account,
            bench.stack.window(tenure),
            baseline="idle_raw_start",
        ),
    ]
    for i in range(runs):
        bench.stack.check_alive()
        for kind in kinds:
            await kind.run_once(i, counted=i >= WARM_UP)
    results = [kind.result() for kind in kinds]
    for result in results:
        result.details["warm_up"] = WARM_UP
    # Each completed checkout charged the buyer once.
    account = await send.snapshot("account", buyer)
    spent = FUNDS - (account.state or {}).get("balance", 0)
    if spent != LINES * UNIT_PRICE * completed:
        results[0].problems.append(
            f"buyer charged {spent} for {completed} checkouts of {LINES * UNIT_PRICE}"
        )
    return results


async def _start_counter(
    bench: Bench, client: Client, workflow_id: str
) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        WORKFLOW,
        CounterInput(max_signals_per_run=bench.max_commands_per_run),
        id=workflow_id,
        task_queue=bench.raw_queue,
        start_signal="add",
        start_signal_args=[1],
        rpc_timeout=RPC_TIMEOUT,
    )
