"""Entities made lately under an owner (one account's carts) that the listing index may not
show yet: what a bound on how many an owner holds counts besides the index.

The index learns of an entity once its first state is published, a moment after it was
made. A bound counted from the index alone let a burst of creates through while their
entities were on their way: a customer's 20 requests of 10 `createCart` each made 40 carts
of an account allowed 3. Each create is recorded here first (in the index's slot, a sorted
set by time, kept `WINDOW_SECONDS`), and counted until the index shows it.
"""

from __future__ import annotations

import time

from workers.cache import CacheUnavailable, RedisClient, SnapshotCache
from workers.failures import REDIS_FAILURES
from workers.index import index_base
from workers.listing import EntityIndex

WINDOW_SECONDS = 60
"""How long a create counts before the index must show it: far longer than a publish takes,
short enough that a create that never made its entity stops counting soon."""


class Creations:
    """The creates of one Redis's entities, under the cache's key prefix."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._index = EntityIndex(client, prefix)

    @classmethod
    def of(cls, cache: SnapshotCache) -> Creations:
        return cls(cache.client, cache.prefix)

    def _key(self, entity_type: str, tag: str, value: str) -> str:
        return index_base(self._prefix, entity_type) + f"made:{tag}:{value}"

    async def held_with(
        self, entity_type: str, tag: str, value: str, entity_id: str, statuses: frozenset[str]
    ) -> int | None:
        """Record `entity_id` as made under `tag=value`, and count what that owner holds with
        it: the entities the index shows in `statuses`, and those made lately that it does
        not show yet. None when the index cannot tell (`EntityIndex.count_tagged`). A create
        then refused is taken back with `forget`."""
        key = self._key(entity_type, tag, value)
        now = time.time()
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(key, {entity_id: now})
                pipe.zremrangebyscore(key, "-inf", now - WINDOW_SECONDS)
                pipe.zrange(key, 0, -1)
                pipe.expire(key, 2 * WINDOW_SECONDS)
                _, _, made, _ = await pipe.execute()
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        # Which are not shown yet, before the count of those shown: one shown in between is
        # counted twice (a refusal too many), never not at all (a cart too many).
        tagged = index_base(self._prefix, entity_type) + f"t:{tag}:{value}:i"
        try:
            scores: list[float | None] = await self._client.zmscore(tagged, made)
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        shown = await self._index.count_tagged(entity_type, tag, value, statuses)
        if shown is None:
            return None
        return shown + sum(1 for score in scores if score is None)

    async def forget(self, entity_type: str, tag: str, value: str, entity_id: str) -> None:
        """Take back a create recorded by `held_with` that was refused."""
        try:
            await self._client.zrem(self._key(entity_type, tag, value), entity_id)
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
