"""`python -m bench.primitives`: each primitive's operations all succeed on a real server and
are reported with the server's CPU per operation; one that fails stops the run, naming it,
rather than reporting what the failures cost."""

from __future__ import annotations

import re

import pytest

from bench import primitives


async def test_every_primitive_is_measured_and_reported() -> None:
    measured = await primitives.measure(ops=8, rounds=1)
    names = [p.name for p in measured]
    assert names == [
        "signal",
        "query",
        "update",
        "update, then an activity",
        "workflow started and completed",
        "parent and child, both completed",
    ]
    for p in measured:
        assert len(p.server_ms) == 1 and p.server_ms[0] > 0, p
        assert p.per_second[0] > 0, p
    table = primitives.report(measured, ops=8, rounds=1)
    for name in names:
        assert re.search(rf"^\| {re.escape(name)} \| \d+\.\d \(", table, re.MULTILINE), table


async def test_a_primitive_whose_operations_fail_stops_the_run() -> None:
    async def refused(_: int) -> None:
        raise RuntimeError("refused")

    failing = primitives.Primitive("refused", refused)
    with pytest.raises(RuntimeError, match="refused: 4 failed"):
        await primitives._slice(failing, server_pid=1, ops=4)
