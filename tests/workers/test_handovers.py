"""Waited commands published by the API process that sent them, against real servers: the
change reaches the cache and the stream with no publish activity of its entity's, and a
publish promised and not kept (the process died, or never got the answer) is taken up by a
worker; with no promise noted, or a cache that refuses the write, the entity publishes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.exceptions import RedisClusterException
from temporalio.client import Client
from temporalio.worker import Worker

from api.gateway import EntityGateway
from deploy.embedded import EmbeddedRedis
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import CommandEnvelope, CommandResult
from entities.runtime.workflow import EntityWorkflow
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import eventually, until_cached, until_idle
from tests.entities.test_publishing import publishes
from tests.workers.sandboxed_workflows import FailingOutcomes
from tests.workers.test_change_stream import entries_of, revisions, until_streamed
from tests.workers.test_requests import published_account
from workers import handovers as handovers_module
from workers.cache import SnapshotCache
from workers.handovers import Handovers, OverdueHandovers
from workers.settings import Settings


def handovers_of(cache: SnapshotCache) -> Handovers:
    return Handovers(cache.client, cache.prefix)


async def noted(handovers: Handovers, workflow_id: str, command_id: str) -> bool:
    """Whether a promise of this command is outstanding."""
    members = await handovers.client.zrange(handovers.key, 0, -1)
    return any(m.decode().startswith(f"{workflow_id} {command_id} ") for m in members)


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
        account_id, workflow_id = await handed_and_never_published(
            temporal_client, cache, settings, handovers
        )
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

    async def then_redis_stops(
        self: Handovers, workflow_id: str, command_id: str, sent_by: str | None = None
    ) -> str | None:
        noted = await promise(self, workflow_id, command_id, sent_by)
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
    first = await handovers.promise("account:a", "c1")
    assert first is not None
    assert await handovers.promise("account:b", "c2") is not None
    assert await handovers.promise("account:c", "c3") is None
    assert await handovers.client.zcard(handovers.key) == 2
    await handovers.kept(first)
    assert await handovers.promise("account:c", "c3") is not None


async def handed_and_never_published(
    client: Client, cache: SnapshotCache, settings: Settings, handovers: Handovers
) -> tuple[str, str]:
    """An account at revision 3 in the cache, whose withdrawal (revision 4) was handed to
    an API process that noted its promise and died: the account id and its workflow id."""
    account_id = await published_account(client, cache, settings)
    workflow_id = f"account:{account_id}"
    assert await handovers.promise(workflow_id, "w1") is not None
    handed = await client.get_workflow_handle(workflow_id).execute_update(
        EntityWorkflow.apply,
        CommandEnvelope(command_id="w1", name="withdraw", payload={"amount": 20}, publishes=True),
        result_type=CommandResult,
    )
    assert handed.publication() is not None
    await until_idle(client, workflow_id)
    hit = await cache.get("account", account_id)
    assert hit is not None and hit.snapshot.revision == 3
    return account_id, workflow_id


async def test_a_promise_whose_command_is_applied_late_waits_for_it(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """An update admitted behind a busy entity, its API process gone: the promise was taken
    up once it was overdue, the entity asked to publish, and let go. The update was applied
    later and handed over to no one, and that change reached no cache and no stream until
    the entity changed again. A promise whose command is not applied yet is kept, and its
    entity asked again, until it is."""
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        workflow_id = f"account:{account_id}"
        assert await handovers.promise(workflow_id, "late") is not None
        # Not applied yet: kept, and its entity not asked yet (a publish it took before the
        # command would leave the command's change to no one all the same).
        assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 0
        assert await noted(handovers, workflow_id, "late")

        handed = await temporal_client.get_workflow_handle(workflow_id).execute_update(
            EntityWorkflow.apply,
            CommandEnvelope(
                command_id="late", name="withdraw", payload={"amount": 20}, publishes=True
            ),
            result_type=CommandResult,
        )
        assert handed.publication() is not None  # handed over to the sender, who is gone
        await until_idle(temporal_client, workflow_id)
        hit = await cache.get("account", account_id)
        assert hit is not None and hit.snapshot.revision == 3

        assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 1
        hit = await until_cached(cache, "account", account_id, 4)
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert revisions(await until_streamed(cache, "account", account_id, 4)) == [1, 2, 3, 4]
        assert not await noted(handovers, workflow_id, "late")


async def test_a_promise_whose_key_another_sender_took_waits_for_its_own_command(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """Another sender's command held the key, applied: the sweep took that outcome for the
    promise's, asked the entity to publish and let the promise go. The promised command,
    applied later under its sender's own id, was handed over to no one, and its change
    reached no cache and no stream until the entity changed again."""
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        workflow_id = f"account:{account_id}"
        handle = temporal_client.get_workflow_handle(workflow_id)

        async def withdraw(sent_by: str, publishes: bool) -> CommandResult:
            envelope = CommandEnvelope(
                command_id="shared",
                name="withdraw",
                payload={"amount": 10},
                sent_by=sent_by,
                publishes=publishes,
            )
            return await handle.execute_update(
                EntityWorkflow.apply, envelope, result_type=CommandResult
            )

        await withdraw("service:billing", publishes=False)
        await until_cached(cache, "account", account_id, 4)
        assert await handovers.promise(workflow_id, "shared", "customer:ada") is not None
        assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 0
        assert await noted(handovers, workflow_id, "shared")

        handed = await withdraw("customer:ada", publishes=True)
        assert handed.outcome.command_id == "customer:ada/shared"
        assert handed.publication() is not None  # handed over to the sender, who is gone
        assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 1
        hit = await until_cached(cache, "account", account_id, 5)
        assert hit.snapshot.state is not None and hit.snapshot.state["balance"] == 30
        assert not await noted(handovers, workflow_id, "shared")


def test_a_promise_says_when_it_was_made() -> None:
    member = Handovers.member("account:ada", "dep-1")
    made = Handovers.made_at(member)
    assert made is not None and abs(made - time.time()) < 5
    assert Handovers.command_of(member) == "dep-1"
    assert Handovers.made_at("account:ada dep-1 0123456789ab") is None  # made before
    assert Handovers.sender_of(member) is None
    signed = Handovers.member("account:ada", "dep-1", "customer:a b.c")
    assert Handovers.sender_of(signed) == "customer:a b.c"
    assert Handovers.command_of(signed) == "dep-1"
    assert Handovers.workflow_of(signed) == "account:ada"
    made = Handovers.made_at(signed)
    assert made is not None and abs(made - time.time()) < 5


async def test_a_promise_taken_up_by_a_worker_that_stops_is_taken_up_again(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A worker that takes a promise up and stops before it asks the entity (killed, or shut
    down mid-sweep) leaves it leased: overdue again once its lease is as old as a promise
    is let be, and then taken up by another."""
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")
    async with run_worker():
        account_id, workflow_id = await handed_and_never_published(
            temporal_client, cache, settings, handovers
        )
        _, taken = await handovers.claim(overdue=0)  # and the worker stops here
        assert [Handovers.workflow_of(member) for member in taken] == [workflow_id]

        assert await OverdueHandovers(temporal_client, handovers, overdue=60).sweep() == 0
        assert await noted(handovers, workflow_id, "w1")
        assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 1
        await until_cached(cache, "account", account_id, 4)
        assert not await noted(handovers, workflow_id, "w1")


async def test_the_sweep_goes_on_whatever_fails(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep that fails with an error of any kind (a Redis Cluster out of reach raises one
    that is not a RedisError) is tried again: the loop does not end."""
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")
    claim = Handovers.claim
    failures = [RedisClusterException("Redis Cluster cannot be connected")]

    async def fails_first(self: Handovers, overdue: float, limit: int = 500) -> Any:
        if failures:
            raise failures.pop()
        return await claim(self, overdue, limit)

    async with run_worker():
        account_id, _ = await handed_and_never_published(
            temporal_client, cache, settings, handovers
        )
        monkeypatch.setattr(Handovers, "claim", fails_first)
        sweeping = asyncio.create_task(
            OverdueHandovers(temporal_client, handovers, overdue=0, interval=0.05).run()
        )
        try:
            await until_cached(cache, "account", account_id, 4)
        finally:
            sweeping.cancel()
        assert not failures


async def test_one_entity_failing_to_answer_holds_back_no_other_promise(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A promise whose entity fails its outcome query (an error of its own code, not one of
    Temporal's) is asked again at a later sweep; the promises swept with it are taken up.
    Before, that one failure failed the whole sweep, every promise in it stayed leased, and
    their entities published 10 minutes late."""
    handovers = Handovers(cache.client, f"{cache.prefix}{new_id()}:")
    failing_id = f"failing:{new_id()}"
    queue = f"{settings.task_queue}-failing"
    async with (
        run_worker(),
        Worker(temporal_client, task_queue=queue, workflows=[FailingOutcomes]),
    ):
        failing = await temporal_client.start_workflow(
            FailingOutcomes.run, id=failing_id, task_queue=queue
        )
        assert await handovers.promise(failing_id, "c1") is not None
        account_id, workflow_id = await handed_and_never_published(
            temporal_client, cache, settings, handovers
        )
        try:
            assert await OverdueHandovers(temporal_client, handovers, overdue=0).sweep() == 1
            await until_cached(cache, "account", account_id, 4)
            assert not await noted(handovers, workflow_id, "w1")
            assert await noted(handovers, failing_id, "c1")  # asked again later
        finally:
            await failing.terminate()


async def test_a_waited_command_refused_before_it_was_applied_leaves_no_promise(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """An entity that does not exist, or a key already used for another command: nothing was
    handed over, so no promise is left for a worker to take up (and signal the entity for,
    and count against the bound)."""
    gateway = EntityGateway(temporal_client, cache, settings)
    handovers = handovers_of(cache)
    async with run_worker():
        account_id = await published_account(temporal_client, cache, settings)
        missing = new_id()
        with pytest.raises(TenureError) as absent:
            await gateway.send(
                "account", missing, "deposit", {"amount": 5}, wait=True, idempotency_key="d1"
            )
        assert absent.value.code is ErrorCode.NOT_FOUND
        await gateway.send(
            "account", account_id, "deposit", {"amount": 5}, wait=True, idempotency_key="d2"
        )
        with pytest.raises(TenureError) as reused:
            await gateway.send(
                "account", account_id, "deposit", {"amount": 6}, wait=True, idempotency_key="d2"
            )
        assert reused.value.code is ErrorCode.IDEMPOTENCY_KEY_REUSED
        await until_kept(handovers, f"account:{missing}", "d1")
        await until_kept(handovers, f"account:{account_id}", "d2")
