"""A query answered by a worker that replays an entity with events of a task not started
yet must not leave the entity with a history that no replay reproduces (workers.query_guard).

Before the guard, an account frozen so after a worker handover (tests/deploy/test_shutdown.py,
about one run in ten): "Update machine does not handle this event: ActivityTaskScheduled".
"""

from __future__ import annotations

import asyncio

from temporalio.client import Client
from temporalio.worker import Replayer

from entities import catalog
from entities.account import account
from entities.runtime.envelope import CommandResult, OutcomeStatus
from tests.api.test_accounts_api import open_active
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.deploy.test_shutdown import deposit, fresh
from workers.query_guard import DIRECT_QUERY_ID, AheadOfTask
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
    replayer = Replayer(
        workflows=catalog.workflows(), data_converter=temporal_client.data_converter
    )
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, (history.workflow_id, result.replay_failure)


def test_the_guard_refuses_a_direct_query_only_after_events_no_task_brought() -> None:
    guard = AheadOfTask()
    guard.applied(length=10, size=1000, replaying=True)  # replayed up to a task started
    assert not guard.refuses([DIRECT_QUERY_ID])
    guard.applied(length=14, size=1000, replaying=False)  # events past it, no task
    assert guard.refuses([DIRECT_QUERY_ID])
    assert not guard.refuses(["a-query-that-came-with-a-task"])
    guard.applied(length=14, size=1000, replaying=False)  # more work on the same events
    assert guard.refuses([DIRECT_QUERY_ID])
    guard.applied(length=16, size=1400, replaying=False)  # the task started: in order
    assert not guard.refuses([DIRECT_QUERY_ID])


def test_the_guard_leaves_tasks_replays_and_silent_servers_alone() -> None:
    guard = AheadOfTask()
    for length, size in ((5, 700), (9, 900), (13, 1300)):  # each activation a new task
        guard.applied(length=length, size=size, replaying=False)
        assert not guard.refuses([DIRECT_QUERY_ID])
    guard.applied(length=20, size=1300, replaying=True)  # replaying: in history's order
    assert not guard.refuses([DIRECT_QUERY_ID])
    silent = AheadOfTask()  # a server that reports no history size
    silent.applied(length=5, size=0, replaying=False)
    silent.applied(length=9, size=0, replaying=False)
    assert not silent.refuses([DIRECT_QUERY_ID])
