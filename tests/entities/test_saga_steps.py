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
    client: Client,
    settings: Settings,
    saga: type[StepsAtOnce] | type[CompensationsApart],
    *args: object,
) -> tuple[SagaLog, list[str], SagaLog | None]:
    """Run one of this module's saga workflows to its end: its log and its events, and its
    log before its retry when it took one."""
    async with Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[saga],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        handle = await client.start_workflow(
            saga.run,  # type: ignore[arg-type]
            args=list(args),
            id=f"saga-{uuid.uuid4().hex}",
            task_queue=settings.task_queue,
            result_type=tuple[SagaLog, list[str]],
        )
        log, events = await handle.result()
        before = None
        if saga is CompensationsApart:
            before = await handle.query("before_retry", result_type=SagaLog | None)
    return log, events, before


async def test_steps_at_once_are_logged_in_order_and_compensated_after_all_end(
    temporal_client: Client, settings: Settings
) -> None:
    log, events, _ = await run_saga(temporal_client, settings, StepsAtOnce)
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
    apart; returns the saga's log and every event in the order the workflow saw it. With
    `refusing`, those undoes are refused the first time, and the saga retried once after
    (`log_before_retry` holds the log as it was)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.refusing: set[str] = set()
        self.log_before_retry: SagaLog | None = None

    async def _act(self, name: str) -> str:
        if name == LANED[-1][0]:
            raise RequestFailed(ErrorCode.INSUFFICIENT_FUNDS, f"{name} refused")
        return name

    async def _undo(self, name: str, ms: int, step_completed: bool, retry: int) -> None:
        self.events.append(f"undo {name}")
        await workflow.sleep(timedelta(milliseconds=ms))
        if name in self.refusing and retry == 0:
            self.events.append(f"refused {name}")
            raise RequestFailed(ErrorCode.LIMIT_REACHED, f"undo {name} refused")
        self.events.append(f"undone {name}")

    @workflow.run
    async def run(self, refusing: list[str] | None = None) -> tuple[SagaLog, list[str]]:
        self.refusing = set(refusing or [])
        log = SagaLog()
        saga = Saga(log)
        try:
            for name, lane, ms in LANED:
                undo = (f"undo:{name}", partial(self._undo, name, ms))
                await saga.step(Step(name, partial(self._act, name), undo, lane))
        except RequestFailed:
            await saga.compensate(apart=True)
        if self.refusing:
            self.log_before_retry = log.model_copy(deep=True)
            self.events.append("retry")
            await saga.retry()
        return log, self.events

    @workflow.query
    def before_retry(self) -> SagaLog | None:
        return self.log_before_retry


async def test_compensations_apart_wait_only_for_their_own_lane(
    temporal_client: Client, settings: Settings
) -> None:
    log, events, _ = await run_saga(temporal_client, settings, CompensationsApart)
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


async def test_refused_compensations_apart_are_retried_in_their_places_and_lanes(
    temporal_client: Client, settings: Settings
) -> None:
    """b's undo is refused early and c's late, behind its 1.5 s: each refusal keeps its place
    in the log, and an operator's retry replaces those two records, lane by lane at once."""
    log, events, before = await run_saga(temporal_client, settings, CompensationsApart, ["b", "c"])
    assert before is not None
    names = ["undo:d", "undo:c", "undo:b", "undo:a"]
    assert [(c.name, c.status) for c in before.compensations] == [
        ("undo:d", StepStatus.DONE),
        ("undo:c", StepStatus.FAILED),
        ("undo:b", StepStatus.FAILED),
        ("undo:a", StepStatus.DONE),
    ]
    assert events.index("refused b") < events.index("refused c")  # b's refusal came first
    assert [(c.name, c.status) for c in log.compensations] == [
        (name, StepStatus.DONE) for name in names
    ]
    # Only c's and b's records were replaced, each in its place; the retry ran both at once.
    replaced = [c.at > d.at for c, d in zip(log.compensations, before.compensations, strict=True)]
    assert replaced == [False, True, True, False]
    retried = events[events.index("retry") + 1 :]
    assert retried[:2] == ["undo c", "undo b"]
    assert retried.index("undone b") < retried.index("undone c")
