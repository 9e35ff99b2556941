"""Who is calling: every GraphQL request's bearer token verified before anything else runs.

A request without a valid token is answered 401 with `WWW-Authenticate: Bearer` and a
GraphQL error coded UNAUTHENTICATED, before its body is read. With no key source configured
(development only: `create_app` refuses it in production) every caller is the development
admin. The GraphiQL page itself is served to anyone: it holds no data, and its requests
carry the token pasted into its headers pane.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import structlog
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import DEVELOPMENT_PRINCIPAL, TokenVerifier, Unauthenticated
from api.responses import send_error
from entities.errors import ErrorCode
from entities.runtime.policy import Principal

log = logging.getLogger(__name__)

PRINCIPAL_KEY = "tenure.principal"
TOKEN_KEY = "tenure.token"
TOKEN_RECHECK_SECONDS = 60.0
"""How often an open subscription's token is verified again, so that one whose signing key
its provider withdrew ends: within this and the JWKS's age (`api.auth.JWKS_MAX_AGE`)."""


@dataclass(frozen=True)
class TokenStanding:
    """A caller's token as a long-lived operation (a subscription) holds it: when it
    expires, and how to tell whether it is still accepted. A subscription lasts as long as
    its token is good, not as long as its connection: it ends at the token's expiry, and
    once the key that signed it is withdrawn (a JWKS that no longer lists it), where it
    went on until the expiry, hours maybe, for a key withdrawn because it leaked."""

    verifier: TokenVerifier
    authorization: str | None
    expires: float | None

    def lapses(self) -> bool:
        """Whether the token can stop being accepted while a connection stays open."""
        return self.expires is not None or self.verifier.keys_withdrawable

    def expired(self) -> bool:
        return self.expires is not None and time.time() >= self.expires

    async def until_refused(self) -> str:
        """Return once the token is no longer accepted, with why."""
        while True:
            now = time.time()
            if self.expires is not None and now >= self.expires:
                return "the token has expired"
            pause = TOKEN_RECHECK_SECONDS
            if self.expires is not None:
                pause = min(pause, self.expires - now)
            await asyncio.sleep(pause)
            if self.verifier.keys_withdrawable and not self.expired():
                try:
                    await self.verifier.authenticate(self.authorization)
                except Unauthenticated as exc:
                    return f"the token is no longer accepted ({exc.message})"
                except Exception:  # whatever failed, the expiry still ends it
                    log.exception("could not verify an open subscription's token again")


def principal_of(scope: Scope) -> Principal | None:
    """The authenticated caller of this request, once `Authentication` let it through."""
    principal: Principal | None = scope.get(PRINCIPAL_KEY)
    return principal


def token_standing(scope: Scope) -> TokenStanding | None:
    """This request's token, once `Authentication` let it through; None without one."""
    token: TokenStanding | None = scope.get(TOKEN_KEY)
    return token


class Authentication:
    """ASGI middleware: authenticates each HTTP request, or answers 401 itself."""

    def __init__(self, app: ASGIApp, verifier: TokenVerifier | None) -> None:
        self._app = app
        self._verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self._verifier is None:
            scope[PRINCIPAL_KEY] = DEVELOPMENT_PRINCIPAL
        elif _is_ide_page(scope, headers):
            pass
        else:
            authorization = headers.get("authorization")
            try:
                scope[PRINCIPAL_KEY] = await self._verifier.authenticate(authorization)
                expires = self._verifier.expires(authorization)
                scope[TOKEN_KEY] = TokenStanding(self._verifier, authorization, expires)
            except Unauthenticated as exc:
                await _unauthenticated(send, exc.message, has_token="authorization" in headers)
                return
        principal = principal_of(scope)
        if principal is not None:
            structlog.contextvars.bind_contextvars(principal=principal.sender)
        await self._app(scope, receive, send)


def _is_ide_page(scope: Scope, headers: Headers) -> bool:
    """A browser asking for GraphiQL (which may carry its editors' state, `?headers=...`),
    not a query sent by GET."""
    return (
        scope["method"] == "GET"
        and "text/html" in headers.get("accept", "")
        and "query"
        not in parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    )


async def _unauthenticated(send: Send, message: str, has_token: bool) -> None:
    # RFC 6750: a request with no credentials gets the bare challenge; a bad token says so.
    challenge = 'Bearer realm="tenure"' + (', error="invalid_token"' if has_token else "")
    await send_error(
        send,
        401,
        ErrorCode.UNAUTHENTICATED,
        message,
        [(b"www-authenticate", challenge.encode())],
    )


async def websocket_principal(
    verifier: TokenVerifier | None, connection_params: Mapping[str, Any], headers: Headers
) -> tuple[Principal, TokenStanding | None]:
    """The caller of a WebSocket (graphql-transport-ws), and its token: from
    `connection_init`'s payload (`{"Authorization": "Bearer ..."}`, as browsers cannot set
    a handshake's headers), else the handshake's Authorization header. Raises
    Unauthenticated."""
    if verifier is None:
        return DEVELOPMENT_PRINCIPAL, None
    given = connection_params.get("Authorization", connection_params.get("authorization"))
    header = given if isinstance(given, str) else headers.get("authorization")
    principal = await verifier.authenticate(header)
    return principal, TokenStanding(verifier, header, verifier.expires(header))
