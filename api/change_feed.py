"""Live changes for subscriptions: one Redis reader per API process, fanned out in-process.

The reader follows the change streams (workers/changes.py) of the entity types that have
subscribers, with one blocking XREAD over all of them, and offers each change to the
subscribers that want it. Nothing waits for a subscriber: each holds at most the newest
change per entity it follows (one for an entity's subscription), so a slow one skips to
the latest state when it catches up, and its next change shows the revisions it did not
see. A subscription never opens a Redis connection of its own.

Only a change that carries its entity's state is offered; the earlier changes of the same
publish (`state_revision`) have no state of their own to show, so a subscriber sees the
revision jump past them. A `gap` whose state the stream does not hold is read from the
cache once, here, and offered as that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import Snapshot
from workers.cache import CacheUnavailable, RedisClient, SnapshotCache
from workers.changes import entry_fields, stream_end, stream_key, text
from workers.failures import REDIS_FAILURES, redis_unavailable

log = logging.getLogger(__name__)

READ_COUNT = 500
"""Entries read at once: half of what a `changes` subscriber may hold pending (1,000), so
that one read alone never ends a subscriber that keeps pace."""
OFFERS_BETWEEN_TURNS = 32
"""Entries offered before the reader lets the rest of the process's event loop run: each is
offered to every subscriber of its type (filters included), and a batch offered in one go
held every request, socket and probe of the API process for seconds with thousands of
customers following a type."""
RETRY_SECONDS = 1.0
END_ATTEMPTS = 3
"""Tries at finding a stream's end for a type's first subscribers. A burst of subscriptions
can hold this process's event loop past the Redis client's one-second connect timeout, with
Redis well: one subscriber in a thousand was refused so on a busy machine."""
END_PAUSE = 0.05


@dataclass
class Change:
    """An entity's state after one of its commands (or after a gap), as a subscriber gets
    it. `command` and its fields are None when the state came from the cache."""

    entity_type: str
    snapshot: Snapshot
    command: str | None = None
    command_id: str | None = None
    sent_by: str | None = None
    at: datetime | None = None
    gap: bool = False
    rendered: dict[object, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def entity_id(self) -> str:
        return self.snapshot.entity_id

    @property
    def position(self) -> tuple[int, int]:
        """Where the change is in its entity's life: incarnation, then revision."""
        return (self.snapshot.incarnation, self.snapshot.revision)


class SubscriberGone(TenureError):
    """The feed stopped (the process is shutting down) or the subscriber fell too far
    behind on too many entities."""


class Mailbox:
    """One subscriber's pending changes: the newest per entity, for at most `capacity`
    entities. `offer` never waits; a subscriber behind on more entities than that is ended
    with an error, never left with silently dropped changes."""

    def __init__(self, wants: Callable[[Change], bool], capacity: int) -> None:
        self._wants = wants
        self._capacity = capacity
        self._pending: dict[str, Change] = {}
        self._ready = asyncio.Event()
        self._ended: SubscriberGone | None = None

    def offer(self, change: Change) -> None:
        if self._ended is not None:
            return
        try:
            wanted = self._wants(change)
        except Exception:
            # Its own filter failed on this change: this subscription ends, with a code its
            # client can act on; every other subscriber goes on.
            log.exception("change feed: a subscriber's filter failed on %s", change.entity_id)
            self.end(
                SubscriberGone(ErrorCode.INTERNAL, "this subscription failed: subscribe again")
            )
            return
        if not wanted:
            return
        held = self._pending.get(change.entity_id)
        if held is None and len(self._pending) >= self._capacity:
            self.end(
                SubscriberGone(
                    ErrorCode.LIMIT_REACHED,
                    f"this subscription fell behind on more than {self._capacity} entities",
                )
            )
            return
        if held is not None and held.position >= change.position:
            return
        # In its entity's place: moved to the back at each change, a busy entity was shown
        # never while the subscriber kept pace with a backlog of quieter ones.
        self._pending[change.entity_id] = change
        self._ready.set()

    def end(self, reason: SubscriberGone) -> None:
        self._ended = reason
        self._ready.set()

    async def next(self) -> Change:
        """The newest change of the entity pending longest, waiting for one."""
        while not self._pending:
            if self._ended is not None:
                raise self._ended
            self._ready.clear()
            await self._ready.wait()
        entity_id = next(iter(self._pending))
        return self._pending.pop(entity_id)


@dataclass
class _Followed:
    """A followed type's subscribers and where its stream has been read to."""

    cursor: str
    by_entity: dict[str, set[Mailbox]] = field(default_factory=dict)
    everyone: set[Mailbox] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.everyone) + sum(len(boxes) for boxes in self.by_entity.values())


STAFF_SHARE = 10
"""Staff and services may always take the last 1/STAFF_SHARE of a process's subscriptions."""


class ChangeFeed:
    """The process's one reader of the change streams and its subscribers; started and
    stopped by the app's lifespan (`running`)."""

    def __init__(
        self,
        client: RedisClient,
        cache: SnapshotCache,
        prefix: str,
        *,
        max_subscribers: int,
        block_seconds: float,
        max_per_holder: int | None = None,
    ) -> None:
        self._client = client
        self._cache = cache
        self._prefix = prefix
        self._max = max_subscribers
        self._max_per_holder = max_per_holder
        self._held: Counter[str] = Counter()
        self._held_in_all = 0  # by every holder
        self._block_ms = max(int(block_seconds * 1000), 1)
        self._types: dict[str, _Followed] = {}
        self._count = 0
        self._wanted = asyncio.Event()
        self._following = asyncio.Lock()
        self._stopped = False

    @property
    def subscribers(self) -> int:
        return self._count

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._read(), name="tenure-change-feed")
        try:
            yield
        finally:
            self.drain()
            self._wanted.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def drain(self) -> None:
        """End every subscription with UNAVAILABLE ("the server is shutting down"), and
        refuse new ones: as the server begins to shut down, so that event streams end then
        rather than hold the shutdown up (`api.server`)."""
        self._stopped = True
        gone = SubscriberGone(ErrorCode.UNAVAILABLE, "the server is shutting down")
        for followed in self._types.values():
            for box in followed.everyone:
                box.end(gone)
            for boxes in followed.by_entity.values():
                for box in boxes:
                    box.end(gone)

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        entity_type: str,
        entity_id: str | None,
        wants: Callable[[Change], bool] = lambda change: True,
        capacity: int = 1,
        holder: str | None = None,
    ) -> AsyncIterator[Mailbox]:
        """A mailbox of `entity_type`'s changes: one entity's, or with `entity_id` None
        every entity's that `wants` accepts. Changes appended before this returns are not
        in it (read the entity's state after subscribing). A `holder` (a customer) holds at
        most `max_per_holder` at once, so that no one caller takes every slot, and holders
        together leave a tenth of the slots (STAFF_SHARE) to staff and services: a hundred
        customers at their most filled a process, and its admin consoles and integrations
        were refused."""
        if self._stopped:
            raise SubscriberGone(ErrorCode.UNAVAILABLE, "the server is shutting down")
        if self._count >= self._max:
            raise TenureError(
                ErrorCode.LIMIT_REACHED,
                f"this server has {self._max} subscriptions already: try again later",
            )
        if holder is not None and self._held_in_all >= self._max - self._max // STAFF_SHARE:
            raise TenureError(
                ErrorCode.LIMIT_REACHED,
                f"this server's {self._max} subscriptions are taken: try again later",
            )
        limit = self._max_per_holder
        if holder is not None and limit is not None and self._held[holder] >= limit:
            raise TenureError(
                ErrorCode.LIMIT_REACHED,
                f"you hold {limit} subscriptions on this server already, the most: end one first",
            )
        self._count += 1
        if holder is not None:
            self._held[holder] += 1
            self._held_in_all += 1
        box = Mailbox(wants, capacity)
        try:
            followed = await self._follow(entity_type)
            if entity_id is None:
                followed.everyone.add(box)
            else:
                followed.by_entity.setdefault(entity_id, set()).add(box)
            yield box
        finally:
            self._count -= 1
            if holder is not None:
                self._held[holder] -= 1
                self._held_in_all -= 1
                if not self._held[holder]:
                    del self._held[holder]
            self._forget(entity_type, entity_id, box)

    async def _follow(self, entity_type: str) -> _Followed:
        followed = self._types.get(entity_type)
        if followed is not None:
            return followed
        async with self._following:  # the first subscribers of a type ask Redis once
            followed = self._types.get(entity_type)
            if followed is not None:
                return followed
            cursor = await self._stream_end(stream_key(self._prefix, entity_type))
            followed = _Followed(cursor=cursor)
            self._types[entity_type] = followed
            self._wanted.set()
            return followed

    async def _stream_end(self, key: str) -> str:
        for attempt in range(END_ATTEMPTS):
            try:
                return await stream_end(self._client, key)
            except REDIS_FAILURES as exc:
                # Only a connection that failed or timed out may go better a moment later.
                transient = isinstance(exc, RedisConnectionError | RedisTimeoutError)
                if not transient or attempt == END_ATTEMPTS - 1:
                    raise redis_unavailable("the change stream", exc) from exc
                log.warning("change feed: the end of %s not found, trying again: %s", key, exc)
                await asyncio.sleep(END_PAUSE)
        raise AssertionError("unreachable")

    def _forget(self, entity_type: str, entity_id: str | None, box: Mailbox) -> None:
        followed = self._types.get(entity_type)
        if followed is None:
            return
        if entity_id is None:
            followed.everyone.discard(box)
        else:
            boxes = followed.by_entity.get(entity_id, set())
            boxes.discard(box)
            if not boxes:
                followed.by_entity.pop(entity_id, None)
        if not len(followed):
            del self._types[entity_type]

    async def _read(self) -> None:
        """Read and offer until stopped. What it did not foresee is logged and read past,
        never the end of it: one task serves every subscription of the process, and had it
        ended, each of them would have gone quiet for good, its socket kept open by pings."""
        while not self._stopped:
            try:
                await self._read_on()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("change feed: reading failed; reading on from where it was")
                await asyncio.sleep(RETRY_SECONDS)

    async def _read_on(self) -> None:
        # The stop flag as well as the cancellation: redis-py may turn a cancelled read into
        # a connection error.
        while not self._stopped:
            if not self._types:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            streams = {stream_key(self._prefix, t): f.cursor for t, f in self._types.items()}
            try:
                answer = await self._xread(streams)
            except REDIS_FAILURES as exc:
                if self._stopped:
                    return
                log.warning("change feed: the change streams cannot be read: %s", exc)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            keys = {stream_key(self._prefix, t): t for t in self._types}
            for key, entries in answer:
                entity_type = keys.get(text(key))
                followed = self._types.get(entity_type) if entity_type is not None else None
                if entity_type is None or followed is None:
                    continue  # nobody follows it any more
                for offered, (entry_id, fields) in enumerate(entries, 1):
                    if offered % OFFERS_BETWEEN_TURNS == 0:
                        await asyncio.sleep(0)  # the rest of the process's turn
                    # Followed again meanwhile (its last subscriber gone while a gap was read
                    # from the cache, and a new one come): the new follower begins at the
                    # stream's end then, and was moved back and offered older changes.
                    if self._types.get(entity_type) is not followed:
                        break
                    followed.cursor = text(entry_id)
                    try:
                        change = await self._change(entity_type, entry_fields(fields))
                    except Exception:  # an entry it cannot read: its entity's next shows the jump
                        log.exception("change feed: entry %s of %s skipped", entry_id, entity_type)
                        continue
                    if change is not None and self._types.get(entity_type) is followed:
                        self._offer(followed, change)

    async def _xread(self, streams: Mapping[str, str]) -> list[Any]:
        asked: dict[Any, Any] = dict(streams)
        if not isinstance(self._client, RedisCluster):
            answer = await self._client.xread(asked, count=READ_COUNT, block=self._block_ms)
            return list(answer or [])
        # A cluster keeps each type's stream in its own slot: one read per type, none blocking.
        found: list[Any] = []
        for key, cursor in asked.items():
            found.extend(await self._client.xread({key: cursor}, count=READ_COUNT) or [])
        if not found:
            await asyncio.sleep(self._block_ms / 1000)
        return found

    def _offer(self, followed: _Followed, change: Change) -> None:
        for box in followed.by_entity.get(change.entity_id, ()):
            box.offer(change)
        for box in followed.everyone:
            box.offer(change)

    async def _change(self, entity_type: str, entry: dict[str, str]) -> Change | None:
        entity_id = entry.get("id", "")
        followed = self._types.get(entity_type)
        if followed is None or not (followed.everyone or entity_id in followed.by_entity):
            return None
        if entry.get("type") == "gap":
            if entry.get("state_revision") != entry.get("to"):
                return None  # a later change of the same publish carries the state
            try:
                hit = await self._cache.get(entity_type, entity_id)
            except CacheUnavailable:
                return None  # the subscriber's next change shows the jump
            if hit is None or hit.snapshot.state is None:
                return None
            gap_end = (int(entry.get("incarnation") or 0), int(entry.get("to") or 0))
            if (hit.snapshot.incarnation, hit.snapshot.revision) > gap_end:
                # The cache is ahead: the stream's later entries bring those states, in
                # order. Shown now, a status-filtered view could show the later state, then
                # the earlier one after it, as new.
                return None
            return Change(entity_type, hit.snapshot, gap=True)
        if "state" not in entry:
            return None
        at = datetime.fromisoformat(entry["at"]) if entry.get("at") else None
        snapshot = Snapshot(
            entity_type=entity_type,
            entity_id=entity_id,
            revision=int(entry["revision"]),
            updated_at=at,
            state=json.loads(entry["state"]),
            incarnation=int(entry.get("incarnation") or 0),
        )
        return Change(
            entity_type,
            snapshot,
            command=entry.get("command") or None,
            command_id=entry.get("command_id") or None,
            sent_by=entry.get("sent_by") or None,
            at=at,
        )
