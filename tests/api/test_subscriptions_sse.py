"""Subscriptions over Server-Sent Events (graphql-sse, distinct connections mode), against the
real app behind uvicorn: a change reaches the stream, a reconnection with `sinceRevision`
gets what it missed at once, the stream meets the same authentication, authorization and
limits as any request, refused in JSON as a query would be, and a closed stream leaves no
follower behind in the change feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from temporalio.client import Client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import api.auth
import api.authentication
from api.app import create_app
from api.over_http import EVENT_STREAM, GRAPHQL_RESPONSE, JSON
from api.server import ApiServer
from tests.api.test_access import ADJUST, RESTOCK, SECRET, token
from tests.api.test_accounts_api import DEPOSIT, READ
from tests.api.test_metrics import scrape
from tests.api.test_subscriptions import (
    FOLLOW,
    acknowledged,
    answer,
    open_account,
    running_app,
    served,
    subscribe,
)
from tests.api.test_tokens import jwks_server, rsa_key, signed
from tests.conftest import GraphQLClient, WorkerFactory, new_id
from workers.settings import Settings

ALIASED = (
    "subscription($id: ID!) { accountChanged(id: $id) { node { "
    + " ".join(f"b{n}: balance" for n in range(16))
    + " } } }"
)


class Stack:
    """The secured app with a worker, behind uvicorn; `gql` sends commands as an admin
    through another client."""

    def __init__(self, app: Starlette, url: str, gql: GraphQLClient) -> None:
        self.app = app
        self.url = url
        self.gql = gql

    @property
    def followers(self) -> int:
        count: int = self.app.state.change_feed.subscribers
        return count

    async def followers_become(self, count: int) -> None:
        async with asyncio.timeout(10):
            while self.followers != count:
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def stack(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, **changes: Any
) -> AsyncIterator[Stack]:
    secured = settings.model_copy(
        update={"environment": "production", "auth_secret": SECRET, **changes}
    )
    async with run_worker(secured), running_app(secured, temporal_client) as app:
        transport = httpx.ASGITransport(app=app)
        admin = {"Authorization": f"Bearer {token('admin', 'ops-1')}"}
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://tenure", headers=admin) as http,
            served(app) as ws_url,
        ):
            yield Stack(app, ws_url.replace("ws://", "http://", 1), GraphQLClient(http))


def subscribing(
    client: httpx.AsyncClient, url: str, bearer: str | None, query: str = FOLLOW, **variables: Any
) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
    headers = {"Accept": EVENT_STREAM, **({"Authorization": f"Bearer {bearer}"} if bearer else {})}
    return client.stream(
        "POST", url, json={"query": query, "variables": variables}, headers=headers
    )


async def events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """Each SSE event as (event, its data as JSON); heartbeat comments left out."""
    event, data = None, ""
    async for line in response.aiter_lines():
        if not line:
            if event is not None:
                yield event, json.loads(data) if data else None
            event, data = None, ""
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data += line.removeprefix("data:").strip()


async def change_of(stream: AsyncIterator[tuple[str, Any]]) -> dict[str, Any]:
    """The next `next` event's accountChanged, which must come within 15 s."""
    event, payload = await asyncio.wait_for(anext(stream), timeout=15)
    assert event == "next", (event, payload)
    assert "errors" not in payload, payload
    change: dict[str, Any] = payload["data"]["accountChanged"]
    return change


def refusal(response: httpx.Response) -> str:
    """The code of a JSON refusal, which is no event stream."""
    assert not response.headers["content-type"].startswith("text/event-stream")
    code: str = json.loads(response.content)["errors"][0]["extensions"]["code"]
    return code


async def test_an_admin_follows_an_account_over_sse_and_sees_another_clients_deposit(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        account_id = await open_account(tenure.gql)
        async with subscribing(sse, tenure.url, token("admin", "ops-2"), id=account_id) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = events(response)
            now = await change_of(stream)
            assert now["revision"] == 2 and now["command"] is None  # its state at once
            await tenure.gql.data(DEPOSIT, id=account_id, amount=7)
            shown = await change_of(stream)
        assert shown["revision"] == 3 and shown["node"]["balance"] == 7
        assert shown["command"] == "deposit" and shown["sentBy"] == "admin:ops-1"
        assert shown["previousRevision"] == 2 and not shown["missedRevisions"]

        # A query over SSE is one result, then the stream completes.
        async with subscribing(sse, tenure.url, token("admin", "ops-2"), READ, id=account_id) as r:
            answered = [event async for event in events(r)]
        assert [event for event, _ in answered] == ["next", "complete"]
        assert answered[0][1]["data"]["account"]["balance"] == 7


async def test_reconnecting_over_sse_with_since_revision_gets_the_current_state_at_once(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        account_id = await open_account(tenure.gql)
        for _ in range(3):
            await tenure.gql.data(DEPOSIT, id=account_id, amount=5)  # revisions 3 to 5
        admin = token("admin", "ops-2")
        async with subscribing(sse, tenure.url, admin, id=account_id, since=2) as response:
            missed = await change_of(events(response))
        assert missed["revision"] == 5 and missed["node"]["balance"] == 15
        assert missed["missedRevisions"] and missed["command"] is None

        # Up to date: nothing at once, then the next change as it comes.
        async with subscribing(sse, tenure.url, admin, id=account_id, since=5) as response:
            stream = events(response)
            await tenure.followers_become(1)
            await tenure.gql.data(DEPOSIT, id=account_id, amount=1)
            shown = await change_of(stream)
        assert shown["revision"] == 6 and shown["command"] == "deposit"
        assert not shown["missedRevisions"]


async def test_over_sse_no_token_is_unauthenticated_and_a_customer_follows_only_its_own(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        mine, theirs = await open_account(tenure.gql), await open_account(tenure.gql)
        async with subscribing(sse, tenure.url, None, id=mine) as response:
            await response.aread()
        assert response.status_code == 401 and refusal(response) == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"].startswith("Bearer")

        customer = token("customer", "ada", [mine])
        answers = []
        for account_id in (theirs, new_id()):  # another's, and one that does not exist
            async with subscribing(sse, tenure.url, customer, id=account_id) as response:
                await response.aread()
            # Refused before it was established: a request error, as the media type the
            # specification recommends has them, so an SSE client sees a 4xx.
            assert response.headers["content-type"].startswith(GRAPHQL_RESPONSE)
            assert refusal(response) == "FORBIDDEN"
            answers.append((response.status_code, json.loads(response.content)))
        assert answers[0][0] == 400
        assert answers[0] == answers[1]  # nothing tells whether the account exists
        # A client that takes application/json too gets the status a query gets there.
        as_json = {"Authorization": f"Bearer {customer}", "Accept": f"{EVENT_STREAM}, {JSON}"}
        both = {"query": FOLLOW, "variables": {"id": theirs}}
        refused = await sse.post(tenure.url, json=both, headers=as_json)
        query = await sse.post(
            tenure.url,
            json={"query": READ, "variables": {"id": theirs}},
            headers={**as_json, "Accept": JSON},
        )
        assert refused.headers["content-type"].startswith(JSON)
        assert refusal(refused) == refusal(query) == "FORBIDDEN"
        assert refused.status_code == query.status_code == 200
        assert tenure.followers == 0

        async with subscribing(sse, tenure.url, customer, id=mine) as response:
            assert (await change_of(events(response)))["revision"] == 2


async def test_a_customer_following_its_account_sees_an_operator_as_a_role_alone(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """As the entity's history shows it to a customer: its own commands with its name, an
    operator's with the role alone."""
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        mine = await open_account(tenure.gql)
        customer = token("customer", "ada", [mine])
        async with subscribing(sse, tenure.url, customer, id=mine) as response:
            stream = events(response)
            await change_of(stream)  # the state now
            await tenure.gql.data(DEPOSIT, id=mine, amount=1)  # by admin ops-1
            by_operator = await change_of(stream)
            own = {"Authorization": f"Bearer {customer}"}
            deposit = {"query": DEPOSIT, "variables": {"id": mine, "amount": 2}}
            assert (await sse.post(tenure.url, json=deposit, headers=own)).status_code == 200
            by_self = await change_of(stream)
    assert by_operator["sentBy"] == "admin"
    assert by_self["sentBy"] == "customer:ada"


async def test_a_stream_with_nothing_to_send_yet_is_answered_at_once(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """Its status and headers, and a ping, come when it is established, not with the first
    heartbeat 15 s later."""
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        mine = await open_account(tenure.gql)
        admin = token("admin", "ops-1")
        async with (
            asyncio.timeout(12),  # the heartbeat comes after 15 s
            subscribing(sse, tenure.url, admin, id=mine, since=2) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(EVENT_STREAM)
            first = await anext(response.aiter_text())
        assert first.startswith(":")


async def test_a_customer_following_an_item_sees_no_command_ids(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """An item's command ids name other customers' carts and checkouts (a checkout commits
    as `checkout:<cart>-<attempt>...`), as its history, refused to customers, would."""
    follow = "subscription($sku: String!) { inventoryItemChanged(sku: $sku) { commandId } }"
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        sku = new_id()
        await tenure.gql.data(RESTOCK, sku=sku)
        seen = {}
        for who, bearer in (("customer", token("customer", "ada")), ("admin", token("admin", "a"))):
            async with subscribing(sse, tenure.url, bearer, follow, sku=sku) as response:
                stream = events(response)
                await anext(stream)  # the state now
                await tenure.gql.data(ADJUST, sku=sku)
                _, payload = await asyncio.wait_for(anext(stream), timeout=15)
                seen[who] = payload["data"]["inventoryItemChanged"]["commandId"]
    assert seen["customer"] is None
    assert seen["admin"] is not None


async def test_an_sse_request_meets_the_same_limits_as_any_other(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with (
        stack(settings, temporal_client, run_worker, rate_limits={"customer": (0.01, 2)}) as tenure,
        httpx.AsyncClient() as sse,
    ):
        mine = await open_account(tenure.gql)
        customer = token("customer", "ada", [mine])
        async with subscribing(sse, tenure.url, customer, "x" * 300_000, id=mine) as response:
            await response.aread()
        assert response.status_code == 413 and refusal(response) == "PAYLOAD_TOO_LARGE"
        for expected in (400, 400, 429):  # the document's limit, twice; then the rate's
            async with subscribing(sse, tenure.url, customer, ALIASED, id=mine) as response:
                await response.aread()
            assert response.status_code == expected
            code = "TOO_MANY_ALIASES" if expected == 400 else "RATE_LIMITED"
            assert refusal(response) == code
        assert tenure.followers == 0


async def test_the_servers_subscription_bound_holds_for_sse_streams(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with (
        stack(settings, temporal_client, run_worker, max_subscribers=1) as tenure,
        httpx.AsyncClient() as sse,
    ):
        account_id = await open_account(tenure.gql)
        admin = token("admin", "ops-2")
        async with subscribing(sse, tenure.url, admin, id=account_id) as first:
            assert (await change_of(events(first)))["revision"] == 2
            async with subscribing(sse, tenure.url, admin, id=account_id) as second:
                await second.aread()
            assert refusal(second) == "LIMIT_REACHED"
        await tenure.followers_become(0)
        async with subscribing(sse, tenure.url, admin, id=account_id) as again:
            assert (await change_of(events(again)))["revision"] == 2


async def test_closing_an_sse_stream_frees_its_follower_in_the_change_feed(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        account_id = await open_account(tenure.gql)
        admin = token("admin", "ops-2")
        async with subscribing(sse, tenure.url, admin, id=account_id) as response:
            assert (await change_of(events(response)))["revision"] == 2
            assert tenure.followers == 1
        await tenure.followers_become(0)

        # A quiet stream too, one that has sent nothing yet (its account has not changed).
        quiet = [subscribing(sse, tenure.url, admin, id=account_id, since=2) for _ in range(5)]
        async with contextlib.AsyncExitStack() as streams:
            for stream in quiet:
                assert (await streams.enter_async_context(stream)).status_code == 200
            await tenure.followers_become(5)  # each through the process's one feed
        await tenure.followers_become(0)
        await tenure.gql.data(DEPOSIT, id=account_id, amount=1)  # and the feed still serves
        async with subscribing(sse, tenure.url, admin, id=account_id, since=2) as response:
            assert (await change_of(events(response)))["revision"] == 3


async def test_an_sse_stream_is_counted_but_kept_out_of_request_durations(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A stream lasts as long as its subscriber stays: timing it as a request would swamp
    the API's latency histogram. A refused one, answered in JSON at once, is timed."""
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        account_id = await open_account(tenure.gql)
        before = await scrape(tenure.gql.http)
        async with subscribing(sse, tenure.url, token("admin", "ops-2"), id=account_id) as response:
            await change_of(events(response))
            await asyncio.sleep(0.3)  # a stream held open this long would be a slow request
        async with subscribing(sse, tenure.url, None, id=account_id) as refused:
            await refused.aread()
        assert refused.status_code == 401
        await tenure.followers_become(0)
        after = await scrape(tenure.gql.http)

    def grown(name: str) -> float:
        return after.value(name) - before.value(name)

    # The two /metrics scrapes are no GraphQL requests; the stream and the refusal are.
    assert grown("tenure_api_requests_total") == 2
    assert grown("tenure_api_request_duration_seconds_count") == 1
    assert grown("tenure_api_request_duration_seconds_sum") < 0.3


async def test_each_event_of_a_subscription_has_the_live_reads_of_a_request(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """An event's `history` is a query to the entity, counted against the per-request
    budget: each event has a budget of its own, so a long-lived subscription does not run
    out of it after as many events as a request may make queries."""
    follow = """subscription($id: ID!) { accountChanged(id: $id) {
      revision node { history(last: 1) { entries { commandId } } } } }"""
    deposits = 2 * settings.max_live_reads
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        account_id = await open_account(tenure.gql)
        admin = token("admin", "ops-2")
        async with subscribing(sse, tenure.url, admin, follow, id=account_id) as response:
            stream = events(response)
            shown = [await change_of(stream)]
            for _ in range(deposits):
                await tenure.gql.data(DEPOSIT, id=account_id, amount=1)
                shown.append(await change_of(stream))
    assert [change["revision"] for change in shown] == list(range(2, 3 + deposits))
    assert all(len(change["node"]["history"]["entries"]) == 1 for change in shown)


def expiring(role: str, sub: str, accounts: list[str], seconds: int) -> str:
    now = int(time.time())
    claims = {
        "sub": sub,
        "iss": "tenure",
        "aud": "tenure-api",
        "iat": now,
        "exp": now + seconds,
        "roles": [role],
        "accounts": accounts,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_a_token_s_expiry_ends_its_websocket_and_its_event_stream(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A subscription lasts as long as its token is good, not as long as its connection:
    at expiry a WebSocket closes with 4403 (Forbidden), ending its operations, and an event
    stream ends with an UNAUTHENTICATED error; until then both carry changes."""
    no_leeway = {"auth_leeway": 0}
    async with (
        stack(settings, temporal_client, run_worker, **no_leeway) as tenure,
        httpx.AsyncClient(timeout=30) as sse,
    ):
        mine = await open_account(tenure.gql)
        ws_url = tenure.url.replace("http://", "ws://", 1)
        bearer = expiring("customer", "ada", [mine], 4)
        async with acknowledged(ws_url, bearer) as ws:
            await subscribe(ws, "mine", FOLLOW, id=mine)
            assert (await answer(ws, "mine"))["data"]["accountChanged"]["revision"] == 2
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            assert time.time() >= jwt.decode(bearer, options={"verify_signature": False})["exp"]
        # Expired, it is refused at once, as over HTTP.
        async with connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            init = {"Authorization": f"Bearer {bearer}"}
            await ws.send(json.dumps({"type": "connection_init", "payload": init}))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403

        bearer = expiring("customer", "ada", [mine], 4)
        async with subscribing(sse, tenure.url, bearer, id=mine) as response:
            stream = events(response)
            assert (await change_of(stream))["revision"] == 2
            await tenure.gql.data(DEPOSIT, id=mine, amount=3)
            assert (await change_of(stream))["revision"] == 3
            async with asyncio.timeout(10):
                rest = [event async for event in stream]
        event, payload = rest[0]
        assert event == "next" and payload["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert rest[-1][0] == "complete"
        await tenure.followers_become(0)


async def test_a_withdrawn_signing_key_ends_its_tokens_websocket_and_event_stream(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key its provider withdrew (one that leaked, say) signs no more requests, and ends
    the subscriptions its tokens opened, where they went on until each token expired: the
    WebSocket closes with 4403, the event stream ends UNAUTHENTICATED. Tokens of the key
    that stays keep theirs."""
    monkeypatch.setattr(api.auth, "JWKS_MAX_AGE", 1.0)
    monkeypatch.setattr(api.auth, "JWKS_REFRESH_INTERVAL", 0.2)
    monkeypatch.setattr(api.authentication, "TOKEN_RECHECK_SECONDS", 0.3)
    staying, leaked = rsa_key(), rsa_key()
    with jwks_server() as provider:
        provider.publish("leaked", leaked)
        leaked_jwk = provider.keys
        provider.publish("staying", staying)
        provider.keys = [*provider.keys, *leaked_jwk]
        secured = settings.model_copy(
            update={"environment": "production", "auth_jwks_url": provider.url}
        )
        admin = {"Authorization": signed(staying, "staying", sub="ops-1", roles=["admin"])}
        async with (
            run_worker(secured),
            running_app(secured, temporal_client) as app,
            served(app) as ws_url,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://tenure", headers=admin
            ) as http,
            httpx.AsyncClient(timeout=30) as sse,
        ):
            gql = GraphQLClient(http)
            mine = await open_account(gql)
            url = ws_url.replace("ws://", "http://", 1)

            def bearer(key: Any, kid: str) -> str:
                return signed(key, kid, accounts=[mine]).removeprefix("Bearer ")

            async with (
                acknowledged(ws_url, bearer(leaked, "leaked")) as gone,
                acknowledged(ws_url, bearer(staying, "staying")) as kept,
                subscribing(sse, url, bearer(leaked, "leaked"), id=mine) as response,
            ):
                for ws in (gone, kept):
                    await subscribe(ws, "mine", FOLLOW, id=mine)
                    assert (await answer(ws, "mine"))["data"]["accountChanged"]["revision"] == 2
                stream = events(response)
                assert (await change_of(stream))["revision"] == 2

                provider.publish("staying", staying)  # the leaked key is withdrawn
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(10):
                        while True:
                            await gone.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
                assert "no longer accepted" in closed.value.rcvd.reason
                async with asyncio.timeout(10):
                    rest = [event async for event in stream]
                event, payload = rest[0]
                assert event == "next"
                error = payload["errors"][0]
                assert error["extensions"]["code"] == "UNAUTHENTICATED"
                assert "unknown signing key" in error["message"]

                await gql.data(DEPOSIT, id=mine, amount=3)  # the staying key's go on
                assert (await answer(kept, "mine"))["data"]["accountChanged"]["revision"] == 3


CHANGES = """subscription($type: EntityTypeName!, $filter: ChangeFilter) {
  changes(entityType: $type, filter: $filter) {
    entityId revision command node { ... on Account { status balance } } } }"""
SUSPEND = 'mutation($id: ID!) { suspendAccount(id: $id, reason: "x", wait: true) { status } }'
REACTIVATE = "mutation($id: ID!) { reactivateAccount(id: $id, wait: true) { status } }"


async def next_change(stream: AsyncIterator[tuple[str, Any]]) -> dict[str, Any]:
    event, payload = await asyncio.wait_for(anext(stream), timeout=15)
    assert event == "next", payload
    change: dict[str, Any] = payload["data"]["changes"]
    return change


async def test_following_a_type_s_changes_by_status_and_ids(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """`changes` over a type: the changes of the entities its filter names, in their
    statuses; a status the type does not have, or an empty list, is refused, since nothing
    would ever come."""
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        kept, suspended, other = [await open_account(tenure.gql) for _ in range(3)]
        admin = token("admin", "ops-2")
        where = {"status": ["ACTIVE"], "ids": [kept, suspended]}
        async with subscribing(sse, tenure.url, admin, CHANGES, type="ACCOUNT", filter=where) as r:
            stream = events(r)
            await tenure.followers_become(1)
            await tenure.gql.data(DEPOSIT, id=other, amount=4)  # not among the ids
            await tenure.gql.data(SUSPEND, id=suspended)  # SUSPENDED after it: not ACTIVE
            await tenure.gql.data(DEPOSIT, id=kept, amount=4)
            shown = [await next_change(stream)]
            # A shown entity that leaves the statuses is shown once more, in its new one;
            # then nothing of it until it comes back.
            await tenure.gql.data(SUSPEND, id=kept)
            shown.append(await next_change(stream))
            await tenure.gql.data(REACTIVATE, id=suspended)
            shown.append(await next_change(stream))
        seen = [(c["entityId"], c["command"], c["node"]["status"]) for c in shown]
        assert seen == [
            (kept, "deposit", "ACTIVE"),
            (kept, "suspend", "SUSPENDED"),
            (suspended, "reactivate", "ACTIVE"),
        ]
        assert shown[0]["node"]["balance"] == 4

        # Nothing would ever come: a status the type lacks, or an empty list of either.
        for kind, refused in (
            ("ACCOUNT", {"status": ["NOPE"]}),
            ("ACCOUNT", {"status": ["active"]}),
            ("INVENTORY", {"status": ["OPEN"]}),
            ("ACCOUNT", {"status": []}),
            ("ACCOUNT", {"ids": []}),
        ):
            async with subscribing(sse, tenure.url, admin, CHANGES, type=kind, filter=refused) as r:
                await r.aread()
            assert refusal(r) == "INVALID_INPUT", (kind, refused)
        assert tenure.followers == 0


async def test_a_customer_following_its_account_sees_where_keys_met_as_the_history_lists_it(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """An operator's command under a key the customer's took first is recorded under the
    operator's own id (`admin:ops-1/<key>`): the change showed it so, the operator's name
    the customer is not to see."""
    follow = """subscription($id: ID!) { accountChanged(id: $id) { commandId sentBy } }"""
    keyed = """mutation($id: ID!, $key: String!) {
      depositToAccount(id: $id, amount: 1, idempotencyKey: $key, wait: true) { status } }"""
    async with stack(settings, temporal_client, run_worker) as tenure, httpx.AsyncClient() as sse:
        mine = await open_account(tenure.gql)
        customer = token("customer", "ada", [mine])
        own = {"Authorization": f"Bearer {customer}"}
        key = f"k-{mine}"
        body = {"query": keyed, "variables": {"id": mine, "key": key}}
        assert (await sse.post(tenure.url, json=body, headers=own)).status_code == 200
        async with subscribing(sse, tenure.url, customer, follow, id=mine) as response:
            stream = events(response)
            await change_of(stream)  # the state now
            await tenure.gql.data(keyed, id=mine, key=key)  # by admin ops-1, the same key
            by_operator = await change_of(stream)
    assert by_operator == {"commandId": f"admin/{key}", "sentBy": "admin"}


async def test_a_server_shutting_down_ends_its_event_streams_with_unavailable_at_once(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """uvicorn lets a response in flight run on through its graceful shutdown: an event
    stream held every shutdown for the whole timeout (20 s), then lost its connection with
    no error, which its client could not tell from a network failure. The server ends its
    subscriptions first, UNAVAILABLE, and stops without waiting."""
    secured = settings.model_copy(update={"environment": "production", "auth_secret": SECRET})
    admin = token("admin", "ops-1")
    async with run_worker(secured):
        app = create_app(secured, temporal_client=temporal_client)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=60
        )
        server = ApiServer(app, config)
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.02)
            port = server.servers[0].sockets[0].getsockname()[1]
            root = f"http://127.0.0.1:{port}"
            url = f"{root}/graphql"
            async with httpx.AsyncClient(
                base_url=root, headers={"Authorization": f"Bearer {admin}"}
            ) as http:
                account_id = await open_account(GraphQLClient(http))
            async with (
                httpx.AsyncClient(timeout=30) as sse,
                subscribing(sse, url, admin, id=account_id) as response,
            ):
                stream = events(response)
                assert (await change_of(stream))["revision"] == 2
                server.should_exit = True
                async with asyncio.timeout(10):
                    rest = [event async for event in stream]
            event, payload = rest[0]
            assert event == "next" and payload["errors"][0]["extensions"]["code"] == "UNAVAILABLE"
            assert rest[-1][0] == "complete"
            await asyncio.wait_for(asyncio.shield(serving), 10)  # not the 60 s of grace
        finally:
            server.should_exit = True
            await serving
