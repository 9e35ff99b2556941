"""How big a benchmark run is: `small` for a quick look, `default` for stable figures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """Operation counts of each scenario; every scenario uses the same client concurrency."""

    name: str
    concurrency: int
    entities: int
    writes: int
    waited_writes: int
    reads: int
    hot_commands: int
    many_entities: tuple[int, ...]
    checkouts: int
    time_limit: float
    rounds: int = 4


SCALES = {
    "small": Scale(
        name="small",
        concurrency=32,
        entities=50,
        writes=1_200,
        waited_writes=300,
        reads=2_000,
        hot_commands=2_000,
        many_entities=(100, 1_000),
        checkouts=30,
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
        time_limit=240.0,
    ),
}
