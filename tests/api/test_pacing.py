"""Long lists are answered in turns: while one is completed, other work on the event loop
runs between its chunks; short lists stay plain."""

from __future__ import annotations

import asyncio

import strawberry

from api.pacing import CHUNK, Paced, paced


@strawberry.type
class Line:
    sku: str
    quantity: int


@strawberry.type
class Query:
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
