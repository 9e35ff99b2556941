"""The activities that workflows here run and the worker serves, each declared once: its
name, what it takes and what it gives back.

Workflow code does no I/O, so what talks to the world lives with the worker, a layer above,
which the workflows cannot import. A workflow runs an activity through its declaration
(`REQUEST.execute(request, ...)`), the worker serves it under the declaration's name
(`@REQUEST.defn`), and `tests/workers/test_activities.py` checks that the worker serves every
declared activity with the types declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Generic, TypeVar

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

A = TypeVar("A")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Activity(Generic[A, R]):
    """One activity: its name, its one argument's type (None: it takes none) and its result's."""

    name: str
    argument: type[A] | None
    result: type[R] | None

    declared: ClassVar[dict[str, Activity[Any, Any]]] = {}
    """Every activity declared, by name."""

    def __post_init__(self) -> None:
        # A sandbox that imports a workflow's module again (one without `entities` passed
        # through) declares its activities again, with new classes of the same names: the
        # first declaration stands. Another activity under a taken name is an error.
        first = self.declared.setdefault(self.name, self)
        if _type_names(first) != _type_names(self):
            raise ValueError(f"an activity named {self.name!r} is declared already")

    def defn(self, fn: F) -> F:
        """Serve the activity with `fn` (a function or a method): the worker's side."""
        return activity.defn(name=self.name)(fn)

    async def execute(
        self,
        *argument: A,
        start_to_close_timeout: timedelta | None = None,
        schedule_to_close_timeout: timedelta | None = None,
        heartbeat_timeout: timedelta | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> R:
        """Run the activity from a workflow and wait for its result."""
        result: R = await workflow.execute_activity(
            self.name,
            *argument,
            result_type=self.result,
            start_to_close_timeout=start_to_close_timeout,
            schedule_to_close_timeout=schedule_to_close_timeout,
            heartbeat_timeout=heartbeat_timeout,
            retry_policy=retry_policy,
        )
        return result

    async def execute_local(
        self,
        *argument: A,
        start_to_close_timeout: timedelta | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> R:
        """Run it as a local activity, in the workflow's own worker and task."""
        result: R = await workflow.execute_local_activity(
            self.name,
            *argument,
            result_type=self.result,
            start_to_close_timeout=start_to_close_timeout,
            retry_policy=retry_policy,
        )
        return result


def _type_names(declared: Activity[Any, Any]) -> tuple[str, ...]:
    return tuple(
        "None" if t is None else f"{t.__module__}.{t.__qualname__}"
        for t in (declared.argument, declared.result)
    )
