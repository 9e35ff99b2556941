"""The runner of workflow code: the SDK's sandbox, sharing the pure domain modules, without
the trips into the sandbox that the SDK makes for each payload of each activation to learn
a serialization context that no payload of ours uses.

Since temporalio 1.35 the worker walks every activation and every completion six times,
once per payload codec and external storage step, and for each payload list asks the
workflow instance for its serialization context; a sandboxed instance answers by executing
code inside the sandbox. With no payload codec and no external storage every one of those
steps leaves the payloads as they are, whatever the context, yet the asking cost about a
fifth of the worker's CPU under load (profiled in `make bench`, README "Performance"). A
converter that has either gets the SDK's instances unchanged.
"""

from __future__ import annotations

from temporalio.converter import DataConverter, SerializationContext, StorageDriverStoreContext
from temporalio.worker import (
    UnsandboxedWorkflowRunner,
    WorkflowRunner,
)
from temporalio.worker._command_aware_visitor import CommandInfo
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from workers.runners import WrappedInstance, WrappingRunner
from workers.settings import Settings

# Domain code is pure and side-effect free, so the sandbox may share it between runs instead
# of re-importing it for each workflow: less memory per cached entity, faster starts.
_PASSTHROUGH = ("pydantic", "pydantic_core", "annotated_types", "entities")


def workflow_runner(
    settings: Settings, data_converter: DataConverter, *passthrough: str
) -> WorkflowRunner:
    """The sandbox, sharing the pure domain modules (and `passthrough`), unless the settings
    turn it off; its instances answer the payload steps without entering it when
    `data_converter` makes those steps do nothing."""
    if not settings.workflow_sandbox:
        return UnsandboxedWorkflowRunner()
    sandbox = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            *_PASSTHROUGH, *passthrough
        )
    )
    if data_converter.payload_codec is not None or data_converter.external_storage is not None:
        return sandbox
    return ContextFreeRunner(sandbox)


class _ContextFreeInstance(WrappedInstance):
    def get_serialization_context(
        self, command_info: CommandInfo | None
    ) -> SerializationContext | None:
        return None

    def get_external_store_context(
        self, command_info: CommandInfo | None
    ) -> StorageDriverStoreContext:
        return StorageDriverStoreContext(target=None)


class ContextFreeRunner(WrappingRunner):
    """A runner whose instances tell the worker that no payload needs a serialization
    context or an external store: right only for a data converter with neither a payload
    codec nor external storage, the only users of either answer."""

    instance_type = _ContextFreeInstance
