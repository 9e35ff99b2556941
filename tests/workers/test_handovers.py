"""Waited commands published by the API process that sent them, against real servers: the
change reaches the cache and the stream with no publish activity of its entity's, and a
publish promised and not kept (the process died, or never got the answer) is taken up by a
worker; with no promise noted, or a cache that refuses the write, the entity publishes."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from api.gateway import EntityGateway
from deploy.embedded import EmbeddedRedis
from entities.runtime.envelope import CommandEnvelope, CommandResult
from entities.runtime.workflow import EntityWorkflow
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import eventually, until_cached, until_idle
from tests.entities.test_publishing import publishes
from tests.workers.test_change_stream import entries_of, revisions, until_streamed
from tests.workers.test_requests import published_account
from workers import handovers as handovers_module
from workers.cache import SnapshotCache
from workers.handovers import Handovers, OverdueHandovers
from workers.settings import Settings


def handovers_of(cache: SnapshotCache) -> Handovers:
    return Handovers(cache.client, cache.prefix)


async def noted(handovers: Handovers, workflow_id: str, command_id: str) -> bool:
    member = Handovers.member(workflow_id, command_id)
    return await handovers.client.zscore(handovers.key, member) is not None


async def until_kept(handovers: Handovers, workflow_id: str, command_id: str) -> None:
    """Once the command's promise is kept (off the answer's way)."""
    await eventually(lambda: noted(handovers, workflow_id, command_id), lambda is_: not is_)


async def test_a_waited_command_is_published_by_the_api_process_that_sent_it(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """The caller's answer, the cache and the change stream all have the change at once,
    its entity schedules no publish activity for it, and the promise is kept."""
    gateway = EntityGateway(temporal_client, cache, settings)
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        workflow_id = f"account:{account_id}"
        await until_idle(temporal_client, workflow_id)
        before = await publishes(temporal_client, workflow_id)

        receipt = await gateway.send(
            "account", account_id, "withdraw", {"amount": 20}, idempotency_key="w1", wait=True
        )

        assert receipt.read is not None and receipt.read.snapshot.revision == 4
        hit = await cache.get("account", account_id)  # no waiting: it was published
        assert hit is not None and hit.snapshot.revision == 4
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await entries_of(cache, "account", account_id)) == [1, 2, 3, 4]
        await until_idle(temporal_client, workflow_id)
        assert await publishes(temporal_client, workflow_id) == before
        await until_kept(handovers_of(cache), workflow_id, "w1")

        # Sent again: applied once, streamed once.
        again = await gateway.send(
            "account", account_id, "withdraw", {"amount": 20}, idempotency_key="w1", wait=True
        )
        assert again.revision == 4
        await until_cached(cache, "account", account_id, 4)
        assert revisions(await entries_of(cache, "account", account_id)) == [1, 2, 3, 4]


async def test_a_promise_not_kept_is_taken_up_by_a_worker(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """An API process that noted its promise and died after the entity's answer, before it
    wrote it, leaves the cache and the stream behind; a worker's sweep asks the entity to
    publish, and both catch up."""
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")  # this test's alone
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        workflow_id = f"account:{account_id}"
        promise = await handovers.promise(workflow_id, "w1")
        assert promise is not None
        handle = temporal_client.get_workflow_handle(workflow_id)
        handed = await handle.execute_update(
            EntityWorkflow.apply,
            CommandEnvelope(
                command_id="w1", name="withdraw", payload={"amount": 20}, publishes=True
            ),
            result_type=CommandResult,
        )
        assert handed.publication() is not None  # and the process died here
        await until_idle(temporal_client, workflow_id)
        hit = await cache.get("account", account_id)
        assert hit is not None and hit.snapshot.revision == 3

        # Not overdue yet: left alone.
        assert await OverdueHandovers(temporal_client, handovers, overdue=60).sweep() == 0
        assert await noted(handovers, workflow_id, "w1")
        assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 1

        hit = await until_cached(cache, "account", account_id, 4)
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await until_streamed(cache, "account", account_id, 4)) == [1, 2, 3, 4]
        assert not await noted(handovers, workflow_id, "w1")


async def test_with_no_promise_noted_the_entity_publishes(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
    own_cache: SnapshotCache,
) -> None:
    """An API process whose Redis is out of reach notes no promise: its command is applied
    and answered, and the entity publishes it (here to the workers' Redis)."""
    own_redis.stop()
    gateway = EntityGateway(temporal_client, own_cache, settings)
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        receipt = await gateway.send(
            "account", account_id, "withdraw", {"amount": 20}, idempotency_key="w1", wait=True
        )
        assert receipt.revision == 4
        hit = await until_cached(cache, "account", account_id, 4)
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await until_streamed(cache, "account", account_id, 4)) == [1, 2, 3, 4]


async def test_a_handed_publish_the_cache_refuses_is_handed_back(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    run_worker: WorkerFactory,
    own_redis: EmbeddedRedis,
    own_cache: SnapshotCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis stops between the promise and the write: the caller still has its answer, and
    the entity is asked to publish, which it does (to the workers' Redis here)."""
    promise = Handovers.promise

    async def then_redis_stops(self: Handovers, workflow_id: str, command_id: str) -> str | None:
        noted = await promise(self, workflow_id, command_id)
        own_redis.stop()
        return noted

    gateway = EntityGateway(temporal_client, own_cache, settings)
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        monkeypatch.setattr(Handovers, "promise", then_redis_stops)
        receipt = await gateway.send(
            "account", account_id, "withdraw", {"amount": 20}, idempotency_key="w1", wait=True
        )
        assert receipt.read is not None and receipt.read.snapshot.revision == 4
        hit = await until_cached(cache, "account", account_id, 4)
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await until_streamed(cache, "account", account_id, 4)) == [1, 2, 3, 4]


async def test_promises_outstanding_are_bounded(
    cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound no promise is noted (the entities publish), and nothing is added."""
    monkeypatch.setattr(handovers_module, "MAX_PROMISES", 2)
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")  # none noted yet
    assert await handovers.promise("account:a", "c1") is not None
    assert await handovers.promise("account:b", "c2") is not None
    assert await handovers.promise("account:c", "c3") is None
    assert await handovers.outstanding() == 2
    await handovers.kept(Handovers.member("account:a", "c1"))
    assert await handovers.promise("account:c", "c3") is not None
