"""Workflows as small as Temporal allows, one per primitive that `python -m bench.primitives`
costs: what a workflow does with no code of its own in the way."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_noted")
async def noted(count: int) -> int:
    """Does nothing: the cost is the activity's, as an entity's publish is."""
    return count


@workflow.defn(name="BenchTarget")
class TargetWorkflow:
    """A long-lived workflow that takes signals and updates and answers queries."""

    def __init__(self) -> None:
        self._count = 0
        self._done = False
        self._to_note = False

    @workflow.signal
    def poke(self) -> None:
        self._count += 1

    @workflow.update
    def bump(self) -> int:
        self._count += 1
        return self._count

    @workflow.update
    def bump_and_note(self) -> int:
        """An update answered at once, with an activity after it: as an entity answers a
        waited command and publishes its snapshot."""
        self._count += 1
        self._to_note = True
        return self._count

    @workflow.query
    def count(self) -> int:
        return self._count

    @workflow.signal
    def finish(self) -> None:
        self._done = True

    @workflow.run
    async def run(self) -> int:
        while True:
            await workflow.wait_condition(lambda: self._done or self._to_note)
            if self._to_note:  # one at a time; those meanwhile go in the next, as publishes
                self._to_note = False
                await workflow.execute_activity(
                    noted, self._count, start_to_close_timeout=timedelta(seconds=30)
                )
            elif self._done:
                break
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._count


@workflow.defn(name="BenchOnce")
class OnceWorkflow:
    """Starts and completes in its first task."""

    @workflow.run
    async def run(self) -> int:
        return 1


@workflow.defn(name="BenchParent")
class ParentWorkflow:
    """Starts one child (`OnceWorkflow`) and completes with its result, as a cart starts
    its checkout."""

    @workflow.run
    async def run(self, child_id: str) -> int:
        return await workflow.execute_child_workflow(OnceWorkflow.run, id=child_id)
