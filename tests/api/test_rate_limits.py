"""Rate limits per caller, on real Redis: a burst, then one request per refill, per principal."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from temporalio.client import Client

from api.rate_limits import Limit, RateLimiter
from entities.runtime.policy import Principal, Role
from tests.api.test_access import SECRET, token
from tests.conftest import WorkerFactory, api_client, new_id
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

    def as_(sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token('customer', sub)}"}

    async with run_worker(secured), api_client(secured, temporal_client) as http:
        answers = [(await http.post("/graphql", json=read, headers=as_("ada"))) for _ in range(3)]
        other = await http.post("/graphql", json=read, headers=as_("bob"))
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
