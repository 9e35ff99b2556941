"""The benchmark's after-the-fact checks: a read that fails while the stack still works
through a load is read again, and one that never succeeds is reported."""

from __future__ import annotations

import pytest
from temporalio.service import RPCError, RPCStatusCode

from bench.checks import settled


def _timed_out() -> RPCError:
    return RPCError("Timeout expired", RPCStatusCode.CANCELLED, b"")


async def test_a_read_that_times_out_is_read_again_until_the_value_settles() -> None:
    answers: list[int | RPCError] = [_timed_out(), 3, _timed_out(), 5]

    async def read() -> int:
        answer = answers.pop(0)
        if isinstance(answer, RPCError):
            raise answer
        return answer

    assert await settled(read, 5, timeout=5.0) == 5
    assert answers == []


async def test_a_read_that_keeps_failing_is_raised_once_the_time_is_up() -> None:
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        raise _timed_out()

    with pytest.raises(RPCError, match="Timeout expired"):
        await settled(read, 1, timeout=0.3)
    assert reads >= 2


async def test_a_value_short_of_the_expected_one_is_returned_once_the_time_is_up() -> None:
    async def read() -> int:
        return 4

    assert await settled(read, 5, timeout=0.3) == 4
