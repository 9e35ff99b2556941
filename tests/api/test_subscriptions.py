"""Live subscriptions: a thousand subscribers of one hot account all reach its last
revision, one that reconnects with `sinceRevision` misses nothing it would notice, and over
a real graphql-transport-ws connection a customer follows only its own account."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from temporalio.client import Client
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api.app import create_app
from api.auth import DEVELOPMENT_PRINCIPAL
from api.change_feed import OFFERS_BETWEEN_TURNS, Change, ChangeFeed, Mailbox, SubscriberGone
from api.change_feed import Change as FeedChange
from api.context import TenureContext
from api.errors import INTERNAL_MESSAGE
from api.gateway import EntityGateway
from api.schema import build_schema
from api.subscriptions import MAX_REMEMBERED, ChangeFilter, _Follower, _scoped
from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import Snapshot
from entities.runtime.policy import Principal, Role
from tests.api.test_access import ADD as ADD_ITEM
from tests.api.test_access import CHECKOUT, CREATE_CART, RESTOCK, token
from tests.api.test_accounts_api import CLOSE, DEPOSIT, OPEN, VERIFY, WITHDRAW
from tests.conftest import (
    GraphQLClient,
    WorkerFactory,
    new_id,
    reopen_account,
    serving,
    start_over,
)
from tests.entities.shop import eventually
from workers.cache import SnapshotCache, connect_redis
from workers.changes import stream_key
from workers.settings import Settings

FOLLOW = """subscription($id: ID!, $since: Int) {
  accountChanged(id: $id, sinceRevision: $since) {
    entityId revision previousRevision missedRevisions command sentBy at
    node { balance status }
  }
}"""


@contextlib.asynccontextmanager
async def running_app(settings: Settings, client: Client) -> AsyncIterator[Starlette]:
    app = create_app(settings, temporal_client=client)
    async with app.router.lifespan_context(app):
        yield app


def http_of(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tenure")


class InProcess:
    """Subscribers inside the API process, through the app's own feed and the schema."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        self.app = app
        self.schema = build_schema(settings)

    def _context(self) -> TenureContext:
        request = Request({"type": "http", "app": self.app, "headers": [], "method": "POST"})
        return TenureContext(
            request=request,
            response=None,
            gateway=self.app.state.gateway,
            authorizer=self.app.state.authorizer,
            principal=DEVELOPMENT_PRINCIPAL,
        )

    async def refusal(self, query: str, **variables: Any) -> str:
        """The code a subscription is refused with."""
        results: Any = await self.schema.subscribe(
            query, variable_values=variables, context_value=self._context()
        )
        if hasattr(results, "__anext__"):
            first = await anext(results)
            await results.aclose()
            results = first
        refused = results.errors[0].original_error
        assert isinstance(refused, TenureError), results.errors
        return refused.code.value

    async def follow(self, query: str, **variables: Any) -> AsyncIterator[dict[str, Any]]:
        results = await self.schema.subscribe(
            query, variable_values=variables, context_value=self._context()
        )
        assert hasattr(results, "__aiter__"), results  # not an ExecutionResult: no errors
        async for result in results:  # type: ignore[union-attr]
            assert not result.errors, result.errors
            yield result.data["accountChanged"]


async def open_account(gql: GraphQLClient) -> str:
    account_id = new_id()
    await gql.data(OPEN, id=account_id)
    await gql.data(VERIFY, id=account_id)
    return account_id


async def deposits(gql: GraphQLClient, account_id: str, count: int) -> None:
    for _ in range(count):
        await gql.data(DEPOSIT, id=account_id, amount=1, wait=False)


async def until(
    changes: AsyncIterator[dict[str, Any]], revision: int, seen: list[dict[str, Any]]
) -> None:
    """Follow `changes` into `seen` up to `revision`, then unsubscribe."""
    try:
        async with asyncio.timeout(60):
            async for change in changes:
                seen.append(change)
                if change["revision"] >= revision:
                    return
    finally:
        await changes.aclose()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def all_ended(tasks: list[asyncio.Task[None]]) -> AsyncIterator[None]:
    """Every task done on the way out, a failure's too: none is left running into the next
    test, or collected unfinished during it."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def waiting_at(error: BaseException | None) -> str:
    """Where a follower given up by its timeout was waiting: the innermost frames of the
    cancellation the timeout raised, one line each."""
    cancelled = error.__cause__ if isinstance(error, TimeoutError) else error
    if cancelled is None:
        return "?"
    frames = traceback.extract_tb(cancelled.__traceback__)[-6:]
    return " <- ".join(
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames)
    )


async def first_of(seen: list[dict[str, Any]]) -> None:
    async with asyncio.timeout(30):
        while not seen:
            await asyncio.sleep(0.02)


def never_backwards(seen: list[dict[str, Any]]) -> None:
    revisions = [change["revision"] for change in seen]
    assert revisions == sorted(set(revisions)), revisions
    for before, after in itertools.pairwise(seen):
        assert after["previousRevision"] == before["revision"]
        jumped = after["revision"] > before["revision"] + 1
        assert after["missedRevisions"] == jumped  # a gap is never silent


async def test_a_thousand_subscribers_all_end_on_the_hot_accounts_last_revision(
    settings: Settings, temporal_client: Client, worker: Any
) -> None:
    async with running_app(settings, temporal_client) as app, http_of(app) as http:
        gql = GraphQLClient(http)
        account_id = await open_account(gql)
        inside = InProcess(app, settings)
        seen: list[list[dict[str, Any]]] = [[] for _ in range(1000)]
        last = 2 + 50
        followers = [
            asyncio.create_task(until(inside.follow(FOLLOW, id=account_id), last, mine))
            for mine in seen
        ]
        async with all_ended(followers):
            async with asyncio.timeout(120):  # every one has its first state: it follows
                while app.state.change_feed.subscribers < 1000 or not all(seen):
                    failed = [
                        (not mine, f)
                        for f, mine in zip(followers, seen, strict=True)
                        if f.done() and f.exception() is not None
                    ]
                    if failed:
                        # One that never had its first state says most.
                        error = max(failed, key=lambda pair: pair[0])[1].exception()
                        raise AssertionError(
                            f"{len(failed)} followers failed, "
                            f"{sum(not mine for mine in seen)} without a first state; "
                            f"one was waiting at {waiting_at(error)}"
                        ) from error
                    await asyncio.sleep(0.05)
            await deposits(gql, account_id, 50)
            await asyncio.wait_for(asyncio.gather(*followers), timeout=120)
    for mine in seen:
        assert mine[0]["revision"] == 2 and mine[0]["command"] is None  # its state at once
        assert mine[-1]["revision"] == last
        assert mine[-1]["node"]["balance"] == 50
        never_backwards(mine)
    assert any(len(mine) > 10 for mine in seen)  # not only the first and the last


async def test_a_subscriber_that_reconnects_with_since_revision_misses_nothing_it_would_notice(
    settings: Settings, temporal_client: Client, worker: Any
) -> None:
    async with running_app(settings, temporal_client) as app, http_of(app) as http:
        gql = GraphQLClient(http)
        account_id = await open_account(gql)
        inside = InProcess(app, settings)
        first: list[dict[str, Any]] = []
        following = asyncio.create_task(until(inside.follow(FOLLOW, id=account_id), 12, first))
        await first_of(first)
        await deposits(gql, account_id, 10)
        await asyncio.wait_for(following, timeout=30)  # gone at revision 12
        await deposits(gql, account_id, 10)  # revisions 13..22, while it is away
        await asyncio.sleep(0.5)
        again = inside.follow(FOLLOW, id=account_id, since=first[-1]["revision"])
        second: list[dict[str, Any]] = []
        catching_up = asyncio.create_task(until(again, 32, second))
        await first_of(second)
        await deposits(gql, account_id, 10)
        await asyncio.wait_for(catching_up, timeout=30)
        # Nothing new since: a reconnection gets no state it already has, only what comes.
        quiet: list[dict[str, Any]] = []
        unchanged = asyncio.create_task(
            until(inside.follow(FOLLOW, id=account_id, since=32), 33, quiet)
        )
        await asyncio.sleep(0.5)
        assert quiet == []
        await deposits(gql, account_id, 1)
        await asyncio.wait_for(unchanged, timeout=30)
    assert second[0]["revision"] == 22 and second[0]["missedRevisions"]  # at once, from the cache
    assert second[0]["previousRevision"] is None and second[0]["command"] is None
    assert second[-1]["revision"] == 32 and second[-1]["node"]["balance"] == 30
    never_backwards(second[1:])
    assert [change["revision"] for change in quiet] == [33]
    assert quiet[0]["command"] == "deposit" and not quiet[0]["missedRevisions"]


CACHED_REVISION = """query($id: ID!) { account(id: $id, consistency: CACHED) { revision } }"""
RESUME = """subscription($id: ID!, $since: Int, $life: String) {
  accountChanged(id: $id, sinceRevision: $since, sinceIncarnation: $life) {
    entityId revision incarnation previousRevision missedRevisions command
    node { balance status }
  }
}"""


async def at_once(follow: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a subscription sends within a second of subscribing, then unsubscribed."""
    shown: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            async for change in follow:
                shown.append(change)
    await follow.aclose()  # type: ignore[attr-defined]
    return shown


async def test_a_subscriber_resuming_on_an_id_used_again_is_shown_its_new_life(
    settings: Settings, temporal_client: Client, worker: Any
) -> None:
    """An account followed to its close at revision 5, its id then used again (a new
    account, revisions from 1): a subscriber resuming with `sinceRevision: 5` is sent the new
    account at once, as a jump, where it was sent nothing until the new account passed
    revision 5, and then that as if it followed the old one. With the `incarnation` it was
    shown, given back, the new life is told apart at any revision."""
    async with running_app(settings, temporal_client) as app, http_of(app) as http:
        gql = GraphQLClient(http)
        inside = InProcess(app, settings)
        account_id = await open_account(gql)
        old: list[dict[str, Any]] = []
        following = asyncio.create_task(until(inside.follow(RESUME, id=account_id), 5, old))
        await first_of(old)
        await gql.data(DEPOSIT, id=account_id, amount=70)
        await gql.data(WITHDRAW, id=account_id, amount=70)
        await gql.data(CLOSE, id=account_id)
        await asyncio.wait_for(following, 30)
        assert (old[-1]["revision"], old[-1]["node"]["status"]) == (5, "CLOSED")
        old_life = old[-1]["incarnation"]

        await reopen_account(temporal_client, settings, account_id)
        await gql.data(VERIFY, id=account_id)
        await eventually(
            lambda: gql.data(CACHED_REVISION, id=account_id),
            lambda d: d["account"]["revision"] == 2,
        )

        behind = await at_once(inside.follow(RESUME, id=account_id, since=5))
        named_old = await at_once(inside.follow(RESUME, id=account_id, since=2, life=old_life))
        new_life = named_old[0]["incarnation"] if named_old else None
        named_new = await at_once(inside.follow(RESUME, id=account_id, since=2, life=new_life))
        refused = await inside.refusal(RESUME, id=account_id, since=2, life="12x")

    for shown in (behind, named_old):
        assert [(c["revision"], c["node"]["status"]) for c in shown] == [(2, "ACTIVE")]
        assert shown[0]["missedRevisions"] and shown[0]["previousRevision"] is None
    assert new_life != old_life
    assert named_new == []  # the same life, nothing newer
    assert refused == "INVALID_INPUT"


@contextlib.asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[str]:
    """The app behind a real uvicorn on a free port: its ws:// address."""
    async with serving(app) as url:
        yield url.replace("http://", "ws://", 1) + "/graphql"


async def received(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout=15))
    return message


async def answer(ws: ClientConnection, op: str) -> dict[str, Any]:
    """The next `next` or `error` message of operation `op`: its payload."""
    while True:
        message = await received(ws)
        if message.get("id") == op and message["type"] in ("next", "error"):
            payload = message["payload"]
            return {"errors": payload} if isinstance(payload, list) else payload


def code(payload: dict[str, Any]) -> str:
    found: str = payload["errors"][0]["extensions"]["code"]
    return found


async def test_over_graphql_transport_ws_a_customer_follows_only_its_own_account(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with run_worker(secured), running_app(secured, temporal_client) as app:
        admin = {"Authorization": f"Bearer {token('admin', 'ops-1')}"}
        async with http_of(app) as http:
            http.headers.update(admin)
            gql = GraphQLClient(http)
            mine, theirs = await open_account(gql), await open_account(gql)
            async with served(app) as url:
                customer = token("customer", "ada", [mine])
                async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                    init = {"Authorization": f"Bearer {customer}"}
                    await ws.send(json.dumps({"type": "connection_init", "payload": init}))
                    assert (await received(ws))["type"] == "connection_ack"

                    async def subscribe(op: str, **variables: Any) -> None:
                        payload = {"query": FOLLOW, "variables": variables}
                        await ws.send(
                            json.dumps({"id": op, "type": "subscribe", "payload": payload})
                        )

                    await subscribe("theirs", id=theirs)
                    assert code(await answer(ws, "theirs")) == "FORBIDDEN"
                    await subscribe("bad", id="not an id!")
                    assert code(await answer(ws, "bad")) == "INVALID_INPUT"
                    await subscribe("negative", id=mine, since=-1)
                    assert code(await answer(ws, "negative")) == "INVALID_INPUT"
                    await subscribe("unknown", id=mine, since="yesterday")
                    assert code(await answer(ws, "unknown")) == "INVALID_INPUT"

                    await subscribe("mine", id=mine)
                    now = await answer(ws, "mine")
                    assert now["data"]["accountChanged"]["revision"] == 2
                    await gql.data(DEPOSIT, id=mine, amount=7)
                    shown = (await answer(ws, "mine"))["data"]["accountChanged"]
                    assert shown["revision"] == 3 and shown["node"]["balance"] == 7
                    # An operator's name is not the customer's to see (as in its history).
                    assert shown["command"] == "deposit" and shown["sentBy"] == "admin"
                    await ws.send(json.dumps({"id": "mine", "type": "complete"}))

                # A bad token is refused at connection_init.
                async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                    bearer = {"Authorization": "Bearer nonsense"}
                    await ws.send(json.dumps({"type": "connection_init", "payload": bearer}))
                    with pytest.raises(ConnectionClosed) as closed:
                        await received(ws)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


CART_FOLLOW = """subscription($id: ID!) { cartChanged(id: $id) { revision
  node { accountId status lines { sku } } } }"""


async def test_a_customer_following_a_cart_is_ended_when_its_id_is_another_account_s(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A customer's cartChanged was authorized once, when it began: the cart checked out
    and its id used again (after retention) for another account's cart, the subscription
    went on sending that cart, its account and lines, to the first customer. It now ends,
    FORBIDDEN, at the first state that is not the customer's."""
    async with (
        run_worker(secured),
        running_app(secured, temporal_client) as app,
        http_of(app) as http,
    ):
        http.headers.update({"Authorization": f"Bearer {token('admin', 'ops-1')}"})
        gql = GraphQLClient(http)
        ada, bob = await open_account(gql), await open_account(gql)
        await gql.data(DEPOSIT, id=ada, amount=100)
        sku, cart = new_id(), new_id()
        await gql.data(RESTOCK, sku=sku)
        await gql.data(CREATE_CART, id=cart, account=ada)
        await gql.data(ADD_ITEM, id=cart, sku=sku)
        async with served(app) as url, acknowledged(url, token("customer", "ada", [ada])) as ws:
            await subscribe(ws, "cart", CART_FOLLOW, id=cart)
            assert (await answer(ws, "cart"))["data"]["cartChanged"]["node"]["accountId"] == ada
            await gql.data(CHECKOUT, id=cart)
            while True:
                node = (await answer(ws, "cart"))["data"]["cartChanged"]["node"]
                if node["status"] == "CHECKED_OUT":
                    break
            await start_over(
                temporal_client, secured, "cart", cart, "createCart", {"account_id": bob}
            )
            await gql.data(ADD_ITEM, id=cart, sku="bobs-sku")
            ended = await answer(ws, "cart")
            assert code(ended) == "FORBIDDEN", ended
            assert ended.get("data") is None


@contextlib.asynccontextmanager
async def acknowledged(url: str, bearer: str) -> AsyncIterator[ClientConnection]:
    """A graphql-transport-ws connection, initialised with `bearer` and acknowledged."""
    async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        init = {"Authorization": f"Bearer {bearer}"}
        await ws.send(json.dumps({"type": "connection_init", "payload": init}))
        assert (await received(ws))["type"] == "connection_ack"
        yield ws


async def subscribe(ws: ClientConnection, op: str, query: str, **variables: Any) -> None:
    payload = {"query": query, "variables": variables}
    await ws.send(json.dumps({"id": op, "type": "subscribe", "payload": payload}))


async def test_over_graphql_transport_ws_a_malformed_message_closes_the_socket_4400(
    secured: Settings, temporal_client: Client
) -> None:
    """What is no graphql-transport-ws message, not JSON, JSON the API refuses to read, or a
    message of the wrong shape, closes the socket with the protocol's 4400, not a dropped
    connection (1006) the client cannot tell from a network failure."""
    typename = {"query": "{ __typename }"}
    frames = [
        "{x",
        '"x"',  # JSON, but no object
        "[" * 100_000 + "]" * 100_000,  # nested past the stack
        "[1]",
        json.dumps({"type": "subscribe", "id": "1", "payload": "x"}),
        json.dumps({"type": "subscribe", "id": "1", "payload": {"query": 5}}),
        json.dumps({"type": "subscribe", "id": "1", "payload": {**typename, "variables": "x"}}),
        json.dumps({"type": "subscribe", "id": 1, "payload": typename}),
        json.dumps({"type": "complete", "id": {}}),
    ]
    async with running_app(secured, temporal_client) as app, served(app) as url:
        for frame in frames:
            async with acknowledged(url, token("admin", "ops-1")) as ws:
                await ws.send(frame)
                with pytest.raises(ConnectionClosed) as closed:
                    await received(ws)
            assert closed.value.rcvd is not None, frame[:40]  # a close frame was sent
            assert closed.value.rcvd.code == 4400, frame[:40]


async def test_over_graphql_transport_ws_a_refused_document_is_an_error_with_its_code(
    secured: Settings, temporal_client: Client
) -> None:
    """A document that does not parse or breaks a document limit is answered with an error
    for its operation, coded as over HTTP, and the socket serves on."""
    deep = "subscription " + "{ a " * 12 + "}" * 12
    aliased = (
        'subscription { accountChanged(id: "x") { node { '
        + " ".join(f"b{n}: balance" for n in range(16))
        + " } } }"
    )
    refused = {"{": "INVALID_INPUT", deep: "QUERY_TOO_DEEP", aliased: "TOO_MANY_ALIASES"}
    admin = token("admin", "ops-1")
    async with running_app(secured, temporal_client) as app, served(app) as url:
        async with http_of(app) as http:
            http.headers["Authorization"] = f"Bearer {admin}"
            over_http = [
                code((await http.post("/graphql", json={"query": q})).json()) for q in refused
            ]
        assert over_http == list(refused.values())
        async with acknowledged(url, admin) as ws:
            for n, (query, expected) in enumerate(refused.items()):
                await subscribe(ws, f"op-{n}", query)
                message = await received(ws)
                assert (message["id"], message["type"]) == (f"op-{n}", "error"), message
                assert code({"errors": message["payload"]}) == expected
            await subscribe(ws, "after", "{ __typename }")
            assert (await answer(ws, "after"))["data"] == {"__typename": "Query"}


async def test_over_graphql_transport_ws_the_subscription_limit_has_its_code(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    two = secured.model_copy(update={"max_subscriptions_per_connection": 2})
    async with run_worker(two), running_app(two, temporal_client) as app:
        admin = token("admin", "ops-1")
        async with http_of(app) as http:
            http.headers["Authorization"] = f"Bearer {admin}"
            account_id = await open_account(GraphQLClient(http))
        async with served(app) as url, acknowledged(url, admin) as ws:
            for op in ("first", "second"):
                await subscribe(ws, op, FOLLOW, id=account_id)
                assert "errors" not in await answer(ws, op)
            await subscribe(ws, "third", FOLLOW, id=account_id)
            over = await answer(ws, "third")
            assert code(over) == "LIMIT_REACHED"
            assert "2" in over["errors"][0]["message"]
            await ws.send(json.dumps({"id": "first", "type": "complete"}))
            await subscribe(ws, "again", FOLLOW, id=account_id)
            assert (await answer(ws, "again"))["data"]["accountChanged"]["revision"] == 2


async def test_a_subscription_that_fails_inside_is_internal_and_logged_not_the_client_s(
    secured: Settings,
    temporal_client: Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error raised while a subscription runs (its first read, a query Temporal failed)
    has no path, and was taken for the request's: INVALID_INPUT, with Temporal's own words,
    and nothing logged. It is INTERNAL, said as any internal error is, and logged."""

    async def failing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the query failed: Temporal's own words")

    monkeypatch.setattr(EntityGateway, "read", failing)
    async with (
        running_app(secured, temporal_client) as app,
        served(app) as url,
        acknowledged(url, token("admin", "ops-1")) as ws,
    ):
        await subscribe(ws, "op", FOLLOW, id="acct-anything")
        failed = await answer(ws, "op")
    assert code(failed) == "INTERNAL"
    assert failed["errors"][0]["message"] == INTERNAL_MESSAGE
    assert any(
        record.levelname == "ERROR" and "Temporal's own words" in (record.exc_text or "")
        for record in caplog.records
    )


async def test_one_customer_holds_only_so_many_sockets_and_subscriptions(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """One customer's sockets and subscriptions are bounded over every connection (one
    customer once held all 10,000 subscriber slots, and its idle sockets every file the API
    had); another customer, and staff, are not held back by it."""
    bounded = secured.model_copy(
        update={"max_subscriptions_per_customer": 3, "max_connections_per_customer": 2}
    )
    async with run_worker(bounded), running_app(bounded, temporal_client) as app:
        admin = token("admin", "ops-1")
        async with http_of(app) as http:
            http.headers["Authorization"] = f"Bearer {admin}"
            mine = await open_account(GraphQLClient(http))
        ada, eve = token("customer", "ada", [mine]), token("customer", "eve", [mine])
        async with (
            served(app) as url,
            acknowledged(url, ada) as first,
            acknowledged(url, ada) as second,
        ):
            # A third socket of ada's is closed 4429, the protocol's "too many", with why.
            async with connect(url, subprotocols=["graphql-transport-ws"]) as third:  # type: ignore[list-item]
                init = {"Authorization": f"Bearer {ada}"}
                await third.send(json.dumps({"type": "connection_init", "payload": init}))
                with pytest.raises(ConnectionClosed) as closed:
                    await received(third)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
                assert closed.value.rcvd.reason.startswith("LIMIT_REACHED")
            # Three subscriptions over her two sockets, then no fourth.
            for ws, op in ((first, "a"), (first, "b"), (second, "c")):
                await subscribe(ws, op, FOLLOW, id=mine)
                assert "errors" not in await answer(ws, op)
            await subscribe(second, "d", FOLLOW, id=mine)
            over = await answer(second, "d")
            assert code(over) == "LIMIT_REACHED" and "3" in over["errors"][0]["message"]
            async with acknowledged(url, eve) as other, acknowledged(url, admin) as staff:
                for ws in (other, staff):
                    await subscribe(ws, "e", FOLLOW, id=mine)
                    assert "errors" not in await answer(ws, "e")
            # One ended, one more may begin; a socket closed, another may open.
            await first.send(json.dumps({"id": "a", "type": "complete"}))
            await asyncio.sleep(0.2)
            await subscribe(second, "f", FOLLOW, id=mine)
            assert "errors" not in await answer(second, "f")
        async with served(app) as url, acknowledged(url, ada), acknowledged(url, ada):
            pass


async def test_over_graphql_transport_ws_each_operation_pays_the_rate_limit(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A socket is no way around the limits: its opening takes a token, each operation on
    it one more, and a large answer its points, as a request over HTTP does."""
    limited = secured.model_copy(update={"rate_limits": {"customer": (0.02, 6)}})
    async with run_worker(limited), running_app(limited, temporal_client) as app:
        async with http_of(app) as http:
            http.headers.update({"Authorization": f"Bearer {token('admin', 'ops-1')}"})
            mine = await open_account(GraphQLClient(http))
        async with served(app) as url:
            customer = token("customer", new_id(), [mine])
            async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                init = {"Authorization": f"Bearer {customer}"}
                await ws.send(json.dumps({"type": "connection_init", "payload": init}))
                assert (await received(ws))["type"] == "connection_ack"

                async def send(op: str, query: str) -> dict[str, Any]:
                    payload = {"query": query, "variables": {"id": mine}}
                    await ws.send(json.dumps({"id": op, "type": "subscribe", "payload": payload}))
                    return await answer(ws, op)

                read = "query($id: ID!) { account(id: $id) { balance } }"
                # 6 tokens: the connection_init took one, these the other five
                answers = [await send(f"read-{n}", read) for n in range(5)]
                over = await send("over", read)
                followed = await send("follow", FOLLOW)
            # With its bucket empty, the customer cannot even open another socket.
            async with connect(url, subprotocols=["graphql-transport-ws"]) as again:  # type: ignore[list-item]
                await again.send(json.dumps({"type": "connection_init", "payload": init}))
                with pytest.raises(ConnectionClosed) as closed:
                    await received(again)

    assert all(a["data"] == {"account": {"balance": 0}} for a in answers)
    assert code(over) == code(followed) == "RATE_LIMITED"
    assert "try again in" in over["errors"][0]["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
    assert closed.value.rcvd.reason.startswith("RATE_LIMITED")


async def test_a_subscription_whose_events_could_be_too_large_is_refused(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    small = secured.model_copy(update={"max_response_values": 100})
    follow = """subscription($sku: String!) { inventoryItemChanged(sku: $sku) {
      revision node { reservations { reservationId quantity } } } }"""
    async with (
        run_worker(small),
        running_app(small, temporal_client) as app,
        served(app) as url,
        connect(url, subprotocols=["graphql-transport-ws"]) as ws,  # type: ignore[list-item]
    ):
        init = {"Authorization": f"Bearer {token('admin', 'ops-1')}"}
        await ws.send(json.dumps({"type": "connection_init", "payload": init}))
        assert (await received(ws))["type"] == "connection_ack"
        payload = {"query": follow, "variables": {"sku": new_id()}}
        await ws.send(json.dumps({"id": "big", "type": "subscribe", "payload": payload}))
        refused = await answer(ws, "big")
    assert code(refused) == "RESPONSE_TOO_LARGE"


@contextlib.asynccontextmanager
async def stalling_proxy(redis_url: str, stalled: int) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP proxy in front of Redis whose first `stalled` connections are accepted and never
    answered, as a connection looks to a process too busy to read it; the rest are relayed.
    Yields its URL and the count of connections it took."""
    target = httpx.URL(redis_url)
    taken = [0]
    held: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken[0] += 1
        if taken[0] <= stalled:
            held.append(writer)
            return
        upstream_reader, upstream = await asyncio.open_connection(target.host, target.port)
        await asyncio.gather(relay(reader, upstream), relay(upstream_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = target.path if target.path not in ("", "/") else ""
    try:
        yield f"redis://127.0.0.1:{port}{path}", taken
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_subscription_begun_while_redis_answers_too_late_still_follows(
    settings: Settings,
) -> None:
    # Two connections stalled: the client's own retry spends both, as a burst of a thousand
    # subscriptions that held the event loop past the connect timeout did. The feed tries
    # again rather than refusing the subscriber while Redis is well.
    async with stalling_proxy(settings.redis_url or "", stalled=2) as (url, taken):
        stalling = settings.model_copy(update={"redis_url": url, "redis_timeout": 0.3})
        client = connect_redis(stalling)
        cache = SnapshotCache(client, settings.redis_prefix)
        feed = ChangeFeed(
            client, cache, settings.redis_prefix, max_subscribers=10, block_seconds=0.1
        )
        try:
            async with feed.running(), feed.subscribe("account", new_id()):
                assert feed.subscribers == 1
        finally:
            await cache.aclose()
            await client.aclose()
        assert taken[0] >= 3  # the two stalled, then one that answered


async def test_a_gap_read_behind_the_cache_leaves_the_later_states_to_the_stream(
    settings: Settings, cache: SnapshotCache
) -> None:
    """A gap's state is read from the cache: when the cache had moved on (revision 23 for a
    gap to 21), the later state was shown first, and then the stream's entry for 22, as
    new, to a status-filtered view. Only the gap's own end is shown from the cache."""
    feed = ChangeFeed(
        cache.client, cache, settings.redis_prefix, max_subscribers=10, block_seconds=0.1
    )
    entity_id = new_id()
    written = Snapshot(
        entity_type="account",
        entity_id=entity_id,
        revision=23,
        state={"status": "SUSPENDED"},
        incarnation=1,
    )
    await cache.put(written)
    gap = {"type": "gap", "id": entity_id, "incarnation": "1", "from": "18"}
    async with feed.subscribe("account", entity_id):
        behind = {**gap, "to": "21", "state_revision": "21"}
        assert await feed._change("account", behind) is None
        at_its_end = {**gap, "to": "23", "state_revision": "23"}
        shown = await feed._change("account", at_its_end)
        assert shown is not None and shown.snapshot.revision == 23 and shown.gap


async def test_a_type_followed_again_while_a_gap_is_read_gets_nothing_from_before(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader, waiting on the cache for a gap's state, went on with the rest of its
    batch under whichever follower the type had by then: one that had subscribed meanwhile
    had its cursor moved back and was offered changes from before it subscribed."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix)
    feed = ChangeFeed(client, cache, prefix, max_subscribers=10, block_seconds=0.1)
    stream = stream_key(prefix, "account")
    gapped = new_id()
    await cache.put(
        Snapshot(entity_type="account", entity_id=gapped, revision=2, state={}, incarnation=1)
    )
    reading, released = asyncio.Event(), asyncio.Event()
    get = cache.get

    async def slow_get(entity_type: str, entity_id: str) -> Any:
        if entity_id == gapped:
            reading.set()
            await released.wait()
        return await get(entity_type, entity_id)

    monkeypatch.setattr(cache, "get", slow_get)

    def change(entity_id: str) -> dict[str, str]:
        return {"type": "change", "id": entity_id, "incarnation": "1", "revision": "1",
                "command": "deposit", "command_id": new_id(), "sent_by": "", "at": "",
                "state": "{}"}  # fmt: skip

    try:
        async with feed.running():
            async with feed.subscribe("account", None, capacity=10):
                gap = {"type": "gap", "id": gapped, "incarnation": "1", "from": "1", "to": "2"}
                await client.xadd(stream, {**gap, "state_revision": "2"})
                for before in ("before-1", "before-2"):
                    await client.xadd(stream, change(before))
                await asyncio.wait_for(reading.wait(), 5)
            async with feed.subscribe("account", None, capacity=10) as box:
                released.set()
                await asyncio.sleep(0.3)  # the rest of the batch read
                await client.xadd(stream, change("after"))
                first = await asyncio.wait_for(box.next(), 5)
        assert first.snapshot.entity_id == "after"
    finally:
        await cache.aclose()
        await client.aclose()


async def test_an_entry_or_a_filter_that_fails_ends_no_one_else_s_subscription(
    settings: Settings,
) -> None:
    """The process has one reader for every subscription: an entry it cannot read (a
    revision that is not a number, as another version could write) or one subscriber's
    filter that raises ended it, and every subscription of the process went quiet for good.
    The entry is skipped and the reader goes on; the subscriber whose filter failed is
    ended INTERNAL; the others get the next change."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix)
    feed = ChangeFeed(client, cache, prefix, max_subscribers=10, block_seconds=0.1)
    stream = stream_key(prefix, "account")

    def change(entity_id: str, revision: str = "1") -> dict[str, str]:
        return {"type": "change", "id": entity_id, "incarnation": "1", "revision": revision,
                "command": "deposit", "command_id": new_id(), "sent_by": "", "at": "",
                "state": "{}"}  # fmt: skip

    def fails_on_b(change: Change) -> bool:
        if change.entity_id == "b":
            raise KeyError("status")
        return True

    try:
        async with (
            feed.running(),
            feed.subscribe("account", None, capacity=10) as everyone,
            feed.subscribe("account", None, fails_on_b, capacity=10) as failing,
        ):
            await client.xadd(stream, change("a", revision="one"))
            await client.xadd(stream, change("b"))
            seen = await asyncio.wait_for(everyone.next(), 5)
            with pytest.raises(SubscriberGone) as ended:
                await asyncio.wait_for(failing.next(), 5)
            await client.xadd(stream, change("c"))
            then = await asyncio.wait_for(everyone.next(), 5)
    finally:
        await cache.aclose()
        await client.aclose()
    assert (seen.entity_id, then.entity_id) == ("b", "c")
    assert ended.value.code is ErrorCode.INTERNAL


async def test_customers_together_leave_staff_and_services_their_share_of_subscriptions(
    settings: Settings, cache: SnapshotCache
) -> None:
    """Only one customer's subscriptions were bounded (100): a hundred customers at their
    most filled a process (10,000), and its admin consoles and integrations were refused.
    Customers together now leave the last tenth to staff and services."""
    feed = ChangeFeed(
        cache.client,
        cache,
        settings.redis_prefix,
        max_subscribers=20,
        block_seconds=0.1,
        max_per_holder=3,
    )
    async with feed.running(), contextlib.AsyncExitStack() as held:
        for n in range(18):  # six customers at their most
            await held.enter_async_context(
                feed.subscribe("account", new_id(), holder=f"customer:{n // 3}")
            )
        with pytest.raises(TenureError) as refused:
            await held.enter_async_context(
                feed.subscribe("account", new_id(), holder="customer:another")
            )
        assert refused.value.code.value == "LIMIT_REACHED"
        for _ in range(2):  # an admin's, a service's
            await held.enter_async_context(feed.subscribe("account", new_id()))
        assert feed.subscribers == 20


def _account_change(entity_id: str, revision: int, status: str, command: str) -> FeedChange:
    snapshot = Snapshot(
        entity_type="account",
        entity_id=entity_id,
        revision=revision,
        state={"status": status},
        incarnation=1,
    )
    return FeedChange("account", snapshot, command=command)


async def _read_into(shown: list[tuple[int, str]], follower: _Follower, box: Mailbox) -> None:
    change = follower.change(await box.next(), lambda read: read.snapshot.state)
    if change is not None:
        shown.append((change.revision, change.node["status"]))


async def test_a_busy_entity_is_shown_while_its_subscriber_keeps_pace_with_a_backlog() -> None:
    """A subscriber with a steady backlog of 50 quiet entities, taking one change as each
    comes: the entity that changed at every tick went to the back each time, and was never
    shown; it is shown in its turn, with its newest state."""
    box = Mailbox(lambda change: True, 1000)
    for n in range(50):
        box.offer(_account_change(f"quiet-{n}", 1, "ACTIVE", "deposit"))
    shown: list[tuple[str, int]] = []
    for tick in range(1, 201):
        box.offer(_account_change("busy", tick, "ACTIVE", "deposit"))
        box.offer(_account_change(f"later-{tick}", 1, "ACTIVE", "deposit"))
        change = await box.next()
        shown.append((change.snapshot.entity_id, change.snapshot.revision))
    busy = [revision for entity_id, revision in shown if entity_id == "busy"]
    assert len(busy) >= 3, shown[-5:]
    assert busy == sorted(busy) and busy[0] == 51  # its newest when its turn came


async def test_a_status_filtered_view_is_told_when_an_entity_leaves_however_fast_it_changes() -> (
    None
):
    """`changes(filter: {status: [ACTIVE]})`: an account verified (ACTIVE) and suspended at
    once, both offered before the subscriber reads the first. The suspension was dropped,
    as the entity had not been shown yet when it was offered, and the view kept an ACTIVE
    row for a SUSPENDED account. Whatever the subscriber reads, its last word on the
    account is now that it left."""
    admin = Principal("ops", Role.ADMIN)
    types = catalog.entity_types()
    info: Any = SimpleNamespace(
        context=SimpleNamespace(principal=admin, gateway=SimpleNamespace(entity=types.get))
    )
    for read_between in (False, True):
        follower = _Follower(None, admin, "account", frozenset({"ACTIVE"}))
        wants = _scoped(info, "account", ChangeFilter(status=["ACTIVE"]), follower.admit)
        box = Mailbox(wants, 100)
        shown: list[tuple[int, str]] = []
        box.offer(_account_change("e1", 2, "ACTIVE", "verify"))
        if read_between:
            await _read_into(shown, follower, box)
        box.offer(_account_change("e1", 3, "SUSPENDED", "suspend"))
        box.offer(_account_change("e1", 4, "SUSPENDED", "deposit"))  # out, and told: not again
        box.offer(_account_change("e2", 2, "SUSPENDED", "suspend"))  # never in: never shown
        while box._pending:
            await _read_into(shown, follower, box)
        assert shown[-1:] in ([], [(3, "SUSPENDED")]), (read_between, shown)
        assert all(revision != 4 for revision, _ in shown)
        if read_between:
            assert shown == [(2, "ACTIVE"), (3, "SUSPENDED")]


async def test_a_status_filtered_view_past_what_it_remembers_is_still_told_who_leaves() -> None:
    """A view of ACTIVE accounts shown more of them than its subscription remembers
    (MAX_REMEMBERED): the one shown longest ago, which it has forgotten, leaves. That change
    was dropped as if the account had never been in the view, which kept an ACTIVE row for
    a SUSPENDED account for good. Once it has forgotten any, a view is told of every
    account that leaves; one that was never in it still is not, while it forgets none."""
    admin = Principal("ops", Role.ADMIN)
    types = catalog.entity_types()
    info: Any = SimpleNamespace(
        context=SimpleNamespace(principal=admin, gateway=SimpleNamespace(entity=types.get))
    )
    follower = _Follower(None, admin, "account", frozenset({"ACTIVE"}))
    wants = _scoped(info, "account", ChangeFilter(status=["ACTIVE"]), follower.admit)
    box = Mailbox(wants, 10)
    shown: list[tuple[int, str]] = []
    box.offer(_account_change("never-in", 2, "SUSPENDED", "suspend"))
    assert not box._pending
    for n in range(MAX_REMEMBERED + 1):
        box.offer(_account_change(f"e{n}", 2, "ACTIVE", "verify"))
        await _read_into(shown, follower, box)
    assert len(shown) == MAX_REMEMBERED + 1
    box.offer(_account_change("e0", 3, "SUSPENDED", "suspend"))
    assert box._pending
    await _read_into(shown, follower, box)
    assert shown[-1] == (3, "SUSPENDED")
    box.offer(_account_change("e0", 4, "SUSPENDED", "deposit"))  # told it left: not again
    assert not box._pending
    # One it still remembers leaves: told once too, not again at its next change while out.
    last = f"e{MAX_REMEMBERED}"
    box.offer(_account_change(last, 3, "SUSPENDED", "suspend"))
    await _read_into(shown, follower, box)
    assert shown[-1] == (3, "SUSPENDED")
    box.offer(_account_change(last, 4, "SUSPENDED", "deposit"))
    assert not box._pending


OLD_LIFE, NEW_LIFE = 1_700_000_000_000, 1_800_000_000_000
OLD_LIFE, NEW_LIFE = 1_700_000_000_000, 1_800_000_000_000


def _shown(follower: _Follower, revision: int, incarnation: int, command: str | None) -> Any:
    """What the follower shows of a change (revision, previousRevision, missedRevisions)."""
    snapshot = Snapshot(
        entity_type="account",
        entity_id="a",
        revision=revision,
        state={"status": "ACTIVE"},
        incarnation=incarnation,
    )
    shown = follower.change(
        FeedChange("account", snapshot, command=command), lambda read: read.snapshot.state
    )
    if shown is None:
        return None
    return shown.revision, shown.previous_revision, shown.missed_revisions


def test_a_follower_that_stays_while_its_id_is_used_again_is_shown_a_jump() -> None:
    """Shown the old life to revision 5, then the new life's revision 3 (1 and 2 published
    together, or overtaken in its mailbox): a jump, where it came as if nothing was missed.
    A late change of the old life is never shown after the new one."""
    for statuses in (None, frozenset({"ACTIVE"})):  # an entity's subscription, `changes`
        follower = _Follower(None, Principal("ops", Role.ADMIN), "account", statuses)
        assert _shown(follower, 5, OLD_LIFE, None) == (5, None, False)
        assert _shown(follower, 3, NEW_LIFE, "deposit") == (3, None, True)
        assert _shown(follower, 6, OLD_LIFE, "deposit") is None
        assert _shown(follower, 4, NEW_LIFE, "deposit") == (4, 3, False)


def test_an_entity_from_before_incarnations_that_gets_one_is_the_same_life() -> None:
    """Snapshots made before incarnations carry 0; the same entity's next ones carry its
    start time. A subscriber shown (0, 5) that resumes naming incarnation "0" is not sent
    revision 5 again, and one that stays sees revision 6 follow 5."""
    admin = Principal("ops", Role.ADMIN)
    resumed = _Follower(5, admin, "account", since_incarnation=0)
    assert _shown(resumed, 5, NEW_LIFE, None) is None
    assert _shown(resumed, 6, NEW_LIFE, "deposit") == (6, None, False)
    staying = _Follower(None, admin, "account")
    assert _shown(staying, 5, 0, None) == (5, None, False)
    assert _shown(staying, 6, NEW_LIFE, "deposit") == (6, 5, False)


def test_an_entity_back_in_a_status_filtered_view_follows_the_change_that_took_it_out() -> None:
    """`changes(filter: {status: [SUSPENDED]})`: shown suspended at 5, leaving at 6, quiet
    (ACTIVE) at 7 and 8, suspended again at 9. Revision 9 came as a first sight (no
    previous revision, nothing missed), which hid the jump; it follows 6, and says revisions
    were missed."""
    follower = _Follower(None, Principal("ops", Role.ADMIN), "account", frozenset({"SUSPENDED"}))

    def shown(revision: int, status: str) -> Any:
        change = follower.change(
            _account_change("a", revision, status, "suspend"), lambda read: read.snapshot.state
        )
        return None if change is None else (change.previous_revision, change.missed_revisions)

    assert shown(5, "SUSPENDED") == (None, False)
    assert shown(6, "ACTIVE") == (5, False)
    assert shown(6, "ACTIVE") is None  # already told
    assert shown(9, "SUSPENDED") == (6, True)
    assert shown(10, "SUSPENDED") == (9, False)


async def test_the_change_feed_lets_the_process_run_while_it_offers_a_batch(
    settings: Settings,
) -> None:
    """A batch of 500 changes offered to 300 `changes` subscribers: the rest of the API
    process (its requests, sockets and probes) gets turns while it is offered. The reader
    offered a whole batch in one go, and a few thousand customers following carts stalled
    every request of the process for seconds."""
    client = connect_redis(settings)
    prefix = f"{settings.redis_prefix}{new_id()}:"
    cache = SnapshotCache(client, prefix)
    feed = ChangeFeed(client, cache, prefix, max_subscribers=400, block_seconds=0.1)
    stream = stream_key(prefix, "account")
    seen_midway: set[int] = set()  # what another task saw offered so far, at its turns

    async def watching(box: Mailbox) -> None:
        while (pending := len(box._pending)) < 500:
            if pending:
                seen_midway.add(pending)
            await asyncio.sleep(0)

    try:
        async with feed.running(), contextlib.AsyncExitStack() as held:
            boxes = [
                await held.enter_async_context(feed.subscribe("account", None, capacity=1000))
                for _ in range(300)
            ]
            watcher = asyncio.create_task(watching(boxes[-1]))
            pipe = client.pipeline(transaction=False)
            for n in range(500):
                pipe.xadd(stream, {"type": "change", "id": f"e{n}", "incarnation": "1",
                                   "revision": "1", "command": "deposit", "command_id": f"c{n}",
                                   "sent_by": "", "at": "", "state": "{}"})  # fmt: skip
            await pipe.execute()
            await asyncio.wait_for(watcher, 30)
    finally:
        await cache.aclose()
        await client.aclose()
    # A turn at least every 32 offers; the batch may come in two reads.
    assert len(seen_midway) >= 500 // OFFERS_BETWEEN_TURNS - 2, sorted(seen_midway)
