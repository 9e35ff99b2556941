"""`python -m bench.primitives`: what Temporal's server itself spends on each primitive an
entity or a saga is made of, on the same server `make bench` runs (the dev server).

A signal to a running workflow, a query, an update to it, an update followed by an activity
(as an entity answers a waited command and publishes), a workflow started and completed, and
a parent starting a child and completing with it (as a cart starts its checkout): each
driven from 32 clients, `--ops` times a round, in turns over `--rounds` rounds, with the
server's CPU time per operation read from /proc, and this process's (the client and a
worker hosting `bench.primitive_workflows`, with no code of Tenure's in the way). The floor
under any design built of those primitives: a checkout is one child workflow and seven
updates (its cart's, and six entity requests), whatever Tenure does around them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from bench.load import drive
from bench.primitive_workflows import OnceWorkflow, ParentWorkflow, TargetWorkflow, noted
from bench.stack import cpu_seconds
from deploy.embedded import EmbeddedTemporal

CONCURRENCY = 32
TARGETS = 64
"""Long-lived workflows the signals, updates and queries are spread over."""
TASK_QUEUE = "bench-primitives"
SETTLE_SECONDS = 0.5
"""Waited after each slice, inside its window: work the last operations left (a started
workflow's completion) is counted with them."""


@dataclass
class Primitive:
    name: str
    operation: Callable[[int], Awaitable[object]]
    server_ms: list[float] = field(default_factory=list)
    process_ms: list[float] = field(default_factory=list)
    per_second: list[float] = field(default_factory=list)


def primitives(
    client: Client, targets: list[WorkflowHandle[TargetWorkflow, int]]
) -> list[Primitive]:
    run = uuid.uuid4().hex[:8]

    def target(i: int) -> WorkflowHandle[TargetWorkflow, int]:
        return targets[i % len(targets)]

    async def start_and_complete(i: int) -> int:
        return await client.execute_workflow(
            OnceWorkflow.run, id=f"once-{run}-{i}", task_queue=TASK_QUEUE
        )

    async def parent_and_child(i: int) -> int:
        return await client.execute_workflow(
            ParentWorkflow.run, f"child-{run}-{i}", id=f"parent-{run}-{i}", task_queue=TASK_QUEUE
        )

    return [
        Primitive("signal", lambda i: target(i).signal(TargetWorkflow.poke)),
        Primitive("query", lambda i: target(i).query(TargetWorkflow.count)),
        Primitive("update", lambda i: target(i).execute_update(TargetWorkflow.bump)),
        Primitive(
            "update, then an activity",
            lambda i: target(i).execute_update(TargetWorkflow.bump_and_note),
        ),
        Primitive("workflow started and completed", start_and_complete),
        Primitive("parent and child, both completed", parent_and_child),
    ]


async def measure(ops: int, rounds: int) -> list[Primitive]:
    with tempfile.TemporaryDirectory(prefix="tenure-primitives-") as workdir:
        server = EmbeddedTemporal(log_file=Path(workdir) / "temporal.log")
        async with server:
            assert server.process is not None
            client = await Client.connect(server.address)
            workflows = [TargetWorkflow, OnceWorkflow, ParentWorkflow]
            async with Worker(
                client, task_queue=TASK_QUEUE, workflows=workflows, activities=[noted]
            ):
                targets = [
                    await client.start_workflow(
                        TargetWorkflow.run, id=f"target-{uuid.uuid4().hex}", task_queue=TASK_QUEUE
                    )
                    for _ in range(TARGETS)
                ]
                measured = primitives(client, targets)
                await drive(measured[0].operation, TARGETS, CONCURRENCY, 60.0)  # warm up
                for _ in range(rounds):
                    for primitive in measured:
                        await _slice(primitive, server.process.pid, ops)
                for handle in targets:
                    await handle.signal(TargetWorkflow.finish)
    return measured


async def _slice(primitive: Primitive, server_pid: int, ops: int) -> None:
    server_before, process_before = cpu_seconds(server_pid), time.process_time()
    started = time.perf_counter()
    done = await drive(primitive.operation, ops, CONCURRENCY, 300.0)
    elapsed = time.perf_counter() - started
    if done.errors or done.timed_out:
        raise RuntimeError(f"{primitive.name}: {done.errors} failed ({done.first_error})")
    await asyncio.sleep(SETTLE_SECONDS)
    primitive.server_ms.append(1000 * (cpu_seconds(server_pid) - server_before) / done.ops)
    primitive.process_ms.append(1000 * (time.process_time() - process_before) / done.ops)
    primitive.per_second.append(done.ops / elapsed)


def report(measured: list[Primitive], ops: int, rounds: int) -> str:
    signal = statistics.median(measured[0].server_ms)
    rows = [
        f"Temporal's CPU per operation, {ops} operations a round from {CONCURRENCY} clients, "
        f"median of {rounds} rounds (spread in brackets):",
        "",
        "| primitive | server CPU ms | x a signal | client and worker CPU ms | per second |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in measured:
        server = statistics.median(p.server_ms)
        rows.append(
            f"| {p.name} | {server:.1f} ({min(p.server_ms):.1f}-{max(p.server_ms):.1f}) "
            f"| {server / signal:.1f} | {statistics.median(p.process_ms):.1f} "
            f"| {statistics.median(p.per_second):.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=600, help="operations per slice")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    measured = asyncio.run(measure(args.ops, args.rounds))
    print(report(measured, args.ops, args.rounds))


if __name__ == "__main__":
    main()
