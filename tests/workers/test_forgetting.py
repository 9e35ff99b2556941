"""Ended entities are forgotten from Redis once their retention has passed: their snapshot,
listing entries and change-stream mark, and nothing of a live entity or of an id used again
(workers/forgetting.py). Against a real Redis; in a cluster in test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

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
from workers.settings import Settings
from workers.temporal import namespace_retention
from workers.worker import run_worker


@pytest.fixture
async def own_cache(settings: Settings) -> AsyncIterator[SnapshotCache]:
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"
    client = connect_redis(settings)
    yield SnapshotCache(client, prefix)
    await client.aclose()


async def ended_entities_are_forgotten_whole(cache: SnapshotCache) -> None:
    """The scenario, for one Redis and for a cluster: a live account, a closed one, and one
    closed and then used again (a new incarnation) before any sweep."""
    index = EntityIndex(cache.client, cache.prefix)
    live, closed, again = (new_id() for _ in range(3))
    for entity_id in (live, closed, again):
        assert await cache.put(account(entity_id, 2), Changes(0, applied(1, 2)))
    assert await cache.put(account(closed, 3, "CLOSED"), Changes(2, applied(3)))
    assert await cache.put(account(again, 3, "CLOSED"), Changes(2, applied(3)))
    assert await cache.put(account(again, 1, "ACTIVE", incarnation=2), Changes(0, applied(1)))
    ended = EndedEntities(cache)
    assert await ended.ended("account") == [closed]

    # Within retention nothing goes.
    assert (await ended.sweep(3600)).total == 0
    assert await cache.get("account", closed) is not None

    assert (await ended.sweep(0)).by_type["account"] == 1
    assert await cache.get("account", closed) is None
    every = await index.page("account", ListFilter(), Order.ID, 10)
    assert sorted(every.ids) == sorted([live, again])
    assert await index.counts("account") == ({"ACTIVE": 2}, 2)
    marks = marks_key(cache.prefix, "account")
    assert await cache.client.hget(marks, closed) is None
    assert await cache.client.hget(marks, live) == b"1:2"
    assert await ended.ended("account") == []
    for entity_id, revision in ((live, 2), (again, 1)):
        hit = await cache.get("account", entity_id)
        assert hit is not None and hit.snapshot.revision == revision
    # A late repeat of its last publish, written after it was forgotten, ends it again.
    assert await cache.put(account(closed, 3, "CLOSED"))
    assert await ended.ended("account") == [closed]
    # One that ended before ends were kept is ended by the next write of its end (a
    # retried publish, `tenure reindex`), though that write finds it stored already.
    before = new_id()
    await ended_before_ends_were_kept(cache, account(before, 4, "CLOSED"))
    assert not await cache.put(account(before, 4, "CLOSED"))
    assert sorted(await ended.ended("account")) == sorted([closed, before])


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
    assert (await ended.sweep(0)).total == 2
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
    """The worker process's own sweeper, at TENURE_ENDED_RETENTION_SECONDS: a closed
    account leaves the cache and the listing; an open one stays."""
    settings = settings.model_copy(update={"ended_retention_seconds": 1.0})
    gateway = EntityGateway(temporal_client, cache, settings)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    try:
        closed, kept = new_id(), new_id()
        await open_active(gateway, closed)
        await open_active(gateway, kept)
        await gateway.send("account", closed, "close", {}, wait=True)
        await eventually(lambda: cache.get("account", closed), lambda hit: hit is None)
        listed = await EntityIndex(cache.client, cache.prefix).page(
            "account", ListFilter(), Order.ID, 500
        )
        assert closed not in listed.ids and kept in listed.ids
        hit = await cache.get("account", kept)
        assert hit is not None and hit.snapshot.state is not None
        assert hit.snapshot.state["status"] == "ACTIVE"
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
