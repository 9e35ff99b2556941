"""Ended entities are forgotten from Redis once their retention has passed: their snapshot,
listing entries and change-stream mark, and nothing of a live entity or of an id used again
(workers/forgetting.py). Against a real Redis; in a cluster in test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from temporalio.client import Client

from api.gateway import EntityGateway
from entities.runtime.envelope import Snapshot
from tests.conftest import new_id
from tests.entities.shop import eventually
from tests.entities.test_runtime import open_active
from tests.workers.test_change_stream import applied
from tests.workers.test_index import account
from workers.cache import SnapshotCache, connect_redis
from workers.changes import Changes, marks_key
from workers.forgetting import EndedEntities
from workers.index import ENDED, index_base
from workers.listing import EntityIndex, ListFilter, Order
from workers.settings import Settings, SettingsError
from workers.temporal import namespace_retention
from workers.worker import run_worker


@pytest.fixture
async def own_cache(settings: Settings) -> AsyncIterator[SnapshotCache]:
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"
    client = connect_redis(settings)
    yield SnapshotCache(client, prefix)
    await client.aclose()


def ended_now(snapshot: Snapshot) -> Snapshot:
    """`snapshot` as made now: its end, if it is closed, is within any retention."""
    return snapshot.model_copy(update={"updated_at": datetime.now(UTC)})


async def ended_entities_are_forgotten_whole(cache: SnapshotCache) -> None:
    """The scenario, for one Redis and for a cluster: a live account, one that ended long
    ago, one that ended just now, and one that ended and whose id was used again (a new
    incarnation) before any sweep. `account` snapshots are from 2025."""
    index = EntityIndex(cache.client, cache.prefix)
    live, old, recent, again = (new_id() for _ in range(4))
    for entity_id in (live, old, recent, again):
        assert await cache.put(account(entity_id, 2), Changes(0, applied(1, 2)))
    assert await cache.put(account(old, 3, "CLOSED"), Changes(2, applied(3)))
    assert await cache.put(ended_now(account(recent, 3, "CLOSED")), Changes(2, applied(3)))
    assert await cache.put(account(again, 3, "CLOSED"), Changes(2, applied(3)))
    assert await cache.put(account(again, 1, "ACTIVE", incarnation=2), Changes(0, applied(1)))
    ended = EndedEntities(cache)
    assert sorted(await ended.ended("account")) == sorted([old, recent])

    assert (await ended.sweep(3600)).by_type["account"] == 1
    assert await cache.get("account", old) is None
    assert await cache.get("account", recent) is not None
    every = await index.page("account", ListFilter(), Order.ID, 10)
    assert sorted(every.ids) == sorted([live, recent, again])
    assert await index.counts("account") == ({"ACTIVE": 2, "CLOSED": 1}, 3)
    marks = marks_key(cache.prefix, "account")
    assert await cache.client.hget(marks, old) is None
    assert await cache.client.hget(marks, live) == b"1:2"
    assert await ended.ended("account") == [recent]
    for entity_id, revision in ((live, 2), (again, 1)):
        hit = await cache.get("account", entity_id)
        assert hit is not None and hit.snapshot.revision == revision

    # A late write of an older revision (a retried publish, a snapshot kept while Redis was
    # away) is refused as before: the forgotten entity does not come back as a live one.
    assert not await cache.put(account(old, 2))
    assert await cache.get("account", old) is None
    assert old not in (await index.page("account", ListFilter(), Order.ID, 10)).ids
    assert await ended.ended("account") == [recent]
    # A late publish of its end, with its changes, streams nothing and leaves no mark.
    assert not await cache.put(account(old, 3, "CLOSED"), Changes(2, applied(3)))
    assert await cache.client.hget(marks, old) is None
    assert await ended.ended("account") == [recent]
    # An id used again after it was forgotten is a new entity, kept past the tombstone's
    # day, and ended when it ends.
    assert await cache.put(account(old, 1, "ACTIVE", incarnation=2))
    assert await cache.client.pttl(cache.key("account", old)) == -1
    assert await cache.put(ended_now(account(old, 2, "CLOSED", incarnation=2)))
    assert sorted(await ended.ended("account")) == sorted([old, recent])
    assert (await ended.sweep(3600)).total == 0
    # One that ended before ends were kept is ended by the next write of its end (a
    # retried publish, `tenure reindex`), though that write finds it stored already.
    before = new_id()
    await ended_before_ends_were_kept(cache, account(before, 4, "CLOSED"))
    assert not await cache.put(account(before, 4, "CLOSED"))
    assert before in await ended.ended("account")
    assert (await ended.sweep(3600)).total == 1
    assert await cache.get("account", before) is None


async def test_an_ended_entity_is_forgotten_whole_once_its_retention_has_passed(
    own_cache: SnapshotCache,
) -> None:
    await ended_entities_are_forgotten_whole(own_cache)


async def test_entities_filled_in_bulk_are_ended_as_written(own_cache: SnapshotCache) -> None:
    """`tenure reindex` writes with `put_many`: the closed entities it finds are ended,
    those the cache held already closed too (they ended before ends were kept)."""
    closed, live, before = new_id(), new_id(), new_id()
    await ended_before_ends_were_kept(own_cache, account(before, 5, "CLOSED"))
    ended = EndedEntities(own_cache)
    assert await ended.ended("account") == []
    written = [account(closed, 4, "CLOSED"), account(live, 2), account(before, 5, "CLOSED")]
    assert await own_cache.put_many(written) == 2
    assert sorted(await ended.ended("account")) == sorted([closed, before])
    assert (await ended.sweep(3600)).total == 2
    assert await own_cache.get("account", before) is None
    assert await own_cache.get("account", closed) is None
    assert await own_cache.get("account", live) is not None


async def ended_before_ends_were_kept(cache: SnapshotCache, closed: Snapshot) -> None:
    """`closed` written as the scripts before 2026-12-07 left it: cached and indexed, and
    in no ended set."""
    assert await cache.put(closed)
    ended = index_base(cache.prefix, closed.entity_type) + ENDED
    await cache.client.zrem(ended, closed.entity_id)


async def test_a_worker_forgets_an_account_closed_past_its_retention(
    temporal_client: Client, settings: Settings, cache: SnapshotCache
) -> None:
    """The worker process's own sweeper, at TENURE_ENDED_RETENTION_SECONDS: an account that
    ended more than that ago (in 2025) leaves the cache and the listing when the worker
    starts; one the worker closes now is kept, ended, and an open one stays."""
    settings = settings.model_copy(update={"ended_retention_seconds": 3600.0})
    gateway = EntityGateway(temporal_client, cache, settings)
    long_ago = new_id()
    assert await cache.put(account(long_ago, 3, "CLOSED"))
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    try:
        await eventually(lambda: cache.get("account", long_ago), lambda hit: hit is None)
        closed, kept = new_id(), new_id()
        await open_active(gateway, closed)
        await open_active(gateway, kept)
        await gateway.send("account", closed, "close", {}, wait=True)
        await eventually(
            lambda: EndedEntities(cache).ended("account"), lambda ended: closed in ended
        )
        listed = await EntityIndex(cache.client, cache.prefix).page(
            "account", ListFilter(), Order.ID, 500
        )
        assert long_ago not in listed.ids and {closed, kept} <= set(listed.ids)
        hit = await cache.get("account", closed)
        assert hit is not None and hit.snapshot.closed
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(worker, 60)


async def test_unset_retention_is_the_namespace_s_own(
    temporal_client: Client, settings: Settings
) -> None:
    """Temporal's retention of closed workflows, as it says; None for a namespace it does
    not know (the sweeper then waits)."""
    seconds = await namespace_retention(temporal_client, settings.temporal_namespace)
    assert seconds is not None and seconds >= 3600
    assert await namespace_retention(temporal_client, f"no-such-{new_id()}") is None


def test_a_retention_under_an_hour_is_refused() -> None:
    """Within an hour of its end an entity may still publish its changes: forgotten before,
    they would be streamed again."""
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"TENURE_ENDED_RETENTION_SECONDS": "60"})
    assert "TENURE_ENDED_RETENTION_SECONDS" in str(refused.value)
    assert Settings.from_env({"TENURE_ENDED_RETENTION_SECONDS": "0"}).ended_retention_seconds == 0
