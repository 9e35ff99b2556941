"""Outbound webhooks across the delivery activity's runs, against a real local receiver: a
failing entity holds no sending slot while it waits to retry, its backoff keeps its schedule
whatever run it falls in, and a change trimmed from the stream while pending is announced
(as a gap, or a dead letter) rather than dropped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

import workers.webhook_delivery
from entities.webhook_delivery import DeliveryCounts, DeliveryRun
from tests.api.test_accounts_api import DEPOSIT, open_active
from tests.conftest import GraphQLClient, WorkerFactory, api_client, cache_of, new_id, serving
from workers.settings import Settings
from workers.webhook_delivery import CONSUMER, PARALLEL_ENTITIES, WebhookDelivery
from workers.webhook_subscribers import (
    REMOVED_KEPT_SECONDS,
    DeadLetter,
    Subscriber,
    WebhookSubscribers,
    group_name,
    new_secret,
)

REGISTER = """mutation($url: String!, $events: JSON!) {
  registerWebhookSubscriber(url: $url, events: $events) { subscriber { id } } }"""


@dataclass
class Sent:
    at: float
    event: dict[str, Any]
    status: int


@dataclass
class Receiver:
    """Answers what `answer` says for each event (200 unless told), and keeps every request
    with when it came."""

    url: str = ""
    answer: Callable[[dict[str, Any]], int] = lambda event: 200
    received: list[Sent] = field(default_factory=list)
    delay: float = 0.0  # seconds it takes to answer

    def delivered(self) -> list[dict[str, Any]]:
        return [sent.event for sent in self.received if sent.status == 200]

    async def until(self, done: Callable[[], bool], seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            if done():
                return
            await asyncio.sleep(0.1)
        answered = [(sent.event["type"], sent.status) for sent in self.received]
        raise AssertionError(f"not received in {seconds} s; answered: {answered}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()

    async def hook(request: Request) -> Response:
        event = json.loads(await request.body())
        if receiver.delay:
            await asyncio.sleep(receiver.delay)
        status = receiver.answer(event)
        receiver.received.append(Sent(time.monotonic(), event, status))
        return Response(status_code=status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serving(app) as url:
        receiver.url = f"{url}/hook"
        yield receiver


@dataclass
class Delivering:
    """One subscriber's delivery, run by the test a run at a time, on streams of its own."""

    settings: Settings
    subscribers: WebhookSubscribers
    subscriber: Subscriber

    @property
    def stream(self) -> str:
        return self.subscribers.stream("account")

    async def change(self, entity_id: str, revision: int) -> str:
        """Append a deposit of the entity, as the cache's script would."""
        entry_id: bytes = await self.subscribers.client.xadd(
            self.stream,
            {
                "type": "change",
                "id": entity_id,
                "incarnation": "1",
                "revision": str(revision),
                "command": "deposit",
                "command_id": new_id(),
                "sent_by": "",
                "at": datetime.now(UTC).isoformat(),
                "state": json.dumps({"balance": revision}),
            },
        )
        return entry_id.decode()

    async def run(self, seconds: float) -> DeliveryCounts:
        async with cache_of(self.settings) as cache:
            delivery = WebhookDelivery(cache, self.settings)
            result = await ActivityEnvironment().run(
                delivery.deliver_webhooks,
                DeliveryRun(subscriber_id=self.subscriber.id, seconds=seconds),
            )
        assert not result.removed
        return result.counts

    async def dead_letters(self) -> list[dict[str, Any]]:
        letters, _ = await self.subscribers.dead_letters(self.subscriber.id, 10, None)
        return [letter.model_dump(mode="json") for letter in letters]


@pytest.fixture
async def delivering(settings: Settings, receiver: Receiver) -> AsyncIterator[Delivering]:
    """A subscriber to every account change, under a key prefix of the test's own (the test
    trims its stream), retrying from 0.25 s on for a minute."""
    own = settings.model_copy(
        update={
            "redis_prefix": f"{settings.redis_prefix}{new_id()[:8]}:",
            "webhook_backoff_seconds": 0.25,
            "webhook_retry_for_seconds": 60.0,
        }
    )
    async with cache_of(own) as cache:
        subscribers = WebhookSubscribers(cache.client, cache.prefix)
        subscriber = Subscriber(
            id=new_id(),
            url=receiver.url,
            secret=new_secret(),
            events={"account": ["*"]},
            created_at=datetime.now(UTC),
        )
        assert await subscribers.add(subscriber)
        yield Delivering(own, subscribers, subscriber)


async def test_entities_waiting_to_retry_do_not_hold_back_a_healthy_one(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, receiver: Receiver
) -> None:
    """As many failing entities as may send at once, retried for a minute: a healthy entity's
    change is delivered at once all the same, and the failing ones go on being retried."""
    quick = settings.model_copy(
        update={"webhook_backoff_seconds": 0.2, "webhook_retry_for_seconds": 60.0}
    )
    failing = {new_id() for _ in range(PARALLEL_ENTITIES)}
    healthy = new_id()
    receiver.answer = lambda event: 400 if event["data"]["id"] in failing else 200
    async with run_worker(quick), api_client(quick, temporal_client) as http:
        gql = GraphQLClient(http)
        for account_id in [*failing, healthy]:
            await open_active(gql, account_id)
        await gql.data(REGISTER, url=receiver.url, events={"account": ["deposit"]})
        for account_id in failing:
            await gql.data(DEPOSIT, id=account_id, amount=1)
        await receiver.until(lambda: len(receiver.received) >= 2 * len(failing), 10)
        await gql.data(DEPOSIT, id=healthy, amount=5)
        await receiver.until(lambda: bool(receiver.delivered()), 5)
        assert [event["data"]["id"] for event in receiver.delivered()] == [healthy]
        tried = [sent.event["data"]["id"] for sent in receiver.received if sent.status == 400]
        assert set(tried) == failing


async def test_one_refused_entity_with_more_changes_than_are_held_holds_back_no_other(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entity whose receiver refuses it, with more changes waiting behind its first than
    a run holds in memory (MAX_HELD, 20 here): every other entity's changes, read after
    them, waited until that first was delivered or dead-lettered, a day later. They are now
    delivered at once, and once the receiver takes the refused entity, its changes all
    arrive, in order, each once, and nothing is left pending."""
    monkeypatch.setattr(workers.webhook_delivery, "MAX_HELD", 20)
    refused, others = new_id(), [new_id() for _ in range(5)]
    taking = False
    receiver.answer = lambda event: 200 if taking or event["data"]["id"] != refused else 500
    for revision in range(1, 51):
        await delivering.change(refused, revision)
    for entity_id in others:
        await delivering.change(entity_id, 1)
    run = asyncio.create_task(delivering.run(10.0))
    try:
        await receiver.until(lambda: len(receiver.delivered()) == len(others), 5)
        tried = {sent.event["data"]["revision"] for sent in receiver.received if sent.status == 500}
        assert tried == {1}
        taking = True
        await receiver.until(lambda: len(receiver.delivered()) == len(others) + 50, 8)
    finally:
        counts = await run
    assert counts == DeliveryCounts(delivered=len(others) + 50)
    delivered = [event["data"] for event in receiver.delivered()]
    assert {data["id"] for data in delivered[: len(others)]} == set(others)
    assert [data["revision"] for data in delivered if data["id"] == refused] == list(range(1, 51))
    pending: Any = await delivering.subscribers.client.xpending(
        delivering.stream, group_name(delivering.subscriber.id)
    )
    assert pending["pending"] == 0


async def test_more_refused_entities_than_are_held_hold_back_no_other(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More entities refused by their receiver than a run holds in memory (MAX_HELD, 5
    here), one change each: their changes, each waiting to retry, held the run full, and no
    later change was read until they were delivered or dead-lettered (a day; a receiver
    down for one entity type stopped every other type's webhooks). They now wait parked,
    the others are delivered at once, and once taken the refused all arrive, each once."""
    monkeypatch.setattr(workers.webhook_delivery, "MAX_HELD", 5)
    refused, others = [new_id() for _ in range(12)], [new_id() for _ in range(3)]
    taking = False
    receiver.answer = lambda event: 200 if taking or event["data"]["id"] in others else 500
    for entity_id in [*refused, *others]:
        await delivering.change(entity_id, 1)
    run = asyncio.create_task(delivering.run(10.0))
    try:
        await receiver.until(lambda: len(receiver.delivered()) == len(others), 5)
        taking = True
        await receiver.until(lambda: len(receiver.delivered()) == len(others) + len(refused), 8)
    finally:
        counts = await run
    assert counts == DeliveryCounts(delivered=len(others) + len(refused))
    delivered = [event["data"]["id"] for event in receiver.delivered()]
    assert set(delivered[: len(others)]) == set(others)
    assert sorted(delivered[len(others) :]) == sorted(refused)
    pending: Any = await delivering.subscribers.client.xpending(
        delivering.stream, group_name(delivering.subscriber.id)
    )
    assert pending["pending"] == 0


async def test_changes_parked_behind_a_refused_one_and_trimmed_meanwhile_arrive_as_a_gap(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes parked out of memory behind a refused first one (past MAX_HELD), then
    trimmed from the stream by retention before their turn: the receiver gets them as one
    gap, then the changes that were left, as it would had they been held."""
    monkeypatch.setattr(workers.webhook_delivery, "MAX_HELD", 5)
    refused = new_id()
    taking = False
    receiver.answer = lambda event: 200 if taking else 500
    for revision in range(1, 31):
        await delivering.change(refused, revision)
    await delivering.change(new_id(), 1)  # read only once the others are parked
    run = asyncio.create_task(delivering.run(6.0))
    try:
        await receiver.until(lambda: len(receiver.received) >= 3, 5)
        await delivering.subscribers.client.xtrim(delivering.stream, maxlen=5, approximate=False)
        taking = True
        await receiver.until(lambda: len(receiver.delivered()) >= 5, 5)
    finally:
        await run
    delivered = [event for event in receiver.delivered() if event["data"]["id"] == refused]
    # Read back a few at a time (what room the run has): the trimmed ones as gaps, one
    # after another, that together cover 2 to 26, between revision 1 and 27.
    types = [event["type"] for event in delivered]
    gaps = [(e["data"]["from"], e["data"]["to"]) for e in delivered if e["type"] == "account.gap"]
    assert types == ["account.deposit"] + ["account.gap"] * len(gaps) + ["account.deposit"] * 4
    assert gaps[0][0] == 2 and gaps[-1][1] == 26, gaps
    assert all(later[0] == earlier[1] + 1 for earlier, later in itertools.pairwise(gaps)), gaps
    changes = [e["data"]["revision"] for e in delivered if e["type"] == "account.deposit"]
    assert changes == [1, 27, 28, 29, 30]


class _HeldWatched(workers.webhook_delivery._Run):
    """A run that notes what it holds after each read back of parked entries, and whose
    reads of new changes (with their look for trims) take as long as ones to a Redis 20 ms
    away. (It slowed a `_look_for_unread_trims` that the reads had stopped calling, so the
    race it stands for went unslowed.)"""

    held: ClassVar[list[int]] = []

    async def _unpark(self, key: tuple[str, str], queue: Any) -> None:
        await super()._unpark(key, queue)
        self.held.append(self._held)

    async def _read_new(self, stream: str, count: int) -> Any:
        await asyncio.sleep(0.02)
        return await super()._read_new(stream, count)


async def test_parked_changes_are_read_back_within_what_a_run_holds(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parked changes read back went into memory whatever it held (MAX_HELD 20 here: 119),
    and a read that had passed the check before its look for trims then asked Redis for a
    count of 0 or less: the run died (DataError), its sends in flight cancelled. A read back
    now takes what room there is (one at least), and such a read reads nothing."""
    monkeypatch.setattr(workers.webhook_delivery, "MAX_HELD", 20)
    monkeypatch.setattr(workers.webhook_delivery, "_Run", _HeldWatched)
    _HeldWatched.held.clear()
    refused = new_id()
    taking = False
    receiver.answer = lambda event: 200 if taking or event["data"]["id"] != refused else 500
    for revision in range(1, 301):
        await delivering.change(refused, revision)

    async def others() -> None:
        while True:
            await delivering.change(new_id(), 1)
            await asyncio.sleep(0.01)

    feeding = asyncio.create_task(others())
    run = asyncio.create_task(delivering.run(6.0))
    try:
        await asyncio.sleep(1.0)
        taking = True
        await run  # raised the run's DataError
    finally:
        feeding.cancel()
    assert _HeldWatched.held and max(_HeldWatched.held) <= 20 + 1, _HeldWatched.held
    revisions = [e["data"]["revision"] for e in receiver.delivered() if e["data"]["id"] == refused]
    assert revisions == list(range(1, len(revisions) + 1)) and len(revisions) > 20


async def test_backoff_keeps_doubling_across_runs(
    delivering: Delivering, receiver: Receiver
) -> None:
    """A receiver that always fails, and runs of 1.2 s: the waits between attempts are
    0.25 s, 0.5 s, 1 s, 2 s, as in one long run, not cut short where a run ends."""
    receiver.answer = lambda event: 500
    await delivering.change(new_id(), 1)
    started = time.monotonic()
    while time.monotonic() - started < 5.5:
        counts = await delivering.run(1.2)
        assert counts == DeliveryCounts()
    sent_at = [sent.at for sent in receiver.received]
    waits = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    assert len(waits) == 4, waits
    for n, wait in enumerate(waits):
        assert 0.25 * 2**n - 0.05 < wait < 0.25 * 2**n + 0.3, waits


async def test_changes_trimmed_while_pending_arrive_as_a_gap(
    delivering: Delivering, receiver: Receiver
) -> None:
    """Five changes of one entity wait behind a failing first; retention trims the three
    oldest; once the receiver recovers, it gets a gap for revisions 1 to 3, then 4 and 5."""
    entity_id = new_id()
    began = datetime.now(UTC)
    receiver.answer = lambda event: 500
    for revision in range(1, 6):
        await delivering.change(entity_id, revision)
    assert await delivering.run(0.5) == DeliveryCounts()
    assert {sent.event["data"]["revision"] for sent in receiver.received} == {1}
    await delivering.subscribers.client.xtrim(delivering.stream, maxlen=2, approximate=False)

    receiver.answer = lambda event: 200
    assert await delivering.run(1.5) == DeliveryCounts(delivered=3)
    gap, *changes = receiver.delivered()
    assert gap["type"] == "account.gap"
    assert (gap["data"]["id"], gap["data"]["from"], gap["data"]["to"]) == (entity_id, 1, 3)
    # When the stream noted what was trimmed: its first entry's time.
    assert (
        began - timedelta(seconds=1)
        < datetime.fromisoformat(gap["timestamp"])
        < began + timedelta(seconds=5)
    )
    assert [change["data"]["revision"] for change in changes] == [4, 5]
    assert await delivering.dead_letters() == []
    pending: Any = await delivering.subscribers.client.xpending(
        delivering.stream, group_name(delivering.subscriber.id)
    )
    assert pending["pending"] == 0


async def test_a_trimmed_change_never_read_before_is_dead_lettered(
    delivering: Delivering, receiver: Receiver
) -> None:
    """An entry a run read and died with, before it noted the entity: trimmed, nothing tells
    whose it was, so it becomes a dead letter saying so, and the entry is acknowledged."""
    entity_id = new_id()
    began = datetime.now(UTC)
    trimmed = await delivering.change(entity_id, 1)
    await delivering.change(entity_id, 2)
    group = group_name(delivering.subscriber.id)
    await delivering.subscribers.client.xreadgroup(
        group, CONSUMER, {delivering.stream: ">"}, count=1
    )
    await delivering.subscribers.client.xtrim(delivering.stream, maxlen=1, approximate=False)

    assert await delivering.run(1.0) == DeliveryCounts(delivered=1, dead_lettered=1)
    assert [event["data"]["revision"] for event in receiver.delivered()] == [2]
    [letter] = await delivering.dead_letters()
    assert (letter["entity_type"], letter["entity_id"], letter["attempts"]) == ("account", "", 0)
    assert letter["error"] == "trimmed from the stream before delivery"
    body = json.loads(letter["body"])
    assert body["type"] == "account.gap"
    assert body["data"]["stream_entry"] == trimmed
    assert (
        began - timedelta(seconds=1)
        < datetime.fromisoformat(body["timestamp"])
        < began + timedelta(seconds=5)
    )
    pending: Any = await delivering.subscribers.client.xpending(delivering.stream, group)
    assert pending["pending"] == 0


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_receiver(answer: Handler) -> AsyncIterator[str]:
    """A receiver that answers each request at the socket as `answer` does, for answers no
    web framework would send; its URL. Each answer has ended, its socket closed, on exit."""
    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionError):
            await answer(reader, writer)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    finally:
        server.close()
        await asyncio.gather(*handlers)
        await server.wait_closed()


async def test_an_answer_that_comes_after_the_send_timeout_is_not_a_delivery(
    delivering: Delivering, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver, or a proxy before it, that sends its status line at once and then its
    headers a line at a time: each read came within the client's timeout, and a 200 that
    came 12 s after a 10 s limit counted as delivered, the send held that long."""
    monkeypatch.setattr(workers.webhook_delivery, "SEND_TIMEOUT_SECONDS", 1.0)
    answered: list[float] = []

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(6):
            await asyncio.sleep(0.5)
            writer.write(b"x-wait: 1\r\n")
            await writer.drain()
        writer.write(b"content-length: 0\r\n\r\n")
        await writer.drain()
        answered.append(time.monotonic() - started)

    async with raw_receiver(trickle) as url:
        slow = delivering.subscriber.model_copy(update={"id": new_id(), "url": url})
        assert await delivering.subscribers.add(slow)
        trickled = Delivering(delivering.settings, delivering.subscribers, slow)
        await trickled.change(new_id(), 1)
        counts = await trickled.run(0.5)
    assert counts.delivered == 0
    assert answered == []  # the send gave up before the 200 came


async def test_a_consumer_group_lost_mid_run_is_made_again_not_taken_for_a_removal(
    delivering: Delivering, receiver: Receiver
) -> None:
    """Its stream's group gone mid-run (the stream deleted, a failover) was taken for the
    subscriber's removal: its dead letters were dropped and its delivery ended for good,
    while it stayed registered, and the alert said it was not in Redis. The run ends, and
    the next makes its group again, from the stream's end."""
    subscribers, subscriber = delivering.subscribers, delivering.subscriber
    now = datetime.now(UTC)
    letter = DeadLetter(
        webhook_id="w-1",
        entity_type="account",
        entity_id="kept",
        body="{}",
        attempts=3,
        error="500",
        first_attempt_at=now,
        failed_at=now,
    )
    await subscribers.dead_letter(subscriber.id, letter)
    entity = new_id()
    await delivering.change(entity, 1)
    run = asyncio.create_task(delivering.run(seconds=10))
    await receiver.until(lambda: len(receiver.delivered()) == 1, 10)
    await subscribers.client.xgroup_destroy(delivering.stream, group_name(subscriber.id))
    await delivering.change(entity, 2)  # its read meets no group
    started = time.monotonic()
    await run  # not removed (`Delivering.run`), and ended before its 10 s
    assert time.monotonic() - started < 8
    assert await subscribers.get(subscriber.id) is not None
    assert [d["entity_id"] for d in await delivering.dead_letters()] == ["kept"]

    async def third() -> None:
        await asyncio.sleep(1.0)  # once the next run has made its group, at the end
        await delivering.change(entity, 3)

    await asyncio.gather(delivering.run(seconds=3), third())
    assert [e["data"]["revision"] for e in receiver.delivered()][-1] == 3


async def test_a_backlog_of_one_type_holds_back_no_other_type_nor_the_replays(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass read the streams in one order, and each read took every place free: with a
    slow receiver and a backlog of accounts, the carts were not read until the accounts'
    backlog was gone (or retention trimmed them, unread)."""
    monkeypatch.setattr(workers.webhook_delivery, "MAX_HELD", 8)
    monkeypatch.setattr(workers.webhook_delivery, "READ_COUNT", 8)
    subscribers = delivering.subscribers
    both = delivering.subscriber.model_copy(
        update={"id": new_id(), "events": {"account": ["*"], "cart": ["*"]}}
    )
    assert await subscribers.add(both)
    two = Delivering(delivering.settings, subscribers, both)
    receiver.delay = 0.05
    for n in range(300):
        await two.change(f"a-{n:03d}", 1)
    run = asyncio.create_task(two.run(seconds=4))
    await receiver.until(lambda: len(receiver.delivered()) >= 20, 10)  # the backlog's reads
    cart_change = {
        "type": "change",
        "id": "the-cart",
        "incarnation": "1",
        "revision": "1",
        "command": "clearCart",
        "command_id": new_id(),
        "sent_by": "",
        "at": datetime.now(UTC).isoformat(),
        "state": json.dumps({"lines": []}),
    }
    await subscribers.client.xadd(subscribers.stream("cart"), cart_change)
    await run
    delivered = [e["data"]["id"] for e in receiver.delivered()]
    assert "the-cart" in delivered, delivered[-5:]
    assert delivered.index("the-cart") < 100, (delivered.index("the-cart"), len(delivered))


async def test_a_subscriber_removed_while_a_send_is_in_flight_leaves_no_key_behind(
    delivering: Delivering,
) -> None:
    """The send in flight at the removal failed after it, and its retry note was written
    back: one key left for good at each removal."""

    async def late_500(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    subscribers = delivering.subscribers
    async with raw_receiver(late_500) as url:
        failing = delivering.subscriber.model_copy(update={"id": new_id(), "url": url})
        assert await subscribers.add(failing)
        await Delivering(delivering.settings, subscribers, failing).change(new_id(), 1)
        async with cache_of(delivering.settings) as cache:
            delivery = WebhookDelivery(cache, delivering.settings)
            run = asyncio.create_task(
                ActivityEnvironment().run(
                    delivery.deliver_webhooks, DeliveryRun(subscriber_id=failing.id, seconds=5)
                )
            )
            await asyncio.sleep(0.5)  # its first send is in flight
            assert await subscribers.remove(failing.id)
            result = await run
    assert result.removed
    # Only the mark of its removal, which expires, and tells its delivery it was no loss.
    removed = subscribers.key(failing.id, "removed")
    assert await subscribers.client.keys(f"*{{{failing.id}}}*") == [removed.encode()]
    assert 0 < await subscribers.client.ttl(removed) <= REMOVED_KEPT_SECONDS


async def test_changes_trimmed_before_they_were_read_are_dead_lettered_as_a_count(
    delivering: Delivering, receiver: Receiver
) -> None:
    """A subscriber further behind than retention: its group's next read skipped the trimmed
    changes without a word, and the receiver never learnt it had missed any."""
    entity_id = new_id()
    first = await delivering.change(entity_id, 1)
    for revision in range(2, 6):
        await delivering.change(entity_id, revision)
    await delivering.subscribers.client.xtrim(delivering.stream, maxlen=2, approximate=False)

    assert await delivering.run(1.0) == DeliveryCounts(delivered=2, dead_lettered=1)
    assert [event["data"]["revision"] for event in receiver.delivered()] == [4, 5]
    [letter] = await delivering.dead_letters()
    assert (letter["entity_type"], letter["entity_id"]) == ("account", "")
    assert letter["error"] == "trimmed from the stream before it was read"
    body = json.loads(letter["body"])
    assert body["type"] == "account.gap"
    assert body["data"]["missed"] == 3

    def place(entry_id: str) -> tuple[int, int]:
        ms, seq = entry_id.split("-")
        return int(ms), int(seq)

    assert place(body["data"]["after"]) < place(first) < place(body["data"]["before"])
    # Said once: a later run finds nothing more missed.
    await delivering.change(entity_id, 6)
    assert await delivering.run(1.0) == DeliveryCounts(delivered=1)
    assert len(await delivering.dead_letters()) == 1


async def test_changes_trimmed_between_two_reads_of_a_run_are_dead_lettered_as_a_count(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber behind, still reading: retention trims changes it has not read between
    two of its reads. The run looked for such trims every 30 s, apart from its reads, and
    a read across the trim made the group count them read: 190 of 300 changes went without
    a word behind a slow receiver, in a review's probe."""
    monkeypatch.setattr(workers.webhook_delivery, "READ_COUNT", 10)
    entities = [new_id() for _ in range(40)]
    for entity_id in entities:
        await delivering.change(entity_id, 1)
    read = workers.webhook_delivery._Run._read
    reads = itertools.count()

    async def trimmed_after_the_first_read(run: Any, stream: str, tasks: Any) -> int:
        if stream == delivering.stream and next(reads) == 2:  # pending, then 10 new read
            await delivering.subscribers.client.xtrim(stream, maxlen=15, approximate=False)
        taken: int = await read(run, stream, tasks)
        return taken

    monkeypatch.setattr(workers.webhook_delivery._Run, "_read", trimmed_after_the_first_read)
    counts = await delivering.run(2.0)
    delivered = [event["data"]["id"] for event in receiver.delivered()]
    assert sorted(delivered) == sorted(entities[:10] + entities[25:])  # each entity once
    assert counts == DeliveryCounts(delivered=25, dead_lettered=1)
    [letter] = await delivering.dead_letters()
    assert letter["error"] == "trimmed from the stream before it was read"
    assert json.loads(letter["body"])["data"]["missed"] == 15
    # Said once, and nothing sent again: a later run finds nothing more missed.
    await delivering.change(new_id(), 1)
    assert await delivering.run(1.0) == DeliveryCounts(delivered=1)
    assert len(await delivering.dead_letters()) == 1


async def test_a_removal_while_a_run_makes_its_groups_leaves_no_group_behind(
    delivering: Delivering, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber removed after its run read it and before the run made its groups: the
    removal destroyed groups not made yet, the run made them again, and they stayed for
    good, holding what they read pending; the run also posted to the removed URL. The run
    now looks again once its groups are made, and takes them down."""
    subscribers = delivering.subscribers
    ensure_group = WebhookSubscribers.ensure_group
    removed = False

    async def removed_first(self: WebhookSubscribers, *args: Any, **kwargs: Any) -> None:
        nonlocal removed
        if not removed:
            removed = True
            assert await self.remove(delivering.subscriber.id)
        await ensure_group(self, *args, **kwargs)

    await delivering.change(new_id(), 1)
    monkeypatch.setattr(WebhookSubscribers, "ensure_group", removed_first)
    async with cache_of(delivering.settings) as cache:
        result = await ActivityEnvironment().run(
            WebhookDelivery(cache, delivering.settings).deliver_webhooks,
            DeliveryRun(subscriber_id=delivering.subscriber.id, seconds=2.0),
        )
    assert removed and result.removed
    groups = await subscribers.client.xinfo_groups(delivering.stream)
    assert group_name(delivering.subscriber.id) not in [g["name"].decode() for g in groups]
    assert receiver.received == []


async def test_two_runs_of_one_delivery_at_once_send_each_change_once_in_order(
    delivering: Delivering, receiver: Receiver
) -> None:
    """Temporal starts a delivery's next attempt once the last one's heartbeats stop reaching
    it, and a worker cut off from Temporal but not from Redis goes on running that one: two
    runs at once, under one consumer, each sent what the other held pending, twice and out
    of order. The second now waits for the first's lease."""
    receiver.delay = 0.05
    entity_id = new_id()
    for revision in range(1, 21):
        await delivering.change(entity_id, revision)
    first = asyncio.create_task(delivering.run(3.0))
    await receiver.until(lambda: len(receiver.received) >= 1, 5)
    second = asyncio.create_task(delivering.run(3.0))
    counts = await asyncio.gather(first, second)
    assert sum(c.delivered for c in counts) == 20
    revisions = [event["data"]["revision"] for event in receiver.delivered()]
    assert revisions == list(range(1, 21))


async def test_a_run_that_lost_its_lease_to_another_stops(
    delivering: Delivering, receiver: Receiver
) -> None:
    """A run stalled past its lease (15 s) finds another holding the delivery at its next
    heartbeat, and stops, leaving the sending to that one, rather than run out its time."""
    receiver.answer = lambda event: 500  # so that it has retries to wait out meanwhile
    await delivering.change(new_id(), 1)
    started = time.monotonic()
    run = asyncio.create_task(delivering.run(30.0))
    await receiver.until(lambda: len(receiver.received) >= 1, 5)
    lease = delivering.subscribers.key(delivering.subscriber.id, "lease")
    await delivering.subscribers.client.set(lease, "another-run", px=60_000)
    await asyncio.wait_for(run, 15)  # a heartbeat comes every 5 s
    assert time.monotonic() - started < 15
    assert await delivering.subscribers.client.get(lease) == b"another-run"  # not released
