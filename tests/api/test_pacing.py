"""Long lists are answered in turns: while one is completed, other work on the event loop
runs between its chunks; short lists stay plain."""

from __future__ import annotations

import asyncio
import time

import pytest
import strawberry

from api import pacing
from api.pacing import CHUNK, HEAVY_SHARE, HEAVY_VALUES, Paced, answering, paced

WORK_SECONDS = 0.000_1


def work() -> None:
    """A tenth of a millisecond of CPU."""
    until = time.perf_counter() + WORK_SECONDS
    while time.perf_counter() < until:
        pass


@strawberry.type
class Line:
    sku: str
    quantity: int


@strawberry.type
class Item:
    @strawberry.field
    def weight(self) -> int:
        work()
        return 1


@strawberry.type
class Query:
    @strawberry.field
    async def items(self, n: int) -> list[Item]:
        return paced(Item() for _ in range(n))

    @strawberry.field
    async def lines(self, n: int) -> list[Line]:
        return paced(Line(sku=f"s{i}", quantity=i) for i in range(n))

    @strawberry.field
    async def plain_lines(self, n: int) -> list[Line]:
        return [Line(sku=f"s{i}", quantity=i) for i in range(n)]


SCHEMA = strawberry.Schema(query=Query)


async def answered_beside_a_ticker(query: str) -> tuple[dict[str, object], int]:
    """The answer, and how many times another task ran while it was being made."""
    ticks = 0
    done = False

    async def tick() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    started = ticks
    result = await SCHEMA.execute(query)
    done = True
    await ticker
    assert result.errors is None and result.data is not None
    return result.data, ticks - started


async def test_a_long_list_is_answered_whole_and_in_order_while_others_run() -> None:
    data, ticks = await answered_beside_a_ticker("{ lines(n: 1000) { sku quantity } }")
    assert data["lines"] == [{"sku": f"s{i}", "quantity": i} for i in range(1000)]
    # Every chunk waited its turn behind the ticker: it ran at least once per chunk.
    assert ticks >= 1000 // CHUNK
    # A plain list is completed in one go: the ticker runs only around it.
    plain, plain_ticks = await answered_beside_a_ticker("{ plainLines(n: 1000) { sku quantity } }")
    assert plain["plainLines"] == data["lines"] and plain_ticks < 10 <= 1000 // CHUNK


async def test_long_lists_of_one_answer_take_turns_with_each_other_too() -> None:
    query = "{ a: lines(n: 500) { sku } b: lines(n: 500) { sku } }"
    data, ticks = await answered_beside_a_ticker(query)
    assert data["a"] == data["b"] == [{"sku": f"s{i}"} for i in range(500)]
    assert ticks >= 1000 // CHUNK


def test_only_lists_longer_than_a_chunk_are_paced() -> None:
    assert type(paced(range(CHUNK))) is list
    long = paced(range(CHUNK + 1))
    assert isinstance(long, Paced) and long == list(range(CHUNK + 1))


async def pauses_beside_busy_readers(heavy: bool, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses a long list of costly items took to leave the loop to 4 readers, each
    doing a tenth of a millisecond at a time, which kept it busy."""
    pauses: list[float] = []

    async def leave_loop(seconds: float) -> None:
        pauses.append(seconds)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(pacing, "leave_loop", leave_loop)
    done = False

    async def reader() -> None:
        while not done:
            work()
            await asyncio.sleep(0)

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    await asyncio.sleep(0)
    with answering(HEAVY_VALUES + 1 if heavy else HEAVY_VALUES):
        result = await SCHEMA.execute("{ items(n: 200) { weight } }")
    done = True
    await asyncio.gather(*readers)
    assert result.errors is None and result.data is not None
    assert len(result.data["items"]) == 200
    return pauses


async def test_a_heavy_answer_leaves_a_busy_loop_to_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An answer of up to HEAVY_VALUES values takes its turns as any other, and no more.
    assert await pauses_beside_busy_readers(False, monkeypatch) == []
    # A heavier one pauses after its chunks, for about nine times each one's work (a
    # chunk is 0.5 ms of it here), less what the others ran meanwhile.
    pauses = await pauses_beside_busy_readers(True, monkeypatch)
    assert len(pauses) >= 200 // CHUNK // 2
    assert max(pauses) <= (1 / HEAVY_SHARE - 1) * pacing._MOST_COUNTED_SECONDS


async def test_a_heavy_answer_on_an_idle_loop_is_answered_as_any_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[float] = []

    async def leave_loop(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(pacing, "leave_loop", leave_loop)
    with answering(HEAVY_VALUES + 1):
        data, ticks = await answered_beside_a_ticker("{ lines(n: 1000) { sku quantity } }")
    assert data["lines"] == [{"sku": f"s{i}", "quantity": i} for i in range(1000)]
    assert ticks >= 1000 // CHUNK
    # The ticker's turns are far shorter than a chunk's work: the loop is not busy.
    assert pauses == []
