"""The listing index in Redis: written with the snapshot, never backwards, and read by
pages that go on correctly past a sparse filter."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from entities.runtime.envelope import Snapshot
from workers.cache import SnapshotCache, connect_redis
from workers.index import generations_key, index_base
from workers.listing import COUNTED, SCAN_BUDGET, EntityIndex, ListFilter, Order, Page
from workers.settings import Settings

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def account(entity_id: str, revision: int, status: str = "ACTIVE", **more: Any) -> Snapshot:
    state = {
        "status": status,
        "owner_name": f"Owner {entity_id}",
        "email": f"{entity_id}@example.com",
        "currency": "EUR",
        "last_activity_at": T0.isoformat(),
    }
    return Snapshot(
        entity_type="account",
        entity_id=entity_id,
        revision=revision,
        updated_at=T0 + timedelta(seconds=revision),
        state=state,
        closed=status == "CLOSED",
        incarnation=more.get("incarnation", 1),
    )


@pytest.fixture
async def own_prefix(settings: Settings) -> AsyncIterator[tuple[SnapshotCache, EntityIndex]]:
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"
    client = connect_redis(settings)
    yield SnapshotCache(client, prefix), EntityIndex(client, prefix)
    await client.aclose()


async def test_an_older_snapshot_leaves_the_index_at_the_newer(
    own_prefix: tuple[SnapshotCache, EntityIndex],
) -> None:
    cache, index = own_prefix
    assert await cache.put(account("ada", 3, "SUSPENDED"))
    assert not await cache.put(account("ada", 2, "ACTIVE"))  # delayed, retried, replayed
    suspended = ListFilter(tags={"status": frozenset({"SUSPENDED"})})
    assert (await index.page("account", suspended, Order.ID, 10)).ids == ["ada"]
    active = ListFilter(tags={"status": frozenset({"ACTIVE"})})
    assert (await index.page("account", active, Order.ID, 10)).ids == []
    assert await index.counts("account") == ({"SUSPENDED": 1}, 1)

    # A later incarnation (the id used again) replaces it whatever its revision.
    assert await cache.put(account("ada", 1, "ACTIVE", incarnation=2))
    assert await index.counts("account") == ({"ACTIVE": 1}, 1)
    hit = await cache.get("account", "ada")
    assert hit is not None and hit.snapshot.incarnation == 2
    assert (await index.page("account", active, Order.ID, 10)).ids == ["ada"]


async def test_a_sparse_filter_pages_on_past_the_scan_budget(
    own_prefix: tuple[SnapshotCache, EntityIndex],
) -> None:
    cache, index = own_prefix
    count = SCAN_BUDGET + 500
    closed = {f"a{n:05d}" for n in (3, 250, SCAN_BUDGET + 100, SCAN_BUDGET + 400)}
    snapshots = [
        account(f"a{n:05d}", 1, "CLOSED" if f"a{n:05d}" in closed else "ACTIVE")
        for n in range(count)
    ]
    assert await cache.put_many(snapshots) == count
    assert await cache.put_many(snapshots) == 0  # the same revisions again: nothing

    only_closed = ListFilter(closed=True)
    first = await index.page("account", only_closed, Order.ID, 10)
    # Not all found within one page's scan: a short page, and a cursor to go on from.
    assert first.ids == sorted(closed)[:2] and first.has_next and first.total is None
    rest = await index.page("account", only_closed, Order.ID, 10, first.end_key)
    assert rest.ids == sorted(closed)[2:] and not rest.has_next

    # A filter the index answers itself is counted and found at once.
    by_status = ListFilter(tags={"status": frozenset({"CLOSED"})})
    page = await index.page("account", by_status, Order.ID, 10)
    assert page.ids == sorted(closed) and page.total == 4 and not page.has_next
    assert await index.counts("account") == ({"ACTIVE": count - 4, "CLOSED": 4}, count)


async def test_a_filter_of_few_candidates_is_counted_and_paged_in_order(
    own_prefix: tuple[SnapshotCache, EntityIndex],
) -> None:
    """At most `COUNTED` candidates: a filter the index cannot answer alone (closure beside
    a status) is read whole, so its total is exact, and its pages go on from their cursors
    in either order."""
    cache, index = own_prefix
    statuses = ["ACTIVE", "SUSPENDED", "CLOSED"]
    snapshots = [account(f"a{n:03d}", n + 1, statuses[n % 3]) for n in range(COUNTED)]
    assert await cache.put_many(snapshots) == COUNTED
    open_ones = ListFilter(tags={"status": frozenset({"ACTIVE", "SUSPENDED"})}, closed=False)
    expected = [s.entity_id for s in snapshots if s.state and s.state["status"] != "CLOSED"]
    for order, in_order in ((Order.ID, expected), (Order.UPDATED_DESC, expected[::-1])):
        seen: list[str] = []
        after: str | None = None
        while True:
            page = await index.page("account", open_ones, order, 100, after)
            assert page.total == len(expected)
            seen += page.ids
            if not page.has_next:
                break
            after = page.end_key
        assert seen == in_order, order
    only_closed = await index.page("account", ListFilter(closed=True), Order.ID, 5)
    assert only_closed.total == COUNTED - len(expected) and only_closed.has_next
    # A status from an empty list of them: none.
    nothing = ListFilter(tags={"status": frozenset()}, closed=False)
    assert await index.page("account", nothing, Order.ID, 5) == Page([], [], False, None, 0)
    # One more candidate than that, and counting would mean a scan: no total.
    assert await cache.put(account("z", 1, "ACTIVE"))
    assert (await index.page("account", ListFilter(closed=True), Order.ID, 5)).total is None


async def test_a_time_bound_takes_in_entities_of_its_own_millisecond(
    own_prefix: tuple[SnapshotCache, EntityIndex],
) -> None:
    """The index keeps times to the millisecond: an entity updated in a bound's millisecond,
    just before `updatedAfter` or just after `updatedBefore`, is listed, never missed, so
    a dashboard asking for what changed after the last time it saw misses nothing."""
    cache, index = own_prefix
    at = datetime(2026, 12, 5, 9, 2, 56, 48_499, tzinfo=UTC)
    await cache.put(account("ada", 1).model_copy(update={"updated_at": at}))
    await cache.put(account("bob", 1).model_copy(update={"updated_at": at + timedelta(seconds=1)}))
    just_before, just_after = at - timedelta(microseconds=400), at + timedelta(microseconds=400)
    for order in Order:
        after = ListFilter(updated_after=just_after)
        assert set((await index.page("account", after, order, 5)).ids) == {"ada", "bob"}, order
        before = ListFilter(updated_before=just_before)
        assert (await index.page("account", before, order, 5)).ids == ["ada"], order
        window = ListFilter(updated_after=at, updated_before=at)
        assert (await index.page("account", window, order, 5)).ids == ["ada"], order
        # A millisecond apart, it is out.
        later = ListFilter(updated_after=at + timedelta(milliseconds=1))
        assert (await index.page("account", later, order, 5)).ids == ["bob"], order


async def test_index_keys_share_the_type_slot(settings: Settings) -> None:
    base = index_base("tenure:", "account")
    assert base == "tenure:index:{account}:"


async def generations_moved_by_each_write(cache: SnapshotCache) -> None:
    """Which listing generations each write raises: the type's always, a tag value's when
    the entity had it or has it now, the stuck marks' when one is set or cleared. Shared
    with the Redis Cluster test, whose index is written by the second script."""
    key = generations_key(cache.prefix, "account")

    async def moved(write: Any) -> set[str]:
        before = await cache.client.hgetall(key)  # type: ignore[misc]
        await write
        after = await cache.client.hgetall(key)  # type: ignore[misc]
        return {f.decode() for f in after if after[f] != before.get(f)}

    assert await moved(cache.put(account("ada", 1, "ACTIVE"))) == {"all", "t:status:ACTIVE"}
    # Another status's lists do not see an account that stays where it was.
    assert await moved(cache.put(account("ada", 2, "ACTIVE"))) == {"all", "t:status:ACTIVE"}
    # Moving raises both: a list of either shows it before or after.
    assert await moved(cache.put(account("ada", 3, "SUSPENDED"))) == {
        "all",
        "t:status:ACTIVE",
        "t:status:SUSPENDED",
    }
    assert await moved(cache.put(account("ada", 2, "DORMANT"))) == set()  # older: nothing
    assert await moved(cache.mark_stuck("account", "ada", "stuck")) == {"stuck"}
    # The watchdog marks a stuck entity again at every sweep: no list of it went unrendered
    # longer than a sweep, while any of its type stayed stuck.
    assert await moved(cache.mark_stuck("account", "ada", "stuck")) == set()
    assert await moved(cache.clear_stuck("account", "ada")) == {"stuck"}
    assert await moved(cache.clear_stuck("account", "ada")) == set()
    epoch = await cache.client.hget(key, "epoch")  # type: ignore[misc]
    assert await moved(cache.new_epoch("account")) == {"all", "epoch"}
    assert await cache.client.hget(key, "epoch") != epoch  # type: ignore[misc]


async def test_each_write_raises_the_generations_of_the_tag_values_it_touches(
    own_prefix: tuple[SnapshotCache, EntityIndex],
) -> None:
    cache, _ = own_prefix
    await generations_moved_by_each_write(cache)
    # The generations live in the type's slot, beside its index.
    assert generations_key(cache.prefix, "account") == index_base(cache.prefix, "account") + "g"
