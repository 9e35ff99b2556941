"""The generic actor runtime: declare an entity type once, host it as a Temporal workflow."""

from entities.runtime.entity import CommandContext, EntityType
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandResult,
    EntityRunInput,
    Outcome,
    OutcomeStatus,
    RuntimeOptions,
    Snapshot,
)
from entities.runtime.workflow import EntityWorkflow

__all__ = [
    "CommandContext",
    "CommandEnvelope",
    "CommandResult",
    "EntityRunInput",
    "EntityType",
    "EntityWorkflow",
    "Outcome",
    "OutcomeStatus",
    "RuntimeOptions",
    "Snapshot",
]
