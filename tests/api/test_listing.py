"""Lists of entities and counts per status, through GraphQL: filters, stable cursors while
entities change, totals, who may list what, and the index rebuilt from Temporal after
Redis lost everything."""

from __future__ import annotations

import asyncio
import base64
import json
import unicodedata
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowQueryFailedError

import workers.reindex
from api.cached_reads import CachedReadResponses
from deploy.embedded import EmbeddedRedis
from entities.runtime.envelope import Snapshot
from tests.api.test_access import Caller, token
from tests.api.test_accounts_api import CLOSE, DEPOSIT, SUSPEND, VERIFY
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.workers.test_index import account
from workers.cache import SnapshotCache, connect_redis
from workers.changes import stream_key
from workers.changes import text as decoded
from workers.index import index_base
from workers.listing import EntityIndex, Page
from workers.reindex import reindex
from workers.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """An index of the test's own: totals and counts see only its entities."""
    return settings.model_copy(
        update={"redis_prefix": f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"}
    )


OPEN = """mutation($id: ID!, $name: String!, $email: String!) {
  openAccount(id: $id, ownerName: $name, email: $email, wait: true) { commandId } }"""

ACCOUNTS = """
query($filter: AccountFilter, $first: Int! = 20, $after: String,
      $order: ListOrder! = UPDATED_DESC) {
  accounts(filter: $filter, first: $first, after: $after, orderBy: $order) {
    edges { cursor node { id status ownerName balance source } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
    totalCount
  }
}"""

STATS = "{ accountStats { byStatus { status count } total } }"
STALE = "{ accounts { edges { node { id stale } } } }"


def ids(data: dict[str, Any], field: str = "accounts") -> list[str]:
    return [edge["node"]["id"] for edge in data[field]["edges"]]


async def eventually(
    gql: GraphQLClient, query: str, shown: Callable[[dict[str, Any]], bool], **variables: Any
) -> dict[str, Any]:
    """The answer to `query` once `shown` holds of it, or after 10 s: a command is answered
    once applied, and its snapshot (with its index entries) is published just after."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        data = await gql.data(query, **variables)
        if shown(data) or asyncio.get_running_loop().time() > deadline:
            return data
        await asyncio.sleep(0.05)


async def listed(gql: GraphQLClient, expected: list[str], **variables: Any) -> dict[str, Any]:
    """The accounts listing once it shows `expected`, in that order."""
    return await eventually(gql, ACCOUNTS, lambda data: ids(data) == expected, **variables)


async def open_named(gql: GraphQLClient, name: str, email: str, active: bool = True) -> str:
    account_id = new_id()
    await gql.data(OPEN, id=account_id, name=name, email=email)
    if active:
        await gql.data(VERIFY, id=account_id)
    return account_id


async def test_accounts_filter_by_status_text_time_and_closure_with_totals_and_counts(
    gql: GraphQLClient,
) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    ada = await open_named(gql, "Ada Lovelace", "ada@example.com")
    grace = await open_named(gql, "Grace Hopper", "grace@navy.mil")
    alan = await open_named(gql, "Alan Turing", "alan@bletchley.uk")
    pending = await open_named(gql, "Pending Person", "p@example.com", active=False)
    await gql.data(SUSPEND, id=grace)
    await gql.data(SUSPEND, id=alan)
    await gql.data(CLOSE, id=ada)

    everything = await listed(gql, [ada, alan, grace, pending])
    # Newest update first: ada was closed last.
    assert ids(everything) == [ada, alan, grace, pending]
    assert everything["accounts"]["totalCount"] == 4
    assert everything["accounts"]["edges"][0]["node"]["status"] == "CLOSED"
    assert everything["accounts"]["edges"][0]["node"]["source"] == "CACHE"

    suspended = await gql.data(ACCOUNTS, filter={"status": ["SUSPENDED"]})
    assert ids(suspended) == [alan, grace]
    assert suspended["accounts"]["totalCount"] == 2
    both = await gql.data(ACCOUNTS, filter={"status": ["SUSPENDED", "PENDING"]}, order="ID")
    assert ids(both) == sorted([alan, grace, pending])
    assert both["accounts"]["totalCount"] == 3
    # An empty list of statuses lets none in.
    none = await gql.data(ACCOUNTS, filter={"status": []})
    assert (ids(none), none["accounts"]["totalCount"]) == ([], 0)

    for text, found in [
        ("grace", [grace]),  # the owner's name
        ("GRACE HOP", [grace]),  # any case
        # Names and emails starting with a, and ids (hex) that happen to.
        ("a", [i for i in (ada, alan, grace, pending) if i in (ada, alan) or i.startswith("a")]),
        ("alan@bl", [alan]),  # the email
        (pending[:12], [pending]),  # the id
        ("nobody", []),
    ]:
        data = await gql.data(ACCOUNTS, filter={"text": text})
        assert ids(data) == found, text
        assert data["accounts"]["totalCount"] == len(found)

    open_only = await gql.data(ACCOUNTS, filter={"closed": False})
    assert ids(open_only) == [alan, grace, pending]
    assert open_only["accounts"]["totalCount"] == 3  # few enough to count
    assert ids(await gql.data(ACCOUNTS, filter={"closed": True})) == [ada]

    later = datetime.now(UTC) + timedelta(minutes=1)
    assert ids(await gql.data(ACCOUNTS, filter={"updatedAfter": later.isoformat()})) == []
    window = {"updatedAfter": started.isoformat(), "updatedBefore": later.isoformat()}
    assert ids(await gql.data(ACCOUNTS, filter=window)) == [ada, alan, grace, pending]
    assert ids(await gql.data(ACCOUNTS, filter=window, order="ID")) == sorted(
        [ada, alan, grace, pending]
    )

    stats = (await gql.data(STATS))["accountStats"]
    assert stats["total"] == 4
    assert {s["status"]: s["count"] for s in stats["byStatus"]} == {
        "CLOSED": 1,
        "PENDING": 1,
        "SUSPENDED": 2,
    }


SUSPENDED_PAGE = """{ accounts(filter: {status: [SUSPENDED]}, orderBy: ID) {
  edges { node { id status } } totalCount } }"""


async def test_an_entity_written_out_of_the_filter_while_its_page_is_read_is_left_out(
    http: httpx.AsyncClient, cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page reads the index, then the snapshots: an account reactivated in between was
    shown ACTIVE on a page of SUSPENDED accounts, and counted (a probe paging while six
    accounts were suspended and reactivated saw 316 such rows in 25 s). It is left out now,
    and a page that is the whole list counts what it shows."""
    for n, status in enumerate(("SUSPENDED", "SUSPENDED", "ACTIVE")):
        await cache.put(account(f"a{n}", 1, status))
    read_index = EntityIndex.page

    async def written_meanwhile(index: EntityIndex, *args: Any, **kwargs: Any) -> Page:
        page = await read_index(index, *args, **kwargs)
        await cache.put(account("a1", 2, "ACTIVE"))  # reactivated
        return page

    monkeypatch.setattr(EntityIndex, "page", written_meanwhile)
    page = (await GraphQLClient(http).data(SUSPENDED_PAGE))["accounts"]
    assert [edge["node"] for edge in page["edges"]] == [{"id": "a0", "status": "SUSPENDED"}]
    assert page["totalCount"] == 1


FOUND = """query($text: String!) { accounts(filter: {text: $text}, orderBy: ID) {
  edges { node { id } } } }"""


async def test_text_is_found_whatever_case_and_unicode_form_either_is_typed_in(
    http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    """Names and searches were lowercased (`str.lower`): "STRASSE" missed "Straße", "ΣΊΣ"
    missed "Σίσυφος" (a final sigma), and a name typed decomposed (NFD) missed a search
    typed composed, and the other way round. Both are case folded in one form now."""
    names = {
        "straße": "Straße Müller",
        "sisyphos": "Σίσυφος",
        "jose-nfd": unicodedata.normalize("NFD", "José Ruiz"),
        "jose-nfc": "José Ruiz",
        "kebap": "İstanbul Kebap",
    }
    for entity_id, name in names.items():
        snapshot = account(entity_id, 1)
        assert snapshot.state is not None
        snapshot.state["owner_name"] = name
        await cache.put(snapshot)
    gql = GraphQLClient(http)

    async def found(text: str) -> list[str]:
        edges = (await gql.data(FOUND, text=text))["accounts"]["edges"]
        return [edge["node"]["id"] for edge in edges]

    assert await found("STRASSE") == ["straße"]
    assert await found("ΣΊΣ") == ["sisyphos"]
    assert await found("josé") == ["jose-nfc", "jose-nfd"]
    assert await found(unicodedata.normalize("NFD", "JOSÉ")) == ["jose-nfc", "jose-nfd"]
    assert await found("ist") == await found("İST") == ["kebap"]


async def test_cursors_stay_stable_while_entities_change(gql: GraphQLClient) -> None:
    accounts = [await open_named(gql, f"Owner {n}", f"o{n}@example.com") for n in range(5)]
    newest_first = list(reversed(accounts))

    await listed(gql, newest_first)
    first = await gql.data(ACCOUNTS, first=2)
    assert ids(first) == newest_first[:2]
    page_info = first["accounts"]["pageInfo"]
    assert page_info["hasNextPage"] and not page_info["hasPreviousPage"]
    assert first["accounts"]["totalCount"] == 5

    # An entity not yet seen changes (and moves to the front); one already seen changes
    # too. The next page goes on from where the first ended, repeating nothing.
    await gql.data(DEPOSIT, id=accounts[0], amount=5)
    await gql.data(DEPOSIT, id=newest_first[0], amount=5)
    second = await gql.data(ACCOUNTS, first=2, after=page_info["endCursor"])
    assert ids(second) == newest_first[2:4]
    third = await gql.data(ACCOUNTS, first=2, after=second["accounts"]["pageInfo"]["endCursor"])
    assert ids(third) == []  # accounts[0] moved before the cursor
    assert not third["accounts"]["pageInfo"]["hasNextPage"]

    # By id, every account once, across pages of one.
    seen: list[str] = []
    after = None
    while True:
        page = await gql.data(ACCOUNTS, first=1, after=after, order="ID")
        seen += ids(page)
        if not page["accounts"]["pageInfo"]["hasNextPage"]:
            break
        after = page["accounts"]["pageInfo"]["endCursor"]
    assert seen == sorted(accounts)


async def test_bad_arguments_are_refused_with_invalid_input(gql: GraphQLClient) -> None:
    body = await gql(ACCOUNTS, first=101)
    assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
    assert "first" in body["errors"][0]["message"]
    assert await gql.error_code(ACCOUNTS, first=-1) == "INVALID_INPUT"
    assert await gql.error_code(ACCOUNTS, after="not-a-cursor") == "INVALID_INPUT"
    cursor_by_id = "WyJJRCIsImEiXQ=="  # ["ID","a"]
    assert await gql.error_code(ACCOUNTS, after=cursor_by_id) == "INVALID_INPUT"
    # ["UPDATED_DESC","\ud800"]: a lone surrogate, which Redis is never asked for (INTERNAL)
    lone = base64.urlsafe_b64encode(b'["UPDATED_DESC","\\ud800"]').decode()
    assert await gql.error_code(ACCOUNTS, after=lone) == "INVALID_INPUT"
    assert await gql.error_code(ACCOUNTS, filter={"text": "x" * 201}) == "INVALID_INPUT"
    assert (await gql.data(ACCOUNTS, first=100))["accounts"]["totalCount"] == 0


CARTS = """query($filter: CartFilter) {
  carts(filter: $filter) { edges { node { id status accountId } } totalCount } }"""
CREATE_CART = """mutation($a: ID!) { createCart(accountId: $a, wait: true) { cartId } }"""
RESTOCK = """mutation($sku: String!, $n: Long!) {
  restock(sku: $sku, quantity: $n, name: "Teapot", wait: true) { sku } }"""
ITEMS = """query($filter: InventoryItemFilter) {
  inventoryItems(filter: $filter, orderBy: ID) { edges { node { sku available } } totalCount }
}"""


async def test_carts_by_account_and_status_and_items_running_low(gql: GraphQLClient) -> None:
    ada = await open_named(gql, "Ada", "ada@example.com")
    bob = await open_named(gql, "Bob", "bob@example.com")
    carts = {}
    for owner in (ada, ada, bob):
        data = await gql.data(CREATE_CART, a=owner)
        carts[data["createCart"]["cartId"]] = owner
    of_ada = await eventually(
        gql, CARTS, lambda data: data["carts"]["totalCount"] == 2, filter={"accountId": ada}
    )
    assert {e["node"]["id"] for e in of_ada["carts"]["edges"]} == {
        c for c, owner in carts.items() if owner == ada
    }
    assert of_ada["carts"]["totalCount"] == 2
    open_carts = await gql.data(CARTS, filter={"status": ["OPEN"], "accountId": bob})
    assert [e["node"]["accountId"] for e in open_carts["carts"]["edges"]] == [bob]
    assert open_carts["carts"]["totalCount"] == 1
    closed_of_ada = await gql.data(CARTS, filter={"accountId": ada, "closed": True})
    assert (closed_of_ada["carts"]["edges"], closed_of_ada["carts"]["totalCount"]) == ([], 0)
    assert (await gql.data(CARTS, filter={"status": ["CHECKED_OUT"]}))["carts"]["edges"] == []

    skus = sorted([new_id() for _ in range(3)])
    for sku, quantity in zip(skus, (2, 10, 4), strict=True):
        await gql.data(RESTOCK, sku=sku, n=quantity)
    low = await eventually(
        gql, ITEMS, lambda data: data["inventoryItems"]["totalCount"] == 2, filter={"lowStock": 5}
    )
    assert [(e["node"]["sku"], e["node"]["available"]) for e in low["inventoryItems"]["edges"]] == [
        (skus[0], 2),
        (skus[2], 4),
    ]
    assert low["inventoryItems"]["totalCount"] == 2
    stats = await gql.data("{ inventoryStats { total byStatus { status } } cartStats { total } }")
    assert stats == {"inventoryStats": {"total": 3, "byStatus": []}, "cartStats": {"total": 3}}


async def test_customers_list_only_their_own_and_services_by_scope(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "ops"))
    mine, theirs = new_id(), new_id()
    for account_id in (mine, theirs):
        await admin.data(OPEN, id=account_id, name="Someone", email="s@example.com")
    my_cart = (await admin.data(CREATE_CART, a=mine))["createCart"]["cartId"]
    await admin.data(CREATE_CART, a=theirs)

    customer = Caller(secured_http, token("customer", "ada", accounts=[mine]))
    assert ids(await customer.data(ACCOUNTS)) == [mine]
    assert ids(await customer.data(ACCOUNTS, filter={"text": "someone"})) == [mine]
    assert ids(await customer.data(CARTS), "carts") == [my_cart]
    assert ids(await customer.data(CARTS, filter={"accountId": mine}), "carts") == [my_cart]
    # Naming an account not its own, or asking for counts over everyone's, is refused.
    assert await customer.code(CARTS, filter={"accountId": theirs}) == "FORBIDDEN"
    assert await customer.code(STATS) == "FORBIDDEN"
    nobody = Caller(secured_http, token("customer", "eve", accounts=[]))
    assert ids(await nobody.data(ACCOUNTS)) == []

    assert set(ids(await admin.data(ACCOUNTS))) == {mine, theirs}
    reader = Caller(secured_http, token("service", "crm", scope="read:*"))
    assert set(ids(await reader.data(ACCOUNTS))) == {mine, theirs}
    assert (await reader.data(STATS))["accountStats"]["total"] == 2
    scoped = Caller(secured_http, token("service", "billing", scope="account:read"))
    assert set(ids(await scoped.data(ACCOUNTS))) == {mine, theirs}
    assert await scoped.code(CARTS) == "FORBIDDEN"
    depositor = Caller(secured_http, token("service", "pay", scope="account:deposit"))
    assert await depositor.code(ACCOUNTS) == "FORBIDDEN"


OPEN_CARTS = """query($after: String, $order: ListOrder! = UPDATED_DESC) {
  carts(filter: {status: [OPEN]}, first: 5, after: $after, orderBy: $order) {
    edges { cursor node { id accountId } } pageInfo { hasNextPage endCursor } totalCount } }"""


def indexed_cart(cart_id: str, account_id: str, at: datetime, status: str = "OPEN") -> Snapshot:
    """A cart's snapshot as its publish would write it, to fill the index the fast way."""
    state = {"account_id": account_id, "status": status, "lines": [], "last_activity_at": at}
    return Snapshot(entity_type="cart", entity_id=cart_id, revision=1, updated_at=at, state=state)


async def put_all(cache: SnapshotCache, snapshots: list[Snapshot]) -> None:
    """Write and index `snapshots`, 500 to a pipeline."""
    for start in range(0, len(snapshots), 500):
        await cache.put_many(snapshots[start : start + 500])


def _named(cursor: str) -> str:
    """The cart a cursor resumes after: what a client that decodes it learns."""
    _, key = json.loads(base64.urlsafe_b64decode(cursor))
    return str(key).rpartition(":")[2]


async def test_a_customer_s_cart_pages_and_cursors_name_no_one_else_s_carts(
    secured_http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    """A busy shop: more OPEN carts of others than a page scans, newer than the customer's
    own. Its pages, totals and cursors, and answers to cursors it made up, show its own
    carts alone (a cursor once named the last cart scanned, anyone's, and a made-up one
    walked everyone's)."""
    theirs, mine = new_id(), new_id()
    now = datetime.now(UTC)
    others = [
        indexed_cart(f"other-{i:05d}", theirs, now - timedelta(seconds=i)) for i in range(2_100)
    ]
    await put_all(cache, [*others, indexed_cart("my-cart", mine, now - timedelta(days=1))])
    customer = Caller(secured_http, token("customer", "ada", accounts=[mine]))

    for order in ("UPDATED_DESC", "ID"):
        page = (await customer.data(OPEN_CARTS, order=order))["carts"]
        assert [edge["node"]["id"] for edge in page["edges"]] == ["my-cart"]
        assert (page["totalCount"], page["pageInfo"]["hasNextPage"]) == (1, False)
        assert _named(page["pageInfo"]["endCursor"]) == "my-cart"
    made_up = base64.urlsafe_b64encode(json.dumps(["ID", "other-00042"]).encode()).decode()
    page = (await customer.data(OPEN_CARTS, order="ID", after=made_up))["carts"]
    assert page["edges"] == []
    end = page["pageInfo"]["endCursor"]
    assert end is None or _named(end) == "other-00042"  # what it sent, and nothing new


async def test_reindex_after_flushall_restores_listing_and_cache(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
) -> None:
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    async with run_worker(settings), api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        accounts = [await open_named(gql, f"Owner {n}", f"o{n}@x.org") for n in range(4)]
        await gql.data(CLOSE, id=accounts[0])
        await gql.data(DEPOSIT, id=accounts[1], amount=7)
        before = await gql.data(ACCOUNTS)
        assert set(ids(before)) == set(accounts)

        client = connect_redis(settings)
        try:
            await client.flushall()
            assert (await gql.data(ACCOUNTS))["accounts"]["edges"] == []
            cache = SnapshotCache(client, settings.redis_prefix)
            seen: list[tuple[int, int]] = []
            done = await reindex(
                temporal_client,
                cache,
                ["account"],
                where=f"TaskQueue = '{settings.task_queue}'",
                concurrency=4,
                progress=lambda n, total: seen.append((n, total)),
            )
            # The change stream went with the rest: each account announces what a consumer
            # may have missed, up to its revision, though none of them changes again.
            raw = await client.xrange(stream_key(settings.redis_prefix, "account"))
        finally:
            await client.aclose()
        assert done.found == done.written == len(accounts) and not done.failed
        assert seen[-1][0] == seen[-1][1] == done.found
        gaps = {
            decoded(f[b"id"]): (decoded(f[b"from"]), decoded(f[b"to"]))
            for _, f in raw
            if f[b"type"] == b"gap"
        }
        assert {account: gaps.get(account, ("", ""))[0] for account in accounts} == dict.fromkeys(
            accounts, "1"
        )
        assert gaps[accounts[1]][1] == "3"  # opened, verified, a deposit
        after = await gql.data(ACCOUNTS)
        assert after == before
        stats = (await gql.data(STATS))["accountStats"]
        assert {s["status"]: s["count"] for s in stats["byStatus"]} == {"CLOSED": 1, "ACTIVE": 3}


ROLLED_BACK = """query($text: String!) {
  accounts(filter: {status: [SUSPENDED], text: $text}) { edges { node { id } } totalCount } }"""


async def test_a_page_rendered_before_redis_rolled_back_is_not_replayed_after_it(
    gql: GraphQLClient, cache: SnapshotCache
) -> None:
    """Redis rolled back a moment (a crash with fsync every second, a failover to a replica
    behind): X's suspension, written and listed, is lost. Y is suspended then. The list of
    suspended accounts shows Y, where the API replayed the page rendered with X: the count
    of changes to suspended accounts had counted up to the lost change's number again."""
    name = f"Rolled {new_id()}"
    x, y = new_id(), new_id()
    at = datetime.now(UTC)

    def account(account_id: str, status: str, revision: int) -> Snapshot:
        state = {"status": status, "owner_name": name, "email": "r@example.com",
                 "currency": "EUR", "balance": 0, "last_activity_at": at.isoformat()}  # fmt: skip
        return Snapshot(
            entity_type="account",
            entity_id=account_id,
            revision=revision,
            updated_at=at,
            state=state,
            incarnation=1,
        )

    await put_all(cache, [account(x, "ACTIVE", 1), account(y, "ACTIVE", 1)])
    assert ids(await gql.data(ROLLED_BACK, text=name)) == []
    client = cache.client
    pattern = index_base(cache.prefix, "account") + "*"
    kept = [key async for key in client.scan_iter(match=pattern)]
    kept += [cache.key("account", x).encode(), cache.key("account", y).encode()]
    dumped = {key: await client.dump(key) for key in kept}
    await cache.put(account(x, "SUSPENDED", 2))
    assert ids(await gql.data(ROLLED_BACK, text=name)) == [x]
    # Redis as it was before X's suspension.
    for key in [key async for key in client.scan_iter(match=pattern)]:
        if key not in dumped:
            await client.delete(key)
    for key, value in dumped.items():
        await client.restore(key, 0, value, replace=True)
    await cache.put(account(y, "SUSPENDED", 2))
    assert ids(await gql.data(ROLLED_BACK, text=name)) == [y]


async def test_a_page_is_replayed_while_the_index_stands_and_made_anew_once_it_changes(
    gql: GraphQLClient, http: httpx.AsyncClient, cache: SnapshotCache
) -> None:
    replays: CachedReadResponses = http._transport.app.state.cached_reads  # type: ignore[attr-defined]
    ada = await open_named(gql, "Ada Lovelace", "ada@example.com")
    await listed(gql, [ada])
    first = await gql.data(ACCOUNTS)
    before = replays.replayed
    assert await gql.data(ACCOUNTS) == first
    assert replays.replayed == before + 1  # the answer was the first one's bytes
    # A change to any account is a new page.
    grace = await open_named(gql, "Grace Hopper", "grace@navy.mil")
    assert ids(await listed(gql, [grace, ada])) == [grace, ada]
    # So is an entity found stuck: the page must not go on saying it is fresh.
    await cache.mark_stuck("account", ada, "its workflow task keeps failing")
    stale = {
        e["node"]["id"]: e["node"]["stale"] for e in (await gql.data(STALE))["accounts"]["edges"]
    }
    assert stale == {grace: False, ada: True}
    await cache.clear_stuck("account", ada)
    stale = {
        e["node"]["id"]: e["node"]["stale"] for e in (await gql.data(STALE))["accounts"]["edges"]
    }
    assert stale == {grace: False, ada: False}


async def test_a_reindex_begun_before_the_workers_answer_asks_again_and_writes_every_entity(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
) -> None:
    """The runbook starts the workers, then reindexes: workers just started replay before
    they answer, so an entity not read in one round is asked again after a pause (the CLI
    exited 1 with entities unread). A sticky timeout of a second: the entities' own worker
    is gone, and a query waits that long before another worker may take it."""
    settings = settings.model_copy(update={"redis_url": own_redis.url, "sticky_timeout": 1.0})
    async with run_worker(settings), api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        accounts = [await open_named(gql, f"Owner {n}", f"o{n}@x.org") for n in range(3)]
    client = connect_redis(settings)
    try:
        await client.flushall()
        cache = SnapshotCache(client, settings.redis_prefix)
        reindexing = asyncio.create_task(
            reindex(
                temporal_client,
                cache,
                ["account"],
                where=f"TaskQueue = '{settings.task_queue}'",
                timeout=1.0,
                pause=3.0,
                # Headroom for a loaded machine: its worker once took past two rounds to
                # answer one of the three within the second.
                rounds=5,
            )
        )
        await asyncio.sleep(1.5)  # its first round has found no worker to answer
        async with run_worker(settings):
            done = await reindexing
        written = [await cache.get("account", a) for a in accounts]
    finally:
        await client.aclose()
    # Each was read; one the worker back had published itself meanwhile is not written
    # again (what Redis holds is as new).
    assert (done.found, done.failed) == (len(accounts), [])
    assert all(hit is not None for hit in written)


async def test_the_restore_runbook_leaves_lists_as_the_restored_entities_are(
    gql: GraphQLClient, cache: SnapshotCache, settings: Settings, temporal_client: Client
) -> None:
    """docs/operations.md, "Backup and restore": after the backup Ada was suspended and
    Carol opened; the restore takes both back. The runbook deleted the cache entries alone,
    and the index kept Carol: listed and counted for good, her row never shown. Deleting
    the index keys too, then `tenure reindex`, leaves the lists as Temporal has them."""
    ada = await open_named(gql, "Ada", "ada@x.org")
    bob = await open_named(gql, "Bob", "bob@x.org")
    await listed(gql, [bob, ada])
    hit = await cache.get("account", ada)
    assert hit is not None and hit.snapshot.state is not None
    after_the_backup = {"updated_at": datetime.now(UTC), "revision": hit.snapshot.revision + 1}
    suspended = {**hit.snapshot.state, "status": "SUSPENDED"}
    assert await cache.put(hit.snapshot.model_copy(update={**after_the_backup, "state": suspended}))
    carol = hit.snapshot.model_copy(
        update={**after_the_backup, "entity_id": f"carol-{new_id()[:6]}", "state": suspended}
    )
    assert await cache.put(carol)

    for pattern in ("entity:*", "index:*"):  # the runbook's two redis-cli deletes
        async for key in cache.client.scan_iter(match=f"{settings.redis_prefix}{pattern}"):
            await cache.client.unlink(key)
    await reindex(temporal_client, cache, ["account"], where=f"TaskQueue = '{settings.task_queue}'")
    everyone = (await gql.data(ACCOUNTS))["accounts"]
    assert sorted(ids({"accounts": everyone})) == sorted([ada, bob])
    assert everyone["totalCount"] == 2
    held = (await gql.data(ACCOUNTS, filter={"status": ["SUSPENDED"]}))["accounts"]
    assert (ids({"accounts": held}), held["totalCount"]) == ([], 0)
    assert (await gql.data(STATS))["accountStats"]["total"] == 2


async def test_a_reindex_goes_on_past_an_entity_that_fails_in_a_way_of_its_own(
    gql: GraphQLClient,
    cache: SnapshotCache,
    settings: Settings,
    temporal_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One entity whose snapshot query its own code fails (not Temporal's failure) is
    reported unread, and the rest are written: it ended the whole rebuild with a traceback,
    no summary and the other entities unwritten."""
    accounts = [await open_named(gql, f"Owner {n}", f"o{n}@x.org") for n in range(3)]
    failing = accounts[1]
    read = workers.reindex.snapshot_of

    async def fails_for_one(
        client: Client, entity_type: str, entity_id: str, timeout: float
    ) -> Snapshot | None:
        if entity_id == failing:
            raise WorkflowQueryFailedError("the entity's snapshot query failed")
        return await read(client, entity_type, entity_id, timeout)

    monkeypatch.setattr(workers.reindex, "snapshot_of", fails_for_one)
    for opened in accounts:
        await cache.client.delete(cache.key("account", opened))
    done = await reindex(
        temporal_client, cache, ["account"], where=f"TaskQueue = '{settings.task_queue}'", pause=0
    )
    assert done.failed == [f"account:{failing}"]
    written = {a: await cache.get("account", a) for a in accounts}
    assert [a for a, hit in written.items() if hit is not None] == [accounts[0], accounts[2]]
