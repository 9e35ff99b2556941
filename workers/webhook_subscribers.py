"""Outbound webhook subscribers and their dead letters, in Redis.

Subscribers are one hash, `<prefix>webhooks:subscribers`, subscriber id to JSON (URL, secret,
filter), read by the API and by each subscriber's delivery activity; the secret stays here
and never enters a workflow's history. Per subscriber, under its own hash tag
(`<prefix>webhooks:{<id>}:...`): `dead`, a capped stream of the deliveries whose retries ran
out; `replay`, a stream of dead letters sent again, which the delivery activity reads
through the subscriber's consumer group; `attempts`, for each entry read and not yet done,
its entity and revisions and its retries (first attempt, count, when the next is due).
Each entity type's change stream has a consumer group per subscriber, `webhook:<id>`.

Deliveries are signed as Standard Webhooks says: `webhook-signature` is `v1,` and the base64
HMAC-SHA256, with the secret's decoded key, of `{webhook-id}.{webhook-timestamp}.{body}` (the
same rule api/webhooks.py checks inbound).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, SecretStr
from redis.exceptions import ResponseError

from workers import leases
from workers.cache import RedisClient
from workers.changes import kept_length, stream_key
from workers.failures import REDIS_FAILURES
from workers.settings import WebhookSource

MAX_SUBSCRIBERS = 100
MAX_DEAD_LETTERS = 10_000
"""Dead letters kept per subscriber, about (the oldest go first)."""
DEAD_LETTER_BYTES = 32 * 1024 * 1024
"""About the most a subscriber's dead letters weigh: each carries an entity's whole state,
so large ones keep fewer (never under MIN_DEAD_LETTERS); a count alone let 10,000 letters
of a 200 KB item weigh 2 GB."""
MIN_DEAD_LETTERS = 100
MAX_REPLAY_AT_ONCE = 1_000
ALL_COMMANDS = "*"
MAX_ENTRY_PART = 2**64 - 1
"""A stream entry id is two unsigned 64-bit numbers, `<ms>-<seq>`; Redis refuses one past."""
LAST_ENTRY_ID = f"{MAX_ENTRY_PART}-{MAX_ENTRY_PART}"

# KEYS[1] the registry; ARGV: the subscriber's id, its JSON, MAX_SUBSCRIBERS, its
# idempotency key ('' for none) and its creator. Looking for the key, counting and adding in
# one step: apart, registrations at once all count the same room and all add, and a
# registration sent twice at once made two subscribers. One key, so it runs as well in a
# Redis Cluster. 1 when added, 0 when full, or the JSON of the subscriber its creator
# registered under the key before.
_ADD_IF_ROOM = """
if ARGV[4] ~= '' then
  for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
    local registered = cjson.decode(value)
    if registered.key == ARGV[4] and registered.created_by == ARGV[5] then return value end
  end
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS[1] a subscriber's dead letters, KEYS[2] its replay stream (one slot: the subscriber's
# id is their hash tag); ARGV[1] the most letters the replay stream may hold, the rest the
# letters' ids. Each letter still there moves, in one step, while there is room: apart, two
# replays at once both copied each letter, and it was sent twice. How many moved, or -1 when
# the replay stream was full already.
_MOVE_LETTERS = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[2])
if room <= 0 then
  return -1
end
local moved = 0
for i = 2, #ARGV do
  if moved >= room then
    break
  end
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(found[1][2]))
    redis.call('XDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""
MAX_REPLAYS_WAITING = MAX_REPLAY_AT_ONCE * 10
"""The most dead letters a subscriber's replay stream holds waiting to be sent again: replays
asked again and again while its delivery did not run (its worker down, say) moved up to
1,000 letters each into a stream nothing trimmed."""


class ReplaysFull(Exception):
    """A subscriber's replay stream holds MAX_REPLAYS_WAITING letters already."""


REMOVED_KEPT_SECONDS = 7 * 24 * 3600
"""How long a removal is remembered for its delivery, which notices it within seconds (or at
its next run, should its worker be down meanwhile)."""


class Subscriber(BaseModel):
    """Where a subscriber's webhooks go, signed with what, for which changes."""

    id: str
    url: str
    secret: str
    events: dict[str, list[str]] = Field(
        description="Entity types and, for each, the commands wanted, or ['*'] for all."
    )
    created_at: datetime
    created_by: str = ""
    key: str | None = Field(
        default=None,
        description="The idempotency key its creator registered it under: registered "
        "again under it by the same creator, it is answered, not made again.",
    )

    def wants(self, entity_type: str, command: str | None) -> bool:
        """Whether a change (or, with no command, a gap) of `entity_type` is for it."""
        commands = self.events.get(entity_type)
        if commands is None:
            return False
        return command is None or ALL_COMMANDS in commands or command in commands

    def signing_key(self) -> bytes:
        return signing_key(self.secret)


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret, by the rule inbound sources follow (ValueError when
    malformed or under 16 bytes)."""
    return WebhookSource(scheme="standard", secret=SecretStr(secret)).signing_key()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of a delivery."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def group_name(subscriber_id: str) -> str:
    """The subscriber's consumer group on each change stream."""
    return f"webhook:{subscriber_id}"


class DeadLetter(BaseModel):
    """A delivery whose retries ran out, as it was sent, to be sent again as it was."""

    id: str = Field(default="", description="Its entry id in the dead-letter stream.")
    webhook_id: str
    entity_type: str
    entity_id: str
    body: str
    attempts: int
    error: str
    first_attempt_at: datetime
    failed_at: datetime

    def fields(self) -> dict[Any, Any]:
        return {k: str(v) for k, v in self.model_dump(mode="json", exclude={"id"}).items()}

    @classmethod
    def of(cls, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> DeadLetter:
        values = {k.decode(): v.decode() for k, v in fields.items()}
        entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return cls.model_validate({**values, "id": entry})


class WebhookSubscribers:
    """The registry of subscribers and each one's Redis keys."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._add_if_room = client.register_script(_ADD_IF_ROOM)
        self._move_letters = client.register_script(_MOVE_LETTERS)

    @property
    def registry_key(self) -> str:
        return f"{self.prefix}webhooks:subscribers"

    def key(self, subscriber_id: str, what: str) -> str:
        """`dead`, `dead_bytes` and `dead_fast` (their sizes, `dead_letter`), `replay`,
        `attempts` or `removed` of a subscriber."""
        return f"{self.prefix}webhooks:{{{subscriber_id}}}:{what}"

    def stream(self, entity_type: str) -> str:
        return stream_key(self.prefix, entity_type)

    async def get(self, subscriber_id: str) -> Subscriber | None:
        raw: Any = await self.client.hget(self.registry_key, subscriber_id)
        return Subscriber.model_validate_json(raw) if raw is not None else None

    async def all(self) -> list[Subscriber]:
        raw: dict[Any, Any] = await self.client.hgetall(self.registry_key)
        found = [Subscriber.model_validate_json(value) for value in raw.values()]
        return sorted(found, key=lambda subscriber: (subscriber.created_at, subscriber.id))

    async def add(self, subscriber: Subscriber) -> Subscriber | None:
        """Register it and its consumer groups, from the end of each stream (it gets the
        changes made from now on), and return it; or the subscriber its creator registered
        under its key before, as it was; None, with nothing stored, when there are
        MAX_SUBSCRIBERS already."""
        added = await self._add_if_room(
            keys=[self.registry_key],
            args=[
                subscriber.id,
                subscriber.model_dump_json(),
                MAX_SUBSCRIBERS,
                subscriber.key or "",
                subscriber.created_by,
            ],
        )
        if isinstance(added, bytes | str):
            return Subscriber.model_validate_json(added)
        if not added:
            return None
        try:
            for entity_type in subscriber.events:
                await self.ensure_group(subscriber.id, entity_type, start="$")
            await self.ensure_group(subscriber.id, None, start="0")
        except REDIS_FAILURES:
            # Registered without its groups, and with no delivery started to make them, it
            # would hold one of the places for nothing; forgetting it is worth a try.
            with contextlib.suppress(*REDIS_FAILURES):
                await self.remove(subscriber.id)
            raise
        return subscriber

    async def ensure_group(self, subscriber_id: str, entity_type: str | None, start: str) -> None:
        """The subscriber's group on a type's change stream (or, with None, on its replays)."""
        stream = self.stream(entity_type) if entity_type else self.key(subscriber_id, "replay")
        entries_read: int | None = None
        if start == "$":
            # At the stream's last entry by id, with the count of entries up to it: a group
            # that knows how many it has read can tell, later, how many it lost to a trim
            # before it read them (workers/webhook_delivery.py).
            start, entries_read = await self.stream_end(stream)
        try:
            await self.client.xgroup_create(
                stream, group_name(subscriber_id), start, mkstream=True, entries_read=entries_read
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def stream_end(self, stream: str) -> tuple[str, int]:
        """A stream's last entry id and how many entries were ever added up to it."""
        try:
            info: Any = await self.client.xinfo_stream(stream)
        except ResponseError:  # no such stream yet
            return "0-0", 0
        return info["last-generated-id"].decode(), int(info["entries-added"])

    async def remove(self, subscriber_id: str) -> bool:
        """Forget it, its groups, dead letters and replays; False when it was not there."""
        subscriber = await self.get(subscriber_id)
        if subscriber is None:
            return False
        # Before it goes: its delivery, finding it gone, tells a removal from a loss.
        await self.client.set(self.key(subscriber_id, "removed"), 1, ex=REMOVED_KEPT_SECONDS)
        await self.client.hdel(self.registry_key, subscriber_id)
        await self.destroy_groups(subscriber_id, subscriber.events)
        await self.drop_keys(subscriber_id)
        return True

    async def destroy_groups(self, subscriber_id: str, entity_types: Iterable[str]) -> None:
        """Its groups on the types' change streams, gone with what they held pending."""
        for entity_type in entity_types:
            await self.client.xgroup_destroy(self.stream(entity_type), group_name(subscriber_id))

    async def was_removed(self, subscriber_id: str) -> bool:
        """Whether the subscriber was removed (`remove`) in the last REMOVED_KEPT_SECONDS:
        one gone without it was lost, with a Redis that restarted empty."""
        return bool(await self.client.exists(self.key(subscriber_id, "removed")))

    async def take_lease(self, subscriber_id: str, holder: str, seconds: float) -> bool:
        """Hold the subscriber's delivery for `seconds` as `holder`, if no other holds it;
        whether it does now (`holder` renewing its own lease takes it again)."""
        return await leases.take(self.client, self.key(subscriber_id, "lease"), holder, seconds)

    async def release_lease(self, subscriber_id: str, holder: str) -> None:
        """Let the delivery go, if `holder` still holds it."""
        await leases.release(self.client, self.key(subscriber_id, "lease"), holder)

    async def drop_keys(self, subscriber_id: str) -> None:
        """Delete what a removed subscriber's delivery kept: its dead letters, replays and
        notes. Its delivery calls it again once it has stopped, since a send in flight at
        the removal writes its note after it."""
        await self.client.delete(
            *(
                self.key(subscriber_id, what)
                for what in ("dead", "dead_bytes", "dead_fast", "replay", "attempts", "lease")
            )
        )

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letter(self, subscriber_id: str, letter: DeadLetter) -> None:
        fields = letter.fields()
        size = sum(len(value) for value in fields.values())
        dead = self.key(subscriber_id, "dead")
        # The letters' sizes, as a stream's (`kept_length`): the mean over every letter in
        # `dead_bytes`, as workers from before the second kept it (a rolled-back worker reads
        # it), and the mean that follows sizes in `dead_fast`.
        weights = self.key(subscriber_id, "dead_bytes"), self.key(subscriber_id, "dead_fast")
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xlen(dead)
            pipe.get(weights[0])
            pipe.get(weights[1])  # one key a call: a cluster's pipeline takes no MGET
            kept, mean, fast = await pipe.execute()
        mean_all, mean_last, most = kept_length(
            float(mean or 0),
            float(fast or mean or 0),
            size,
            int(kept) + 1,
            DEAD_LETTER_BYTES,
            MAX_DEAD_LETTERS,
            MIN_DEAD_LETTERS,
        )
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(dead, fields, maxlen=most, approximate=True)
            pipe.set(weights[0], str(mean_all))
            pipe.set(weights[1], str(mean_last))
            await pipe.execute()

    async def dead_letters(
        self, subscriber_id: str, first: int, after: str | None
    ) -> tuple[list[DeadLetter], bool]:
        """Oldest first, `first` of them after the entry `after`; and whether more follow."""
        if after == LAST_ENTRY_ID:
            return [], False  # XRANGE refuses to start past the last id there can be
        start = f"({after}" if after else "-"
        raw: Any = await self.client.xrange(
            self.key(subscriber_id, "dead"), start, "+", count=first + 1
        )
        letters = [DeadLetter.of(entry_id, fields) for entry_id, fields in raw]
        return letters[:first], len(letters) > first

    async def replay(self, subscriber_id: str, letter_id: str | None) -> int:
        """Send dead letters again, in their order (one, or up to MAX_REPLAY_AT_ONCE): each
        moves to the subscriber's replay stream, which its delivery reads. How many moved:
        a letter another replay moved meanwhile is not moved again, nor one past
        MAX_REPLAYS_WAITING (ReplaysFull when none could move for it)."""
        dead = self.key(subscriber_id, "dead")
        if letter_id is not None:
            raw: Any = await self.client.xrange(dead, letter_id, letter_id)
        else:
            raw = await self.client.xrange(dead, "-", "+", count=MAX_REPLAY_AT_ONCE)
        if not raw:
            return 0
        keys = [dead, self.key(subscriber_id, "replay")]
        ids = [entry_id for entry_id, _ in raw]
        moved: int = await self._move_letters(keys=keys, args=[MAX_REPLAYS_WAITING, *ids])
        if moved < 0:
            raise ReplaysFull(f"{MAX_REPLAYS_WAITING} dead letters wait to be sent again already")
        return moved


def entry_time(entry_id: str) -> str | None:
    """When a stream entry was appended, from its id (`<ms>-<seq>`), in ISO 8601."""
    ms = entry_id.split("-", 1)[0]
    if not ms.isdigit():
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds")


def event_body(
    entity_type: str, fields: Mapping[str, str], entry_id: str
) -> tuple[str, str, dict[str, Any]]:
    """A change stream entry as a webhook: its `webhook-id` (the same for every send of one
    change), its entity id, and its body `{"type", "timestamp", "data"}`, where `type` is
    `<entity type>.<command>` (`<entity type>.gap` for a gap) and `data` the entry's fields,
    `state` as JSON. `timestamp` is when the change was made, or for a gap when the stream
    noted it (the time in its entry id `entry_id`)."""
    entity_id, incarnation = fields.get("id", ""), fields.get("incarnation", "")
    data: dict[str, Any] = {"entity_type": entity_type, **fields}
    data.pop("type", None)
    if "state" in data:
        data["state"] = json.loads(data["state"])
    for number in ("incarnation", "revision", "from", "to", "state_revision"):
        if number in data and data[number].isdigit():
            data[number] = int(data[number])
    if fields.get("type") == "gap":
        # Both ends: gaps from 1 are announced again each time Redis loses its keys.
        gap = f"{fields.get('from')}-{fields.get('to')}"
        webhook_id = f"{entity_type}:{entity_id}:{incarnation}:gap:{gap}"
        kind = f"{entity_type}.gap"
    else:
        webhook_id = f"{entity_type}:{entity_id}:{incarnation}:{fields.get('revision')}"
        kind = f"{entity_type}.{fields.get('command', '')}"
    body = {"type": kind, "timestamp": fields.get("at") or entry_time(entry_id), "data": data}
    return webhook_id, entity_id, body
