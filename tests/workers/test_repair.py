"""A stuck entity is visible and repairable: frozen on purpose by a bad deploy whose history
today's code cannot replay, then found by the watchdog and reset by `tenure repair`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker._worker import load_default_build_id

import workers.repair
import workers.watchdog
from api.gateway import Consistency, EntityGateway, Source
from entities.account import AccountWorkflow
from entities.errors import ErrorCode, TenureError
from entities.runtime import EntityRunInput, EntityWorkflow, Snapshot
from entities.runtime.envelope import CommandEnvelope, HistoryPage
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import eventually, until_idle
from tests.entities.test_runtime import open_active
from tests.workers.sandboxed_workflows import FailingTasks
from tests.workers.test_metrics import metrics_settings, scrape
from workers.cache import CacheUnavailable, SnapshotCache
from workers.repair import RepairDeferred, is_stuck, repair
from workers.settings import Settings
from workers.watchdog import StuckEntityWatchdog
from workers.worker import TenureWorker, activity_functions, worker_runtime

POISON = 13
BAD_DEPLOY_SHUTDOWN = 30.0


@workflow.defn(name="Account")
class BadDeployAccount(AccountWorkflow):
    """A deploy gone wrong: a deposit of 13 also starts a stray timer, a command that
    today's AccountWorkflow never makes, so its history no longer replays."""

    @workflow.run
    async def run(self, input: EntityRunInput) -> Snapshot:
        return await self.run_entity()

    def _receive(self, envelope: CommandEnvelope) -> None:
        """Every command, signalled or sent as an update, comes through here."""
        super()._receive(envelope)
        if envelope.payload.get("amount") == POISON:
            self._stray = asyncio.get_running_loop().create_task(workflow.sleep(3600))


# Defining the variant registered it as the account type's workflow: undo that.
EntityWorkflow.registry["account"] = AccountWorkflow


async def deposit(gateway: EntityGateway, account_id: str, amount: int, **kw: Any) -> None:
    await gateway.send("account", account_id, "deposit", {"amount": amount}, **kw)


def bad_deploy_worker(
    client: Client, cache: SnapshotCache, settings: Settings, build_id: str | None = None
) -> Worker:
    """A worker of the bad deploy's code (of build `build_id`, when given)."""
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[BadDeployAccount],
        activities=activity_functions(client, cache, settings),
        workflow_runner=UnsandboxedWorkflowRunner(),
        build_id=build_id,
    )


async def opened_by_a_bad_deploy(
    gateway: EntityGateway,
    client: Client,
    cache: SnapshotCache,
    settings: Settings,
    before: int | None = None,
    after: int | None = None,
) -> str:
    """An account opened, verified and given deposits (`before`, the poison, `after`) by
    the bad deploy: today's code can no longer replay its history."""
    account_id = new_id()
    bad = bad_deploy_worker(client, cache, settings)
    # Its shutdown bounded as Tenure's worker bounds its own: the SDK's shutdown of this
    # worker once hung here, holding the test past its time limit.
    async with TenureWorker([bad], shutdown_bound=BAD_DEPLOY_SHUTDOWN):
        await gateway.send(
            "account", account_id, "open", {"owner_name": "Ada", "email": "a@b.cc"}, wait=True
        )
        await gateway.send("account", account_id, "verify", {}, wait=True)
        for amount in (before, POISON, after):
            if amount is not None:
                await deposit(gateway, account_id, amount, wait=True)
        # Left idle: no task pending for today's code.
        await until_idle(client, f"account:{account_id}")
    return account_id


async def test_a_live_read_that_makes_a_worker_replay_a_stuck_entity_reads_stale(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """The first touch of a stuck entity by today's worker is a LIVE read: the query makes
    the worker replay the history it cannot follow. The read is the cached copy, stale,
    where it was an internal error; a history read is UNAVAILABLE, try again."""
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = await opened_by_a_bad_deploy(gateway, temporal_client, cache, settings, 5, 7)
    async with run_worker():
        live = await gateway.read("account", account_id, Consistency.LIVE)
        assert live is not None and live.stale and live.source is Source.CACHE
        assert live.snapshot.revision == 5
        with pytest.raises(TenureError) as refused:
            await gateway.history("account", account_id, HistoryPage())
        assert refused.value.code is ErrorCode.UNAVAILABLE


async def test_a_stuck_entity_reads_stale_and_repair_applies_every_command(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = await opened_by_a_bad_deploy(gateway, temporal_client, cache, settings, 5, 7)
    workflow_id = f"account:{account_id}"

    async with run_worker():
        # Today's code replays the bad history, meets the stray timer and fails the task,
        # on every retry: the deposit is accepted, never applied.
        await deposit(gateway, account_id, 11, idempotency_key=f"{account_id}-11")
        assert await eventually(lambda: is_stuck(temporal_client, workflow_id), bool, 30)

        watchdog = StuckEntityWatchdog(temporal_client, cache, settings.task_queue)
        found = await eventually(watchdog.sweep, lambda found: workflow_id in found, 40)
        assert "WorkflowTaskFailed" in found[workflow_id]
        cached = await gateway.read("account", account_id, Consistency.CACHED)
        assert cached is not None and cached.stale and cached.snapshot.revision == 5
        live = await gateway.read("account", account_id, Consistency.LIVE)
        assert live is not None and live.stale and live.source is Source.CACHE
        with pytest.raises(TenureError) as refused:
            await deposit(gateway, account_id, 1, idempotency_key=f"{account_id}-1", wait=True)
        assert refused.value.code is ErrorCode.UNAVAILABLE

        done = await repair(temporal_client, "account", account_id)
        assert done.new_run_id != done.old_run_id and done.commands_reapplied >= 2

        async def settled() -> Snapshot | None:
            read = await gateway.read("account", account_id, Consistency.LIVE)
            return read.snapshot if read is not None and not read.stale else None

        # open, verify, 5, 13, 7, then the 11 and the 1 that came while it was stuck.
        snapshot = await eventually(settled, lambda s: s is not None and s.revision == 7, 30)
        assert snapshot is not None and snapshot.state is not None
        assert snapshot.state["balance"] == 5 + POISON + 7 + 11 + 1
        # A retry of a command sent while it was stuck is applied once.
        await deposit(gateway, account_id, 1, idempotency_key=f"{account_id}-1", wait=True)
        again = await settled()
        assert again is not None and again.revision == 7 and again.state == snapshot.state
        assert not await watchdog.sweep()
        cached = await gateway.read("account", account_id, Consistency.CACHED)
        assert cached is not None and not cached.stale and cached.snapshot.revision == 7


async def test_two_repairs_of_one_run_at_once_make_one_new_run_and_lose_nothing(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every worker's watchdog repairs a stuck entity, so two may repair one run at once.
    The second reset the old run again after the first's new run had taken a deposit (and
    told its client so): that run was ended, and the deposit was lost. The second finds
    the run repaired, and does nothing."""
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    both_looked, go_on = asyncio.Barrier(2), asyncio.Event()
    looked = 0
    found_last_good = workers.repair.last_good_task

    async def slowly(workflow_id: str, events: Any) -> int:
        nonlocal looked
        looked += 1
        second = looked == 2
        await both_looked.wait()
        if second:
            await go_on.wait()  # until the first's new run has taken a deposit
        return await found_last_good(workflow_id, events)

    monkeypatch.setattr(workers.repair, "last_good_task", slowly)
    async with run_worker(settings):
        await open_active(gateway, account_id)
        await deposit(gateway, account_id, 5, wait=True)
        repairs = [
            asyncio.create_task(repair(temporal_client, "account", account_id, force=True))
            for _ in range(2)
        ]
        # The one that looked first resets first; the other waits (`slowly`).
        [first], [second] = await asyncio.wait(repairs, return_when=asyncio.FIRST_COMPLETED)
        await first
        await deposit(gateway, account_id, 7, wait=True)
        go_on.set()
        with pytest.raises(TenureError) as late:
            await second
        assert late.value.code is ErrorCode.CONFLICT
        assert "repaired meanwhile" in late.value.message

        async def balance() -> int:
            read = await gateway.read("account", account_id, Consistency.LIVE)
            assert read is not None and read.snapshot.state is not None
            return int(read.snapshot.state["balance"])

        assert await eventually(balance, lambda b: b == 12, 10) == 12


async def test_repair_refuses_an_entity_that_makes_progress(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, worker: Worker
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    await gateway.send(
        "account", account_id, "open", {"owner_name": "Ada", "email": "a@b.cc"}, wait=True
    )
    with pytest.raises(TenureError) as refused:
        await repair(temporal_client, "account", account_id)
    assert refused.value.code is ErrorCode.INVALID_TRANSITION


async def test_the_watchdog_repairs_an_entity_whose_history_no_longer_replays(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = await opened_by_a_bad_deploy(gateway, temporal_client, cache, settings)
    async with run_worker():
        await deposit(gateway, account_id, 11, idempotency_key=f"{account_id}-11")
        watchdog = StuckEntityWatchdog(
            temporal_client, cache, settings.task_queue, auto_repair=True
        )

        async def healed() -> Snapshot | None:
            await watchdog.sweep()
            read = await gateway.read("account", account_id, Consistency.LIVE)
            return read.snapshot if read is not None and not read.stale else None

        snapshot = await eventually(healed, lambda s: s is not None and s.revision == 4, 60)
    assert snapshot is not None and snapshot.state is not None
    assert snapshot.state["balance"] == POISON + 11


async def test_repair_in_a_namespace_temporal_does_not_know_says_so_not_no_entity(
    temporal_client: Client, settings: Settings
) -> None:
    """Temporal answers NOT_FOUND for a namespace it does not know, as for a workflow: a
    mistyped TEMPORAL_NAMESPACE told the operator "no account ada", of an account that is
    there. Now the namespace's own error goes through."""
    assert settings.temporal_address is not None
    elsewhere = await Client.connect(
        settings.temporal_address, namespace=f"no-such-namespace-{new_id()[:8]}"
    )
    account_id = new_id()
    with pytest.raises(RPCError) as raised:
        await repair(elsewhere, "account", account_id)
    assert "amespace" in raised.value.message
    with pytest.raises(TenureError) as missing:  # a missing entity is still NOT_FOUND
        await repair(temporal_client, "account", account_id)
    assert missing.value.code is ErrorCode.NOT_FOUND


async def test_auto_repair_tries_each_stuck_run_once(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run no repair can mend (no task of it replays) was tried at every sweep of every
    worker, its history fetched and replayed every 10 s, each with a warning, until an
    operator came. Each stuck run is tried once; a new run (a repair's, stuck again) once
    in its turn."""
    tried: list[str] = []

    async def cannot(client: Client, entity_type: str, entity_id: str, **_: Any) -> None:
        tried.append(entity_id)
        if len(tried) == 1:  # Temporal out of reach: no answer about the run
            raise RPCError("unavailable", RPCStatusCode.UNAVAILABLE, b"")
        if entity_id == "bob":  # Temporal's refusal of the reset: an answer all the same
            raise RPCError("no such event", RPCStatusCode.INVALID_ARGUMENT, b"")
        raise TenureError(ErrorCode.INVALID_TRANSITION, "no task of it replays")

    monkeypatch.setattr(workers.watchdog, "repair", cannot)
    watchdog = StuckEntityWatchdog(temporal_client, cache, settings.task_queue, auto_repair=True)
    for _ in range(4):  # four sweeps: the first could not ask, the second was told
        await watchdog._repair("account:ada", "run-1")
    await watchdog._repair("account:ada", "run-2")
    for _ in range(3):
        await watchdog._repair("account:bob", "run-1")
    assert tried == ["ada", "ada", "ada", "bob"]


async def test_a_stuck_mark_no_watchdog_remembers_is_cleared_once_its_entity_makes_progress(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watchdog cleared only the marks it remembered: after its worker restarted, or once
    Redis was away as its entity recovered, a healthy entity read `stale: true` until its
    next change. The marks are listed in Redis, and any sweep clears what is not stuck."""
    gateway = EntityGateway(temporal_client, cache, settings)
    recovered, blipped = new_id(), new_id()
    async with run_worker():
        for account_id in (recovered, blipped):
            await open_active(gateway, account_id)

    async def stale(account_id: str) -> bool:
        read = await gateway.read("account", account_id, Consistency.CACHED)
        assert read is not None
        return read.stale

    # Marked by a worker's watchdog that is gone now (restarted, or another worker's).
    gone = StuckEntityWatchdog(temporal_client, cache, settings.task_queue)
    await gone._mark(f"account:{recovered}", "WorkflowTaskFailed")
    assert await stale(recovered)
    watchdog = StuckEntityWatchdog(temporal_client, cache, settings.task_queue)
    assert f"account:{recovered}" not in await watchdog.sweep()
    assert not await stale(recovered)

    # Redis away as the entity recovered: the mark is cleared at a later sweep.
    await watchdog._mark(f"account:{blipped}", "WorkflowTaskFailed")
    watchdog.stuck[f"account:{blipped}"] = "WorkflowTaskFailed"
    clear = cache.clear_stuck

    async def away(*args: Any) -> None:
        raise CacheUnavailable("connection refused")

    monkeypatch.setattr(cache, "clear_stuck", away)
    await watchdog.sweep()
    assert await stale(blipped)
    monkeypatch.setattr(cache, "clear_stuck", clear)
    await watchdog.sweep()
    assert not await stale(blipped)
    assert await cache.stuck_marks(settings.task_queue) == set()


async def test_two_workers_watchdogs_repair_a_stuck_run_once_at_a_time(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every worker's watchdog finds a stuck entity. A repair looks again just before its
    reset, but two whose looks and resets met (milliseconds apart, say in a rolling deploy
    where they choose different tasks to reset to) reset the run twice, and the second
    ended the run the first made. One watchdog repairs a run at a time; the next may once
    it is over."""
    repairing = asyncio.Event()
    go_on = asyncio.Event()
    repairs: list[str] = []

    async def slow(client: Client, entity_type: str, entity_id: str, **_: Any) -> None:
        repairs.append(entity_id)
        repairing.set()
        await go_on.wait()
        raise RPCError("unavailable", RPCStatusCode.UNAVAILABLE, b"")  # tried again later

    monkeypatch.setattr(workers.watchdog, "repair", slow)
    one, other = (
        StuckEntityWatchdog(temporal_client, cache, settings.task_queue, auto_repair=True)
        for _ in range(2)
    )
    workflow_id = f"account:{new_id()}"
    first = asyncio.create_task(one._repair(workflow_id, "run-1"))
    await repairing.wait()
    async with asyncio.timeout(10):  # before, it repaired beside the first, held with it
        await other._repair(workflow_id, "run-1")  # while the first repairs: left to it
    assert len(repairs) == 1
    go_on.set()
    await first
    await other._repair(workflow_id, "run-1")  # over, and not done: the next sweep's
    assert len(repairs) == 2


async def test_the_watchdog_s_repair_waits_while_the_build_that_went_on_still_polls(
    temporal_client: Client, settings: Settings, cache: SnapshotCache
) -> None:
    """A rolling deploy: a newer build took the account past what the watchdog's build can
    replay. Its automatic repair would throw the newer tasks away, bad only to the older
    code: it waits while that build still polls the task queue, and goes ahead once the
    build is gone (a bad deploy replaced). An operator's `tenure repair` does not wait."""
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    ours = load_default_build_id()
    newer = bad_deploy_worker(temporal_client, cache, settings, build_id="a-newer-build")
    async with TenureWorker([newer], shutdown_bound=BAD_DEPLOY_SHUTDOWN):
        await gateway.send(
            "account", account_id, "open", {"owner_name": "Ada", "email": "a@b.cc"}, wait=True
        )
        await gateway.send("account", account_id, "verify", {}, wait=True)
        await deposit(gateway, account_id, POISON, wait=True)
        await deposit(gateway, account_id, 7, wait=True)
        await until_idle(temporal_client, f"account:{account_id}")
        with pytest.raises(RepairDeferred) as deferred:
            await repair(temporal_client, "account", account_id, force=True, only_build=ours)
        assert deferred.value.code is ErrorCode.CONFLICT
        assert "a-newer-build" in deferred.value.message
    await asyncio.sleep(1.5)  # gone: it has not polled for a second
    done = await repair(
        temporal_client, "account", account_id, force=True, only_build=ours, polled_within=1.0
    )
    assert done.new_run_id != done.old_run_id


async def test_the_watchdog_counts_stuck_entities_and_its_repairs_for_alerts(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """What pages an operator (deploy/compose/alerts.yml, TenureEntityStuck): the count of
    entities found stuck, at each sweep, and the repairs by outcome. A log line alone told
    no one of one stuck account."""
    watched = metrics_settings(settings)
    runtime = worker_runtime(watched)  # its exporter serves while it lives
    meter = runtime.metric_meter
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = await opened_by_a_bad_deploy(gateway, temporal_client, cache, settings, 5)
    workflow_id = f"account:{account_id}"
    async with run_worker():
        watchdog = StuckEntityWatchdog(temporal_client, cache, settings.task_queue, meter=meter)
        assert await watchdog.sweep() == {}
        assert (await scrape(watched)).value("tenure_stuck_workflows") == 0
        await deposit(gateway, account_id, 11, idempotency_key=f"{account_id}-11")
        await eventually(watchdog.sweep, lambda found: workflow_id in found, 40)
        assert (await scrape(watched)).value("tenure_stuck_workflows") == 1

        repairing = StuckEntityWatchdog(
            temporal_client, cache, settings.task_queue, auto_repair=True, meter=meter
        )
        await repairing.sweep()
        await eventually(watchdog.sweep, lambda found: workflow_id not in found, 40)
        metrics = await scrape(watched)
    assert metrics.value("tenure_stuck_workflows") == 0
    assert metrics.value("tenure_entity_repairs_total", outcome="repaired") == 1
    # Each outcome's series is there from 0: a first failure is an increase the alert sees.
    assert metrics.labels("tenure_entity_repairs_total", "outcome") == {
        "repaired",
        "failed",
        "deferred",
    }


async def test_a_stuck_workflow_that_is_no_entity_is_logged_once_and_counted(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkout whose tasks keep failing stayed RUNNING for good, with money withdrawn and
    stock reserved, and no log, mark or alert said so: the watchdog knew only entities. It
    is named once in the log and counted by type for the alert, and nothing is marked."""
    watched = metrics_settings(settings)
    runtime = worker_runtime(watched)  # its exporter serves while it lives
    watchdog = StuckEntityWatchdog(
        temporal_client, cache, settings.task_queue, auto_repair=True, meter=runtime.metric_meter
    )
    workflow_id = f"checkout:{new_id()}"
    async with Worker(temporal_client, task_queue=settings.task_queue, workflows=[FailingTasks]):
        handle = await temporal_client.start_workflow(
            FailingTasks.run, id=workflow_id, task_queue=settings.task_queue
        )
        try:
            with caplog.at_level(logging.ERROR, logger="workers.watchdog"):
                await eventually(watchdog.sweep, lambda _: workflow_id in watchdog.stuck_others, 60)
                await watchdog.sweep()
            metrics = await scrape(watched)
        finally:
            await handle.terminate()
    assert workflow_id not in watchdog.stuck
    named = [r for r in caplog.records if workflow_id in r.getMessage()]
    assert len(named) == 1 and "temporal workflow reset" in named[0].getMessage()
    assert metrics.value("tenure_stuck_workflows", workflow_type="FailingTasks") == 1
    assert metrics.value("tenure_entity_repairs_total") == 0
