"""The note Redis keeps of each entry a webhook delivery has read and not yet done, and the
retry schedule it carries.

A note, in the subscriber's `attempts` hash under `<stream>/<entry id>`, says whose the entry
is (its entity, incarnation and the revisions it covers), so that one trimmed from the stream
while pending can still be told as a gap; and, once it has been tried, its retries (the first
attempt, the count, when the next is due), so that a later run keeps the same schedule and
deadline. It is JSON, `{"id", "incarnation", "from", "to", "first", "attempts", "due"}`, each
part only when known; runs before wrote `first:attempts`, which is still read.

A failed send is tried again after the backoff, doubled each time up to an hour, until the
retry period has passed since the change was appended to its stream (or since its first
attempt, should that be earlier by the clocks), and it has been tried MIN_ATTEMPTS times;
then it is dead-lettered. Counted from each
one's first attempt, a change waiting behind its entity's refused change began its own
period only once that one was dead-lettered: an entity whose every change a receiver
refused took a day per change, and its parked changes stopped the subscriber's reading.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from workers.webhook_subscribers import WebhookSubscribers

MAX_BACKOFF_SECONDS = 3600.0
MIN_ATTEMPTS = 3
"""Tries each entry has, however long ago it was appended: after an outage of the delivery
longer than the retry period, one 503 dead-lettered every change it had kept waiting."""


@dataclass
class Retries:
    """An entry's attempts so far: when the first was, how many, when the next is due."""

    first: float | None = None
    attempts: int = 0
    due: float | None = None

    @classmethod
    def of(cls, note: Mapping[str, Any]) -> Retries:
        """The retries an entry's note holds; none if it has not been tried."""
        return cls(note.get("first"), int(note.get("attempts", 0)), note.get("due"))


def appended_at(entry_id: str) -> float:
    """When Redis appended a stream entry, by its id (`<milliseconds>-<sequence>`), in
    seconds since the epoch."""
    return int(entry_id.partition("-")[0]) / 1000


@dataclass(frozen=True)
class RetrySchedule:
    """How long a failing entry is tried for (`retry_for`, from when it was appended or first
    tried, the earlier), and how long it waits before its second (`backoff`, doubled for each
    one after)."""

    retry_for: float
    backoff: float

    def gives_up(self, since: float, now: float, attempts: int) -> bool:
        """Whether an entry tried for since `since`, failing at `now` its `attempts`th time,
        is to be dead-lettered: not before MIN_ATTEMPTS, whenever it was appended."""
        return attempts >= MIN_ATTEMPTS and now - since >= self.retry_for

    def next_due(self, attempts: int, since: float, now: float) -> float:
        """When an entry that failed `attempts` times is tried again: never past its
        deadline, once it has had MIN_ATTEMPTS."""
        # Doubled at most until it passes the cap: 2 ** 1024 overflowed a float, in a retry
        # period over about 42 days, and stopped the subscriber's delivery for good.
        doublings = min(max(attempts - 1, 0), 64)
        wait: float = min(self.backoff * 2**doublings, MAX_BACKOFF_SECONDS)
        if attempts >= MIN_ATTEMPTS:
            wait = min(wait, since + self.retry_for - now)
        return now + max(wait, 0)


def note_of(retries: Retries, entity_id: str, covers: tuple[str, str, str] | None) -> str:
    """An entry's note: whose it is, if `covers` says (its entity's incarnation and the
    revisions, from and to, it stands for), and its retries, once tried."""
    kept: dict[str, Any] = {}
    if covers is not None:
        incarnation, first, last = covers
        kept.update({"id": entity_id, "incarnation": incarnation})
        kept.update({"from": first, "to": last})
    if retries.first is not None:
        kept.update(asdict(retries))
    return json.dumps(kept, separators=(",", ":"))


def _noted(raw: bytes | None) -> dict[str, Any]:
    """A note as `note_of` writes it, or as runs wrote it before (`first:attempts`)."""
    if raw is None:
        return {}
    text = raw.decode()
    if not text.startswith("{"):
        first, _, attempts = text.partition(":")
        return {"first": float(first), "attempts": int(attempts)}
    noted: dict[str, Any] = json.loads(text)
    return noted


class EntryNotes:
    """A subscriber's notes of its pending entries, kept until each entry is done."""

    def __init__(self, subscribers: WebhookSubscribers, subscriber_id: str) -> None:
        self._redis = subscribers.client
        self._key = subscribers.key(subscriber_id, "attempts")

    async def note(
        self, stream: str, entries: list[tuple[str, str | None]]
    ) -> list[dict[str, Any]]:
        """Note each entry (its id, and its note, or None when it was trimmed) unless noted
        before, when its note holds its retries so far; and what each entry's note holds."""
        if not entries:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, text in entries:
                if text is not None:
                    pipe.hsetnx(self._key, _field(stream, entry_id), text)
                pipe.hget(self._key, _field(stream, entry_id))
            answers = iter(await pipe.execute())
        notes = []
        for _, text in entries:
            if text is not None:
                next(answers)  # whether it was noted just now
            notes.append(_noted(next(answers)))
        return notes

    async def keep(self, stream: str, entry_id: str, text: str) -> None:
        """Replace an entry's note, as when its retries have moved on."""
        await self._redis.hset(self._key, _field(stream, entry_id), text)

    async def forget(self, stream: str, entry_ids: Iterable[str]) -> None:
        """Drop the notes of entries that are done."""
        await self._redis.hdel(self._key, *(_field(stream, entry_id) for entry_id in entry_ids))


def _field(stream: str, entry_id: str) -> str:
    return f"{stream}/{entry_id}"
