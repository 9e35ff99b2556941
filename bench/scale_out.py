"""Scale-out: the GraphQL mutations of the writes scenario against one Tenure worker process
and against two, on the same Temporal, Redis and task queue, in alternating rounds.

The second worker is started before each of its rounds (and waited for until it polls) and
stopped after. Each round deposits to accounts opened for it just before, untimed, by
whichever workers are running then: a workflow's tasks stay with the worker that ran its
last one (Temporal's sticky queues), so accounts opened before the second worker started
would all stay with the first. Throughput counts what the workers applied, not what
Temporal accepted: the slice ends when every account of the round has every deposit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from temporalio.service import RPCError

from bench.checks import account_snapshot, check_accounts, settled
from bench.graphql import DEPOSIT
from bench.scenarios import OPENED_REVISION, Bench, Load, Result
from bench.stack import SECOND_WORKER


class _Rounds:
    """One side's deposits: fresh accounts each round, and what each should hold."""

    def __init__(self, bench: Bench, name: str) -> None:
        self.bench = bench
        self.name = name
        self.round = 0
        self.accounts: list[str] = []
        self.deposits: dict[str, int] = {}

    async def open_accounts(self) -> None:
        """This round's accounts, opened and verified by the workers running now."""
        bench = self.bench
        self.round += 1
        self.accounts = [
            f"{bench.tag}-{self.name}{self.round}-{i}" for i in range(bench.scale.entities)
        ]
        accounts = self.accounts
        await bench.setup(len(accounts), lambda i: bench.gql.open_account(accounts[i], wait=True))
        self.deposits.update(dict.fromkeys(accounts, 0))

    async def deposit(self, i: int) -> None:
        account_id = self.accounts[i % len(self.accounts)]
        key = f"{self.bench.tag}-{self.name}-{i}"
        await self.bench.gql.command(DEPOSIT, id=account_id, amount=1, key=key)
        self.deposits[account_id] += 1

    async def applied(self) -> None:
        """Wait until each of this round's accounts has applied every deposit sent to it
        (a query of each: the source of truth, not the cache, which may lag)."""
        await self.settle(self.accounts)

    async def settle(self, accounts: list[str], patience: float = 60.0) -> None:
        """Wait until these accounts have applied their deposits, asking again an account
        that does not answer, for up to `patience` seconds: Temporal holds the tasks of a
        workflow whose worker has stopped for that worker a while before another gets them."""
        client = self.bench.stack.client
        gate = asyncio.Semaphore(self.bench.scale.concurrency)
        deadline = time.monotonic() + patience

        async def revision(account_id: str) -> int:
            return (await account_snapshot(client, f"account:{account_id}")).revision

        async def one(account_id: str) -> None:
            want = OPENED_REVISION + self.deposits[account_id]
            async with gate:
                while True:
                    try:
                        await settled(lambda: revision(account_id), want)
                        return
                    except RPCError:
                        if time.monotonic() > deadline:
                            return  # the check names it
                        await asyncio.sleep(1.0)

        await asyncio.gather(*(one(account_id) for account_id in accounts))


async def mutations(bench: Bench) -> list[Result]:
    """The same deposits, to one worker process and to two, in alternating rounds."""
    stack = bench.stack
    one, two = _Rounds(bench, "s1w"), _Rounds(bench, "s2w")

    @contextlib.asynccontextmanager
    async def one_worker() -> AsyncIterator[None]:
        await one.open_accounts()
        yield

    @contextlib.asynccontextmanager
    async def two_workers() -> AsyncIterator[None]:
        await stack.start_second_worker()
        try:
            await two.open_accounts()
            yield
        finally:
            await stack.stop_second_worker()

    count = bench.scale.writes
    single = Load(
        one.deposit, count, stack.window(stack.worker), settle=one.applied, beside=one_worker
    )
    double = Load(
        two.deposit, count, stack.window(stack.worker), settle=two.applied, beside=two_workers
    )
    await bench.alternate([single, double])
    # Untimed: the second worker's accounts answer again once the first has taken them over.
    await two.settle(list(two.deposits))
    return [
        await _result(bench, "mutations_one_worker", "GraphQL mutations, one worker", single, one),
        await _result(
            bench,
            "mutations_two_workers",
            "GraphQL mutations, two workers",
            double,
            two,
            baseline="mutations_one_worker",
        ),
    ]


async def _result(
    bench: Bench, key: str, title: str, load: Load, rounds: _Rounds, baseline: str | None = None
) -> Result:
    """The side's figures, once every deposit of every round is known applied exactly once."""
    problems = await check_accounts(
        bench.stack.client, rounds.deposits, OPENED_REVISION, bench.scale.concurrency
    )
    measured = load.measured
    result = Result(
        key,
        title,
        "commands",
        measured,
        baseline=baseline,
        window=load.window,
        problems=problems[:5],
        details={
            "accepted_per_s": round(measured.ops / measured.sending, 1) if measured.sending else 0,
            "accounts_per_round": bench.scale.entities,
        },
    )
    spent = result.details["cpu_ms_per_op"]
    result.details["worker_cpu_ms_per_op"] = {
        name: spent[name] for name in ("tenure worker", SECOND_WORKER) if name in spent
    }
    return result
