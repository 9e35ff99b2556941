"""Requests from a workflow to an entity: a command delivered by an activity, and its outcome.

Workflow code does no I/O, so a saga asks another entity through the `request_entity`
activity, which the worker serves. The command id is the idempotency key: the same request
retried, or replayed, is applied once.

A request first tries once as a local activity, in the workflow's own worker and task, which
spares it the round trips of scheduling an activity task and recording its start and result.
A refusal ends it there; anything else (no answer within LOCAL_TRY_SECONDS, an entity out of
reach) hands it to the activity with the request's full policy, as before: its retries are
durable and visible among the workflow's pending activities. A local activity in flight
would fail a continue-as-new, so a workflow that requests must not continue as new before
its requests are answered.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from entities.errors import ErrorCode, TenureError
    from entities.runtime.activities import Activity
    from entities.runtime.envelope import Outcome

Failed = ActivityError | ApplicationError | TimeoutError
"""How a request's activity fails: a local activity's failures are not all wrapped."""
# Workflows that made their first request under older code ask only with activities.
LOCAL_TRY = "requests-try-local-first"
LOCAL_TRY_SECONDS = 1.0
"""The most the local try may take. It holds its workflow task open, and with it the
workflow's queries (a checkout's status), so it stays well under a read's timeout."""


class EntityRequest(BaseModel):
    """One command for one entity, as the request activity carries it."""

    entity_type: str
    entity_id: str
    command_id: str
    command: str
    payload: dict[str, Any] = Field(default_factory=dict)
    undoes: str | None = None
    undoes_since: AwareDatetime | None = Field(
        default=None, description="When the undone command was first sent (`CommandEnvelope`)."
    )
    first_sent: AwareDatetime | None = Field(
        default=None,
        description="When this command id was first sent (`CommandEnvelope`); the entity is "
        "told it only when it is sent again (`resent`, or a later attempt of the activity): "
        "a first delivery behind a backlog of thousands is not a repeat.",
    )
    resent: bool = Field(
        default=False,
        description="Sent before: by a local try ahead of this activity, or under the same id "
        "by an earlier request (an operator's retry of an outcome not known).",
    )
    sent_by: str | None = Field(
        default=None, max_length=160, description="Who sends it, as `role:subject`."
    )


REQUEST_ACTIVITY = Activity("request_entity", EntityRequest, Outcome)


class RequestFailed(TenureError):
    """The entity refused the request, or it could not be delivered within its retries."""

    @property
    def refused(self) -> bool:
        """The entity (or its absence) refused it, so it certainly did not take effect;
        otherwise (not delivered in time, or the entity cannot tell) it may have."""
        return self.code not in (ErrorCode.UNAVAILABLE, ErrorCode.OUTCOME_UNKNOWN)


class RequestPolicy(BaseModel):
    """How long one attempt may take and how often it is tried; `attempts=0` means until
    it succeeds or is refused."""

    timeout_seconds: float = Field(default=30.0, gt=0)
    attempts: int = Field(default=5, ge=0)
    initial_interval_seconds: float = Field(default=1.0, gt=0)
    maximum_interval_seconds: float = Field(default=30.0, gt=0)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial_interval=timedelta(seconds=self.initial_interval_seconds),
            maximum_interval=timedelta(seconds=self.maximum_interval_seconds),
            maximum_attempts=self.attempts,
        )


async def request_entity(
    request: EntityRequest, policy: RequestPolicy, patched: Callable[[str], bool] = workflow.patched
) -> Outcome:
    """Deliver `request` and wait for its outcome; raises RequestFailed with the entity's
    code when refused, or UNAVAILABLE when the attempts ran out. `patched` answers whether
    the run has LOCAL_TRY (a `PatchSet`'s, for one that has it in its set)."""
    tried_locally = patched(LOCAL_TRY)
    if tried_locally:
        try:
            return await _local_try(request, policy)
        # A local activity's failure comes unwrapped; its timeout as an ActivityError, but
        # unwrapped when replayed.
        except (ActivityError, ApplicationError, TimeoutError) as exc:
            cause = _cause(exc)
            if isinstance(cause, ApplicationError) and cause.non_retryable:
                raise _failed(request, exc) from exc
            workflow.logger.info(
                "a request to %s goes on as an activity: %s", request.entity_type, cause
            )
    try:
        outcome = await REQUEST_ACTIVITY.execute(
            # After a local try that may have delivered it: a repeat, as the entity sees it.
            request.model_copy(update={"resent": True}) if tried_locally else request,
            start_to_close_timeout=timedelta(seconds=policy.timeout_seconds),
            retry_policy=policy.retry_policy(),
        )
    except ActivityError as exc:
        raise _failed(request, exc) from exc
    return outcome


async def _local_try(request: EntityRequest, policy: RequestPolicy) -> Outcome:
    timeout = min(policy.timeout_seconds, LOCAL_TRY_SECONDS)
    return await REQUEST_ACTIVITY.execute_local(
        request,
        start_to_close_timeout=timedelta(seconds=timeout),
        retry_policy=RetryPolicy(maximum_attempts=1),
    )


def _failed(request: EntityRequest, exc: Failed) -> RequestFailed:
    failure = _failure(exc)
    if failure.code is ErrorCode.UNAVAILABLE:
        workflow.logger.warning("a request to %s failed: %s", request.entity_type, _cause(exc))
    return failure


def _cause(exc: Failed) -> BaseException | None:
    return exc.cause if isinstance(exc, ActivityError) else exc


def _failure(exc: Failed) -> RequestFailed:
    cause = _cause(exc)
    if isinstance(cause, ApplicationError) and (code := ErrorCode.named(cause.type)):
        return RequestFailed(code, cause.message)
    if isinstance(cause, TimeoutError):
        return RequestFailed(ErrorCode.UNAVAILABLE, "the entity did not answer in time")
    # Anything else is an internal failure, whose text (a workflow id, a host, a Redis key)
    # must not reach a saga's reason, which clients read; `request_entity` logs it.
    return RequestFailed(ErrorCode.UNAVAILABLE, "the entity could not be reached")
