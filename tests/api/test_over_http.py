"""GraphQL over HTTP as its specification has it: the graphql-http audit suite against the
real app served by uvicorn, then what each rule means to a client, a refused mutation
storing nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from temporalio.client import Client

from api.app import create_app
from api.over_http import GRAPHQL_RESPONSE, JSON, negotiate
from deploy.embedded import free_port
from tests.api.test_access import token
from tests.api.test_accounts_api import OPEN, READ
from tests.conftest import new_id
from workers.settings import Settings

AUDIT = Path(__file__).parent / "http_audit"
ADMIN = token("admin", "ops")

DEPOSIT = "mutation { depositToAccount(id: $ID, amount: 5, wait: true) { status } }"


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        ("application/json", JSON),
        ("application/json; charset=utf-8", JSON),
        (GRAPHQL_RESPONSE, GRAPHQL_RESPONSE),
        (f"{GRAPHQL_RESPONSE}, application/json, multipart/mixed", GRAPHQL_RESPONSE),
        (f"application/json, {GRAPHQL_RESPONSE}", GRAPHQL_RESPONSE),
        (f"application/json, {GRAPHQL_RESPONSE};q=0.9", JSON),
        (f"{GRAPHQL_RESPONSE};q=0.5, */*;q=0.1", GRAPHQL_RESPONSE),
        ("text/html, */*;q=0.8", JSON),
        ("application/json;q=0", None),
        ("text/html", None),
        ("text/plain, image/png", None),
        ("nonsense", None),
    ],
)
def test_the_accept_header_chooses_the_media_type(accept: str | None, chosen: str | None) -> None:
    assert negotiate(accept) == chosen


@pytest.fixture
async def served(secured: Settings, temporal_client: Client) -> AsyncIterator[str]:
    """The app behind a real uvicorn on a free port, as `python -m api` serves it, in
    production with introspection turned on: the audits query `__type`, which production's
    default refuses as a validation error (a 400, as it should be)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(
            secured.model_copy(update={"introspection": True}), temporal_client=temporal_client
        ),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        server_header=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}/graphql"
    server.should_exit = True
    await task


async def test_every_graphql_http_server_audit_passes(served: str, worker: object) -> None:
    node = shutil.which("node")
    assert node, "the graphql-http audit needs Node.js (`make test` installs its packages)"
    assert (AUDIT / "node_modules" / "graphql-http").is_dir(), "run `make test`: it runs npm ci"
    process = await asyncio.create_subprocess_exec(
        node,
        "audit.mjs",
        cwd=AUDIT,
        env={**os.environ, "URL": served, "TOKEN": ADMIN},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0
    results = json.loads(out)
    assert len(results) >= 60  # the suite as pinned has 61 audits
    not_ok = [
        f"{r['status']} {r['id']} {r['name']}: {r['reason']}"
        for r in results
        if r["status"] != "ok"
    ]
    assert not_ok == []  # warnings included


async def test_what_each_rule_means_to_a_client(served: str, worker: object) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    grj = {**admin, "accept": GRAPHQL_RESPONSE}
    async with httpx.AsyncClient(headers=admin) as http:
        account_id = new_id()
        opened = await http.post(served, json={"query": OPEN, "variables": {"id": account_id}})
        assert "errors" not in opened.json(), opened.json()
        deposit = DEPOSIT.replace("$ID", json.dumps(account_id))

        # A mutation by GET is refused with 405 and stores nothing.
        by_get = await http.get(served, params={"query": deposit})
        assert by_get.status_code == 405
        assert by_get.headers["allow"] == "POST"
        assert by_get.json()["errors"][0]["extensions"]["code"] == "METHOD_NOT_ALLOWED"
        read = await http.post(
            served, json={"query": READ, "variables": {"id": account_id, "consistency": "LIVE"}}
        )
        assert read.json()["data"]["account"]["revision"] == 1
        assert read.json()["data"]["account"]["balance"] == 0

        # A query by GET runs, answered in the media type asked for.
        typename = await http.get(served, params={"query": "{ __typename }"}, headers=grj)
        assert typename.status_code == 200
        assert typename.headers["content-type"] == f"{GRAPHQL_RESPONSE}; charset=utf-8"
        assert typename.json() == {"data": {"__typename": "Query"}}

        # A request error: 400 and no data in the new media type, 200 with null data in JSON.
        for query in ("{ account(id: ", "{ nope }"):
            refused = await http.post(served, json={"query": query}, headers=grj)
            assert refused.status_code == 400
            assert "data" not in refused.json()
            assert refused.json()["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
            legacy = await http.post(served, json={"query": query})
            assert legacy.status_code == 200
            assert legacy.headers["content-type"] == f"{JSON}; charset=utf-8"
            assert legacy.json()["data"] is None
        coercion = await http.post(
            served,
            json={"query": READ, "variables": {"id": "x", "consistency": "SOMETIMES"}},
            headers=grj,
        )
        assert coercion.status_code == 400
        assert "data" not in coercion.json()

        # An error during execution is no request error: 200, with its data.
        missing = await http.post(
            served,
            json={"query": READ, "variables": {"id": new_id(), "consistency": "CACHED"}},
            headers=grj,
        )
        assert missing.status_code == 200
        assert missing.json()["data"] == {"account": None}

        # Every answer says what it varies by (Accept, and CORS's Origin) in one header,
        # replayed or not.
        cached = {"query": READ, "variables": {"id": account_id, "consistency": "CACHED"}}
        first, replayed = [await http.post(served, json=cached, headers=grj) for _ in range(2)]
        assert replayed.json() == first.json() and first.json()["data"]["account"]
        for response in (typename, legacy, missing, first, replayed):
            assert response.headers.get_list("vary") == ["Accept, Origin"], response.headers

        # Other methods, and media types the API cannot answer with.
        put = await http.put(served, json={"query": "{ __typename }"})
        assert (put.status_code, put.headers["allow"]) == (405, "GET, POST")
        assert put.json()["errors"][0]["extensions"]["code"] == "METHOD_NOT_ALLOWED"
        xml = await http.post(
            served, json={"query": "{ __typename }"}, headers={"accept": "application/xml"}
        )
        assert xml.status_code == 406
        assert xml.json()["errors"][0]["extensions"]["code"] == "NOT_ACCEPTABLE"

        # Refusals before GraphQL speak the negotiated media type too, and no response
        # says what serves it.
        anonymous = await http.post(
            served,
            json={"query": "{ __typename }"},
            headers={"authorization": "", "accept": GRAPHQL_RESPONSE},
        )
        assert anonymous.status_code == 401
        assert anonymous.headers["content-type"] == f"{GRAPHQL_RESPONSE}; charset=utf-8"
        assert "server" not in anonymous.headers and "server" not in typename.headers


async def test_a_subscription_sent_as_a_plain_request_is_told_how_to_subscribe(
    served: str,
) -> None:
    """A subscription's results need an event stream or a WebSocket: sent as a query would
    be, by POST or GET, it is a request error with its code and the transports to use, not a
    resolver's INTERNAL error."""
    follow = 'subscription { accountChanged(id: "x") { revision } }'
    changes = "subscription { changes(entityType: ACCOUNT) { revision } }"
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {ADMIN}"}) as http:
        for query in (follow, changes):
            legacy = await http.post(served, json={"query": query})
            assert legacy.status_code == 200
            assert legacy.json()["data"] is None
            [error] = legacy.json()["errors"]
            assert error["extensions"]["code"] == "INVALID_INPUT"
            assert "path" not in error
            assert "text/event-stream" in error["message"]
            assert "graphql-transport-ws" in error["message"]
            by_get = await http.get(served, params={"query": query})
            assert by_get.status_code == 200 and by_get.json() == legacy.json()
            # A request error, as the newer media type has them: 400 and no data.
            for method in ("POST", "GET"):
                refused = await http.request(
                    method,
                    served,
                    json={"query": query} if method == "POST" else None,
                    params={"query": query} if method == "GET" else None,
                    headers={"accept": GRAPHQL_RESPONSE},
                )
                assert refused.status_code == 400
                assert refused.json() == {"errors": [error]}


async def test_a_document_of_several_operations_runs_none_without_a_name(
    http: httpx.AsyncClient,
) -> None:
    """GraphQL asks the client to name the operation to run; the first was run, a mutation
    even."""
    account_id = new_id()
    open_it = (
        f'mutation Open {{ openAccount(id: "{account_id}", ownerName: "A", email: "a@b.cc", '
        "wait: true) { commandId } }"
    )
    read = f'query Read {{ account(id: "{account_id}") {{ status }} }}'
    for document in (f"{open_it} {read}", f"{read} {open_it}"):
        body = (await http.post("/graphql", json={"query": document})).json()
        assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT", body
        assert "operation name" in body["errors"][0]["message"]
    named = {"query": f"{open_it} {read}", "operationName": "Read"}
    assert (await http.post("/graphql", json=named)).json() == {"data": {"account": None}}
    # A name the document does not have is a request error as the missing name is: 200 with
    # null data as application/json (it was a 400 there), 400 as graphql-response+json.
    unknown = {"query": f"{open_it} {read}", "operationName": "Nope"}
    for accept, status in (
        ("application/json", 200),
        ("application/graphql-response+json", 400),
    ):
        answered = await http.post("/graphql", json=unknown, headers={"accept": accept})
        assert answered.status_code == status, (accept, answered.text)
        assert answered.json()["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
        assert "Nope" in answered.json()["errors"][0]["message"]
