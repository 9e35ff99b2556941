"""The cache and the rate limits on a real three-node Redis Cluster, started from the
machine's `redis-server` and joined with `redis-cli --cluster create`: entities spread over
every node, each entity's keys in one slot, reads batched across slots, and the whole API
serving cached reads from it."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from temporalio.client import Client

from api.rate_limits import Limit, RateLimiter
from deploy.embedded import die_with_parent, port_is_free
from entities.runtime.envelope import Snapshot
from entities.runtime.policy import Principal, Role
from tests.api.test_accounts_api import DEPOSIT, open_active, read_account
from tests.api.test_listing import ACCOUNTS, STATS
from tests.api.test_webhook_subscribers import LISTED
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.workers.test_change_stream import applied
from tests.workers.test_forgetting import ended_entities_are_forgotten_whole
from tests.workers.test_index import account, generations_moved_by_each_write
from workers.cache import CacheUnavailable, SnapshotCache, connect_redis
from workers.changes import Changes, stream_key
from workers.listing import EntityIndex, ListFilter, Order
from workers.redis_pools import WaitingCluster
from workers.settings import Settings


def node_port() -> int:
    """A free port whose cluster bus port (10,000 above it) is free too."""
    while True:
        port = random.randrange(20_000, 50_000)
        if port_is_free(port) and port_is_free(port + 10_000):
            return port


@dataclass
class Cluster:
    url: str
    """A URL naming one of its masters."""
    nodes: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        """Every node killed: the cluster is out of reach as a whole."""
        for node in self.nodes:
            node.kill()
        for node in self.nodes:
            node.wait(10)


@pytest.fixture
async def cluster(redis_cluster: Cluster) -> str:
    return redis_cluster.url


@pytest.fixture
async def cluster_cache(settings: Settings, cluster: str) -> AsyncIterator[SnapshotCache]:
    """The cache over the cluster, under the test's prefix, its client connected."""
    clustered = settings.model_copy(update={"redis_url": cluster, "redis_cluster": True})
    client = connect_redis(clustered)
    assert isinstance(client, RedisCluster)
    try:
        await client.initialize()
        yield SnapshotCache(client, clustered.redis_prefix)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A Redis Cluster of three masters."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert server and cli, "the Redis Cluster test needs redis-server and redis-cli on PATH"
    ports = [node_port() for _ in range(3)]
    nodes = []
    for port in ports:
        folder = tmp_path / str(port)
        folder.mkdir()
        nodes.append(
            subprocess.Popen(
                [
                    server,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--appendonly", "no",
                    "--save", "",
                    "--dir", str(folder),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        )  # fmt: skip
    try:
        for port in ports:
            for _ in range(100):
                ping = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True)
                if ping.stdout.strip() == b"PONG":
                    break
                await asyncio.sleep(0.05)
        create = subprocess.run(
            [
                *(cli, "--cluster", "create"),
                *(f"127.0.0.1:{p}" for p in ports),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            capture_output=True,
            timeout=60,
        )
        assert create.returncode == 0, create.stdout.decode() + create.stderr.decode()
        for _ in range(200):
            info = subprocess.run(
                [cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True
            )
            if b"cluster_state:ok" in info.stdout:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the cluster never reached cluster_state:ok")
        yield Cluster(f"redis://127.0.0.1:{ports[0]}/0", nodes)
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(10)


def snapshot(entity_id: str, revision: int) -> Snapshot:
    return Snapshot(
        entity_type="account",
        entity_id=entity_id,
        revision=revision,
        state={"balance": revision},
        incarnation=1,
    )


async def test_the_cache_spreads_over_the_cluster_one_slot_per_entity(
    cluster_cache: SnapshotCache,
) -> None:
    cache = cluster_cache
    client = cast(RedisCluster, cache.client)
    ids = [new_id() for _ in range(60)]
    # Each entity's key is tagged by the entity: its slot is the entity's, not the
    # prefix's, so entities spread over all three masters.
    nodes = Counter(
        client.get_node_from_key(cache.key("account", i)).name  # type: ignore[union-attr]
        for i in ids
    )
    assert len(nodes) == 3
    tagged = cache.key("account", ids[0])
    assert key_slot(tagged.encode()) == key_slot(f"account:{ids[0]}".encode())

    for entity_id in ids:
        assert await cache.put(snapshot(entity_id, 2))
    assert not await cache.put(snapshot(ids[0], 1))  # never backwards, on any node
    newer = await cache.put_newest(snapshot(ids[1], 1))
    assert newer.revision == 2
    # Reads of the same loop turn go as one pipeline, across slots and nodes.
    read = await asyncio.gather(*(cache.get("account", i) for i in ids))
    assert [hit.snapshot.revision if hit else None for hit in read] == [2] * len(ids)
    await cache.mark_stuck("account", ids[2], "a test")
    stuck = await cache.get("account", ids[2])
    assert stuck is not None and stuck.stuck == "a test"
    assert await cache.reachable()

    limiter = RateLimiter(client, cache.prefix, {Role.CUSTOMER: Limit(1.0, 2)})
    ada = Principal("ada", Role.CUSTOMER)
    waits = [await limiter.wait_ms(ada) for _ in range(3)]
    assert waits[:2] == [0, 0] and waits[2] > 0


async def test_the_api_and_worker_serve_cached_reads_from_the_cluster(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, cluster: str
) -> None:
    settings = settings.model_copy(update={"redis_url": cluster, "redis_cluster": True})
    client = connect_redis(settings)
    cache = SnapshotCache(client, settings.redis_prefix)
    async with run_worker(settings, cache), api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        accounts = [new_id() for _ in range(6)]
        for account in accounts:
            await open_active(gql, account)
        for account in accounts:
            for _ in range(50):
                read = await read_account(gql, account)
                if read["source"] == "CACHE" and read["revision"] == 2:
                    break
                await asyncio.sleep(0.1)
            assert (read["source"], read["revision"], read["stale"]) == ("CACHE", 2, False)
    await client.aclose()


SOURCE = "query($id: ID!) { account(id: $id) { id revision source } }"


async def test_with_the_whole_cluster_down_the_api_answers_from_temporal_or_unavailable(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    redis_cluster: Cluster,
) -> None:
    """A cluster with no node in reach raises RedisClusterException, which is not a
    RedisError: a cached read let it out as an HTTP 500. Every request now gets what it gets
    with a single Redis down: a read from the entity, commands applied, and UNAVAILABLE for
    what only Redis holds."""
    settings = settings.model_copy(update={"redis_url": redis_cluster.url, "redis_cluster": True})
    client = connect_redis(settings)
    cache = SnapshotCache(client, settings.redis_prefix)
    async with run_worker(settings, cache), api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        account = new_id()
        await open_active(gql, account)
        await asyncio.sleep(1)
        assert (await read_account(gql, account))["source"] == "CACHE"
        redis_cluster.stop()
        await asyncio.sleep(0.5)

        # The API's first call to a node that went away (one of its own, in the half second)
        # fails as a ConnectionError, a RedisError; every call after it finds no node to
        # learn the cluster's layout from (RedisClusterUnreachableError).
        for query in (ACCOUNTS, STATS, LISTED):
            assert await gql.error_code(query) == "UNAVAILABLE", query
        for _ in range(3):
            read = await http.post("/graphql", json={"query": SOURCE, "variables": {"id": account}})
            assert read.status_code == 200
            assert read.json()["data"]["account"]["source"] == "LIVE"
        deposit = await gql.data(DEPOSIT, id=account, amount=5)
        assert deposit["depositToAccount"]["account"]["balance"] == 5
    await client.aclose()


async def test_the_index_in_a_cluster_lives_in_its_type_slot_and_never_goes_back(
    cluster_cache: SnapshotCache,
) -> None:
    cache = cluster_cache
    index = EntityIndex(cache.client, cache.prefix)
    ids = sorted(new_id() for _ in range(30))
    # The snapshots spread over the nodes; the index is one slot, written by a second
    # script beside each snapshot's.
    assert await cache.put_many([account(i, 2, "SUSPENDED") for i in ids]) == len(ids)
    assert not await cache.put(account(ids[0], 1, "ACTIVE"))
    suspended = ListFilter(tags={"status": frozenset({"SUSPENDED"})})
    page = await index.page("account", suspended, Order.ID, 10)
    assert page.ids == ids[:10] and page.total == len(ids) and page.has_next
    assert await index.counts("account") == ({"SUSPENDED": len(ids)}, len(ids))
    assert await cache.put(account(ids[0], 3, "CLOSED"))
    assert await index.counts("account") == ({"CLOSED": 1, "SUSPENDED": len(ids) - 1}, 30)
    # The index's script raises the listing generations as the single Redis's does.
    await generations_moved_by_each_write(cache)


async def test_an_ended_entity_in_a_cluster_is_forgotten_from_both_of_its_slots(
    cluster_cache: SnapshotCache,
) -> None:
    await ended_entities_are_forgotten_whole(cluster_cache)


async def test_the_change_stream_in_a_cluster_is_written_with_the_index(
    cluster_cache: SnapshotCache,
) -> None:
    cache = cluster_cache
    client = cast(RedisCluster, cache.client)
    stream = stream_key(cache.prefix, "account")
    assert key_slot(stream.encode()) == key_slot(b"account")
    ids = [new_id() for _ in range(6)]
    for entity_id in ids:
        assert await cache.put(snapshot(entity_id, 2), Changes(0, applied(1, 2)))
    # Retried after the snapshot was written: the stream has its own rule.
    assert not await cache.put(snapshot(ids[0], 2), Changes(0, applied(1, 2)))
    assert await cache.put(snapshot(ids[0], 4), Changes(2, applied(4)))
    raw = await client.xrange(stream)
    shape = [
        (f[b"id"].decode(), f[b"type"].decode(), (f.get(b"revision") or f[b"to"]).decode())
        for _, f in raw
    ]
    for entity_id in ids[1:]:
        assert [s[1:] for s in shape if s[0] == entity_id] == [
            ("change", "1"),
            ("change", "2"),
        ]
    assert [s[1:] for s in shape if s[0] == ids[0]] == [
        ("change", "1"),
        ("change", "2"),
        ("gap", "3"),
        ("change", "4"),
    ]


async def burst_past_the_pool(settings: Settings) -> None:
    """Three hundred commands, pipelines and scripts at once through a client of three
    connections: each waits for one to come free, and none fails. Shared with the Sentinel
    test."""
    client = connect_redis(settings.model_copy(update={"redis_max_connections": 3}))
    prefix = f"{settings.redis_prefix}{new_id()}:"
    add = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")

    async def one(n: int) -> int:
        key = f"{prefix}{{k{n % 7}}}"
        if n % 3 == 0:
            return int(await client.incr(key))
        if n % 3 == 1:
            async with client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.get(key)
                return int((await pipe.execute())[0])
        return int(await add(keys=[key], args=[1]))

    try:
        await asyncio.gather(*(one(n) for n in range(300)))
        totals = [int(await client.get(f"{prefix}{{k{k}}}") or 0) for k in range(7)]
        assert sum(totals) == 300
    finally:
        await client.aclose()
        sentinels = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in sentinels.sentinels if sentinels is not None else []:
            await sentinel.aclose()


async def test_a_burst_past_the_pool_waits_for_connections(
    settings: Settings, cluster: str
) -> None:
    on_cluster = settings.model_copy(update={"redis_url": cluster, "redis_cluster": True})
    await burst_past_the_pool(on_cluster)
    await burst_past_the_pool(settings)  # the plain client's blocking pool, alike
    # A command that finds no connection free within the timeout is Redis unavailable.
    client = connect_redis(on_cluster.model_copy(update={"redis_max_connections": 1}))
    assert isinstance(client, WaitingCluster)
    try:
        held = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with client.turn():
                held.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await held.wait()
        with pytest.raises(RedisConnectionError, match="no Redis connection came free"):
            await client.get("anything")
        release.set()
        await holder
        assert await client.get(f"{new_id()}") is None  # free again
    finally:
        await client.aclose()


async def test_one_master_down_fails_only_the_reads_of_its_keys(
    settings: Settings, redis_cluster: Cluster
) -> None:
    """Reads made together go to Redis as one pipeline, and a cluster pipeline fails whole
    when one node's part fails: with one master of three down, until its failover, nearly
    every read failed, those of keys on the two others too. Only its own keys fail now."""
    settings = settings.model_copy(update={"redis_url": redis_cluster.url, "redis_cluster": True})
    client = connect_redis(settings)
    cache = SnapshotCache(client, settings.redis_prefix)
    try:
        ids = [new_id() for _ in range(30)]
        for n, entity_id in enumerate(ids):
            assert await cache.put(snapshot(entity_id, n + 1))
        assert isinstance(client, RedisCluster)
        ports = {
            entity_id: cast(Any, client.get_node_from_key(cache.key("account", entity_id))).port
            for entity_id in ids
        }
        down = redis_cluster.nodes[0]
        down_port = int(cast(list[str], down.args)[2])
        down.kill()
        down.wait(10)

        reads = await asyncio.gather(
            *(cache.get("account", entity_id) for entity_id in ids), return_exceptions=True
        )
        for entity_id, read in zip(ids, reads, strict=True):
            if ports[entity_id] == down_port:
                assert isinstance(read, CacheUnavailable), (entity_id, read)
            else:
                assert not isinstance(read, BaseException), (entity_id, read)
                assert read is not None and read.snapshot.entity_id == entity_id
        assert 0 < sum(port == down_port for port in ports.values()) < len(ids)
    finally:
        await client.aclose()
