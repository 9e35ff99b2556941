"""Patch sets: one patch that stands for several, so that a new run records one marker.

Each patch a run asks (`workflow.patched`) records a marker in its history, and the SDK's
core upserts the `TemporalChangeVersion` search attribute beside each: a visibility write on
the server. A new entity run asked three patches, a checkout three, in every run. A set is
one newer patch that a run asks first: a run that has it has every patch of the set without
asking, and a run begun before the set existed (its history has no marker of it) asks each
patch as it always did, at the same places, so it replays as it was made.

A new patch joins a new set that succeeds the last (`after`): a run begun under the last
set has its patches by its marker, as it always had, and asks the new patch on its own.

The SDK remembers each answer for the rest of the run, and a run asks its first patch in its
first workflow task, so a run's answers never change mid-run.
"""

from __future__ import annotations

from collections.abc import Iterable

from temporalio import workflow


class PatchSet:
    """A patch (`name`) that stands for `patches` and every patch of the set it succeeds
    (`after`), and what new runs do besides."""

    def __init__(self, name: str, patches: Iterable[str], after: PatchSet | None = None) -> None:
        self.name = name
        self.after = after
        self.patches: frozenset[str] = frozenset(patches) | (
            after.patches if after else frozenset()
        )

    def current(self) -> bool:
        """Whether this run began under a set: this one, or one it succeeds (`after`),
        whose patches it has all the same."""
        return workflow.patched(self.name) or (self.after is not None and self.after.current())

    def patched(self, patch: str) -> bool:
        """Whether this run has `patch`: through the set, or, a run from before the set,
        by its own marker. Workflow code."""
        if patch not in self.patches:
            raise ValueError(f"{patch!r} is not in the patch set {self.name!r}")
        if workflow.patched(self.name):
            return True
        if self.after is not None and patch in self.after.patches:
            return self.after.patched(patch)
        return workflow.patched(patch)
