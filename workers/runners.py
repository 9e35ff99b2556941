"""Wrapping the SDK's workflow runner: a runner that hands everything to another but the
instances it makes, and an instance that hands every call to another; `sandbox.py` and
`query_guard.py` change one call each."""

from __future__ import annotations

from collections.abc import Sequence

import temporalio.bridge.proto.workflow_activation
import temporalio.bridge.proto.workflow_completion
import temporalio.workflow
from temporalio.converter import SerializationContext, StorageDriverStoreContext
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner
from temporalio.worker._command_aware_visitor import CommandInfo

Activation = temporalio.bridge.proto.workflow_activation.WorkflowActivation
Completion = temporalio.bridge.proto.workflow_completion.WorkflowActivationCompletion


class WrappedInstance(WorkflowInstance):
    """Hands every call to `inner`; a subclass overrides the ones it changes."""

    def __init__(self, inner: WorkflowInstance) -> None:
        self._inner = inner

    def activate(self, act: Activation) -> Completion:
        return self._inner.activate(act)

    def get_serialization_context(
        self, command_info: CommandInfo | None
    ) -> SerializationContext | None:
        return self._inner.get_serialization_context(command_info)

    def get_external_store_context(
        self, command_info: CommandInfo | None
    ) -> StorageDriverStoreContext:
        return self._inner.get_external_store_context(command_info)

    def get_info(self) -> temporalio.workflow.Info:
        return self._inner.get_info()

    def get_thread_id(self) -> int | None:
        return self._inner.get_thread_id()


class WrappingRunner(WorkflowRunner):
    """Runs workflows with `inner`, each instance wrapped in `instance_type`."""

    instance_type: type[WrappedInstance] = WrappedInstance

    def __init__(self, inner: WorkflowRunner) -> None:
        self._inner = inner

    def prepare_workflow(self, defn: temporalio.workflow._Definition) -> None:
        self._inner.prepare_workflow(defn)

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return self.instance_type(self._inner.create_instance(det))

    def set_worker_level_failure_exception_types(
        self, types: Sequence[type[BaseException]]
    ) -> None:
        self._inner.set_worker_level_failure_exception_types(types)
