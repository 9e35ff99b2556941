"""Effects: what a pure transition asks the runtime to do once the new state is recorded."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class StartWorkflow(BaseModel):
    """Start another workflow (for example a saga) that outlives this entity's run."""

    workflow: str
    workflow_id: str
    input: dict[str, Any] = Field(default_factory=dict)
