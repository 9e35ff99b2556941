"""Outbound webhooks against a real local HTTP receiver: every subscribed change arrives, in
order per entity, signed with the subscriber's secret, under the same webhook-id however often
it is sent; what runs out of retries is dead-lettered and replayed; a removed subscriber's
delivery ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.client import Client

from api.webhooks import StandardWebhooks
from tests.api.test_accounts_api import DEPOSIT, open_active
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id, serving
from workers.settings import Settings
from workers.webhook_subscribers import signing_key

REGISTER = """mutation($url: String!, $events: JSON!, $secret: String) {
  registerWebhookSubscriber(url: $url, events: $events, secret: $secret) {
    secret subscriber { id url events deadLetters } } }"""
DEAD = """query($id: ID!, $after: String) { webhookDeadLetters(subscriberId: $id, first: 10,
  after: $after) { hasMore endCursor entries { id webhookId entityType entityId body attempts
  error firstAttemptAt failedAt } } }"""
REPLAY = "mutation($s: ID!, $id: ID!) { replayWebhookDeadLetter(subscriberId: $s, id: $id) }"
REMOVE = "mutation($id: ID!) { removeWebhookSubscriber(id: $id) }"
SUSPEND = 'mutation($id: ID!) { suspendAccount(id: $id, reason: "x", wait: true) { status } }'
LISTED = "{ webhookSubscribers { id deadLetters } }"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


@dataclass
class Receiver:
    """Answers 500 to its first `failures` requests (every one while `failing`), then 200,
    and keeps every request."""

    url: str = ""
    failures: int = 0
    failing: bool = False
    received: list[Delivery] = field(default_factory=list)

    def delivered(self) -> list[Delivery]:
        return [d for d in self.received if d.status == 200]

    async def until(self, done: Callable[[], bool], seconds: float = 30) -> None:
        for _ in range(int(seconds * 10)):
            if done():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not received: {[d.event for d in self.received]}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()

    async def hook(request: Request) -> Response:
        status = 500 if receiver.failing or receiver.failures > 0 else 200
        receiver.failures -= 1
        body = await request.body()
        receiver.received.append(Delivery(dict(request.headers), body, status))
        return Response(status_code=status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serving(app) as url:
        receiver.url = f"{url}/hook"
        yield receiver


@pytest.fixture
async def webhooks(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> AsyncIterator[tuple[GraphQLClient, Settings]]:
    """An API and a worker that retry quickly, for 30 seconds."""
    quick = settings.model_copy(
        update={"webhook_backoff_seconds": 0.2, "webhook_retry_for_seconds": 30.0}
    )
    async with run_worker(quick), api_client(quick, temporal_client) as http:
        yield GraphQLClient(http), quick


def verified(secret: str, delivery: Delivery) -> dict[str, Any]:
    """The delivery's event, its signature checked by the reference implementation and by
    Tenure's own inbound check."""
    event: dict[str, Any] = Webhook(secret).verify(delivery.body, delivery.headers)
    StandardWebhooks().verify(
        signing_key(secret),
        Headers(headers=delivery.headers),
        delivery.body,
        300,
        float(delivery.headers["webhook-timestamp"]),
    )
    return event


async def test_every_change_arrives_in_order_signed_and_once_per_webhook_id(
    webhooks: tuple[GraphQLClient, Settings], receiver: Receiver
) -> None:
    gql, _ = webhooks
    accounts = [new_id(), new_id()]
    for account_id in accounts:
        await open_active(gql, account_id)
    registered = (
        await gql.data(REGISTER, url=receiver.url, events={"account": ["deposit", "withdraw"]})
    )["registerWebhookSubscriber"]
    secret = registered["secret"]
    assert secret.startswith("whsec_")
    assert registered["subscriber"]["events"] == {"account": ["deposit", "withdraw"]}
    receiver.failures = 3
    for amount in (1, 2, 3):
        for account_id in accounts:
            await gql.data(DEPOSIT, id=account_id, amount=amount)
    await gql.data(SUSPEND, id=accounts[0])

    def ours() -> list[Delivery]:
        return [d for d in receiver.delivered() if d.event["data"]["id"] in accounts]

    await receiver.until(lambda: len(ours()) >= 6)
    await asyncio.sleep(0.5)  # nothing more comes: not the suspension, nothing twice
    assert len(ours()) == 6
    assert len([d for d in receiver.received if d.status == 500]) == 3
    for account_id in accounts:
        events = [verified(secret, d) for d in ours() if d.event["data"]["id"] == account_id]
        assert [e["type"] for e in events] == ["account.deposit"] * 3
        assert [e["data"]["revision"] for e in events] == [3, 4, 5]  # open, verify, deposits
        assert [e["data"]["state"]["balance"] for e in events] == [1, 3, 6]
    # Sent again after a 500, a change keeps its webhook-id; no two changes share one.
    ids_by_event: dict[tuple[str, int], set[str]] = {}
    for delivery in receiver.received:
        data = delivery.event["data"]
        key = (data["id"], data["revision"])
        ids_by_event.setdefault(key, set()).add(delivery.headers["webhook-id"])
        verified(secret, delivery)
    assert all(len(ids) == 1 for ids in ids_by_event.values())
    assert len({next(iter(ids)) for ids in ids_by_event.values()}) == len(ids_by_event)
    failed_ids = {d.headers["webhook-id"] for d in receiver.received if d.status == 500}
    assert failed_ids <= {d.headers["webhook-id"] for d in receiver.delivered()}


async def test_a_change_whose_retries_run_out_is_dead_lettered_and_replayed(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, receiver: Receiver
) -> None:
    brief = settings.model_copy(
        update={"webhook_backoff_seconds": 0.2, "webhook_retry_for_seconds": 1.5}
    )
    async with run_worker(brief), api_client(brief, temporal_client) as http:
        gql = GraphQLClient(http)
        account_id = new_id()
        await open_active(gql, account_id)
        registered = (await gql.data(REGISTER, url=receiver.url, events={"account": ["deposit"]}))[
            "registerWebhookSubscriber"
        ]  # not the verification, which may be published late
        subscriber_id, secret = registered["subscriber"]["id"], registered["secret"]
        receiver.failing = True
        await gql.data(DEPOSIT, id=account_id, amount=7)

        async def dead_letters() -> list[dict[str, Any]]:
            entries: list[dict[str, Any]] = (await gql.data(DEAD, id=subscriber_id))[
                "webhookDeadLetters"
            ]["entries"]
            return entries

        for _ in range(100):
            letters = await dead_letters()
            if letters:
                break
            await asyncio.sleep(0.1)
        assert len(letters) == 1, letters
        letter = letters[0]
        assert (letter["entityType"], letter["entityId"]) == ("account", account_id)
        assert letter["attempts"] >= 2 and letter["error"] == "HTTP 500"
        assert json.loads(letter["body"])["data"]["state"]["balance"] == 7
        tried = {d.headers["webhook-id"] for d in receiver.received}
        assert tried == {letter["webhookId"]}
        listed = (await gql.data(LISTED))["webhookSubscribers"]
        assert {"id": subscriber_id, "deadLetters": 1} in listed

        receiver.failing = False
        assert (await gql.data(REPLAY, s=subscriber_id, id=letter["id"])) == {
            "replayWebhookDeadLetter": 1
        }
        await receiver.until(lambda: len(receiver.delivered()) == 1)
        replayed = receiver.delivered()[0]
        assert replayed.headers["webhook-id"] == letter["webhookId"]
        assert replayed.body.decode() == letter["body"]
        verified(secret, replayed)
        assert await dead_letters() == []

        await gql.data(REMOVE, id=subscriber_id)
        assert subscriber_id not in {
            s["id"] for s in (await gql.data(LISTED))["webhookSubscribers"]
        }
        handle = temporal_client.get_workflow_handle(f"webhook:{subscriber_id}")
        await asyncio.wait_for(handle.result(), 20)  # its delivery ended


async def test_changes_behind_a_refused_change_are_tried_for_the_period_since_they_were_made(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, receiver: Receiver
) -> None:
    """Each change's retry period began at its first attempt, which waits for the entity's
    change before it: four refused changes took four periods, a day each by default, and the
    changes parked behind them stopped the subscriber. Each is now tried for the period
    since it was appended, so those that waited behind the first are dead-lettered soon
    after it."""
    retry_for = 3.0
    brief = settings.model_copy(
        update={"webhook_backoff_seconds": 0.2, "webhook_retry_for_seconds": retry_for}
    )
    async with run_worker(brief), api_client(brief, temporal_client) as http:
        gql = GraphQLClient(http)
        account_id = new_id()
        await open_active(gql, account_id)
        subscriber_id = (
            await gql.data(REGISTER, url=receiver.url, events={"account": ["deposit"]})
        )["registerWebhookSubscriber"]["subscriber"]["id"]
        receiver.failing = True
        for amount in (1, 2, 3, 4):
            await gql.data(DEPOSIT, id=account_id, amount=amount)

        letters: list[dict[str, Any]] = []
        for _ in range(300):
            letters = (await gql.data(DEAD, id=subscriber_id))["webhookDeadLetters"]["entries"]
            if len(letters) == 4:
                break
            await asyncio.sleep(0.1)
        balances = [json.loads(letter["body"])["data"]["state"]["balance"] for letter in letters]
        assert balances == [1, 3, 6, 10]  # each change, in order

        def tried_for(letter: dict[str, Any]) -> float:
            failed = datetime.fromisoformat(letter["failedAt"])
            return (failed - datetime.fromisoformat(letter["firstAttemptAt"])).total_seconds()

        # The first was tried again and again; each after it, which had waited behind it, for
        # what was left of its own period, where each was tried for a whole period before.
        assert letters[0]["attempts"] >= 2
        assert all(tried_for(letter) < retry_for for letter in letters[1:]), letters


async def test_a_stopping_worker_ends_its_delivery_run_and_the_next_worker_goes_on(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, receiver: Receiver
) -> None:
    """The run reports what it counted when its worker stops, instead of holding the
    shutdown for the worker's grace and being cancelled then; nothing is lost between."""
    async with api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        account_id = new_id()
        async with run_worker(settings):
            await open_active(gql, account_id)
            # Deposits only: the verification may reach the change stream after a waited
            # verify has answered and the subscriber is registered, and would then be sent.
            registered = (
                await gql.data(REGISTER, url=receiver.url, events={"account": ["deposit"]})
            )["registerWebhookSubscriber"]
            await gql.data(DEPOSIT, id=account_id, amount=1)
            await receiver.until(lambda: len(receiver.delivered()) == 1)
        handle = temporal_client.get_workflow_handle(f"webhook:{registered['subscriber']['id']}")
        history = [event async for event in handle.fetch_history_events()]
        assert any(e.HasField("activity_task_completed_event_attributes") for e in history)
        await gql.data(DEPOSIT, id=account_id, amount=2, wait=False)  # no worker runs
        async with run_worker(settings):
            await receiver.until(lambda: len(receiver.delivered()) == 2)
        amounts = [d.event["data"]["state"]["balance"] for d in receiver.delivered()]
        assert amounts == [1, 3]
