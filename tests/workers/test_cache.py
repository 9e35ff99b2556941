"""The last-seen cache on a real Redis: conditional writes, stale reads, Redis outages."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime

import pytest
from temporalio.client import Client

from api.gateway import Consistency, EntityGateway
from deploy.embedded import EmbeddedRedis
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import Snapshot
from tests.conftest import WorkerFactory, new_id
from workers.cache import CacheUnavailable, SnapshotCache, UnsavedSnapshots, connect_redis
from workers.settings import Settings


def snapshot(
    entity_id: str, revision: int, balance: int | None = None, incarnation: int = 1
) -> Snapshot:
    return Snapshot(
        entity_type="account",
        entity_id=entity_id,
        revision=revision,
        updated_at=datetime.now(UTC),
        state={"balance": revision if balance is None else balance},
        incarnation=incarnation,
    )


async def test_a_write_never_moves_the_cache_backwards(cache: SnapshotCache) -> None:
    entity_id = new_id()
    assert await cache.put(snapshot(entity_id, 5))
    assert not await cache.put(snapshot(entity_id, 3))
    assert not await cache.put(snapshot(entity_id, 5, balance=999))
    hit = await cache.get("account", entity_id)
    assert hit is not None and hit.snapshot.revision == 5 and hit.snapshot.state == {"balance": 5}
    assert await cache.put(snapshot(entity_id, 6))
    hit = await cache.get("account", entity_id)
    assert hit is not None and hit.snapshot.revision == 6


async def test_racing_writes_leave_the_newest_revision(cache: SnapshotCache) -> None:
    entity_id = new_id()
    revisions = list(range(1, 201))
    random.Random(3).shuffle(revisions)
    await asyncio.gather(*(cache.put(snapshot(entity_id, r)) for r in revisions))
    hit = await cache.get("account", entity_id)
    assert hit is not None and hit.snapshot.revision == 200


async def test_a_later_incarnation_replaces_the_entry_and_an_earlier_one_never_does(
    cache: SnapshotCache,
) -> None:
    entity_id = new_id()
    assert await cache.put(snapshot(entity_id, 57, incarnation=1_000))
    # The id was reused after the closed entity was deleted: its revisions start again.
    assert await cache.put(snapshot(entity_id, 1, balance=0, incarnation=2_000))
    # A late write of the earlier incarnation, whatever its revision, is refused.
    assert not await cache.put(snapshot(entity_id, 58, incarnation=1_000))
    hit = await cache.get("account", entity_id)
    assert hit is not None and hit.snapshot.incarnation == 2_000
    assert hit.snapshot.revision == 1 and hit.snapshot.state == {"balance": 0}
    assert await cache.put(snapshot(entity_id, 2, incarnation=2_000))


async def test_an_entry_written_before_incarnations_gives_way_to_its_entity(
    cache: SnapshotCache, settings: Settings
) -> None:
    entity_id = new_id()
    key = cache.key("account", entity_id)
    client = connect_redis(settings)
    try:
        old = snapshot(entity_id, 9).model_dump(mode="json", exclude={"incarnation"})
        await client.hset(
            key, mapping={"revision": 9, "snapshot": json.dumps(old), "cached_at": "1.0"}
        )
    finally:
        await client.aclose()
    hit = await cache.get("account", entity_id)
    assert hit is not None and hit.snapshot.incarnation == 0 and hit.snapshot.revision == 9
    assert not await cache.put(snapshot(entity_id, 9, incarnation=0))
    assert await cache.put(snapshot(entity_id, 10, incarnation=5_000))


async def test_a_miss_is_none(cache: SnapshotCache) -> None:
    assert await cache.get("account", new_id()) is None


async def open_with_balance(gateway: EntityGateway, account_id: str, balance: int) -> None:
    await gateway.send(
        "account", account_id, "open", {"owner_name": "A", "email": "a@b.io"}, wait=True
    )
    await gateway.send("account", account_id, "verify", {}, wait=True)
    await gateway.send("account", account_id, "deposit", {"amount": balance}, wait=True)


async def test_a_live_read_with_no_worker_returns_the_cached_state_marked_stale(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker():
        await open_with_balance(gateway, account_id, 42)
    # No worker polls now: the query cannot be answered, the cache still can.
    read = await asyncio.wait_for(gateway.read("account", account_id, Consistency.LIVE), 10)
    assert read is not None and read.stale and read.source == "CACHE"
    assert read.snapshot.state is not None and read.snapshot.state["balance"] == 42
    cached = await gateway.read("account", account_id, Consistency.CACHED)
    assert cached is not None and not cached.stale and cached.snapshot.revision == 3
    # Commands are still accepted durably and applied once a worker is back.
    await gateway.send("account", account_id, "deposit", {"amount": 8}, idempotency_key="d2")
    async with run_worker():
        # Retried with its key on UNAVAILABLE, as a client does while a worker takes over.
        for attempt in range(5):
            try:
                done = await gateway.send(
                    "account", account_id, "deposit", {"amount": 8}, idempotency_key="d2", wait=True
                )
                break
            except TenureError as exc:
                assert exc.code is ErrorCode.UNAVAILABLE and attempt < 4
    assert done.read is not None and done.read.snapshot.state["balance"] == 50  # type: ignore[index]


async def test_reads_and_writes_keep_working_while_redis_is_down(
    temporal_client: Client,
    own_redis_settings: Settings,
    own_cache: SnapshotCache,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
) -> None:
    settings, cache = own_redis_settings, own_cache
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings, cache):
        await open_with_balance(gateway, account_id, 10)
        own_redis.stop()
        with pytest.raises(CacheUnavailable):
            await cache.get("account", account_id)
        # Writes, waited and not, and reads of both kinds still work, served live.
        await gateway.send("account", account_id, "deposit", {"amount": 5})
        applied = await gateway.send("account", account_id, "deposit", {"amount": 1}, wait=True)
        assert applied.read is not None and applied.read.snapshot.state["balance"] == 16  # type: ignore[index]
        for consistency in (Consistency.CACHED, Consistency.LIVE):
            read = await gateway.read("account", account_id, consistency)
            assert read is not None and read.source == "LIVE" and not read.stale
            assert read.snapshot.revision == 5
        # Redis comes back empty; the entity republishes its state without being asked.
        await own_redis.start()
        hit = None
        for _ in range(150):
            hit = await cache.get("account", account_id)
            if hit is not None and hit.snapshot.revision == 5:
                break
            await asyncio.sleep(0.1)
        assert hit is not None and hit.snapshot.revision == 5
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 16


def flushers() -> set[asyncio.Task[object]]:
    return {
        task
        for task in asyncio.all_tasks()
        if not task.done() and "UnsavedSnapshots._flush" in task.get_coro().__qualname__  # type: ignore[union-attr]
    }


async def test_a_closed_cache_stops_retrying_the_writes_redis_refused(
    own_cache: SnapshotCache, own_redis: EmbeddedRedis
) -> None:
    """Its owner (the API, a worker) shut down: nothing of it goes on retrying a dead Redis."""
    cache = own_cache
    others = flushers()
    own_redis.stop()
    kept = snapshot(new_id(), 3)
    assert await cache.put_newest(kept) == kept  # kept, to be written once Redis answers
    await asyncio.sleep(0.6)
    assert len(flushers() - others) == 1  # still retrying
    await cache.aclose()
    assert flushers() - others == set()
    # A snapshot kept after the close (an activity outliving its worker) starts none.
    assert await cache.put_newest(snapshot(kept.entity_id, 4)) is not None
    assert flushers() - others == set()


async def test_snapshots_kept_while_redis_is_down_are_bounded_in_bytes() -> None:
    """While Redis is down, each snapshot that could not be written is kept (so reads do not
    go back), up to 10,000 of them whatever their size: at 512 KiB a state, gigabytes, by
    anyone reading many entities meanwhile. They are bounded in bytes too, oldest dropped
    first; the newest is still answered."""

    async def down(_: Snapshot) -> bool:
        raise CacheUnavailable("Redis is down")

    unsaved = UnsavedSnapshots(down, max_bytes=8 * 1024 * 1024, retry_seconds=60)
    big = "x" * (1024 * 1024)
    try:
        for n in range(100):
            unsaved.keep(snapshot(f"acct-{n}", 2).model_copy(update={"state": {"note": big}}))
        assert unsaved.kept_bytes <= 8 * 1024 * 1024
        newest = unsaved.newest(snapshot("acct-99", 1))
        assert newest.revision == 2
        assert unsaved.newest(snapshot("acct-0", 1)).revision == 1  # dropped, the oldest
    finally:
        await unsaved.aclose()
