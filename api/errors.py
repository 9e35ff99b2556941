"""Turning failures into GraphQL errors with stable codes; internals never reach a client."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from enum import StrEnum
from typing import Any, TypeVar

from graphql import GraphQLError
from starlette.responses import JSONResponse

from api.request_context import note_refusal
from entities.errors import ErrorCode, TenureError

log = logging.getLogger(__name__)
T = TypeVar("T")

INTERNAL_MESSAGE = "Internal error; it has been logged."


class LimitCode(StrEnum):
    """Codes of requests refused before anything runs: over a limit, or not a request that
    `/graphql` takes (a batch, another method, a media type it cannot answer with)."""

    QUERY_TOO_DEEP = "QUERY_TOO_DEEP"
    TOO_MANY_ALIASES = "TOO_MANY_ALIASES"
    TOO_MANY_TOKENS = "TOO_MANY_TOKENS"
    TOO_MANY_FIELDS = "TOO_MANY_FIELDS"
    DOCUMENT_TOO_LARGE = "DOCUMENT_TOO_LARGE"
    TOO_MANY_DIRECTIVES = "TOO_MANY_DIRECTIVES"
    TOO_MANY_ROOT_FIELDS = "TOO_MANY_ROOT_FIELDS"
    TOO_MANY_LIVE_READS = "TOO_MANY_LIVE_READS"
    TOO_MANY_MUTATIONS = "TOO_MANY_MUTATIONS"
    RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    BATCH_NOT_SUPPORTED = "BATCH_NOT_SUPPORTED"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_ACCEPTABLE = "NOT_ACCEPTABLE"


class TooManyQueries(Exception):
    """A request asked Temporal more often than it may (each LIVE read, and each CACHED
    read the cache cannot answer, is a query): TOO_MANY_LIVE_READS on the field that would
    have asked once more."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this request has made the {limit} queries to entities a request may make "
            "(LIVE reads, and reads the cache could not answer)"
        )
        self.message = str(self)


def over_limit(code: LimitCode, message: str) -> GraphQLError:
    """A GraphQL error refusing a document over a limit; `present_error` keeps its code."""
    return GraphQLError(message, extensions={"code": code.value})


class RequestRefused(Exception):
    """A request refused before GraphQL sees it, answered with an HTTP status and a code."""

    def __init__(
        self,
        status: int,
        code: ErrorCode | LimitCode,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        note_refusal(self.code)
        body = {"errors": [{"message": self.message, "extensions": {"code": self.code.value}}]}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _tenure_error(error: GraphQLError) -> TenureError | None:
    cause: BaseException | None = error.original_error
    while cause is not None:
        if isinstance(cause, TenureError):
            return cause
        cause = cause.__cause__ or (
            cause.original_error if isinstance(cause, GraphQLError) else None
        )
    return None


def _limit_code(error: GraphQLError) -> LimitCode | None:
    code = (error.extensions or {}).get("code")
    if error.original_error is not None or not isinstance(code, str):
        return None
    try:
        return LimitCode(code)
    except ValueError:
        return None


MAX_MESSAGE = 1_000
"""Characters of an error's message a client is sent; the rest is cut, marked `…`."""


def present_error(error: GraphQLError, *, suggestions: bool = True) -> dict[str, Any]:
    """The client's view of one error: a message and `extensions.code`. Without
    `suggestions`, validation messages do not suggest names ("Did you mean 'account'?"),
    which would give away the schema that disabled introspection keeps to itself."""
    presented: dict[str, Any] = {"message": error.message}
    if error.locations:
        presented["locations"] = [
            {"line": loc.line, "column": loc.column} for loc in error.locations
        ]
    if error.path:
        presented["path"] = error.path
    known = _tenure_error(error)
    limit = _limit_code(error)
    code: ErrorCode | LimitCode
    if isinstance(error.original_error, TooManyQueries):
        presented["message"] = error.original_error.message
        code = LimitCode.TOO_MANY_LIVE_READS
    elif known is not None:
        presented["message"] = known.message
        code = known.code
    elif limit is not None:
        code = limit
    elif error.original_error is None or error.path is None:
        # Parse, validation and variable errors: the client sent something we cannot run.
        code = ErrorCode.INVALID_INPUT
        if not suggestions:
            presented["message"] = error.message.split(" Did you mean", 1)[0]
    else:
        log.error("internal error in %s", error.path, exc_info=error.original_error)
        presented["message"] = INTERNAL_MESSAGE
        code = ErrorCode.INTERNAL
    if len(presented["message"]) > MAX_MESSAGE:
        # graphql-core repeats a literal it refuses, indented: two deep lists of a few
        # hundred bytes came back as 42 KB of message.
        presented["message"] = presented["message"][: MAX_MESSAGE - 1] + "…"
    presented["extensions"] = {"code": code.value}
    return presented


def is_expected(error: GraphQLError) -> bool:
    """Errors the client caused or the domain refused: reported to the client, not logged.
    Only a resolver's error has a path; one without came from the request itself (a
    variable that does not coerce wraps the enum's KeyError, say)."""
    return (
        _tenure_error(error) is not None
        or error.original_error is None
        or error.path is None
        or isinstance(error.original_error, TooManyQueries)
    )


async def coded_stream(events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """A subscription's events, an error raised while they run made INTERNAL and logged
    unless it is Tenure's own. An error in a running subscription has no path, and
    `present_error` took it for the request's: INVALID_INPUT, with Temporal's or Redis's
    own words, and nothing logged."""
    async with contextlib.aclosing(events) as running:
        try:
            async for event in running:
                yield event
        except TenureError:
            raise
        except Exception as exc:
            log.error("internal error in a subscription", exc_info=exc)
            raise TenureError(ErrorCode.INTERNAL, INTERNAL_MESSAGE) from exc
