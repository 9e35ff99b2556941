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


async def test_steps_at_once_are_logged_in_order_and_compensated_after_all_end(
    temporal_client: Client, settings: Settings
) -> None:
    async with Worker(
        temporal_client,
        task_queue=settings.task_queue,
        workflows=[StepsAtOnce],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        log, events = await temporal_client.execute_workflow(
            StepsAtOnce.run,
            id=f"steps-{uuid.uuid4().hex}",
            task_queue=settings.task_queue,
            result_type=tuple[SagaLog, list[str]],
        )
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
