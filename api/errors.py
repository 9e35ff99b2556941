"""Turning failures into GraphQL errors with stable codes; internals never reach a client."""

from __future__ import annotations

import logging
from typing import Any

from graphql import GraphQLError

from entities.errors import ErrorCode, TenureError

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "Internal error; it has been logged."


def _tenure_error(error: GraphQLError) -> TenureError | None:
    cause: BaseException | None = error.original_error
    while cause is not None:
        if isinstance(cause, TenureError):
            return cause
        cause = cause.__cause__ or (
            cause.original_error if isinstance(cause, GraphQLError) else None
        )
    return None


def present_error(error: GraphQLError) -> dict[str, Any]:
    """The client's view of one error: a message and `extensions.code`."""
    presented: dict[str, Any] = {"message": error.message}
    if error.locations:
        presented["locations"] = [
            {"line": loc.line, "column": loc.column} for loc in error.locations
        ]
    if error.path:
        presented["path"] = error.path
    known = _tenure_error(error)
    if known is not None:
        presented["message"] = known.message
        code = known.code
    elif error.original_error is None or error.path is None:
        # Parse, validation and variable errors: the client sent something we cannot run.
        code = ErrorCode.INVALID_INPUT
    else:
        log.error("internal error in %s", error.path, exc_info=error.original_error)
        presented["message"] = INTERNAL_MESSAGE
        code = ErrorCode.INTERNAL
    presented["extensions"] = {"code": code.value}
    return presented


def is_expected(error: GraphQLError) -> bool:
    """Errors the client caused or the domain refused: reported to the client, not logged."""
    return _tenure_error(error) is not None or error.original_error is None
