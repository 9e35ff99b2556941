"""Reading the listing index (workers/index.py): one page of a type's entities in a filter
and an order, resumed after a keyset cursor, and the counts per status.

A page costs a few round trips whatever the index's size: the sorted sets are read by
lexicographic range from the cursor. Filters the chosen index cannot answer itself are
checked against each candidate's stored entry, and a page scans at most `SCAN_BUDGET`
candidates: a sparse filter may answer a page shorter than asked, with `has_next` and a
cursor to go on from. Text and number filters read their matches at once when there are
at most `MATCH_LIMIT` of them, and sort those; any other filter reads its candidates at
once when there are at most `COUNTED` of them (one account's carts), and counts them.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from redis.exceptions import ResponseError

from workers.cache import CacheUnavailable, RedisClient, SnapshotCache
from workers.failures import REDIS_FAILURES
from workers.index import STATUS, StoredEntry, index_base, updated_key

SCAN_BUDGET = 2_000
MATCH_LIMIT = 5_000
COUNTED = 500
"""Candidates a filter the index cannot answer alone reads all at once, for its exact total."""
_CHUNK = 200


class Order(StrEnum):
    UPDATED_DESC = "UPDATED_DESC"
    ID = "ID"


@dataclass(frozen=True)
class ListFilter:
    """Which entities a listing shows. `tags` maps a tag (`status`, `account_id`) to the
    values allowed; `ids`, when set, is every id allowed (a customer's accounts); `below`
    maps a number to the bound it must be under; `closed` None shows closed entities and
    the rest, False leaves closed ones out, True shows only them."""

    tags: Mapping[str, frozenset[str]] = field(default_factory=dict)
    ids: frozenset[str] | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    text: str | None = None
    below: Mapping[str, int] = field(default_factory=dict)
    closed: bool | None = None

    def admits(self, entity_id: str, entry: StoredEntry) -> bool:
        if self.ids is not None and entity_id not in self.ids:
            return False
        if self.closed is not None and entry.closed is not self.closed:
            return False
        for tag, allowed in self.tags.items():
            if entry.tags.get(tag) not in allowed:
                return False
        # The index keeps times to the millisecond: one updated in a bound's own millisecond
        # is in, after it or before it, rather than missed.
        if self.updated_after and entry.updated > updated_key(self.updated_after):
            return False
        if self.updated_before and entry.updated < updated_key(self.updated_before):
            return False
        if self.text is not None and not any(t.startswith(self.text) for t in entry.text):
            return False
        return all(
            name in entry.numbers and entry.numbers[name] < bound
            for name, bound in self.below.items()
        )


@dataclass(frozen=True)
class Page:
    """A page of ids in order, each with the key a cursor after it resumes from."""

    ids: list[str]
    keys: list[str]
    has_next: bool
    end_key: str | None
    total: int | None


def sort_key(order: Order, entity_id: str, entry: StoredEntry) -> str:
    return f"{entry.updated}:{entity_id}" if order is Order.UPDATED_DESC else entity_id


def _id_of(order: Order, member: str) -> str:
    return member.split(":", 1)[1] if order is Order.UPDATED_DESC else member


class EntityIndex:
    """Pages and counts of one Redis's listing index, under the cache's key prefix."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    @classmethod
    def of(cls, cache: SnapshotCache) -> EntityIndex:
        """The index the cache's writes keep, on the cache's Redis and key prefix."""
        return cls(cache.client, cache.prefix)

    async def page(
        self,
        entity_type: str,
        where: ListFilter,
        order: Order,
        first: int,
        after: str | None = None,
    ) -> Page:
        """Up to `first` ids in `order` after the key `after`, with the filter's total when
        it is known without scanning."""
        base = index_base(self._prefix, entity_type)
        try:
            matches = await self._bounded_matches(base, where)
            if matches is not None:
                return await self._page_of(base, matches, where, order, first, after)
            return await self._walk(base, where, order, first, after)
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def count_tagged(
        self, entity_type: str, tag: str, value: str, statuses: frozenset[str]
    ) -> int | None:
        """How many of the type's entities tagged `tag=value` (one account's carts) are in
        `statuses`. More than SCAN_BUDGET carry the tag (an account of thousands of carts,
        checked out): counted in Redis, by intersecting the tag's set with each status's;
        None when the server cannot (ZINTERCARD came in Redis 7)."""
        base = index_base(self._prefix, entity_type)
        tagged_key = base + f"t:{tag}:{value}:i"
        try:
            tagged: list[bytes] = await self._client.zrange(  # type: ignore[assignment]
                tagged_key, b"-", b"+", bylex=True, offset=0, num=SCAN_BUDGET + 1
            )
            if len(tagged) > SCAN_BUDGET:
                return await self._count_both(
                    tagged_key, [base + f"t:{STATUS}:{status}:i" for status in sorted(statuses)]
                )
            entries = await self._entries(base, [member.decode() for member in tagged])
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return sum(1 for entry in entries.values() if entry.tags.get(STATUS) in statuses)

    async def _count_both(self, tagged_key: str, status_keys: list[str]) -> int | None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for status_key in status_keys:
                    pipe.zintercard(2, [tagged_key, status_key])
                counts: list[int] = await pipe.execute()
        except ResponseError:  # an older server
            return None
        return sum(counts)

    async def counts(self, entity_type: str) -> tuple[dict[str, int], int]:
        """How many entities of the type are in each status, and in all."""
        base = index_base(self._prefix, entity_type)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(base + "c")
                pipe.hlen(base + "e")
                by_status, total = await pipe.execute()
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        counted = {k.decode(): int(v) for k, v in by_status.items() if int(v) > 0}
        return dict(sorted(counted.items())), int(total)

    async def _bounded_matches(self, base: str, where: ListFilter) -> list[str] | None:
        """Every id the most selective filter admits, when there are few enough to sort."""
        if where.ids is not None:
            return sorted(where.ids)
        if where.text is not None:
            found: list[bytes] = await self._client.zrange(  # type: ignore[assignment]
                base + "x",
                f"[{where.text}".encode(),
                f"[{where.text}".encode() + b"\xff",
                bylex=True,
                offset=0,
                num=MATCH_LIMIT + 1,
            )
            if len(found) <= MATCH_LIMIT:
                return sorted({member.split(b"\0", 1)[1].decode() for member in found})
        for name, bound in where.below.items():
            below: list[bytes] = await self._client.zrange(  # type: ignore[assignment]
                base + f"n:{name}",
                "-inf",
                f"({bound}",
                byscore=True,
                offset=0,
                num=MATCH_LIMIT + 1,
            )
            if len(below) <= MATCH_LIMIT:
                return [member.decode() for member in below]
        return None

    async def _entries(self, base: str, ids: list[str]) -> dict[str, StoredEntry]:
        if not ids:
            return {}
        raw: list[bytes | None] = await self._client.hmget(base + "e", ids)  # type: ignore[assignment]
        return {i: StoredEntry.decode(r) for i, r in zip(ids, raw, strict=True) if r is not None}

    async def _page_of(
        self,
        base: str,
        ids: list[str],
        where: ListFilter,
        order: Order,
        first: int,
        after: str | None,
    ) -> Page:
        entries = await self._entries(base, ids)
        admitted = sorted(
            sort_key(order, i, entry) for i, entry in entries.items() if where.admits(i, entry)
        )
        rest = [key for key in admitted if after is None or key > after]
        shown = rest[:first]
        return Page(
            ids=[_id_of(order, key) for key in shown],
            keys=shown,
            has_next=len(rest) > first,
            end_key=shown[-1] if shown else after,
            total=len(admitted),
        )

    def _sources(self, base: str, where: ListFilter, order: Order) -> tuple[list[str], str]:
        """The sorted sets whose union is read in order, and the tag they answer (whose
        filter then needs no check): an owner's tag (`account_id`) before the status, the
        fewer members, and a customer's listing reads its own entities alone, so that no
        page, total or cursor of its can name another's, whatever cursor it sends."""
        suffix = "u" if order is Order.UPDATED_DESC else "i"
        others = (tag for tag in sorted(where.tags) if tag != STATUS)
        chosen = next(others, STATUS if STATUS in where.tags else "")
        if not chosen:
            return [base + suffix], ""
        values = sorted(where.tags[chosen])
        return [base + f"t:{chosen}:{value}:{suffix}" for value in values], chosen

    def _range(self, where: ListFilter, order: Order) -> tuple[bytes, bytes]:
        low, high = b"-", b"+"
        if order is Order.UPDATED_DESC:
            # Newest first is ascending inverted time: after a moment is below its key. A
            # member is `<key>:<id>`, and ';' follows ':': each bound takes its own millisecond.
            if where.updated_after is not None:
                high = f"({updated_key(where.updated_after)};".encode()
            if where.updated_before is not None:
                low = f"({updated_key(where.updated_before)}:".encode()
        return low, high

    async def _few_candidates(
        self, sources: list[str], low: bytes, high: bytes
    ) -> list[bytes] | None:
        """Every member of the sources in the range, when there are at most `COUNTED`."""
        async with self._client.pipeline(transaction=False) as pipe:
            for source in sources:
                pipe.zlexcount(source, low, high)
            if sum(int(n) for n in await pipe.execute()) > COUNTED:
                return None
        async with self._client.pipeline(transaction=False) as pipe:
            for source in sources:
                pipe.zrange(source, low, high, bylex=True, offset=0, num=COUNTED + 1)
            chunks: list[list[bytes]] = await pipe.execute()
        members = [member for chunk in chunks for member in chunk]
        return members if len(members) <= COUNTED else None

    async def _walk(
        self, base: str, where: ListFilter, order: Order, first: int, after: str | None
    ) -> Page:
        sources, answered = self._sources(base, where, order)
        low, high = self._range(where, order)
        checked = {k: v for k, v in where.tags.items() if k != answered}
        residual = ListFilter(
            tags=checked,
            updated_after=where.updated_after if order is Order.ID else None,
            updated_before=where.updated_before if order is Order.ID else None,
            text=where.text,
            below=where.below,
            closed=where.closed,
        )
        needs_check = residual != ListFilter()
        if needs_check:
            few = await self._few_candidates(sources, low, high)
            if few is not None:  # read them all: the page, and its exact total
                ids = [_id_of(order, member.decode()) for member in few]
                return await self._page_of(base, ids, where, order, first, after)
        if after is not None:
            past_cursor = b"(" + after.encode()
            if low == b"-" or past_cursor[1:] > low[1:]:
                low = past_cursor
        total: int | None = None
        if not needs_check:
            count_low, count_high = self._range(where, order)
            async with self._client.pipeline(transaction=False) as pipe:
                for source in sources:
                    pipe.zlexcount(source, count_low, count_high)
                total = sum(int(n) for n in await pipe.execute())
        shown: list[str] = []
        scanned = 0
        while True:
            async with self._client.pipeline(transaction=False) as pipe:
                for source in sources:
                    pipe.zrange(source, low, high, bylex=True, offset=0, num=_CHUNK)
                chunks: list[list[bytes]] = await pipe.execute()
            # Past the smallest last member of a full chunk, its source may hold more.
            full = [chunk[-1] for chunk in chunks if len(chunk) == _CHUNK]
            bound = min(full) if full else None
            members = [m.decode() for m in heapq.merge(*chunks) if bound is None or m <= bound]
            scanned += len(members)
            admitted = members
            if needs_check and members:
                ids = [_id_of(order, m) for m in members]
                entries = await self._entries(base, ids)
                admitted = [
                    m
                    for m, i in zip(members, ids, strict=True)
                    if i in entries and residual.admits(i, entries[i])
                ]
            for member in admitted:
                if len(shown) == first:
                    return _page(order, shown, True, shown[-1] if shown else after, total)
                shown.append(member)
            if bound is None:
                return _page(order, shown, False, shown[-1] if shown else after, total)
            if scanned >= SCAN_BUDGET:
                # Everything up to the last member scanned has been looked at.
                resume = shown[-1] if len(shown) == first else members[-1]
                return _page(order, shown, True, resume, total)
            low = b"(" + bound


def _page(
    order: Order, keys: list[str], has_next: bool, end: str | None, total: int | None
) -> Page:
    return Page([_id_of(order, k) for k in keys], keys, has_next, end, total)
