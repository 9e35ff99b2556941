"""Temporal's and Redis's failures as a client meets them: Tenure's codes, with nothing of
the cause (a host, a key) in the message."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from entities.errors import ErrorCode
from workers.failures import is_missing, redis_unavailable, refusal, unavailable


def test_a_refusal_carried_back_by_an_update_keeps_its_code_and_message() -> None:
    refused = ApplicationError("checkout c-1 is COMPLETED", type="INVALID_TRANSITION")
    error = refusal(WorkflowUpdateFailedError(refused))
    assert error is not None
    assert (error.code, error.message) == (ErrorCode.INVALID_TRANSITION, refused.message)


def test_a_failure_that_names_no_code_is_no_refusal() -> None:
    assert refusal(WorkflowUpdateFailedError(ApplicationError("boom", type="KeyError"))) is None
    assert refusal(WorkflowUpdateFailedError(RuntimeError("boom"))) is None
    assert refusal(ApplicationError("boom")) is None


def test_temporal_and_redis_out_of_reach_are_unavailable_and_tell_nothing_of_where() -> None:
    temporal = unavailable(
        RPCError("connect 10.0.0.7:7233 refused", RPCStatusCode.UNAVAILABLE, b"")
    )
    redis = redis_unavailable("the change stream", RedisConnectionError("10.0.0.9:6379 down"))
    assert (temporal.code, redis.code) == (ErrorCode.UNAVAILABLE, ErrorCode.UNAVAILABLE)
    assert "10.0.0" not in temporal.message + redis.message
    assert redis.message == "the change stream is unavailable; try again"


def test_only_not_found_is_missing() -> None:
    assert is_missing(RPCError("no such workflow", RPCStatusCode.NOT_FOUND, b""))
    assert not is_missing(RPCError("busy", RPCStatusCode.RESOURCE_EXHAUSTED, b""))
