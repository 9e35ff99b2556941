"""A guard against a query writing history that no replay reproduces (an SDK-core bug).

Temporal sends a query straight to a worker, outside any workflow task, when the entity has
no task pending or when its task completed without answering it. If that worker does not
hold the entity in its cache, the SDK's core replays the entity from its history to answer,
and that history may by then end with events of a workflow task that has not started yet
(commands that came in, a publish that finished). Core hands those events to the workflow
as new work, outside any task, and keeps the commands the workflow issues in reply. When
the task then starts, updates that came with it are applied after those commands; a replay
applies the same updates before them, as it always applies updates before other events of
a task. The history the task writes then never replays: "Update machine does not handle
this event: ActivityTaskScheduled", every later task of the entity fails, and the entity is
frozen until it is repaired (seen in tests/deploy/test_shutdown.py after a worker handover;
reproduced in tests/workers/test_query_guard.py).

The guard fails the activation that brings those events instead of applying them: the
workflow never sees events that no task brought, so nothing ahead of a task is ever kept.
A failed activation fails the query that caused the replay, and core drops the entity from
its cache, so the task that comes next replays from history, updates in their place. The
query is asked again by its sender (`workers.temporal.ask`), and finds the entity cached or
the task done. It once failed the query that followed such events instead, leaving them
applied, and an entity still froze so (tests/deploy/test_shutdown.py, once in a full run):
most likely its task started before that query's turn and was applied on top of them.

How the guard tells: each activation carries the history's length and its size as of the
last workflow task started. Events applied past a task (length grew) with no new task
started (size unchanged), in the first activation past a replay, are events that no task
brought. A task that starts changes the size. Servers that report no history size (0) are
never guarded.
"""

from __future__ import annotations

import logging

from temporalio.worker import WorkflowInstance

from workers.runners import Activation, Completion, WrappedInstance, WrappingRunner

log = logging.getLogger(__name__)

AHEAD_OF_TASK = (
    "tenure: the entity was replayed with events of a task not started yet; dropped from "
    "the cache so that the task replays in order. Ask again."
)
"""Failure message of a refused activation, and so of the query whose replay brought it;
`workers.temporal.ask` asks again when it sees it."""


class AheadOfTask:
    """Whether the events of an activation came with no workflow task started: the state the
    guard keeps per cached entity, apart from the SDK so that it can be tested alone."""

    def __init__(self) -> None:
        self._length = 0
        self._size = 0
        self._live = False  # an activation not replaying came already

    def ahead(self, length: int, size: int, replaying: bool) -> bool:
        """Whether an activation with events (not only queries) of history `length` and
        `size` brings events no task brought; it is remembered as the latest either way.
        Only the first activation past a replay can: an entity the worker already runs
        answers a direct query from its cache, and there a task retried after a failure
        may report the size of the attempt before (seen under a flood)."""
        ahead = (
            not self._live
            and not replaying
            and size == self._size
            and length != self._length
            and size != 0
        )
        self._length, self._size = length, size
        self._live = self._live or not replaying
        return ahead


class _GuardedInstance(WrappedInstance):
    def __init__(self, inner: WorkflowInstance) -> None:
        super().__init__(inner)
        self._guard = AheadOfTask()

    def activate(self, act: Activation) -> Completion:
        only_queries = all(job.HasField("query_workflow") for job in act.jobs)
        evicted = any(job.HasField("remove_from_cache") for job in act.jobs)
        if not (only_queries or evicted) and self._guard.ahead(
            act.history_length, act.history_size_bytes, act.is_replaying
        ):
            log.info(
                "activation of %s failed and the entity dropped from the cache: it brought "
                "events of a workflow task not started yet",
                self._inner.get_info().workflow_id,
            )
            completion = Completion(run_id=act.run_id)
            completion.failed.failure.message = AHEAD_OF_TASK
            completion.failed.failure.application_failure_info.SetInParent()
            return completion
        return self._inner.activate(act)


class QueryGuardRunner(WrappingRunner):
    """Runs workflows with `inner`, failing activations that bring events ahead of their
    workflow task (see the module)."""

    instance_type = _GuardedInstance
