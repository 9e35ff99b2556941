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

The guard fails such a query instead of answering it. A failed query makes core drop the
entity from its cache with whatever it applied ahead of time, so the task that comes next
replays from history, updates in their place. The query is asked again by its sender
(`workers.temporal.ask`), and this time finds the entity cached or the task done.

How the guard tells: each activation carries the history's length and its size as of the
last workflow task started. Events applied past a task (length grew) with no new task
started (size unchanged) are events that no task brought; a direct query (`legacy_query`)
that follows them is failed. A task that starts later changes the size and clears the mark.
Servers that report no history size (0) are never guarded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from temporalio.worker import WorkflowInstance

from workers.runners import Activation, Completion, WrappedInstance, WrappingRunner

log = logging.getLogger(__name__)

DIRECT_QUERY_ID = "legacy_query"
"""The id the SDK's core gives a query sent straight to the worker, outside any task."""

AHEAD_OF_TASK = (
    "tenure: the entity was replayed with events of a task not started yet; dropped from "
    "the cache so that the task replays in order. Ask again."
)
"""Failure message of a guarded query; `workers.temporal.ask` asks again when it sees it."""


class AheadOfTask:
    """Whether the events applied last came with no workflow task started: the state the
    guard keeps per cached entity, apart from the SDK so that it can be tested alone."""

    def __init__(self) -> None:
        self.ahead = False
        self._length = 0
        self._size = 0

    def applied(self, length: int, size: int, replaying: bool) -> None:
        """An activation with events (not only queries) of history `length` and `size`."""
        if size != self._size:
            self.ahead = False  # a workflow task started: its events are in order
        elif length != self._length and not replaying and size:
            self.ahead = True
        self._length, self._size = length, size

    def refuses(self, query_ids: Sequence[str]) -> bool:
        """Whether a query-only activation with `query_ids` must be failed."""
        return self.ahead and DIRECT_QUERY_ID in query_ids


class _GuardedInstance(WrappedInstance):
    def __init__(self, inner: WorkflowInstance) -> None:
        super().__init__(inner)
        self._guard = AheadOfTask()

    def activate(self, act: Activation) -> Completion:
        queries = [
            job.query_workflow.query_id for job in act.jobs if job.HasField("query_workflow")
        ]
        if queries and len(queries) == len(act.jobs):
            if self._guard.refuses(queries):
                info = self._inner.get_info()
                log.info(
                    "query to %s failed and the entity dropped from the cache: it was replayed "
                    "with events of a workflow task not started yet",
                    info.workflow_id,
                )
                completion = Completion(run_id=act.run_id)
                completion.failed.failure.message = AHEAD_OF_TASK
                completion.failed.failure.application_failure_info.SetInParent()
                return completion
        elif not any(job.HasField("remove_from_cache") for job in act.jobs):
            self._guard.applied(act.history_length, act.history_size_bytes, act.is_replaying)
        return self._inner.activate(act)


class QueryGuardRunner(WrappingRunner):
    """Runs workflows with `inner`, failing direct queries that follow events applied
    ahead of their workflow task (see the module)."""

    instance_type = _GuardedInstance
