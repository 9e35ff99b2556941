"""Hostile input refused cheaply, each limit with its own code, through the real app: a
request at a limit goes through, one just over it is refused, and a refused one stores
nothing. Then malformed bodies (400, never 500) and production's defaults."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from graphql import GraphQLError, build_client_schema, get_introspection_query
from temporalio.client import Client

from api.app import API_POLICY, GRAPHIQL_POLICY
from api.documents import KEPT_CHARS, Documents
from api.errors import LimitCode, present_error
from api.limits import DocumentLimits
from api.schema import MAX_LOGGED_ERRORS, build_schema
from tests.api.test_access import SECRET, token
from tests.api.test_accounts_api import open_active, read_account
from tests.conftest import GraphQLClient, LogCapture, api_client, new_id
from workers.settings import Settings

REFUSALS = {code.value for code in LimitCode} | {"INVALID_INPUT"}


async def post(http: httpx.AsyncClient, query: str, **variables: Any) -> httpx.Response:
    return await http.post("/graphql", json={"query": query, "variables": variables})


def codes(response: httpx.Response) -> list[str]:
    return [error["extensions"]["code"] for error in response.json().get("errors", [])]


def aliases(n: int) -> str:
    return "{ " + " ".join(f"a{i}: __typename" for i in range(n)) + " }"


def root_fields(n: int) -> str:
    return "{ " + "__typename " * n + "}"


def tokens(n: int) -> str:
    # `{ account ( id : "x" ) { id } }` is 11 tokens, and each comment one more.
    return "# padding\n" * (n - 11) + '{ account(id: "x") { id } }'


ACCOUNT_FIELDS = [
    *("id", "revision", "updatedAt", "stale", "source", "cachedAt", "status", "ownerName"),
    *("email", "currency", "balance", "lastActivityAt", "suspensionReason", "kycReference"),
]


def directives(n: int) -> str:
    # Two on each inline fragment, each around another field (no field selected 5 times).
    pairs = [
        f"... @include(if: true) @skip(if: false) {{ {ACCOUNT_FIELDS[i % 14]} }}"
        for i in range(n // 2)
    ]
    odd = " ... @include(if: true) { id }" if n % 2 else ""
    return '{ account(id: "x") { ' + " ".join(pairs) + odd + " } }"


def fields(n: int) -> str:
    return '{ account(id: "x") { ' + " ".join(ACCOUNT_FIELDS[:n]) + " } }"


def repeats(n: int) -> str:
    return '{ account(id: "x") { ' + "balance " * n + "} }"


def characters(n: int) -> str:
    document = '{ account(id: "x") { id } }'
    return document + " " * (n - len(document))


def live_reads(n: int) -> str:
    reads = " ".join(f'r{i}: account(id: "x", consistency: $c) {{ id }}' for i in range(n))
    return "query($c: Consistency) { " + reads + " }"


def deposits(n: int) -> str:
    sent = " ".join(
        f"d{i}: depositToAccount(id: $id, amount: 1, wait: true) {{ status }}" for i in range(n)
    )
    return "mutation($id: ID!) { " + sent + " }"


CASES = {
    # name: (settings, document at the limit, document just over it, variables, code)
    "depth": (
        {"max_query_depth": 2},
        '{ cart(id: "x") { id } }',
        '{ cart(id: "x") { lines { sku } } }',
        {},
        "QUERY_TOO_DEEP",
    ),
    "aliases": ({}, aliases(15), aliases(16), {}, "TOO_MANY_ALIASES"),
    "tokens": ({}, tokens(1000), tokens(1001), {}, "TOO_MANY_TOKENS"),
    "directives": ({}, directives(50), directives(51), {}, "TOO_MANY_DIRECTIVES"),
    "root fields": ({}, root_fields(20), root_fields(21), {}, "TOO_MANY_ROOT_FIELDS"),
    "fields": ({"max_fields": 11}, fields(10), fields(12), {}, "TOO_MANY_FIELDS"),
    "one field repeated": ({}, repeats(20), repeats(21), {}, "TOO_MANY_FIELDS"),
    "one object field repeated": (
        {},
        '{ cart(id: "x") { ' + "lines { sku } " * 3 + "} }",
        '{ cart(id: "x") { ' + "lines { sku } " * 4 + "} }",
        {},
        "TOO_MANY_FIELDS",
    ),
    "characters": (
        {"max_document_chars": 300},
        characters(300),
        characters(301),
        {},
        "DOCUMENT_TOO_LARGE",
    ),
    "live reads": ({}, live_reads(5), live_reads(6), {"c": "LIVE"}, "TOO_MANY_LIVE_READS"),
    # A cart holds 100 lines at most: its lines' 2 fields are 200 values, with the cart and
    # the list 202; the cart's id one more.
    "response values": (
        {"max_response_values": 202},
        '{ cart(id: "x") { lines { sku quantity } } }',
        '{ cart(id: "x") { id lines { sku quantity } } }',
        {},
        "RESPONSE_TOO_LARGE",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_a_document_at_each_limit_runs_and_one_over_it_is_refused_with_its_code(
    settings: Settings,
    temporal_client: Client,
    case: tuple[dict[str, Any], str, str, dict[str, Any], str],
) -> None:
    update, within, over, variables, code = case
    async with api_client(settings.model_copy(update=update), temporal_client) as http:
        ran = await post(http, within, **variables)
        assert ran.status_code == 200 and not set(codes(ran)) & REFUSALS, ran.json()
        refused = await post(http, over, **variables)
        assert refused.status_code == 200 and codes(refused) == [code], refused.json()
        assert refused.json()["data"] is None


async def test_the_default_depth_refuses_nine_levels(http: httpx.AsyncClient) -> None:
    deep = "{ " + "a { " * 8 + "b" + " }" * 8 + " }"
    assert codes(await post(http, deep))[0] == "QUERY_TOO_DEEP"


async def test_a_fragment_counts_each_time_it_is_spread(http: httpx.AsyncClient) -> None:
    eight = " ".join(f"a{i}: __typename" for i in range(8))
    twice = "{ ...F ...F } fragment F on Query { " + eight + " }"
    assert codes(await post(http, twice)) == ["TOO_MANY_ALIASES"]
    # Each fragment spreads the next twice: 2^40 aliases, counted without 2^40 steps.
    chain = " ".join(f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}" for i in range(40))
    doubling = "{ ...F0 } " + chain + " fragment F40 on Query { a: __typename }"
    assert codes(await post(http, doubling))[0] == "TOO_MANY_ALIASES"


async def test_live_reads_are_counted_however_live_is_chosen(
    gql: GraphQLClient, http: httpx.AsyncClient
) -> None:
    reads = (f'r{i}: account(id: "x", consistency: LIVE) {{ id }}' for i in range(6))
    literal = "{ " + " ".join(reads) + " }"
    assert codes(await post(http, literal)) == ["TOO_MANY_LIVE_READS"]
    by_default = live_reads(6).replace("$c: Consistency", "$c: Consistency = LIVE")
    assert codes(await post(http, by_default)) == ["TOO_MANY_LIVE_READS"]
    # A fragment's LIVE reads count each time it is spread: 3, spread twice.
    three = (f'r{i}: account(id: "x", consistency: LIVE) {{ id }}' for i in range(3))
    spread = "{ ...F ... on Query { ...F } } fragment F on Query { " + " ".join(three) + " }"
    assert codes(await post(http, spread)) == ["TOO_MANY_LIVE_READS"]
    account_id = new_id()
    await open_active(gql, account_id)
    await read_account(gql, account_id, "LIVE")  # in the cache from here on
    cached = await post(http, live_reads(6).replace('"x"', f'"{account_id}"'), c="CACHED")
    assert not set(codes(cached)) & REFUSALS, cached.json()


async def test_a_refused_mutation_stores_nothing(
    gql: GraphQLClient, http: httpx.AsyncClient
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    ten = await post(http, deposits(10), id=account_id)
    assert ten.json()["data"]["d9"]["status"] == "APPLIED", ten.json()
    assert codes(await post(http, deposits(11), id=account_id)) == ["TOO_MANY_MUTATIONS"]
    too_large = deposits(1) + " " * (256 * 1024)
    refused = await post(http, too_large, id=account_id)
    assert (refused.status_code, codes(refused)) == (413, ["PAYLOAD_TOO_LARGE"])
    huge_amount = b'{"query": "%s", "variables": {"id": "%s", "a": %s}}' % (
        b"mutation($id: ID!, $a: Long!) { depositToAccount(id: $id, amount: $a) { status } }",
        account_id.encode(),
        b"9" * 5000,
    )
    malformed = await http.post(
        "/graphql", content=huge_amount, headers={"content-type": "application/json"}
    )
    assert (malformed.status_code, codes(malformed)) == (400, ["INVALID_INPUT"])
    account = await read_account(gql, account_id, "LIVE")
    assert (account["balance"], account["revision"]) == (10, 12)


async def test_a_page_counts_as_many_values_as_it_asks_for(
    gql: GraphQLClient, settings: Settings, temporal_client: Client
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    entries = "entries { commandId revision }"
    two = (
        "query($id: ID!, $n: Int!) { a: account(id: $id) { history(last: $n) { "
        + entries
        + " } } b: account(id: $id) { history { "
        + entries
        + " } } }"
    )
    async with api_client(
        settings.model_copy(update={"max_response_values": 250}), temporal_client
    ) as http:
        # The second page is the default 20 entries: 3 + 40 values; the first 3 + 2 n.
        ran = await post(http, two, id=account_id, n=100)
        assert (
            not set(codes(ran)) & REFUSALS
            and len(ran.json()["data"]["a"]["history"]["entries"]) == 2
        )
        # A page larger than a page may be is the resolver's to refuse, counted as the largest.
        assert codes(await post(http, two, id=account_id, n=101)) == ["INVALID_INPUT"]
        five = " ".join(
            f'p{i}: account(id: "x") {{ history(last: 100) {{ {entries} }} }}' for i in range(5)
        )
        assert codes(await post(http, "{ " + five + " }")) == ["RESPONSE_TOO_LARGE"]


async def test_a_mutation_whose_answer_would_be_too_large_stores_nothing(
    gql: GraphQLClient, settings: Settings, temporal_client: Client
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    sent = (
        "mutation($id: ID!, $n: Int!) { depositToAccount(id: $id, amount: 5, wait: true) { "
        "status account { history(last: $n) { entries { commandId revision } } } } }"
    )
    async with api_client(
        settings.model_copy(update={"max_response_values": 150}), temporal_client
    ) as http:
        refused = await post(http, sent, id=account_id, n=100)
        assert codes(refused) == ["RESPONSE_TOO_LARGE"] and refused.json()["data"] is None
        account = await read_account(gql, account_id, "LIVE")
        assert (account["balance"], account["revision"]) == (0, 2)
        ran = await post(http, sent, id=account_id, n=50)
        assert ran.json()["data"]["depositToAccount"]["status"] == "APPLIED", ran.json()
    assert (await read_account(gql, account_id, "LIVE"))["balance"] == 5


def request_of(size: int) -> bytes:
    """A valid request of exactly `size` bytes, padded with whitespace."""
    start, end = b'{"query": "{ __typename }"', b"}"
    return start + b" " * (size - len(start) - len(end)) + end


async def test_a_body_over_the_cap_is_refused_without_being_read(
    http: httpx.AsyncClient,
) -> None:
    json = {"content-type": "application/json"}
    cap = 256 * 1024
    at = await http.post("/graphql", content=request_of(cap), headers=json)
    assert at.status_code == 200 and at.json() == {"data": {"__typename": "Query"}}
    over = await http.post("/graphql", content=request_of(cap + 1), headers=json)
    assert (over.status_code, codes(over)) == (413, ["PAYLOAD_TOO_LARGE"])

    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(160):  # 10 MiB
            sent += 1
            yield b" " * 65536

    # Sent without a length, the body is refused once 256 KiB have come in.
    streamed = await http.post("/graphql", content=chunks(), headers=json)
    assert (streamed.status_code, codes(streamed)) == (413, ["PAYLOAD_TOO_LARGE"])
    assert sent <= 5
    # With a length over the cap, before a byte of it is read.
    sent = 0
    declared = await http.post(
        "/graphql", content=chunks(), headers={**json, "content-length": str(160 * 65536)}
    )
    assert (declared.status_code, codes(declared)) == (413, ["PAYLOAD_TOO_LARGE"])
    assert sent == 0


async def test_two_megabytes_of_aliases_are_refused_before_parsing_them_whole(
    settings: Settings, temporal_client: Client, http: httpx.AsyncClient
) -> None:
    document = aliases(150_000)
    assert len(document) > 2_000_000
    assert codes(await post(http, document)) == ["PAYLOAD_TOO_LARGE"]
    roomy = settings.model_copy(update={"max_body_bytes": 4 * 1024 * 1024})
    async with api_client(roomy, temporal_client) as roomy_http:
        assert codes(await post(roomy_http, document)) == ["DOCUMENT_TOO_LARGE"]
    unlimited = roomy.model_copy(update={"max_document_chars": 4 * 1024 * 1024})
    async with api_client(unlimited, temporal_client) as roomy_http:
        assert codes(await post(roomy_http, document)) == ["TOO_MANY_TOKENS"]


async def test_only_small_documents_within_the_limits_are_kept() -> None:
    documents = Documents(DocumentLimits.from_settings(Settings()), size=8)
    for refused, code in ((tokens(1001), "TOO_MANY_TOKENS"), (repeats(21), "TOO_MANY_FIELDS")):
        with pytest.raises(GraphQLError) as raised:
            await documents.parse(refused)
        assert raised.value.extensions == {"code": code}
    large = tokens(1000)  # within every limit, but longer than any client's document
    assert len(large) > KEPT_CHARS
    assert await documents.parse(large) is not await documents.parse(large)
    small = repeats(20)
    assert await documents.parse(small) is await documents.parse(small)


MALFORMED = {
    "invalid UTF-8": b'{"query": "{ __typename }", "variables": {"a": "\xff"}}',
    "5000 digits": b'{"query": "{ __typename }", "variables": {"a": ' + b"9" * 5000 + b"}}",
    "nested 100k deep": b'{"query": "{ __typename }", "variables": {"a": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}}",
    "NaN": b'{"query": "{ __typename }", "variables": {"a": NaN}}',
    "unpaired surrogate": b'{"query": "{ __typename }", "variables": {"a": "\\ud800"}}',
    "not JSON": b'{"query": ',
    "not an object": b'"{ __typename }"',
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_body_is_invalid_input_not_a_server_error(
    http: httpx.AsyncClient, body: bytes
) -> None:
    response = await http.post(
        "/graphql", content=body, headers={"content-type": "application/json"}
    )
    assert (response.status_code, codes(response)) == (400, ["INVALID_INPUT"])


async def test_a_well_formed_body_with_astral_characters_is_taken(http: httpx.AsyncClient) -> None:
    body = b'{"query": "{ __typename }", "variables": {"a": "\\ud83c\\udf53 \xf0\x9f\x8d\x93"}}'
    response = await http.post(
        "/graphql", content=body, headers={"content-type": "application/json"}
    )
    assert response.json() == {"data": {"__typename": "Query"}}


async def test_a_batch_is_refused_and_bad_variables_in_a_get_are_invalid_input(
    http: httpx.AsyncClient,
) -> None:
    batch = await http.post("/graphql", json=[{"query": "{ __typename }"}] * 2)
    assert (batch.status_code, codes(batch)) == (400, ["BATCH_NOT_SUPPORTED"])
    get = await http.get("/graphql", params={"query": "{ __typename }", "variables": "[[[" * 9})
    assert (get.status_code, codes(get)) == (400, ["INVALID_INPUT"])


def test_a_limit_code_is_kept_only_on_an_error_the_api_raised_itself() -> None:
    refused = GraphQLError("x", extensions={"code": "TOO_MANY_ALIASES"})
    assert present_error(refused)["extensions"] == {"code": "TOO_MANY_ALIASES"}
    boom = RuntimeError("boom")
    wrapped = GraphQLError("x", extensions={"code": "TOO_MANY_ALIASES"}, original_error=boom)
    assert present_error(wrapped)["extensions"] == {"code": "INVALID_INPUT"}


# -- production ---------------------------------------------------------------------------------


@pytest.fixture
def production(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "environment": "production",
            "auth_secret": SECRET,
            "cors_origins": ["https://shop.example"],
        }
    )


ADMIN = {"authorization": f"Bearer {token('admin', 'ops')}"}
INTROSPECTION = "{ __schema { queryType { name } } }"


async def test_production_answers_no_introspection_graphiql_or_suggestions(
    production: Settings, temporal_client: Client
) -> None:
    async with api_client(production, temporal_client) as http:
        asked = await http.post("/graphql", json={"query": INTROSPECTION}, headers=ADMIN)
        assert set(codes(asked)) == {"INVALID_INPUT"} and asked.json()["data"] is None
        page = await http.get("/graphql", headers={"accept": "text/html"})
        assert page.status_code == 404 and "graphiql" not in page.text.lower()
        typo = await http.post("/graphql", json={"query": "{ acount { id } }"}, headers=ADMIN)
        assert codes(typo) == ["INVALID_INPUT"]
        assert "account" not in typo.json()["errors"][0]["message"]
        whole = await http.post(
            "/graphql", json={"query": get_introspection_query()}, headers=ADMIN
        )
        assert set(codes(whole)) == {"INVALID_INPUT"}  # turned off, however much it asks
    opened = production.model_copy(update={"graphiql": True, "introspection": True})
    async with api_client(opened, temporal_client) as http:
        asked = await http.post("/graphql", json={"query": INTROSPECTION}, headers=ADMIN)
        assert asked.json() == {"data": {"__schema": {"queryType": {"name": "Query"}}}}
        whole = await http.post(
            "/graphql", json={"query": get_introspection_query()}, headers=ADMIN
        )
        assert "errors" not in whole.json(), whole.json()
        page = await http.get("/graphql", headers={"accept": "text/html"})
        assert page.status_code == 200 and "graphiql" in page.text.lower()


async def test_development_serves_graphiql_with_a_policy_that_lets_it_load(
    http: httpx.AsyncClient,
) -> None:
    page = await http.get("/graphql", headers={"accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-security-policy"] == GRAPHIQL_POLICY
    asked = await post(http, INTROSPECTION)
    assert asked.json() == {"data": {"__schema": {"queryType": {"name": "Query"}}}}
    # The whole schema, as GraphiQL and code generators ask for it (220 fields and more).
    for variant in (
        {},
        {"descriptions": False},
        {
            "input_value_deprecation": True,
            "specified_by_url": True,
            "directive_is_repeatable": True,
        },
    ):
        whole = await post(http, get_introspection_query(**variant))
        assert "errors" not in whole.json(), (variant, whole.json())
        client_schema = build_client_schema(whole.json()["data"])
        assert "account" in client_schema.query_type.fields  # type: ignore[union-attr]
    # Fifteen aliases of a deep fragment: 2,160 fields, 6.5 MB, seconds of the event loop.
    deep = "name description"
    for _ in range(2):
        deep = (
            f"name description fields {{ name description args {{ name description "
            f"type {{ name }} }} type {{ name kind ofType {{ name kind ofType {{ name kind "
            f"ofType {{ name kind {deep} }} {deep} }} {deep} }} {deep} }} }}"
        )
    aliased = " ".join(f"a{n}: __schema {{ types {{ ...T }} }}" for n in range(15))
    refused = await post(http, f"{{ {aliased} }} fragment T on __Type {{ {deep} }}")
    assert codes(refused) == ["TOO_MANY_FIELDS"], refused.json()
    assert "introspection" in refused.json()["errors"][0]["message"]
    typo = await post(http, "{ acount { id } }")
    assert "Did you mean 'account'" in typo.json()["errors"][0]["message"]


async def test_is_one_of_answers_on_wrapped_types_without_an_error(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Strawberry's resolver failed on every list and non-null type: 268 errors logged.
    query = "{ __schema { types { fields { type { isOneOf ofType { isOneOf } } } } } }"
    with caplog.at_level(logging.ERROR):
        asked = await post(http, query)
    assert "errors" not in asked.json(), asked.json()["errors"][:1]
    wrapped = [
        field["type"]
        for kind in asked.json()["data"]["__schema"]["types"]
        for field in kind["fields"] or []
        if field["type"]["ofType"] is not None
    ]
    assert wrapped and all(t["isOneOf"] is None for t in wrapped)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_request_logs_a_few_unexpected_errors_and_counts_the_rest(
    captured_logs: LogCapture,
) -> None:
    logs = captured_logs(Settings(log_format="json"), "api")
    errors = [
        GraphQLError(f"failed {n}", path=["a", n], original_error=RuntimeError(f"bug {n}"))
        for n in range(40)
    ]
    build_schema(Settings()).process_errors(errors)
    logged = [json.loads(line)["event"] for line in logs.getvalue().splitlines()]
    assert logged == [
        *(f"failed {n}" for n in range(MAX_LOGGED_ERRORS)),
        f"and {40 - MAX_LOGGED_ERRORS} more unexpected errors in the same request, not logged",
    ]


async def test_every_response_carries_the_security_headers(
    production: Settings, temporal_client: Client
) -> None:
    async with api_client(production, temporal_client) as http:
        responses = [
            await http.post("/graphql", json={"query": "{ __typename }"}, headers=ADMIN),
            await http.post("/graphql", json={"query": "{ __typename }"}),  # 401
            await http.get("/healthz"),
        ]
        for response in responses:
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["content-security-policy"] == API_POLICY
            assert "strict-transport-security" not in response.headers  # not over TLS
        assert [response.status_code for response in responses] == [200, 401, 200]
        async with httpx.AsyncClient(transport=http._transport, base_url="https://t") as tls:
            over_tls = await tls.get("/healthz")
        assert over_tls.headers["strict-transport-security"] == "max-age=31536000"


async def test_cors_preflight_is_allowed_from_the_allow_list_only(
    production: Settings, temporal_client: Client
) -> None:
    def preflight(origin: str) -> dict[str, str]:
        return {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        }

    async with api_client(production, temporal_client) as http:
        allowed = await http.options("/graphql", headers=preflight("https://shop.example"))
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
        other = await http.options("/graphql", headers=preflight("https://evil.example"))
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        simple = await http.post(
            "/graphql",
            json={"query": "{ __typename }"},
            headers={**ADMIN, "origin": "https://evil.example"},
        )
        assert "access-control-allow-origin" not in simple.headers


def test_the_limits_are_configured_from_the_environment_and_back() -> None:
    env = {
        "TENURE_MAX_QUERY_DEPTH": "4",
        "TENURE_MAX_ALIASES": "3",
        "TENURE_MAX_TOKENS": "500",
        "TENURE_MAX_DIRECTIVES": "7",
        "TENURE_MAX_ROOT_FIELDS": "9",
        "TENURE_MAX_LIVE_READS": "2",
        "TENURE_MAX_MUTATIONS": "1",
        "TENURE_MAX_BODY_BYTES": "65536",
        "TENURE_MAX_RESPONSE_VALUES": "2500",
        "TENURE_GRAPHIQL": "0",
        "TENURE_INTROSPECTION": "1",
        "TENURE_CORS_ORIGINS": "https://a.example, https://b.example",
    }
    settings = Settings.from_env(env)
    assert DocumentLimits.from_settings(settings) == DocumentLimits(
        depth=4, aliases=3, tokens=500, directives=7, root_fields=9, mutations=1, live_reads=2
    )
    assert settings.max_response_values == 2500
    assert (settings.max_body_bytes, settings.graphiql, settings.introspection) == (
        65536,
        False,
        True,
    )
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert Settings.from_env(settings.to_env()) == settings
    defaults = Settings.from_env({})
    assert Settings.from_env(defaults.to_env()) == defaults
    assert (defaults.graphiql, defaults.introspection, defaults.cors_origins) == (None, None, [])


async def test_reads_the_cache_cannot_answer_count_as_live_reads(
    gql: GraphQLClient, http: httpx.AsyncClient
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    await read_account(gql, account_id, "LIVE")  # in the cache from here on

    def reads(ids: list[str]) -> str:
        fields = " ".join(f'r{n}: account(id: "{i}") {{ revision }}' for n, i in enumerate(ids))
        return "{ " + fields + " }"

    cached = await post(http, reads([account_id] * 12))
    assert "errors" not in cached.json() and len(cached.json()["data"]) == 12
    # Ids the cache has never seen are each a query to Temporal: five, then refused.
    missing = await post(http, reads([new_id() for _ in range(6)]))
    body = missing.json()
    assert body["data"] == {f"r{n}": None for n in range(6)}  # five "no such account"
    assert codes(missing) == ["TOO_MANY_LIVE_READS"]  # and one not asked


DEPOSIT_ONE = "depositToAccount(id: $id, amount: 1, wait: true)"
OVER_EACH_LIMIT = {
    # name: (the document, over that limit, with a deposit in it; its code)
    "depth": (
        "mutation($id: ID!) { " + DEPOSIT_ONE + " { account { " + "a { " * 8 + "b }" * 8 + " } } }",
        "QUERY_TOO_DEEP",
    ),
    "aliases": (
        "mutation($id: ID!) { "
        + DEPOSIT_ONE
        + " { "
        + " ".join(f"s{i}: status" for i in range(16))
        + " } }",
        "TOO_MANY_ALIASES",
    ),
    "tokens": (
        "# padding\n" * 1000 + "mutation($id: ID!) { " + DEPOSIT_ONE + " { status } }",
        "TOO_MANY_TOKENS",
    ),
    "directives": (
        "mutation($id: ID!) { "
        + DEPOSIT_ONE
        + " { "
        + " ".join("... @include(if: true) { status }" for _ in range(51))
        + " } }",
        "TOO_MANY_DIRECTIVES",
    ),
    "characters": (
        "mutation($id: ID!) { " + DEPOSIT_ONE + " { status } }" + " " * 16 * 1024,
        "DOCUMENT_TOO_LARGE",
    ),
}


@pytest.mark.parametrize("case", OVER_EACH_LIMIT.values(), ids=OVER_EACH_LIMIT.keys())
async def test_a_deposit_in_a_document_over_a_limit_is_refused_and_stores_nothing(
    gql: GraphQLClient, http: httpx.AsyncClient, case: tuple[str, str]
) -> None:
    document, code = case
    account_id = new_id()
    await open_active(gql, account_id)
    refused = await post(http, document, id=account_id)
    assert codes(refused) == [code] and refused.json()["data"] is None, refused.json()
    batch = await http.post(
        "/graphql",
        json=[
            {
                "query": f"mutation($id: ID!) {{ {DEPOSIT_ONE} {{ status }} }}",
                "variables": {"id": account_id},
            }
        ],
    )
    assert batch.status_code == 400 and codes(batch) == ["BATCH_NOT_SUPPORTED"]
    account = await read_account(gql, account_id, "LIVE")
    assert (account["balance"], account["revision"]) == (0, 2)
