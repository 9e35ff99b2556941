"""The change stream: every applied command (and fired timer) of every entity of a type, in
one Redis Stream per type (`tenure:changes:{account}`), for integrations to consume with a
consumer group.

Entries are appended by the cache's script, in the step that writes the snapshot (see
workers/index.py for what Redis Cluster gives up). A publish carries the changes its
entity made since its last publish, from the entity's ledger, so one publish that covers
several commands still appends one entry per command, in revision order, none twice: the
stream keeps, per entity, the incarnation and revision it last appended
(`tenure:changes:{account}:last`), and appends only past it.

Each entry is a `change` or a `gap`:

- `change`: `id`, `incarnation`, `revision`, `command`, `command_id`, `sent_by` (empty for
  a command from inside, `entity:timer` for a timer), `at` (ISO 8601), and either `state`
  (the entity's state after it, JSON) or `state_revision`. An entity keeps no state but its
  latest, so only the last change of a publish carries one; the earlier changes of that
  publish name the revision whose state the stream holds (`state_revision`, the next entry
  of the entity with a `state`).
- `gap`: `id`, `incarnation`, `from`, `to`, `state_revision`: the entity made changes
  `from`..`to` that the stream does not hold (its ledger no longer remembered them, or more
  of them came between two publishes than one publish carries). A consumer that needs
  them reads the entity's snapshot. A gap is never silent; a consumer never has to infer
  one from revisions.

When Redis has lost the stream's keys (a restart without persistence, a failover to an
empty replica), each entity's next publish finds no mark of it and announces a gap from its
first revision to the one it last published: the entries a consumer may not have read went
with the keys. (So does an entity first streamed after publishing before the stream
existed.) An entity that publishes nothing after the loss announces nothing until `tenure
reindex`, run after Redis was lost, announces it for every entity (workers/reindex.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from entities.runtime.envelope import Outcome, Snapshot
from workers.settings import Settings

# Appends the changes past the entity's last streamed revision, gaps where the carried
# changes skip revisions, and moves the mark. `doc` is `encode`'s: the revision the entity
# last published (where its stream begins when it has no mark), the changes, the retention.
# A mark of an earlier incarnation is replaced: a later incarnation's revisions begin again.
# Called by the cache's scripts (workers/index.py) before their compare-and-set, whatever
# it decides: a snapshot already written (by a retry, a flush of unsaved snapshots) still
# needs its changes streamed.
APPEND_CHANGES = """
local FOLLOW = 8
local function kept_length(mean, fast, size, kept, budget, longest, shortest)
  local window = longest
  if mean ~= 0 then
    window = math.min(longest, math.max(shortest, budget / math.max(mean, fast)))
  end
  if mean == 0 then mean = size else mean = mean + (size - mean) / kept end
  local weight = math.max(math.min(1, FOLLOW / window), 1 / kept)
  if fast == 0 then fast = size else fast = fast + (size - fast) * weight end
  local most = math.min(longest, math.max(shortest, math.floor(budget / math.max(mean, fast))))
  return mean, fast, most
end
local function append_changes(stream, marks, incarnation, revision, id, doc, state)
  if not doc or doc == '' then return end
  doc = cjson.decode(doc)
  local g, r = tonumber(incarnation), tonumber(revision)
  local last = tonumber(doc.s)
  local mark = redis.call('HGET', marks, id)
  -- An entity that published before, with no mark: Redis lost the stream's keys (a restart
  -- without persistence, a failover to an empty replica), and with them the entries a
  -- consumer may not have read. Announced as a gap up to that revision, never silently.
  local lost = not mark and last > 0
  if doc.o == 1 and not lost then return end
  if mark then
    local sep = string.find(mark, ':', 1, true)
    local marked = tonumber(string.sub(mark, 1, sep - 1))
    if g < marked then return end
    if g == marked then last = tonumber(string.sub(mark, sep + 1)) end
  end
  if r <= last and not lost then return end
  -- The bytes are turned into a length by the entries' sizes (`kept_length`, below, which
  -- keeps dead letters by the same rule), under fields no entity id can be.
  local sizes = redis.call('HMGET', marks, ':bytes', ':fast')
  local mean = tonumber(sizes[1] or '0') or 0
  local fast = mean  -- streams from before it had the first mean alone
  if sizes[2] then fast = tonumber(sizes[2]) or mean end
  local kept = redis.call('XLEN', stream)
  local budget = tonumber(doc.b)
  local function add(fields)
    local size = 0
    for _, value in ipairs(fields) do size = size + string.len(value) end
    kept = kept + 1
    local most = tonumber(doc.n)
    if budget and budget > 0 then
      mean, fast, most = kept_length(mean, fast, size, kept, budget, most, tonumber(doc.f))
    end
    redis.call('XADD', stream, 'MAXLEN', '~', most, '*', unpack(fields))
  end
  local function gap(from, to)
    add({'type', 'gap', 'id', id, 'incarnation', incarnation, 'from', tostring(from),
         'to', tostring(to), 'state_revision', revision})
  end
  if lost then gap(1, last) end
  for _, change in ipairs(doc.c) do
    local at = tonumber(change[1])
    if at > last and at <= r then
      if at > last + 1 then gap(last + 1, at - 1) end
      local fields = {'type', 'change', 'id', id, 'incarnation', incarnation,
                      'revision', change[1], 'command', change[2], 'command_id', change[3],
                      'sent_by', change[4], 'at', change[5]}
      if at == r then
        table.insert(fields, 'state')
        table.insert(fields, state)
      else
        table.insert(fields, 'state_revision')
        table.insert(fields, revision)
      end
      add(fields)
      last = at
    end
  end
  if r > last then gap(last + 1, r) end
  redis.call('HSET', marks, id, incarnation .. ':' .. revision, ':bytes', tostring(mean),
             ':fast', tostring(fast))
  if doc.a ~= '' then
    -- By Redis's clock, whose the entry ids are: a writer's clock ahead by more than the age
    -- trimmed what other writers had just appended.
    local t = redis.call('TIME')
    local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(doc.a)
    if oldest > 0 then
      redis.call('XTRIM', stream, 'MINID', '~', string.format('%d-0', oldest))
    end
  end
end
"""


FOLLOW = 8
"""The mean that follows a change of sizes is over about 1/FOLLOW of the entries kept."""


def kept_length(
    mean: float, fast: float, size: int, kept: int, budget: int, longest: int, shortest: int
) -> tuple[float, float, int]:
    """How many entries to keep so that they weigh about `budget` bytes, once one of `size`
    joins the `kept` held (it included), with the two means that say so: APPEND_CHANGES's
    Lua has the same rule. The length is the budget over the larger of a mean over every
    entry held, which one large entry moves little, and a mean over about an eighth of the
    length, which follows a change of sizes before the budget is passed (the first alone let
    small entries, then large ones, take three to four times the bytes); never more than
    `longest` entries nor fewer than `shortest`."""
    window = longest if not mean else min(longest, max(shortest, budget / max(mean, fast)))
    mean = size if not mean else mean + (size - mean) / kept
    weight = max(min(1.0, FOLLOW / window), 1 / kept)
    fast = size if not fast else fast + (size - fast) * weight
    most = min(longest, max(shortest, int(budget // max(mean, fast))))
    return mean, fast, most


MIN_KEPT = 100
"""Entries a stream keeps whatever their size: the byte bound never trims below them."""


@dataclass(frozen=True)
class Retention:
    """How much of each type's stream Redis keeps: about `max_length` entries, and about
    `max_bytes` of them by their sizes (`kept_length`; never fewer than MIN_KEPT entries), and when
    `max_age_seconds` is set none much older (all trimmed approximately, as Redis does
    cheaply). A count alone let one customer's 16 KB carts grow a stream by 49 MB a minute
    towards 16 GB."""

    max_length: int = 1_000_000
    max_age_seconds: float | None = None
    max_bytes: int = 256 * 1024 * 1024

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        return cls(
            settings.change_stream_maxlen,
            settings.change_stream_max_age_seconds,
            settings.change_stream_max_bytes,
        )

    def max_age_ms(self) -> str:
        """The age past which entries go, in milliseconds by Redis's clock; empty when age
        does not matter."""
        if self.max_age_seconds is None:
            return ""
        return str(int(self.max_age_seconds * 1000))


@dataclass(frozen=True)
class Changes:
    """What a publish streams: the changes its entity made after revision `since` (the last
    one it published) up to its snapshot's, as many as it still remembers."""

    since: int
    outcomes: Sequence[Outcome]
    lost_only: bool = False
    """Stream only the gap of a lost mark (`tenure reindex`): where the stream still has the
    entity's mark, append nothing and leave the mark, so that a publish still on its way
    streams its changes as they were."""


def stream_key(prefix: str, entity_type: str) -> str:
    """The stream of `entity_type`'s changes, hash-tagged with its index (`{account}`)."""
    return f"{prefix}changes:{{{entity_type}}}"


def marks_key(prefix: str, entity_type: str) -> str:
    """Each entity's last streamed incarnation and revision, as `<incarnation>:<revision>`."""
    return stream_key(prefix, entity_type) + ":last"


def encode(changes: Changes, retention: Retention) -> str:
    """What `APPEND_CHANGES` takes: the changes ordered by revision."""
    rows = [
        [
            str(change.revision),
            change.command or "",
            change.command_id,
            change.sent_by or "",
            _iso(change.at),
        ]
        for change in sorted(changes.outcomes, key=lambda change: change.revision)
    ]
    document = {
        "s": changes.since,
        "c": rows,
        "n": str(retention.max_length),
        "b": str(retention.max_bytes),
        "f": str(MIN_KEPT),
        "a": retention.max_age_ms(),
        "o": 1 if changes.lost_only else 0,
    }
    return json.dumps(document, separators=(",", ":"))


def state_of(snapshot: Snapshot) -> str:
    return json.dumps(snapshot.state, separators=(",", ":"))


def _iso(at: datetime | None) -> str:
    if at is None:
        return ""
    if at.tzinfo is None:  # workflow time is UTC
        at = at.replace(tzinfo=UTC)
    return at.isoformat()


READ_COUNT = 1_000
POLL_SECONDS = 0.05


def text(value: object) -> str:
    """A stream key, id or field as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_fields(fields: object) -> dict[str, str]:
    """A stream entry's fields as text."""
    assert isinstance(fields, dict)
    return {text(k): text(v) for k, v in fields.items()}


async def stream_end(client: Any, key: str) -> str:
    """The id of the stream's newest entry: a reader from here sees only what comes next."""
    newest = await client.xrevrange(key, count=1)
    return text(newest[0][0]) if newest else "0-0"


async def watch_applied(
    client: Any,
    key: str,
    position: str,
    applied: Callable[[dict[str, str]], None],
    until: Callable[[], bool],
) -> None:
    """Offer `applied` every change appended to the stream after `position`, until `until()`
    holds. Reads without blocking (a Redis Cluster cannot block on one node for a key of
    another), pausing briefly when there is nothing new. A Redis error is raised."""
    while not until():
        answer = await client.xread({key: position}, count=READ_COUNT)
        entries = answer[0][1] if answer else []
        for entry_id, fields in entries:
            position = text(entry_id)
            entry = entry_fields(fields)
            if entry.get("type") == "change":
                applied(entry)
        if not entries:
            await asyncio.sleep(POLL_SECONDS)
