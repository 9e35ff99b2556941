"""Opening accounts at the scale's concurrency: what a new customer costs. Each raw
operation starts a counter with a start signal, as a hand-written client would create an
entity, then sends it one more signal; each Tenure one is an `openAccount` then a
`verifyAccount` mutation, neither waited for. Both sides are then checked: every counter at
2, every account ACTIVE at revision 2."""

from __future__ import annotations

from bench.checks import check_accounts, check_counters
from bench.counter import WORKFLOW, CounterInput
from bench.scenarios import (
    OPENED_REVISION,
    RPC_TIMEOUT,
    Bench,
    Load,
    Result,
    raw_signal,
)

RAW_SIGNALS = 2  # the start signal, then one more


async def opening(bench: Bench) -> list[Result]:
    """Raw starts with a start signal and a second signal against opened and verified
    accounts, in alternating slices."""
    client = bench.stack.raw_client
    count = bench.scale.waited_writes
    counters = [f"counter:{bench.tag}-o{i}" for i in range(count)]
    accounts = [f"{bench.tag}-o{i}" for i in range(count)]

    async def start(i: int) -> None:
        await client.start_workflow(
            WORKFLOW,
            CounterInput(max_signals_per_run=bench.max_commands_per_run),
            id=counters[i],
            task_queue=bench.raw_queue,
            start_signal="add",
            start_signal_args=[1],
            rpc_timeout=RPC_TIMEOUT,
        )
        await raw_signal(client, counters[i])

    async def open_account(i: int) -> None:
        await bench.gql.open_account(accounts[i], wait=False)

    raw = Load(start, count, bench.stack.window(bench.stack.counter_worker))
    tenure = Load(open_account, count, bench.stack.window(bench.stack.worker))
    await bench.alternate([raw, tenure])
    concurrency = bench.scale.concurrency
    raw_problems = await check_counters(client, dict.fromkeys(counters, RAW_SIGNALS), concurrency)
    problems = await check_accounts(
        bench.stack.client, dict.fromkeys(accounts, 0), OPENED_REVISION, concurrency
    )
    return [
        Result(
            "raw_opens",
            "raw SDK start with a start signal, then a signal",
            "starts",
            raw.measured,
            window=raw.window,
            problems=raw_problems[:5],
        ),
        Result(
            "opens",
            "openAccount, then verifyAccount",
            "accounts",
            tenure.measured,
            baseline="raw_opens",
            window=tenure.window,
            problems=problems[:5],
        ),
    ]
