"""Rendered listings replayed while the part of the index they can see stands: a page
filtered by status is not made again for a write to an account in another status, and is
for one that enters or leaves its statuses, for a stuck mark and after a reindex. The
snapshots are written through the cache's own script, as a worker's publish writes them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from api.cached_reads import CachedReadResponses
from api.read_plans import plan_reads
from api.schema import schema
from entities.runtime.envelope import Snapshot
from tests.api.test_accounts_api import SUSPEND
from tests.api.test_listing import eventually, open_named
from tests.conftest import GraphQLClient, new_id
from tests.workers.test_index import T0, account
from workers.cache import SnapshotCache
from workers.reindex import reindex
from workers.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """An index of the test's own: its generations move only with its writes."""
    return settings.model_copy(
        update={"redis_prefix": f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"}
    )


PAGE = """query($filter: AccountFilter) {
  accounts(filter: $filter, first: 20, orderBy: ID) {
    edges { node { id status balance stale } } totalCount } }"""
SUSPENDED = {"status": ["SUSPENDED"]}
HELD = """{ accounts(filter: {status: [SUSPENDED, DORMANT]}, orderBy: ID) {
  edges { node { id status balance stale } } totalCount } }"""
CARTS = """query($account: ID!) { carts(filter: {accountId: $account}, orderBy: ID) {
  edges { node { id accountId status } } } }"""


def replays_of(http: httpx.AsyncClient) -> CachedReadResponses:
    return http._transport.app.state.cached_reads  # type: ignore[attr-defined,no-any-return]


def balanced(entity_id: str, revision: int, status: str, balance: int = 0) -> Snapshot:
    """An account's snapshot with a balance to tell its revisions apart on a page."""
    snapshot = account(entity_id, revision, status)
    assert snapshot.state is not None
    return snapshot.model_copy(update={"state": {**snapshot.state, "balance": balance}})


def cart(entity_id: str, revision: int, account_id: str) -> Snapshot:
    return Snapshot(
        entity_type="cart",
        entity_id=entity_id,
        revision=revision,
        updated_at=T0,
        state={"account_id": account_id, "status": "OPEN", "last_activity_at": T0.isoformat()},
        incarnation=1,
    )


def shown(data: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {
        e["node"]["id"]: (e["node"]["status"], int(e["node"]["balance"]))
        for e in data["accounts"]["edges"]
    }


class Pages:
    """Reads a page through the API and tells whether it was replayed or made anew."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.gql = GraphQLClient(http)
        self.replays = replays_of(http)

    async def read(self, query: str, **variables: Any) -> tuple[dict[str, Any], bool]:
        before = self.replays.replayed
        data = await self.gql.data(query, **variables)
        return data, self.replays.replayed == before + 1


async def test_a_status_page_is_replayed_through_writes_to_accounts_in_other_statuses(
    http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    pages = Pages(http)
    held, busy = new_id(), new_id()
    await cache.put(balanced(held, 1, "SUSPENDED", 10))
    await cache.put(balanced(busy, 1, "ACTIVE", 20))
    first, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert shown(first) == {held: ("SUSPENDED", 10)} and not replayed
    assert await pages.read(PAGE, filter=SUSPENDED) == (first, True)

    # An active account that stays active: the suspended page cannot have changed.
    await cache.put(balanced(busy, 2, "ACTIVE", 21))
    assert await pages.read(PAGE, filter=SUSPENDED) == (first, True)
    # A page of every account shows it, so it is made again, with the new balance.
    everyone, replayed = await pages.read(PAGE)
    assert shown(everyone) == {held: ("SUSPENDED", 10), busy: ("ACTIVE", 21)} and not replayed
    assert await pages.read(PAGE) == (everyone, True)
    await cache.put(balanced(busy, 3, "ACTIVE", 22))
    everyone, replayed = await pages.read(PAGE)
    assert shown(everyone)[busy] == ("ACTIVE", 22) and not replayed
    assert await pages.read(PAGE, filter=SUSPENDED) == (first, True)


async def test_a_status_page_is_made_again_when_an_account_enters_changes_in_or_leaves_it(
    http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    pages = Pages(http)
    held, busy, asleep = new_id(), new_id(), new_id()
    await cache.put(balanced(held, 1, "SUSPENDED", 10))
    await cache.put(balanced(busy, 1, "ACTIVE", 20))
    await cache.put(balanced(asleep, 1, "DORMANT", 30))
    for query, variables in ((PAGE, {"filter": SUSPENDED}), (HELD, {})):
        await pages.read(query, **variables)
        assert (await pages.read(query, **variables))[1]

    await cache.put(balanced(busy, 2, "SUSPENDED", 21))  # in
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert shown(data) == {held: ("SUSPENDED", 10), busy: ("SUSPENDED", 21)} and not replayed
    assert data["accounts"]["totalCount"] == 2
    data, replayed = await pages.read(HELD)
    assert set(shown(data)) == {held, busy, asleep} and not replayed

    await cache.put(balanced(held, 2, "SUSPENDED", 11))  # changed, still in
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert shown(data)[held] == ("SUSPENDED", 11) and not replayed

    await cache.put(balanced(held, 3, "ACTIVE", 12))  # out
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert shown(data) == {busy: ("SUSPENDED", 21)} and not replayed
    assert data["accounts"]["totalCount"] == 1

    # The page of two statuses sees either leave: a dormant account woken up.
    await pages.read(HELD)
    assert (await pages.read(HELD))[1]
    await cache.put(balanced(asleep, 2, "ACTIVE", 31))
    data, replayed = await pages.read(HELD)
    assert set(shown(data)) == {busy} and not replayed


async def test_a_cart_page_of_one_account_sees_only_that_accounts_carts(
    http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    pages = Pages(http)
    ada, grace = new_id(), new_id()
    mine, theirs, more = new_id(), new_id(), new_id()
    await cache.put(cart(mine, 1, ada))
    await cache.put(cart(theirs, 1, grace))
    first, _ = await pages.read(CARTS, account=ada)
    assert [e["node"]["id"] for e in first["carts"]["edges"]] == [mine]
    await cache.put(cart(theirs, 2, grace))
    assert await pages.read(CARTS, account=ada) == (first, True)
    await cache.put(cart(more, 1, ada))
    data, replayed = await pages.read(CARTS, account=ada)
    assert {e["node"]["id"] for e in data["carts"]["edges"]} == {mine, more} and not replayed


async def test_a_stuck_mark_shows_on_a_replayed_page_at_once(
    http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    pages = Pages(http)
    held = new_id()
    await cache.put(balanced(held, 1, "SUSPENDED"))
    stale = lambda data: [e["node"]["stale"] for e in data["accounts"]["edges"]]  # noqa: E731
    await pages.read(PAGE, filter=SUSPENDED)
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert stale(data) == [False] and replayed
    await cache.mark_stuck("account", held, "its workflow task keeps failing")
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert stale(data) == [True] and not replayed
    await cache.clear_stuck("account", held)
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert stale(data) == [False] and not replayed


async def render_then_lose_everything(pages: Pages, cache: SnapshotCache, prefix: str) -> None:
    """The page of suspended accounts rendered with one on it, then every key of the test's
    index deleted, as when Redis lost everything."""
    lost = new_id()
    await cache.put(balanced(lost, 1, "SUSPENDED"))
    before, _ = await pages.read(PAGE, filter=SUSPENDED)
    assert set(shown(before)) == {lost}
    async for key in cache.client.scan_iter(match=f"{prefix}*"):
        await cache.client.delete(key)


async def test_a_page_rendered_before_redis_lost_everything_is_not_replayed_after_a_reindex(
    http: httpx.AsyncClient, cache: SnapshotCache, settings: Settings, temporal_client: Client
) -> None:
    pages = Pages(http)
    await render_then_lose_everything(pages, cache, settings.redis_prefix)
    found = new_id()
    # Written again after the loss, the counters meet the values the page was made at.
    await cache.put(balanced(found, 1, "SUSPENDED"))
    done = await reindex(
        temporal_client, cache, ["account"], where=f"TaskQueue = '{settings.task_queue}'"
    )
    assert done.found == 0
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert set(shown(data)) == {found} and not replayed


async def test_a_page_rendered_before_redis_lost_everything_is_not_replayed_without_a_reindex(
    http: httpx.AsyncClient, cache: SnapshotCache, settings: Settings
) -> None:
    """No reindex ran: the entities publish again, and the counters, counting up from
    nothing, meet the values the page was rendered at. The epoch a listing sets when it
    finds none tells the two apart."""
    pages = Pages(http)
    await render_then_lose_everything(pages, cache, settings.redis_prefix)
    found = new_id()
    await cache.put(balanced(found, 1, "SUSPENDED"))
    data, replayed = await pages.read(PAGE, filter=SUSPENDED)
    assert set(shown(data)) == {found} and not replayed


async def test_an_account_suspended_through_the_api_joins_the_replayed_page(
    gql: GraphQLClient, http: httpx.AsyncClient
) -> None:
    pages = Pages(http)
    held = await open_named(gql, "Ada Lovelace", "ada@example.com")
    other = await open_named(gql, "Grace Hopper", "grace@navy.mil")
    await gql.data(SUSPEND, id=held, reason="review")
    ids = lambda data: {e["node"]["id"] for e in data["accounts"]["edges"]}  # noqa: E731
    await eventually(gql, PAGE, lambda data: ids(data) == {held}, filter=SUSPENDED)
    await pages.read(PAGE, filter=SUSPENDED)
    assert (await pages.read(PAGE, filter=SUSPENDED))[1]
    await gql.data(SUSPEND, id=other, reason="review")
    data = await eventually(gql, PAGE, lambda data: ids(data) == {held, other}, filter=SUSPENDED)
    assert ids(data) == {held, other}


def depends_on(query: str, **variables: Any) -> list[tuple[str, list[str]]]:
    plan = plan_reads(schema._schema, query, None)
    assert plan is not None
    return plan.listing_generations(schema._schema, variables)


def test_what_a_listing_depends_on_is_read_from_its_filter_as_written_or_in_variables() -> None:
    kept = ["epoch", "stuck"]
    every = [*kept, "all"]
    assert depends_on(HELD) == [("account", [*kept, "t:status:DORMANT", "t:status:SUSPENDED"])]
    assert depends_on(PAGE, filter=SUSPENDED) == [("account", [*kept, "t:status:SUSPENDED"])]
    # One value where a list is taken is a list of one.
    assert depends_on(PAGE, filter={"status": "DORMANT"}) == [
        ("account", [*kept, "t:status:DORMANT"])
    ]
    # No status keeps nothing out: every write counts. An empty list lets nothing in.
    assert depends_on(PAGE) == [("account", every)]
    assert depends_on(PAGE, filter={"status": []}) == [("account", kept)]
    assert depends_on(PAGE, filter={"text": "ada"}) == [("account", every)]
    assert depends_on(PAGE, filter={"status": ["NOT_A_STATUS"]}) == [("account", every)]
    # A cart's account is the narrower: one account's carts.
    assert depends_on('{ carts(filter: {status: [OPEN], accountId: "ada"}) { totalCount } }') == [
        ("cart", [*kept, "t:account_id:ada"])
    ]
    # Counts per status depend on every entity; each aliased field on its own filter.
    assert depends_on(
        "{ accountStats { total } a: accounts(filter: {status: SUSPENDED}) { totalCount }"
        " b: accounts { totalCount } }"
    ) == [
        ("account", every),
        ("account", [*kept, "t:status:SUSPENDED"]),
        ("account", every),
    ]


async def test_pages_asked_for_together_after_a_write_are_rendered_once(
    http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    pages = Pages(http)
    held = new_id()
    await cache.put(balanced(held, 1, "SUSPENDED", 10))
    await pages.read(PAGE, filter=SUSPENDED)
    await cache.put(balanced(held, 2, "SUSPENDED", 11))
    before = pages.replays.replayed
    together = await asyncio.gather(*(pages.gql.data(PAGE, filter=SUSPENDED) for _ in range(5)))
    assert all(shown(data) == {held: ("SUSPENDED", 11)} for data in together)
    # One of them rendered the page; the others waited for its bytes.
    assert pages.replays.replayed == before + 4
