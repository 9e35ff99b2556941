"""Outbound webhook subscribers through GraphQL: for admins only, and refused before anything
is registered when the URL, the filter or the secret is wrong."""

from __future__ import annotations

import httpx
import pytest

from tests.api.test_access import Caller, token

REGISTER = """mutation($url: String!, $events: JSON!, $secret: String) {
  registerWebhookSubscriber(url: $url, events: $events, secret: $secret) {
    secret subscriber { id url events createdBy } } }"""
LISTED = "{ webhookSubscribers { id url } }"
DEAD = "query($id: ID!) { webhookDeadLetters(subscriberId: $id) { hasMore entries { id } } }"
REMOVE = "mutation($id: ID!) { removeWebhookSubscriber(id: $id) }"
REPLAY_ALL = "mutation($id: ID!) { replayWebhookDeadLetters(subscriberId: $id) }"
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
    assert registered["subscriber"]["events"] == {
        "inventory": ["*"],
        "account": ["become_dormant", "deposit", "withdraw"],
    }
    await admin.data(REMOVE, id=registered["subscriber"]["id"])
