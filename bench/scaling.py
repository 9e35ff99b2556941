"""Scenarios about scale: one hot entity taking many commands, and many live entities."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bench.checks import check_accounts, check_counters, history_lengths
from bench.graphql import DEPOSIT
from bench.scenarios import (
    EVENTS_PER_COMMAND,
    EVENTS_PER_RUN,
    OPENED_REVISION,
    Bench,
    Result,
    raw_signal,
)


def history_bound(bench: Bench) -> int:
    """The most events one run may reach: each command it takes at its own cost, plus
    the run's fixed ones."""
    return bench.max_commands_per_run * EVENTS_PER_COMMAND + EVENTS_PER_RUN


async def raw_hot(bench: Bench) -> Result:
    workflow_id = f"counter:{bench.tag}-hot"
    await bench.start_counter(workflow_id)
    client = bench.stack.raw_client
    count = bench.scale.hot_commands

    async def signal(i: int) -> None:
        await raw_signal(client, workflow_id)

    window = bench.stack.window(bench.stack.counter_worker)
    started = time.perf_counter()
    measured = await bench.drive(signal, count)
    sent = {workflow_id: measured.ops}
    problems = await check_counters(client, sent, bench.scale.concurrency)
    applied_s = time.perf_counter() - started
    lengths = await history_lengths(client, workflow_id)
    return Result(
        "raw_hot",
        "raw SDK signals, one counter",
        "signals",
        measured,
        ops_per_s=measured.ops / applied_s,
        window=window,
        problems=problems,
        details=_history_details(bench, lengths, measured.ops_per_s),
    )


async def tenure_hot(bench: Bench) -> Result:
    account_id = f"{bench.tag}-hot"
    await bench.gql.open_account(account_id, wait=True)
    count = bench.scale.hot_commands
    sent = {account_id: 0}

    async def deposit(i: int) -> None:
        await bench.gql.command(DEPOSIT, id=account_id, amount=1, key=f"{bench.tag}-h-{i}")
        sent[account_id] += 1

    window = bench.stack.window(bench.stack.worker)
    started = time.perf_counter()
    measured = await bench.drive(deposit, count)
    problems = await check_accounts(
        bench.stack.client, sent, OPENED_REVISION, bench.scale.concurrency
    )
    applied_s = time.perf_counter() - started
    lengths = await history_lengths(bench.stack.client, f"account:{account_id}")
    return Result(
        "hot",
        "hot account, GraphQL mutations",
        "commands",
        measured,
        baseline="raw_hot",
        ops_per_s=measured.ops / applied_s,
        window=window,
        problems=problems,
        details=_history_details(bench, lengths, measured.ops_per_s),
    )


def _history_details(bench: Bench, lengths: list[int], accepted_per_s: float) -> dict[str, object]:
    return {
        "accepted_per_s": round(accepted_per_s, 1),
        "runs": len(lengths),
        "max_history": max(lengths, default=0),
        "history_bound": history_bound(bench),
    }


async def many_entities(bench: Bench) -> list[Result]:
    """Accounts opened in steps up to each size, then a deposit to every one of them, on a
    fresh worker whose memory growth per cached account is read after each step."""
    stack = bench.stack
    stack.restart_worker()
    await bench.gql.open_account(f"{bench.tag}-warm", wait=True)
    await asyncio.sleep(1.0)
    baseline_kib = stack.worker.rss_kib()
    balances: dict[str, int] = {}
    ids: list[str] = []
    results = []
    for size in bench.scale.many_entities:
        new = [f"{bench.tag}-n{i}" for i in range(len(ids), size)]
        started = time.perf_counter()
        opened = await bench.drive(_opener(bench, new), len(new))
        ids += new
        balances.update(dict.fromkeys(new, 0))
        problems = await check_accounts(
            stack.client, dict.fromkeys(new, 0), OPENED_REVISION, bench.scale.concurrency
        )
        opened_s = time.perf_counter() - started

        window = bench.stack.window(stack.worker)
        measured = await bench.drive(_depositor(bench, list(ids), balances, size), len(ids))
        problems += await check_accounts(
            stack.client, balances, OPENED_REVISION, bench.scale.concurrency
        )
        if opened.errors:
            problems.insert(0, f"{opened.errors} accounts not opened: {opened.first_error}")
        rss_kib = stack.worker.rss_kib()
        results.append(
            Result(
                f"many_{size}",
                f"{size:,} live accounts, a deposit each",
                "commands",
                measured,
                window=window,
                problems=problems[:5],
                details={
                    "opened_per_s": round(opened.ops / opened_s, 1),
                    "cached_entities": size + 1,
                    "worker_rss_kib": rss_kib,
                    "worker_baseline_rss_kib": baseline_kib,
                    "kib_per_entity": round((rss_kib - baseline_kib) / (size + 1), 1),
                },
            )
        )
    return results


def _opener(bench: Bench, ids: list[str]) -> Callable[[int], Awaitable[None]]:
    async def open_account(i: int) -> None:
        await bench.gql.open_account(ids[i], wait=False)

    return open_account


def _depositor(
    bench: Bench, ids: list[str], balances: dict[str, int], step: int
) -> Callable[[int], Awaitable[None]]:
    async def deposit(i: int) -> None:
        await bench.gql.command(DEPOSIT, id=ids[i], amount=1, key=f"{bench.tag}-n{step}-{i}")
        balances[ids[i]] += 1

    return deposit
