"""The delivery activity of outbound webhooks: a subscriber's changes, read through its
consumer groups, signed and posted, in order per entity.

One run reads the subscriber's pending entries first (left by a run that stopped or died),
then new ones, from each of its entity types' change streams and from its replays. Each
entity's entries go one after another, the next only once the one before was delivered (a
2xx answer) or dead-lettered. At most `PARALLEL_ENTITIES` sends are in flight at once; an
entity waiting to retry holds none, so failing entities do not hold back the others. At most
`MAX_HELD` entries wait in memory (and one more for each entity whose parked entries are
read back then): past that, those waiting behind an entity's entry that
waits to retry are parked (their stream and id kept, the entry read again when its turn
comes), so that the others go on until `MAX_PARKED` are. A failed send is tried again after
`webhook_backoff_seconds`, doubled each time up to an hour, until `webhook_retry_for_seconds`
after it was appended to its stream (or first tried, the earlier), and at least three times
(workers/webhook_retries.py); then it is dead-lettered. An entry is acknowledged only once done,
so a send is at least once: a duplicate carries the same `webhook-id`. A run ends after its
`seconds`, letting sends in flight finish, and the workflow starts the next.

Each entry read is noted in Redis until done, with its retries (workers/webhook_retries.py), so
a later run keeps the same schedule and deadline, and an entry trimmed from the stream while
pending is not lost; what each entry is sent as, a trimmed one included, is
workers/webhook_entries.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Mapping
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
from workers.failures import REDIS_FAILURES
from workers.settings import Settings
from workers.webhook_entries import Entries, Send
from workers.webhook_retries import EntryNotes, RetrySchedule, appended_at
from workers.webhook_subscribers import (
    Subscriber,
    WebhookSubscribers,
    group_name,
    sign,
)

PARALLEL_ENTITIES = 16
"""Sends in flight at once, each of its own entity; an entity waiting to retry holds none."""
MAX_HELD = 1_000
MAX_PARKED = 20_000
"""Entries parked behind entities waiting to retry; past it, reading waits (a stall)."""
READ_COUNT = 100
POLL_SECONDS = 0.25
LEASE_POLL_SECONDS = 1.0
LOOK_FOR_REMOVAL_SECONDS = 2.0
HEARTBEAT_SECONDS = 5.0
LEASE_SECONDS = 15.0
"""How long a run holds its subscriber's delivery unless it renews the hold, which it does
with each heartbeat: one run at a time, or two would each send an entity's changes."""
SEND_TIMEOUT_SECONDS = 10.0
WEBHOOKS_METRIC = "tenure_webhooks"
DELIVERED, DEAD_LETTERED = "delivered", "dead_lettered"
SUBSCRIBERS_LOST_METRIC = "tenure_webhook_subscribers_lost"
LOST_DESCRIPTION = "Webhook subscribers whose delivery stopped without their removal."
CONSUMER = "delivery"
"""One run at a time per subscriber, so one consumer name: a new run owns what the last left
pending."""


async def _said_gone(subscribers: WebhookSubscribers, subscriber_id: str) -> None:
    """A subscriber's delivery stops: removed, or lost with a Redis that restarted empty,
    which ends a subscription no one removed (README, "Outbound webhooks"). The second is
    an error and counted (`SUBSCRIBERS_LOST_METRIC`, alert TenureWebhookSubscriberLost): its
    receiver gets nothing more, and nothing else would say so."""
    if await subscribers.was_removed(subscriber_id):
        activity.logger.info("webhook subscriber %s was removed: its delivery stops", subscriber_id)
        return
    activity.logger.error(
        "webhook subscriber %s is not in Redis and was not removed (a Redis that restarted "
        "empty?): its delivery stops; register it again",
        subscriber_id,
    )
    activity.metric_meter().create_counter(SUBSCRIBERS_LOST_METRIC, LOST_DESCRIPTION).add(1)


async def _until(event: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `event` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


class WebhookDelivery:
    """Sends subscribers' webhooks; built with the worker's Redis client and settings."""

    def __init__(self, cache: SnapshotCache, settings: Settings) -> None:
        self._subscribers = WebhookSubscribers(cache.client, cache.prefix)
        self._schedule = RetrySchedule(
            settings.webhook_retry_for_seconds, settings.webhook_backoff_seconds
        )

    @DELIVER_ACTIVITY.defn
    async def deliver_webhooks(self, run: DeliveryRun) -> DeliveryRunResult:
        """Deliver a subscriber's changes for `run.seconds`; `removed` once it is gone."""
        lost = activity.metric_meter().create_counter(SUBSCRIBERS_LOST_METRIC, LOST_DESCRIPTION)
        lost.add(0)  # exported at 0 from the first run, so the first loss is an increase
        subscriber = await self._subscribers.get(run.subscriber_id)
        if subscriber is None:
            return await self._gone(run.subscriber_id)
        holder = uuid.uuid4().hex
        if not await self._lease(subscriber.id, holder, run.seconds):
            return DeliveryRunResult()
        try:
            return await self._deliver(subscriber, holder, run)
        finally:
            with contextlib.suppress(*REDIS_FAILURES):
                await self._subscribers.release_lease(subscriber.id, holder)

    async def _gone(self, subscriber_id: str) -> DeliveryRunResult:
        """A subscriber removed (or lost): its keys dropped, and the run's end told."""
        await self._subscribers.drop_keys(subscriber_id)
        await _said_gone(self._subscribers, subscriber_id)
        return DeliveryRunResult(removed=True)

    async def _lease(self, subscriber_id: str, holder: str, seconds: float) -> bool:
        """Wait, up to the run's length, for the subscriber's delivery to be this run's to
        hold. Another attempt may still run: Temporal starts a new one once the last one's
        heartbeats stop reaching it, which a worker cut off from Temporal and not from Redis
        goes on running, under the same consumer; the two took turns at an entity's
        changes and sent them out of order."""
        deadline = time.monotonic() + seconds
        while not await self._subscribers.take_lease(subscriber_id, holder, LEASE_SECONDS):
            if time.monotonic() >= deadline or activity.is_worker_shutdown():
                return False
            activity.heartbeat()
            await asyncio.sleep(LEASE_POLL_SECONDS)
        return True

    async def _deliver(
        self, subscriber: Subscriber, holder: str, run: DeliveryRun
    ) -> DeliveryRunResult:
        for entity_type in subscriber.events:  # gone if Redis lost them: from now on
            await self._subscribers.ensure_group(subscriber.id, entity_type, start="$")
        await self._subscribers.ensure_group(subscriber.id, None, start="0")
        if await self._subscribers.get(run.subscriber_id) is None:
            # Removed while the groups were made: a removal's destroy that came before them
            # left these for good, with all they would hold pending.
            await self._subscribers.destroy_groups(subscriber.id, subscriber.events)
            return await self._gone(run.subscriber_id)
        async with httpx.AsyncClient(
            timeout=SEND_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
        ) as http:
            delivering = _Run(self._subscribers, subscriber, http, self._schedule, holder)
            return await delivering.go(run.seconds)


class _Run:
    """One run of a subscriber's delivery: its reads, per-entity queues and sends."""

    def __init__(
        self,
        subscribers: WebhookSubscribers,
        subscriber: Subscriber,
        http: httpx.AsyncClient,
        schedule: RetrySchedule,
        holder: str,
    ) -> None:
        self._subscribers = subscribers
        self._holder = holder  # of the delivery's lease (`LEASE_SECONDS`)
        self._redis = subscribers.client
        self._subscriber = subscriber
        self._key = subscriber.signing_key()
        self._group = group_name(subscriber.id)
        self._notes = EntryNotes(subscribers, subscriber.id)
        self._http = http
        self._schedule = schedule
        self._streams: dict[str, str | None] = {
            subscribers.stream(entity_type): entity_type for entity_type in subscriber.events
        }
        self._streams[subscribers.key(subscriber.id, "replay")] = None
        self._entries = Entries(subscriber, self._streams)
        self._cursors = dict.fromkeys(self._streams, "0")  # pending entries first
        self._queues: dict[tuple[str, str], deque[Send]] = {}
        self._held = 0
        self._reserved = 0  # of `_held`, room taken by reads under way for what they bring
        # Each entity's entries parked, in order after those in its queue: (stream, ids).
        self._parked: dict[tuple[str, str], deque[tuple[str, list[str]]]] = {}
        self._parked_count = 0
        self._sending = asyncio.Semaphore(PARALLEL_ENTITIES)
        self._stopping = asyncio.Event()
        self._removed = False
        self._group_lost = False
        self._first = 0  # the stream each pass reads first, in turn
        self._sent = activity.metric_meter().create_counter(
            WEBHOOKS_METRIC,
            "Changes sent to subscribers' webhooks, by outcome (one dead letter of changes "
            "trimmed unread counts once, whatever it says it missed).",
        )
        # Exported at 0 from the first run, so the first dead letter is an increase.
        self._sent.add(0, {"outcome": DEAD_LETTERED})
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
                and not self._group_lost
                and not self._stopping.is_set()  # its lease lost (`_heartbeat`)
                and not activity.is_worker_shutdown()
            ):
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + LOOK_FOR_REMOVAL_SECONDS
                    self._removed = await self._subscribers.get(self._subscriber.id) is None
                read = 0
                for stream in self._in_turn():
                    if self._held >= MAX_HELD:
                        self._park()
                    if self._full() or self._removed or self._group_lost:
                        break
                    read += await self._read(stream, tasks)
                if self._group_lost:
                    self._removed = await self._subscribers.get(self._subscriber.id) is None
                if not read:
                    await asyncio.sleep(POLL_SECONDS)
            self._stopping.set()  # sends in flight finish; none starts
        if self._group_lost and not self._removed:
            # Its stream deleted, or its group lost in a failover: it was taken for removed,
            # and its dead letters went with it while it stayed registered. The next run
            # makes its groups again, from the streams' ends, as a run after Redis lost them.
            activity.logger.error(
                "webhook subscriber %s: a consumer group of its streams is gone (a stream "
                "deleted, a failover?); delivery goes on from the streams' ends",
                self._subscriber.id,
            )
        if self._removed:  # what the sends in flight wrote after the removal
            await self._subscribers.drop_keys(self._subscriber.id)
            await _said_gone(self._subscribers, self._subscriber.id)
        return DeliveryRunResult(counts=self.counts, removed=self._removed)

    def _count(self, outcome: str, n: int) -> None:
        """Changes delivered or dead-lettered, in the run's counts and in the worker's
        metrics (`WEBHOOKS_METRIC`), as they happen."""
        if not n:
            return
        if outcome == DELIVERED:
            self.counts.delivered += n
        else:
            self.counts.dead_lettered += n
        self._sent.add(n, {"outcome": outcome})

    def _in_turn(self) -> list[str]:
        """The streams, a different one first at each pass: read in one order, the first
        type's backlog took every place a slow receiver freed, and the other types' changes
        and the replays were not read until retention trimmed them."""
        streams = list(self._streams)
        self._first = (self._first + 1) % len(streams)
        return streams[self._first :] + streams[: self._first]

    def _full(self) -> bool:
        return self._held >= MAX_HELD or self._parked_count >= MAX_PARKED

    def _park(self) -> None:
        """Put out of memory the entries waiting behind each entity whose first waits to
        retry: they would otherwise fill what is held, and hold back every other entity
        until that one is delivered or dead-lettered. Should the firsts alone still fill it,
        they go too (their drains wait, and read them back once due, their retries as noted
        in Redis): a thousand entities refused, a receiver down for one entity type, held it
        full, and no other type's change was read for a day. A first parked is in the stream
        alone, so one that retention trims before it is read back arrives as a gap, as the
        entries behind it do; one held arrives whole."""
        for firsts in (False, True):
            if firsts and self._held - self._reserved < MAX_HELD:
                return
            now = time.time()
            for key, queue in self._queues.items():
                due = queue[0].retries.due if queue else None
                if due is None or due <= now:  # being sent, or due: its drain sends it
                    continue
                parked = self._parked.setdefault(key, deque())
                while len(queue) > (0 if firsts else 1) and self._parked_count < MAX_PARKED:
                    item = queue.pop()  # before those parked already, which came later
                    parked.appendleft((item.stream, item.entry_ids))
                    self._held -= 1
                    self._parked_count += 1

    async def _unpark(self, key: tuple[str, str], queue: deque[Send]) -> None:
        """Read an entity's next parked entries again, into its (empty) queue."""
        parked = self._parked[key]
        # Within what may be held, but one at least: the entity's next must come.
        room = max(1, MAX_HELD - self._held)
        refs = [parked.popleft() for _ in range(min(len(parked), READ_COUNT, room))]
        self._parked_count -= len(refs)
        self._held += len(refs)  # held from now: a read meanwhile leaves room for them
        self._reserved += len(refs)
        taken = 0
        try:
            taken = await self._read_back(refs, queue)
        finally:
            self._held += taken - len(refs)
            self._reserved -= len(refs)
        if not parked:  # only now: entries read meanwhile went after these
            del self._parked[key]

    async def _read_back(self, refs: list[tuple[str, list[str]]], queue: deque[Send]) -> int:
        """The parked entries `refs` read from their streams again, into `queue`; how many
        sends they made (trimmed ones may be one gap, or dead letters)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, entry_ids in refs:
                for entry_id in entry_ids:
                    pipe.xrange(stream, entry_id, entry_id)
            answers = iter(await pipe.execute())
        batches: list[tuple[str, list[tuple[bytes, Mapping[bytes, bytes] | None]]]] = []
        for stream, entry_ids in refs:
            if not batches or batches[-1][0] != stream:
                batches.append((stream, []))
            for entry_id in entry_ids:
                found = next(answers)  # nothing once trimmed: told as read pending
                batches[-1][1].append((entry_id.encode(), found[0][1] if found else None))
        taken = 0
        for stream, entries in batches:
            ready = await self._take(stream, entries)
            queue.extend(ready)
            taken += len(ready)
        return taken

    async def _heartbeat(self) -> None:
        """Heartbeat, and renew the delivery's lease: once another run holds it (this one
        stalled past LEASE_SECONDS), stop, and leave the sending to that one. Redis out of
        reach renews nothing and takes nothing: the run goes on, as its reads let it."""
        while not self._stopping.is_set():
            activity.heartbeat()
            try:
                held = await self._subscribers.take_lease(
                    self._subscriber.id, self._holder, LEASE_SECONDS
                )
            except REDIS_FAILURES:
                held = True
            if not held:
                activity.logger.warning(
                    "webhook subscriber %s: another delivery run holds it; this one stops",
                    self._subscriber.id,
                )
                self._stopping.set()
                return
            await _until(self._stopping, HEARTBEAT_SECONDS)

    async def _read(self, stream: str, tasks: asyncio.TaskGroup) -> int:
        """Read the next entries of one stream into the entities' queues; how many."""
        cursor = self._cursors[stream]
        count = min(READ_COUNT, MAX_HELD - self._held)
        if count <= 0:
            return 0
        self._held += count  # held from now: a read back meanwhile leaves room for them
        self._reserved += count
        queued = 0
        try:
            try:
                if cursor == ">" and self._streams[stream]:
                    answer: Any = await self._read_new(stream, count)
                else:
                    answer = await self._redis.xreadgroup(
                        self._group, CONSUMER, {stream: cursor}, count=count
                    )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # removed meanwhile, or lost: `go` asks which
                    self._group_lost = True
                    return 0
                raise
            entries: list[tuple[bytes, Mapping[bytes, bytes] | None]] = (
                answer[0][1] if answer else []
            )
            if cursor != ">":
                self._cursors[stream] = entries[-1][0].decode() if entries else ">"
            for item in await self._take(stream, entries):
                key = (item.entity_type, item.entity_id)
                parked = self._parked.get(key)
                if parked is not None:  # after those parked, in order
                    parked.append((item.stream, item.entry_ids))
                    self._parked_count += 1
                    continue
                queue = self._queues.get(key)
                queued += 1
                if queue is None:
                    self._queues[key] = deque([item])
                    tasks.create_task(self._drain(key))
                else:
                    queue.append(item)
            return len(entries)
        finally:
            self._held += queued - count
            self._reserved -= count

    async def _take(
        self, stream: str, entries: list[tuple[bytes, Mapping[bytes, bytes] | None]]
    ) -> list[Send]:
        """The entries read of one stream as sends, noted; those not for the subscriber
        acknowledged, and those trimmed with nothing to tell dead-lettered."""
        read, skipped = self._entries.read(stream, entries)
        notes = await self._notes.note(
            stream,
            [(entry_id, item.note() if item is not None else None) for entry_id, item in read],
        )
        ready, lost = self._entries.ready(stream, read, notes)
        for entry_id, note in lost:
            await self._subscribers.dead_letter(
                self._subscriber.id, self._entries.lost(stream, entry_id, note)
            )
        if skipped or lost:
            await self._redis.xack(stream, self._group, *skipped, *(e for e, _ in lost))
        if lost:
            await self._notes.forget(stream, (e for e, _ in lost))
        self.counts.ignored += len(skipped)
        self._count(DEAD_LETTERED, len(lost))
        return ready

    async def _read_new(self, stream: str, count: int) -> Any:
        """The group's next entries of a change stream, read with a look, in the same
        transaction so that no trim falls between them, for changes retention trimmed before
        the group read them. A read skips those without a word, and Redis then counts them
        read: a look every 30 s, apart from the reads, missed every trim a read crossed
        first (190 of 300 changes gone unannounced behind a slow receiver)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
            pipe.xreadgroup(self._group, CONSUMER, {stream: ">"}, count=count)
            info, groups, answer = await pipe.execute(raise_on_error=False)
        if isinstance(answer, Exception):
            raise answer
        if not isinstance(info, Exception) and not isinstance(groups, Exception):
            read = [entry_id for entry_id, _ in answer[0][1]] if answer else []
            await self._tell_unread_trims(stream, info, groups, read)
        return answer

    async def _tell_unread_trims(
        self, stream: str, info: Any, groups: Any, read: list[bytes]
    ) -> None:
        """One dead letter for the changes trimmed before the group read them, saying how
        many: counted, as the stream and the group stood just before the read `read`, from the
        stream's entries ever added and those left, and the group's entries read (unknown for
        a group created before it was counted). The group's count is then set to what it has
        read, trimmed ones included, so the next look does not count them again."""
        ours = next((g for g in groups if g["name"].decode() == self._group), None)
        if ours is None or ours["entries-read"] is None:
            return
        trimmed = int(info["entries-added"]) - int(info["length"])
        missed = trimmed - int(ours["entries-read"])
        if missed <= 0:
            return
        after = ours["last-delivered-id"].decode()
        first = info["first-entry"][0].decode() if info["first-entry"] else None
        before = first or info["last-generated-id"].decode()
        await self._subscribers.dead_letter(
            self._subscriber.id, self._entries.unread(stream, after, before, missed)
        )
        self._count(DEAD_LETTERED, 1)
        # The read began at the stream's first entry, the group being behind it.
        at = read[-1].decode() if read else info["last-generated-id"].decode()
        await self._redis.xgroup_setid(stream, self._group, at, entries_read=trimmed + len(read))

    async def _drain(self, key: tuple[str, str]) -> None:
        """Send one entity's entries in order, while the run goes on."""
        queue = self._queues[key]
        while not self._stopping.is_set():
            if not queue:
                if key not in self._parked:
                    break
                await self._unpark(key, queue)
                continue
            item = queue[0]
            due = item.retries.due
            if due is not None and due > time.time():
                # Waiting holds no sending slot: the slots bound sends in flight, and an
                # entity in backoff must not keep the others from theirs. Nor, once the run
                # holds its most, a place in memory: its entries are parked (`_park`), and
                # read back when it wakes.
                if self._held >= MAX_HELD:
                    self._park()
                await _until(self._stopping, due - time.time())
                continue
            if not await self._attempt(item):
                continue  # to wait for its retry, or for the run's end
            queue.popleft()
            self._held -= 1
        if not queue and key not in self._parked:
            del self._queues[key]

    async def _attempt(self, item: Send) -> bool:
        """Send it once: True once delivered or dead-lettered, False when it is to be
        retried (its `retries.due` set) or the run stops first."""
        retries = item.retries
        async with self._sending:
            if self._stopping.is_set():
                return False
            first = retries.first = retries.first or time.time()
            error = await self._send(item)
        retries.attempts += 1
        now = time.time()
        # Its period runs from when it was appended: not from its first attempt, which waits
        # for its entity's changes before it.
        since = min(first, appended_at(item.entry_ids[0]))
        if error is None:
            self._count(DELIVERED, 1)
        elif self._schedule.gives_up(since, now, retries.attempts):
            await self._subscribers.dead_letter(
                self._subscriber.id, item.dead_letter(error, first, now)
            )
            self._count(DEAD_LETTERED, 1)
        else:
            # Kept, so that a run starting meanwhile, or this one reading it back once
            # parked, waits for it as it would have.
            retries.due = self._schedule.next_due(retries.attempts, since, now)
            await self._notes.keep(item.stream, item.entry_ids[0], item.note())
            return False
        await self._done(item)
        return True

    async def _done(self, item: Send) -> None:
        await self._redis.xack(item.stream, self._group, *item.entry_ids)
        if item.replay:
            await self._redis.xdel(item.stream, *item.entry_ids)
        await self._notes.forget(item.stream, item.entry_ids)

    async def _send(self, item: Send) -> str | None:
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
            # The client's timeout bounds each read of the socket, not the answer: a receiver
            # (or a proxy) that trickles its headers held a send, and the run, for as long
            # as it liked. Streamed, and closed unread: its body is not ours to hold.
            async with (
                asyncio.timeout(SEND_TIMEOUT_SECONDS),
                self._http.stream(
                    "POST", self._subscriber.url, content=body, headers=headers
                ) as response,
            ):
                status = response.status_code
        except TimeoutError:
            return f"no answer within {SEND_TIMEOUT_SECONDS:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None if 200 <= status < 300 else f"HTTP {status}"
