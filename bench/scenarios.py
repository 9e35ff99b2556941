"""The scenarios: each raw Temporal baseline, then the Tenure path it is compared with,
against the same server, worker settings and client concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import InitVar, dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from bench.checks import account_snapshot, check_accounts, check_counters, settled
from bench.counter import WORKFLOW, CounterInput
from bench.counter_worker import RAW_QUEUE_SUFFIX
from bench.graphql import DEPOSIT, DEPOSIT_WAIT, READ, GraphQL
from bench.load import Measured, drive
from bench.scale import Scale
from bench.stack import LOAD_GENERATOR, BenchStack, Window
from workers.cache import SnapshotCache

RPC_TIMEOUT = timedelta(seconds=10)
RAW_ATTEMPTS = 3
OPENED_REVISION = 2  # open, then verify
EVENTS_PER_COMMAND = 5  # its signal, one workflow task (3 events), one publish marker
EVENTS_PER_RUN = 50  # start, first task, timers and the continue-as-new itself


@dataclass
class Result:
    """One scenario's figures, and the problems that make the benchmark fail."""

    key: str
    title: str
    unit: str
    measured: Measured
    baseline: str | None = None
    signals_per_op: int = 1
    ops_per_s: float = 0.0
    peak_rss_kib: int | None = None
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    window: InitVar[Window | None] = None

    @property
    def server_cpu_ms(self) -> float | None:
        """CPU milliseconds per operation of every process but the load generator: a cost
        that, unlike throughput, hardly moves when other work shares the machine."""
        spent: dict[str, float] | None = self.details.get("cpu_ms_per_op")
        if spent is None:
            return None
        return sum(ms for name, ms in spent.items() if name != LOAD_GENERATOR)

    def __post_init__(self, window: Window | None) -> None:
        self.ops_per_s = self.ops_per_s or self.measured.ops_per_s
        if window is not None:
            self.peak_rss_kib = window.peak_rss_kib()
            self.details["cpu_ms_per_op"] = window.cpu_ms_per_op(self.measured.ops)
        if self.measured.errors:
            self.problems.insert(
                0, f"{self.measured.errors} operations failed, first: {self.measured.first_error}"
            )
        if self.measured.timed_out:
            self.problems.insert(0, "stopped at its time limit before sending everything")


@dataclass
class Load:
    """One side of a comparison: `count` operations, driven a slice at a time. `settle`,
    when given, runs at the end of each slice and counts in its time (for loads whose
    throughput is what was applied, not what was accepted). `beside`, when given, is
    entered around each slice, before the clock starts: other traffic running meanwhile."""

    operation: Callable[[int], Awaitable[object]]
    count: int
    window: Window
    settle: Callable[[], Awaitable[object]] | None = None
    beside: Callable[[], contextlib.AbstractAsyncContextManager[object]] | None = None
    measured: Measured = field(default_factory=Measured)
    sent: int = 0

    def slice(self, first: int) -> Callable[[int], Awaitable[object]]:
        def operation(i: int) -> Awaitable[object]:
            return self.operation(first + i)

        return operation


class Bench:
    """State shared by the scenarios of one run: entities made so far and what each should
    hold, so a later scenario can read what an earlier one wrote."""

    def __init__(self, stack: BenchStack, scale: Scale) -> None:
        self.stack = stack
        self.scale = scale
        self.tag = uuid.uuid4().hex[:6]
        self.gql = GraphQL(stack.http)
        self.counters: dict[str, int] = {}
        self.accounts: dict[str, int] = {}

    @property
    def raw_queue(self) -> str:
        return self.stack.settings.task_queue + RAW_QUEUE_SUFFIX

    @property
    def max_commands_per_run(self) -> int:
        return self.stack.settings.runtime.max_commands_per_run

    async def drive(
        self,
        operation: Callable[[int], Awaitable[object]],
        count: int,
        concurrency: int | None = None,
    ) -> Measured:
        """Run `count` operations from `concurrency` clients, the scale's by default."""
        self.stack.check_alive()
        clients = concurrency or self.scale.concurrency
        return await drive(operation, count, clients, self.scale.time_limit)

    async def alternate(self, loads: list[Load], concurrency: int | None = None) -> None:
        """Drive the loads in turn, one slice of each per round, so that whatever else the
        machine is doing meanwhile weighs on the baseline and on Tenure alike; from
        `concurrency` clients, the scale's by default."""
        rounds = self.scale.rounds
        clients = concurrency or self.scale.concurrency
        for _ in range(rounds):
            for load in loads:
                size = min(-(-load.count // rounds), load.count - load.sent)
                if size <= 0:
                    continue
                self.stack.check_alive()
                # The load generator's own garbage collections would count as the server's
                # latency: collect before the clock starts, not while it runs.
                gc.collect()
                gc.disable()
                beside = load.beside() if load.beside else contextlib.nullcontext()
                try:
                    async with beside:
                        with load.window:
                            started = time.perf_counter()
                            part = await drive(
                                load.slice(load.sent),
                                size,
                                clients,
                                self.scale.time_limit / rounds,
                            )
                            if load.settle is not None:
                                await load.settle()
                            load.measured.add(part, time.perf_counter() - started)
                finally:
                    gc.enable()
                load.sent += size

    async def setup(self, count: int, make: Callable[[int], Awaitable[object]]) -> None:
        """Create entities before the clock starts; any failure here aborts the run."""
        measured = await self.drive(make, count)
        if measured.errors or measured.timed_out:
            raise RuntimeError(f"setup failed: {measured.first_error or 'timed out'}")

    async def start_counter(self, workflow_id: str) -> None:
        handle = await self.stack.raw_client.start_workflow(
            WORKFLOW,
            CounterInput(max_signals_per_run=self.max_commands_per_run),
            id=workflow_id,
            task_queue=self.raw_queue,
        )
        # The first query waits for the worker: the counter is then live and cached.
        await handle.query("value", rpc_timeout=RPC_TIMEOUT)


async def raw_signal(client: Client, workflow_id: str) -> None:
    """Signal a counter as a hand-written client would: retrying only the refusal that
    says the signal was not applied (the run is closing to continue as new)."""
    handle = client.get_workflow_handle(workflow_id)
    for attempt in range(RAW_ATTEMPTS):
        try:
            await handle.signal("add", 1, rpc_timeout=RPC_TIMEOUT)
            return
        except RPCError as exc:
            if exc.status is not RPCStatusCode.RESOURCE_EXHAUSTED or attempt == RAW_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))


def _spread(ids: list[str], i: int) -> str:
    return ids[i % len(ids)]


# -- writes ---------------------------------------------------------------------------------


async def _entities(bench: Bench) -> tuple[list[str], list[str]]:
    """The counters and accounts that the writes, the waited writes and the reads share,
    made by the first of them to run (each may run alone, `--only`)."""
    if not bench.counters:
        counters = [f"counter:{bench.tag}-{i}" for i in range(bench.scale.entities)]
        accounts = [f"{bench.tag}-m{i}" for i in range(bench.scale.entities)]
        await bench.setup(len(counters), lambda i: bench.start_counter(counters[i]))
        await bench.setup(len(accounts), lambda i: bench.gql.open_account(accounts[i], wait=True))
        bench.counters = dict.fromkeys(counters, 0)
        bench.accounts = dict.fromkeys(accounts, 0)
    return list(bench.counters), list(bench.accounts)


async def writes(bench: Bench) -> list[Result]:
    """Raw SDK signals to counters against GraphQL mutations to accounts, none waited for.
    Each slice's time runs until its entities have applied what it sent (`_applied`): a
    slice timed only to its last acceptance left its backlog to be applied in the other
    side's next slice, on the same two cores, and Tenure's backlog is the larger (its
    worker spent 0.6-0.75 ms a signal during the raw slices): 0.67-0.73 x read that way
    where 0.52-0.56 x was applied, in two pairs of runs on 2026-12-06."""
    counters, accounts = await _entities(bench)
    client = bench.stack.raw_client

    async def signal(i: int) -> None:
        workflow_id = _spread(counters, i)
        await raw_signal(client, workflow_id)
        bench.counters[workflow_id] += 1

    async def deposit(i: int) -> None:
        account_id = _spread(accounts, i)
        await bench.gql.command(DEPOSIT, id=account_id, amount=1, key=f"{bench.tag}-m-{i}")
        bench.accounts[account_id] += 1

    raw = Load(
        signal,
        bench.scale.writes,
        bench.stack.window(bench.stack.counter_worker),
        settle=lambda: _applied(bench, counted=True),
    )
    tenure = Load(
        deposit,
        bench.scale.writes,
        bench.stack.window(bench.stack.worker),
        settle=lambda: _applied(bench, counted=False),
    )
    await bench.alternate([raw, tenure])
    results = [
        await _checked_counters(bench, "raw_signals", "raw SDK signals", raw),
        await _checked_accounts(
            bench, "mutations", "GraphQL mutations", tenure, baseline="raw_signals"
        ),
    ]
    for result, load in zip(results, (raw, tenure), strict=True):
        sending = load.measured.sending
        result.details["accepted_per_s"] = round(load.measured.ops / sending, 1) if sending else 0
    return results


async def _applied(bench: Bench, counted: bool) -> None:
    """Until every counter (`counted`), or every account, has applied each signal or
    command acknowledged so far: one query of each mostly, as a query sees every signal
    accepted before it. The raw side's queries and Tenure's cost alike."""
    client = bench.stack.raw_client if counted else bench.stack.client

    async def counter(workflow_id: str) -> int:
        value: int = await client.get_workflow_handle(workflow_id).query(
            "value", result_type=int, rpc_timeout=RPC_TIMEOUT
        )
        return value

    async def account(account_id: str) -> int:
        snapshot = await account_snapshot(client, f"account:{account_id}")
        return snapshot.revision - OPENED_REVISION

    sent: dict[str, int] = bench.counters if counted else bench.accounts
    read = counter if counted else account
    gate = asyncio.Semaphore(bench.scale.concurrency)

    async def one(entity_id: str) -> None:
        async with gate:
            await settled(lambda: read(entity_id), sent[entity_id])

    await asyncio.gather(*(one(entity_id) for entity_id in sent))


async def waited_writes(bench: Bench) -> list[Result]:
    """A raw signal followed by a query of its effect, against GraphQL's `wait: true`."""
    counters, accounts = await _entities(bench)
    client = bench.stack.raw_client
    stale = unseen = 0

    async def round_trip(i: int) -> None:
        nonlocal stale
        workflow_id = _spread(counters, i)
        # Every signal acknowledged before this one was sent was applied before it.
        floor = bench.counters[workflow_id] + 1
        await raw_signal(client, workflow_id)
        bench.counters[workflow_id] += 1
        handle = client.get_workflow_handle(workflow_id)
        value = await handle.query("value", result_type=int, rpc_timeout=RPC_TIMEOUT)
        stale += value < floor

    async def deposit(i: int) -> None:
        nonlocal unseen
        account_id = _spread(accounts, i)
        floor = OPENED_REVISION + bench.accounts[account_id] + 1
        data = await bench.gql.command(
            DEPOSIT_WAIT, id=account_id, amount=1, key=f"{bench.tag}-w-{i}"
        )
        bench.accounts[account_id] += 1
        payload = data["depositToAccount"]
        unseen += payload["status"] != "APPLIED" or payload["account"]["revision"] < floor

    count = bench.scale.waited_writes
    raw = Load(round_trip, count, bench.stack.window(bench.stack.counter_worker))
    tenure = Load(deposit, count, bench.stack.window(bench.stack.worker))
    await bench.alternate([raw, tenure])
    raw_result = await _checked_counters(
        bench, "raw_signal_query", "raw SDK signal, then query", raw
    )
    if stale:
        raw_result.problems.append(f"{stale} queries did not see their own signal")
    result = await _checked_accounts(
        bench,
        "mutations_wait",
        "GraphQL mutations, wait: true",
        tenure,
        baseline="raw_signal_query",
    )
    if unseen:
        result.problems.append(f"{unseen} waited mutations did not see their own command")
    return [raw_result, result]


async def _checked_counters(bench: Bench, key: str, title: str, load: Load) -> Result:
    started = time.perf_counter()
    problems = await check_counters(bench.stack.raw_client, bench.counters, bench.scale.concurrency)
    return Result(
        key,
        title,
        "signals",
        load.measured,
        window=load.window,
        problems=problems[:5],
        details={"check_s": round(time.perf_counter() - started, 2)},
    )


async def _checked_accounts(
    bench: Bench, key: str, title: str, load: Load, baseline: str
) -> Result:
    started = time.perf_counter()
    problems = await check_accounts(
        bench.stack.client, bench.accounts, OPENED_REVISION, bench.scale.concurrency
    )
    return Result(
        key,
        title,
        "commands",
        load.measured,
        baseline=baseline,
        window=load.window,
        problems=problems[:5],
        details={
            "check_s": round(time.perf_counter() - started, 2),
            "retries": bench.gql.retries,
        },
    )


# -- reads ----------------------------------------------------------------------------------


async def reads(bench: Bench) -> list[Result]:
    """Raw SDK queries against GraphQL reads from the cache and from the workflow."""
    counters, accounts = await _entities(bench)
    await until_cached(
        bench, {account: OPENED_REVISION + n for account, n in bench.accounts.items()}
    )
    client = bench.stack.raw_client
    wrong: Counter[str] = Counter()
    sources: dict[str, Counter[str]] = {"CACHED": Counter(), "LIVE": Counter()}

    async def query(i: int) -> None:
        workflow_id = _spread(counters, i)
        value = await client.get_workflow_handle(workflow_id).query(
            "value", result_type=int, rpc_timeout=RPC_TIMEOUT
        )
        wrong["raw"] += value != bench.counters[workflow_id]

    def reader(consistency: str) -> Callable[[int], Awaitable[None]]:
        async def read(i: int) -> None:
            account_id = _spread(accounts, i)
            data = await bench.gql(READ, id=account_id, consistency=consistency)
            account = data["account"]
            sources[consistency][account["source"]] += 1
            wrong[consistency] += account["balance"] != bench.accounts[account_id]
            wrong[consistency] += account["stale"]

        return read

    # Warm up, untimed, as a running system is: one read of each entity through every path
    # (the raw counters are already warm in their worker's cache).
    for consistency in ("CACHED", "LIVE"):
        await bench.setup(len(accounts), reader(consistency))
    wrong.clear()
    for counted in sources.values():
        counted.clear()
    count = bench.scale.reads
    raw = Load(query, count, bench.stack.window(bench.stack.counter_worker))
    cached = Load(reader("CACHED"), count, bench.stack.window(bench.stack.worker))
    live = Load(reader("LIVE"), count, bench.stack.window(bench.stack.worker))
    await bench.alternate([raw, cached, live])

    def problems(key: str) -> list[str]:
        return [f"{wrong[key]} reads returned a wrong or stale value"] if wrong[key] else []

    return [
        Result(
            "raw_queries",
            "raw SDK queries",
            "reads",
            raw.measured,
            window=raw.window,
            problems=problems("raw"),
        ),
        Result(
            "cached_reads",
            "GraphQL reads, CACHED",
            "reads",
            cached.measured,
            baseline="raw_queries",
            window=cached.window,
            problems=problems("CACHED"),
            details={"sources": dict(sources["CACHED"])},
        ),
        Result(
            "live_reads",
            "GraphQL reads, LIVE",
            "reads",
            live.measured,
            baseline="raw_queries",
            window=live.window,
            problems=problems("LIVE"),
            details={"sources": dict(sources["LIVE"])},
        ),
    ]


async def until_cached(bench: Bench, revisions: dict[str, int], stall: float = 60.0) -> int:
    """Wait until the cache holds at least the given revision of each account, for as long
    as some account gets there within `stall` seconds; returns how many never did. Cheaper
    than asking every workflow, which the checks still do."""
    cache = SnapshotCache(bench.stack.redis, bench.stack.settings.redis_prefix)
    pending = dict(revisions)
    progress_at = time.monotonic()
    while pending and time.monotonic() - progress_at < stall:
        ids = list(pending)
        for first in range(0, len(ids), 1000):
            chunk = ids[first : first + 1000]
            pipeline = bench.stack.redis.pipeline(transaction=False)
            for account_id in chunk:
                pipeline.hget(cache.key("account", account_id), "revision")
            for account_id, raw in zip(chunk, await pipeline.execute(), strict=True):
                if raw is not None and int(raw) >= pending[account_id]:
                    del pending[account_id]
        if len(pending) < len(ids):
            progress_at = time.monotonic()
        if pending:
            await asyncio.sleep(0.2)
    return len(pending)
