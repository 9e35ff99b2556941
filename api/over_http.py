"""GraphQL over HTTP, as its specification has it: which methods `/graphql` takes, which
media type answers, and what a request error looks like in each.

- Methods: GET (queries only) and POST. Any other is 405 METHOD_NOT_ALLOWED with `Allow`;
  a mutation sent by GET is 405 too, with `Allow: POST` (raised by the view, which alone
  knows the operation).
- Media types: the client's `Accept` chooses `application/graphql-response+json` or
  `application/json`. Wildcards and a missing header mean `application/json`, as the
  specification asks of servers while clients move over; a header naming neither is 406
  NOT_ACCEPTABLE. A browser asking for HTML on GET gets GraphiQL, where it is served.
- Event streams: a header naming `text/event-stream` asks for the operation's results as
  Server-Sent Events (graphql-sse, distinct connections mode). A request refused before its
  stream is established is answered as JSON all the same, as the JSON type the header also
  names, else as `application/graphql-response+json`, whose request errors are 400. A
  subscription travels only so (or over a WebSocket): sent for one JSON answer, by GET or
  POST, it is a request error, INVALID_INPUT (raised by the view).
- Request errors: a request that fails before execution (a document that does not parse or
  validate, variables that do not coerce, a limit) answered as
  `application/graphql-response+json` has status 400 and no `data` entry; as
  `application/json` it stays 200, which is what older clients expect. `view_status`
  decides, for the view.

The middleware sits outermost on `/graphql`, so every answer behind it, 401, 413 and 429
included, carries the negotiated media type.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import LimitCode
from api.responses import send_error

GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
MEDIA_KEY = "tenure.media_type"
STREAM_KEY = "tenure.event_stream"
METHODS = ("GET", "POST")

_SPECIFIC = 2  # `type/subtype`, above `type/*` (1) and `*/*` (0)


def _ranges(accept: str) -> list[tuple[str, str, float]]:
    """The media ranges of an Accept header: (type, subtype, q), what cannot be read left
    out. A q that is not a number between 0 and 1 counts as 1, as browsers treat it."""
    ranges = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        kind, slash, subtype = media.lower().partition("/")
        if not slash or not kind or not subtype:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 1.0
        ranges.append((kind, subtype, q))
    return ranges


@lru_cache(maxsize=256)
def negotiate(accept: str | None) -> str | None:
    """The media type to answer a request with this Accept header, or None when it accepts
    neither JSON type. Of two types accepted equally, a range naming
    `application/graphql-response+json` exactly wins; a wildcard means `application/json`."""
    if not accept or not accept.strip():
        return JSON
    best: tuple[float, int, bool] | None = None
    chosen: str | None = None
    for media in (GRAPHQL_RESPONSE, JSON):
        kind, _, subtype = media.partition("/")
        match: tuple[int, float] | None = None  # (specificity, q) of the closest range
        for range_kind, range_subtype, q in _ranges(accept):
            if (range_kind, range_subtype) == (kind, subtype):
                specificity = _SPECIFIC
            elif (range_kind, range_subtype) == (kind, "*"):
                specificity = 1
            elif (range_kind, range_subtype) == ("*", "*"):
                specificity = 0
            else:
                continue
            if match is None or specificity > match[0]:
                match = (specificity, q)
        if match is None or match[1] <= 0:
            continue
        specificity, q = match
        rank = (q, specificity, media == JSON or specificity == _SPECIFIC)
        if best is None or rank > best:
            best, chosen = rank, media
    return chosen


@lru_cache(maxsize=256)
def wants_event_stream(accept: str | None) -> bool:
    """Whether a request with this Accept header asks for Server-Sent Events: it names
    `text/event-stream` (not with q=0)."""
    return any(
        (kind, subtype) == ("text", "event-stream") and q > 0
        for kind, subtype, q in _ranges(accept or "")
    )


def is_event_stream(scope: Scope) -> bool:
    """Whether this request is answered, once accepted, as Server-Sent Events."""
    streams: bool = scope.get(STREAM_KEY, False)
    return streams


def media_type_of(scope: Scope) -> str:
    """The media type negotiated for this request (`application/json` outside `/graphql`)."""
    media: str = scope.get(MEDIA_KEY, JSON)
    return media


def view_status(scope: Scope, *, request_error: bool) -> int:
    """The status of a GraphQL response the view rendered: 400 for a request error answered
    as `application/graphql-response+json`, 200 otherwise."""
    return 400 if request_error and media_type_of(scope) == GRAPHQL_RESPONSE else 200


def _wants_ide_page(scope: Scope, headers: Headers) -> bool:
    return scope["method"] == "GET" and "text/html" in headers.get("accept", "")


class GraphQLOverHTTP:
    """ASGI middleware for `/graphql`: refuses other methods and unacceptable media types,
    and labels every response with the negotiated media type."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if scope["method"] not in METHODS:
            await send_error(
                send,
                405,
                LimitCode.METHOD_NOT_ALLOWED,
                "/graphql takes GET (queries) and POST",
                [(b"allow", b"GET, POST")],
            )
            return
        headers = Headers(scope=scope)
        accept = headers.get("accept")
        media = negotiate(accept)
        streams = wants_event_stream(accept)
        if media is None and not streams and not _wants_ide_page(scope, headers):
            await send_error(
                send,
                406,
                LimitCode.NOT_ACCEPTABLE,
                f"this API answers {GRAPHQL_RESPONSE}, {JSON} or {EVENT_STREAM}; "
                "the Accept header names none of them",
            )
            return
        scope[STREAM_KEY] = streams
        media = media or (GRAPHQL_RESPONSE if streams else JSON)
        scope[MEDIA_KEY] = media

        labelled = f"{media}; charset=utf-8".encode("latin-1")

        async def send_labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = _labelled(message.get("headers", ()), labelled)
            await send(message)

        await self._app(scope, receive, send_labelled)


_JSON = JSON.encode("latin-1")


def _labelled(headers: Iterable[tuple[bytes, bytes]], labelled: bytes) -> list[tuple[bytes, bytes]]:
    """A response's headers with a JSON content type named as negotiated, and Accept added to
    what it varies by (one `vary` header, where the first one was)."""
    out: list[tuple[bytes, bytes]] = []
    vary: list[bytes] = []
    vary_at = -1
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-type" and value.startswith(_JSON):
            value = labelled
        elif lower == b"vary":
            vary.append(value)
            if vary_at < 0:
                vary_at = len(out)
                out.append((b"vary", b""))
            continue
        out.append((name, value))
    vary.append(b"Accept")
    if vary_at < 0:
        out.append((b"vary", b"Accept"))
    else:
        out[vary_at] = (b"vary", b", ".join(vary))
    return out


class EventStreamsTo:
    """ASGI dispatcher, innermost on `/graphql`: a request for Server-Sent Events goes to
    `streams` (the GraphQL view), any other to `app`. Rendered-read replay (api/cached_reads.py)
    keeps JSON answers only, so an event stream must go past it."""

    def __init__(self, streams: ASGIApp, app: ASGIApp) -> None:
        self._streams = streams
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chosen = self._streams if is_event_stream(scope) else self._app
        await chosen(scope, receive, send)
