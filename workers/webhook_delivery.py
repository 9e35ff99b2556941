"""The delivery activity of outbound webhooks: a subscriber's changes, read through its
consumer groups, signed and posted, in order per entity.

One run reads the subscriber's pending entries first (left by a run that stopped or died),
then new ones, from each of its entity types' change streams and from its replays. Each
entity's entries go one after another, the next only once the one before was delivered (a
2xx answer) or dead-lettered. At most `PARALLEL_ENTITIES` sends are in flight at once; an
entity waiting to retry holds none, so failing entities do not hold back the others until
`MAX_HELD` entries wait in memory. A failed send is tried again after
`webhook_backoff_seconds`, doubled each time up to an hour, until `webhook_retry_for_seconds`
after its first attempt; then it is dead-lettered. The first attempt, the count and when the
next is due are kept in Redis, so a later run keeps the same schedule and deadline.
An entry is acknowledged only once done, so a send is at least once: a duplicate carries the
same `webhook-id`. A run ends after its `seconds`, letting sends in flight finish, and the
workflow starts the next.

Nothing pending is dropped silently. Retention may trim entries from a stream while they wait,
and a stream then answers them with no fields; so each entry read is noted (its entity and
revisions) until done. The subscriber gets a trimmed entity's missed revisions as one
`<type>.gap` (`from`, `to`), with the `webhook-id` `<type>:<id>:<incarnation>:gap:<from>-<to>`;
an entry trimmed before it was noted (its run died in between) is a dead letter instead,
`trimmed from the stream before delivery`, whose body is a `<type>.gap` naming only the stream
entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from redis.exceptions import ResponseError
from temporalio import activity

from entities.webhook_delivery import (
    DELIVER_ACTIVITY,
    DeliveryCounts,
    DeliveryRun,
    DeliveryRunResult,
)
from workers.cache import SnapshotCache
from workers.settings import Settings
from workers.webhook_subscribers import (
    DeadLetter,
    Subscriber,
    WebhookSubscribers,
    event_body,
    group_name,
    sign,
)

PARALLEL_ENTITIES = 16
"""Sends in flight at once, each of its own entity; an entity waiting to retry holds none."""
MAX_HELD = 1_000
READ_COUNT = 100
POLL_SECONDS = 0.25
LOOK_FOR_REMOVAL_SECONDS = 2.0
HEARTBEAT_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 3600.0
CONSUMER = "delivery"
"""One run at a time per subscriber, so one consumer name: a new run owns what the last left
pending."""
TRIMMED = "trimmed from the stream before delivery"
"""The error of a dead letter for an entry trimmed before anything noted whose it was."""


@dataclass
class _Retries:
    """An entry's attempts so far: when the first was, how many, when the next is due."""

    first: float | None = None
    attempts: int = 0
    due: float | None = None


@dataclass
class _Item:
    """One entry to send: from a change stream, or a dead letter being replayed; or a gap for
    entries of one entity trimmed from the stream before they were sent (`entry_ids`, done
    together). `covers` is the entity's incarnation and the revisions, from and to, it
    stands for (none for a replay)."""

    stream: str
    entry_ids: list[str]
    webhook_id: str
    entity_type: str
    entity_id: str
    body: str
    covers: tuple[str, str, str] | None = None
    replay: bool = False
    trimmed: bool = False
    retries: _Retries = field(default_factory=_Retries)

    @property
    def attempt_key(self) -> str:
        return _attempt_key(self.stream, self.entry_ids[0])

    def note(self) -> str:
        """What Redis keeps of it until it is done: whose it is, and its retries."""
        kept: dict[str, Any] = {}
        if self.covers is not None:
            incarnation, first, last = self.covers
            kept.update({"id": self.entity_id, "incarnation": incarnation})
            kept.update({"from": first, "to": last})
        if self.retries.first is not None:
            kept.update(asdict(self.retries))
        return json.dumps(kept, separators=(",", ":"))

    def joined(self, later: _Item) -> _Item | None:
        """This gap of trimmed entries and the entity's next one as one gap, retried as this
        one was; None unless both are such gaps, of one incarnation."""
        if not (self.trimmed and later.trimmed and self.covers and later.covers):
            return None
        if self.covers[0] != later.covers[0]:
            return None
        covers = (self.covers[0], self.covers[1], later.covers[2])
        entry_ids = [*self.entry_ids, *later.entry_ids]
        joined = _gap(self.stream, self.entity_type, self.entity_id, covers, entry_ids)
        joined.retries = self.retries
        return joined


def _attempt_key(stream: str, entry_id: str) -> str:
    return f"{stream}/{entry_id}"


def _noted(raw: bytes | None) -> dict[str, Any]:
    """A note as `_Item.note` writes it, or as runs wrote it before (`first:attempts`)."""
    if raw is None:
        return {}
    text = raw.decode()
    if not text.startswith("{"):
        first, _, attempts = text.partition(":")
        return {"first": float(first), "attempts": int(attempts)}
    noted: dict[str, Any] = json.loads(text)
    return noted


def _retries(note: Mapping[str, Any]) -> _Retries:
    return _Retries(note.get("first"), int(note.get("attempts", 0)), note.get("due"))


def _gap(
    stream: str,
    entity_type: str,
    entity_id: str,
    covers: tuple[str, str, str],
    entry_ids: list[str],
) -> _Item:
    """The gap event of an entity's entries trimmed before they were sent, as the stream's
    own gaps are sent; its `webhook-id` names where it ends too, since a later run may find
    more of them."""
    incarnation, first, last = covers
    fields = {"type": "gap", "id": entity_id, "incarnation": incarnation, "from": first, "to": last}
    webhook_id, _, body = event_body(entity_type, fields)
    text = json.dumps(body, separators=(",", ":"))
    return _Item(
        stream,
        entry_ids,
        f"{webhook_id}-{last}",
        entity_type,
        entity_id,
        text,
        covers,
        trimmed=True,
    )


async def _until(event: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `event` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


class WebhookDelivery:
    """Sends subscribers' webhooks; built with the worker's Redis client and settings."""

    def __init__(self, cache: SnapshotCache, settings: Settings) -> None:
        self._subscribers = WebhookSubscribers(cache.client, cache.prefix)
        self._retry_for = settings.webhook_retry_for_seconds
        self._backoff = settings.webhook_backoff_seconds

    @DELIVER_ACTIVITY.defn
    async def deliver_webhooks(self, run: DeliveryRun) -> DeliveryRunResult:
        """Deliver a subscriber's changes for `run.seconds`; `removed` once it is gone."""
        subscriber = await self._subscribers.get(run.subscriber_id)
        if subscriber is None:
            return DeliveryRunResult(removed=True)
        for entity_type in subscriber.events:  # gone if Redis lost them: from now on
            await self._subscribers.ensure_group(subscriber.id, entity_type, start="$")
        await self._subscribers.ensure_group(subscriber.id, None, start="0")
        async with httpx.AsyncClient(
            timeout=SEND_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
        ) as http:
            delivering = _Run(self._subscribers, subscriber, http, self._retry_for, self._backoff)
            return await delivering.go(run.seconds)


class _Run:
    """One run of a subscriber's delivery: its reads, per-entity queues and sends."""

    def __init__(
        self,
        subscribers: WebhookSubscribers,
        subscriber: Subscriber,
        http: httpx.AsyncClient,
        retry_for: float,
        backoff: float,
    ) -> None:
        self._subscribers = subscribers
        self._redis = subscribers.client
        self._subscriber = subscriber
        self._key = subscriber.key()
        self._group = group_name(subscriber.id)
        self._attempts = subscribers.key(subscriber.id, "attempts")
        self._http = http
        self._retry_for = retry_for
        self._backoff = backoff
        self._streams: dict[str, str | None] = {
            subscribers.stream(entity_type): entity_type for entity_type in subscriber.events
        }
        self._streams[subscribers.key(subscriber.id, "replay")] = None
        self._cursors = dict.fromkeys(self._streams, "0")  # pending entries first
        self._queues: dict[tuple[str, str], deque[_Item]] = {}
        self._held = 0
        self._sending = asyncio.Semaphore(PARALLEL_ENTITIES)
        self._stopping = asyncio.Event()
        self._removed = False
        self.counts = DeliveryCounts()

    async def go(self, seconds: float) -> DeliveryRunResult:
        deadline = time.monotonic() + seconds
        next_look = time.monotonic() + LOOK_FOR_REMOVAL_SECONDS
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._heartbeat())
            # A worker stopping ends the run at once: it reports what it counted, and the
            # next run (on another worker) takes up where it stopped, rather than holding
            # the shutdown for its whole grace and being cancelled then.
            while (
                time.monotonic() < deadline
                and not self._removed
                and not activity.is_worker_shutdown()
            ):
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + LOOK_FOR_REMOVAL_SECONDS
                    self._removed = await self._subscribers.get(self._subscriber.id) is None
                read = 0
                for stream in self._streams:
                    if self._held >= MAX_HELD or self._removed:
                        break
                    read += await self._read(stream, tasks)
                if not read:
                    await asyncio.sleep(POLL_SECONDS)
            self._stopping.set()  # sends in flight finish; none starts
        return DeliveryRunResult(counts=self.counts, removed=self._removed)

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            activity.heartbeat()
            await _until(self._stopping, HEARTBEAT_SECONDS)

    async def _read(self, stream: str, tasks: asyncio.TaskGroup) -> int:
        """Read the next entries of one stream into the entities' queues; how many."""
        cursor = self._cursors[stream]
        count = min(READ_COUNT, MAX_HELD - self._held)
        try:
            answer: Any = await self._redis.xreadgroup(
                self._group, CONSUMER, {stream: cursor}, count=count
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # removed meanwhile
                self._removed = True
                return 0
            raise
        entries: list[tuple[bytes, Mapping[bytes, bytes] | None]] = answer[0][1] if answer else []
        if cursor != ">":
            self._cursors[stream] = entries[-1][0].decode() if entries else ">"
        read: list[tuple[str, _Item | None]] = []  # None: trimmed while pending
        skipped: list[str] = []
        for raw_id, raw_fields in entries:
            entry_id = raw_id.decode()
            item = self._item(stream, entry_id, raw_fields) if raw_fields else None
            if raw_fields and item is None:
                skipped.append(entry_id)
            else:
                read.append((entry_id, item))
        ready, lost = self._ready(stream, read, await self._notes(stream, read))
        for item in ready:
            key = (item.entity_type, item.entity_id)
            queue = self._queues.get(key)
            self._held += 1
            if queue is None:
                self._queues[key] = deque([item])
                tasks.create_task(self._drain(key))
            else:
                queue.append(item)
        for entry_id, note in lost:
            await self._subscribers.dead_letter(
                self._subscriber.id, self._lost(stream, entry_id, note)
            )
        if skipped or lost:
            await self._redis.xack(stream, self._group, *skipped, *(e for e, _ in lost))
        if lost:
            await self._redis.hdel(self._attempts, *(_attempt_key(stream, e) for e, _ in lost))
        self.counts.ignored += len(skipped)
        self.counts.dead_lettered += len(lost)
        return len(entries)

    def _ready(
        self, stream: str, read: list[tuple[str, _Item | None]], notes: list[dict[str, Any]]
    ) -> tuple[list[_Item], list[tuple[str, dict[str, Any]]]]:
        """The sends of the entries read, in order, with their retries so far, a gap for
        those trimmed whose notes say whose they were; and the others trimmed, with notes."""
        ready: list[_Item] = []
        latest: dict[tuple[str, str], int] = {}  # each entity's last place in `ready`
        lost: list[tuple[str, dict[str, Any]]] = []
        for (entry_id, read_item), note in zip(read, notes, strict=True):
            item = read_item or self._trimmed(stream, entry_id, note)
            if item is None:
                lost.append((entry_id, note))
                continue
            key = (item.entity_type, item.entity_id)
            joined = ready[latest[key]].joined(item) if key in latest else None
            if joined is not None:  # one gap for the entity's trimmed entries
                ready[latest[key]] = joined
                continue
            item.retries = _retries(note)
            latest[key] = len(ready)
            ready.append(item)
        return ready, lost

    async def _notes(
        self, stream: str, read: list[tuple[str, _Item | None]]
    ) -> list[dict[str, Any]]:
        """Note whose each entry to send is, unless noted before (then its note holds its
        retries so far), so that one trimmed before it is done can still be told; and what
        each entry's note holds."""
        if not read:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, item in read:
                if item is not None:
                    pipe.hsetnx(self._attempts, _attempt_key(stream, entry_id), item.note())
                pipe.hget(self._attempts, _attempt_key(stream, entry_id))
            answers = iter(await pipe.execute())
        notes = []
        for _, item in read:
            if item is not None:
                next(answers)  # whether it was noted just now
            notes.append(_noted(next(answers)))
        return notes

    def _item(self, stream: str, entry_id: str, raw: Mapping[bytes, bytes]) -> _Item | None:
        """The entry as a send, or None when it is not for this subscriber."""
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        entity_type = self._streams[stream]
        if entity_type is None:
            letter = DeadLetter.of(entry_id, raw)
            return _Item(
                stream,
                [entry_id],
                letter.webhook_id,
                letter.entity_type,
                letter.entity_id,
                letter.body,
                replay=True,
            )
        command = fields.get("command") if fields.get("type") == "change" else None
        if fields.get("type") not in ("change", "gap"):
            return None
        if not self._subscriber.wants(entity_type, command):
            return None
        webhook_id, entity_id, body = event_body(entity_type, fields)
        text = json.dumps(body, separators=(",", ":"))
        incarnation = fields.get("incarnation", "")
        if command is None:
            covers = (incarnation, fields.get("from", ""), fields.get("to", ""))
        else:
            covers = (incarnation, fields.get("revision", ""), fields.get("revision", ""))
        return _Item(stream, [entry_id], webhook_id, entity_type, entity_id, text, covers)

    def _trimmed(self, stream: str, entry_id: str, note: Mapping[str, Any]) -> _Item | None:
        """The gap event for an entry trimmed while pending, when its note says whose it was."""
        entity_type = self._streams[stream]
        if entity_type is None or "id" not in note:
            return None
        covers = (str(note["incarnation"]), str(note["from"]), str(note["to"]))
        return _gap(stream, entity_type, str(note["id"]), covers, [entry_id])

    def _lost(self, stream: str, entry_id: str, note: Mapping[str, Any]) -> DeadLetter:
        """The dead letter of an entry trimmed before anything noted whose it was: it names
        only the stream entry, so the subscriber knows it missed a change of the type."""
        entity_type = self._streams[stream] or ""
        data = {"entity_type": entity_type, "stream_entry": entry_id}
        body = {"type": f"{entity_type}.gap", "timestamp": None, "data": data}
        now = time.time()
        return DeadLetter(
            webhook_id=f"{entity_type}:trimmed:{entry_id}",
            entity_type=entity_type,
            entity_id="",
            body=json.dumps(body, separators=(",", ":")),
            attempts=int(note.get("attempts", 0)),
            error=TRIMMED,
            first_attempt_at=datetime.fromtimestamp(note.get("first") or now, UTC),
            failed_at=datetime.fromtimestamp(now, UTC),
        )

    async def _drain(self, key: tuple[str, str]) -> None:
        """Send one entity's entries in order, while the run goes on."""
        queue = self._queues[key]
        while queue and not self._stopping.is_set():
            if not await self._until_done(queue[0]):
                break
            queue.popleft()
            self._held -= 1
        if not queue:
            del self._queues[key]

    async def _until_done(self, item: _Item) -> bool:
        """Send until delivered or dead-lettered (True), or until the run stops (False)."""
        retries = item.retries
        while not self._stopping.is_set():
            if retries.due is not None and retries.due > time.time():
                # Waiting holds no sending slot: the slots bound sends in flight, and an
                # entity in backoff must not keep the others from theirs.
                await _until(self._stopping, retries.due - time.time())
                continue
            async with self._sending:
                if self._stopping.is_set():
                    break
                first = retries.first = retries.first or time.time()
                error = await self._send(item)
            retries.attempts += 1
            now = time.time()
            if error is None:
                self.counts.delivered += 1
            elif now - first >= self._retry_for:
                await self._subscribers.dead_letter(
                    self._subscriber.id,
                    DeadLetter(
                        webhook_id=item.webhook_id,
                        entity_type=item.entity_type,
                        entity_id=item.entity_id,
                        body=item.body,
                        attempts=retries.attempts,
                        error=error,
                        first_attempt_at=datetime.fromtimestamp(first, UTC),
                        failed_at=datetime.fromtimestamp(now, UTC),
                    ),
                )
                self.counts.dead_lettered += 1
            else:
                wait = min(
                    self._backoff * 2 ** (retries.attempts - 1),
                    MAX_BACKOFF_SECONDS,
                    first + self._retry_for - now,
                )
                # Kept, so that a run starting meanwhile waits for it as this one would.
                retries.due = now + max(wait, 0)
                await self._redis.hset(self._attempts, item.attempt_key, item.note())
                continue
            await self._done(item)
            return True
        return False

    async def _done(self, item: _Item) -> None:
        await self._redis.xack(item.stream, self._group, *item.entry_ids)
        if item.replay:
            await self._redis.xdel(item.stream, *item.entry_ids)
        keys = [_attempt_key(item.stream, entry_id) for entry_id in item.entry_ids]
        await self._redis.hdel(self._attempts, *keys)

    async def _send(self, item: _Item) -> str | None:
        """Post it once, signed now: None when answered 2xx, else what went wrong."""
        body = item.body.encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "Tenure-Webhooks",
            "webhook-id": item.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, item.webhook_id, timestamp, body),
        }
        try:
            # Streamed, and closed unread: a receiver's answer body is not ours to hold.
            async with self._http.stream(
                "POST", self._subscriber.url, content=body, headers=headers
            ) as response:
                status = response.status_code
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None if 200 <= status < 300 else f"HTTP {status}"
