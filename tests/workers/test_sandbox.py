"""The worker's workflow runner keeps the SDK's sandbox while skipping its trips in for
serialization contexts, and only when the data converter makes those trips pointless."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import PayloadCodec
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from tests.workers.sandboxed_workflows import Echo, SandboxProbe, echo
from workers.sandbox import ContextFreeRunner, workflow_runner
from workers.settings import Settings


class _Identity(PayloadCodec):
    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)


def test_the_runner_skips_contexts_only_without_a_codec(settings: Settings) -> None:
    assert isinstance(workflow_runner(settings, pydantic_data_converter), ContextFreeRunner)
    with_codec = dataclasses.replace(pydantic_data_converter, payload_codec=_Identity())
    assert isinstance(workflow_runner(settings, with_codec), SandboxedWorkflowRunner)
    unsandboxed = settings.model_copy(update={"workflow_sandbox": False})
    assert isinstance(
        workflow_runner(unsandboxed, pydantic_data_converter), UnsandboxedWorkflowRunner
    )


async def test_workflow_code_still_runs_in_the_sandbox(
    temporal_client: Client, settings: Settings
) -> None:
    runner = workflow_runner(settings, temporal_client.data_converter, "tests")
    async with Worker(
        temporal_client,
        task_queue=settings.task_queue,
        workflows=[SandboxProbe],
        activities=[echo],
        workflow_runner=runner,
    ):
        in_sandbox, echoed = await temporal_client.execute_workflow(
            SandboxProbe.run,
            Echo(text="hello"),
            id=f"probe-{uuid.uuid4().hex}",
            task_queue=settings.task_queue,
            result_type=tuple[bool, Echo],
        )
    assert in_sandbox is True
    assert echoed == Echo(text="hello!")
