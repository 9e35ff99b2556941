"""Steps run at once (`Saga.steps`) read in the log as if they ran one after another, and
their compensations start only once every one of them has ended."""

from __future__ import annotations

import uuid
from datetime import timedelta
from functools import partial

from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from entities.errors import ErrorCode
from entities.runtime.requests import RequestFailed
from entities.runtime.saga import Saga, SagaLog, Step, StepStatus
from workers.settings import Settings

# (name, milliseconds it takes, whether the entity refuses it)
GROUP = [("a", 30, False), ("b", 10, True), ("c", 1500, False)]


@workflow.defn(sandboxed=False)
class StepsAtOnce:
    """Runs GROUP as one group of steps, then compensates; returns the saga's log and
    every event in the order the workflow saw it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def _act(self, name: str, ms: int, refuse: bool) -> str:
        self.events.append(f"start {name}")
        await workflow.sleep(timedelta(milliseconds=ms))
        self.events.append(f"end {name}")
        if refuse:
            raise RequestFailed(ErrorCode.INSUFFICIENT_STOCK, f"{name} refused")
        return name

    async def _undo(self, name: str, step_completed: bool, retry: int) -> None:
        self.events.append(f"undo {name} completed={step_completed}")

    @workflow.run
    async def run(self) -> tuple[SagaLog, list[str]]:
        log = SagaLog()
        saga = Saga(log)
        group = [
            Step(
                name,
                partial(self._act, name, ms, refuse),
                (f"undo:{name}", partial(self._undo, name)),
            )
            for name, ms, refuse in GROUP
        ]
        try:
            await saga.steps(group)
        except RequestFailed:
            await saga.compensate()
        return log, self.events


async def run_saga(
    client: Client, settings: Settings, saga: type[StepsAtOnce] | type[CompensationsApart]
) -> tuple[SagaLog, list[str]]:
    """Run one of this module's saga workflows to its end: its log and its events."""
    async with Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[saga],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        result: tuple[SagaLog, list[str]] = await client.execute_workflow(
            saga.run,
            id=f"saga-{uuid.uuid4().hex}",
            task_queue=settings.task_queue,
            result_type=tuple[SagaLog, list[str]],
        )
    return result


async def test_steps_at_once_are_logged_in_order_and_compensated_after_all_end(
    temporal_client: Client, settings: Settings
) -> None:
    log, events = await run_saga(temporal_client, settings, StepsAtOnce)
    # All three started before any ended, and b (refused) ended first, c last.
    assert events[:3] == ["start a", "start b", "start c"]
    assert events[3:6] == ["end b", "end a", "end c"]
    # The log reads in the group's order, whatever the order they ended in.
    assert [(s.name, s.status) for s in log.steps] == [
        ("a", StepStatus.DONE),
        ("b", StepStatus.FAILED),
        ("c", StepStatus.DONE),
    ]
    # Each is recorded with when it ended, not when the last of them did.
    assert log.steps[1].at < log.steps[2].at
    assert log.failure_code == ErrorCode.INSUFFICIENT_STOCK
    assert log.failure_reason == "b: b refused"
    # Compensation began after the last step ended, last registered first; the refused
    # step's has nothing to undo and is only recorded.
    assert events[6:] == ["undo c completed=True", "undo a completed=True"]
    assert [c.name for c in log.compensations] == ["undo:c", "undo:b", "undo:a"]
    assert log.compensations[1].message == "nothing to undo: b was refused"


# (name, lane, milliseconds its undo takes); the last step is refused.
LANED = [("a", "x", 10), ("b", "y", 10), ("c", "x", 1500), ("d", "y", 0)]


@workflow.defn(sandboxed=False)
class CompensationsApart:
    """Takes LANED's steps one after another, the last refused, then compensates each lane
    apart; returns the saga's log and every event in the order the workflow saw it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def _act(self, name: str) -> str:
        if name == LANED[-1][0]:
            raise RequestFailed(ErrorCode.INSUFFICIENT_FUNDS, f"{name} refused")
        return name

    async def _undo(self, name: str, ms: int, step_completed: bool, retry: int) -> None:
        self.events.append(f"undo {name}")
        await workflow.sleep(timedelta(milliseconds=ms))
        self.events.append(f"undone {name}")

    @workflow.run
    async def run(self) -> tuple[SagaLog, list[str]]:
        log = SagaLog()
        saga = Saga(log)
        try:
            for name, lane, ms in LANED:
                undo = (f"undo:{name}", partial(self._undo, name, ms))
                await saga.step(Step(name, partial(self._act, name), undo, lane))
        except RequestFailed:
            await saga.compensate(apart=True)
        return log, self.events


async def test_compensations_apart_wait_only_for_their_own_lane(
    temporal_client: Client, settings: Settings
) -> None:
    log, events = await run_saga(temporal_client, settings, CompensationsApart)
    # Lane y's b is undone while lane x's slow c is still being undone; x's a waits for c.
    assert events.index("undone b") < events.index("undone c")
    assert events.index("undone c") < events.index("undo a")
    assert set(events) == {f"{verb} {name}" for verb in ("undo", "undone") for name in "abc"}
    # The log reads last registered first, as if they had run one by one, whatever order
    # they ended in; the refused step's is only recorded.
    assert [c.name for c in log.compensations] == ["undo:d", "undo:c", "undo:b", "undo:a"]
    assert log.compensations[0].message == "nothing to undo: d was refused"
    assert all(c.status is StepStatus.DONE for c in log.compensations)
    # Each is recorded with when it ended: b well before c.
    assert log.compensations[2].at < log.compensations[1].at
