"""A query answered by a worker that replays an entity with events of a task not started
yet must not leave the entity with a history that no replay reproduces (workers.query_guard).

Before the guard, an account frozen so after a worker handover (tests/deploy/test_shutdown.py,
about one run in ten): "Update machine does not handle this event: ActivityTaskScheduled".
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from temporalio.client import Client
from temporalio.worker import WorkflowInstance

from entities.account import account
from entities.runtime.envelope import CommandResult, OutcomeStatus
from tests.api.test_accounts_api import open_active
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.deploy.test_shutdown import deposit, fresh
from workers.query_guard import AHEAD_OF_TASK, AheadOfTask, QueryGuardRunner
from workers.runners import Activation, Completion
from workers.sandbox import entity_replayer
from workers.settings import Settings
from workers.temporal import ask

ACCOUNTS = 6


async def test_a_query_between_workers_leaves_every_history_replayable(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """No worker holds the accounts: a query for each is sent straight to the task queue
    (nothing pending), then a deposit comes (a task pending, not started) and a waited
    deposit (an update). The worker that starts next may take the query first, replaying
    the account with the deposit's events ahead of the task that brings the update."""
    async with api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        accounts = [new_id() for _ in range(ACCOUNTS)]
        async with run_worker():
            for account_id in accounts:
                await open_active(gql, account_id)
                assert await deposit(gql, account_id, f"{account_id}-0", wait=True)
        handles = [temporal_client.get_workflow_handle(account.workflow_id(a)) for a in accounts]
        queries = [
            asyncio.create_task(ask(h, "outcome", f"{a}-0", result_type=CommandResult, seconds=20))
            for h, a in zip(handles, accounts, strict=True)
        ]
        await asyncio.sleep(0.5)
        for account_id in accounts:
            assert await deposit(gql, account_id, f"{account_id}-1", wait=False)
        waited = [asyncio.create_task(deposit(gql, a, f"{a}-2", wait=True)) for a in accounts]
        await asyncio.sleep(0.5)
        async with run_worker():
            answers = await asyncio.gather(*queries)
            await asyncio.gather(*waited)
            for account_id in accounts:  # every deposit once, whichever way it went
                assert await deposit(gql, account_id, f"{account_id}-2", wait=True)
            balances = [(await fresh(gql, a))["balance"] for a in accounts]
            histories = [await h.fetch_history() for h in handles]
    assert balances == [3] * ACCOUNTS
    assert all(a.outcome.status is OutcomeStatus.APPLIED for a in answers)
    replayer = entity_replayer(temporal_client.data_converter)
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, (history.workflow_id, result.replay_failure)


class _Recording(WorkflowInstance):
    """A workflow instance that records the activations it is given (pure code)."""

    def __init__(self) -> None:
        self.given: list[Activation] = []

    def activate(self, act: Activation) -> Completion:
        self.given.append(act)
        return Completion(run_id=act.run_id)

    def get_info(self) -> Any:
        return SimpleNamespace(workflow_id="account:a")

    def get_serialization_context(self, command_info: Any) -> Any:
        return None

    def get_external_store_context(self, command_info: Any) -> Any:
        return None


def _activation(length: int, size: int, replaying: bool, *jobs: str) -> Activation:
    act = Activation(
        run_id="r", history_length=length, history_size_bytes=size, is_replaying=replaying
    )
    for job in jobs:
        getattr(act.jobs.add(), job).SetInParent()
    return act


def test_events_that_no_task_brought_never_reach_the_workflow() -> None:
    """A worker replays an entity to answer a direct query, and its history ends with a
    signal of a task not started yet. The workflow never sees that signal: the activation
    fails (and with it the query), whatever comes next. The guard once let it through and
    failed only the query after it, which a task starting first overtook."""
    inner = _Recording()
    guarded = QueryGuardRunner.instance_type(inner)
    guarded.activate(_activation(10, 1000, True, "initialize_workflow"))
    refused = guarded.activate(_activation(14, 1000, False, "signal_workflow"))
    assert refused.failed.failure.message == AHEAD_OF_TASK
    assert [a.history_length for a in inner.given] == [10]
    guarded.activate(_activation(16, 1400, False, "signal_workflow", "do_update"))  # a task
    guarded.activate(_activation(16, 1400, True, "query_workflow"))
    assert [a.history_length for a in inner.given] == [10, 16, 16]


def test_the_guard_refuses_only_events_that_no_task_brought() -> None:
    guard = AheadOfTask()
    assert not guard.ahead(length=10, size=1000, replaying=True)  # replayed up to a task
    assert guard.ahead(length=14, size=1000, replaying=False)  # events past it, no task
    assert not guard.ahead(length=16, size=1400, replaying=False)  # the task started


def test_the_guard_leaves_tasks_replays_and_silent_servers_alone() -> None:
    guard = AheadOfTask()
    for length, size in ((5, 700), (9, 900), (13, 1300)):  # each activation a new task
        assert not guard.ahead(length=length, size=size, replaying=False)
    assert not guard.ahead(length=13, size=1300, replaying=False)  # more of the same task
    assert not guard.ahead(length=20, size=1300, replaying=True)  # replaying: in order
    # A running entity's task retried after a failure, reporting the size of the attempt
    # before (a flood): a task, not events ahead of one.
    running = AheadOfTask()
    assert not running.ahead(length=406, size=1750921, replaying=True)
    assert not running.ahead(length=2073, size=8778695, replaying=False)
    assert not running.ahead(length=2138, size=8778695, replaying=False)
    silent = AheadOfTask()  # a server that reports no history size
    assert not silent.ahead(length=5, size=0, replaying=False)
    assert not silent.ahead(length=9, size=0, replaying=False)
