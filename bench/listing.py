"""A filtered page of 50 accounts out of 100,000 indexed (10,000 at the small scale), from
32 clients, and the listing index's Redis memory per entity.

The accounts are seeded the fast way: their snapshots are written straight into Redis
through the cache's own script (`SnapshotCache.put_many`, one pipeline per 2,000), which
writes each one's index entries as a worker's publish does, without Temporal. Opening
100,000 accounts through Temporal would take the default scale's whole ten minutes; the
listing reads nothing but Redis, so what it measures is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.load import Measured
from bench.scenarios import Bench, Result
from entities.runtime.envelope import Snapshot
from workers.cache import SnapshotCache
from workers.index import index_base

PAGE = 50
SEED_BATCH = 2_000
INDEXED = {"small": 10_000, "default": 100_000}
PAGES = 20  # distinct cursors the clients page from
WRITES_PER_S = 20
STATUSES = ["ACTIVE"] * 16 + ["SUSPENDED"] * 2 + ["DORMANT", "CLOSED"]

LIST = """query($after: String, $since: DateTime!) {
  accounts(filter: {status: [SUSPENDED, DORMANT], updatedAfter: $since}, first: 50,
           after: $after) {
    edges { cursor node { id status ownerName balance updatedAt } }
    pageInfo { hasNextPage endCursor } totalCount } }"""


def _snapshot(tag: str, n: int, now: datetime) -> Snapshot:
    status = STATUSES[n % len(STATUSES)]
    updated = now - timedelta(seconds=(n * 7919) % (30 * 86_400))
    return Snapshot(
        entity_type="account",
        entity_id=f"{tag}-l{n}",
        revision=2,
        updated_at=updated,
        state={
            "status": status,
            "owner_name": f"Owner {n}",
            "email": f"owner{n}@example.com",
            "currency": "EUR",
            "balance": n,
            "last_activity_at": updated.isoformat(),
        },
        closed=status == "CLOSED",
        incarnation=1,
    )


async def _index_bytes(bench: Bench) -> int:
    """MEMORY USAGE of every account index key, exact (every member counted)."""
    client = bench.stack.redis
    base = index_base(bench.stack.settings.redis_prefix, "account")
    total = 0
    async for key in client.scan_iter(match=base.replace("{", "\\{").replace("}", "\\}") + "*"):
        total += int(await client.memory_usage(key, samples=0) or 0)
    return total


async def listing(bench: Bench) -> list[Result]:
    count = INDEXED.get(bench.scale.name, INDEXED["default"])
    cache = SnapshotCache(bench.stack.redis, bench.stack.settings.redis_prefix)
    now = datetime.now(UTC)
    started = time.perf_counter()
    for first in range(0, count, SEED_BATCH):
        batch = [_snapshot(bench.tag, n, now) for n in range(first, min(count, first + SEED_BATCH))]
        await cache.put_many(batch)
    seeded_s = time.perf_counter() - started
    index_bytes = await _index_bytes(bench)

    since = (now - timedelta(days=20)).isoformat()
    cursors: list[str | None] = [None]
    while len(cursors) < PAGES:
        page = (await bench.gql(LIST, after=cursors[-1], since=since))["accounts"]
        cursors.append(page["pageInfo"]["endCursor"])
    wrong = 0
    total_count: int | None = None

    async def one_page(i: int) -> None:
        nonlocal wrong, total_count
        page: dict[str, Any] = (
            await bench.gql(LIST, after=cursors[i % len(cursors)], since=since)
        )["accounts"]
        total_count = page["totalCount"]
        wrong += len(page["edges"]) != PAGE or any(
            e["node"]["status"] not in ("SUSPENDED", "DORMANT") for e in page["edges"]
        )

    await bench.setup(200, one_page)  # warm: connections, parsed documents
    quiet = await bench.drive(one_page, max(2_000, bench.scale.reads))
    written, writes = await _while_written(bench, cache, count, now, one_page)
    problems = [f"{wrong} pages were not 50 matching accounts"] if wrong else []
    details = {
        "indexed": count,
        "matching": total_count,
        "seeded_in_s": round(seeded_s, 1),
        "seeded_by": "SnapshotCache.put_many: the cache's script in pipelines, no Temporal",
        "index_bytes_per_entity": round(index_bytes / count),
    }
    return [
        Result(
            "listing",
            f"filtered page of {PAGE} of {count:,} accounts",
            "pages",
            quiet,
            problems=problems,
            details=details,
        ),
        Result(
            "listing_while_written",
            f"the same, {WRITES_PER_S} account writes/s",
            "pages",
            written,
            problems=problems,
            details={**details, "writes": writes, "writes_per_s": WRITES_PER_S},
        ),
    ]


async def _while_written(
    bench: Bench,
    cache: SnapshotCache,
    count: int,
    now: datetime,
    one_page: Callable[[int], Awaitable[None]],
) -> tuple[Measured, int]:
    """The pages again while a writer changes `WRITES_PER_S` seeded accounts a second, as
    workers' publishes would: each write moves its account to the front of the UPDATED
    order and raises the type's index generation, so a page rendered before it is not
    replayed after it."""
    writes = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            n = (writes * 7_919) % count
            snapshot = _snapshot(bench.tag, n, now)
            await cache.put(
                snapshot.model_copy(
                    update={"revision": 3 + writes, "updated_at": datetime.now(UTC)}
                )
            )
            writes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / WRITES_PER_S)

    writing = asyncio.create_task(writer())
    try:
        measured = await bench.drive(one_page, max(2_000, bench.scale.reads))
    finally:
        stop.set()
        await writing
    return measured, writes
