"""The listing index: each entity type's entities by last update, by id, by status and tag,
by text prefix and by number, kept in Redis beside the cached snapshots.

All of a type's index keys share the hash tag `{<type>}` (`tenure:index:{account}:u`), so
a listing reads one slot. An entity's snapshot lives in its own slot (`{account:ada}`).

- One Redis, with replicas or Sentinel: one script writes the snapshot and the entity's
  index entries together (`PUT_AND_INDEX`), under the snapshot's never-backwards rule. The
  index and the cache never disagree.
- Redis Cluster: one script cannot touch two slots, so the snapshot and the index are two
  scripts, each under the same rule by itself (`INDEX_IF_NEWER` keeps the revision it
  indexed). Neither ever goes back, but between the two the index may be one write behind
  the cache, and a writer that dies between them leaves the index behind until the
  entity's next publish or `tenure reindex`. Listing in a cluster is not atomic with the
  cache; it only converges.

The change stream of a type (workers/changes.py) is in the type's slot too, so it is
written by the same script as the index: with the snapshot in one Redis, with the index in
a cluster. There a publish whose writer dies between the two scripts leaves the stream
behind the cache until the entity publishes again (a retried publish carries the same
changes, so nothing is lost); the stream and the index never disagree, and the stream
keeps its own never-backwards mark, but the cache may serve a change a little before the
stream holds it.

Each write also raises the type's listing generations (`generations_key`): the type's, and
those of the tag values the entity had and has. The API replays a rendered listing while
the ones it depends on stand (api/cached_reads.py).

Every ordered index is a sorted set of score 0 read by lexicographic range, so a page
resumes after a member (a keyset cursor) in O(log n): `<inverted ms>:<id>` newest first,
or the id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from entities.runtime.envelope import Snapshot
from entities.runtime.listing import IndexValues, searchable
from workers.changes import APPEND_CHANGES

STATUS = "status"
"""The tag that is also counted per value (`<type>Stats`)."""

_MS_DIGITS = 13
_LAST_MS = 10**_MS_DIGITS - 1

# Removes the entity's old entries, then writes its new ones; `entry` empty only removes.
# The stored entry remembers what was written, so the old entries are found without
# asking the caller. Lua's cjson decodes `{}` and `[]` alike, hence pairs over both.
# Raises the type's generation, and the generation of each tag value the entity had or
# has now (see `generations_key`), each to a value it never had: at least one more, and at
# least Redis's clock in microseconds. Counted up by one, a Redis rolled back a moment (a
# crash with fsync every second, a failover to a replica behind) counted the lost change's
# value again at the next change, and the API replayed a page rendered before the rollback,
# with the lost entity and without the new one, until another change came.
REINDEX = """
local function reindex(base, id, entry)
  local generations = base .. 'g'
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local function raise(field)
    local held = tonumber(redis.call('HGET', generations, field) or '0') or 0
    redis.call('HSET', generations, field, string.format('%.0f', math.max(held + 1, now)))
  end
  raise('all')
  local raised = {}
  local old = redis.call('HGET', base .. 'e', id)
  if old then
    old = cjson.decode(old)
    local member = old.u .. ':' .. id
    redis.call('ZREM', base .. 'u', member)
    redis.call('ZREM', base .. 'i', id)
    for field, value in pairs(old.t) do
      raised['t:' .. field .. ':' .. value] = true
      raise('t:' .. field .. ':' .. value)
      redis.call('ZREM', base .. 't:' .. field .. ':' .. value .. ':u', member)
      redis.call('ZREM', base .. 't:' .. field .. ':' .. value .. ':i', id)
      if field == 'status' and redis.call('HINCRBY', base .. 'c', value, -1) <= 0 then
        redis.call('HDEL', base .. 'c', value)
      end
    end
    for _, text in pairs(old.x) do redis.call('ZREM', base .. 'x', text .. '\\0' .. id) end
    for field, _ in pairs(old.n) do redis.call('ZREM', base .. 'n:' .. field, id) end
  end
  if entry == '' then
    redis.call('HDEL', base .. 'e', id)
    return
  end
  local new = cjson.decode(entry)
  local member = new.u .. ':' .. id
  redis.call('HSET', base .. 'e', id, entry)
  redis.call('ZADD', base .. 'u', 0, member)
  redis.call('ZADD', base .. 'i', 0, id)
  for field, value in pairs(new.t) do
    if not raised['t:' .. field .. ':' .. value] then
      raise('t:' .. field .. ':' .. value)
    end
    redis.call('ZADD', base .. 't:' .. field .. ':' .. value .. ':u', 0, member)
    redis.call('ZADD', base .. 't:' .. field .. ':' .. value .. ':i', 0, id)
    if field == 'status' then redis.call('HINCRBY', base .. 'c', value, 1) end
  end
  for _, text in pairs(new.x) do redis.call('ZADD', base .. 'x', 0, text .. '\\0' .. id) end
  for field, value in pairs(new.n) do redis.call('ZADD', base .. 'n:' .. field, value, id) end
end
"""

ENDED = "ended"
"""The index key (after the type's base) of the type's ended entities: a sorted set of their
ids, each scored with when it ended (its closed snapshot's `updated_at`, in epoch
milliseconds; workers/forgetting.py forgets them once retention has passed)."""

# Keeps the entity in the type's ended entities while its snapshot is closed, scored with
# when it ended; takes it out otherwise (its id used again). `ended_at` is '0' for a live
# snapshot, or nil from a caller that does not say (nothing changes).
_MARK_ENDED = """
local function mark_ended(base, id, ended_at)
  if ended_at == nil then return end
  if ended_at == '0' then
    redis.call('ZREM', base .. 'ended', id)
  else
    redis.call('ZADD', base .. 'ended', tonumber(ended_at), id)
  end
end
"""

_STORED = """
local current = redis.call('HMGET', KEYS[1], 'incarnation', 'revision', 'snapshot')
local incarnation = tonumber(current[1] or '0')
local revision = tonumber(current[2] or '-1')
local new_incarnation = tonumber(ARGV[1])
local new_revision = tonumber(ARGV[2])
"""
"""What the entity's hash (KEYS[1]) holds, and what the write brings (ARGV incarnation,
revision): read once a script."""

_WRITE_IF_NEWER = """
if new_incarnation < incarnation then return 0 end
if new_incarnation == incarnation then
  if new_revision < revision and current[3] then return current[3] end
  if new_revision <= revision then return current[3] and 0 or -1 end
end
redis.call('HSET', KEYS[1], 'incarnation', ARGV[1], 'revision', ARGV[2],
           'snapshot', ARGV[3], 'cached_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'stuck')
-- A tombstone's expiry (workers/forgetting.py) goes with it: HSET keeps a key's, and an id
-- used again within its day lost its live snapshot when it fired.
redis.call('PERSIST', KEYS[1])
"""
WRITE_IF_NEWER = _STORED + _WRITE_IF_NEWER
"""The cache's never-backwards rule, the body of its compare-and-set (workers/cache.py):
writes the snapshot (KEYS[1]; ARGV incarnation, revision, snapshot, cached_at) only when it
is newer, clearing the stuck mark, or returns 0 or the newer snapshot stored, or -1 when the
entity was forgotten (a tombstone, workers/forgetting.py) at this revision or a later one."""

PUT_AND_INDEX = (
    REINDEX
    + _MARK_ENDED
    + APPEND_CHANGES
    + _STORED
    + """
-- A forgotten entity's late publish streams nothing and leaves no mark (workers/forgetting.py).
if not current[3] and new_incarnation == incarnation and new_revision <= revision then
  return -1
end
append_changes(KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[6], ARGV[8], ARGV[9])
-- Ended whether or not this write is newer: a reindex's or a retry's closed snapshot
-- finds the same one stored, and ends an entity that ended before ends were kept. Not one
-- whose snapshot was forgotten (above): it stays forgotten.
if ARGV[10] and ARGV[10] ~= '0' and new_incarnation == incarnation and current[3] then
  mark_ended(ARGV[5], ARGV[6], ARGV[10])
end
"""
    + _WRITE_IF_NEWER
    + """
reindex(ARGV[5], ARGV[6], ARGV[7])
mark_ended(ARGV[5], ARGV[6], ARGV[10])
return 1
"""
)
"""The cache's compare-and-set (workers/cache.py) that also indexes what it writes and
streams the changes a publish carries (workers/changes.py). KEYS: the entity's hash, the
type's index entries (`<base>e`, named for clusters that check), the type's change stream
and its marks, and its ended entities; ARGV: incarnation, revision, snapshot, cached_at,
index base, entity id, entry, the changes and state (both empty: nothing streamed), and
when the entity ended, in epoch milliseconds ('0' while it is live)."""

INDEX_IF_NEWER = (
    REINDEX
    + _MARK_ENDED
    + APPEND_CHANGES
    + """
append_changes(KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[4], ARGV[6], ARGV[7])
local old = redis.call('HGET', KEYS[1], ARGV[4])
if old then
  old = cjson.decode(old)
  local incarnation, revision = tonumber(ARGV[1]), tonumber(ARGV[2])
  if incarnation < old.g or (incarnation == old.g and revision <= old.r) then
    if ARGV[8] and ARGV[8] ~= '0' and incarnation == old.g then
      mark_ended(ARGV[3], ARGV[4], ARGV[8])
    end
    return 0
  end
end
reindex(ARGV[3], ARGV[4], ARGV[5])
mark_ended(ARGV[3], ARGV[4], ARGV[8])
return 1
"""
)
"""The index and the change stream alone, each under its own rule, for Redis Cluster. KEYS:
the type's index entries, change stream and marks, and its ended entities; ARGV:
incarnation, revision, index base, entity id, entry, changes, state, and when the entity
ended ('0' while it is live)."""


def index_base(prefix: str, entity_type: str) -> str:
    """The prefix of every index key of `entity_type`, hash-tagged by the type."""
    return f"{prefix}index:{{{entity_type}}}:"


EVERY = "all"
"""The generation raised by every change to the type's index."""
STUCK = "stuck"
"""The generation raised by every stuck mark set or cleared on one of the type's entities."""
EPOCH = "epoch"
"""A token no earlier one equals, set by `tenure reindex`: what was rendered before it is
never replayed after it, even when Redis lost the counters and counts them up again."""


def generations_key(prefix: str, entity_type: str) -> str:
    """The hash of the type's listing generations: values that only go up, `all` (`EVERY`),
    `stuck` and `t:<tag>:<value>` per tag value (raised by every change to an entity that
    had or has that value), and the `epoch`. The index's script (`REINDEX`) raises `all` and
    the tags' to values they never had, even across a Redis rolled back; `stuck` counts by
    one. A rendered listing stands while
    the generations it depends on stand (api/cached_reads.py)."""
    return index_base(prefix, entity_type) + "g"


def tag_generation(tag: str, value: str) -> str:
    """The field of `generations_key` counting changes to entities tagged `tag` = `value`,
    before or after the change: a listing filtered to some values of a tag shows only
    entities that such a change touches."""
    return f"t:{tag}:{value}"


def updated_key(updated_at: datetime | None) -> str:
    """The sort key of a last update, newest first in lexicographic order."""
    if updated_at is None:
        return str(_LAST_MS)
    if updated_at.tzinfo is None:  # workflow time is UTC
        updated_at = updated_at.replace(tzinfo=UTC)
    ms = min(max(int(updated_at.timestamp() * 1000), 0), _LAST_MS)
    return str(_LAST_MS - ms).zfill(_MS_DIGITS)


def updated_at_of(key: str) -> datetime:
    return datetime.fromtimestamp((_LAST_MS - int(key)) / 1000, tz=UTC)


@dataclass(frozen=True)
class IndexEntry:
    """What one snapshot writes to its type's index, as the scripts take it."""

    updated: str
    closed: bool
    values: IndexValues

    @classmethod
    def of(cls, snapshot: Snapshot, values: IndexValues | None) -> IndexEntry | None:
        if values is None:
            return None
        return cls(updated_key(snapshot.updated_at), snapshot.closed, values)

    def encode(self, snapshot: Snapshot) -> str:
        return json.dumps(self.document(snapshot), separators=(",", ":"))

    def stored(self, snapshot: Snapshot) -> StoredEntry:
        """The entry as the index will hold it, without the round trip through JSON."""
        return StoredEntry.of(self.document(snapshot))

    def document(self, snapshot: Snapshot) -> dict[str, Any]:
        tags = dict(self.values.tags)
        if self.values.status is not None:
            tags[STATUS] = self.values.status
        text = sorted({*self.values.text, searchable(snapshot.entity_id)})
        return {
            "g": snapshot.incarnation,
            "r": snapshot.revision,
            "u": self.updated,
            "c": int(self.closed),
            "t": tags,
            "x": text,
            "n": dict(self.values.numbers),
        }


@dataclass(frozen=True)
class StoredEntry:
    """An entity's entry as the index holds it, read back to filter a listing."""

    updated: str
    closed: bool
    tags: dict[str, str]
    text: list[str]
    numbers: dict[str, int]

    @classmethod
    def decode(cls, raw: bytes) -> StoredEntry:
        return cls.of(json.loads(raw))

    @classmethod
    def of(cls, document: dict[str, Any]) -> StoredEntry:
        # cjson never rewrites it, but an empty object could come back as `[]` elsewhere.
        return cls(
            updated=document["u"],
            closed=bool(document["c"]),
            tags=dict(document["t"] or {}),
            text=list(document["x"] or []),
            numbers=dict(document["n"] or {}),
        )
