"""Long lists answered in turns, so that one large answer never holds the event loop that
every other request is waiting on.

graphql-core completes a list of plain items in one go: a request for 12 carts of 100 lines
held the API's only event loop for 84 ms, and every reader's p99 went up by as much. A list
that is also an async iterable is completed item by item, awaiting each, which is where a
`Paced` list hands the loop back: every `CHUNK` items it waits its turn behind whatever else
is ready. The turn is one lock per event loop, so the long lists of all requests take turns
with each other too, rather than each queueing its next chunk at once: between two chunks of
long lists, every other ready request gets to run. A chunk is a few hundred values at most,
about a millisecond or two. Short lists stay plain lists, completed at once.

A heavy answer (one that could hold more than `HEAVY_VALUES` values, as `api/response_size.py`
counts it) takes its turns on a lock of its own, and yields more than its turn while other
work is waiting: after each chunk it waits until the loop has spent at most `HEAVY_SHARE` of
its time on heavy answers, so that 32 dashboards reading one small entity each barely notice
one client asking for twelve full carts over and over. On a loop with nothing else to do, a
heavy answer runs at full speed; behind others, it takes longer (a tenth of the loop: ten
times its own CPU), which only its own caller waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

T = TypeVar("T")

CHUNK = 5
"""Items completed between two turns; a list no longer than this is never paced."""
HEAVY_VALUES = 1_000
"""An answer that could hold more values than this is heavy (a full cart, every field of its
100 lines, is about 400)."""
HEAVY_SHARE = 0.1
"""The most of a busy loop's time that heavy answers get."""
_BUSY_SECONDS = 0.000_2
"""A yield that took more of the thread's CPU than this ran other work: the loop is busy.
Times are the thread's CPU time, so that being preempted by another process, or waiting for
the GIL, counts as nothing."""
_MOST_COUNTED_SECONDS = 0.005
"""A heavy answer's work between two turns is counted up to this (more is an await on I/O,
not work of its own)."""


@dataclass
class _HeavyAnswer:
    resumed_at: float


_heavy: ContextVar[_HeavyAnswer | None] = ContextVar("tenure_heavy_answer", default=None)
_turns: WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[asyncio.Lock, asyncio.Lock]] = (
    WeakKeyDictionary()
)


@contextlib.contextmanager
def answering(values: int) -> Iterator[None]:
    """Execute an answer of up to `values` values: its long lists' turns are heavy ones when
    it is heavy."""
    if values <= HEAVY_VALUES:
        yield
        return
    token = _heavy.set(_HeavyAnswer(time.thread_time()))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # ended in a context other than its own
            _heavy.reset(token)


async def take_turn() -> None:
    """Wait behind everything ready on this loop, one long list at a time; a heavy answer
    also leaves the loop to others for long enough to keep to its share."""
    loop = asyncio.get_running_loop()
    locks = _turns.get(loop)
    if locks is None:
        locks = _turns[loop] = (asyncio.Lock(), asyncio.Lock())
    heavy = _heavy.get()
    if heavy is None:
        async with locks[0]:
            await asyncio.sleep(0)
        return
    # Its own work since its last turn, not counting the wait for this one.
    spent = min(time.thread_time() - heavy.resumed_at, _MOST_COUNTED_SECONDS)
    async with locks[1]:
        yielded_at = time.thread_time()
        await asyncio.sleep(0)
        others = time.thread_time() - yielded_at
        rest = spent * (1 / HEAVY_SHARE - 1) - others
        if others > _BUSY_SECONDS and rest > 0:
            await leave_loop(rest)
        heavy.resumed_at = time.thread_time()


async def leave_loop(seconds: float) -> None:
    """A heavy answer's pause, leaving the loop to others."""
    await asyncio.sleep(seconds)


class Paced(list[T]):
    """A list that GraphQL execution completes a chunk at a time, taking turns."""

    def __aiter__(self) -> AsyncIterator[T]:
        return self._in_turns()

    async def _in_turns(self) -> AsyncIterator[T]:
        for index, item in enumerate(list.__iter__(self)):
            if index % CHUNK == 0:
                await take_turn()
            yield item


def holds_long_lists(state: Mapping[str, Any] | None) -> bool:
    """Whether an entity's state has more list items than a chunk: making its GraphQL
    object is then worth a turn of its own (12 reads of a full cart, answered by one batched
    Redis read, made their 1,200 lines back to back)."""
    items = sum(len(v) for v in (state or {}).values() if isinstance(v, list))
    return items > CHUNK


def paced(items: Iterable[T]) -> list[T]:
    """`items` as a list that a GraphQL answer completes in turns when it is long."""
    listed = list(items)
    return Paced(listed) if len(listed) > CHUNK else listed
