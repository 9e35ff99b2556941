"""The change stream: one entry per applied command, in revision order, no gaps, none twice;
a gap announced when the entity no longer remembers its changes; consumers in a group that
lose nothing when one dies mid-batch."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from temporalio.client import Client

import workers.cache
from api.gateway import EntityGateway
from entities.runtime.envelope import (
    Outcome,
    OutcomeStatus,
    Publication,
    RuntimeOptions,
    Snapshot,
)
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import until_cached
from tests.entities.test_publishing import publishes
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache, connect_redis
from workers.changes import MIN_KEPT, Changes, Retention, kept_length, marks_key, stream_key
from workers.forgetting import forgotten_by_now
from workers.settings import Settings

Entry = dict[str, str]


async def entries_of(cache: SnapshotCache, entity_type: str, entity_id: str) -> list[Entry]:
    """The entity's entries in its type's stream, oldest first, decoded."""
    raw = await cache.client.xrange(stream_key(cache.prefix, entity_type))
    decoded = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]
    return [entry for entry in decoded if entry["id"] == entity_id]


async def until_streamed(
    cache: SnapshotCache, entity_type: str, entity_id: str, revision: int, timeout: float = 20.0
) -> list[Entry]:
    """The entity's entries once one of them reaches `revision`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        entries = await entries_of(cache, entity_type, entity_id)
        reached = [int(e.get("revision") or e.get("to") or 0) for e in entries]
        if revision in reached:
            return entries
        assert asyncio.get_running_loop().time() < deadline, entries
        await asyncio.sleep(0.1)


def revisions(entries: list[Entry]) -> list[int]:
    assert all(entry["type"] == "change" for entry in entries), entries
    return [int(entry["revision"]) for entry in entries]


def snapshot(entity_id: str, revision: int, incarnation: int = 1) -> Snapshot:
    return Snapshot(
        entity_type="account",
        entity_id=entity_id,
        revision=revision,
        updated_at=datetime.now(UTC),
        state={"balance": revision},
        incarnation=incarnation,
    )


def applied(*revisions: int) -> list[Outcome]:
    return [
        Outcome(
            command_id=f"c{revision}",
            status=OutcomeStatus.APPLIED,
            revision=revision,
            command="deposit",
            sent_by="admin:alice",
            at=datetime.now(UTC),
        )
        for revision in revisions
    ]


async def test_coalesced_publishes_stream_one_entry_per_command_in_order(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"runtime": RuntimeOptions(publish_interval_seconds=1.0)})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
        for amount in range(1, 31):
            await gateway.send(
                "account", account_id, "deposit", {"amount": amount}, sent_by="admin:alice"
            )
        await until_cached(cache, "account", account_id, 32, timeout=30.0)
        entries = await until_streamed(cache, "account", account_id, 32)
        published = await publishes(temporal_client, f"account:{account_id}")
    assert published < 32 / 2, published  # the publishes did cover several commands each
    assert revisions(entries) == list(range(1, 33))
    assert [e["command"] for e in entries[:3]] == ["open", "verify", "deposit"]
    assert {e["sent_by"] for e in entries[2:]} == {"admin:alice"}
    assert len({e["command_id"] for e in entries}) == 32
    assert all(e["at"] and e["incarnation"] == entries[0]["incarnation"] for e in entries)
    # The last entry carries the state the cache holds; those before it in the same
    # publish name the revision whose state the stream holds.
    last = entries[-1]
    assert '"balance":465' in last["state"].replace(" ", "")
    for entry in entries[:-1]:
        if "state" not in entry:
            assert int(entry["state_revision"]) > int(entry["revision"])


async def test_the_stream_has_no_gaps_across_continue_as_new(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(
        update={"runtime": RuntimeOptions(max_commands_per_run=4, publish_interval_seconds=0.5)}
    )
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
        for amount in range(1, 21):
            await gateway.send("account", account_id, "deposit", {"amount": amount})
        entries = await until_streamed(cache, "account", account_id, 22)
    runs = [
        wf async for wf in temporal_client.list_workflows(f'WorkflowId = "account:{account_id}"')
    ]
    assert len(runs) >= 3, runs
    assert revisions(entries) == list(range(1, 23))


async def test_a_repeated_publish_appends_nothing(cache: SnapshotCache) -> None:
    entity_id = new_id()
    await cache.put(snapshot(entity_id, 3), Changes(0, applied(1, 2, 3)))
    # A retry, a retry that finds Redis already past it, an older publish: nothing more.
    await cache.put(snapshot(entity_id, 3), Changes(0, applied(1, 2, 3)))
    await cache.put(snapshot(entity_id, 2), Changes(0, applied(1, 2)))
    assert revisions(await entries_of(cache, "account", entity_id)) == [1, 2, 3]
    # The next publish, carrying an overlap (it had not seen the last one confirmed).
    await cache.put(snapshot(entity_id, 5), Changes(2, applied(3, 4, 5)))
    entries = await entries_of(cache, "account", entity_id)
    assert revisions(entries) == [1, 2, 3, 4, 5]
    assert entries[-1]["state"] == '{"balance":5}'
    assert entries[-2]["state_revision"] == "5" and "state" not in entries[-2]


async def test_a_snapshot_already_cached_still_streams_its_changes(cache: SnapshotCache) -> None:
    entity_id = new_id()
    await cache.put(snapshot(entity_id, 1), Changes(0, applied(1)))
    # The snapshot alone reached the cache (a flush after an outage); its publish, retried
    # with the changes, streams them.
    assert await cache.put(snapshot(entity_id, 3))
    assert not await cache.put(snapshot(entity_id, 3), Changes(1, applied(2, 3)))
    assert revisions(await entries_of(cache, "account", entity_id)) == [1, 2, 3]


async def test_changes_the_entity_no_longer_remembers_are_a_gap(cache: SnapshotCache) -> None:
    entity_id = new_id()
    # Its ledger has lost revisions 1 and 2, and 5 and 6 were never recorded as commands.
    await cache.put(snapshot(entity_id, 6), Changes(0, applied(3, 4)))
    entries = await entries_of(cache, "account", entity_id)
    shape = [(e["type"], e.get("revision") or f"{e['from']}-{e['to']}") for e in entries]
    assert shape == [("gap", "1-2"), ("change", "3"), ("change", "4"), ("gap", "5-6")]
    assert all(e["state_revision"] == "6" for e in entries)
    # Next time, past the stream's own mark: nothing missing, no gap.
    await cache.put(snapshot(entity_id, 7), Changes(6, applied(7)))
    assert (await entries_of(cache, "account", entity_id))[-1]["revision"] == "7"
    # A publish whose entity lost everything since: one gap, up to its snapshot.
    await cache.put(snapshot(entity_id, 12), Changes(7, []))
    last = (await entries_of(cache, "account", entity_id))[-1]
    assert (last["type"], last["from"], last["to"]) == ("gap", "8", "12")


async def test_changes_lost_with_redis_s_keys_are_announced_as_a_gap(cache: SnapshotCache) -> None:
    """Redis lost the stream and its marks (a restart without persistence): revisions 1 to 3
    may never have been read. The entity's next publish announces them before its own."""
    entity_id = new_id()
    await cache.put(snapshot(entity_id, 3), Changes(0, applied(1, 2, 3)))
    await cache.client.delete(
        stream_key(cache.prefix, "account"), marks_key(cache.prefix, "account")
    )
    await cache.put(snapshot(entity_id, 4), Changes(3, applied(4)))
    entries = await entries_of(cache, "account", entity_id)
    shape = [(e["type"], e.get("revision") or f"{e['from']}-{e['to']}") for e in entries]
    assert shape == [("gap", "1-3"), ("change", "4")]
    # Its stream has a mark again: the next publish is the next change alone.
    await cache.put(snapshot(entity_id, 5), Changes(4, applied(5)))
    assert [e["type"] for e in await entries_of(cache, "account", entity_id)][-1] == "change"
    assert len(await entries_of(cache, "account", entity_id)) == 3


async def test_a_reindex_announces_only_a_lost_mark_and_leaves_a_publish_on_its_way_alone(
    cache: SnapshotCache,
) -> None:
    """`tenure reindex` writes each entity's snapshot with a gap that only a lost mark
    streams. Where the mark stands (revision 5), it appends nothing and leaves the mark, so
    the publish of 6 and 7 still on its way streams them as changes, not a gap; where the
    mark went with Redis, it announces 1 to 7."""
    standing, lost = new_id(), new_id()
    for entity_id in (standing, lost):
        await cache.put(snapshot(entity_id, 5), Changes(0, applied(1, 2, 3, 4, 5)))
    await cache.client.hdel(marks_key(cache.prefix, "account"), lost)
    for entity_id in (standing, lost):
        await cache.put(snapshot(entity_id, 7), Changes(7, [], lost_only=True))
        await cache.put(snapshot(entity_id, 7), Changes(5, applied(6, 7)))
    kept = await entries_of(cache, "account", standing)
    assert revisions(kept) == [1, 2, 3, 4, 5, 6, 7]
    announced = (await entries_of(cache, "account", lost))[5:]
    assert [(e["type"], e.get("from"), e.get("to")) for e in announced] == [("gap", "1", "7")]


def test_an_ended_entity_is_forgotten_by_now_only_past_its_retention() -> None:
    ended = datetime(2026, 12, 1, tzinfo=UTC)
    day = 86_400.0
    now = ended.timestamp()
    assert forgotten_by_now(ended, day, now + 2 * day)
    assert not forgotten_by_now(ended, day, now + day / 2)
    assert not forgotten_by_now(ended, 60.0, now + 1800)  # an hour at least
    assert not forgotten_by_now(ended, None, now + 100 * day)  # not known: kept
    assert not forgotten_by_now(ended, 0, now + 100 * day)  # kept for good


async def test_a_later_incarnation_streams_from_its_first_revision(cache: SnapshotCache) -> None:
    entity_id = new_id()
    await cache.put(snapshot(entity_id, 4, incarnation=10), Changes(0, applied(1, 2, 3, 4)))
    await cache.put(snapshot(entity_id, 2, incarnation=20), Changes(0, applied(1, 2)))
    await cache.put(snapshot(entity_id, 9, incarnation=10), Changes(4, applied(5)))  # stale
    entries = await entries_of(cache, "account", entity_id)
    assert [(e["incarnation"], int(e["revision"])) for e in entries] == [
        ("10", 1),
        ("10", 2),
        ("10", 3),
        ("10", 4),
        ("20", 1),
        ("20", 2),
    ]


async def test_the_stream_is_trimmed_by_length(settings: Settings) -> None:
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix, Retention(max_length=10))
    try:
        for revision in range(1, 301):
            await cache.put(snapshot("trimmed", revision), Changes(revision - 1, applied(revision)))
        length = await client.xlen(stream_key(prefix, "account"))
        assert 10 <= length < 300, length  # approximately: whole nodes of the stream go
    finally:
        await client.aclose()


async def test_the_stream_is_trimmed_by_bytes_however_few_its_entries(settings: Settings) -> None:
    """Large states make few entries: a count alone let one customer's 16 KB carts grow a
    stream by 49 MB a minute. A bound in bytes keeps about that much, by the entries' mean
    size, and never fewer than MIN_KEPT entries."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix, Retention(max_length=1_000_000, max_bytes=2_000_000))
    large = {"note": "x" * 16_000}
    try:
        for revision in range(1, 801):
            written = snapshot("large", revision).model_copy(update={"state": large})
            await cache.put(written, Changes(revision - 1, applied(revision)))
        stream = stream_key(prefix, "account")
        length = await client.xlen(stream)
        memory = await client.memory_usage(stream)
        # 2 MB is about 125 entries of 16 KB; trimming goes by whole nodes of the stream.
        assert MIN_KEPT <= length < 400, length
        assert memory < 8_000_000, memory
        newest = await client.xrevrange(stream, count=1)
        assert newest[0][1][b"revision"] == b"800"  # the newest are the ones kept
        # Many small entries, then one large: the large one does not trim the small away.
        for revision in range(1, 1001):
            await cache.put(snapshot("small", revision), Changes(revision - 1, applied(revision)))
        before = await client.xlen(stream)
        await cache.put(
            snapshot("small", 1001).model_copy(update={"state": {"note": "x" * 200_000}}),
            Changes(1000, applied(1001)),
        )
        assert await client.xlen(stream) >= before - 200, before  # a node's worth, at most
    finally:
        await client.aclose()


async def test_a_stream_of_small_entries_that_turn_large_keeps_to_its_bytes(
    settings: Settings,
) -> None:
    """Its length followed the mean size of every entry it held, which the small ones kept
    low while large ones came: 3,000 entries of about 300 bytes, then 16 KB states, held
    about 700 entries, five times the bound's bytes."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix, Retention(max_length=1_000_000, max_bytes=2_000_000))
    stream = stream_key(prefix, "account")
    try:
        for revision in range(1, 3001):
            await cache.put(snapshot("small", revision), Changes(revision - 1, applied(revision)))
        large = {"note": "x" * 16_000}
        peak = 0
        for revision in range(1, 601):
            written = snapshot("large", revision).model_copy(update={"state": large})
            await cache.put(written, Changes(revision - 1, applied(revision)))
            if revision % 50 == 0:
                peak = max(peak, await client.memory_usage(stream) or 0)
        # 2 MB, and a node of the stream's (100 entries) that approximate trimming leaves.
        assert peak < 4_500_000, peak
        assert await client.xlen(stream) >= MIN_KEPT
    finally:
        await client.aclose()


def test_letters_kept_by_their_sizes_stay_near_their_bytes_however_the_sizes_change() -> None:
    """The rule dead letters are kept by (`kept_length`), with exact trimming: small letters
    then large ones, large then small then large, and a mix, never pass the bound by more
    than about a tenth (the mean of every letter held alone passed it three times), and one
    large letter among small ones trims few of them."""
    budget = 2_000_000

    def kept(sizes: list[int]) -> tuple[float, int]:
        """The most bytes held, as a share of the budget, and the entries held at the end."""
        held: deque[int] = deque()
        total, mean, fast, most_bytes = 0, 0.0, 0.0, 0
        for size in sizes:
            mean, fast, most = kept_length(
                mean, fast, size, len(held) + 1, budget, 1_000_000, MIN_KEPT
            )
            held.append(size)
            total += size
            while len(held) > most:
                total -= held.popleft()
            most_bytes = max(most_bytes, total)
        return most_bytes / budget, len(held)

    mixed = [300, 300, 300, 16_000] * 5000
    assert kept([300] * 3_000 + [16_000] * 600)[0] < 1.05
    assert kept([16_000] * 2_000 + [300] * 20_000 + [16_000] * 2_000)[0] < 1.05
    assert kept(mixed)[0] < 1.15
    assert kept([300] * 20_000)[0] > 0.9  # small ones alone fill it
    assert kept([300] * 1_000 + [200_000])[1] == 1_001  # none trimmed for it


async def test_the_stream_is_trimmed_by_age_on_redis_s_clock_not_the_writer_s(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries older than the age are trimmed, by Redis's clock, whose their ids are: a
    writer whose clock ran ahead by more than the age trimmed what others had just
    appended, unread, and no consumer was told of a gap."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix, Retention(max_length=1_000_000, max_age_seconds=3600))
    stream = stream_key(prefix, "account")
    try:
        seconds, _ = await client.time()
        for n in range(300):  # old entries, in whole nodes of the stream
            await client.xadd(stream, {"n": n}, id=f"{(seconds - 7200) * 1000}-{n + 1}")
        for revision in range(1, 4):
            await cache.put(snapshot("fresh", revision), Changes(revision - 1, applied(revision)))
        assert await client.xlen(stream) < 300  # the old ones go
        ahead = time.time() + 7200
        monkeypatch.setattr(workers.cache, "time", SimpleNamespace(time=lambda: ahead))
        await cache.put(snapshot("fresh", 4), Changes(3, applied(4)))
        kept = [
            int(fields[b"revision"])
            for _, fields in await client.xrange(stream, "-", "+")
            if b"revision" in fields
        ]
        assert kept == [1, 2, 3, 4]
    finally:
        await client.aclose()


async def consume(
    client: Any, stream: str, group: str, consumer: str, count: int, start: str = ">"
) -> list[tuple[bytes, Entry]]:
    """One XREADGROUP: entries new to the group (`>`), or this consumer's pending ones (`0`)."""
    answer = await client.xreadgroup(group, consumer, {stream: start}, count=count)
    batch: list[tuple[bytes, Entry]] = []
    for _, messages in answer or []:
        for message_id, fields in messages:
            batch.append((message_id, {k.decode(): v.decode() for k, v in fields.items()}))
    return batch


async def test_a_consumer_killed_mid_batch_loses_nothing(settings: Settings) -> None:
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix)
    stream = stream_key(prefix, "account")
    ids = [new_id() for _ in range(5)]
    for entity_id in ids:
        for revision in range(1, 11):
            await cache.put(snapshot(entity_id, revision), Changes(revision - 1, applied(revision)))
    expected = {(entity_id, revision) for entity_id in ids for revision in range(1, 11)}
    processed: list[tuple[str, int]] = []

    def handle(entry: Entry) -> None:
        processed.append((entry["id"], int(entry["revision"])))

    try:
        await client.xgroup_create(stream, "billing", id="0")
        # Worker A reads a batch of 10, processes 4 and dies before acknowledging any.
        batch = await consume(client, stream, "billing", "a", 10)
        assert len(batch) == 10
        for _, entry in batch[:4]:
            handle(entry)
        # Worker B goes on with new entries, and takes over A's pending ones once they have
        # been idle long enough (here: at once).
        while batch := await consume(client, stream, "billing", "b", 7):
            for message_id, entry in batch:
                handle(entry)
                await client.xack(stream, "billing", message_id)
        _, claimed, _ = await client.xautoclaim(stream, "billing", "b", min_idle_time=0, count=100)
        assert len(claimed) == 10
        for message_id, fields in claimed:
            handle({k.decode(): v.decode() for k, v in fields.items()})
            await client.xack(stream, "billing", message_id)
        # A restarted consumer first rereads its own pending entries: none are left.
        assert await consume(client, stream, "billing", "a", 10, start="0") == []
        assert (await client.xpending(stream, "billing"))["pending"] == 0
    finally:
        await client.aclose()
    # At least once: every entry processed, the 4 that A handled before dying twice.
    assert set(processed) == expected
    assert len(processed) == len(expected) + 4


async def one_account_streamed(settings: Settings, revisions: int) -> tuple[Any, str]:
    """A Redis client and the change stream of one new account's `revisions` changes."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix)
    entity_id = new_id()
    for revision in range(1, revisions + 1):
        await cache.put(snapshot(entity_id, revision), Changes(revision - 1, applied(revision)))
    return client, stream_key(prefix, "account")


async def test_a_restarted_consumer_finishes_its_own_pending_batch(settings: Settings) -> None:
    client, stream = await one_account_streamed(settings, 20)
    seen: list[int] = []
    try:
        await client.xgroup_create(stream, "warehouse", id="0")
        first = await consume(client, stream, "warehouse", "w1", 8)
        seen.extend(int(entry["revision"]) for _, entry in first[:3])  # then killed
        # Restarted under the same name: its pending batch first, then new entries.
        for start in ("0", ">"):
            while batch := await consume(client, stream, "warehouse", "w1", 5, start):
                for message_id, entry in batch:
                    seen.append(int(entry["revision"]))
                    await client.xack(stream, "warehouse", message_id)
    finally:
        await client.aclose()
    assert sorted(set(seen)) == list(range(1, 21))
    assert seen[3:] == list(range(1, 21))  # in revision order, after the replayed ones


async def test_entries_trimmed_while_a_dead_consumer_held_them_are_told_apart(
    settings: Settings,
) -> None:
    """What the README's consumer counts on: retention trims entries a dead consumer held.
    Its own reread (`XREADGROUP` from 0) gives each with no fields; another consumer's
    `XAUTOCLAIM` gives none of them, only their ids, in its third element. A consumer that
    dropped that element lost those changes without a gap to tell it."""
    client, stream = await one_account_streamed(settings, 4)
    try:
        await client.xgroup_create(stream, "ledger", id="0")
        held = [message_id for message_id, _ in await consume(client, stream, "ledger", "a", 2)]
        await client.xtrim(stream, maxlen=0)
        answer = await client.xreadgroup("ledger", "a", {stream: "0"}, count=10)
        assert [(message_id, fields) for message_id, fields in answer[0][1]] == [
            (message_id, {}) for message_id in held
        ]
        _, claimed, deleted = await client.xautoclaim(
            stream, "ledger", "b", min_idle_time=0, count=100
        )
        assert (claimed, deleted) == ([], held)
        assert (await client.xpending(stream, "ledger"))["pending"] == 0
    finally:
        await client.aclose()


def test_retention_is_read_from_the_environment_and_written_back() -> None:
    settings = Settings.from_env(
        {
            "TENURE_CHANGE_STREAM_MAXLEN": "5000",
            "TENURE_CHANGE_STREAM_MAX_AGE_SECONDS": "86400",
        }
    )
    assert Retention.of(settings) == Retention(
        max_length=5000, max_age_seconds=86400.0, max_bytes=256 * 1024 * 1024
    )
    assert Settings.from_env(settings.to_env()) == settings
    assert Retention.of(Settings.from_env({})) == Retention(1_000_000, None)
    small = Settings.from_env({"TENURE_CHANGE_STREAM_MAX_BYTES": "1000000"})
    assert Retention.of(small).max_bytes == 1_000_000
    assert Settings.from_env(small.to_env()) == small
    assert Retention(10, 60.0).max_age_ms() == "60000"


def test_a_publish_scheduled_before_the_stream_decodes_as_a_bare_snapshot() -> None:
    bare = snapshot("old", 3)
    publication = Publication.model_validate_json(bare.model_dump_json())
    assert publication.snapshot == bare and publication.changes is None
    carried = Publication(snapshot=bare, since=1, changes=applied(2, 3))
    assert Publication.model_validate_json(carried.model_dump_json()) == carried


async def test_a_timer_change_is_streamed_as_the_entity_s_own(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    sku = new_id()
    async with run_worker(settings):
        await gateway.send("inventory", sku, "restock", {"quantity": 5, "name": "Teapot"})
        await gateway.send(
            "inventory",
            sku,
            "reserveStock",
            {"reservation_id": "r1", "quantity": 2, "ttl_seconds": 1.0},
        )
        await gateway.send("inventory", sku, "restock", {"quantity": 1})
        entries = await until_streamed(cache, "inventory", sku, 4)
    assert revisions(entries) == [1, 2, 3, 4]
    expired = entries[-1]
    assert (expired["command"], expired["sent_by"]) == ("expire_reservations", "entity:timer")
    assert '"reservations":[]' in expired["state"]
