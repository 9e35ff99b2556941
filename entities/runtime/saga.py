"""Sagas: steps across entities, each registering its compensation before it runs, undone
in reverse order when a later step fails."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from entities.runtime.envelope import Outcome
    from entities.runtime.requests import RequestFailed

T = TypeVar("T")


class SagaStatus(StrEnum):
    """RUNNING until every step is done (COMPLETED) or every compensation has run after a
    failure (COMPENSATED); FAILED when a compensation or the final report was refused, so
    the saga needs an operator."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"


class StepStatus(StrEnum):
    DONE = "DONE"
    FAILED = "FAILED"


class StepRecord(BaseModel):
    """A step taken, or a compensation run, with why it failed when it did."""

    name: str
    status: StepStatus
    at: datetime
    code: str | None = None
    message: str | None = None


class CompensationRecord(StepRecord):
    reason: str = Field(description="Why it ran: the step whose failure set it off.")


class SagaLog(BaseModel):
    """What a saga has done so far; its workflow answers queries with it."""

    status: SagaStatus = SagaStatus.RUNNING
    steps: list[StepRecord] = Field(default_factory=list)
    compensations: list[CompensationRecord] = Field(default_factory=list)
    failure_code: str | None = None
    failure_reason: str | None = None


Compensation = Callable[[bool], Awaitable[object]]
"""Undoes one step; called with whether that step is known to have completed."""


@dataclass
class _Registered:
    name: str
    step: str
    undo: Compensation


class Saga:
    """Runs steps in order and, after a failure, their compensations in reverse order.

    Steps and compensations are workflow code that fails with RequestFailed. The
    compensation of a step that was refused has nothing to undo and is only recorded. A
    compensation that is refused is recorded and the others still run; the saga then ends
    FAILED.
    """

    def __init__(self, log: SagaLog) -> None:
        self.log = log
        self._registered: list[_Registered] = []
        self._done: set[str] = set()
        self._refused: set[str] = set()

    async def step(
        self, name: str, action: Callable[[], Awaitable[T]], undo: tuple[str, Compensation] | None
    ) -> T:
        """Run one step, its compensation (name, function) registered first: a step that
        fails after taking effect, or whose outcome is unknown, is undone all the same."""
        if undo is not None:
            self._registered.append(_Registered(undo[0], name, undo[1]))
        try:
            result = await action()
        except RequestFailed as failure:
            if failure.refused:
                self._refused.add(name)
            self.log.steps.append(StepRecord(**_settled(name, failure)))
            self.log.failure_code = failure.code
            self.log.failure_reason = f"{name}: {failure.message}"
            raise
        self.log.steps.append(StepRecord(**_settled(name, None)))
        self._done.add(name)
        return result

    async def compensate(self) -> None:
        """Run every registered compensation, last registered first."""
        reason = self.log.failure_reason or "a step failed"
        while self._registered:
            registered = self._registered.pop()
            failure: RequestFailed | None = None
            note: str | None = None
            if registered.step in self._refused:
                note = f"nothing to undo: {registered.step} was refused"
            else:
                try:
                    result = await registered.undo(registered.step in self._done)
                except RequestFailed as exc:
                    failure = exc
                else:
                    note = result.message if isinstance(result, Outcome) else None
            record = CompensationRecord(**_settled(registered.name, failure), reason=reason)
            if note is not None:
                record.message = note
            self.log.compensations.append(record)

    async def conclude(self, name: str, action: Callable[[], Awaitable[object]]) -> None:
        """Run the last step, which nothing undoes since the outcome is settled by then, and
        set the final status."""
        failure: RequestFailed | None = None
        try:
            await action()
        except RequestFailed as exc:
            failure = exc
        self.log.steps.append(StepRecord(**_settled(name, failure)))
        refused = failure is not None or any(
            c.status is StepStatus.FAILED for c in self.log.compensations
        )
        if refused:
            self.log.status = SagaStatus.FAILED
        elif self.log.failure_code is not None:
            self.log.status = SagaStatus.COMPENSATED
        else:
            self.log.status = SagaStatus.COMPLETED


def _settled(name: str, failure: RequestFailed | None) -> dict[str, Any]:
    return {
        "name": name,
        "status": StepStatus.FAILED if failure is not None else StepStatus.DONE,
        "at": workflow.now(),
        "code": failure.code if failure is not None else None,
        "message": failure.message if failure is not None else None,
    }
