"""The worker's workflow runner keeps the SDK's sandbox while skipping its trips in for
serialization contexts, and only when the data converter makes those trips pointless."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import itertools
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import PayloadCodec
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from entities import catalog
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


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="CPython 3.12 fixed gh-91351")
async def test_a_worker_validates_its_workflows_while_finalizers_import(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection at nearly every allocation, each running a finalizer that imports a
    module for the first time (as a warning's first `tracemalloc` does): the sandbox's
    validation of every workflow still passes. Before, it failed at once with
    `KeyError: <thread id>` from importlib's module lock."""
    workflows = catalog.workflows()
    runner = workflow_runner(settings, pydantic_data_converter)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = itertools.count()
    imported: list[str] = []
    collecting = [True]

    class Cycle:
        def __init__(self) -> None:
            self.itself = self

        def __del__(self) -> None:
            if collecting[0]:
                name = f"first_time_{next(names)}"
                (tmp_path / f"{name}.py").write_text("")
                imported.append(name)
                importlib.import_module(name)
                Cycle()

    threshold = gc.get_threshold()
    Cycle()
    gc.set_threshold(1)
    try:
        for defn in workflows:
            runner.prepare_workflow(workflow._Definition.must_from_class(defn))
    finally:
        gc.set_threshold(*threshold)
        collecting[0] = False
        gc.collect()
        for name in imported:
            sys.modules.pop(name, None)
    assert len(imported) >= len(workflows)  # the finalizers ran between the validations


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
