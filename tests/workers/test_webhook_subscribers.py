"""The webhook registry's bound on a real Redis and on a real Redis Cluster: subscribers added
at once never pass MAX_SUBSCRIBERS, and one refused leaves nothing behind."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from tests.workers.test_redis_cluster import cluster, redis_cluster  # noqa: F401  # fixtures
from tests.workers.webhook_letters import failed_letter
from workers import webhook_subscribers
from workers.cache import connect_redis
from workers.settings import Settings
from workers.webhook_subscribers import (
    MAX_SUBSCRIBERS,
    MIN_DEAD_LETTERS,
    DeadLetter,
    ReplaysFull,
    Subscriber,
    WebhookSubscribers,
    new_secret,
)


def subscriber() -> Subscriber:
    return Subscriber(
        id=f"wh_{uuid.uuid4().hex[:16]}",
        url="http://127.0.0.1:9/hooks",
        secret=new_secret(),
        events={"account": ["deposit"]},
        created_at=datetime.now(UTC),
    )


AT_ONCE = MAX_SUBSCRIBERS + 30


async def race(settings: Settings) -> None:
    """Adds AT_ONCE subscribers at once to a registry of its own, and checks the bound."""
    # Fewer connections than adds: they wait for one, on a cluster too.
    client = connect_redis(settings.model_copy(update={"redis_max_connections": 8}))
    registry = WebhookSubscribers(client, f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:")
    try:
        wanted = [subscriber() for _ in range(AT_ONCE)]
        added = [s is not None for s in await asyncio.gather(*(registry.add(s) for s in wanted))]
        assert added.count(True) == MAX_SUBSCRIBERS
        stored = {s.id for s in await registry.all()}
        assert stored == {s.id for s, ok in zip(wanted, added, strict=True) if ok}
        refused = next(s for s, ok in zip(wanted, added, strict=True) if not ok)
        assert not await client.exists(registry.key(refused.id, "replay"))
    finally:
        await client.aclose()


def test_gaps_from_the_same_revision_to_different_ones_are_different_webhooks() -> None:
    """Each time Redis loses its keys, an entity announces a gap from revision 1: with the
    gap's start alone in its `webhook-id`, a receiver that drops ids it has seen dropped the
    second announcement, the loss it tells of silent again."""
    gap = {"type": "gap", "id": "ada", "incarnation": "1", "from": "1", "state_revision": "9"}
    first, _, _ = webhook_subscribers.event_body("account", {**gap, "to": "9"}, "1-0")
    second, _, body = webhook_subscribers.event_body("account", {**gap, "to": "25"}, "2-0")
    assert (first, second) == ("account:ada:1:gap:1-9", "account:ada:1:gap:1-25")
    assert body["type"] == "account.gap" and body["data"]["to"] == 25


async def test_subscribers_added_at_once_never_pass_the_bound(settings: Settings) -> None:
    await race(settings)


async def test_the_bound_holds_on_a_redis_cluster(settings: Settings, cluster: str) -> None:  # noqa: F811
    await race(settings.model_copy(update={"redis_url": cluster, "redis_cluster": True}))


async def test_dead_letters_are_bounded_by_their_weight(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each dead letter carries an entity's whole state: 10,000 of a 200 KB item weighed
    2 GB. Here the bound is 500 KB and each letter 10 KB: about MIN_DEAD_LETTERS are kept,
    the floor, where the count alone kept every one."""
    monkeypatch.setattr(webhook_subscribers, "DEAD_LETTER_BYTES", 500_000)
    client = connect_redis(settings)
    registry = WebhookSubscribers(client, f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:")
    now = datetime.now(UTC)
    letter = DeadLetter(
        webhook_id="msg",
        entity_type="inventory",
        entity_id="teapot",
        body="x" * 10_000,
        attempts=8,
        error="HTTP 500",
        first_attempt_at=now,
        failed_at=now,
    )
    try:
        for _ in range(MIN_DEAD_LETTERS + 150):
            await registry.dead_letter("wh_big", letter)
        kept = await client.xlen(registry.key("wh_big", "dead"))
        assert MIN_DEAD_LETTERS <= kept < MIN_DEAD_LETTERS + 150, kept
        # Read as a number by workers from before its second mean (a rollback's).
        assert float(await client.get(registry.key("wh_big", "dead_bytes"))) > 10_000
        # Many small letters, then one large: the large one does not wipe the small out.
        small = letter.model_copy(update={"body": "x" * 500})
        for _ in range(300):
            await registry.dead_letter("wh_mixed", small)
        await registry.dead_letter("wh_mixed", letter.model_copy(update={"body": "x" * 100_000}))
        assert await client.xlen(registry.key("wh_mixed", "dead")) >= 301
    finally:
        for subscriber_id in ("wh_big", "wh_mixed"):
            for what in ("dead", "dead_bytes", "dead_fast"):
                await client.delete(registry.key(subscriber_id, what))
        await client.aclose()


async def replays_at_once(settings: Settings) -> None:
    """Ten dead letters replayed by four operators at once: each goes to the replay stream
    once. Copied and then deleted apart, each replay copied every letter, sent four times."""
    client = connect_redis(settings)
    registry = WebhookSubscribers(client, f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:")
    try:
        for n in range(10):
            await registry.dead_letter("wh_replayed", failed_letter(n))
        moved = await asyncio.gather(*(registry.replay("wh_replayed", None) for _ in range(4)))
        assert sum(moved) == 10
        replayed = await client.xrange(registry.key("wh_replayed", "replay"))
        assert sorted(fields[b"webhook_id"] for _, fields in replayed) == sorted(
            f"msg-{n}".encode() for n in range(10)
        )
        assert await client.xlen(registry.key("wh_replayed", "dead")) == 0
    finally:
        for what in ("dead", "dead_bytes", "dead_fast", "replay"):
            await client.delete(registry.key("wh_replayed", what))
        await client.aclose()


async def test_dead_letters_replayed_at_once_are_each_sent_again_once(settings: Settings) -> None:
    await replays_at_once(settings)


async def test_replays_at_once_on_a_redis_cluster(settings: Settings, cluster: str) -> None:  # noqa: F811
    await replays_at_once(settings.model_copy(update={"redis_url": cluster, "redis_cluster": True}))


async def test_replays_while_no_delivery_takes_them_wait_only_so_many(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays asked again and again while the subscriber's delivery did not run (its
    worker down) each moved up to 1,000 letters into a replay stream nothing trimmed. The
    stream holds at most MAX_REPLAYS_WAITING; a replay past it moves what fits, then none,
    refused, and the rest stay dead letters."""
    monkeypatch.setattr(webhook_subscribers, "MAX_REPLAYS_WAITING", 4)
    client = connect_redis(settings)
    registry = WebhookSubscribers(client, f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:")
    try:
        for n in range(6):
            await registry.dead_letter("wh_idle", failed_letter(n))
        assert await registry.replay("wh_idle", None) == 4
        with pytest.raises(ReplaysFull):
            await registry.replay("wh_idle", None)
        assert await client.xlen(registry.key("wh_idle", "replay")) == 4
        assert await client.xlen(registry.key("wh_idle", "dead")) == 2
    finally:
        for what in ("dead", "dead_bytes", "dead_fast", "replay"):
            await client.delete(registry.key("wh_idle", what))
        await client.aclose()
