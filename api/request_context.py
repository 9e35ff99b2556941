"""The request in hand as operators see it: its id, who sent it, what it asked, how it ended.

`ObservedRequests`, outermost on `/graphql`, gives each request an id: the client's
`X-Request-Id` when it is a sane one (1 to 128 letters, digits, '.', '_', ':' or '-'), else
a new one, returned in the response's `X-Request-Id` either way. The id is bound in
structlog's context variables, and so are the caller (`api/authentication.py`) and, for a
command, its entity, name and id (`api/common.py`, `api/gateway.py`): every log line the
request causes carries them. What became of the request (the operation's name once read, the
first error's code, whether it was refused before anything ran) is noted on its
`RequestRecord` where it is learnt; once it is answered, the request is counted and timed
(`api/metrics.py`), and logged in one line at debug level.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import structlog
from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import SchemaExtension

from api.metrics import OK, UNKNOWN, ApiMetrics
from entities.errors import ErrorCode

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

log = structlog.stdlib.get_logger("api.requests")
_level = logging.getLogger("api.requests")
# Request ids need to be unique, not secret: 128 random bits without a system call each.
_ids = random.Random()


@dataclass(slots=True)
class RequestRecord:
    """What is known of one request so far."""

    request_id: str
    operation_read: bool = False
    operation: str | None = None
    code: str = OK
    refused: bool = False


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("tenure_request", default=None)


def note_operation(name: str | None) -> None:
    """The request's operation has been read: named `name`, or anonymous (None)."""
    record = _CURRENT.get()
    if record is not None:
        record.operation_read, record.operation = True, name


def note_outcome(code: str, *, refused: bool = False) -> None:
    """The request ended with an error coded `code`; `refused` when it was refused before
    anything ran. The first noted stands."""
    record = _CURRENT.get()
    if record is not None and record.code == OK:
        record.code, record.refused = str(code), refused


def note_refusal(code: str) -> None:
    """The request was refused before GraphQL ran it (401, 413, 429, a request limit...)."""
    note_outcome(code, refused=True)


class OperationName(SchemaExtension):
    """Notes the operation's name once Strawberry knows it: the one the request gave, else
    that of the document's only operation."""

    def on_operation(self) -> Iterator[None]:
        try:
            yield
        finally:
            note_operation(self.execution_context.operation_name)


class ObservedRequests:
    """ASGI middleware, outermost on `/graphql`: each request's id, log context, count,
    time and, at debug level, its one-line log."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        record = RequestRecord(_request_id(scope))
        token = _CURRENT.set(record)
        structlog.contextvars.bind_contextvars(request_id=record.request_id)
        id_header = (REQUEST_ID_HEADER, record.request_id.encode())
        status = 0
        streamed = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, streamed
            if message["type"] == "http.response.start":
                status = message["status"]
                streamed = _is_event_stream(message)
                message["headers"] = [*message.get("headers", ()), id_header]
                self._describe_span(record)
            await send(message)

        started = time.perf_counter()
        try:
            await self._app(scope, receive, send_with_id)
        except Exception:
            note_outcome(ErrorCode.INTERNAL)
            status = status or 500
            raise
        finally:
            seconds = time.perf_counter() - started
            metrics = self._metrics
            operation = metrics.operations(record.operation) if record.operation_read else UNKNOWN
            # A subscription's event stream lasts as long as its subscriber stays: counted,
            # but kept out of the request durations, which it would swamp.
            metrics.observe_request(
                operation, record.code, None if streamed else seconds, refused=record.refused
            )
            if _level.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request",
                    method=scope["method"],
                    status=status,
                    operation=operation,
                    code=record.code,
                    duration_ms=round(seconds * 1000, 3),
                )
            # Each request runs in a task of its own under a server; not so under a test
            # transport, where the next request must not inherit this one's caller.
            structlog.contextvars.clear_contextvars()
            _CURRENT.reset(token)

    def _describe_span(self, record: RequestRecord) -> None:
        """Name the request's operation, outcome and id on its trace's server span (which
        ends with the response's last bytes)."""
        span = trace.get_current_span()
        if span.is_recording():
            if record.operation_read:
                operation = self._metrics.operations(record.operation)
                span.set_attribute("graphql.operation.name", operation)
            span.set_attribute("tenure.code", record.code)
            span.set_attribute("tenure.request_id", record.request_id)


def _is_event_stream(start: Message) -> bool:
    """Whether a response start begins Server-Sent Events."""
    return any(
        name.lower() == b"content-type" and value.startswith(b"text/event-stream")
        for name, value in start.get("headers", ())
    )


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it is sane, else a new id."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            given: str = value.decode("latin-1")
            if REQUEST_ID.fullmatch(given):
                return given
            break
    return format(_ids.getrandbits(128), "032x")
