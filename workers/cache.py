"""The last-seen cache: each entity's latest snapshot in Redis, never moved backwards."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from entities import catalog
from entities.runtime.envelope import Publication, Snapshot
from entities.runtime.listing import IndexValues
from workers.changes import Changes, Retention, encode, marks_key, state_of, stream_key
from workers.failures import REDIS_FAILURES
from workers.index import (
    ENDED,
    EPOCH,
    EVERY,
    INDEX_IF_NEWER,
    PUT_AND_INDEX,
    STUCK,
    WRITE_IF_NEWER,
    IndexEntry,
    StoredEntry,
    generations_key,
    index_base,
)
from workers.read_batching import ReadBatcher
from workers.redis_pools import WaitingCluster, WaitingSentinelPool
from workers.settings import Settings
from workers.telemetry import redis_span

log = logging.getLogger(__name__)

# Writes only when the incoming snapshot is newer, atomically: a retried, delayed or
# replayed publish can never move the cache backwards. Newer means a later incarnation of
# the entity (its id used again after its closed workflow was deleted), whatever the
# revisions, or the same incarnation at a higher revision. Entries written before
# incarnations existed have none, which counts as the earliest. A newer snapshot is progress,
# so it also clears the entity's stuck mark (see workers/watchdog.py). Answers 1 when it
# wrote; the stored snapshot when that one is newer, of the same incarnation; else 0.
_PUT_IF_NEWER = WRITE_IF_NEWER + "return 1\n"


class CacheUnavailable(Exception):
    """Redis could not be reached or answered with an error."""


RawEntry = tuple[bytes, bytes, bytes | None]
"""A cache entry as stored: the snapshot's JSON, when it was written (epoch seconds), and
why the entity is stuck, when the watchdog found it so."""


@dataclass(frozen=True)
class CachedSnapshot:
    """A snapshot as the cache holds it, with when it was written and, when its entity has
    stopped making progress, why."""

    snapshot: Snapshot
    cached_at: datetime
    stuck: str | None = None

    @classmethod
    def from_raw(cls, entry: RawEntry) -> CachedSnapshot:
        document, cached_at, stuck = entry
        return cls(
            snapshot=Snapshot.model_validate_json(document),
            cached_at=datetime.fromtimestamp(float(cached_at), tz=UTC),
            stuck=stuck.decode() if stuck is not None else None,
        )


RedisClient = redis.Redis | RedisCluster
"""A client of one Redis (with its replicas) or of a Redis Cluster: every key Tenure writes
is hash-tagged by what it belongs to (`{account:ada}`), so each script and each entity's
keys stay in one slot."""


def connect_redis(settings: Settings) -> RedisClient:
    """A Redis client with short timeouts, so a dead Redis costs a read milliseconds."""
    if settings.redis_sentinel_master:
        return _follow_sentinels(settings)
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    if settings.redis_cluster:
        # The cluster client keeps a pool per node and follows MOVED/ASK redirects itself;
        # a node gone costs the same short timeouts, then the cluster's own failover.
        return WaitingCluster.from_url(
            settings.redis_url,
            timeout=settings.redis_timeout,
            max_connections=settings.redis_max_connections,
            socket_connect_timeout=settings.redis_timeout,
            socket_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 1),
        )
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


def _follow_sentinels(settings: Settings) -> redis.Redis:
    """A client of the master the Sentinels name: after a failover its next connection goes
    to the promoted replica, and the writes it could not make meanwhile wait in
    `UnsavedSnapshots`."""
    if not settings.redis_sentinels:
        raise ValueError("TENURE_REDIS_SENTINEL_MASTER needs TENURE_REDIS_SENTINELS")
    nodes = []
    for node in settings.redis_sentinels:
        host, _, port = node.rpartition(":")
        if not (host and port.isdigit()):
            raise ValueError(
                f"TENURE_REDIS_SENTINELS: {node!r} is not host:port (a Sentinel's port, "
                "26379 by default, must be given)"
            )
        nodes.append((host, int(port)))
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8
        nodes,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
    )
    assert settings.redis_sentinel_master is not None
    client: redis.Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        max_connections=settings.redis_max_connections,
        connection_pool_class=WaitingSentinelPool,
        timeout=settings.redis_timeout,
    )
    client.set_retry(Retry(NoBackoff(), 1))
    return client


class SnapshotCache:
    """Reads and conditional writes of entity snapshots under one key prefix, each write
    indexing the snapshot for listings (workers/index.py) under the same rule, and
    appending the changes a publish carries to its type's change stream
    (workers/changes.py), kept as `retention` says."""

    def __init__(
        self, client: RedisClient, prefix: str = "tenure:", retention: Retention | None = None
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._retention = retention or Retention()
        self._cluster = isinstance(client, RedisCluster)
        self._types = catalog.entity_types()
        # One script for both in one Redis; in a cluster, the snapshot's slot is not the
        # index's, so each has its own (see workers/index.py).
        self._put_if_newer = client.register_script(
            _PUT_IF_NEWER if self._cluster else PUT_AND_INDEX
        )
        self._index_if_newer = client.register_script(INDEX_IF_NEWER)
        self._reads = ReadBatcher(client, ["snapshot", "cached_at", "stuck"])
        self._unsaved = UnsavedSnapshots(self._write_back)
        self.written_back: Callable[[Snapshot], None] | None = None
        """Told of each snapshot written once Redis answered again, after it refused it."""

    async def aclose(self) -> None:
        """Stop writing back the snapshots Redis refused (they are lost with this process:
        their entities publish again); the client is its owner's to close, after this."""
        await self._unsaved.aclose()

    def key(self, entity_type: str, entity_id: str) -> str:
        """The entity's hash, tagged by the entity so that in a cluster all of its keys
        share a slot."""
        return f"{self._prefix}entity:{{{entity_type}:{entity_id}}}"

    async def reachable(self) -> bool:
        """Whether Redis answers a PING within a second."""
        try:
            return bool(await asyncio.wait_for(self._client.ping(), 1.0))
        except REDIS_FAILURES:
            return False

    async def put(self, snapshot: Snapshot, changes: Changes | None = None) -> bool:
        """Store `snapshot` unless the cache already holds this revision or a newer one
        (of this incarnation of the entity, or of a later one), and stream `changes` past
        the last one streamed, whether or not the snapshot was stored. When Redis cannot
        take it, the snapshot is kept and written once Redis answers again
        (`UnsavedSnapshots`, which streams nothing: the publish is retried with its
        changes), and raises."""
        try:
            return await self._write(snapshot, changes) == 1
        except CacheUnavailable:
            self._unsaved.keep(snapshot)
            raise

    async def put_publication(self, publication: Publication) -> bool:
        """`put` of what an entity publishes: its snapshot, and the changes it carries (none
        streamed from a publication scheduled before changes were)."""
        changes = (
            Changes(publication.since, publication.changes)
            if publication.changes is not None
            else None
        )
        return await self.put(publication.snapshot, changes)

    async def _put(self, snapshot: Snapshot) -> bool:
        return await self._write(snapshot) == 1

    async def _write_back(self, snapshot: Snapshot) -> bool:
        stored = await self._put(snapshot)
        if stored and self.written_back is not None:
            self.written_back(snapshot)
        return stored

    @property
    def client(self) -> RedisClient:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    def index_entry(self, snapshot: Snapshot) -> str:
        """The snapshot's entry in its type's index, encoded; empty when it has no state."""
        entry = self._entry(snapshot)
        return entry.encode(snapshot) if entry is not None else ""

    def stored_entry(self, snapshot: Snapshot) -> StoredEntry | None:
        """The snapshot's entry as the index holds it, to filter by; None when it has no
        state."""
        entry = self._entry(snapshot)
        return entry.stored(snapshot) if entry is not None else None

    def _entry(self, snapshot: Snapshot) -> IndexEntry | None:
        entity = self._types.get(snapshot.entity_type)
        if entity is not None:
            values = entity.index_values(snapshot.state)
        else:
            values = IndexValues() if snapshot.state is not None else None
        return IndexEntry.of(snapshot, values)

    async def _write(self, snapshot: Snapshot, changes: Changes | None = None) -> int | bytes:
        """The script's answer: 1 written, 0 not, the newer snapshot stored, or FORGOTTEN."""
        if snapshot.state_omitted:  # it would read as an entity with no state
            raise ValueError(f"{snapshot.entity_type} {snapshot.entity_id}: no state to cache")
        base = index_base(self._prefix, snapshot.entity_type)
        entry = self.index_entry(snapshot)
        order = [snapshot.incarnation, snapshot.revision]
        now = time.time()
        streams = [
            stream_key(self._prefix, snapshot.entity_type),
            marks_key(self._prefix, snapshot.entity_type),
        ]
        streamed = (
            [encode(changes, self._retention), state_of(snapshot)]
            if changes is not None
            else ["", ""]
        )
        ended = ended_at(snapshot)
        try:
            with redis_span("EVALSHA"):
                if not self._cluster:
                    answer: int | bytes = await self._put_if_newer(
                        keys=[
                            self.key(snapshot.entity_type, snapshot.entity_id),
                            base + "e",
                            *streams,
                            base + ENDED,
                        ],
                        args=[
                            *order,
                            snapshot.model_dump_json(),
                            repr(now),
                            base,
                            snapshot.entity_id,
                            entry,
                            *streamed,
                            ended,
                        ],
                    )
                    return answer
                answer = await self._put_if_newer(
                    keys=[self.key(snapshot.entity_type, snapshot.entity_id)],
                    args=[*order, snapshot.model_dump_json(), repr(now)],
                )
                if answer == FORGOTTEN:  # its index entries and stream mark are gone too
                    return answer
                # Whatever else the cache answered: a retry after the index's write failed
                # finds the snapshot written already, and the index and the stream have
                # their own rules.
                await self._index_if_newer(
                    keys=[base + "e", *streams, base + ENDED],
                    args=[*order, base, snapshot.entity_id, entry, *streamed, ended],
                )
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return answer

    async def put_many(self, snapshots: list[Snapshot]) -> int:
        """Write and index `snapshots` as `put` would, in one pipeline (one at a time in a
        cluster); how many were written. For filling the cache and index in bulk."""
        if self._cluster:
            return sum([await self._put(snapshot) for snapshot in snapshots])
        now = repr(time.time())
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for snapshot in snapshots:
                    base = index_base(self._prefix, snapshot.entity_type)
                    await self._put_if_newer(
                        keys=[
                            self.key(snapshot.entity_type, snapshot.entity_id),
                            base + "e",
                            stream_key(self._prefix, snapshot.entity_type),
                            marks_key(self._prefix, snapshot.entity_type),
                            base + ENDED,
                        ],
                        args=[
                            snapshot.incarnation,
                            snapshot.revision,
                            snapshot.model_dump_json(),
                            now,
                            base,
                            snapshot.entity_id,
                            self.index_entry(snapshot),
                            "",  # nothing streamed
                            "",
                            ended_at(snapshot),
                        ],
                        client=pipe,  # type: ignore[arg-type]  # the script buffers in it
                    )
                answers = await pipe.execute()
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return sum(1 for answer in answers if answer == 1)

    async def put_newest(self, snapshot: Snapshot) -> Snapshot:
        """Store `snapshot` as `put` does, and return the newest state known of its entity:
        `snapshot`, or the newer one the cache (or this process) already holds. A workflow
        can answer from a task whose completion Temporal then lost (a restart): the history
        goes back a few commands and applies them again. What a client was shown stays
        shown."""
        newest, _ = await self._newest(snapshot, None)
        return newest

    async def publish_newest(self, publication: Publication) -> tuple[Snapshot, bool]:
        """`put_newest` for a publish an entity handed over (workers/handovers.py): the
        snapshot with its changes, and whether Redis took them. When it did not, the
        snapshot is kept to write later, as `put_newest` keeps it, but the changes are not:
        they are their entity's to publish again."""
        changes = Changes(publication.since, publication.changes or [])
        return await self._newest(publication.snapshot, changes)

    async def _newest(self, snapshot: Snapshot, changes: Changes | None) -> tuple[Snapshot, bool]:
        try:
            answer = await self._write(snapshot, changes)
        except CacheUnavailable as exc:
            if not self._unsaved:
                log.warning("cache unavailable, keeping snapshots to write later: %s", exc)
            self._unsaved.keep(snapshot)
            return self._unsaved.newest(snapshot), False
        newest = Snapshot.model_validate_json(answer) if isinstance(answer, bytes) else snapshot
        return newest, True

    async def get(self, entity_type: str, entity_id: str) -> CachedSnapshot | None:
        """The last-seen snapshot, or None when the cache has never seen the entity."""
        entry = await self.get_raw(entity_type, entity_id)
        return CachedSnapshot.from_raw(entry) if entry is not None else None

    async def get_raw(self, entity_type: str, entity_id: str) -> RawEntry | None:
        """The entry as stored, unparsed; each write makes a different entry. A snapshot
        this process learned but could not store yet stands in for an older entry, so a
        reader never sees a revision go back after Redis returns from an outage."""
        try:
            with redis_span("HMGET"):
                key = self.key(entity_type, entity_id)
                document, cached_at, stuck = await self._reads.hmget(key)
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        stored = (
            (document, cached_at, stuck if isinstance(stuck, bytes) else None)
            if isinstance(document, bytes) and isinstance(cached_at, bytes)
            else None
        )
        if self._unsaved:
            return self._unsaved.newer_than(entity_type, entity_id, stored)
        return stored

    def stuck_marks_key(self, scope: str) -> str:
        """The set of entities marked stuck by the watchdogs of `scope` (a task queue), as
        workflow ids: what a watchdog started later, or one that could not clear a mark
        while Redis was away, clears once their entities make progress again."""
        return f"{self._prefix}stuck-marks:{{{scope}}}"

    async def mark_stuck(
        self, entity_type: str, entity_id: str, reason: str, scope: str | None = None
    ) -> None:
        """Note that the entity has stopped making progress: its cached reads are stale.
        The type's listings are rendered again only when the mark changes: the watchdog
        marks a stuck entity again at every sweep. With `scope`, the mark is listed in
        `stuck_marks_key(scope)` first, so no mark is left that no watchdog knows of."""
        key = self.key(entity_type, entity_id)
        try:
            with redis_span("HSET"):
                if scope is not None:
                    await self._client.sadd(
                        self.stuck_marks_key(scope), self._types[entity_type].workflow_id(entity_id)
                    )
                if await self._client.hget(key, "stuck") == reason.encode():
                    return
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hset(key, "stuck", reason)
                    pipe.hincrby(generations_key(self._prefix, entity_type), STUCK, 1)
                    await pipe.execute()
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def clear_stuck(self, entity_type: str, entity_id: str, scope: str | None = None) -> None:
        """Take the mark off; with `scope`, and then off its list."""
        try:
            with redis_span("HDEL"):
                removed = await self._client.hdel(self.key(entity_type, entity_id), "stuck")
                if removed:
                    generations = generations_key(self._prefix, entity_type)
                    await self._client.hincrby(generations, STUCK, 1)
                if scope is not None:
                    await self._client.srem(
                        self.stuck_marks_key(scope), self._types[entity_type].workflow_id(entity_id)
                    )
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def stuck_marks(self, scope: str) -> set[str]:
        """The workflow ids of the entities marked stuck with `scope`."""
        try:
            with redis_span("SMEMBERS"):
                members = await self._client.smembers(self.stuck_marks_key(scope))
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def new_epoch(self, entity_type: str) -> None:
        """Make every listing of the type rendered so far stand no more, whatever its
        generations: after Redis lost everything, its counters start again from nothing and
        could meet the values an old rendering was made at."""
        try:
            with redis_span("HSET"):
                async with self._client.pipeline(transaction=False) as pipe:
                    key = generations_key(self._prefix, entity_type)
                    pipe.hset(key, EPOCH, uuid.uuid4().hex)
                    pipe.hincrby(key, EVERY, 1)
                    await pipe.execute()
        except REDIS_FAILURES as exc:
            raise CacheUnavailable(str(exc)) from exc


class UnsavedSnapshots:
    """Snapshots whose cache write failed, newest per entity, written back once Redis
    answers again.

    Without them, a Redis outage made cached reads go back: the API had served revision 19
    from the workflow while Redis was down, and once Redis returned it served the revision
    3 it still held until the entity's next publish. While one is kept, reads of its
    entity are answered from it if it is newer than Redis's entry, and a flusher retries
    the writes every `retry_seconds`. At most `capacity` are kept, of at most `max_bytes`
    in all as JSON; the oldest go first (their entities publish again on their own, only
    later). Counted alone, 10,000 snapshots of up to 512 KiB each were gigabytes held while
    Redis was down, by anyone reading many entities then.
    """

    def __init__(
        self,
        write: Callable[[Snapshot], Awaitable[bool]],
        capacity: int = 10_000,
        retry_seconds: float = 0.25,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._write = write
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._retry_seconds = retry_seconds
        # Each snapshot, when it was kept, and its JSON (what a read of it is answered with).
        self._kept: OrderedDict[tuple[str, str], tuple[Snapshot, float, bytes]] = OrderedDict()
        self._bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self._kept)

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    def keep(self, snapshot: Snapshot) -> None:
        key = (snapshot.entity_type, snapshot.entity_id)
        held = self._kept.get(key)
        if held is not None and _order(held[0]) >= _order(snapshot):
            return
        self._drop(key)
        encoded = snapshot.model_dump_json().encode()
        self._kept[key] = (snapshot, time.time(), encoded)
        self._bytes += len(encoded)
        while self._kept and (len(self._kept) > self._capacity or self._bytes > self._max_bytes):
            self._drop(next(iter(self._kept)))
        if not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush())

    def _drop(self, key: tuple[str, str]) -> None:
        held = self._kept.pop(key, None)
        if held is not None:
            self._bytes -= len(held[2])

    def newest(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot`, or the kept one of its entity if that is newer."""
        held = self._kept.get((snapshot.entity_type, snapshot.entity_id))
        return held[0] if held is not None and _order(held[0]) > _order(snapshot) else snapshot

    def newer_than(
        self, entity_type: str, entity_id: str, stored: RawEntry | None
    ) -> RawEntry | None:
        held = self._kept.get((entity_type, entity_id))
        if held is None:
            return stored
        snapshot, kept_at, encoded = held
        if stored is not None:
            try:
                current = Snapshot.model_validate_json(stored[0])
            except ValueError:
                return stored
            if _order(current) >= _order(snapshot):
                return stored
        return encoded, repr(kept_at).encode(), None

    async def aclose(self) -> None:
        """Stop the flusher for good: its retries would otherwise outlive the cache's owner
        (an activity still running after a bounded shutdown keeps a snapshot, unwritten)."""
        self._closed = True
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            await asyncio.wait([flusher])  # a cancellation of the caller still reaches it

    async def _flush(self) -> None:
        while self._kept:
            key, (snapshot, _, _) = next(iter(self._kept.items()))
            try:
                await self._write(snapshot)
            except CacheUnavailable:
                await asyncio.sleep(self._retry_seconds)
                continue
            if self._kept.get(key, (None,))[0] is snapshot:
                self._drop(key)


FORGOTTEN = -1
"""The cache's answer to a write of an entity forgotten at that revision or a later one."""


def ended_at(snapshot: Snapshot) -> str:
    """When the snapshot's entity ended, in epoch milliseconds, as the index's scripts take
    it: its closed snapshot's `updated_at` (now for one without), '0' for a live one."""
    if not snapshot.closed:
        return "0"
    at = snapshot.updated_at.timestamp() if snapshot.updated_at is not None else time.time()
    return str(int(at * 1000))


def _order(snapshot: Snapshot) -> tuple[int, int]:
    return snapshot.incarnation, snapshot.revision
