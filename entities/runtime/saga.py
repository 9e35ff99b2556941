"""Sagas: steps across entities, each registering its compensation before it runs, undone
in reverse order when a later step fails; a saga left FAILED is retried or resolved by an
operator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from entities.errors import ErrorCode
    from entities.runtime.envelope import Outcome
    from entities.runtime.requests import RequestFailed

T = TypeVar("T")
R = TypeVar("R")


class SagaStatus(StrEnum):
    """RUNNING until every step is done (COMPLETED) or every compensation has run after a
    failure (COMPENSATED); FAILED when a compensation or the final report was refused, so
    the saga needs an operator; RESOLVED when an operator settled a FAILED saga by hand."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"
    RESOLVED = "RESOLVED"


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


class OperatorActionKind(StrEnum):
    RETRY = "RETRY"
    RESOLVE = "RESOLVE"


MAX_OPERATOR_ACTIONS = 20
"""Operator actions a saga records, refusals included; it refuses any more unrecorded."""
MAX_RECORDED_REFUSALS = MAX_OPERATOR_ACTIONS // 2
"""Of those, the most that are refusals: past it an action that cannot be taken is refused
unrecorded, so that at least half the record is left for actions taken."""
MAX_OPERATOR_REASON = 500


class OperatorRequest(BaseModel):
    """An operator's action on a FAILED saga, with why, and who asks (`role:subject`), under
    the operator's idempotency key if it gave one."""

    action: OperatorActionKind
    reason: str = Field(min_length=1, max_length=MAX_OPERATOR_REASON)
    by: str = Field(min_length=1, max_length=160)
    key: str | None = Field(default=None, min_length=1, max_length=128)

    def recorded_in(self, actions: Sequence[OperatorAction]) -> OperatorAction | None:
        """The action recorded under this request's key by the same operator: this request
        sent again, or, asking another action or reason, its key used again. None without
        a key."""
        if self.key is None:
            return None
        return next((a for a in actions if a.key == self.key and a.by == self.by), None)

    def refused_again(self, earlier: OperatorAction, saga: str) -> tuple[ErrorCode, str] | None:
        """Why this request, sent again under the key `earlier` was recorded with, is
        refused: its key used for another action or reason, or the refusal `earlier` met;
        None when it is answered as `earlier` was taken. `saga` names the saga."""
        if (earlier.action, earlier.reason) != (self.action, self.reason):
            return (
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                f"idempotency key {self.key!r} was used for another action on {saga} "
                f"({earlier.action}: {earlier.reason!r})",
            )
        if earlier.refused is not None:
            return ErrorCode.INVALID_TRANSITION, earlier.refused
        return None


class OperatorAction(OperatorRequest):
    """An operator's action as the saga recorded it: when, and why it was refused if it was."""

    at: datetime
    refused: str | None = None


class SagaLog(BaseModel):
    """What a saga has done so far; its workflow answers queries with it. A compensation or
    a report run again by an operator replaces its record, so each step has one record: its
    latest outcome."""

    status: SagaStatus = SagaStatus.RUNNING
    steps: list[StepRecord] = Field(default_factory=list)
    compensations: list[CompensationRecord] = Field(default_factory=list)
    failure_code: str | None = None
    failure_reason: str | None = None
    operator_actions: list[OperatorAction] = Field(default_factory=list)
    awaiting_operator_until: datetime | None = Field(
        default=None, description="While FAILED, until when the saga waits for an operator."
    )

    def refused(self) -> list[StepRecord]:
        """While FAILED, what an operator's retry runs again: each compensation refused,
        then the final report (the last step) when it was refused; empty otherwise."""
        if self.status is not SagaStatus.FAILED:
            return []
        refused: list[StepRecord] = [c for c in self.compensations if c.status is StepStatus.FAILED]
        if self.steps and self.steps[-1].status is StepStatus.FAILED:
            refused.append(self.steps[-1])
        return refused


Compensation = Callable[[bool, int], Awaitable[object]]
"""Undoes one step; called with whether that step is known to have completed, and the
operator's retry it runs in (0 when the saga runs it itself)."""

Report = Callable[[int], Awaitable[object]]
"""The saga's last step; called with the operator's retry it runs in (0 the first time)."""


@dataclass(frozen=True)
class Step(Generic[T]):
    """One step of a saga: its name, what it does, its compensation (name, function), if it
    has one, and its lane: what its compensation must wait for (the entity it acts on).
    Compensations of one lane run one after another, those of different lanes at once
    (`Saga.compensate(apart=True)`); steps with no lane share one."""

    name: str
    action: Callable[[], Awaitable[T]]
    undo: tuple[str, Compensation] | None
    lane: str | None = None


@dataclass
class _Registered:
    name: str
    step: str
    undo: Compensation
    lane: str | None = None
    record: int = -1  # where its record is in the log's compensations, once it has run
    retry: int = 0  # the retry its request is named after
    refused: bool = False


class Saga:
    """Runs steps in order and, after a failure, their compensations in reverse order.

    Steps and compensations are workflow code that fails with RequestFailed. The
    compensation of a step that was refused has nothing to undo and is only recorded. A
    compensation that is refused is recorded and the others still run; the saga is then
    FAILED, and `retry` runs what failed again.
    """

    def __init__(self, log: SagaLog) -> None:
        self.log = log
        self._registered: list[_Registered] = []
        self._done: set[str] = set()
        self._refused: set[str] = set()
        self._failed: list[_Registered] = []  # refused compensations, in the log's order
        self._report: tuple[str, Report] | None = None
        self._report_failed = False
        self._report_retry = 0
        self._report_refused = False
        self._apart = False  # compensations run by lane (`compensate`)
        self.retries = 0

    async def step(self, step: Step[T]) -> T:
        """Run one step, its compensation registered first: a step that fails after taking
        effect, or whose outcome is unknown, is undone all the same."""
        self._register(step)
        try:
            result = await step.action()
        except RequestFailed as failure:
            self._record(step.name, failure)
            self._failed_at(step.name, failure)
            raise
        self._record(step.name, None)
        return result

    async def steps(self, group: Sequence[Step[T]]) -> list[T]:
        """Run steps that do not depend on each other at once, every compensation registered
        first, in the group's order. Each step is recorded in that order once all have
        ended, so the log reads as if they ran one after another; the first failure in that
        order is raised only then, so no step is still running when compensations start."""
        for step in group:
            self._register(step)
        waits = [_ended(step.action) for step in group]
        ended = await asyncio.gather(*waits, return_exceptions=True)
        failed: tuple[str, RequestFailed] | None = None
        results: list[T] = []
        for step, end in zip(group, ended, strict=True):
            if isinstance(end, BaseException):
                raise end  # not a request's failure: a defect, or the run cancelled
            at, outcome = end
            if isinstance(outcome, RequestFailed):
                self._record(step.name, outcome, at)
                failed = failed or (step.name, outcome)
            else:
                self._record(step.name, None, at)
                results.append(outcome)
        if failed is not None:
            self._failed_at(*failed)
            raise failed[1]
        return results

    def register_unreached(self, steps: Sequence[Step[Any]]) -> None:
        """Register the compensations of `steps`, in order, that are not registered yet:
        steps this run did not reach, undone only if their entity applied them (the undo
        is told the step did not complete)."""
        registered = {r.step for r in self._registered}
        for step in steps:
            if step.name not in registered:
                self._register(step)

    def _register(self, step: Step[Any]) -> None:
        if step.undo is not None:
            self._registered.append(_Registered(step.undo[0], step.name, step.undo[1], step.lane))

    def _record(self, name: str, failure: RequestFailed | None, at: datetime | None = None) -> None:
        self.log.steps.append(StepRecord(**_settled(name, failure, at)))
        if failure is None:
            self._done.add(name)
        elif failure.refused:
            self._refused.add(name)

    def _failed_at(self, name: str, failure: RequestFailed) -> None:
        self.log.failure_code = failure.code
        self.log.failure_reason = f"{name}: {failure.message}"

    async def compensate(self, apart: bool = False) -> None:
        """Run every registered compensation, last registered first. `apart`: each lane's
        one after another, last registered first, and the lanes at once, so that an entity
        that does not answer holds back only its own (a refund waited behind the return of
        an item whose worker was down, past the account's refund hold); an operator's retry
        runs them so too. The log keeps them in the order they would have run one by one,
        each entered as it ends."""
        reason = self.log.failure_reason or "a step failed"
        order, self._registered = self._registered[::-1], []
        self._apart = apart
        if not apart:
            for registered in order:
                registered.record = len(self.log.compensations)
                self.log.compensations.append(await self._compensation(registered, reason))
            return
        rank = {id(registered): at for at, registered in enumerate(order)}
        base = len(self.log.compensations)
        ended: list[_Registered] = []  # in the order of `order`

        async def run(registered: _Registered) -> None:
            record = await self._compensation(registered, reason)
            at = sum(rank[id(other)] < rank[id(registered)] for other in ended)
            ended.insert(at, registered)
            self.log.compensations.insert(base + at, record)

        try:
            await _by_lane(order, run)
        finally:
            for at, registered in enumerate(ended):
                registered.record = base + at
            self._failed.sort(key=lambda registered: registered.record)

    async def _compensation(self, registered: _Registered, reason: str) -> CompensationRecord:
        """Run one compensation; the record of a refused step's, which has nothing to undo,
        without running it."""
        if registered.step in self._refused:
            record = CompensationRecord(**_settled(registered.name, None), reason=reason)
            record.message = f"nothing to undo: {registered.step} was refused"
            return record
        return await self._undo(registered, reason)

    async def _undo(self, registered: _Registered, reason: str) -> CompensationRecord:
        failure: RequestFailed | None = None
        note: str | None = None
        try:
            result = await registered.undo(registered.step in self._done, registered.retry)
        except RequestFailed as exc:
            failure = exc
            registered.refused = exc.refused
            self._failed.append(registered)
        else:
            note = result.message if isinstance(result, Outcome) else None
        record = CompensationRecord(**_settled(registered.name, failure), reason=reason)
        if note is not None:
            record.message = note
        return record

    async def conclude(self, name: str, report: Report) -> None:
        """Run the last step, which nothing undoes since the outcome is settled by then, and
        set the final status."""
        self._report = (name, report)
        failure: RequestFailed | None = None
        try:
            await report(0)
        except RequestFailed as exc:
            failure = exc
            self._report_refused = exc.refused
        self.log.steps.append(StepRecord(**_settled(name, failure)))
        self._settle(failure is not None)

    async def retry(self) -> None:
        """An operator's retry of a FAILED saga: run the refused compensations again, in the
        log's order (by lane, the lanes at once, when they were compensated apart), each
        replacing its record, then the report if it failed; and set
        the final status again. A request that was refused runs under a new request id (the
        entity remembers the refusal of the old one), which is safe since it took no
        effect; one whose outcome is unknown runs under its old id, applied at most once."""
        self.retries += 1
        failed, self._failed = self._failed, []

        async def run(registered: _Registered) -> None:
            if registered.refused:
                registered.retry = self.retries
            reason = self.log.compensations[registered.record].reason
            self.log.compensations[registered.record] = await self._undo(registered, reason)

        try:
            if self._apart:
                await _by_lane(failed, run)
            else:
                for registered in failed:
                    await run(registered)
        finally:
            self._failed.sort(key=lambda registered: registered.record)
        report_failed = self._report_failed
        if report_failed and self._report is not None:
            name, report = self._report
            failure: RequestFailed | None = None
            if self._report_refused:
                self._report_retry = self.retries
            try:
                await report(self._report_retry)
            except RequestFailed as exc:
                failure = exc
                self._report_refused = exc.refused
            at = max(i for i, s in enumerate(self.log.steps) if s.name == name)
            self.log.steps[at] = StepRecord(**_settled(name, failure))
            report_failed = failure is not None
        self._settle(report_failed)

    def _settle(self, report_failed: bool) -> None:
        self._report_failed = report_failed
        refused = report_failed or any(
            c.status is StepStatus.FAILED for c in self.log.compensations
        )
        if refused:
            self.log.status = SagaStatus.FAILED
        elif self.log.failure_code is not None:
            self.log.status = SagaStatus.COMPENSATED
        else:
            self.log.status = SagaStatus.COMPLETED


async def _by_lane(
    registered: Sequence[_Registered], run: Callable[[_Registered], Awaitable[None]]
) -> None:
    """`run` each, each lane's one after another in the order given, the lanes at once;
    once every lane has ended, raise what one raised first (a defect, the run cancelled),
    so that nothing is still running then."""
    lanes: dict[str | None, list[_Registered]] = {}
    for each in registered:
        lanes.setdefault(each.lane, []).append(each)

    async def run_lane(lane: list[_Registered]) -> None:
        for each in lane:
            await run(each)

    ended = await asyncio.gather(
        *(run_lane(lane) for lane in lanes.values()), return_exceptions=True
    )
    for end in ended:
        if isinstance(end, BaseException):
            raise end


async def _ended(action: Callable[[], Awaitable[R]]) -> tuple[datetime, R | RequestFailed]:
    """What a step came to, and when: a refusal is an outcome here, not an exception."""
    try:
        result = await action()
    except RequestFailed as failure:
        return workflow.now(), failure
    return workflow.now(), result


def _settled(
    name: str, failure: RequestFailed | None, at: datetime | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "status": StepStatus.FAILED if failure is not None else StepStatus.DONE,
        "at": at or workflow.now(),
        "code": failure.code if failure is not None else None,
        "message": failure.message if failure is not None else None,
    }
