"""Batched cache reads on a real Redis: each caller gets its own key's fields, whatever the
batch, and a failed round trip fails every read in it."""

from __future__ import annotations

import asyncio

from deploy.embedded import EmbeddedRedis
from tests.conftest import new_id
from workers.cache import CacheUnavailable, SnapshotCache, connect_redis
from workers.read_batching import ReadBatcher
from workers.settings import Settings


async def test_concurrent_reads_each_get_their_own_key(settings: Settings) -> None:
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}batch:{new_id()}:"
    try:
        keys = [f"{prefix}{i}" for i in range(300)]
        for i, key in enumerate(keys):
            if i % 3:  # every third key is missing
                await client.hset(key, mapping={"a": f"a{i}", "b": f"b{i}"})
        batcher = ReadBatcher(client, ["a", "b"])
        results = await asyncio.gather(*(batcher.hmget(key) for key in keys))
        for i, fields in enumerate(results):
            assert fields == ([f"a{i}".encode(), f"b{i}".encode()] if i % 3 else [None, None])
        # 300 reads at once went to Redis together, over one connection (one each would
        # have opened as many as the pool allows).
        assert sum(count for count, _ in client.connection_pool.get_connection_count()) == 1
        # A reader that gives up does not disturb the others of its batch.
        abandoned = asyncio.ensure_future(batcher.hmget(keys[1]))
        kept = asyncio.ensure_future(batcher.hmget(keys[2]))
        await asyncio.sleep(0)  # both are waiting in the same batch now
        abandoned.cancel()
        assert await asyncio.wait_for(kept, 5) == [b"a2", b"b2"]
        assert abandoned.cancelled()
    finally:
        await client.delete(*[f"{prefix}{i}" for i in range(300)])
        await client.aclose()


async def test_every_read_of_a_failed_batch_fails_and_later_ones_recover(
    own_cache: SnapshotCache, own_redis: EmbeddedRedis
) -> None:
    cache = own_cache
    own_redis.stop()
    outcomes = await asyncio.gather(
        *(cache.get("account", new_id()) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(outcome, CacheUnavailable) for outcome in outcomes), outcomes
    await own_redis.start()
    assert await asyncio.gather(*(cache.get("account", new_id()) for _ in range(20))) == [None] * 20
