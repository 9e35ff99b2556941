"""A closed-loop load driver: a fixed number of clients send a bounded number of operations
and each operation's latency is recorded."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Measured:
    """What one load run did: operations completed and failed, wall time, latencies."""

    ops: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None
    timed_out: bool = False
    sending: float = 0.0
    slice_rates: list[float] = field(default_factory=list)
    slice_p99_ms: list[float] = field(default_factory=list)

    def add(self, part: Measured, elapsed: float) -> None:
        """Count in one slice of a load that took `elapsed` seconds, settling included."""
        if elapsed > 0:
            self.slice_rates.append(part.ops / elapsed)
        self.slice_p99_ms.append(part.p99_ms)
        self.ops += part.ops
        self.errors += part.errors
        self.latencies += part.latencies
        self.first_error = self.first_error or part.first_error
        self.timed_out = self.timed_out or part.timed_out
        self.sending += part.elapsed
        self.elapsed += elapsed

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank] * 1000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(0.99)


async def drive(
    operation: Callable[[int], Awaitable[object]],
    count: int,
    concurrency: int,
    time_limit: float,
) -> Measured:
    """Run `operation(0..count-1)` from `concurrency` clients, each starting its next
    operation when the last one returns; stops early, marked timed out, after `time_limit`."""
    measured = Measured()
    next_index = 0
    deadline = time.perf_counter() + time_limit

    async def client() -> None:
        nonlocal next_index
        while next_index < count:
            if time.perf_counter() > deadline:
                measured.timed_out = True
                return
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                await operation(index)
            except Exception as exc:
                measured.errors += 1
                measured.first_error = measured.first_error or f"{type(exc).__name__}: {exc}"
                continue
            measured.latencies.append(time.perf_counter() - started)
            measured.ops += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, max(count, 1)))))
    measured.elapsed = measured.sending = time.perf_counter() - started
    return measured
