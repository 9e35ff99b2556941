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
from typing import Any, ClassVar, Generic, TypeVar

from temporalio import activity, workflow

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
        # The first declaration stands: a sandbox that imports a workflow's module again
        # (one without `entities` passed through) declares its activities again.
        self.declared.setdefault(self.name, self)

    def defn(self, fn: F) -> F:
        """Serve the activity with `fn` (a function or a method): the worker's side."""
        return activity.defn(name=self.name)(fn)

    async def execute(self, *argument: A, **options: Any) -> R:
        """Run the activity from a workflow and wait for its result; `options` are
        `workflow.execute_activity`'s."""
        result: R = await workflow.execute_activity(
            self.name, *argument, result_type=self.result, **options
        )
        return result

    async def execute_local(self, *argument: A, **options: Any) -> R:
        """Run it as a local activity (`workflow.execute_local_activity`'s options)."""
        result: R = await workflow.execute_local_activity(
            self.name, *argument, result_type=self.result, **options
        )
        return result
