"""How subscriptions travel: over graphql-transport-ws (`CodedErrorsOverWebSocket`) and as
Server-Sent Events (`EventStream`, graphql-sse), each result's errors coded as the HTTP
answers present them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, cast

from graphql import GraphQLError
from graphql.error import GraphQLFormattedError
from starlette.types import Scope
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import NonJsonMessageReceived
from strawberry.schema import BaseSchema
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    Message,
    SubscribeMessage,
)
from strawberry.types.execution import ExecutionResult, PreExecutionError
from strawberry.utils.aio import aclosing

from api.authentication import TokenStanding, token_standing
from api.context import TenureContext
from api.errors import LimitCode, RequestRefused, over_limit, present_error
from api.rate_limits import LIMITER_KEY, RateLimiter, retry_after_seconds, too_many_requests
from api.subscriptions import ESTABLISHED_KEY
from entities.errors import ErrorCode, TenureError

_END = object()  # after an event stream's last result


async def _refused(result: PreExecutionError) -> AsyncGenerator[Any, None]:
    """An operation refused before it runs, as the WebSocket handler expects one."""
    yield result


class _CodedStreams:
    """The schema as a WebSocket handler uses it, with each result's errors as the HTTP
    answers present them (`extensions.code`), which the handler would send bare."""

    def __init__(
        self, schema: BaseSchema, suggestions: bool, limiter: RateLimiter | None = None
    ) -> None:
        self._schema = schema
        self._suggestions = suggestions
        self._limiter = limiter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._schema, name)

    async def stream(self, *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context_value")
        if self._limiter is not None and isinstance(context, TenureContext):
            # Each operation on the socket pays its token at the door, as a request does.
            wait_ms = await self._limiter.wait_ms(context.principal)
            if wait_ms:
                error = over_limit(
                    LimitCode.RATE_LIMITED, too_many_requests(retry_after_seconds(wait_ms))
                )
                return self._coded(_refused(PreExecutionError(data=None, errors=[error])))
            context.request.scope[LIMITER_KEY] = self._limiter
        results = await self._schema.stream(*args, **kwargs)
        if isinstance(results, ExecutionResult):
            self._code(results)
            return results
        return self._coded(results)

    async def _coded(self, results: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        async with aclosing(results):
            try:
                async for result in results:
                    if isinstance(result, ExecutionResult):
                        self._code(result)
                    yield result
            except GraphQLError as error:
                # Strawberry lets an error raised while parsing (a document that does not
                # parse, or is over a limit) escape the stream, and the handler would end the
                # operation with a bare `complete`: it is the operation's refusal.
                refused = PreExecutionError(data=None, errors=[error])
                self._code(refused)
                yield refused

    def _code(self, result: ExecutionResult) -> None:
        if not result.errors:
            return
        coded = []
        for error in result.errors:
            shown = present_error(error, suggestions=self._suggestions)
            coded.append(
                GraphQLError(
                    shown["message"],
                    error.nodes,
                    error.source,
                    error.positions,
                    error.path,
                    None,
                    shown["extensions"],
                )
            )
        result.errors = coded


def _malformed(message: object) -> str | None:
    """Why `message` is no graphql-transport-ws message, or None when it is one. Strawberry
    reads a message's fields on trust: one of the wrong type raised out of its reader and
    dropped the connection with no close frame."""
    if not isinstance(message, dict):
        return "a message is a JSON object"
    kind = message.get("type")
    if kind in ("subscribe", "complete") and not (
        isinstance(message.get("id"), str) and message["id"]
    ):
        return f"a {kind} message's id is a non-empty string"
    if kind != "subscribe":
        return None
    payload = message.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
        return "a subscribe message's payload is an object with a query string"
    if not isinstance(payload.get("variables"), dict | None):
        return "a subscribe message's variables are an object"
    if not isinstance(payload.get("operationName"), str | None):
        return "a subscribe message's operationName is a string"
    return None


class JsonFrames(ASGIWebSocketAdapter):
    """Strawberry's WebSocket adapter, to which a frame the view's JSON reading refuses
    (`api.limits.decode_json`: nested past the stack, not an object...) is no JSON, as one
    `json` cannot read is: the socket is closed with 4400, not dropped. A connection refused
    for a limit at its `connection_init` (`TenureGraphQL.admit_connection`) is closed with
    4429, the protocol's "too many", and why, where Strawberry would say 4403 Forbidden."""

    def refusal(self) -> str | None:
        """Why the connection was refused for a limit; set by the handler."""
        return None

    async def close(self, code: int, reason: str) -> None:
        refused = self.refusal() if code == 4403 else None
        if refused is not None:
            code, reason = 4429, refused[:120]
        await super().close(code, reason)

    async def iter_json(
        self, *, ignore_parsing_errors: bool = False
    ) -> AsyncGenerator[object, None]:
        frames = super().iter_json(ignore_parsing_errors=ignore_parsing_errors)
        async with aclosing(frames):
            try:
                async for frame in frames:
                    yield frame
            except RequestRefused as exc:
                raise NonJsonMessageReceived from exc


MAX_CLOSE_REASON = 123
"""The most bytes a WebSocket close frame's reason may carry (RFC 6455)."""


class CodedErrorsOverWebSocket(BaseGraphQLTransportWSHandler[TenureContext, None]):
    """graphql-transport-ws with Tenure's error codes on every error it sends, and a close
    with 4400 (the protocol's invalid message) for whatever message is malformed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.websocket, JsonFrames):
            self.websocket.refusal = self._refusal  # type: ignore[method-assign]
        suggestions = getattr(self.view, "suggestions", True)
        limiter = getattr(self.view, "rate_limiter", None)
        self.schema = _CodedStreams(self.schema, suggestions, limiter)  # type: ignore[assignment]
        self._expiry: asyncio.Task[None] | None = None
        self._expired = False

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        await super().handle_connection_init(message)
        token = self.context.token
        # The token is good while it is accepted (until its expiry, or its key is
        # withdrawn), not for as long as the socket stays open.
        lapses = token is not None and token.lapses()
        if self.connection_acknowledged and token is not None and lapses and self._expiry is None:
            self._expiry = asyncio.create_task(self._close_when(token), name="tenure-ws-expiry")

    def _refusal(self) -> str | None:
        """Why `on_ws_connect` refused the connection for a limit, if it did."""
        context = self.context
        return context.connection_refused if isinstance(context, TenureContext) else None

    async def _close_when(self, token: TokenStanding) -> None:
        await self._close_refused(await token.until_refused())

    async def _close_refused(self, why: str = "the token has expired") -> None:
        """Close with 4403, graphql-transport-ws's Forbidden: every operation ends with it,
        and the client must connect again with a new token. Once: a message the client sent
        before it had the close frame still comes in after it."""
        if self._expired:
            return
        self._expired = True
        for operation in self.operations.values():  # nothing more is sent on it; `shutdown`
            if operation.task is not None:  # awaits them
                operation.task.cancel()
        reason = f"Forbidden: {why}".encode()[:MAX_CLOSE_REASON].decode(errors="ignore")
        with contextlib.suppress(Exception):  # closed meanwhile, or the client gone
            await self.websocket.close(code=4403, reason=reason)

    async def shutdown(self) -> None:
        try:
            if self._expiry is not None:
                self._expiry.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._expiry
        finally:
            try:
                await super().shutdown()
            finally:
                closed = getattr(self.view, "connection_closed", None)
                if closed is not None and isinstance(self.context, TenureContext):
                    closed(self.context)

    async def handle_message(self, message: Message) -> None:
        if self._expired:
            return  # closed for its token: what the client sent before it knew is not read
        wrong = _malformed(message)
        if wrong is not None:
            await self.handle_invalid_message(f"Invalid message: {wrong}")
            return
        await super().handle_message(message)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        token = self.context.token
        if self._expired or (token is not None and token.expired()):
            await self._close_refused()  # nothing runs on a token past its time
            return
        limit = self.max_subscriptions_per_connection
        # Strawberry refuses an unacknowledged or repeated subscribe (closing the socket)
        # before it counts operations; its refusal of one too many has no code.
        if (
            limit is not None
            and self.connection_acknowledged
            and message["id"] not in self.operations
            and len(self.operations) >= limit
        ):
            reached = TenureError(
                ErrorCode.LIMIT_REACHED, f"at most {limit} operations at once on one connection"
            )
            error = present_error(GraphQLError(reached.message, original_error=reached))
            payload = [cast(GraphQLFormattedError, error)]
            await self.send_message({"id": message["id"], "type": "error", "payload": payload})
            return
        await super().handle_subscribe(message)


class EventStream:
    """An operation's results for Server-Sent Events (graphql-sse), read by a task of its own
    from the moment it is opened, so that the answer can wait until the subscription is
    established: whatever refuses it before then (FORBIDDEN, a limit, an invalid document)
    is answered as a query's refusal is, in JSON with its status, not as a stream. The
    task holds at most one result the client has not read; `aclose` ends it, and with it
    the subscription, whether or not the stream was ever sent."""

    def __init__(self, results: AsyncGenerator[Any, None], scope: Scope) -> None:
        self._ready = asyncio.Event()
        scope[ESTABLISHED_KEY] = self._ready
        self._pending: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._held: list[Any] = []
        token = token_standing(scope)
        self._reader = asyncio.create_task(self._read(results, token), name="tenure-event-stream")

    async def _read(self, results: AsyncGenerator[Any, None], token: TokenStanding | None) -> None:
        loop = asyncio.get_running_loop()
        # The token is good while it is accepted: the stream ends then, saying why.
        until = asyncio.timeout(None)
        why: list[str] = []

        async def refused() -> None:
            why.append(await token.until_refused() if token is not None else "")
            with contextlib.suppress(RuntimeError):  # the stream ended meanwhile
                until.reschedule(loop.time())

        watcher: asyncio.Task[None] | None = None
        try:
            async with aclosing(results), until:
                if token is not None and token.lapses():
                    watcher = asyncio.create_task(refused(), name="tenure-event-stream-token")
                async for result in results:
                    await self._pending.put(result)
                    self._ready.set()  # a query's one result: nothing else says it
        except Exception as exc:
            # Strawberry yields a resolver's error as a result, but lets one raised while
            # parsing (a document over a limit) escape: it is a result all the same.
            if isinstance(exc, TimeoutError) and until.expired():
                exc = TenureError(
                    ErrorCode.UNAUTHENTICATED, f"{why[0]}: subscribe again with a new one"
                )
            error = (
                exc if isinstance(exc, GraphQLError) else GraphQLError(str(exc), original_error=exc)
            )
            await self._pending.put(ExecutionResult(data=None, errors=[error]))
        finally:
            if watcher is not None:
                watcher.cancel()
        self._ready.set()
        await self._pending.put(_END)

    async def refusal(self) -> ExecutionResult | None:
        """Once the subscription is established or the first result is in: that result if
        it refuses the operation (errors and no data), the stream then closed; else None."""
        await self._ready.wait()
        if self._pending.empty():
            return None
        first = self._pending.get_nowait()
        if isinstance(first, ExecutionResult) and first.data is None and first.errors:
            await self.aclose()
            return first
        self._held.append(first)
        return None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        item = self._held.pop() if self._held else await self._pending.get()
        if item is _END:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
