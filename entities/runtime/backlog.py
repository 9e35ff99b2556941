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
from collections.abc import Callable
from typing import Generic, TypeVar

from entities.runtime.activities import Activity
from entities.runtime.envelope import CommandEnvelope

NEXT_TASK_ACTIVITY: Activity[None, None] = Activity("next_task", None, None)
"""An activity that does nothing: its completion gives the entity its next workflow task, in
which it applies the next slice (a timer would take a second: Temporal fires none sooner)."""

BOUNDED_TASKS_PATCH = "bounded-tasks-1"
"""Runs hold commands back only from the first task that reaches the bound after this
change; a history made before it replays every command where it was applied."""

Batch = TypeVar("Batch")


class Backlog(Generic[Batch]):
    """The commands held back, and how many the current task applied.

    Besides single commands it holds batches as they came, still encoded: `unpack` turns
    one into its commands only when it reaches the front. A task that brings thousands of
    batches after an outage (the API sends a hot entity up to 100 commands a signal) then
    costs a few microseconds a batch instead of decoding and sorting every command in it,
    which took longer than the SDK's 2 s on every retry: the entity was stuck for good.
    """

    def __init__(
        self, per_task: int, unpack: Callable[[Batch], list[CommandEnvelope]] | None = None
    ) -> None:
        self.per_task = per_task
        self._unpack = unpack
        # (ticket, command or batch, mark): a batch's commands share its ticket and mark
        # once unpacked.
        self._held: deque[tuple[int, CommandEnvelope | Batch, int]] = deque()
        self._task = -1
        self._applied = 0
        self.ever_held = 0
        """Commands and batches held so far: the ticket of the latest is this number."""

    def __bool__(self) -> bool:
        return bool(self._held)

    def admits(self, task: int) -> bool:
        """Whether a command that arrives in `task` (its history length) may be applied at
        once: none is held before it, and the task has room."""
        self._enter(task)
        return not self._held and self._applied < self.per_task

    def applied(self) -> None:
        """One command that `admits` let through was applied."""
        self._applied += 1

    def hold(self, item: CommandEnvelope | Batch, mark: int = 0) -> int:
        """Hold a command, or a batch of them, back, with a `mark` of when it came (the
        ledger's evictions then); its ticket, `released` once every command in it was
        handed out to be applied."""
        self.ever_held += 1
        self._held.append((self.ever_held, item, mark))
        return self.ever_held

    def front_mark(self) -> int | None:
        """The mark of the oldest command held; None if none is."""
        return self._held[0][2] if self._held else None

    def released(self, ticket: int) -> bool:
        """Whether everything held under `ticket` was handed out to be applied."""
        return not self._held or self._held[0][0] > ticket

    def next_slice(self, task: int) -> list[CommandEnvelope]:
        """The held commands that `task` may apply now, oldest first: taken off the list
        and counted as applied by it. A batch at the front is unpacked in place first, so
        an empty one never outlives the slice that reaches it."""
        self._enter(task)
        taken: list[CommandEnvelope] = []
        while self._held:
            ticket, item, mark = self._held[0]
            if not isinstance(item, CommandEnvelope):
                self._held.popleft()
                assert self._unpack is not None, "a batch was held with nothing to unpack it"
                self._held.extendleft((ticket, e, mark) for e in reversed(self._unpack(item)))
                continue
            if self._applied >= self.per_task:
                break
            self._held.popleft()
            self._applied += 1
            taken.append(item)
        return taken

    def _enter(self, task: int) -> None:
        if task != self._task:
            self._task, self._applied = task, 0
