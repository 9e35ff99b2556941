"""The last-seen cache: each entity's latest snapshot in Redis, never moved backwards."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from entities.runtime.envelope import Snapshot
from workers.read_batching import ReadBatcher
from workers.settings import Settings

# Writes only when the incoming snapshot is newer, atomically: a retried, delayed or
# replayed publish can never move the cache backwards. Newer means a later incarnation of
# the entity (its id used again after its closed workflow was deleted), whatever the
# revisions, or the same incarnation at a higher revision. Entries written before
# incarnations existed have none, which counts as the earliest.
_PUT_IF_NEWER = """
local current = redis.call('HMGET', KEYS[1], 'incarnation', 'revision')
local incarnation = tonumber(current[1] or '0')
local revision = tonumber(current[2] or '-1')
local new_incarnation = tonumber(ARGV[1])
local new_revision = tonumber(ARGV[2])
if new_incarnation < incarnation then return 0 end
if new_incarnation == incarnation and new_revision <= revision then return 0 end
redis.call('HSET', KEYS[1], 'incarnation', ARGV[1], 'revision', ARGV[2],
           'snapshot', ARGV[3], 'cached_at', ARGV[4])
return 1
"""


class CacheUnavailable(Exception):
    """Redis could not be reached or answered with an error."""


RawEntry = tuple[bytes, bytes]
"""A cache entry as stored: the snapshot's JSON and when it was written (epoch seconds)."""


@dataclass(frozen=True)
class CachedSnapshot:
    """A snapshot as the cache holds it, with when it was written."""

    snapshot: Snapshot
    cached_at: datetime

    @classmethod
    def from_raw(cls, entry: RawEntry) -> CachedSnapshot:
        document, cached_at = entry
        return cls(
            snapshot=Snapshot.model_validate_json(document),
            cached_at=datetime.fromtimestamp(float(cached_at), tz=UTC),
        )


def connect_redis(settings: Settings) -> redis.Redis:
    """A Redis client with short timeouts, so a dead Redis costs a read milliseconds."""
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    # A blocking pool: a burst beyond the pool waits briefly for a connection instead of
    # failing with "Too many connections".
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
    )
    client = redis.Redis.from_pool(pool)
    # One immediate retry heals a pooled connection that a Redis restart broke; the
    # client's default of backing off for seconds would stall every read during an outage.
    client.set_retry(Retry(NoBackoff(), 1))
    return client


class SnapshotCache:
    """Reads and conditional writes of entity snapshots under one key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "tenure:") -> None:
        self._client = client
        self._prefix = prefix
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)
        self._reads = ReadBatcher(client, ["snapshot", "cached_at"])

    def key(self, entity_type: str, entity_id: str) -> str:
        return f"{self._prefix}entity:{entity_type}:{entity_id}"

    async def put(self, snapshot: Snapshot) -> bool:
        """Store `snapshot` unless the cache already holds this revision or a newer one
        (of this incarnation of the entity, or of a later one)."""
        try:
            written = await self._put_if_newer(
                keys=[self.key(snapshot.entity_type, snapshot.entity_id)],
                args=[
                    snapshot.incarnation,
                    snapshot.revision,
                    snapshot.model_dump_json(),
                    repr(time.time()),
                ],
            )
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc
        return bool(written)

    async def get(self, entity_type: str, entity_id: str) -> CachedSnapshot | None:
        """The last-seen snapshot, or None when the cache has never seen the entity."""
        entry = await self.get_raw(entity_type, entity_id)
        return CachedSnapshot.from_raw(entry) if entry is not None else None

    async def get_raw(self, entity_type: str, entity_id: str) -> RawEntry | None:
        """The entry as stored, unparsed; each write makes a different entry."""
        try:
            document, cached_at = await self._reads.hmget(self.key(entity_type, entity_id))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(str(exc)) from exc
        if not isinstance(document, bytes) or not isinstance(cached_at, bytes):
            return None
        return document, cached_at
