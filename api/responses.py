"""The one way a middleware answers a request itself: a GraphQL error with its code."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import Send

from api.request_context import note_refusal


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer `status` with `{"errors": [{message, extensions: {code}}]}` as JSON: the
    request is refused before GraphQL runs it."""
    note_refusal(code)
    body = json.dumps({"errors": [{"message": message, "extensions": {"code": code}}]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
