"""Recorded histories of every workflow replay against today's code, so running workflows
survive a deploy and a non-deterministic change fails the suite. Re-record with
`python -m tests.entities.record_histories` (see there for when)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from entities.checkout import CHECKOUT_PATCHES, CheckoutInput, CheckoutState, CheckoutWorkflow
from entities.runtime.backlog import NEXT_TASK_ACTIVITY
from entities.runtime.saga import Saga
from entities.runtime.workflow import ENTITY_PATCHES
from tests.entities.record_histories import (
    CHECKOUT_SET_1,
    CHECKOUT_SET_2,
    CHECKOUT_SET_3,
    CURRENT,
    ENTITY_SET_1,
    ENTITY_SET_2,
    ENTITY_SET_3,
    ENTITY_SET_3_PUBLISHED,
    ENTITY_SET_4,
    HISTORIES,
    PUBLISHED_BY_ACTIVITY,
    workflow_id_of,
)
from workers.sandbox import entity_replayer

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
# runs started from then on, before the patch sets, look like these.
PUBLISHED = {f"{PUBLISHED_BY_ACTIVITY}/{name}": event for name, event in RECORDED.items()}
# Paths recorded then that older code took, or that today's code takes too.
OLDER_PATHS = {
    f"{PUBLISHED_BY_ACTIVITY}/checkout.cart-stuck-1": (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
    ),
    # A bulk command sending pages ahead of counting them (patch `bulk-pipelined`)...
    f"{PUBLISHED_BY_ACTIVITY}/bulk.bulk-deposit.run1": (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    ),
    f"{PUBLISHED_BY_ACTIVITY}/bulk.bulk-deposit.run2": (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    ),
    # Waited commands as updates to an account, recorded while `apply` never waited (today's
    # `apply` may wait for held commands, and replays these)...
    f"{PUBLISHED_BY_ACTIVITY}/account.acct-waited.run1": (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
    ),
    # ...and commands held back past a task's bound, a waited one among them.
    f"{PUBLISHED_BY_ACTIVITY}/account.acct-backlog": (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
    ),
    # Commands that cannot be read, sent straight to an account, recorded before they were
    # refused under their ids (patch `entity-records-unreadable-commands`): dropped, a batch
    # with one whole.
    f"{PUBLISHED_BY_ACTIVITY}/account.acct-unreadable-before": (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ),
    # ...and one recorded before, a page sent and counted per run (`bulk_send`).
    **{
        f"{PUBLISHED_BY_ACTIVITY}/bulk.bulk-one-page-per-run.run{n}": event
        for n, event in (
            (1, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW),
            (2, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW),
            (3, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED),
        )
    },
}


def paths_in(folder: str, *types: str, besides: str) -> dict[str, EventType.ValueType]:
    """Every recorded path of workflows of `types` (`checkout.`), and `besides` (a history
    RECORDED does not list, whose last update completed), as recorded in `folder`."""
    every = {**RECORDED, besides: EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED}
    return {f"{folder}/{name}": event for name, event in every.items() if name.startswith(types)}


def checkout_paths(folder: str) -> dict[str, EventType.ValueType]:
    """Every checkout path, as recorded under a checkout patch set in `folder`."""
    return paths_in(folder, "checkout.", besides="checkout.cart-stuck-1")


# Checkouts under the first checkout patch set, lines reserved one after another; under the
# second, only the steps reached undone after a step whose outcome was not known.
CHECKOUTS_OF_SET_1 = checkout_paths(CHECKOUT_SET_1)
CHECKOUTS_OF_SET_2 = checkout_paths(CHECKOUT_SET_2)
# Under the third, every compensation one after another.
CHECKOUTS_OF_SET_3 = checkout_paths(CHECKOUT_SET_3)


def entity_paths(folder: str) -> dict[str, EventType.ValueType]:
    """Every entity path, as recorded under an entity patch set in `folder`."""
    return paths_in(folder, "account.", "cart.", "inventory.", besides="account.acct-backlog")


# Entities under the first entity patch set, before text had to show as written
# (strict-inputs-4); under the second, before an item refused to take back a sale it had
# forgotten, and an entity a compensation or a repeat it could not tell applied
# (entity-rules-1).
ENTITIES_OF_SET_1 = entity_paths(ENTITY_SET_1)
ENTITIES_OF_SET_2 = entity_paths(ENTITY_SET_2)
# Under the third, which published every change by activity, before entities offered theirs
# to their worker (entity-publish-offers).
ENTITIES_OF_SET_3 = entity_paths(ENTITY_SET_3_PUBLISHED)
# Under the fourth, whose carts named their checkout's requests after the time they applied
# `checkoutCart`, before the cart's incarnation (entity-rules-3).
ENTITIES_OF_SET_4 = entity_paths(ENTITY_SET_4)
# Today's: every path again, recorded since runs ask one patch set (CURRENT), with the paths
# only today's code takes: a FAILED checkout waiting for an operator, retried; a bulk command
# sending pages ahead of counting them; commands held back past a task's bound.
TODAY = {
    **{f"{CURRENT}/{name}": event for name, event in RECORDED.items()},
    f"{CURRENT}/checkout.cart-stuck-1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED,
    f"{CURRENT}/bulk.bulk-deposit.run1": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    f"{CURRENT}/bulk.bulk-deposit.run2": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    f"{CURRENT}/account.acct-backlog": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED,
    # offers between publishes, and the trailing publish a timer brings
    f"{CURRENT}/account.acct-offers": EventType.EVENT_TYPE_TIMER_FIRED,
}
# A customer's deposit, then a service's withdrawal under the same key: today's account keeps
# them apart (entity-keys-per-sender); one under the third set took the withdrawal for the
# deposit's repeat.
KEYS_MEET = {
    f"{folder}/account.acct-keys": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
    for folder in (CURRENT, ENTITY_SET_3)
}
# A reservation released before its item knew it, then returned: today's item refuses the
# return (entity-rules-2); one under the third set took it for a release.
RELEASED_UNKNOWN = {
    f"{folder}/inventory.sku-tomb": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
    for folder in (CURRENT, ENTITY_SET_3)
}
EVERY = {
    **RECORDED,
    **PUBLISHED,
    **OLDER_PATHS,
    **CHECKOUTS_OF_SET_1,
    **CHECKOUTS_OF_SET_2,
    **CHECKOUTS_OF_SET_3,
    **ENTITIES_OF_SET_1,
    **ENTITIES_OF_SET_2,
    **ENTITIES_OF_SET_3,
    **ENTITIES_OF_SET_4,
    **TODAY,
    **KEYS_MEET,
    **RELEASED_UNKNOWN,
}


def test_every_recorded_history_is_checked() -> None:
    recorded = {
        f"{folder}/{path.stem}".lstrip("/")
        for folder in (
            "",
            PUBLISHED_BY_ACTIVITY,
            CHECKOUT_SET_1,
            CHECKOUT_SET_2,
            CHECKOUT_SET_3,
            ENTITY_SET_1,
            ENTITY_SET_2,
            ENTITY_SET_3,
            ENTITY_SET_3_PUBLISHED,
            ENTITY_SET_4,
            CURRENT,
        )
        for path in (HISTORIES / folder).glob("*.json")
    }
    assert recorded == set(EVERY)


def history(name: str) -> WorkflowHistory:
    path = HISTORIES / f"{name}.json"
    return WorkflowHistory.from_json(workflow_id_of(path), path.read_text())


def test_the_histories_of_today_publish_with_activities() -> None:
    for name in ("account.acct-burst", "inventory.sku-teapot", "cart.cart-done"):
        kinds = {event.event_type for event in history(f"{CURRENT}/{name}").events}
        assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED in kinds, name
        assert EventType.EVENT_TYPE_MARKER_RECORDED in kinds, name  # the patch marker


def patch_markers(name: str) -> int:
    return sum(
        event.marker_recorded_event_attributes.marker_name == "core_patch"
        for event in history(name).events
    )


def version_upserts(name: str) -> int:
    """Upserts of TemporalChangeVersion: the SDK adds one to each patch marker, and each is a
    write to the server's visibility store."""
    return sum(
        "TemporalChangeVersion"
        in event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        for event in history(name).events
    )


@pytest.mark.parametrize(
    "name", ["account.acct-burst", "inventory.sku-teapot", "cart.cart-done", "checkout.cart-done-1"]
)
def test_a_run_of_today_records_one_patch_marker(name: str) -> None:
    """Without the sets, a new entity run recorded three (publishing by activity, the loop
    that follows every change, strict inputs) and a checkout three."""
    assert patch_markers(f"{CURRENT}/{name}") == 1
    assert version_upserts(f"{CURRENT}/{name}") == 1
    newest = CHECKOUT_PATCHES if name.startswith("checkout.") else ENTITY_PATCHES
    assert patches_asked(f"{CURRENT}/{name}") == [newest.name]


def patches_asked(name: str) -> list[str]:
    """The patch each marker of the history records."""
    return [
        json.loads(event.marker_recorded_event_attributes.details["patch-data"].payloads[0].data)[
            "id"
        ]
        for event in history(name).events
        if event.marker_recorded_event_attributes.marker_name == "core_patch"
    ]


def test_a_patch_set_keeps_the_patches_it_was_released_with() -> None:
    """Runs start under a set and take every patch in it for granted: a patch added to a set
    already released would be taken for granted by runs that never had it. A new patch
    joins a new set (docs/operations.md)."""
    assert ENTITY_PATCHES.after is not None
    third_entity_set = ENTITY_PATCHES.after.after
    assert third_entity_set is not None and third_entity_set.name == "entity-patch-set-3"
    second_entity_set = third_entity_set.after
    assert second_entity_set is not None and second_entity_set.name == "entity-patch-set-2"
    first_entity_set = second_entity_set.after
    assert first_entity_set is not None and first_entity_set.name == "entity-patch-set-1"
    assert first_entity_set.patches == {
        "strict-inputs-1",
        "strict-inputs-2",
        "strict-inputs-3",
        "bounded-tasks-1",
        "entity-records-unreadable-commands",
        "entity-loop-follows-every-change",
        "publish-by-activity",
        "entity-children-close-first",
    }
    assert second_entity_set.patches == {*first_entity_set.patches, "strict-inputs-4"}
    assert third_entity_set.patches == {*second_entity_set.patches, "entity-rules-1"}
    fourth_entity_set = ENTITY_PATCHES.after
    assert fourth_entity_set is not None and fourth_entity_set.name == "entity-patch-set-4"
    assert fourth_entity_set.patches == {*third_entity_set.patches, "entity-publish-offers"}
    assert ENTITY_PATCHES.name == "entity-patch-set-5"
    assert ENTITY_PATCHES.patches == {*fourth_entity_set.patches, "entity-rules-3"}
    third_set = CHECKOUT_PATCHES.after
    assert third_set is not None and third_set.name == "checkout-patch-set-3"
    second_set = third_set.after
    assert second_set is not None and second_set.name == "checkout-patch-set-2"
    first_set = second_set.after
    assert first_set is not None and first_set.name == "checkout-patch-set-1"
    assert first_set.patches == {
        "checkout-operator-tools",
        "checkout-parallel-commits",
        "checkout-short-reservation-ids",
        "requests-try-local-first",
    }
    assert second_set.patches == {*first_set.patches, "checkout-parallel-reservations"}
    assert third_set.patches == {*second_set.patches, "checkout-undo-unreached-steps"}
    assert CHECKOUT_PATCHES.name == "checkout-patch-set-4"
    assert CHECKOUT_PATCHES.patches == {*third_set.patches, "checkout-compensations-apart"}


@pytest.mark.parametrize("name", sorted(EVERY))
async def test_a_recorded_history_replays(name: str) -> None:
    recorded = history(name)
    assert EVERY[name] in {event.event_type for event in recorded.events}
    replayer = entity_replayer(pydantic_data_converter)
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


def outcome_of(name: str, command: str, **payload: Any) -> dict[str, Any]:
    """The outcome a history's update answered for the one update carrying `command` with
    `payload`."""
    sent: list[Any] = []
    answered: list[Any] = []
    for event in history(name).events:
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            sent += [json.loads(payload.data) for payload in request.input.args.payloads]
        if event.HasField("workflow_execution_update_completed_event_attributes"):
            answer = event.workflow_execution_update_completed_event_attributes.outcome.success
            answered += [json.loads(payload.data) for payload in answer.payloads]
    [command_id] = [
        envelope["command_id"]
        for envelope in sent
        if isinstance(envelope, dict)
        and envelope.get("name") == command
        and envelope.get("payload") == payload
    ]
    [outcome] = [
        answer["outcome"]
        for answer in answered
        if isinstance(answer, dict)
        and isinstance(answer.get("outcome"), dict)
        and answer["outcome"].get("command_id") == command_id
    ]
    assert isinstance(outcome, dict)
    return outcome


def test_an_item_refuses_a_return_it_cannot_match_to_a_sale_as_its_run_began_under() -> None:
    """entity-rules-1: today's item refuses to take back a sale it does not remember; an
    item begun under the second set applied it, changing nothing. The recordings hold both
    answers, so that the replay suite covers both paths (`test_a_recorded_history_replays`);
    a re-recording that loses one fails here. A replay does not compare an update's answer
    itself: the patch keeps each run's answers as they were given."""
    forgotten = {"reservation_id": "r-forgotten"}
    today = outcome_of(f"{CURRENT}/inventory.sku-teapot", "returnReservation", **forgotten)
    assert (today["status"], today["code"]) == ("REJECTED", "INVALID_TRANSITION")
    before = outcome_of(f"{ENTITY_SET_2}/inventory.sku-teapot", "returnReservation", **forgotten)
    assert before["status"] == "APPLIED"


def answers(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each update of a history to `apply`: the envelope it carried, and the outcome it was
    answered with."""
    sent: dict[str, dict[str, Any]] = {}
    paired = []
    for event in history(name).events:
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            if request.input.name == "apply":
                [envelope] = [json.loads(p.data) for p in request.input.args.payloads]
                sent[request.meta.update_id] = envelope
        if event.HasField("workflow_execution_update_completed_event_attributes"):
            completed = event.workflow_execution_update_completed_event_attributes
            if completed.meta.update_id in sent:
                [answer] = [json.loads(p.data) for p in completed.outcome.success.payloads]
                paired.append((sent[completed.meta.update_id], answer["outcome"]))
    return paired


def test_a_key_another_sender_took_is_its_sender_s_own_as_the_run_began_under() -> None:
    """entity-keys-per-sender: today's account applies a service's withdrawal under the key
    a customer's deposit took, as the service's own command, and asks the patch there; one
    begun under the third set answered it with the deposit's outcome and applied nothing."""
    [(_, today)] = [
        (envelope, outcome)
        for envelope, outcome in answers(f"{CURRENT}/account.acct-keys")
        if envelope["name"] == "withdraw"
    ]
    assert today["command_id"] == "service:billing/fee-1"
    assert (today["status"], today["command"], today["revision"]) == ("APPLIED", "withdraw", 5)
    assert "entity-keys-per-sender" in patches_asked(f"{CURRENT}/account.acct-keys")
    [(_, before)] = [
        (envelope, outcome)
        for envelope, outcome in answers(f"{ENTITY_SET_3}/account.acct-keys")
        if envelope["name"] == "withdraw"
    ]
    assert (before["command_id"], before["command"], before["revision"]) == ("fee-1", "deposit", 4)
    assert "entity-keys-per-sender" not in patches_asked(f"{ENTITY_SET_3}/account.acct-keys")


def test_a_sale_released_unknowing_is_not_taken_back_as_the_run_began_under() -> None:
    """entity-rules-2: today's item refuses to take back a reservation it was told to release
    without knowing it, and asks the patch there; one begun under the third set answered it
    as a release, nothing to take back."""
    gone = {"reservation_id": "r-gone"}
    today = outcome_of(f"{CURRENT}/inventory.sku-tomb", "returnReservation", **gone)
    assert (today["status"], today["code"]) == ("REJECTED", "INVALID_TRANSITION")
    assert "entity-rules-2" in patches_asked(f"{CURRENT}/inventory.sku-tomb")
    before = outcome_of(f"{ENTITY_SET_3}/inventory.sku-tomb", "returnReservation", **gone)
    assert before["status"] == "APPLIED"
    assert "entity-rules-2" not in patches_asked(f"{ENTITY_SET_3}/inventory.sku-tomb")


def test_an_entity_that_offers_publishes_by_activity_once_an_interval_and_an_update_at_once() -> (
    None
):
    """Fourteen commands, four publishes by activity: the burst's two, the interval's
    trailing one (a timer), and, within the next interval, the one of a waited command whose
    sender does not publish, in the task that applied it (an update's state is not
    offered, and waits for no timer)."""
    events = history(f"{CURRENT}/account.acct-offers").events
    published = [
        (index, json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data))
        for index, e in enumerate(events)
        if e.activity_task_scheduled_event_attributes.activity_type.name == "publish_snapshot"
    ]
    assert len(published) == 4
    last, publication = published[-1]
    assert publication["snapshot"]["revision"] == 14
    accepted = max(
        index
        for index, e in enumerate(events)
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    )
    between = {e.event_type for e in events[accepted:last]}
    assert EventType.EVENT_TYPE_TIMER_FIRED not in between
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED not in between  # the same task
    assert any(e.event_type == EventType.EVENT_TYPE_TIMER_FIRED for e in events[: published[2][0]])
