"""The typed GraphQL context every resolver receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.types import Info as StrawberryInfo

from api.authentication import TokenStanding
from api.authorization import Authorizer
from api.gateway import EntityGateway
from api.prefetched_reads import PrefetchedReads
from entities.runtime.policy import Principal


@dataclass
class TenureContext:
    """Request-scoped context: the request, its authenticated caller, and the gateway and
    authorizer owned by the app lifespan."""

    request: Request | WebSocket
    response: Response | None
    gateway: EntityGateway
    authorizer: Authorizer
    principal: Principal
    prefetched: PrefetchedReads | None = None
    # What a WebSocket's `connection_init` carried (Strawberry sets it).
    connection_params: dict[str, Any] | None = None
    token: TokenStanding | None = None
    """The caller's token: when it expires, and whether it is still accepted; None
    without one."""
    connection_refused: str | None = None
    """Why a WebSocket's connection_init was refused for a limit (`CODE: message`)."""
    connection_holder: str | None = None
    """The customer a WebSocket is counted against (`TenureGraphQL.on_ws_connect`), until
    it closes."""


Info = StrawberryInfo[TenureContext, Any]
