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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

T = TypeVar("T")

CHUNK = 5
"""Items completed between two turns; a list no longer than this is never paced."""

_turns: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = WeakKeyDictionary()


async def take_turn() -> None:
    """Wait behind everything ready on this loop, one long list at a time."""
    loop = asyncio.get_running_loop()
    lock = _turns.get(loop)
    if lock is None:
        lock = _turns[loop] = asyncio.Lock()
    async with lock:
        await asyncio.sleep(0)


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
