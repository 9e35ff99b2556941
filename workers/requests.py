"""The request activity: how a workflow (a saga) sends one entity a command and learns what
became of it."""

from __future__ import annotations

import asyncio
import logging

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import CommandEnvelope, CommandResult, Outcome, OutcomeStatus
from entities.runtime.requests import REQUEST_ACTIVITY, EntityRequest
from workers.activities import CacheActivities
from workers.cache import SnapshotCache
from workers.delivery import CommandDelivery
from workers.handovers import hand_back
from workers.logs import RepeatedLogFilter
from workers.settings import Settings

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=10.0))

PUBLISH_WAIT = 0.5
"""Seconds a request waits for the cache to take what it publishes, before it leaves the
publish to the entity."""


class EntityRequests:
    """Delivers commands to entities on behalf of workflows, request-response, and
    publishes what they answer.

    A request's entity does not publish the snapshot its command made: it hands it over in
    its answer (`CommandEnvelope.publishes`), and the request publishes it, where it is
    running anyway. That spares the entity a publish activity and the workflow task that
    follows it, a third of a checkout's history. The request is retried until it has
    published or has asked the entity to (`PUBLISH_SIGNAL`), and a retry is answered with
    the snapshot again, so nothing handed over goes unpublished."""

    def __init__(self, client: Client, settings: Settings, cache: SnapshotCache) -> None:
        self._client = client
        self._delivery = CommandDelivery(client, settings)
        self._publisher = CacheActivities(cache)

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
            undoes_since=request.undoes_since,
            # Only to a repeat: a first delivery after a backlog of thousands of other
            # commands is no repeat, and was refused as one.
            first_sent=request.first_sent if _repeated(request) else None,
            sent_by=request.sent_by,
            reads_large_state=True,  # a saga needs the outcome alone
            publishes=True,
        )
        try:
            result = await self._delivery.request(entity, request.entity_id, envelope)
        except TenureError as exc:
            if exc.code is ErrorCode.UNAVAILABLE:
                raise _not_answered(request) from exc
            message = exc.message
            if exc.code is ErrorCode.IDEMPOTENCY_KEY_REUSED:
                # The delivery's words ("send it with a new key", the step's command id) are
                # a client's, not a saga's; a customer reads this step's message.
                message = (
                    f"{request.entity_type} {request.entity_id} took another command under "
                    "this step's id (an earlier attempt's)"
                )
            raise ApplicationError(message, type=exc.code, non_retryable=True) from exc
        workflow_id = entity.workflow_id(request.entity_id)
        try:
            await self._publish(workflow_id, result)
        except RPCError as exc:
            log.warning("%s: neither published nor handed back: %s", workflow_id, exc)
            raise _not_answered(request) from exc
        outcome = result.outcome
        if outcome.status is OutcomeStatus.REJECTED:
            raise ApplicationError(
                outcome.message or "refused",
                type=outcome.code or ErrorCode.INTERNAL,
                non_retryable=True,
            )
        return outcome

    async def _publish(self, workflow_id: str, result: CommandResult) -> None:
        """Publish what the entity handed over; when the cache cannot take it, ask the
        entity to publish it itself, as it does its other changes (retrying until Redis is
        back). If neither can be done the request fails, to be retried."""
        publication = result.publication()
        if publication is None:
            return
        try:
            # Bounded short: a Redis that hangs must not spend the request's local try.
            await asyncio.wait_for(self._publisher.publish(publication), PUBLISH_WAIT)
            return
        except Exception as exc:
            log.warning("a request's snapshot is left to its entity to publish: %s", exc)
        # False when it has closed since, having published its end; an RPCError (Temporal
        # not reached) fails the request, to be retried.
        await hand_back(self._client, workflow_id)


def _not_answered(request: EntityRequest) -> ApplicationError:
    """A retryable failure whose text a saga may keep as its reason, which the customer
    reads on the cart and the checkout: the entity, not the delivery's own words (an
    internal command id, "retry with the same idempotencyKey", a workflow id), which stay in
    the failure's cause for operators."""
    return ApplicationError(
        f"{request.entity_type} {request.entity_id} did not answer in time",
        type=ErrorCode.UNAVAILABLE,
    )


def _repeated(request: EntityRequest) -> bool:
    """Whether this request may have been delivered before: sent by an earlier request or a
    local try, or this activity's earlier attempt."""
    return request.resent or activity.info().attempt > 1
