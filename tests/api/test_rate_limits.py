"""Rate limits per caller, on real Redis: a burst, then one request per refill, per principal."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from temporalio.client import Client

from api.rate_limits import Limit, RateLimiter
from entities.runtime.policy import Principal, Role
from tests.api.test_access import CREATE_CART, DEPOSIT, OPEN, SECRET, VERIFY, Caller, token
from tests.api.test_cached_reads import replays_of
from tests.conftest import WorkerFactory, api_client, new_id
from tests.entities.shop import until_cached
from workers.cache import SnapshotCache
from workers.settings import Settings


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    connection = redis.from_url(redis_url)
    yield connection
    await connection.aclose()


async def test_a_burst_then_one_per_refill_and_callers_do_not_share(
    client: redis.Redis, redis_prefix: str
) -> None:
    limiter = RateLimiter(
        client, f"{redis_prefix}{uuid.uuid4().hex[:6]}:", {Role.CUSTOMER: Limit(1.0, 3)}
    )
    ada, bob = Principal("ada", Role.CUSTOMER), Principal("bob", Role.CUSTOMER)
    waits = [await limiter.wait_ms(ada) for _ in range(4)]
    assert waits[:3] == [0, 0, 0]
    assert 0 < waits[3] <= 1000  # one token a second: the fourth waits for it
    assert await limiter.wait_ms(bob) == 0  # another caller has a bucket of its own
    admin = Principal("ops", Role.ADMIN)
    assert all([await limiter.wait_ms(admin) == 0 for _ in range(10)])  # no limit set


async def test_a_request_takes_its_points_at_once_or_none_and_never_more_than_the_burst(
    client: redis.Redis, redis_prefix: str
) -> None:
    limiter = RateLimiter(
        client, f"{redis_prefix}{uuid.uuid4().hex[:6]}:", {Role.CUSTOMER: Limit(1.0, 5)}
    )
    ada = Principal("ada", Role.CUSTOMER)
    assert [limiter.points(ada, v) for v in (0, 1, 100, 101, 450, 4_824)] == [1, 1, 1, 2, 5, 5]
    assert limiter.points(Principal("ops", Role.ADMIN), 4_824) == 0  # no limit, no cost
    assert await limiter.wait_ms(ada, 3) == 0
    assert 0 < await limiter.wait_ms(ada, 3) <= 1000  # 2 left: waits for the third, takes none
    assert await limiter.wait_ms(ada, 2) == 0  # so the 2 are still there
    # A cost over the burst costs the burst: it can always be paid, after a full refill.
    assert 4000 < await limiter.wait_ms(ada, 49) <= 5000


async def test_without_redis_requests_go_through(redis_prefix: str) -> None:
    dead = redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    limiter = RateLimiter(dead, redis_prefix, {Role.CUSTOMER: Limit(1.0, 1)})
    try:
        assert await limiter.wait_ms(Principal("ada", Role.CUSTOMER)) == 0
    finally:
        await dead.aclose()


async def test_a_caller_over_its_limit_gets_429_with_retry_after_and_others_go_on(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    secured = settings.model_copy(
        update={
            "environment": "production",
            "auth_secret": SECRET,
            "rate_limits": {"customer": (0.5, 2)},
        }
    )
    read = {"query": "query($sku: String!) { inventoryItem(sku: $sku) { onHand } }"}
    read["variables"] = {"sku": new_id()}  # type: ignore[assignment]

    ada, bob = new_id(), new_id()  # buckets outlive a test: callers of their own

    def as_(sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token('customer', sub)}"}

    async with run_worker(secured), api_client(secured, temporal_client) as http:
        answers = [(await http.post("/graphql", json=read, headers=as_(ada))) for _ in range(3)]
        other = await http.post("/graphql", json=read, headers=as_(bob))
        admin = [
            await http.post(
                "/graphql", json=read, headers={"Authorization": f"Bearer {token('admin', 'ops')}"}
            )
            for _ in range(5)
        ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert 1 <= int(answers[2].headers["retry-after"]) <= 2
    assert other.status_code == 200
    assert all(a.status_code == 200 for a in admin)  # no limit set for admins


READ_BALANCE = "query($id: ID!) { account(id: $id, consistency: LIVE) { balance } }"
LINES = "query($id: ID!) { cart(id: $id) { lines { sku quantity unitPrice } } }"  # 302 values
STATUS = "query($id: ID!) { cart(id: $id) { status } }"  # 2 values
LINE_TOTALS = """query($id: ID!) { cart(id: $id) {
  lines { sku quantity unitPrice lineTotal } } }"""  # 402 values


async def test_a_large_answer_costs_a_point_per_hundred_values_executed_or_replayed(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, cache: SnapshotCache
) -> None:
    # A token every 50 s: none comes back during the test.
    slow = (0.02, 11)
    secured = settings.model_copy(
        update={
            "environment": "production",
            "auth_secret": SECRET,
            "rate_limits": {"customer": slow, "service": slow},
        }
    )
    account, cart = new_id(), new_id()
    async with run_worker(secured), api_client(secured, temporal_client) as http:
        admin = Caller(http, token("admin", "ops"))
        await admin.data(OPEN, id=account)
        await admin.data(VERIFY, id=account)
        await admin.data(CREATE_CART, id=cart, account=account)
        await until_cached(cache, "cart", cart, 1)
        replays = replays_of(http)
        await admin.data(LINES, id=cart)  # rendered and kept: the same read is replayed now

        # A service reading carts may be answered with kept responses.
        # Callers of their own: buckets outlive a test.
        feed = Caller(http, token("service", new_id(), scope="read:*"))
        cheap = await feed.post(STATUS, id=cart)  # 1 point: 10 left
        replayed = [await feed.post(LINES, id=cart) for _ in range(2)]  # 4 points each: 2 left
        assert replays.replayed == 2
        over = await feed.post(LINES, id=cart)  # its token at the door, then 3 more: refused
        after = await feed.post(STATUS, id=cart)  # the refused read took nothing more: 0 left
        spent = await feed.post(STATUS, id=cart)

        # A customer (never answered with a kept response: the policy looks at the cart).
        ada = Caller(http, token("customer", new_id(), [account]))
        lines = [await ada.post(LINE_TOTALS, id=cart) for _ in range(2)]  # 5 each: 1 left
        too_many = await http.post(
            "/graphql",
            json={"query": LINES, "variables": {"id": cart}},
            headers={**ada.headers, "accept": "application/graphql-response+json"},
        )
        admin_reads = [(await admin.post(LINES, id=cart)).status_code for _ in range(5)]
        # A command refused for the limit stores nothing.
        deposit = await ada.post(DEPOSIT, id=account)
        balance = (await admin.data(READ_BALANCE, id=account))["account"]["balance"]

    assert cheap.status_code == 200 and all(r.status_code == 200 for r in replayed)
    assert replayed[0].json()["data"] == {"cart": {"lines": []}}
    assert over.status_code == 429 and "data" not in over.json()
    error = over.json()["errors"][0]
    assert error["extensions"]["code"] == "RATE_LIMITED" and "costs 4 points" in error["message"]
    # Sent again, it pays its door token too: 4 tokens, of which the bucket holds 1.
    assert 145 <= int(over.headers["retry-after"]) <= 150
    assert after.status_code == 200
    assert spent.status_code == 429 and int(spent.headers["retry-after"]) <= 50  # at the door
    assert [r.status_code for r in lines] == [200, 200]
    assert too_many.status_code == 429 and "data" not in too_many.json()
    assert too_many.headers["content-type"].startswith("application/graphql-response+json")
    assert 195 <= int(too_many.headers["retry-after"]) <= 200  # 4 tokens, none there
    error = too_many.json()["errors"][0]
    assert error["extensions"]["code"] == "RATE_LIMITED" and "costs 4 points" in error["message"]
    assert admin_reads == [200] * 5  # no limit set for admins
    assert deposit.status_code == 429 and balance == 0
