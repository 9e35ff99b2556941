"""What the entries a webhook delivery reads are sent as, and what becomes of those trimmed
from the stream while pending.

A change or gap of a type and command the subscriber wants is sent as its event; a dead
letter in the subscriber's replay stream is sent again as it was; anything else is not for
the subscriber. Nothing pending is dropped silently: retention may trim entries from a stream
while they wait, and a stream then answers them with no fields; so each entry read is noted
(workers/webhook_retries.py) until done. The subscriber gets a trimmed entity's missed
revisions as one `<type>.gap` (`from`, `to`), with the `webhook-id`
`<type>:<id>:<incarnation>:gap:<from>-<to>`; an entry trimmed before it was noted (its run
died in between) is a dead letter instead, `trimmed from the stream before delivery`, whose
body is a `<type>.gap` naming only the stream entry; and entries trimmed before the delivery
read them at all (a subscriber further behind than retention) one dead letter, `trimmed
from the stream before it was read`, saying how many.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from workers.webhook_retries import Retries, note_of
from workers.webhook_subscribers import DeadLetter, Subscriber, entry_time, event_body

TRIMMED = "trimmed from the stream before delivery"
"""The error of a dead letter for an entry trimmed before anything noted whose it was."""
TRIMMED_UNREAD = "trimmed from the stream before it was read"
"""The error of a dead letter for changes trimmed before the delivery read them at all."""


@dataclass
class Send:
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
    retries: Retries = field(default_factory=Retries)

    def note(self) -> str:
        """What Redis keeps of it until it is done: whose it is, and its retries."""
        return note_of(self.retries, self.entity_id, self.covers)

    def joined(self, later: Send) -> Send | None:
        """This gap of trimmed entries and the entity's next one as one gap, retried as this
        one was; None unless both are such gaps, of one incarnation."""
        if not (self.trimmed and later.trimmed and self.covers and later.covers):
            return None
        if self.covers[0] != later.covers[0]:
            return None
        covers = (self.covers[0], self.covers[1], later.covers[2])
        entry_ids = [*self.entry_ids, *later.entry_ids]
        joined = gap(self.stream, self.entity_type, self.entity_id, covers, entry_ids)
        joined.retries = self.retries
        return joined

    def dead_letter(self, error: str, first: float, failed: float) -> DeadLetter:
        """It as a dead letter, once its retries have run out."""
        return DeadLetter(
            webhook_id=self.webhook_id,
            entity_type=self.entity_type,
            entity_id=self.entity_id,
            body=self.body,
            attempts=self.retries.attempts,
            error=error,
            first_attempt_at=datetime.fromtimestamp(first, UTC),
            failed_at=datetime.fromtimestamp(failed, UTC),
        )


Read = list[tuple[str, Send | None]]
"""Entries read from one stream, by id, as sends; None for one trimmed while pending."""


def gap(
    stream: str,
    entity_type: str,
    entity_id: str,
    covers: tuple[str, str, str],
    entry_ids: list[str],
) -> Send:
    """The gap event of an entity's entries trimmed before they were sent, as the stream's
    own gaps are sent; its `webhook-id` names where it ends too, since a later run may find
    more of them."""
    incarnation, first, last = covers
    fields = {"type": "gap", "id": entity_id, "incarnation": incarnation, "from": first, "to": last}
    webhook_id, _, body = event_body(entity_type, fields, entry_ids[0])
    text = json.dumps(body, separators=(",", ":"))
    return Send(
        stream,
        entry_ids,
        f"{webhook_id}-{last}",
        entity_type,
        entity_id,
        text,
        covers,
        trimmed=True,
    )


class Entries:
    """A subscriber's stream entries as sends; built with the entity type of each stream it
    reads (None for its replays)."""

    def __init__(self, subscriber: Subscriber, streams: Mapping[str, str | None]) -> None:
        self._subscriber = subscriber
        self._streams = streams

    def read(
        self, stream: str, entries: list[tuple[bytes, Mapping[bytes, bytes] | None]]
    ) -> tuple[Read, list[str]]:
        """The entries of one stream to send, and the ids of those not for the subscriber."""
        read: Read = []
        skipped: list[str] = []
        for raw_id, raw_fields in entries:
            entry_id = raw_id.decode()
            send = self._send(stream, entry_id, raw_fields) if raw_fields else None
            if raw_fields and send is None:
                skipped.append(entry_id)
            else:
                read.append((entry_id, send))
        return read, skipped

    def ready(
        self, stream: str, read: Read, notes: list[dict[str, Any]]
    ) -> tuple[list[Send], list[tuple[str, dict[str, Any]]]]:
        """The sends of the entries read, in order, with their retries so far, a gap for
        those trimmed whose notes say whose they were; and the others trimmed, with notes."""
        ready: list[Send] = []
        latest: dict[tuple[str, str], int] = {}  # each entity's last place in `ready`
        lost: list[tuple[str, dict[str, Any]]] = []
        for (entry_id, read_send), note in zip(read, notes, strict=True):
            send = read_send or self._trimmed(stream, entry_id, note)
            if send is None:
                lost.append((entry_id, note))
                continue
            key = (send.entity_type, send.entity_id)
            joined = ready[latest[key]].joined(send) if key in latest else None
            if joined is not None:  # one gap for the entity's trimmed entries
                ready[latest[key]] = joined
                continue
            send.retries = Retries.of(note)
            latest[key] = len(ready)
            ready.append(send)
        return ready, lost

    def lost(self, stream: str, entry_id: str, note: Mapping[str, Any]) -> DeadLetter:
        """The dead letter of an entry trimmed before anything noted whose it was: it names
        only the stream entry, so the subscriber knows it missed a change of the type."""
        return self._type_gap(
            stream,
            f"trimmed:{entry_id}",
            {"stream_entry": entry_id},
            at_entry=entry_id,
            error=TRIMMED,
            attempts=int(note.get("attempts", 0)),
            first=note.get("first"),
        )

    def unread(self, stream: str, after: str, before: str, missed: int) -> DeadLetter:
        """The dead letter of `missed` changes trimmed from the stream between the entries
        `after` and `before` before the delivery read them: whose they were went with them,
        so it says how many, and the subscriber reads the type's snapshots it cares for."""
        return self._type_gap(
            stream,
            f"trimmed:{after}:{before}",
            {"after": after, "before": before, "missed": missed},
            at_entry=before,
            error=TRIMMED_UNREAD,
        )

    def _type_gap(
        self,
        stream: str,
        name: str,
        data: dict[str, Any],
        *,
        at_entry: str,
        error: str,
        attempts: int = 0,
        first: float | None = None,
    ) -> DeadLetter:
        """A dead letter of changes of the stream's type whose entities are not known: a
        `<type>.gap` of no entity, its `webhook-id` `<type>:<name>`."""
        entity_type = self._streams[stream] or ""
        body = {
            "type": f"{entity_type}.gap",
            "timestamp": entry_time(at_entry),
            "data": {"entity_type": entity_type, **data},
        }
        now = time.time()
        return DeadLetter(
            webhook_id=f"{entity_type}:{name}",
            entity_type=entity_type,
            entity_id="",
            body=json.dumps(body, separators=(",", ":")),
            attempts=attempts,
            error=error,
            first_attempt_at=datetime.fromtimestamp(first or now, UTC),
            failed_at=datetime.fromtimestamp(now, UTC),
        )

    def _send(self, stream: str, entry_id: str, raw: Mapping[bytes, bytes]) -> Send | None:
        """The entry as a send, or None when it is not for this subscriber."""
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        entity_type = self._streams[stream]
        if entity_type is None:
            letter = DeadLetter.of(entry_id, raw)
            return Send(
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
        webhook_id, entity_id, body = event_body(entity_type, fields, entry_id)
        text = json.dumps(body, separators=(",", ":"))
        incarnation = fields.get("incarnation", "")
        if command is None:
            covers = (incarnation, fields.get("from", ""), fields.get("to", ""))
        else:
            covers = (incarnation, fields.get("revision", ""), fields.get("revision", ""))
        return Send(stream, [entry_id], webhook_id, entity_type, entity_id, text, covers)

    def _trimmed(self, stream: str, entry_id: str, note: Mapping[str, Any]) -> Send | None:
        """The gap event for an entry trimmed while pending, when its note says whose it was."""
        entity_type = self._streams[stream]
        if entity_type is None or "id" not in note:
            return None
        covers = (str(note["incarnation"]), str(note["from"]), str(note["to"]))
        return gap(stream, entity_type, str(note["id"]), covers, [entry_id])
