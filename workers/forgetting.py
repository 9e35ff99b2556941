"""Forgetting ended entities: Redis holds an entity that has ended (a closed account, a cart
checked out or discarded) only as long as its retention says, then lets go of its snapshot,
its listing entries and its change-stream mark.

Every checkout ends a cart, and every ended entity stayed in Redis for good: its snapshot,
its index entries and its mark in `changes:{type}:last`, a store that only grew. The index
scripts keep each type's ended entities in a sorted set (`<base>ended`, workers/index.py),
scored with when each ended (its closed snapshot's `updated_at`, by its workflow's clock);
`EndedEntities` sweeps the ones past retention.

Retention is `ended_retention_seconds` (an hour at least), or, unset, the Temporal
namespace's own retention of closed workflows: Redis then forgets an entity about when
Temporal does, and a reader meets one answer, not found, from the cache and from a LIVE read
alike. An hour after its end nothing publishes an entity's changes again: its publishes by
activity and the promises of its waited commands give up within ten minutes, and a snapshot
a process keeps while Redis is away streams nothing. The entity's hash is left as a
tombstone, its incarnation and revision without a snapshot, for TOMBSTONE_MS: a late write
of it is refused as before (nothing indexed, streamed or marked), and a read meets no
snapshot. An id used again begins a new incarnation, written as any new entity is (the
tombstone's expiry goes); one used again before its sweep is live again, and taken out of
the ended set by its own write.

In one Redis a single script forgets an entity whole. In a cluster the snapshot's slot is
not the index's, so its snapshot goes first: a listing skips an entry whose snapshot is
gone (api/listing.py), and a sweeper that dies between the two leaves the entry for the
next sweep. There the snapshot's script answers a late write FORGOTTEN and the index's is
not run (workers/cache.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from temporalio.client import Client

from entities import catalog
from workers.cache import CacheUnavailable, SnapshotCache
from workers.changes import marks_key, text
from workers.failures import REDIS_FAILURES
from workers.index import ENDED, REINDEX, index_base
from workers.logs import RepeatedLogFilter
from workers.settings import Settings
from workers.temporal import namespace_retention

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=600.0))

AT_ONCE = 200
"""Ended entities forgotten in one step of a sweep, per type."""
MOST_PER_SWEEP = 20_000
"""Ended entities one sweep forgets per type at most; the next sweep takes up the rest."""
MOST_INTERVAL = 60.0
"""Seconds between sweeps at most."""
LEAST_RETENTION = 3600.0
"""Seconds an ended entity is kept at least, whatever is set: past everything that may still
publish it (above)."""
TOMBSTONE_MS = 86_400_000
"""How long a forgotten entity's incarnation and revision are kept."""

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

_BURY = """
local function bury(entity, tombstone_ms)
  redis.call('HDEL', entity, 'snapshot', 'cached_at', 'stuck')
  if redis.call('EXISTS', entity) == 1 then redis.call('PEXPIRE', entity, tombstone_ms) end
end
"""
"""Leaves the entity's hash its incarnation and revision alone, for `tombstone_ms`."""

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
    + _BURY
    + _FORGET_INDEXED
    + """
local score = redis.call('ZSCORE', KEYS[4], ARGV[2])
if not score or tonumber(score) > tonumber(ARGV[3]) then return 0 end
local gone = still_ended(KEYS[1])
if gone then bury(KEYS[1], ARGV[4]) end
return forget_indexed(KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], gone)
"""
)
"""One Redis: forgets an entity ended by the cutoff whole. KEYS: the entity's hash, the
type's index entries, its stream marks and its ended set; ARGV: index base, entity id,
cutoff (epoch milliseconds), TOMBSTONE_MS. 1 when forgotten."""

FORGET_SNAPSHOT = (
    _STILL_ENDED
    + _BURY
    + """
if still_ended(KEYS[1]) then
  bury(KEYS[1], ARGV[1])
  return 1
end
return 0
"""
)
"""Redis Cluster, the snapshot's slot: leaves the entity's hash a tombstone unless it is live
again (ARGV TOMBSTONE_MS). 1 when its snapshot is gone."""

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
        return [text(member) for member in members]

    async def sweep(self, retention_seconds: float) -> Forgotten:
        """Forget the entities of every type that ended more than `retention_seconds` ago
        (by their workflows' clock, Temporal's); at most MOST_PER_SWEEP of a type."""
        cutoff = int((time.time() - retention_seconds) * 1000)
        try:
            forgotten = {
                entity_type: await self._sweep_type(entity_type, cutoff)
                for entity_type in catalog.entity_types()
            }
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return Forgotten(forgotten)

    async def _sweep_type(self, entity_type: str, cutoff: int) -> int:
        key = self.ended_key(entity_type)
        forgotten = seen = passed = 0
        while seen < MOST_PER_SWEEP:
            # Those that could not be forgotten stay first in line: passed over.
            due = await self._cache.client.zrangebyscore(
                key, "-inf", cutoff, start=passed, num=AT_ONCE
            )
            seen += len(due)
            for member in due:
                entity_id = text(member)
                try:
                    forgotten += await self._forget_one(entity_type, entity_id, cutoff)
                except ResponseError as exc:  # this entity's: the others are still swept
                    passed += 1
                    log.error("ended %s %s not forgotten: %s", entity_type, entity_id, exc)
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
                keys=[entity, base + "e", marks, ended],
                args=[base, entity_id, cutoff, TOMBSTONE_MS],
            )
            return int(answer)
        gone = await self._forget_snapshot(keys=[entity], args=[TOMBSTONE_MS])
        answer = await self._forget_indexed(
            keys=[base + "e", marks, ended], args=[base, entity_id, cutoff, "1" if gone else "0"]
        )
        return int(answer)

    async def run(self, retention: Callable[[], Awaitable[float | None]]) -> None:
        """Sweep for good, MOST_INTERVAL apart, each time with the retention `retention`
        answers (None: not known now; 0: keep them for good), LEAST_RETENTION at least."""
        while True:
            try:
                seconds = await retention()
                if seconds:
                    done = await self.sweep(max(seconds, LEAST_RETENTION))
                    if done.total:
                        log.info("forgot %d ended entities: %s", done.total, done.by_type)
            except CacheUnavailable as exc:
                log.warning("ended entities not swept: Redis did not answer (%s)", exc)
            except Exception:
                log.exception("ended entities not swept")
            await asyncio.sleep(MOST_INTERVAL)


async def ended_retention(client: Client, settings: Settings) -> float | None:
    """How long Redis keeps an ended entity: as set, else as long as Temporal keeps its
    closed workflow (None while Temporal does not say)."""
    if settings.ended_retention_seconds is not None:
        return settings.ended_retention_seconds
    return await namespace_retention(client, settings.temporal_namespace)


def forgotten_by_now(ended: datetime | None, retention: float | None, now: float) -> bool:
    """Whether an entity that ended at `ended` has been let go of by now (Redis forgets its
    snapshot, index entries and stream mark), under `retention` (None or 0: never)."""
    if ended is None or not retention:
        return False
    return ended.timestamp() < now - max(retention, LEAST_RETENTION)
