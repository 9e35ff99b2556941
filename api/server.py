"""The API's uvicorn server: on shutdown it ends the subscriptions first.

uvicorn closes a WebSocket at once when it shuts down (1012), but lets an HTTP response in
flight run on, up to its graceful timeout: an event stream (a subscription over SSE) held
every shutdown for the whole timeout, 20 s, and then lost its connection without an error,
which its client could not tell from a network failure. The change feed ends every
subscription with UNAVAILABLE first, and the streams close with it.
"""

from __future__ import annotations

import socket

import uvicorn
from starlette.applications import Starlette

from api.change_feed import ChangeFeed


class ApiServer(uvicorn.Server):
    def __init__(self, app: Starlette, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        feed: ChangeFeed | None = getattr(self._app.state, "change_feed", None)
        if feed is not None:
            feed.drain()
        await super().shutdown(sockets)
