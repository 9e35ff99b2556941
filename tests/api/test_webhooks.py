"""Inbound webhooks through the app, as a provider meets them: signed deliveries become
commands applied once; everything else is refused with its status and code and stores
nothing. Deliveries are signed as the providers sign them: Standard Webhooks with the
reference implementation (the `standardwebhooks` package), Stripe's scheme with `hmac`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest
from standardwebhooks import Webhook
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.app import create_app
from api.webhooks import idempotency_key
from deploy.embedded import EmbeddedTemporal
from entities import catalog
from tests.conftest import WorkerFactory, api_client, new_id
from workers.settings import Settings, WebhookEvent, WebhookSource

AUTH_SECRET = "webhook-test-secret-" + "x" * 32
STANDARD_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
STRIPE_SECRET = "whsec_" + secrets.token_hex(16)

DEPOSIT = WebhookEvent(
    entity="account",
    command="deposit",
    entity_id="data.account_id",
    payload={"amount": "data.amount"},
)
STRIPE_DEPOSIT = WebhookEvent(
    entity="account",
    command="deposit",
    entity_id="data.object.metadata.account_id",
    payload={"amount": "data.object.amount"},
)
CLOSE_ACCOUNT = WebhookEvent(entity="account", command="close", entity_id="data.account_id")
SOURCES = {
    "payments": WebhookSource(
        scheme="standard",
        secret=STANDARD_SECRET,
        events={"payment.succeeded": DEPOSIT, "customer.deleted": CLOSE_ACCOUNT},
    ),
    # The same secret, a tighter window: the tolerance is the source's own.
    "strict": WebhookSource(
        scheme="standard",
        secret=STANDARD_SECRET,
        tolerance_seconds=60,
        events={"payment.succeeded": DEPOSIT},
    ),
    "stripe": WebhookSource(
        scheme="stripe", secret=STRIPE_SECRET, events={"charge.succeeded": STRIPE_DEPOSIT}
    ),
    "shop": WebhookSource(
        scheme="standard",
        secret=STANDARD_SECRET,
        events={
            "cart.created": WebhookEvent(
                entity="cart",
                command="createCart",
                entity_id="data.cart_id",
                payload={"account_id": "data.account_id"},
            )
        },
    ),
}

READ = """query($id: ID!) { account(id: $id, consistency: LIVE) { status balance revision
  history(last: 5) { entries { commandId command outcome code sentBy { role subject } } } } }"""
OPEN = """mutation($id: ID!) { openAccount(id: $id, ownerName: "Ada", email: "ada@example.com",
  wait: true) { commandId } }"""
VERIFY = "mutation($id: ID!) { verifyAccount(id: $id, wait: true) { commandId } }"
CLOSE = "mutation($id: ID!) { closeAccount(id: $id, wait: true) { commandId } }"


def admin_token() -> str:
    now = int(time.time())
    claims = {"sub": "ops", "iss": "tenure", "aud": "tenure-api", "iat": now, "exp": now + 600}
    return jwt.encode({**claims, "roles": ["admin"]}, AUTH_SECRET, algorithm="HS256")


@pytest.fixture
def secured(settings: Settings) -> Settings:
    """Tokens required on /graphql, as in production: webhooks need none."""
    return settings.model_copy(
        update={"environment": "production", "auth_secret": AUTH_SECRET, "webhook_sources": SOURCES}
    )


class Admin:
    """GraphQL as an operator: opens accounts and reads them LIVE."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {admin_token()}"}

    async def data(self, query: str, **variables: Any) -> dict[str, Any]:
        response = await self.http.post(
            "/graphql", json={"query": query, "variables": variables}, headers=self.headers
        )
        body: dict[str, Any] = response.json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def open_active(self) -> str:
        account_id = new_id()
        await self.data(OPEN, id=account_id)
        await self.data(VERIFY, id=account_id)
        return account_id

    async def account(self, account_id: str) -> dict[str, Any]:
        account: dict[str, Any] = (await self.data(READ, id=account_id))["account"]
        return account


@pytest.fixture
def admin(secured_http: httpx.AsyncClient) -> Admin:
    return Admin(secured_http)


# -- what providers send ----------------------------------------------------------------------


def payment(account_id: str, amount: Any = 1250, type: str = "payment.succeeded") -> bytes:
    event = {"type": type, "timestamp": "2026-12-02T01:00:00Z"}
    return json.dumps({**event, "data": {"account_id": account_id, "amount": amount}}).encode()


def standard(
    body: bytes,
    msg_id: str | None = None,
    at: float | None = None,
    secret: str = STANDARD_SECRET,
) -> dict[str, str]:
    """Standard Webhooks headers for `body`, signed by the reference implementation."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    sent_at = datetime.fromtimestamp(int(time.time() if at is None else at), tz=UTC)
    signature = Webhook(secret).sign(msg_id, sent_at, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def charge(account_id: str, amount: int = 700, event_id: str | None = None) -> bytes:
    obj = {"object": "charge", "amount": amount, "metadata": {"account_id": account_id}}
    event_id = event_id or f"evt_{uuid.uuid4().hex}"
    return json.dumps(
        {"id": event_id, "type": "charge.succeeded", "data": {"object": obj}}
    ).encode()


def stripe(body: bytes, at: float | None = None, secret: str = STRIPE_SECRET) -> dict[str, str]:
    """A Stripe-Signature for `body`, among a signature by another secret and a v0 entry,
    as an endpoint whose secret is being rolled sends it."""
    t = str(int(time.time() if at is None else at))

    def sign(key: str) -> str:
        return hmac.new(key.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()

    header = f"t={t},v1={sign('whsec_an-older-secret')},v1={sign(secret)},v0={sign('x')}"
    return {"stripe-signature": header, "content-type": "application/json"}


def code(response: httpx.Response) -> str:
    found: str = response.json()["errors"][0]["extensions"]["code"]
    return found


# -- deliveries that are applied --------------------------------------------------------------


async def test_a_standard_webhooks_delivery_deposits_once(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    body = payment(account_id, amount=1250)
    headers = standard(body, msg_id="msg_2mQh7Kx")
    response = await secured_http.post("/webhooks/payments", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"commandId": "webhook:payments:msg_2mQh7Kx", "status": "ACCEPTED"}

    # The same delivery again, and the provider's retry of it, signed anew a minute later.
    again = await secured_http.post("/webhooks/payments", content=body, headers=headers)
    retried = await secured_http.post(
        "/webhooks/payments",
        content=body,
        headers=standard(body, msg_id="msg_2mQh7Kx", at=time.time() + 60),
    )
    assert again.status_code == retried.status_code == 200
    assert again.json() == retried.json() == response.json()

    account = await admin.account(account_id)
    assert (account["balance"], account["revision"]) == (1250, 3)
    latest = account["history"]["entries"][0]
    assert latest["commandId"] == "webhook:payments:msg_2mQh7Kx"
    assert (latest["command"], latest["outcome"]) == ("deposit", "APPLIED")
    assert latest["sentBy"] == {"role": "service", "subject": "webhook:payments"}


async def test_a_stripe_delivery_deposits_once(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    body = charge(account_id, amount=700, event_id="evt_1PqR")
    for _ in range(2):  # Stripe retries the same event with a new signature
        response = await secured_http.post("/webhooks/stripe", content=body, headers=stripe(body))
        assert response.status_code == 200, response.text
        assert response.json() == {"commandId": "webhook:stripe:evt_1PqR", "status": "ACCEPTED"}
    account = await admin.account(account_id)
    assert (account["balance"], account["revision"]) == (700, 3)


async def test_the_same_event_id_from_two_sources_is_two_events(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    body = payment(account_id, amount=5)
    for source in ("payments", "strict"):
        headers = standard(body, msg_id="msg_shared")
        response = await secured_http.post(f"/webhooks/{source}", content=body, headers=headers)
        assert response.json()["commandId"] == f"webhook:{source}:msg_shared"
    assert (await admin.account(account_id))["balance"] == 10


async def test_an_event_id_too_long_for_a_key_is_hashed_and_applied_once(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    body = payment(account_id, amount=3)
    msg_id = "msg_" + "z" * 300
    for _ in range(2):
        response = await secured_http.post(
            "/webhooks/payments", content=body, headers=standard(body, msg_id=msg_id)
        )
        assert response.status_code == 200, response.text
    key = response.json()["commandId"]
    assert key == idempotency_key("payments", msg_id) and len(key) <= 128
    assert (await admin.account(account_id))["balance"] == 3


def test_idempotency_keys_are_namespaced_and_fit() -> None:
    assert idempotency_key("payments", "msg_1") == "webhook:payments:msg_1"
    long_id, spaced = "e" * 200, "an id with spaces"
    keys = {
        idempotency_key(source, event_id) for source in ("a", "b") for event_id in (long_id, spaced)
    }
    assert len(keys) == 4
    assert all(len(key) <= 128 and " " not in key for key in keys)
    # A plain key can never be a hashed one: after the source, ':' against '#'.
    assert idempotency_key("a", long_id).startswith("webhook:a#")
    longest = idempotency_key("s" * 40, "é" * 100)
    assert len(longest) <= 128 and len("service:webhook:" + "s" * 40) <= 160


# -- deliveries refused -----------------------------------------------------------------------


async def test_bad_signatures_are_401_and_store_nothing(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    body = payment(account_id)
    signed = standard(body)
    now = time.time()
    attempts: list[tuple[str, bytes, dict[str, str | bytes]]] = [
        # another body under the signature of this one
        ("payments", payment(account_id, amount=999_999), signed),
        ("payments", body, standard(body, secret="whsec_" + base64.b64encode(b"k" * 32).decode())),
        ("payments", body, {k: v for k, v in signed.items() if k != "webhook-signature"}),
        ("payments", body, {}),
        ("payments", body, {**signed, "webhook-signature": "v1,not base64!"}),
        # a byte past ASCII, which the header carries as latin-1 text: it was a 500
        ("payments", body, {**signed, "webhook-signature": b"v1,\xe9"}),
        ("payments", body, {**signed, "webhook-signature": "garbage"}),
        ("payments", body, {**signed, "webhook-signature": signed["webhook-signature"][:-4]}),
        ("payments", body, {**signed, "webhook-id": "msg_other"}),
        ("payments", body, {**signed, "webhook-timestamp": "soon"}),
        # a captured delivery replayed after the tolerance, or stamped ahead of it
        ("payments", body, standard(body, at=now - 330)),
        ("payments", body, standard(body, at=now + 330)),
        # within the 5 minutes of `payments`, not the minute of `strict`
        ("strict", body, standard(body, at=now - 120)),
        # Stripe's scheme: another secret, no header, a replay, a Standard signature
        ("stripe", charge(account_id), stripe(charge(account_id), secret="whsec_another-one")),
        ("stripe", charge(account_id), {}),
        ("stripe", charge(account_id), stripe(charge(account_id), at=now - 330)),
        ("stripe", body, signed),
    ]
    for source, content, headers in attempts:
        response = await secured_http.post(f"/webhooks/{source}", content=content, headers=headers)
        assert (response.status_code, code(response)) == (401, "UNAUTHENTICATED"), headers
        assert "whsec_" not in response.text
    account = await admin.account(account_id)
    assert (account["balance"], account["revision"]) == (0, 2)
    # The same delivery within the tolerance of `payments` is accepted.
    ok = await secured_http.post(
        "/webhooks/payments", content=body, headers=standard(body, at=now - 120)
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "payment.succeeded", "data": {"amount": 1}}',  # no account_id
        b'{"type": "payment.succeeded", "data": {"account_id": "ACCOUNT"}}',  # no amount
        b'{"type": "payment.succeeded", "data": "ACCOUNT"}',
        b'{"data": {"account_id": "ACCOUNT", "amount": 1}}',  # no type
        b'{"type": 7, "data": {"account_id": "ACCOUNT", "amount": 1}}',
        b'{"type": "payment.succeeded", "data": {"account_id": 42, "amount": 1}}',
        b'{"type": "payment.succeeded", "data": {"account_id": "no such id!", "amount": 1}}',
        b'{"type": "payment.succeeded", "data": {"account_id": "ACCOUNT", "amount": -5}}',
        b'{"type": "payment.succeeded", "data": {"account_id": "ACCOUNT", "amount": "ten"}}',
        b'{"type": "payment.succeeded", "data": {"account_id": "ACCOUNT", "amount": 1.5}}',
        b'{"type": "payment.succeeded", "data": {"account_id": "ACCOUNT", "amount": NaN}}',
        b'\xff{"type": "payment.succeeded"}',
    ],
)
async def test_a_malformed_event_is_400_and_stores_nothing(
    secured_http: httpx.AsyncClient, admin: Admin, body: bytes
) -> None:
    account_id = await admin.open_active()
    body = body.replace(b"ACCOUNT", account_id.encode())
    msg_id = f"msg_{uuid.uuid4().hex}"
    sent_at = datetime.fromtimestamp(int(time.time()), tz=UTC)
    # Signed as bytes: the reference implementation signs text only.
    signed = f"{msg_id}.{int(sent_at.timestamp())}.".encode() + body
    key = base64.b64decode(STANDARD_SECRET.removeprefix("whsec_"))
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": f"v1,{signature}",
    }
    response = await secured_http.post("/webhooks/payments", content=body, headers=headers)
    assert (response.status_code, code(response)) == (400, "INVALID_INPUT"), response.text
    account = await admin.account(account_id)
    assert (account["balance"], account["revision"]) == (0, 2)


async def test_a_stripe_event_without_an_id_is_400(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    event = json.loads(charge(account_id))
    del event["id"]
    body = json.dumps(event).encode()
    response = await secured_http.post("/webhooks/stripe", content=body, headers=stripe(body))
    assert (response.status_code, code(response)) == (400, "INVALID_INPUT")
    assert (await admin.account(account_id))["revision"] == 2


async def test_an_unmapped_event_type_is_202_and_ignored(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    body = payment(account_id, type="payment.refunded")
    response = await secured_http.post("/webhooks/payments", content=body, headers=standard(body))
    assert response.status_code == 202
    assert response.json() == {"status": "IGNORED"}
    account = await admin.account(account_id)
    assert (account["balance"], account["revision"]) == (0, 2)


async def test_an_unknown_source_is_404(secured_http: httpx.AsyncClient) -> None:
    body = payment(new_id())
    for path in ("/webhooks/nobody", "/webhooks/PAYMENTS"):
        response = await secured_http.post(path, content=body, headers=standard(body))
        assert (response.status_code, code(response)) == (404, "NOT_FOUND")


async def test_only_post_is_answered(secured_http: httpx.AsyncClient) -> None:
    assert (await secured_http.get("/webhooks/payments")).status_code == 405


async def test_an_oversized_body_is_413_unread(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    account_id = await admin.open_active()
    event = json.loads(payment(account_id))
    body = json.dumps({**event, "padding": "x" * (64 * 1024)}).encode()
    response = await secured_http.post("/webhooks/payments", content=body, headers=standard(body))
    assert (response.status_code, code(response)) == (413, "PAYLOAD_TOO_LARGE")

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length to go by
        for _ in range(100):
            yield b"x" * 1024

    response = await secured_http.post(
        "/webhooks/payments", content=streamed(), headers=standard(body)
    )
    assert (response.status_code, code(response)) == (413, "PAYLOAD_TOO_LARGE")
    assert (await admin.account(account_id))["revision"] == 2


# -- what becomes of the command --------------------------------------------------------------


async def test_a_delivery_to_an_account_that_does_not_exist_is_404(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    """Answered non-2xx, so the provider sends it again: the account may yet be opened, and
    a payment for no account is not silently dropped."""
    account_id = new_id()
    body = payment(account_id)
    response = await secured_http.post("/webhooks/payments", content=body, headers=standard(body))
    assert (response.status_code, code(response)) == (404, "NOT_FOUND")
    assert account_id in response.json()["errors"][0]["message"]
    # Opened since, the provider's next retry is applied.
    await admin.data(OPEN, id=account_id)
    await admin.data(VERIFY, id=account_id)
    retried = await secured_http.post("/webhooks/payments", content=body, headers=standard(body))
    assert retried.status_code == 200
    assert (await admin.account(account_id))["balance"] == 1250


async def test_a_delivery_to_a_closed_account_is_409(
    secured_http: httpx.AsyncClient, admin: Admin, temporal_client: Client
) -> None:
    """Once a closed account's workflow has finished (until then the account takes the
    command and refuses it, as below)."""
    account_id = await admin.open_active()
    await admin.data(CLOSE, id=account_id)
    await temporal_client.get_workflow_handle(f"account:{account_id}").result()
    body = payment(account_id)
    response = await secured_http.post("/webhooks/payments", content=body, headers=standard(body))
    assert (response.status_code, code(response)) == (409, "INVALID_TRANSITION")


async def test_a_repeat_of_the_event_that_closed_an_account_is_answered_as_the_first(
    secured_http: httpx.AsyncClient, admin: Admin, temporal_client: Client
) -> None:
    """The provider's retry of the event that closed the account, once its workflow had
    finished, was answered 409: the provider kept retrying it for days and flagged the
    endpoint as failing. Another event for the closed account is still 409."""
    account_id = await admin.open_active()
    body = payment(account_id, type="customer.deleted")
    headers = standard(body, msg_id=f"msg_close_{account_id}")
    first = await secured_http.post("/webhooks/payments", content=body, headers=headers)
    assert first.status_code == 200, first.text
    await temporal_client.get_workflow_handle(f"account:{account_id}").result()
    again = await secured_http.post("/webhooks/payments", content=body, headers=headers)
    assert (again.status_code, again.json()) == (200, first.json())
    other = payment(account_id)
    refused = await secured_http.post("/webhooks/payments", content=other, headers=standard(other))
    assert (refused.status_code, code(refused)) == (409, "INVALID_TRANSITION")
    assert (await admin.account(account_id))["status"] == "CLOSED"


async def test_a_cart_is_made_by_webhook_only_as_createcart_makes_one(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A createCart mapped from an inbound webhook went straight to the cart: it made carts
    for accounts that do not exist, and past an account's bound on carts. It is now checked
    as the mutation checks it: 404 NOT_FOUND and 409 LIMIT_REACHED, and nothing is made."""
    bounded = secured.model_copy(update={"max_carts_per_account": 1})
    async with run_worker(bounded), api_client(bounded, temporal_client) as http:
        admin = Admin(http)
        account_id = await admin.open_active()

        async def created(cart_id: str, account: str) -> httpx.Response:
            event = {"type": "cart.created", "data": {"cart_id": cart_id, "account_id": account}}
            body = json.dumps(event).encode()
            return await http.post("/webhooks/shop", content=body, headers=standard(body))

        nowhere, second = new_id(), new_id()
        refused = await created(nowhere, new_id())
        assert (refused.status_code, code(refused)) == (404, "NOT_FOUND")
        first = await created(new_id(), account_id)
        assert first.status_code == 200, first.text
        full = await created(second, account_id)
        assert (full.status_code, code(full)) == (409, "LIMIT_REACHED")
        for cart_id in (nowhere, second):
            read = "query($id: ID!) { cart(id: $id, consistency: LIVE) { status } }"
            assert (await admin.data(read, id=cart_id))["cart"] is None


async def test_a_command_the_account_refuses_is_accepted_and_its_rejection_recorded(
    secured_http: httpx.AsyncClient, admin: Admin
) -> None:
    """Answered once Temporal holds the command, before the account has applied it: a
    deposit to an account not yet verified is accepted, and refused by the account."""
    account_id = new_id()
    await admin.data(OPEN, id=account_id)
    body = payment(account_id)
    response = await secured_http.post(
        "/webhooks/payments", content=body, headers=standard(body, msg_id="msg_early")
    )
    assert response.status_code == 200
    account = await admin.account(account_id)
    assert (account["status"], account["balance"]) == ("PENDING", 0)
    latest = account["history"]["entries"][0]
    assert (latest["commandId"], latest["outcome"], latest["code"]) == (
        "webhook:payments:msg_early",
        "REJECTED",
        "INVALID_TRANSITION",
    )


async def test_temporal_unavailable_is_503(secured: Settings) -> None:
    """A provider retries a 503; the delivery is applied once Temporal is back (not shown
    here: a server of the test's own, stopped for good)."""
    async with EmbeddedTemporal() as server:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        async with api_client(secured, client) as http:
            server.stop()
            body = payment(new_id())
            response = await http.post("/webhooks/payments", content=body, headers=standard(body))
    assert (response.status_code, code(response)) == (503, "UNAVAILABLE")


async def test_no_token_is_needed_and_webhooks_are_counted(secured_http: httpx.AsyncClient) -> None:
    assert (
        await secured_http.post("/graphql", json={"query": "{ __typename }"})
    ).status_code == 401
    body = payment(new_id(), type="something.else")
    assert (
        await secured_http.post("/webhooks/payments", content=body, headers=standard(body))
    ).status_code == 202
    await secured_http.post("/webhooks/payments", content=body, headers={})
    metrics = (await secured_http.get("/metrics")).text
    assert 'tenure_api_requests_total{code="OK",operation="webhook"} 1.0' in metrics
    assert 'tenure_api_requests_total{code="UNAUTHENTICATED",operation="webhook"} 1.0' in metrics
    assert 'tenure_api_refusals_total{code="UNAUTHENTICATED"} 2.0' in metrics


# -- configuration ----------------------------------------------------------------------------


def test_sources_round_trip_through_the_environment() -> None:
    config = {name: source.as_config() for name, source in SOURCES.items()}
    settings = Settings.from_env({"TENURE_WEBHOOK_SOURCES": json.dumps(config)})
    assert settings.webhook_sources == SOURCES
    assert settings.webhook_sources["payments"].max_body_bytes == 64 * 1024
    assert settings.webhook_sources["payments"].tolerance_seconds == 300
    assert Settings.from_env(settings.to_env()) == settings
    assert STANDARD_SECRET not in repr(settings) and STRIPE_SECRET not in str(settings)


@pytest.mark.parametrize(
    "source",
    [
        {"scheme": "standard", "secret": "TOPSECRET-not-whsec-at-all"},
        {"scheme": "standard", "secret": "whsec_TOPSECRET!!!"},
        {"scheme": "standard", "secret": "whsec_" + base64.b64encode(b"TOPSECRET").decode()},
        {"scheme": "stripe", "secret": "TOPSECRET"},
        {"secret": "whsec_TOPSECRET-and-no-scheme"},
        {"scheme": "hmac", "secret": "whsec_TOPSECRET-and-no-scheme"},
        {"scheme": "stripe", "secret": "whsec_TOPSECRET-long-enough", "tolerance_seconds": 0},
    ],
)
def test_a_bad_source_is_refused_at_start_without_its_secret(source: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"^TENURE_WEBHOOK_SOURCES: pay") as refused:
        Settings.from_env({"TENURE_WEBHOOK_SOURCES": json.dumps({"pay": source})})
    assert "TOPSECRET" not in str(refused.value)


@pytest.mark.parametrize(
    "event",
    [
        WebhookEvent(entity="invoice", command="pay", entity_id="data.id"),
        WebhookEvent(entity="account", command="teleport", entity_id="data.id"),
        WebhookEvent(
            entity="account", command="deposit", entity_id="data.id", payload={"colour": "x"}
        ),
        # The checkout saga's own, which no client sends: a cart checked out with no checkout.
        WebhookEvent(entity="cart", command="completeCheckout", entity_id="data.id"),
        WebhookEvent(entity="account", command="refund", entity_id="data.id"),
    ],
)
def test_a_mapping_to_no_command_is_refused_at_start(
    settings: Settings, event: WebhookEvent
) -> None:
    source = WebhookSource(scheme="stripe", secret=STRIPE_SECRET, events={"x.y": event})
    with pytest.raises(ValueError, match=r"webhook source 'pay', event 'x\.y'"):
        create_app(settings.model_copy(update={"webhook_sources": {"pay": source}}))


def test_a_mapping_to_a_command_no_policy_names_is_refused_at_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = catalog.entity_types()["account"]
    without_deposit = replace(account.policy, actions=account.policy.actions - {"deposit"})
    monkeypatch.setattr(account, "policy", without_deposit)
    event = WebhookEvent(entity="account", command="deposit", entity_id="data.id")
    source = WebhookSource(scheme="stripe", secret=STRIPE_SECRET, events={"x.y": event})
    with pytest.raises(ValueError, match="policy does not name deposit"):
        create_app(settings.model_copy(update={"webhook_sources": {"pay": source}}))
