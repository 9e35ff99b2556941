"""A bound on the commands one workflow task applies; the rest wait, in order, for the next.

Signals that arrive while an entity has no worker, or while its task is in flight, all come
in its next task, and the SDK applies them in one activation that must end within 2 s (its
deadlock bound). A task that takes longer fails, and so does every retry, since it replays
the same commands: after a worker outage during a flood the entity would be stuck for good.
So a task applies at most `max_commands_per_task` commands; the others are held here and
applied by the main loop, a task's worth at a time, before anything else it does, and before
the run may continue as new. A command held is not applied yet: its outcome is UNKNOWN to
queries (senders ask again), and a waited command waits for its turn.
"""

from __future__ import annotations

from collections import deque

from entities.runtime.activities import Activity
from entities.runtime.envelope import CommandEnvelope

NEXT_TASK_ACTIVITY: Activity[None, None] = Activity("next_task", None, None)
"""An activity that does nothing: its completion gives the entity its next workflow task, in
which it applies the next slice (a timer would take a second: Temporal fires none sooner)."""

BOUNDED_TASKS_PATCH = "bounded-tasks-1"
"""Runs hold commands back only from the first task that reaches the bound after this
change; a history made before it replays every command where it was applied."""


class Backlog:
    """The commands held back, and how many the current task applied."""

    def __init__(self, per_task: int) -> None:
        self.per_task = per_task
        self._held: deque[CommandEnvelope] = deque()
        self._task = -1
        self._applied = 0
        self.ever_held = 0
        """Commands held so far: the ticket of the latest is this number."""
        self._released = 0

    def __bool__(self) -> bool:
        return bool(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def admits(self, task: int) -> bool:
        """Whether a command that arrives in `task` (its history length) may be applied at
        once: none is held before it, and the task has room."""
        self._enter(task)
        return not self._held and self._applied < self.per_task

    def applied(self) -> None:
        """One command that `admits` let through was applied."""
        self._applied += 1

    def hold(self, envelope: CommandEnvelope) -> int:
        """Hold a command back; its ticket, `released` once the command is applied."""
        self._held.append(envelope)
        self.ever_held += 1
        return self.ever_held

    def released(self, ticket: int) -> bool:
        """Whether the command held under `ticket` was handed out to be applied."""
        return self._released >= ticket

    def next_slice(self, task: int) -> list[CommandEnvelope]:
        """The held commands that `task` may apply now, oldest first: taken off the list
        and counted as applied by it."""
        self._enter(task)
        taken = min(max(self.per_task - self._applied, 0), len(self._held))
        self._applied += taken
        self._released += taken
        return [self._held.popleft() for _ in range(taken)]

    def _enter(self, task: int) -> None:
        if task != self._task:
            self._task, self._applied = task, 0
