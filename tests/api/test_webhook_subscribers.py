"""Outbound webhook subscribers through GraphQL: for admins only, refused before anything
is registered when the URL, the filter or the secret is wrong, and never more than
MAX_SUBSCRIBERS of them, however many register at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from temporalio.client import Client

import workers.webhook_subscribers
from tests.api.test_access import Caller, token
from tests.conftest import api_client, cache_of
from tests.workers.webhook_letters import failed_letter
from workers.cache import SnapshotCache
from workers.settings import Settings
from workers.webhook_subscribers import (
    LAST_ENTRY_ID,
    MAX_SUBSCRIBERS,
    WebhookSubscribers,
)

REGISTER = """mutation($url: String!, $events: JSON!, $secret: String) {
  registerWebhookSubscriber(url: $url, events: $events, secret: $secret) {
    secret subscriber { id url events createdBy } } }"""
LISTED = "{ webhookSubscribers { id url } }"
DEAD = "query($id: ID!) { webhookDeadLetters(subscriberId: $id) { hasMore entries { id } } }"
REMOVE = "mutation($id: ID!) { removeWebhookSubscriber(id: $id) }"
REPLAY_ALL = "mutation($id: ID!) { replayWebhookDeadLetters(subscriberId: $id) }"
DEAD_AFTER = """query($id: ID!, $after: String) { webhookDeadLetters(subscriberId: $id, first: 5,
  after: $after) { hasMore entries { id } } }"""
REPLAY = "mutation($s: ID!, $id: ID!) { replayWebhookDeadLetter(subscriberId: $s, id: $id) }"
GOOD = {"url": "https://example.com/hooks", "events": {"account": ["deposit"]}}


async def test_only_admins_manage_subscribers(secured_http: httpx.AsyncClient) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    registered = (await admin.data(REGISTER, **GOOD))["registerWebhookSubscriber"]
    subscriber_id = registered["subscriber"]["id"]
    assert registered["subscriber"]["createdBy"] == "admin:alice"
    for caller in (
        Caller(secured_http, token("customer", "ada", accounts=["ada"])),
        Caller(secured_http, token("service", "billing", scope="account:* read:*")),
    ):
        assert await caller.code(REGISTER, **GOOD) == "FORBIDDEN"
        assert await caller.code(LISTED) == "FORBIDDEN"
        assert await caller.code(DEAD, id=subscriber_id) == "FORBIDDEN"
        assert await caller.code(REPLAY_ALL, id=subscriber_id) == "FORBIDDEN"
        assert await caller.code(REMOVE, id=subscriber_id) == "FORBIDDEN"
    listed = (await admin.data(LISTED))["webhookSubscribers"]
    assert {"id": subscriber_id, "url": GOOD["url"]} in listed
    assert (await admin.data(DEAD, id=subscriber_id))["webhookDeadLetters"] == {
        "hasMore": False,
        "entries": [],
    }
    assert (await admin.data(REPLAY_ALL, id=subscriber_id))["replayWebhookDeadLetters"] == 0
    await admin.data(REMOVE, id=subscriber_id)
    assert await admin.code(REMOVE, id=subscriber_id) == "NOT_FOUND"
    assert await admin.code(DEAD, id=subscriber_id) == "NOT_FOUND"


@pytest.mark.parametrize(
    ("url", "events", "secret"),
    [
        ("ftp://example.com/hooks", GOOD["events"], None),
        ("javascript:alert(1)", GOOD["events"], None),
        ("not a url", GOOD["events"], None),
        ("https:///no-host", GOOD["events"], None),
        ("https://example.com/" + "a" * 2100, GOOD["events"], None),
        (GOOD["url"], {}, None),
        (GOOD["url"], {"spaceship": ["*"]}, None),
        (GOOD["url"], {"account": ["launch"]}, None),
        (GOOD["url"], {"account": []}, None),
        (GOOD["url"], {"account": "deposit"}, None),
        (GOOD["url"], GOOD["events"], "not-a-secret"),
        (GOOD["url"], GOOD["events"], "whsec_c2hvcnQ="),  # "short": under 16 bytes
        # 17 bytes without the base64's padding: the receiver's library cannot load it
        (GOOD["url"], GOOD["events"], "whsec_a2tra2tra2tra2tra2tra2s"),
    ],
)
async def test_a_wrong_subscriber_is_invalid_input_and_registers_nothing(
    secured_http: httpx.AsyncClient, url: str, events: object, secret: str | None
) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    before = (await admin.data(LISTED))["webhookSubscribers"]
    assert await admin.code(REGISTER, url=url, events=events, secret=secret) == "INVALID_INPUT"
    assert (await admin.data(LISTED))["webhookSubscribers"] == before


async def test_a_given_secret_is_kept_and_every_type_may_be_wanted(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    events = {"inventory": ["*"], "account": ["withdraw", "deposit", "become_dormant"]}
    registered = (
        await admin.data(REGISTER, url="http://127.0.0.1:9/x", events=events, secret=secret)
    )["registerWebhookSubscriber"]
    assert registered["secret"] == secret
    Webhook(secret)  # a receiver's library loads it
    assert registered["subscriber"]["events"] == {
        "inventory": ["*"],
        "account": ["become_dormant", "deposit", "withdraw"],
    }
    await admin.data(REMOVE, id=registered["subscriber"]["id"])


async def _error(caller: Caller, query: str, **variables: Any) -> dict[str, Any]:
    body = (await caller.post(query, **variables)).json()
    assert body.get("errors"), body
    error: dict[str, Any] = body["errors"][0]
    return error


@pytest.mark.parametrize(
    "url",
    [
        "http://xn--/",  # not an A-label: IDNA refuses it
        "https://xn--zz.example/",
        "http://127.0.0.1:99999/x",
        "http://x:-1/",
        "http://x:0/",
        "http://a b/",
        "http://%00/",
        "http://a%2eb/",
        "http://a..b/",
        "http://.a/",
        "http://-a/",
        # Neither a name nor an IPv4 address written in full.
        "http://1.2.3.4.5/",
        "http://1.2.3/",
        "http://123/",
        "http://0x7f.0.0.1/",
        "http://user:pass@example.com/hooks",
        "http://user@example.com/hooks",
    ],
)
async def test_an_undeliverable_url_is_invalid_input_naming_url(
    secured_http: httpx.AsyncClient, url: str
) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    before = (await admin.data(LISTED))["webhookSubscribers"]
    error = await _error(admin, REGISTER, url=url, events=GOOD["events"])
    assert error["extensions"]["code"] == "INVALID_INPUT", error
    assert error["message"].startswith("url: "), error
    assert (await admin.data(LISTED))["webhookSubscribers"] == before


async def test_a_url_with_credentials_is_refused_saying_why(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    url = "https://alice:hunter2@example.com/hooks"
    error = await _error(admin, REGISTER, url=url, events=GOOD["events"])
    assert error["extensions"]["code"] == "INVALID_INPUT"
    assert "credentials" in error["message"]
    assert "hunter2" not in error["message"]


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("http://127.0.0.1:65535/x", "http://127.0.0.1:65535/x"),
        ("http://localhost:1/", "http://localhost:1/"),
        ("http://[::1]:8080/hooks", "http://[::1]:8080/hooks"),
        ("https://bücher.example/hooks", "https://xn--bcher-kva.example/hooks"),
        ("http://hooks_receiver/in", "http://hooks_receiver/in"),
        ("https://example.com./hooks?a=1", "https://example.com./hooks?a=1"),
    ],
)
async def test_a_deliverable_url_is_stored(
    secured_http: httpx.AsyncClient, url: str, stored: str
) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    registered = (await admin.data(REGISTER, url=url, events=GOOD["events"]))[
        "registerWebhookSubscriber"
    ]
    assert registered["subscriber"]["url"] == stored
    await admin.data(REMOVE, id=registered["subscriber"]["id"])


async def test_a_dead_letter_id_out_of_a_stream_ids_range_is_refused_as_any_wrong_one(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "alice"))
    registered = (await admin.data(REGISTER, **GOOD))["registerWebhookSubscriber"]
    subscriber_id = registered["subscriber"]["id"]
    for too_big in ("99999999999999999999-1", f"1-{2**64}", f"{2**64}-0"):
        for subscriber in ("wh_0", subscriber_id):
            assert await admin.code(REPLAY, s=subscriber, id=too_big) == "NOT_FOUND"
        assert await admin.code(DEAD_AFTER, id=subscriber_id, after=too_big) == "INVALID_INPUT"
    # the largest id is well formed: nothing has it, and nothing follows it
    assert await admin.code(REPLAY, s=subscriber_id, id=LAST_ENTRY_ID) == "NOT_FOUND"
    page = await admin.data(DEAD_AFTER, id=subscriber_id, after=LAST_ENTRY_ID)
    assert page["webhookDeadLetters"] == {"hasMore": False, "entries": []}
    await admin.data(REMOVE, id=subscriber_id)


@pytest.fixture
def alone(secured: Settings) -> Settings:
    """`secured` under a key prefix of its own: a registry that no other test adds to."""
    prefix = f"{secured.redis_prefix}{uuid.uuid4().hex[:8]}:"
    return secured.model_copy(update={"redis_prefix": prefix})


async def test_registrations_at_once_never_pass_the_bound(
    alone: Settings, temporal_client: Client
) -> None:
    over = 30
    async with api_client(alone, temporal_client) as http:
        admin = Caller(http, token("admin", "alice"))
        codes = await asyncio.gather(
            *(admin.code(REGISTER, **GOOD) for _ in range(MAX_SUBSCRIBERS + over))
        )
    assert codes.count(None) == MAX_SUBSCRIBERS
    assert codes.count("LIMIT_REACHED") == over
    async with cache_of(alone) as cache:
        stored = await WebhookSubscribers(cache.client, cache.prefix).all()
    assert len(stored) == MAX_SUBSCRIBERS


REGISTER_KEYED = """mutation($url: String!, $events: JSON!, $key: String) {
  registerWebhookSubscriber(url: $url, events: $events, idempotencyKey: $key) {
    secret subscriber { id url createdBy } } }"""


async def test_a_registration_sent_again_under_its_key_registers_one_subscriber(
    alone: Settings, temporal_client: Client
) -> None:
    """A registration whose answer was lost, sent again: without a key it made a second
    subscriber, and every change was posted twice, half of them signed with a secret no
    one had seen. Under its key, however often and at once, one subscriber, each answer
    with its secret."""
    async with api_client(alone, temporal_client) as http:
        alice = Caller(http, token("admin", "alice"))
        answers = await asyncio.gather(
            *(alice.data(REGISTER_KEYED, **GOOD, key="hooks-1") for _ in range(5))
        )
        registered = {
            (
                a["registerWebhookSubscriber"]["subscriber"]["id"],
                a["registerWebhookSubscriber"]["secret"],
            )
            for a in answers
        }
        assert len(registered) == 1
        [(subscriber_id, secret)] = registered
        assert secret.startswith("whsec_")
        elsewhere = {**GOOD, "url": "https://example.com/other"}
        assert await alice.code(REGISTER_KEYED, **elsewhere, key="hooks-1") == (
            "IDEMPOTENCY_KEY_REUSED"
        )
        # Another caller's key is its own.
        bob = Caller(http, token("admin", "bob"))
        theirs = (await bob.data(REGISTER_KEYED, **GOOD, key="hooks-1"))[
            "registerWebhookSubscriber"
        ]
        assert theirs["subscriber"]["id"] != subscriber_id
        assert await alice.code(REGISTER_KEYED, **GOOD, key="has space") == "INVALID_INPUT"
    async with cache_of(alone) as cache:
        stored = await WebhookSubscribers(cache.client, cache.prefix).all()
    assert sorted((s.created_by, s.url) for s in stored) == [
        ("admin:alice", GOOD["url"]),
        ("admin:bob", GOOD["url"]),
    ]


async def test_replays_no_delivery_takes_are_refused_past_a_bound(
    secured_http: httpx.AsyncClient, cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays asked again and again while the subscriber's delivery does not take them
    filled a stream without end; past its bound a replay is LIMIT_REACHED, and the letters
    stay dead letters, to be replayed later."""
    monkeypatch.setattr(workers.webhook_subscribers, "MAX_REPLAYS_WAITING", 1)
    admin = Caller(secured_http, token("admin", "alice"))
    subscriber = (await admin.data(REGISTER, **GOOD))["registerWebhookSubscriber"]["subscriber"]
    registry = WebhookSubscribers(cache.client, cache.prefix)
    for n in range(2):
        await registry.dead_letter(subscriber["id"], failed_letter(n))
    try:
        assert (await admin.data(REPLAY_ALL, id=subscriber["id"]))["replayWebhookDeadLetters"] == 1
        assert await admin.code(REPLAY_ALL, id=subscriber["id"]) == "LIMIT_REACHED"
        dead = (await admin.data(DEAD, id=subscriber["id"]))["webhookDeadLetters"]["entries"]
        assert len(dead) == 1
    finally:
        await admin.data(REMOVE, id=subscriber["id"])
