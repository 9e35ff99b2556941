"""Outages as a reader sees them: a live read answers within its deadline, and after Redis
returns with its old entries, no read goes back and the cache catches up within seconds."""

from __future__ import annotations

import time
from pathlib import Path

from temporalio.client import Client

from api.gateway import Consistency, EntityGateway, Source
from deploy.embedded import EmbeddedRedis
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import Shop, eventually
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache, connect_redis
from workers.settings import Settings


async def test_a_live_read_answers_within_its_deadline_when_no_worker_answers(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"live_read_timeout": 1.0})
    _bank, account_id = await Shop(temporal_client, cache, settings).unserved_account(
        run_worker, balance=10
    )
    gateway = EntityGateway(temporal_client, cache, settings)
    slowest = 0.0
    for _ in range(3):
        started = time.monotonic()
        read = await gateway.read("account", account_id, Consistency.LIVE)
        slowest = max(slowest, time.monotonic() - started)
        # The last-seen state, marked as such.
        assert read is not None and read.stale and read.source is Source.CACHE
        assert read.snapshot.revision == 3
    # The SDK's own timeout let such reads run to 4.1 s for 2 s; the deadline is the
    # contract, with room for the cache read that follows it.
    assert slowest < 1.0 + 0.5, slowest


async def test_after_redis_returns_with_old_entries_reads_never_go_back(
    temporal_client: Client, settings: Settings, run_worker: WorkerFactory, tmp_path: Path
) -> None:
    redis_server = EmbeddedRedis(data_dir=tmp_path)  # comes back with what it had
    await redis_server.start()
    settings = settings.model_copy(update={"redis_url": redis_server.url, "redis_timeout": 0.5})
    worker_redis, api_redis, reader_redis = (connect_redis(settings) for _ in range(3))
    api_cache = SnapshotCache(api_redis, settings.redis_prefix)
    gateway = EntityGateway(temporal_client, api_cache, settings)
    # A third client, with nothing of its own to remember: what Redis itself holds.
    redis_itself = SnapshotCache(reader_redis, settings.redis_prefix)
    account_id = new_id()
    try:
        async with run_worker(settings, SnapshotCache(worker_redis, settings.redis_prefix)):
            await open_active(gateway, account_id)
            await eventually(
                lambda: redis_itself.get("account", account_id),
                lambda hit: hit is not None and hit.snapshot.revision == 2,
            )
            redis_server.stop()
            for amount in (1, 2, 3):
                await gateway.send("account", account_id, "deposit", {"amount": amount}, wait=True)
            live = await gateway.read("account", account_id, Consistency.LIVE)
            assert live is not None and live.snapshot.revision == 5

            await redis_server.start()
            # Redis holds revision 2 again; the API has shown 5 and never shows less.
            read = await gateway.read("account", account_id, Consistency.CACHED)
            assert read is not None and read.snapshot.revision == 5 and not read.stale
            started = time.monotonic()
            hit = await eventually(
                lambda: redis_itself.get("account", account_id),
                lambda hit: hit is not None and hit.snapshot.revision == 5,
                timeout=10,
            )
            caught_up = time.monotonic() - started
            assert hit is not None and hit.snapshot.state is not None
            assert hit.snapshot.state["balance"] == 6
            assert caught_up < 2.5, caught_up
    finally:
        for client in (worker_redis, api_redis, reader_redis):
            await client.aclose()
        redis_server.stop()
