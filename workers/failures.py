"""Where Temporal's and Redis's failures become Tenure's codes.

A client meets the same trouble as the same code and the same kind of message, wherever it
met it: Temporal out of reach is UNAVAILABLE, Redis down is UNAVAILABLE naming what could
not be read, and an entity's or a saga's refusal carried back by Temporal is the refusal's
own code. The cause (a host, a key, a workflow id) is logged, never shown.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisClusterException, RedisError
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from entities.errors import ErrorCode, TenureError

log = logging.getLogger(__name__)

REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
"""What a call to Redis raises when Redis cannot serve it: redis-py's errors, a socket's, and
a Redis Cluster with no node in reach (`RedisClusterUnreachableError`, which is not a
`RedisError`: caught as one, it went out of a cached read as an HTTP 500). Every Redis call
catches these, never `RedisError` alone (ruff bans the name outside this module)."""


def unavailable(exc: RPCError) -> TenureError:
    """Temporal did not answer, or refused for want of capacity."""
    log.warning("temporal unavailable: %s", exc)
    return TenureError(ErrorCode.UNAVAILABLE, "the entity service is unavailable; try again")


_MAY_HAVE_TAKEN_IT = frozenset(
    {
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.UNKNOWN,
    }
)


def may_have_taken_it(exc: RPCError) -> bool:
    """Whether Temporal may have done what it was asked before this answer (no answer in
    time, a connection lost): not a refusal of it."""
    return exc.status in _MAY_HAVE_TAKEN_IT


def is_missing(exc: RPCError) -> bool:
    """Temporal has no such workflow (it never ran, or retention removed it); not a
    namespace it does not know, which it answers NOT_FOUND too (`namespace_missing`)."""
    return exc.status is RPCStatusCode.NOT_FOUND and not namespace_missing(exc)


def namespace_missing(exc: RPCError) -> bool:
    """Temporal does not know the namespace asked for (TEMPORAL_NAMESPACE mistyped): every
    workflow would read as missing, and an operator was told "no account ada"."""
    return exc.status is RPCStatusCode.NOT_FOUND and any(
        detail.type_url.endswith(".NamespaceNotFoundFailure") for detail in exc.grpc_status.details
    )


def redis_unavailable(what: str, exc: BaseException) -> TenureError:
    """Redis did not answer when reading or writing `what` (`the webhook registry`)."""
    log.warning("redis unavailable for %s: %s", what, exc)
    return TenureError(ErrorCode.UNAVAILABLE, f"{what} is unavailable; try again")


def refusal(exc: BaseException) -> TenureError | None:
    """The refusal a workflow sent back (an update's or an activity's ApplicationError
    whose type is one of Tenure's codes), or None when `exc` carries none."""
    cause: BaseException | None = exc
    if isinstance(exc, WorkflowUpdateFailedError | ActivityError):
        cause = exc.cause
    if isinstance(cause, ApplicationError):
        code = ErrorCode.named(cause.type)
        if code is not None:
            return TenureError(code, cause.message)
    return None
