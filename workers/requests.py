"""The request activity: how a workflow (a saga) sends one entity a command and learns what
became of it."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import CommandEnvelope, Outcome, OutcomeStatus
from entities.runtime.requests import REQUEST_ACTIVITY, EntityRequest
from workers.delivery import CommandDelivery
from workers.settings import Settings


class EntityRequests:
    """Delivers commands to entities on behalf of workflows, request-response."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self._delivery = CommandDelivery(client, settings)

    @REQUEST_ACTIVITY.defn
    async def request_entity(self, request: EntityRequest) -> Outcome:
        """Deliver the command and return its outcome. A refusal is a non-retryable
        ApplicationError whose type is the entity's code; an entity that cannot be reached
        fails the attempt, to be retried with the same command id."""
        entity = catalog.entity_types().get(request.entity_type)
        if entity is None:
            raise ApplicationError(
                f"no entity type {request.entity_type!r}",
                type=ErrorCode.INVALID_INPUT,
                non_retryable=True,
            )
        envelope = CommandEnvelope(
            command_id=request.command_id,
            name=request.command,
            payload=request.payload,
            undoes=request.undoes,
            sent_by=request.sent_by,
            reads_large_state=True,  # a saga needs the outcome alone
        )
        try:
            result = await self._delivery.request(entity, request.entity_id, envelope)
        except TenureError as exc:
            raise ApplicationError(
                exc.message, type=exc.code, non_retryable=exc.code is not ErrorCode.UNAVAILABLE
            ) from exc
        outcome = result.outcome
        if outcome.status is OutcomeStatus.REJECTED:
            raise ApplicationError(
                outcome.message or "refused",
                type=outcome.code or ErrorCode.INTERNAL,
                non_retryable=True,
            )
        return outcome
