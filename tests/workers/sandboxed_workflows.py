"""Workflows for the worker tests, in a module of their own so the sandbox imports only this."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from temporalio import activity, workflow


class Echo(BaseModel):
    text: str


@activity.defn
async def echo(value: Echo) -> Echo:
    return Echo(text=value.text + "!")


@workflow.defn
class SandboxProbe:
    """Reports whether its code ran in the sandbox, after a round trip through an activity
    with a pydantic payload."""

    @workflow.run
    async def run(self, value: Echo) -> tuple[bool, Echo]:
        echoed = await workflow.execute_activity(
            echo, value, start_to_close_timeout=timedelta(seconds=10)
        )
        return workflow.unsafe.in_sandbox(), echoed


@workflow.defn
class FailingOutcomes:
    """Answers the entities' `outcome` query with a failure of its own code, as an entity
    whose query handler raised would, and waits for ever."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.query(name="outcome")
    def outcome(self, command_id: str) -> None:
        raise ValueError(f"cannot tell {command_id}'s outcome")


@workflow.defn
class FailingTasks:
    """Fails every workflow task it is given, as a checkout whose code no longer runs would:
    Temporal retries the task for ever and flags the workflow."""

    @workflow.run
    async def run(self) -> None:
        raise RuntimeError("this code cannot go on")
