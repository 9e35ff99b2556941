"""A bulk deposit to many accounts beside the raw SDK sending the same deposit signals.

The accounts are opened before the clock starts, each with one raw `start_workflow` whose
start signal carries its open and verify commands, and the worker has applied them all
before the first round. Both sides deposit to the same accounts: each account gets one
deposit from the raw SDK and one from a bulk command, so the setup and the final check
cost half what two sets of accounts would. In each round the raw SDK sends a deposit
signal to one slice of the accounts (one client, `WINDOW` at once), then a `BulkCommand`
deposits to another slice, `WINDOW` at once. The bulk's slice is the raw SDK's of half
the rounds before or after, so at the default scale neither side finds its accounts in
the worker's cache: each slice was last touched rounds ago, by more than the cache holds.

Each side is timed twice. Until it has sent every deposit: the raw SDK until Temporal has
accepted every signal (the issue's baseline, `raw_deposit_signals`), the bulk command until
its `deliveredAt`, the moment its last page was handed to Temporal (`bulk_deposits`). And
until every deposit is applied: the raw SDK's as their cached snapshots show
(`raw_deposit_signals_applied`), the bulk command's until it returns with every outcome
counted (`bulk_deposits_applied`). Before the bulk slice starts, the raw slice is applied,
so a bulk command never pays for the raw SDK's backlog. At the end every account must hold
both deposits exactly once, or the run fails.

`BENCH_BULK_ACCOUNTS` sets the accounts for a quick run.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError

from bench.load import Measured, drive
from bench.scenarios import Bench, Load, Result
from entities.account import AccountState, AccountWorkflow
from entities.bulk import BulkCommandWorkflow, BulkInput, BulkStatus, bulk_workflow_id
from entities.runtime.envelope import CommandEnvelope, Snapshot
from workers.cache import SnapshotCache
from workers.delivery import CommandDelivery
from workers.temporal import ask

WINDOW = 50
RAW_AMOUNT = 3
BULK_AMOUNT = 5
SIZES = {"small": 10_000, "default": 100_000}
SETUP_LIMIT = 1800.0
MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")
MAPS_PER_ACCOUNT = 1.0
"""Memory maps the embedded Temporal dev server (SQLite in memory) holds per account, with
room: 0.73 to 0.75 were seen at 81,000 and 100,000 accounts opened. Past the kernel's
`vm.max_map_count` (65,530 by default) its SQLite runs out of memory and the server
crashes."""
MAX_SLICE = 10_000  # the most ids one bulk command may name


async def bulk_deposits(bench: Bench) -> list[Result]:
    total = int(os.environ.get("BENCH_BULK_ACCOUNTS") or SIZES[bench.scale.name])
    if "temporal" in bench.stack.servers:
        _check_map_count(total)
    rounds = max(bench.scale.rounds, -(-total // MAX_SLICE))
    ids = [f"{bench.tag}-bulk{i}" for i in range(total)]
    client = bench.stack.client  # with the pydantic converter the entities use
    settings = bench.stack.settings
    delivery = CommandDelivery(client, settings)

    async def open_one(i: int) -> None:
        commands = [
            CommandEnvelope(
                command_id=f"{ids[i]}-open",
                name="open",
                payload={"owner_name": "Bulk", "email": "bulk@example.com"},
            ),
            CommandEnvelope(command_id=f"{ids[i]}-verify", name="verify", payload={}),
        ]
        await client.start_workflow(
            AccountWorkflow.run,
            delivery.start_input("account", ids[i]),
            id=f"account:{ids[i]}",
            task_queue=settings.task_queue,
            start_signal="commands",
            start_signal_args=[commands],
        )

    # Longer than a scenario's time limit: 10,000 starts at small scale take a minute.
    # At least 20 accounts opened and applied a second: 100,000 need more than half an hour.
    setup_limit = max(SETUP_LIMIT, total / 20)
    opened = await drive(open_one, len(ids), 64, setup_limit)
    if opened.errors or opened.timed_out:
        raise RuntimeError(f"setup failed: {opened.first_error or 'timed out'}")
    cache = SnapshotCache(bench.stack.redis, settings.redis_prefix)
    if await _applied(cache, ids, lambda state: state.status == "ACTIVE", setup_limit) is None:
        raise RuntimeError("setup failed: not every account was opened and verified")

    async def raw_deposit(i: int) -> None:
        envelope = CommandEnvelope(
            command_id=f"{ids[i]}-raw", name="deposit", payload={"amount": RAW_AMOUNT}
        )
        await client.get_workflow_handle(f"account:{ids[i]}").signal("command", envelope)

    problems: list[str] = []
    raw = Load(raw_deposit, total, bench.stack.window(bench.stack.worker))
    raw_applied = Measured()
    tenure = Measured()
    tenure_applied = Measured()
    tenure_window = bench.stack.window(bench.stack.worker)
    per_round = -(-total // rounds)
    # The balance each slice holds so far: the raw SDK's deposits are applied when their
    # accounts show it, whether or not the bulk command has been to them already.
    held = [0] * rounds
    for r in range(rounds):
        size = min(per_round, total - raw.sent)
        with raw.window:
            part = await drive(raw.slice(raw.sent), size, WINDOW, SETUP_LIMIT)
        raw.measured.add(part, part.elapsed)
        held[r] += RAW_AMOUNT
        applied = await _applied(
            cache,
            ids[raw.sent : raw.sent + size],
            _holds_balance(held[r]),
            SETUP_LIMIT,
        )
        if applied is None:
            problems.append(f"round {r}: the raw SDK's deposits were not all applied")
            applied = SETUP_LIMIT
        elapsed = part.elapsed + applied
        raw_applied.add(Measured(ops=size, elapsed=elapsed), elapsed)
        raw.sent += size
        other = (r + rounds // 2) % rounds
        chosen = ids[other * per_round : (other + 1) * per_round]
        if not chosen:
            continue
        held[other] += BULK_AMOUNT
        bulk_id = f"{bench.tag}-{uuid.uuid4().hex[:6]}"
        with tenure_window:
            started_wall, started = time.time(), time.perf_counter()
            handle = await client.start_workflow(
                BulkCommandWorkflow.run,
                BulkInput(
                    bulk_id=bulk_id,
                    entity_type="account",
                    command="deposit",
                    payload={"amount": BULK_AMOUNT},
                    ids=chosen,
                    window=WINDOW,
                    sent_by="admin:bench",
                ),
                id=bulk_workflow_id(bulk_id),
                task_queue=settings.bulk_task_queue,
            )
            done = await handle.result()
            elapsed = time.perf_counter() - started
        tenure_applied.add(Measured(ops=len(chosen), elapsed=elapsed), elapsed)
        if done.delivered_at is None:
            problems.append(f"bulk {bulk_id}: no deliveredAt")
            continue
        # The server's clock and this one are the same machine's.
        sent = max(done.delivered_at.timestamp() - started_wall, 1e-3)
        tenure.add(Measured(ops=len(chosen), elapsed=sent), sent)
        if done.status is not BulkStatus.COMPLETED or done.applied != len(chosen):
            problems.append(f"bulk {bulk_id}: {done.status} {done.applied}/{len(chosen)} applied")
    problems += await _balances(bench, ids, RAW_AMOUNT + BULK_AMOUNT)
    return [
        Result(
            "raw_deposit_signals",
            f"raw SDK deposit signals, {WINDOW} at once",
            "commands",
            raw.measured,
            window=raw.window,
        ),
        Result(
            "raw_deposit_signals_applied",
            f"raw SDK deposit signals, {WINDOW} at once, until applied",
            "commands",
            raw_applied,
        ),
        Result(
            "bulk_deposits",
            f"bulk deposit to {total:,} accounts, {WINDOW} at once, until sent",
            "commands",
            tenure,
            baseline="raw_deposit_signals",
            problems=problems,
        ),
        Result(
            "bulk_deposits_applied",
            f"bulk deposit to {total:,} accounts, {WINDOW} at once, until applied",
            "commands",
            tenure_applied,
            baseline="raw_deposit_signals_applied",
            window=tenure_window,
        ),
    ]


def _holds_balance(balance: int) -> Callable[[AccountState], bool]:
    return lambda state: state.balance == balance


def _check_map_count(accounts: int) -> None:
    """Refuse, before opening anything, a run the embedded Temporal server cannot hold."""
    try:
        allowed = int(MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return  # not Linux, or not readable: nothing to go by
    needed = int(accounts * MAPS_PER_ACCOUNT) + 10_000
    if allowed < needed:
        raise RuntimeError(
            f"{accounts:,} accounts need vm.max_map_count of at least {needed:,} for the "
            f"embedded Temporal server (it is {allowed:,}): run `sysctl -w "
            f"vm.max_map_count={needed}` as root, point TEMPORAL_ADDRESS at a server of "
            "your own, or set BENCH_BULK_ACCOUNTS lower"
        )


async def _applied(
    cache: SnapshotCache, ids: list[str], holds: Callable[[AccountState], bool], limit: float
) -> float | None:
    """Seconds until every account's cached snapshot shows `holds` (the worker has applied
    and published what was sent), or None when `limit` passes first."""
    started = time.perf_counter()
    waiting = list(ids)
    while waiting:
        if time.perf_counter() - started > limit:
            return None
        still: list[str] = []
        for at in range(0, len(waiting), 1_000):
            chunk = waiting[at : at + 1_000]
            found = await asyncio.gather(*(cache.get("account", i) for i in chunk))
            still += [
                i
                for i, hit in zip(chunk, found, strict=True)
                if hit is None
                or hit.snapshot.state is None
                or not holds(AccountState.model_validate(hit.snapshot.state))
            ]
        waiting = still
        if waiting:
            # Each look reads every waiting snapshot, on the cores the worker needs: look
            # less often while many wait (every 0.55 s at 10,000), and often near the end.
            await asyncio.sleep(0.05 + len(waiting) / 20_000)
    return time.perf_counter() - started


READ_ATTEMPTS = 5


async def _balances(bench: Bench, ids: list[str], amount: int) -> list[str]:
    """Every account holding `amount` exactly: deposited once, none lost or doubled."""
    client = bench.stack.client
    window = asyncio.Semaphore(WINDOW)
    wrong: list[str] = []

    async def check(account_id: str) -> None:
        async with window:
            failed_reads = 0
            for _ in range(100):
                handle = client.get_workflow_handle(f"account:{account_id}")
                try:
                    snapshot = await ask(handle, "snapshot", result_type=Snapshot, seconds=30)
                except (RPCError, WorkflowQueryFailedError) as exc:
                    # A query the server gave up on under load ("context canceled") is asked
                    # again; one that keeps failing is a problem of the run.
                    failed_reads += 1
                    if failed_reads == READ_ATTEMPTS:
                        wrong.append(f"{account_id} could not be read: {exc}")
                        return
                    await asyncio.sleep(1)
                    continue
                balance = AccountState.model_validate(snapshot.state).balance
                if balance == amount:
                    return
                if balance > amount:
                    break
                await asyncio.sleep(0.2)
            wrong.append(f"{account_id} holds {balance}, not {amount}")

    await asyncio.gather(*(check(i) for i in ids))
    return [f"{len(wrong)} accounts wrong, first: {wrong[0]}"] if wrong else []
