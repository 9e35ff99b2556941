"""CACHED reads answered from rendered responses: the same bytes as executing GraphQL, and
never a response older than what the cache holds."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.worker import Worker

from api import cached_reads
from api import limits as limits_module
from api.cached_reads import CachedReadResponses
from api.read_plans import plan_reads
from api.schema import schema
from deploy.embedded import EmbeddedRedis
from tests.api.test_access import CREATE_CART, OPEN, SECRET, VERIFY, Caller, token
from tests.api.test_accounts_api import DEPOSIT, READ, open_active
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.entities.shop import until_cached
from workers.cache import SnapshotCache
from workers.settings import Settings

PLAIN_READ = "query($id: ID!) { account(id: $id) { balance revision source stale } }"


def plan(query: str, operation_name: str | None = None) -> list[tuple[str, str]] | None:
    found = plan_reads(schema._schema, query, operation_name)
    return found.entities({"id": "a1", "sku": "s1"}) if found else None


def test_documents_made_only_of_cached_entity_reads_are_planned() -> None:
    assert plan(PLAIN_READ) == [("account", "a1")]
    assert plan('{ account(id: "x", consistency: CACHED) { balance } }') == [("account", "x")]
    assert plan(
        "query($id: ID!, $sku: String!) { a: account(id: $id) { balance } "
        'b: account(id: "b2") { revision } inventoryItem(sku: $sku) { onHand } }'
    ) == [("account", "a1"), ("account", "b2"), ("inventory", "s1")]
    assert plan(READ) == [("account", "a1")]  # a variable defaulting to CACHED
    two = 'query A { account(id: "1") { balance } } query B { cart(id: "2") { status } }'
    assert plan(two, "B") == [("cart", "2")]


@pytest.mark.parametrize(
    "query",
    [
        '{ account(id: "x", consistency: LIVE) { balance } }',
        'query($c: Consistency = LIVE) { account(id: "x", consistency: $c) { balance } }',
        'mutation { depositToAccount(id: "x", amount: 1) { status } }',
        '{ account(id: "x") { balance } checkout(id: "c") { status } }',
        '{ ... on Query { account(id: "x") { balance } } }',
        '{ account(id: "x") @include(if: true) { balance } }',
        '{ account(id: "x") { noSuchField } }',
        "{ account(id: ",
        'query A { account(id: "1") { balance } } query B { cart(id: "2") { status } }',
    ],
)
def test_anything_else_is_left_to_graphql(query: str) -> None:
    assert plan(query) is None


async def read(http: httpx.AsyncClient, query: str, **variables: Any) -> httpx.Response:
    response = await http.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code == 200
    return response


def replays_of(http: httpx.AsyncClient) -> CachedReadResponses:
    replays: CachedReadResponses = http._transport.app.state.cached_reads  # type: ignore[attr-defined]
    return replays


async def test_a_repeated_read_replays_the_bytes_graphql_would_answer(
    settings: Settings,
    temporal_client: Client,
    cache: SnapshotCache,
    gql: GraphQLClient,
    http: httpx.AsyncClient,
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    await until_cached(cache, "account", account_id, 2)
    replays = replays_of(http)

    first = await read(http, READ, id=account_id)
    second = await read(http, READ, id=account_id)
    assert replays.replayed == 1
    assert second.content == first.content
    # The same headers, but for each request's own id.
    first_id, second_id = first.headers.pop("x-request-id"), second.headers.pop("x-request-id")
    assert second.headers == first.headers and second_id != first_id
    # Asked for another form of response, the same document is executed again.
    other = await http.post(
        "/graphql",
        json={"query": READ, "variables": {"id": account_id}},
        headers={"accept": "application/graphql-response+json"},
    )
    assert other.status_code == 200 and other.json() == first.json()
    assert replays.replayed == 1
    async with api_client(
        settings.model_copy(update={"rendered_reads": 0}), temporal_client
    ) as plain:
        executed = await read(plain, READ, id=account_id)
        assert executed.headers.pop("x-request-id") not in (first_id, second_id)
        assert (executed.content, executed.headers) == (first.content, first.headers)
        assert replays_of(plain).replayed == 0


async def test_a_read_after_a_change_shows_the_change(
    cache: SnapshotCache, gql: GraphQLClient, http: httpx.AsyncClient
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    await until_cached(cache, "account", account_id, 2)
    for amount in (1, 2, 3):
        await read(http, PLAIN_READ, id=account_id)
        await gql.data(DEPOSIT, id=account_id, amount=amount, wait=False)
        await until_cached(cache, "account", account_id, 2 + amount)
        account = (await gql.data(PLAIN_READ, id=account_id))["account"]
        assert account["balance"] == amount * (amount + 1) // 2
        assert (account["revision"], account["source"]) == (2 + amount, "CACHE")
    # Each round's first read replayed the previous round's last: replays were in play.
    assert replays_of(http).replayed == 2


async def test_reads_that_are_not_cache_hits_are_never_replayed(
    cache: SnapshotCache, gql: GraphQLClient, http: httpx.AsyncClient, worker: Worker
) -> None:
    replays = replays_of(http)
    missing = new_id()
    for _ in range(2):
        assert (await gql.data(PLAIN_READ, id=missing))["account"] is None
        assert await gql.error_code(PLAIN_READ, id="not an id!") == "INVALID_INPUT"
    account_id = new_id()
    await open_active(gql, account_id)
    await until_cached(cache, "account", account_id, 2)
    for _ in range(2):
        live = (await gql.data(READ, id=account_id, consistency="LIVE"))["account"]
        assert live["source"] == "LIVE"
    assert replays.replayed == 0


async def test_with_redis_down_a_cached_read_is_served_live(
    temporal_client: Client,
    own_redis_settings: Settings,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
) -> None:
    settings = own_redis_settings
    account_id = new_id()
    async with run_worker(settings), api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        await open_active(gql, account_id)
        for _ in range(2):
            await read(http, PLAIN_READ, id=account_id)
        own_redis.stop()
        for _ in range(2):
            account = (await gql.data(PLAIN_READ, id=account_id))["account"]
            assert (account["revision"], account["source"], account["stale"]) == (2, "LIVE", False)


async def test_the_kept_responses_weigh_no_more_than_their_bound(
    cache: SnapshotCache,
    gql: GraphQLClient,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    await until_cached(cache, "account", account_id, 2)
    replays = replays_of(http)
    first = await read(http, READ, id=account_id)
    monkeypatch.setattr(cached_reads, "MAX_RENDERED_BYTES", len(first.content) + 10)
    # Bodies that differ by whitespace are other entries: each pushes the last one out.
    for spaces in range(1, 4):
        await read(http, READ + " " * spaces, id=account_id)
    assert replays._rendered_bytes <= len(first.content) + 10
    assert len(replays._rendered) == 1
    await read(http, READ, id=account_id)  # pushed out: executed again, not replayed
    assert replays.replayed == 0


async def test_a_read_planned_for_replay_is_parsed_once(
    cache: SnapshotCache, gql: GraphQLClient, http: httpx.AsyncClient, monkeypatch: Any
) -> None:
    # Documents seen once each (a fresh comment, as an attacker sends them): the planner
    # parses and validates one, and Strawberry takes it as it is.
    parsed: list[str] = []
    real = limits_module.parse

    def counted(source: str, **options: Any) -> Any:
        parsed.append(source)
        return real(source, **options)

    monkeypatch.setattr(limits_module, "parse", counted)
    account_id = new_id()
    await open_active(gql, account_id)
    await until_cached(cache, "account", account_id, 2)
    parsed.clear()
    for n in range(3):
        query = f"# {new_id()}\n{PLAIN_READ}"
        response = await http.post(
            "/graphql", json={"query": query, "variables": {"id": account_id}}
        )
        assert response.json()["data"]["account"]["revision"] == 2
        assert parsed.count(query) == 1, n


async def test_a_customer_reading_one_cart_thrice_costs_one_batched_cache_read(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    cache: SnapshotCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never replayed to a customer (the policy looks at the cart's account), the read still
    takes its carts from one look at the cache, for the policy and the resolvers alike."""
    secured = settings.model_copy(
        update={"environment": "production", "auth_secret": SECRET, "rate_limits": {}}
    )
    account, cart, other = new_id(), new_id(), new_id()
    query = (
        "query($id: ID!, $other: ID!) { a: cart(id: $id) { status } "
        "b: cart(id: $id) { accountId } c: cart(id: $id) { status } d: cart(id: $other) "
        "{ status } }"
    )
    async with run_worker(secured), api_client(secured, temporal_client) as http:
        admin = Caller(http, token("admin", "ops"))
        await admin.data(OPEN, id=account)
        await admin.data(VERIFY, id=account)
        for owner, cart_id in ((account, cart), (account, other)):
            await admin.data(CREATE_CART, id=cart_id, account=owner)
            await until_cached(cache, "cart", cart_id, 1)
        gateway_cache: SnapshotCache = http._transport.app.state.gateway.cache  # type: ignore[attr-defined]
        looks: list[str] = []
        for name in ("get", "get_raw"):
            method = getattr(gateway_cache, name)

            async def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
                looks.append(_name)
                return await _method(*args)

            monkeypatch.setattr(gateway_cache, name, counted)
        ada = Caller(http, token("customer", new_id(), [account]))
        answer = await ada.post(query, id=cart, other=other)
        assert looks == ["get_raw", "get_raw"]
        stranger = Caller(http, token("customer", new_id(), [new_id()]))
        refused = await stranger.post(query, id=cart, other=other)
        missing = await stranger.post(query, id=new_id(), other=new_id())

        # Carts the cache has lost are read from their workflows once each: the policy's
        # read puts each back in the cache, where the resolver finds it. Three of them stay
        # within the 5 reads a request may ask of workflows.
        carts = [cart, other, new_id()]
        await admin.data(CREATE_CART, id=carts[2], account=account)
        for lost in carts:
            await cache.client.delete(cache.key("cart", lost))
        lost_query = (
            "query($a: ID!, $b: ID!, $c: ID!) { a: cart(id: $a) { status } "
            "b: cart(id: $b) { status } c: cart(id: $c) { status } }"
        )
        relearned = await ada.post(lost_query, a=carts[0], b=carts[1], c=carts[2])

    data = answer.json()["data"]
    assert data["a"] == data["c"] == data["d"] == {"status": "OPEN"}
    assert data["b"] == {"accountId": account}
    # Two carts: two looks, in one batch before execution; none by the policy or resolvers.
    assert looks[:2] == ["get_raw", "get_raw"]
    # Another customer learns nothing, not even which of the carts exist.
    for body in (refused.json(), missing.json()):
        assert body["data"] == {"a": None, "b": None, "c": None, "d": None}
        assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"] * 4
    assert [e["message"] for e in refused.json()["errors"]] == [
        e["message"] for e in missing.json()["errors"]
    ]
    assert "errors" not in relearned.json(), relearned.json()
    assert list(relearned.json()["data"].values()) == [{"status": "OPEN"}] * 3
