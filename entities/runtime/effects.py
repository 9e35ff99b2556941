"""Effects: what a pure transition asks the runtime to do once the new state is recorded,
and the workflow side that carries them out."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from entities.runtime.activities import Activity

CHILDREN_CLOSE_FIRST = "entity-children-close-first"
"""Runs started from here on end only once the children they started have closed, or after
CHILDREN_CLOSE_WAIT: a child that closes while its parent's last workflow task is in flight
makes Temporal refuse that task (UnhandledCommand), and the task retried replays the whole
run. A cart's checkout closes just after its report ends the cart: under load two of three
checkouts cost their cart a refused task and a replay so."""
CHILDREN_CLOSE_WAIT = timedelta(seconds=30)
MAX_CHILDREN_FOLLOWED = 64
"""Children still running that a run waits for at its end; older ones are let go."""


def saga_sender(workflow_id: str) -> str:
    """How a workflow that an entity started (a saga) signs its requests
    (`EntityRequest.sent_by`): the entity knows its requests by it."""
    return f"saga:{workflow_id}"


def sent_by_saga(sent_by: str | None) -> bool:
    """Whether a command came from a saga an entity started (`saga_sender`). No client's
    sender is one: theirs are `role:subject` with a role of `Role`."""
    return sent_by is not None and sent_by.startswith("saga:")


OTHER_RUNNING_APPLIES = "entity-other-running-applies"
"""Runs from here on apply an effect's `if_other_running` command when another workflow of
its id is running; runs from before (asked only where a start failed) let the effect go."""
SAME_SINCE = "entity-other-running-same-since"
"""Runs from here on count a running workflow whose `IfOtherRunning.same_since` fields are at
or after the effect's as the effect's own; runs from before (asked only where such a field
is compared) ask them equal, as they always did."""
OTHER_RUNNING_SENDER = "entity:effects"
"""How the runtime signs the `if_other_running` command it applies to its own entity."""


def other_running_id(workflow_id: str) -> str:
    """The id of the `if_other_running` command an entity applies when the workflow
    `workflow_id` it starts runs already."""
    return f"other-running:{workflow_id}"


class IfOtherRunning(BaseModel):
    """What the entity does when a workflow it starts cannot be, because another of its id
    is running, one whose input differs from the effect's in `same_if` (a reset re-applied
    the command that started the same one, which runs on): apply its own `command`.

    A cart id used again once retention deleted its cart counts its checkouts from 1 again,
    and the first cart's checkout of that number, FAILED and waiting for an operator, still
    ran: the new cart waited for its checkout's report for good."""

    command: str
    payload: dict[str, Any] = Field(default_factory=dict)
    same_if: list[str] = Field(default_factory=list)
    same_since: list[str] = Field(default_factory=list)
    """Fields of `same_if` (numbers) in which the running one's value at or after the
    effect's is the same all the same: a cart's checkout named after the time the cart took
    `checkoutCart` (before rules level 3), found running by a reset that re-applies it under
    the cart's incarnation, is the cart's own; an earlier cart of its id began before it."""


class StartWorkflow(BaseModel):
    """Start another workflow (for example a saga) that outlives this entity's run."""

    workflow: str
    workflow_id: str
    input: dict[str, Any] = Field(default_factory=dict)
    if_other_running: IfOtherRunning | None = None


class _Blocker(enum.Enum):
    ANOTHER = "another"
    SAME = "same"
    ENDED = "ended"


class RunningInput(BaseModel):
    """The input the running workflow of an id was started with; None if none runs."""

    input: dict[str, Any] | None = None


RUNNING_INPUT_ACTIVITY: Activity[str, RunningInput] = Activity(
    "running_workflow_input", str, RunningInput
)
_RUNNING_INPUT_TIMEOUT = timedelta(seconds=10)
_RUNNING_INPUT_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))


class Effects:
    """An entity's effects not yet carried out (carried across continue-as-new), and the
    children they started that its run still follows. Workflow code: call from a run."""

    def __init__(self, pending: list[StartWorkflow]) -> None:
        self.pending = list(pending)
        self._children: list[workflow.ChildWorkflowHandle[Any, Any]] = []

    def __bool__(self) -> bool:
        return bool(self.pending)

    def extend(self, effects: list[StartWorkflow]) -> None:
        self.pending.extend(effects)

    async def run(self, other_running: Callable[[StartWorkflow], None]) -> None:
        """Carry out the pending effects in order. A child that cannot be started (one of
        its id is running) is logged and let go: its effect is settled either way. One that
        says what then (`if_other_running`), another's workflow running under its id, is
        handed to `other_running`; one whose blocker has ended since is started again, once."""
        again: set[str] = set()
        while self.pending:
            effect = self.pending.pop(0)
            try:
                child = await workflow.start_child_workflow(
                    effect.workflow,
                    effect.input,
                    id=effect.workflow_id,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                )
            except (ChildWorkflowError, WorkflowAlreadyStartedError) as exc:
                workflow.logger.warning("effect %s not started: %s", effect.workflow_id, exc)
                blocker = await self._blocker(effect, exc)
                if blocker is _Blocker.ENDED and effect.workflow_id not in again:
                    again.add(effect.workflow_id)
                    self.pending.insert(0, effect)
                elif blocker is _Blocker.ANOTHER:
                    other_running(effect)
            else:
                self._children = [*self._running(), child][-MAX_CHILDREN_FOLLOWED:]

    @staticmethod
    async def _blocker(effect: StartWorkflow, exc: Exception) -> _Blocker | None:
        """What the workflow running under the effect's id, which kept it from starting, is:
        another than the effect's, by its input (`IfOtherRunning.same_if`), the effect's
        own, or ended since; None when the effect does not say (`if_other_running`)."""
        told = effect.if_other_running
        if told is None or not isinstance(exc, WorkflowAlreadyStartedError):
            return None
        if not workflow.patched(OTHER_RUNNING_APPLIES):
            return None
        running = await RUNNING_INPUT_ACTIVITY.execute(
            effect.workflow_id,
            start_to_close_timeout=_RUNNING_INPUT_TIMEOUT,
            retry_policy=_RUNNING_INPUT_RETRY,
        )
        theirs_input = running.input
        if theirs_input is None:
            return _Blocker.ENDED
        since = set(told.same_since) if told.same_since and workflow.patched(SAME_SINCE) else set()

        def same(field: str) -> bool:
            theirs, mine = theirs_input.get(field), effect.input.get(field)
            if field in since and isinstance(theirs, int) and isinstance(mine, int):
                return theirs >= mine
            return bool(theirs == mine)

        return _Blocker.SAME if all(same(k) for k in told.same_if) else _Blocker.ANOTHER

    def _running(self) -> list[workflow.ChildWorkflowHandle[Any, Any]]:
        return [c for c in self._children if not c.done()]

    def started(self, sender: str | None) -> bool:
        """Whether `sender` is a saga this run started (`saga_sender`) that is still
        running."""
        child = self._child(sender)
        return child is not None and not child.done()

    def completed(self, sender: str | None) -> bool:
        """Whether `sender` is a saga this run started that has completed: not failed,
        cancelled, terminated or timed out."""
        child = self._child(sender)
        return (
            child is not None
            and child.done()
            and not child.cancelled()
            and child.exception() is None
        )

    def _child(self, sender: str | None) -> workflow.ChildWorkflowHandle[Any, Any] | None:
        return next((c for c in self._children if sender == saga_sender(c.id)), None)

    async def children_closed(self, patched: Callable[[str], bool] = workflow.patched) -> bool:
        """Before the run ends: wait for the children it started to close, up to
        CHILDREN_CLOSE_WAIT, if the run has CHILDREN_CLOSE_FIRST (as `patched` answers).
        How a child ends is its own business: an entity starts children and lets them run
        (ParentClosePolicy.ABANDON). Whether every child it waited for closed."""
        running = self._running()
        if not running or not patched(CHILDREN_CLOSE_FIRST):
            return True
        # One that runs on past the wait: the run ends all the same, as it always did.
        try:
            await workflow.wait_condition(
                lambda: all(c.done() for c in running), timeout=CHILDREN_CLOSE_WAIT
            )
        except TimeoutError:
            return False
        return True
