"""Scenarios about scale: one hot entity taking many commands, and many live entities."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bench.checks import (
    account_snapshot,
    check_accounts,
    check_counters,
    history_lengths,
    settled,
)
from bench.graphql import DEPOSIT
from bench.scenarios import (
    EVENTS_PER_COMMAND,
    EVENTS_PER_RUN,
    OPENED_REVISION,
    RPC_TIMEOUT,
    Bench,
    Load,
    Result,
    raw_signal,
    until_cached,
)


def history_bound(bench: Bench) -> int:
    """The most events one run may reach: each command it takes at its own cost, plus
    the run's fixed ones."""
    return bench.max_commands_per_run * EVENTS_PER_COMMAND + EVENTS_PER_RUN


async def hot(bench: Bench) -> list[Result]:
    """One counter and one account each taking `hot_commands` from every client at once;
    throughput counts what was applied, and every run's history length is read back."""
    counter = f"counter:{bench.tag}-hot"
    account = f"{bench.tag}-hot"
    await bench.start_counter(counter)
    await bench.gql.open_account(account, wait=True)
    raw_client, client = bench.stack.raw_client, bench.stack.client
    sent = {counter: 0, account: 0}

    async def signal(i: int) -> None:
        await raw_signal(raw_client, counter)
        sent[counter] += 1

    async def deposit(i: int) -> None:
        await bench.gql.command(DEPOSIT, id=account, amount=1, key=f"{bench.tag}-h-{i}")
        sent[account] += 1

    async def counted() -> int:
        value: int = await raw_client.get_workflow_handle(counter).query(
            "value", result_type=int, rpc_timeout=RPC_TIMEOUT
        )
        return value

    async def applied() -> int:
        snapshot = await account_snapshot(client, f"account:{account}")
        return snapshot.revision - OPENED_REVISION

    count = bench.scale.hot_commands
    raw = Load(
        signal,
        count,
        bench.stack.window(bench.stack.counter_worker),
        settle=lambda: settled(counted, sent[counter]),
    )
    tenure = Load(
        deposit,
        count,
        bench.stack.window(bench.stack.worker),
        settle=lambda: settled(applied, sent[account]),
    )
    await bench.alternate([raw, tenure])
    concurrency = bench.scale.concurrency
    raw_problems = await check_counters(raw_client, {counter: sent[counter]}, concurrency)
    problems = await check_accounts(client, {account: sent[account]}, OPENED_REVISION, concurrency)
    return [
        Result(
            "raw_hot",
            "raw SDK signals, one counter",
            "signals",
            raw.measured,
            window=raw.window,
            problems=raw_problems,
            details=history_details(bench, await history_lengths(raw_client, counter), raw),
        ),
        Result(
            "hot",
            "hot account, GraphQL mutations",
            "commands",
            tenure.measured,
            baseline="raw_hot",
            window=tenure.window,
            problems=problems,
            details=history_details(
                bench, await history_lengths(client, f"account:{account}"), tenure
            ),
        ),
    ]


def history_details(bench: Bench, lengths: list[int], load: Load) -> dict[str, object]:
    """How a hot entity's runs went: how many, the longest history against its bound, and
    the rate commands were accepted at (throughput counts them applied)."""
    sending = load.measured.sending
    return {
        "accepted_per_s": round(load.measured.ops / sending, 1) if sending else 0.0,
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
        # Verified by the cache here; the check after the deposits asks every workflow.
        missing = await until_cached(bench, dict.fromkeys(new, OPENED_REVISION))
        problems = [f"{missing} accounts never reached the cache opened"] if missing else []
        opened_s = time.perf_counter() - started

        window = bench.stack.window(stack.worker)
        with window:
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
