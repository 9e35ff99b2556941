"""Forgetting ended entities: Redis holds an entity that has ended (a closed account, a cart
checked out or discarded) only as long as its retention says, then lets go of its snapshot,
its listing entries and its change-stream mark.

Every checkout ends a cart, and every ended entity stayed in Redis for good: its snapshot,
its index entries and its mark in `changes:{type}:last`, a store that only grew. The index
scripts keep each type's ended entities in a sorted set (`<base>ended`, workers/index.py),
scored with when the closed snapshot was first indexed by Redis's clock; `EndedEntities`
sweeps the ones past retention.

Retention is `ended_retention_seconds`, or, unset, the Temporal namespace's own retention of
closed workflows: Redis then forgets an entity about when Temporal does, and a reader meets
one answer, not found, from the cache and from a LIVE read alike. Long after retention (a
day at least in Temporal) nothing can publish the entity again: its publishes by activity
give up within minutes. An id used again after it was forgotten begins a new incarnation,
written as any new entity is; one used again before its sweep is live again, and taken out
of the ended set by its own write.

In one Redis a single script forgets an entity whole. In a cluster the snapshot's slot is
not the index's, so its snapshot goes first: a listing skips an entry whose snapshot is
gone (api/listing.py), and a sweeper that dies between the two leaves the entry for the
next sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio.cluster import RedisCluster

from entities import catalog
from workers.cache import CacheUnavailable, SnapshotCache
from workers.changes import marks_key
from workers.failures import REDIS_FAILURES
from workers.index import ENDED, REINDEX, index_base
from workers.logs import RepeatedLogFilter

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=600.0))

AT_ONCE = 200
"""Ended entities forgotten in one step of a sweep, per type."""
MOST_PER_SWEEP = 20_000
"""Ended entities one sweep forgets per type at most; the next sweep takes up the rest."""
MOST_INTERVAL = 60.0
"""Seconds between sweeps at most; a shorter retention sweeps a quarter of it apart."""

_STILL_ENDED = """
local function still_ended(entity)
  local raw = redis.call('HGET', entity, 'snapshot')
  if not raw then return true end
  local ok, doc = pcall(cjson.decode, raw)
  return ok and doc.closed == true
end
"""
"""Whether the entity's hash holds no snapshot, or a closed one: not one of an id used
again."""

_FORGET_INDEXED = """
local function forget_indexed(entries, marks, ended, base, id, cutoff, gone)
  local score = redis.call('ZSCORE', ended, id)
  if not score or tonumber(score) > tonumber(cutoff) then return 0 end
  redis.call('ZREM', ended, id)
  if not gone then return 0 end
  reindex(base, id, '')
  redis.call('HDEL', marks, id)
  return 1
end
"""
"""Takes the entity out of the ended set if it ended by `cutoff`, and, when its snapshot is
`gone`, out of the index and the change stream's marks."""

FORGET = (
    REINDEX
    + _STILL_ENDED
    + _FORGET_INDEXED
    + """
local score = redis.call('ZSCORE', KEYS[4], ARGV[2])
if not score or tonumber(score) > tonumber(ARGV[3]) then return 0 end
local gone = still_ended(KEYS[1])
if gone then redis.call('DEL', KEYS[1]) end
return forget_indexed(KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], gone)
"""
)
"""One Redis: forgets an entity ended by the cutoff whole. KEYS: the entity's hash, the
type's index entries, its stream marks and its ended set; ARGV: index base, entity id,
cutoff (Redis milliseconds). 1 when forgotten."""

FORGET_SNAPSHOT = (
    _STILL_ENDED
    + """
if still_ended(KEYS[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
)
"""Redis Cluster, the snapshot's slot: deletes the entity's hash unless it is live again.
1 when it is gone."""

FORGET_INDEXED = (
    REINDEX
    + _FORGET_INDEXED
    + """
return forget_indexed(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1')
"""
)
"""Redis Cluster, the type's slot: KEYS the type's index entries, stream marks and ended
set; ARGV index base, entity id, cutoff, and '1' when the snapshot is gone."""


@dataclass
class Forgotten:
    """What a sweep did, per entity type: ended entities forgotten."""

    by_type: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_type.values())


class EndedEntities:
    """Sweeps the cache's ended entities past retention."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        client = cache.client
        self._cluster = isinstance(client, RedisCluster)
        self._forget = client.register_script(FORGET)
        self._forget_snapshot = client.register_script(FORGET_SNAPSHOT)
        self._forget_indexed = client.register_script(FORGET_INDEXED)

    def ended_key(self, entity_type: str) -> str:
        return index_base(self._cache.prefix, entity_type) + ENDED

    async def ended(self, entity_type: str) -> list[str]:
        """The type's ended entities not forgotten yet, first ended first."""
        try:
            members = await self._cache.client.zrange(self.ended_key(entity_type), 0, -1)
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return [_text(member) for member in members]

    async def sweep(self, retention_seconds: float) -> Forgotten:
        """Forget the entities of every type that ended more than `retention_seconds` ago,
        by Redis's clock; at most MOST_PER_SWEEP of a type."""
        try:
            seconds, microseconds = await self._cache.client.time()
            cutoff = seconds * 1000 + microseconds // 1000 - int(retention_seconds * 1000)
            forgotten = {
                entity_type: await self._sweep_type(entity_type, cutoff)
                for entity_type in catalog.entity_types()
            }
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return Forgotten(forgotten)

    async def _sweep_type(self, entity_type: str, cutoff: int) -> int:
        key = self.ended_key(entity_type)
        forgotten = seen = 0
        while seen < MOST_PER_SWEEP:
            due = await self._cache.client.zrangebyscore(key, "-inf", cutoff, start=0, num=AT_ONCE)
            if not due:
                break
            seen += len(due)
            for member in due:
                forgotten += await self._forget_one(entity_type, _text(member), cutoff)
            if len(due) < AT_ONCE:
                break
        return forgotten

    async def _forget_one(self, entity_type: str, entity_id: str, cutoff: int) -> int:
        base = index_base(self._cache.prefix, entity_type)
        entity = self._cache.key(entity_type, entity_id)
        marks = marks_key(self._cache.prefix, entity_type)
        ended = base + ENDED
        if not self._cluster:
            answer = await self._forget(
                keys=[entity, base + "e", marks, ended], args=[base, entity_id, cutoff]
            )
            return int(answer)
        gone = await self._forget_snapshot(keys=[entity])
        answer = await self._forget_indexed(
            keys=[base + "e", marks, ended], args=[base, entity_id, cutoff, "1" if gone else "0"]
        )
        return int(answer)

    async def run(self, retention: Callable[[], Awaitable[float | None]]) -> None:
        """Sweep for good: each time with the retention `retention` answers (None: not
        known now, try later; 0: keep them for good), a quarter of it apart, at most
        MOST_INTERVAL."""
        while True:
            interval = MOST_INTERVAL
            try:
                seconds = await retention()
                if seconds:
                    interval = min(MOST_INTERVAL, max(seconds / 4, 0.1))
                    done = await self.sweep(seconds)
                    if done.total:
                        log.info("forgot %d ended entities: %s", done.total, done.by_type)
            except CacheUnavailable as exc:
                log.warning("ended entities not swept: Redis did not answer (%s)", exc)
            except Exception:
                log.exception("ended entities not swept")
            await asyncio.sleep(interval)


def _text(member: object) -> str:
    """A sorted set's member as redis-py answers it (bytes), as text."""
    return member.decode() if isinstance(member, bytes) else str(member)
