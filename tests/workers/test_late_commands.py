"""A command that reaches a run after the run issued its last command is never lost with it
(`entities.runtime.workflow.LateCommand`).

A live run handles every signal and update of a workflow task before its main loop resumes,
so it cannot continue as new between two commands of one task. The SDK's core can still
hand a run events of a task not started yet (workers/query_guard.py); if the loop ends the
run on those and the task then brings more, the run's carried-over state was built without
them, and the server, seeing them as part of that task, accepts the continue-as-new: they
are gone. Here a worker hands one task's signals over in two activations, as core would
then, and the run must not end without them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import WorkflowRunner

import workers.worker
from entities.account import account
from entities.runtime.envelope import RuntimeOptions
from entities.runtime.workflow import LATE_COMMAND
from tests.api.test_accounts_api import open_active
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.deploy.test_shutdown import deposit
from workers.runners import Activation, Completion, WrappedInstance, WrappingRunner
from workers.settings import Settings

WAITED = """mutation($id: ID!, $key: String!) {
  depositToAccount(id: $id, amount: 1, idempotencyKey: $key, wait: true) {
    account { balance revision } } }"""
DEPOSITS = 6
FIRST_PART = 2
"""Signals of the task handed over first: with the two commands that opened the account,
the run's fourth command, its last (`max_commands_per_run`)."""


class _SplitOnce(WrappedInstance):
    """Hands the first live activation with several signals to the workflow in two: some
    signals, then the rest, each part's commands in the one completion core gets."""

    split: set[str] = set()  # the workflows split already: a retry goes whole

    def activate(self, act: Activation) -> Completion:
        signals = [i for i, job in enumerate(act.jobs) if job.HasField("signal_workflow")]
        workflow_id = self._inner.get_info().workflow_id
        if act.is_replaying or len(signals) <= FIRST_PART or workflow_id in self.split:
            return self._inner.activate(act)
        self.split.add(workflow_id)
        first, rest = Activation(), Activation()
        first.CopyFrom(act)
        rest.CopyFrom(act)
        del first.jobs[:]
        del rest.jobs[:]
        later = signals[FIRST_PART:]
        first.jobs.extend(job for i, job in enumerate(act.jobs) if i not in later)
        rest.jobs.extend(act.jobs[i] for i in later)
        done = self._inner.activate(first)
        if done.HasField("failed"):
            return done
        after = self._inner.activate(rest)
        if after.HasField("failed"):
            return after
        done.successful.commands.extend(after.successful.commands)
        return done


class _SplittingRunner(WrappingRunner):
    instance_type = _SplitOnce


def _splitting(
    guarded: Callable[..., WorkflowRunner],
) -> Callable[..., WorkflowRunner]:
    def runner(*args: Any) -> WorkflowRunner:
        return _SplittingRunner(guarded(*args))

    return runner


# The activation that refuses a late command ends at its first: the other signals' handlers
# never start, and the SDK drops their coroutines with the instance it evicts.
@pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object _WorkflowInstanceImpl")
async def test_commands_handed_over_after_a_run_ended_are_applied_in_the_next(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=4)})
    account_id = new_id()
    async with api_client(small, temporal_client) as http:
        gql = GraphQLClient(http)
        async with run_worker(small):
            await open_active(gql, account_id)
        # No worker: the deposits wait for the next one, and come in one task.
        for n in range(DEPOSITS):
            assert await deposit(gql, account_id, f"{account_id}-{n}", wait=False)
        _SplitOnce.split.clear()
        split = _splitting(workers.worker.guarded_runner)
        monkeypatch.setattr(workers.worker, "guarded_runner", split)
        handle = temporal_client.get_workflow_handle(account.workflow_id(account_id))
        first_run = (await handle.describe()).run_id
        async with run_worker(small):
            # Once the run has ended, a waited deposit is answered by the next, which must
            # hold every deposit before it (a LIVE read could still be answered by the
            # ended run, from the worker's cache).
            deadline = time.monotonic() + 30
            while (await handle.describe()).run_id == first_run:
                assert time.monotonic() < deadline, "the run never continued as new"
                await asyncio.sleep(0.1)
            last = await gql.data(WAITED, id=account_id, key=f"{account_id}-last")
    applied = last["depositToAccount"]["account"]
    assert (applied["balance"], applied["revision"]) == (DEPOSITS + 1, DEPOSITS + 3)
    assert _SplitOnce.split == {account.workflow_id(account_id)}  # the hand-over happened
    failures = [
        event.workflow_task_failed_event_attributes.failure.message
        async for run in temporal_client.list_workflows(
            f"WorkflowId = '{account.workflow_id(account_id)}'"
        )
        for event in (
            await temporal_client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
        ).events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    ]
    assert LATE_COMMAND in failures  # refused by the run that had ended, then replayed
