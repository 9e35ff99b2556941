"""The Starlette application: its lifespan owns the Temporal and Redis clients; every
response carries the standard security headers, and browsers may call it cross-origin only
from the configured origins."""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from typing import Any

import orjson
from cross_web import HTTPException
from graphql import ExecutionResult, GraphQLError
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData, GraphQLRequestProtocol
from strawberry.http.streaming import SSETransport
from strawberry.schema import BaseSchema
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions import GRAPHQL_SSE_PROTOCOL, GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult as StrawberryExecutionResult
from strawberry.types import SubscriptionExecutionResult
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UnsetType
from temporalio.client import Client

from api.admin import admin_console
from api.auth import TokenVerifier, Unauthenticated
from api.authentication import (
    Authentication,
    principal_of,
    token_standing,
    websocket_principal,
)
from api.authorization import Authorizer
from api.cached_reads import CachedReadResponses
from api.change_feed import ChangeFeed
from api.context import TenureContext
from api.errors import LimitCode, RequestRefused, present_error
from api.gateway import EntityGateway
from api.limits import BodyLimit, DocumentLimits, decode_json
from api.metrics import ApiMetrics
from api.over_http import EventStreamsTo, GraphQLOverHTTP, view_status, wants_event_stream
from api.prefetched_reads import SCOPE_KEY
from api.rate_limits import RETRY_AFTER_KEY, Limit, RateLimiter, RateLimits
from api.request_context import ObservedRequests, note_outcome
from api.response_size import ResponseSize
from api.schema import build_schema, introspection_enabled
from api.transports import CodedErrorsOverWebSocket, EventStream, JsonFrames
from api.webhooks import webhook_endpoint
from entities.errors import ErrorCode
from entities.runtime.policy import NOBODY, Role
from workers.cache import SnapshotCache, connect_redis
from workers.health import Readiness, health_routes
from workers.settings import Settings
from workers.temporal import answers, connect_temporal

log = logging.getLogger(__name__)

_STATUS_KEY = "tenure.view_status"
_EVENT_STREAM_KEY = "tenure.opened_event_stream"
_LIMIT_CODES = frozenset(code.value for code in LimitCode)
# Probes and scrapes are no requests worth a trace.
_UNTRACED = "/livez,/healthz,/readyz,/metrics"


class _EventStreams(SSETransport):
    """graphql-sse for the requests `/graphql`'s HTTP front took for event streams. A ping
    opens each stream, so a client learns at once that its subscription is established:
    one with nothing to send yet waited for the first heartbeat, 15 s, for any answer."""

    send_initial_heartbeat = True

    def accepts(self, accept: str) -> bool:
        return wants_event_stream(accept)


def _mutation_by_get() -> RequestRefused:
    return RequestRefused(
        405, LimitCode.METHOD_NOT_ALLOWED, "a mutation is sent by POST", headers={"allow": "POST"}
    )


def _subscription_not_streamed() -> StrawberryExecutionResult:
    """The answer to a subscription sent as a query would be: a request error (400 as
    `application/graphql-response+json`, 200 with null data as `application/json`, as
    graphql-http answers one) naming the transports that carry subscriptions."""
    message = (
        "a subscription's results are sent as Server-Sent Events (ask with "
        "`Accept: text/event-stream`) or over a WebSocket speaking graphql-transport-ws, "
        "not in one response"
    )
    return StrawberryExecutionResult(data=None, errors=[GraphQLError(message)])


class TenureGraphQL(GraphQL[TenureContext, None]):
    """Strawberry's ASGI view with Tenure's context and error presentation: a request it
    refuses is answered with a GraphQL error and a code, as a query's errors are. Over
    Server-Sent Events too: a stream is answered once its subscription is established
    (`EventStream`), so one refused before then is answered as a query would be."""

    rate_limiter: RateLimiter | None = None
    """Set once the app has one: operations over a WebSocket pay at its door too, and so
    does its `connection_init`."""
    connections_per_customer: int | None = None
    """WebSockets one customer may hold open at once; None: no bound."""

    graphql_transport_ws_handler_class = CodedErrorsOverWebSocket
    websocket_adapter_class = JsonFrames
    stream_transport_classes_by_protocol = {GRAPHQL_SSE_PROTOCOL: _EventStreams}

    def __init__(
        self,
        schema: BaseSchema,
        *,
        graphiql: bool,
        suggestions: bool,
        verifier: TokenVerifier | None = None,
        subscriptions_per_connection: int = 20,
        allowed_origins: list[str] | None = None,
    ) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql" if graphiql else None,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_SSE_PROTOCOL),
            max_subscriptions_per_connection=subscriptions_per_connection,
            connection_init_wait_timeout=timedelta(seconds=10),
            allowed_origins=allowed_origins or (),
        )
        self._suggestions = suggestions
        self._verifier = verifier
        self._connections: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            try:
                response = await self.run(Request(scope, receive))
                response.status_code = scope.get(_STATUS_KEY, response.status_code)
                if response.status_code == 429 and RETRY_AFTER_KEY in scope:
                    response.headers["retry-after"] = str(scope[RETRY_AFTER_KEY])
            except RequestRefused as refused:
                response = refused.response()
            except HTTPException as exc:  # Strawberry's own refusals, plain text otherwise
                code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_INPUT
                response = RequestRefused(exc.status_code, code, exc.reason).response()
            await response(scope, receive, send)
        finally:
            # However the answer ended (the client went away, even before it started), its
            # subscription ends with it.
            stream: EventStream | None = scope.pop(_EVENT_STREAM_KEY, None)
            if stream is not None:
                await stream.aclose()

    async def execute_operation(
        self,
        request: Request,
        request_adapter: Any,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: TenureContext,
        root_value: None,
        sub_response: Response,
    ) -> StrawberryExecutionResult | list[StrawberryExecutionResult] | SubscriptionExecutionResult:
        result = await super().execute_operation(
            request=request,
            request_adapter=request_adapter,
            request_data=request_data,
            context=context,
            root_value=root_value,
            sub_response=sub_response,
        )
        if not isinstance(result, SubscriptionExecutionResult):
            return result
        stream = request.scope[_EVENT_STREAM_KEY] = EventStream(result, request.scope)  # type: ignore[arg-type]
        refused = await stream.refusal()
        if refused is None:
            return stream
        for error in refused.errors or ():
            if isinstance(error.original_error, InvalidOperationTypeError):
                raise _mutation_by_get() from error.original_error
        return refused

    async def execute_single(
        self,
        request: Request,
        request_adapter: Any,
        sub_response: Response,
        context: TenureContext,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> StrawberryExecutionResult:
        # Strawberry takes a subscription by plain GET or POST too (for its multipart
        # protocol, which Tenure does not serve): its resolver would run as a field's.
        allowed = OperationType.from_http(request_adapter.method) - {OperationType.SUBSCRIPTION}
        try:
            return await self.schema.execute(
                request_data.query,
                root_value=root_value,
                variable_values=request_data.variables,
                context_value=context,
                operation_name=request_data.operation_name,
                allowed_operation_types=allowed,
                operation_extensions=request_data.extensions,
            )
        except InvalidOperationTypeError as exc:
            if exc.operation_type is OperationType.SUBSCRIPTION:
                return _subscription_not_streamed()
            raise _mutation_by_get() from exc
        except CannotGetOperationTypeError as exc:
            if not isinstance(request_data.operation_name, str):  # not even a name: malformed
                raise HTTPException(400, exc.as_http_error_reason()) from exc
            # A name the document does not have: a request error like any other (400 as
            # graphql-response+json, 200 with null data as application/json).
            return StrawberryExecutionResult(
                data=None, errors=[GraphQLError(exc.as_http_error_reason())]
            )
        except MissingQueryError as exc:
            raise HTTPException(400, "No GraphQL query found in the request") from exc

    def decode_json(self, data: str | bytes) -> object:
        return decode_json(data)

    def encode_json(self, data: object) -> str:
        """Every answer's JSON, HTTP, SSE and WebSocket alike, by orjson: a large answer (12
        carts of 100 lines) encodes in a tenth of the time json.dumps takes, in one piece
        on the event loop. Text, not bytes: a graphql-transport-ws frame must be text."""
        try:
            return orjson.dumps(data).decode()
        except (orjson.JSONEncodeError, TypeError):  # an integer past 64 bits, say
            return json.dumps(data, separators=(",", ":"))

    def _validate_batch_request(
        self, request_data: list[GraphQLRequestData], protocol: GraphQLRequestProtocol
    ) -> None:
        raise RequestRefused(
            400, LimitCode.BATCH_NOT_SUPPORTED, "send one GraphQL request, not an array of them"
        )

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket | None = None
    ) -> TenureContext:
        # Only the GraphiQL page comes in unauthenticated, and it runs nothing: even so its
        # context holds a caller with no rights at all.
        principal = principal_of(request.scope) or NOBODY
        return TenureContext(
            request=request,
            response=response if isinstance(response, Response) else None,
            gateway=request.app.state.gateway,
            authorizer=request.app.state.authorizer,
            principal=principal,
            prefetched=request.scope.get(SCOPE_KEY),
            token=token_standing(request.scope),
        )

    @property
    def suggestions(self) -> bool:
        """Whether error messages may suggest names (only where introspection is on)."""
        return self._suggestions

    async def on_ws_connect(self, context: TenureContext) -> UnsetType | dict[str, object] | None:
        """Authenticate a WebSocket at its `connection_init`; a bad token closes it 4403."""
        try:
            context.principal, context.token = await websocket_principal(
                self._verifier, context.connection_params or {}, context.request.headers
            )
        except Unauthenticated as exc:
            raise ConnectionRejectionError(
                {"code": "UNAUTHENTICATED", "message": exc.message}
            ) from exc
        refused = await self.admit_connection(context)
        if refused is not None:
            context.connection_refused = refused  # closed 4429 with it (`JsonFrames`)
            raise ConnectionRejectionError({"message": refused})
        return await super().on_ws_connect(context)

    async def admit_connection(self, context: TenureContext) -> str | None:
        """Whether an authenticated WebSocket may stay open: None, or why not (`CODE:
        message`). A socket costs the API memory and a file for as long as it is open,
        whether or not it ever sends an operation: its opening pays a token, and a customer
        may hold only so many (one customer's idle sockets once took every file the API
        had, and no one else could connect)."""
        principal = context.principal
        if self.rate_limiter is not None and await self.rate_limiter.wait_ms(principal) > 0:
            return f"{LimitCode.RATE_LIMITED.value}: too many requests, connect again later"
        limit = self.connections_per_customer
        if principal.role is Role.CUSTOMER and limit is not None:
            if self._connections[principal.sender] >= limit:
                return f"{ErrorCode.LIMIT_REACHED.value}: {limit} WebSockets open already"
            self._connections[principal.sender] += 1
            context.connection_holder = principal.sender
        return None

    def connection_closed(self, context: TenureContext) -> None:
        """Count a WebSocket's customer one socket less, once it has closed."""
        holder, context.connection_holder = context.connection_holder, None
        if holder is not None:
            self._connections[holder] -= 1
            if not self._connections[holder]:
                del self._connections[holder]

    async def process_result(
        self,
        request: Request | WebSocket,
        result: ExecutionResult,  # type: ignore[override]
    ) -> GraphQLHTTPResponse:
        # An error before execution (parse, validation, variables, a limit) has no path,
        # and leaves no data; a field's error always has a path.
        request_error = result.data is None and all(err.path is None for err in result.errors or ())
        status = view_status(request.scope, request_error=request_error)
        if request_error and RETRY_AFTER_KEY in request.scope:
            status = 429  # RATE_LIMITED, as at the door (api/rate_limits.py)
        data: GraphQLHTTPResponse = {}
        if status == 200:
            data["data"] = result.data
        else:
            request.scope[_STATUS_KEY] = status
        if result.errors:
            errors: list[Any] = [
                present_error(err, suggestions=self._suggestions) for err in result.errors
            ]
            data["errors"] = errors
            code = errors[0]["extensions"]["code"]
            note_outcome(code, refused=request_error and code in _LIMIT_CODES)
        return data


# The API answers JSON only; the GraphiQL page, when served, loads its scripts and styles
# from unpkg and runs one inline script.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
GRAPHIQL_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline' https://unpkg.com; "
    "style-src 'unsafe-inline' https://unpkg.com; font-src data: https://unpkg.com; "
    "img-src data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
HSTS = "max-age=31536000"


_API_POLICY = API_POLICY.encode("latin-1")
_HSTS = HSTS.encode("latin-1")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """ASGI middleware: the standard security headers on every response. HSTS only on a
    request that came over TLS, as the server reports it (behind a TLS proxy, uvicorn takes
    the scheme from X-Forwarded-Proto when FORWARDED_ALLOW_IPS names the proxy)."""

    def __init__(self, app: ASGIApp, page_policy: str | None = None) -> None:
        self._app = app
        self._page_policy_raw = page_policy.encode("latin-1") if page_policy else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        over_tls = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # On the raw list, as every response passes here: Starlette's MutableHeaders
                # scanned it once for each header set.
                headers = list(message.get("headers", ()))
                names = {name.lower() for name, _ in headers}
                content_type = next((v for n, v in headers if n.lower() == b"content-type"), b"")
                page = content_type.startswith(b"text/html")
                policy = self._page_policy_raw if page and self._page_policy_raw else _API_POLICY
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", policy))
                headers += [h for h in _SECURITY_HEADERS if h[0] not in names]
                if over_tls and b"strict-transport-security" not in names:
                    headers.append((b"strict-transport-security", _HSTS))
                message["headers"] = headers
            await send(message)

        await self._app(scope, receive, send_with_headers)


async def _home(request: Request) -> RedirectResponse:
    return RedirectResponse("/graphql")


def create_app(
    settings: Settings,
    *,
    temporal_client: Client | None = None,
    cache: SnapshotCache | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    """The API app. Clients are made in the lifespan unless given (tests pass their own).
    With a `tracer_provider` (`workers.telemetry.configure_tracing`), each request is
    traced, through Temporal to the workflows and activities."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            client = temporal_client or await connect_temporal(
                settings, tracer_provider=tracer_provider
            )
            snapshot_cache = cache
            if snapshot_cache is None:
                redis_client = connect_redis(settings)
                stack.push_async_callback(redis_client.aclose)
                snapshot_cache = SnapshotCache(redis_client, settings.redis_prefix)
                stack.push_async_callback(snapshot_cache.aclose)  # before its client closes
            app.state.gateway = EntityGateway(client, snapshot_cache, settings, metrics)
            stack.push_async_callback(app.state.gateway.aclose)  # before Redis closes
            readiness.check("temporal", partial(answers, client))
            # Without Redis every request still goes through, to Temporal (slower): a pod
            # taken out of its Service for it would turn a cache outage into an API outage.
            readiness.check("redis", snapshot_cache.reachable, required=False)
            app.state.authorizer = Authorizer(app.state.gateway)
            stack.push_async_callback(limits_redis.aclose)
            # One reader of the change streams for every subscription of this process.
            feed_redis = connect_redis(settings)
            stack.push_async_callback(feed_redis.aclose)
            app.state.change_feed = ChangeFeed(
                feed_redis,
                snapshot_cache,
                settings.redis_prefix,
                max_subscribers=settings.max_subscribers,
                block_seconds=settings.redis_timeout / 2,
                max_per_holder=settings.max_subscriptions_per_customer,
            )
            await stack.enter_async_context(app.state.change_feed.running())
            if settings.api_metrics_port:
                stack.enter_context(metrics.served(settings.api_host, settings.api_metrics_port))
            yield

    if settings.api_metrics_port and settings.api_metrics_port == settings.api_port:
        raise ValueError("TENURE_API_METRICS_PORT must differ from API_PORT (or be 0)")
    readiness = Readiness()  # its checks are added once the lifespan has the clients
    verifier = TokenVerifier.from_settings(settings)
    if verifier is None:
        if settings.environment != "development":
            raise ValueError(
                "no key source for tokens: set TENURE_AUTH_SECRET, TENURE_AUTH_PUBLIC_KEY_FILE "
                "or TENURE_AUTH_JWKS_URL (or TENURE_ENV=development to let everyone in)"
            )
        log.warning(
            "NO AUTHENTICATION: no key source is configured and TENURE_ENV is development, "
            "so every caller is an admin. Never run like this where others can reach it."
        )
    graphiql = settings.graphiql
    if graphiql is None:
        graphiql = settings.environment == "development"
    schema = build_schema(settings)
    metrics = ApiMetrics()
    graphql: Any = TenureGraphQL(
        schema,
        graphiql=graphiql,
        suggestions=introspection_enabled(settings),
        verifier=verifier,
        subscriptions_per_connection=settings.max_subscriptions_per_connection,
        allowed_origins=settings.cors_origins,
    )
    cached_reads = CachedReadResponses(
        graphql,
        schema._schema,
        size=settings.rendered_reads,
        limits=DocumentLimits.from_settings(settings),
        metrics=metrics,
        answer_size=ResponseSize(settings.max_response_values),
    )
    limits_redis = connect_redis(settings)  # connects on first use
    limiter = RateLimiter(
        limits_redis,
        settings.redis_prefix,
        {Role(role): Limit(*limit) for role, limit in settings.rate_limits.items()},
        settings.rate_limit_values_per_point,
    )
    graphql.rate_limiter = limiter  # operations over a WebSocket pay at the door too
    graphql.connections_per_customer = settings.max_connections_per_customer
    endpoint = ObservedRequests(
        GraphQLOverHTTP(
            BodyLimit(
                Authentication(
                    RateLimits(EventStreamsTo(graphql, cached_reads), limiter), verifier
                ),
                settings.max_body_bytes,
            )
        ),
        metrics,
    )
    middleware = [
        Middleware(SecurityHeaders, page_policy=GRAPHIQL_POLICY if graphiql else None),
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id"],
            max_age=600,
        ),
    ]
    if tracer_provider is not None:
        middleware.insert(
            0,
            Middleware(
                OpenTelemetryMiddleware,
                tracer_provider=tracer_provider,
                excluded_urls=_UNTRACED,
                exclude_spans=["receive", "send"],  # a span per ASGI message is noise
            ),
        )
    app = Starlette(
        routes=[
            Route("/", _home),
            *health_routes(readiness),
            Route("/graphql", endpoint),  # GraphQLOverHTTP answers other methods
            # graphql-transport-ws: authenticated at its connection_init (on_ws_connect)
            WebSocketRoute("/graphql", graphql),
            # A page with its own policy and no data: its script sends tokens to /graphql
            admin_console(settings, auth_required=verifier is not None),
            # For Prometheus, here unless it has a port of its own; keep it off the Internet
            *([] if settings.api_metrics_port else [Route("/metrics", metrics.endpoint)]),
            # Signed by each source's secret: no token, no GraphQL rate limits (api/webhooks.py)
            Route(
                "/webhooks/{source}",
                webhook_endpoint(settings.webhook_sources, metrics),
                methods=["POST"],
            ),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.cached_reads = cached_reads
    return app
