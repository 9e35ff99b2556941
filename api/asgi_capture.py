"""A request's body read whole before the app runs, handed to the app again, and its
response captured as it is sent: what a middleware needs that answers some requests itself."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Captured:
    """A complete response: its start message and its body."""

    start: Message
    body: bytes


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body as far as it came, and whether it came whole."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already-read body to the app first."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def capture(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> Captured | None:
    """Run `app`, passing its response on, and return that response once it is complete."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def capturing(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = {**message, "headers": list(message["headers"])}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        await send(message)

    await app(scope, receive, capturing)
    return None if start is None else Captured(start, b"".join(chunks))
