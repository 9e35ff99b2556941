"""Repairing a stuck entity: reset its workflow to its last good task, commands re-applied.

An entity is stuck when its workflow tasks fail on every retry, typically because its
history no longer replays with the code deployed (a bad deploy) or an SDK fault repeats on
every replay. The remedy is Temporal's reset: a new run that keeps the history up to a
workflow task, runs that task again with today's code, and re-applies every signal and every
update (a waited command) received after it. The last good task is the latest one whose
history up to it replays with today's code, found with the SDK's replayer. The commands the
re-applied signals and updates carry are applied once: each entity's ledger knows the ones it
had already applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, ResetReapplyType, TaskQueueType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    ResetWorkflowExecutionRequest,
)
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from entities import catalog
from entities.errors import ErrorCode, TenureError
from workers.failures import is_missing
from workers.sandbox import entity_replayer

REAPPLIED = (
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
)
"""The events a reset re-applies in the new run: each a command that came after the reset
point (an update is recorded as admitted or, once its handler has run, accepted)."""


@dataclass(frozen=True)
class Repair:
    """What a repair did: the task it reset to, the new run, how many commands (signals and
    updates) came after it."""

    workflow_id: str
    reset_to_event: int
    old_run_id: str
    new_run_id: str
    commands_reapplied: int


async def is_stuck(client: Client, workflow_id: str) -> bool:
    """Whether the workflow's current task has failed or timed out at least once."""
    description = await client.get_workflow_handle(workflow_id).describe()
    pending = description.raw_description.pending_workflow_task
    return description.raw_description.HasField("pending_workflow_task") and pending.attempt > 1


async def last_good_task(workflow_id: str, events: list[HistoryEvent]) -> int:
    """The index in `events` of the latest WORKFLOW_TASK_COMPLETED whose task, and all
    history before it, replays with today's workflow code."""
    replayer = entity_replayer(pydantic_data_converter)
    completed = [
        i
        for i, event in enumerate(events)
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]
    if not completed:
        raise TenureError(ErrorCode.NOT_FOUND, f"{workflow_id} has no completed task")

    async def replays(index: int) -> bool:
        history = WorkflowHistory(workflow_id, events[: index + 1])
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        return result.replay_failure is None

    # A prefix that replays has only prefixes that replay: search for the boundary.
    low, high = 0, len(completed) - 1
    if not await replays(completed[low]):
        raise TenureError(
            ErrorCode.INVALID_TRANSITION,
            f"{workflow_id}: not even its first task replays with the code deployed",
        )
    while low < high:
        middle = (low + high + 1) // 2
        if await replays(completed[middle]):
            low = middle
        else:
            high = middle - 1
    return completed[low]


POLLED_WITHIN = 120.0
"""Seconds since a build last polled its task queue within which it counts as running: a
worker's long poll lasts up to about 70 s."""


class RepairDeferred(TenureError):
    """A repair the watchdog leaves for now: another build that completed the run's later
    tasks still polls its task queue (a rolling deploy or a rollback under way)."""


def _other_builds(events: list[HistoryEvent], build_id: str) -> set[str]:
    """The builds other than `build_id` that completed a task among `events`."""
    return {
        event.workflow_task_completed_event_attributes.worker_version.build_id
        for event in events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    } - {build_id, ""}


async def _polling(client: Client, task_queue: str, within: float) -> set[str]:
    """The builds of the workers that polled `task_queue` for workflow tasks within
    `within` seconds (Temporal lists pollers for some minutes after their last poll)."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    now = time.time()
    return {
        poller.worker_version_capabilities.build_id
        for poller in response.pollers
        if now - poller.last_access_time.ToDatetime(UTC).timestamp() <= within
    }


async def repair(
    client: Client,
    entity_type: str,
    entity_id: str,
    *,
    force: bool = False,
    only_build: str | None = None,
    polled_within: float = POLLED_WITHIN,
) -> Repair:
    """Reset the entity's current run to its last good task, re-applying later commands.
    Refuses an entity that is not stuck unless `force`, and one that does not exist.

    With `only_build` (the watchdog's: its worker's build id), defers (RepairDeferred) while
    another build that completed a task of the run has polled the entity's task queue
    within `polled_within` seconds. In a rolling deploy or a rollback, a worker of the older
    code fails the tasks of runs a newer one made, which the newer workers go on with; its
    reset threw their newer tasks away, bad only to it. Once that build is gone (a bad
    deploy replaced), the reset goes ahead."""
    known = catalog.entity_types()
    if entity_type not in known:
        raise TenureError(
            ErrorCode.INVALID_INPUT, f"no entity type {entity_type!r}; one of {sorted(known)}"
        )
    workflow_id = known[entity_type].workflow_id(entity_id)
    handle = client.get_workflow_handle(workflow_id)
    try:
        description = await handle.describe()
    except RPCError as exc:
        if is_missing(exc):
            raise TenureError(ErrorCode.NOT_FOUND, f"no {entity_type} {entity_id}") from exc
        raise
    if not force and not await is_stuck(client, workflow_id):
        raise TenureError(
            ErrorCode.INVALID_TRANSITION, f"{workflow_id} is making progress; nothing to repair"
        )
    run_id = description.run_id
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    events = list(history.events)
    # Before the replays (seconds of CPU, at every sweep while deferred), and whichever task
    # is the last good one, none included: a run another build still polling for has made
    # is that build's to go on with.
    if only_build is not None and (others := _other_builds(events, only_build)):
        task_queue = description.task_queue
        running = others & await _polling(client, task_queue, polled_within)
        if running:
            raise RepairDeferred(
                ErrorCode.CONFLICT,
                f"{workflow_id}: tasks of its run were completed by build "
                f"{', '.join(sorted(running))}, which still polls {task_queue} (a deploy or a "
                "rollback under way); repaired once it is gone (`tenure repair` does it now)",
            )
    index = await last_good_task(workflow_id, events)
    # Reset re-runs the task that this event completed.
    reset_to = events[index].event_id
    commands = sum(1 for event in events[index:] if event.event_type in REAPPLIED)
    # Every worker's watchdog repairs a stuck entity: another may have reset this run while
    # this one looked for its last good task (seconds). Reset again, the run it made would
    # end, and the commands it had taken since (acknowledged) would be lost: Temporal resets
    # a run that is no longer current, and re-applies only that run's commands.
    now = (await handle.describe()).run_id
    if now != run_id:
        raise TenureError(
            ErrorCode.CONFLICT,
            f"{workflow_id} was repaired meanwhile (its run is now {now}); nothing done",
        )
    response = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            reason="tenure repair: reset to the last task that replays",
            workflow_task_finish_event_id=reset_to,
            # The same for a retry of this very reset.
            request_id=f"tenure-repair:{run_id}:{reset_to}",
            reset_reapply_type=ResetReapplyType.RESET_REAPPLY_TYPE_ALL_ELIGIBLE,
        )
    )
    return Repair(workflow_id, reset_to, run_id, response.run_id, commands)
