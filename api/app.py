"""The Starlette application: its lifespan owns the Temporal and Redis clients."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from graphql import ExecutionResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse
from temporalio.client import Client

from api.auth import TokenVerifier
from api.authentication import Authentication, principal_of
from api.authorization import Authorizer
from api.cached_reads import SCOPE_KEY, CachedReadResponses
from api.context import TenureContext
from api.errors import present_error
from api.gateway import EntityGateway
from api.schema import schema
from entities.runtime.policy import NOBODY
from workers.cache import SnapshotCache, connect_redis
from workers.settings import Settings
from workers.temporal import connect_temporal

log = logging.getLogger(__name__)


class TenureGraphQL(GraphQL[TenureContext, None]):
    """Strawberry's ASGI view with Tenure's context and error presentation."""

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
        )

    async def process_result(
        self,
        request: Request | WebSocket,
        result: ExecutionResult,  # type: ignore[override]
    ) -> GraphQLHTTPResponse:
        data: GraphQLHTTPResponse = {"data": result.data}
        if result.errors:
            data["errors"] = [present_error(err) for err in result.errors]
        return data


async def _health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def _home(request: Request) -> RedirectResponse:
    return RedirectResponse("/graphql")


def create_app(
    settings: Settings,
    *,
    temporal_client: Client | None = None,
    cache: SnapshotCache | None = None,
) -> Starlette:
    """The API app. Clients are made in the lifespan unless given (tests pass their own)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            client = temporal_client or await connect_temporal(settings)
            snapshot_cache = cache
            if snapshot_cache is None:
                redis_client = connect_redis(settings)
                stack.push_async_callback(redis_client.aclose)
                snapshot_cache = SnapshotCache(redis_client, settings.redis_prefix)
            app.state.gateway = EntityGateway(client, snapshot_cache, settings)
            app.state.authorizer = Authorizer(app.state.gateway)
            yield

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
    graphql: Any = TenureGraphQL(schema, graphql_ide="graphiql")
    cached_reads = CachedReadResponses(graphql, schema._schema, size=settings.rendered_reads)
    app = Starlette(
        routes=[
            Route("/", _home),
            Route("/healthz", _health),
            Route("/graphql", Authentication(cached_reads, verifier), methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.cached_reads = cached_reads
    return app
