"""The delivery activity of outbound webhooks: a subscriber's changes, read through its
consumer groups, signed and posted, in order per entity.

One run reads the subscriber's pending entries first (left by a run that stopped or died),
then new ones, from each of its entity types' change streams and from its replays. Each
entity's entries go one after another, the next only once the one before was delivered (a
2xx answer) or dead-lettered; up to `PARALLEL_ENTITIES` entities at once, and at most
`MAX_HELD` entries held in memory, so one failing entity does not hold back the others until
that many of its entries wait. A failed send is tried again after `webhook_backoff_seconds`,
doubled each time up to an hour, until `webhook_retry_for_seconds` after its first attempt
(kept in Redis, so a later run goes on with the same deadline); then it is dead-lettered.
An entry is acknowledged only once done, so a send is at least once: a duplicate carries the
same `webhook-id`. A run ends after its `seconds`, letting sends in flight finish, and the
workflow starts the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass
class _Item:
    """One entry to send: from a change stream, or a dead letter being replayed."""

    stream: str
    entry_id: str
    webhook_id: str
    entity_type: str
    entity_id: str
    body: str
    replay: bool = False

    @property
    def attempt_key(self) -> str:
        return f"{self.stream}/{self.entry_id}"


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
        self._parallel = asyncio.Semaphore(PARALLEL_ENTITIES)
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
        skipped: list[bytes] = []
        for raw_id, raw_fields in entries:
            item = self._item(stream, raw_id.decode(), raw_fields)
            if item is None:
                skipped.append(raw_id)
                continue
            key = (item.entity_type, item.entity_id)
            queue = self._queues.get(key)
            self._held += 1
            if queue is None:
                self._queues[key] = deque([item])
                tasks.create_task(self._drain(key))
            else:
                queue.append(item)
        if skipped:
            await self._redis.xack(stream, self._group, *skipped)
            self.counts.ignored += len(skipped)
        return len(entries)

    def _item(self, stream: str, entry_id: str, raw: Mapping[bytes, bytes] | None) -> _Item | None:
        """The entry as a send, or None when it is not for this subscriber (or was trimmed
        from the stream while pending)."""
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        entity_type = self._streams[stream]
        if entity_type is None:
            letter = DeadLetter.of(entry_id, raw)
            return _Item(
                stream,
                entry_id,
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
        return _Item(stream, entry_id, webhook_id, entity_type, entity_id, text)

    async def _drain(self, key: tuple[str, str]) -> None:
        """Send one entity's entries in order, while the run goes on."""
        queue = self._queues[key]
        async with self._parallel:
            while queue and not self._stopping.is_set():
                if not await self._until_done(queue[0]):
                    break
                queue.popleft()
                self._held -= 1
            if not queue:
                del self._queues[key]

    async def _until_done(self, item: _Item) -> bool:
        """Send until delivered or dead-lettered (True), or until the run stops (False)."""
        first, attempts = await self._first_attempt(item)
        while not self._stopping.is_set():
            attempts += 1
            error = await self._send(item)
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
                        attempts=attempts,
                        error=error,
                        first_attempt_at=datetime.fromtimestamp(first, UTC),
                        failed_at=datetime.fromtimestamp(now, UTC),
                    ),
                )
                self.counts.dead_lettered += 1
            else:
                await self._redis.hset(self._attempts, item.attempt_key, f"{first}:{attempts}")
                wait = min(
                    self._backoff * 2 ** (attempts - 1),
                    MAX_BACKOFF_SECONDS,
                    first + self._retry_for - now,
                )
                await _until(self._stopping, max(wait, 0))
                continue
            await self._done(item)
            return True
        return False

    async def _first_attempt(self, item: _Item) -> tuple[float, int]:
        raw: Any = await self._redis.hget(self._attempts, item.attempt_key)
        if raw is None:
            return time.time(), 0
        first, _, attempts = raw.decode().partition(":")
        return float(first), int(attempts)

    async def _done(self, item: _Item) -> None:
        await self._redis.xack(item.stream, self._group, item.entry_id)
        if item.replay:
            await self._redis.xdel(item.stream, item.entry_id)
        await self._redis.hdel(self._attempts, item.attempt_key)

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
