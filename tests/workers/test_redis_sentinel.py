"""The cache on Redis with a replica and a Sentinel, from the machine's `redis-server`: it
follows the master the Sentinel names, and after the master is killed and the replica
promoted, it writes to the new master and never reads an entity backwards."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as redis

from deploy.embedded import die_with_parent, free_port
from tests.conftest import new_id
from tests.workers.test_redis_cluster import burst_past_the_pool, snapshot
from workers.cache import CacheUnavailable, SnapshotCache, connect_redis
from workers.settings import Settings

MASTER = "tenure"


@dataclass
class Replicated:
    master: subprocess.Popen[bytes]
    master_port: int
    replica_port: int
    sentinel_port: int


def server(*args: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary, "the Sentinel test needs redis-server on PATH"
    return subprocess.Popen(
        [binary, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def answers(port: int, *command: str) -> str:
    cli = shutil.which("redis-cli")
    assert cli
    done = subprocess.run([cli, "-p", str(port), *command], capture_output=True, timeout=5)
    return done.stdout.decode()


@pytest.fixture
async def replicated(tmp_path: Path) -> AsyncIterator[Replicated]:
    ports = [free_port() for _ in range(3)]
    master_port, replica_port, sentinel_port = ports
    # Full resynchronisation writes an RDB file even with saving off: into the test's folder.
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    master = server("--port", str(master_port), *common)
    replica = server(
        "--port", str(replica_port), *common, "--replicaof", "127.0.0.1", str(master_port)
    )
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
    )
    sentinel = server(str(config), "--sentinel")
    try:
        await until(
            lambda: "master_link_status:up" in answers(replica_port, "info", "replication"),
            20,
            "the replica never caught up with the master",
        )
        await until(
            lambda: "num-slaves\n1\n" in answers(sentinel_port, "sentinel", "master", MASTER),
            20,
            "the Sentinel never saw the replica",
        )
        yield Replicated(master, master_port, replica_port, sentinel_port)
    finally:
        for process in (sentinel, replica, master):
            process.kill()
            process.wait(10)


async def test_the_cache_follows_a_sentinel_failover(
    settings: Settings, replicated: Replicated
) -> None:
    settings = settings.model_copy(
        update={
            "redis_url": None,
            "redis_sentinels": [f"127.0.0.1:{replicated.sentinel_port}"],
            "redis_sentinel_master": MASTER,
        }
    )
    # A burst past the master's pool waits for its connections.
    await burst_past_the_pool(settings)
    client = connect_redis(settings)
    cache = SnapshotCache(client, settings.redis_prefix)
    entity_id = new_id()
    try:
        assert await cache.put(snapshot(entity_id, 1))
        assert (await client.execute_command("WAIT", 1, 2000)) == 1  # on the replica too
        replicated.master.kill()
        replicated.master.wait()

        # Writes fail until the Sentinel promotes the replica, then go to the new master.
        deadline = time.monotonic() + 30
        while True:
            try:
                await cache.put(snapshot(entity_id, 2))
                break
            except CacheUnavailable:
                assert time.monotonic() < deadline, "the Sentinel never failed over"
                await asyncio.sleep(0.2)
        promoted = answers(replicated.sentinel_port, "sentinel", "get-master-addr-by-name", MASTER)
        assert str(replicated.replica_port) in promoted
        read = await cache.get("account", entity_id)
        assert read is not None and read.snapshot.revision == 2
        # It is the promoted replica that holds it.
        direct = redis.Redis(port=replicated.replica_port)
        assert await direct.hget(cache.key("account", entity_id), "revision") == b"2"
        await direct.aclose()
    finally:
        await client.aclose()
        for sentinel in client.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await sentinel.aclose()


@pytest.mark.parametrize("node", ["sentinel-0", ":26379", "sentinel-0:port"])
def test_a_sentinel_named_without_its_port_is_refused_by_the_setting_s_name(node: str) -> None:
    """`TENURE_REDIS_SENTINELS=sentinel-0` was "invalid literal for int() with base 10",
    naming neither the setting nor what was missing."""
    settings = Settings(redis_sentinel_master="mymaster", redis_sentinels=[node])
    with pytest.raises(ValueError, match=r"TENURE_REDIS_SENTINELS: .* is not host:port"):
        connect_redis(settings)
