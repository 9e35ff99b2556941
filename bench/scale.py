"""How big a benchmark run is: `small` for a quick look, `default` for stable figures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """Operation counts of each scenario; every scenario but the mixed one, whose 64 clients
    are part of what it tests, uses the same client concurrency."""

    name: str
    concurrency: int
    entities: int
    writes: int
    waited_writes: int
    reads: int
    hot_commands: int
    many_entities: tuple[int, ...]
    checkouts: int
    mixed_hot: int
    mixed_spread: int
    time_limit: float
    rounds: int = 4
    idle_runs: int = 50  # single operations on an idle stack, one at a time, of each kind


SCALES = {
    "small": Scale(
        name="small",
        concurrency=32,
        entities=50,
        # Slices of 600: asking 50 entities whether they applied theirs (`_applied`) takes
        # about 0.1 s a slice on either side, which would favour the slower side more in
        # shorter slices.
        writes=2_400,
        waited_writes=300,
        reads=2_000,
        hot_commands=2_000,
        many_entities=(100, 1_000),
        checkouts=30,
        mixed_hot=1_000,
        mixed_spread=500,
        time_limit=60.0,
    ),
    "default": Scale(
        name="default",
        concurrency=32,
        entities=100,
        writes=8_000,
        waited_writes=3_000,
        reads=10_000,
        hot_commands=10_000,
        many_entities=(100, 1_000, 10_000),
        checkouts=200,
        mixed_hot=4_000,
        mixed_spread=2_000,
        time_limit=240.0,
        idle_runs=100,
    ),
}
