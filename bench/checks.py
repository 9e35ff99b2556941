"""After-the-fact checks: every command applied exactly once, and how long runs' histories
grew. Both read the workflows themselves, the source of truth, not the cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

from temporalio.client import Client
from temporalio.service import RPCError

from entities.runtime.envelope import Snapshot

QUERY_TIMEOUT = timedelta(seconds=10)
SETTLE_TIMEOUT = 120.0


async def _each(
    ids: list[str], check: Callable[[str], Awaitable[str | None]], concurrency: int
) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(entity_id: str) -> str | None:
        async with gate:
            return await check(entity_id)

    found = await asyncio.gather(*(one(i) for i in ids))
    return [problem for problem in found if problem is not None]


async def settled(
    read: Callable[[], Awaitable[int]], expected: int, timeout: float = SETTLE_TIMEOUT
) -> int:
    """Read until the value reaches `expected` or the time is up; returns the last value.
    A query already sees every signal accepted before it, so this mostly returns at once.
    A read that fails (a query that timed out while the worker still works through what
    the load left, with 10,000 entities no longer all in its cache) is tried again until
    the time is up; the last failure is raised then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await read()
        except RPCError:
            if time.monotonic() > deadline:
                raise
        else:
            if value >= expected or time.monotonic() > deadline:
                return value
        await asyncio.sleep(0.2)


async def account_snapshot(client: Client, workflow_id: str) -> Snapshot:
    snapshot: Snapshot = await client.get_workflow_handle(workflow_id).query(
        "snapshot", result_type=Snapshot, rpc_timeout=QUERY_TIMEOUT
    )
    return snapshot


async def check_accounts(
    client: Client,
    expected: Mapping[str, int],
    base_revision: int,
    concurrency: int,
    balances: Mapping[str, int] | None = None,
) -> list[str]:
    """Problems with accounts whose revision should be `base_revision` plus the deposits
    sent to them and whose balance should equal `balances`, or that count when every deposit
    was of 1; empty when exactly once."""

    async def check(account_id: str) -> str | None:
        want = expected[account_id]
        want_balance = want if balances is None else balances[account_id]
        workflow_id = f"account:{account_id}"
        snapshot: Snapshot | None = None  # the last read: balance and revision from one

        async def revision() -> int:
            nonlocal snapshot
            snapshot = await account_snapshot(client, workflow_id)
            return snapshot.revision

        try:
            await settled(revision, base_revision + want)
        except RPCError as exc:
            return f"{account_id}: cannot be read ({exc})"
        assert snapshot is not None  # settled returned, so a read succeeded
        balance = (snapshot.state or {}).get("balance")
        if balance != want_balance or snapshot.revision != base_revision + want:
            return (
                f"{account_id}: balance {balance} revision {snapshot.revision}, "
                f"expected {want_balance} and {base_revision + want}"
            )
        return None

    return await _each(list(expected), check, concurrency)


async def check_counters(
    client: Client, expected: Mapping[str, int], concurrency: int
) -> list[str]:
    """Problems with raw counters whose value should equal the signals sent to them."""

    async def value(workflow_id: str) -> int:
        result: int = await client.get_workflow_handle(workflow_id).query(
            "value", result_type=int, rpc_timeout=QUERY_TIMEOUT
        )
        return result

    async def check(workflow_id: str) -> str | None:
        want = expected[workflow_id]
        try:
            got = await settled(lambda: value(workflow_id), want)
        except RPCError as exc:
            return f"{workflow_id}: cannot be read ({exc})"
        return None if got == want else f"{workflow_id}: value {got}, expected {want}"

    return await _each(list(expected), check, concurrency)


async def history_lengths(client: Client, workflow_id: str) -> list[int]:
    """The history length of every run of `workflow_id`, from the server's own records."""
    latest = await client.get_workflow_handle(workflow_id).describe()
    lengths = {latest.run_id: latest.history_length}
    # Visibility may lag behind the newest run; it is described directly above.
    async for execution in client.list_workflows(f'WorkflowId = "{workflow_id}"'):
        if execution.run_id not in lengths:
            description = await client.get_workflow_handle(
                workflow_id, run_id=execution.run_id
            ).describe()
            lengths[execution.run_id] = description.history_length
    return list(lengths.values())
