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

Before Python 3.12 a worker could also fail to start, now and then, validating a workflow
in the sandbox: `KeyError: <thread id>` from importlib's module lock (CPython gh-91351,
temporalio/sdk-python#585). A garbage collection that ran a finalizer inside one import's
lock acquisition, where the finalizer imported a module for the first time (a warning's
`tracemalloc`), undid the outer import's bookkeeping. Validation now runs with the
collector held, and `tracemalloc` is loaded here, so that a warning never loads it first.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import tracemalloc  # noqa: F401  loaded before any sandbox: see the module's docstring
from collections.abc import Iterator

from temporalio import workflow
from temporalio.converter import DataConverter, SerializationContext, StorageDriverStoreContext
from temporalio.worker import (
    Replayer,
    UnsandboxedWorkflowRunner,
    WorkflowRunner,
)
from temporalio.worker._command_aware_visitor import CommandInfo
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from entities import catalog
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
    sandbox = _sandbox(*passthrough)
    if data_converter.payload_codec is not None or data_converter.external_storage is not None:
        return sandbox
    return ContextFreeRunner(sandbox)


def entity_replayer(data_converter: DataConverter) -> Replayer:
    """A replayer of every workflow in `entities`, in the sandbox the worker runs them in."""
    return Replayer(
        workflows=catalog.workflows(), data_converter=data_converter, workflow_runner=_sandbox()
    )


def _sandbox(*passthrough: str) -> SandboxedWorkflowRunner:
    return _ValidatedHeld(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            *_PASSTHROUGH, *passthrough
        )
    )


class _ValidatedHeld(SandboxedWorkflowRunner):
    """The SDK's sandbox, validating each workflow with the garbage collector held."""

    def prepare_workflow(self, defn: workflow._Definition) -> None:
        with collector_held():
            super().prepare_workflow(defn)


_held = 0
_held_lock = threading.Lock()
_enabled_before = True


@contextlib.contextmanager
def collector_held() -> Iterator[None]:
    """No garbage collection in any thread while inside (nested or from several threads),
    before Python 3.12; the collector is left as it was found when the last one leaves."""
    global _held, _enabled_before
    if sys.version_info >= (3, 12):
        yield
        return
    with _held_lock:
        if _held == 0:
            _enabled_before = gc.isenabled()
            gc.disable()
        _held += 1
    try:
        yield
    finally:
        with _held_lock:
            _held -= 1
            if _held == 0 and _enabled_before:
                gc.enable()


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
