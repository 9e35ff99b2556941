"""Recorded histories of every workflow replay against today's code, so running workflows
survive a deploy and a non-deterministic change fails the suite. Re-record with
`python -m tests.entities.record_histories` (see there for when)."""

from __future__ import annotations

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from entities import catalog
from entities.checkout import CheckoutInput, CheckoutState, CheckoutWorkflow
from entities.runtime.backlog import NEXT_TASK_ACTIVITY
from entities.runtime.saga import Saga
from tests.entities.record_histories import CURRENT, HISTORIES, workflow_id_of

# Each history, and an event it must hold, so that a re-recording that misses a path fails.
RECORDED = {
    "checkout.cart-done-1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    "checkout.cart-short-1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    "checkout.cart-broke-1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    "cart.cart-done": EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
    "cart.cart-broke": EventType.EVENT_TYPE_TIMER_FIRED,
    "inventory.sku-teapot": EventType.EVENT_TYPE_TIMER_FIRED,
    "account.acct-lifecycle.run1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    "account.acct-lifecycle.run2": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    "account.acct-burst": EventType.EVENT_TYPE_TIMER_FIRED,  # the trailing publish
}


# The same paths recorded since entities publish with an activity, in a folder of their own:
# every run started from then on looks like these, every run started before like those above.
PUBLISHED_BY_ACTIVITY = {f"{CURRENT}/{name}": event for name, event in RECORDED.items()}
# Paths that only today's code takes: a FAILED checkout waiting for an operator, retried.
NEW_PATHS = {
    f"{CURRENT}/checkout.cart-stuck-1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED,
    # A bulk command sending pages ahead of counting them (patch `bulk-pipelined`)...
    f"{CURRENT}/bulk.bulk-deposit.run1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    f"{CURRENT}/bulk.bulk-deposit.run2": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    # Waited commands as updates to an account, recorded while `apply` never waited: not
    # recorded again (today's `apply` may wait for held commands, and replays these)...
    f"{CURRENT}/account.acct-waited.run1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED,
    # ...and today's: commands held back past a task's bound, a waited one among them.
    f"{CURRENT}/account.acct-backlog": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED,
    # Commands that cannot be read, sent straight to an account, recorded before they were
    # refused under their ids (patch `entity-records-unreadable-commands`): dropped, a batch
    # with one whole. Not recorded again: today's code refuses them in a new run.
    f"{CURRENT}/account.acct-unreadable-before": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
    # ...and one recorded before, a page sent and counted per run (`bulk_send`): not recorded
    # again, since today's code no longer takes that path in a new run.
    **{
        f"{CURRENT}/bulk.bulk-one-page-per-run.run{n}": event
        for n, event in (
            (1, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW),
            (2, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW),
            (3, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED),
        )
    },
}
EVERY = {**RECORDED, **PUBLISHED_BY_ACTIVITY, **NEW_PATHS}


def test_every_recorded_history_is_checked() -> None:
    assert {path.stem for path in HISTORIES.glob("*.json")} == set(RECORDED)
    assert {f"{CURRENT}/{path.stem}" for path in (HISTORIES / CURRENT).glob("*.json")} == set(
        PUBLISHED_BY_ACTIVITY
    ) | set(NEW_PATHS)


def history(name: str) -> WorkflowHistory:
    path = HISTORIES / f"{name}.json"
    return WorkflowHistory.from_json(workflow_id_of(path), path.read_text())


def test_the_histories_of_today_publish_with_activities() -> None:
    for name in ("account.acct-burst", "inventory.sku-teapot", "cart.cart-done"):
        kinds = {event.event_type for event in history(f"{CURRENT}/{name}").events}
        assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED in kinds, name
        assert EventType.EVENT_TYPE_MARKER_RECORDED in kinds, name  # the patch marker


@pytest.mark.parametrize("name", sorted(EVERY))
async def test_a_recorded_history_replays(name: str) -> None:
    recorded = history(name)
    assert EVERY[name] in {event.event_type for event in recorded.events}
    replayer = Replayer(workflows=catalog.workflows(), data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(recorded)
    assert result.replay_failure is None


@workflow.defn(name="Checkout")
class CheckoutWithoutWithdrawal(CheckoutWorkflow):
    """An incompatible change: the saga no longer charges the account."""

    @workflow.run
    async def run(self, input: CheckoutInput) -> CheckoutState:
        return await super().run(input)

    async def _take_steps(self, saga: Saga) -> None:
        self._state.total = 0
        await super()._take_steps(saga)


def test_the_backlog_history_applied_held_commands_in_later_tasks() -> None:
    events = history(f"{CURRENT}/account.acct-backlog").events
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled.count(NEXT_TASK_ACTIVITY.name) >= 2  # eight held, three a task


def test_the_failed_checkout_waited_for_an_operator_and_was_retried() -> None:
    events = history(f"{CURRENT}/checkout.cart-stuck-1").events
    kinds = [event.event_type for event in events]
    assert EventType.EVENT_TYPE_MARKER_RECORDED in kinds  # the patch marker
    assert EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES in kinds
    assert kinds.count(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED) == 2


async def test_replay_catches_a_change_to_the_saga_steps() -> None:
    # Unsandboxed: the sandbox would re-import this test module, which is no workflow code.
    replayer = Replayer(
        workflows=[CheckoutWithoutWithdrawal],
        data_converter=pydantic_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    with pytest.raises(workflow.NondeterminismError):
        await replayer.replay_workflow(history("checkout.cart-done-1"))
