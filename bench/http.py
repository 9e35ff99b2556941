"""A lean HTTP/1.1 client for load: persistent connections, JSON in and out.

httpx's pooled AsyncClient costs about 1.5 ms of client CPU per request on this machine
(anyio locks and the pool's bookkeeping), which on two cores starved the API it was
measuring; this client costs about a tenth of that, so the figures are the server's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any


class HTTPError(Exception):
    """The connection failed or the server answered with something this client cannot read."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


class HTTPClient:
    """Up to `size` keep-alive connections to one host; each request takes one for itself
    and carries `headers` (an Authorization header, say) besides its own."""

    def __init__(
        self,
        host: str,
        port: int,
        size: int,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """Send one request; returns the status and the decoded JSON body (None if empty)."""
        status, _, data = await self.exchange(method, path, body)
        return status, data

    async def exchange(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request; returns the status, the headers (names in lower case) and the
        decoded JSON body (None if empty)."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"{self._headers}Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        async with self._slots:
            connection, reused = await self._take()
            try:
                status, headers, data = await self._exchange(connection, head + payload)
            except asyncio.IncompleteReadError as exc:
                connection.writer.close()
                if not (reused and not exc.partial):
                    raise HTTPError(f"{method} {path}: {exc!r}") from exc
                # The server closed an idle connection as we reused it: send it again.
                connection = await self._connect()
                status, headers, data = await self._exchange(connection, head + payload)
            self._idle.append(connection)
        return status, headers, json.loads(data) if data else None

    async def _take(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            if not connection.reader.at_eof():
                return connection, True
            connection.writer.close()
        return await self._connect(), False

    async def _exchange(
        self, connection: _Connection, message: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                connection.writer.write(message)
                return await self._response(connection.reader)
        except (OSError, ValueError, TimeoutError) as exc:
            connection.writer.close()
            raise HTTPError(f"{exc!r}") from exc

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        status, data = await self.request("POST", path, body)
        if status != 200:
            raise HTTPError(f"POST {path}: status {status}: {data}")
        return data

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise HTTPError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return _Connection(reader, writer)

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip():
                headers[name.strip().lower().decode()] = value.strip().decode()
        if "content-length" not in headers:
            raise ValueError("response without Content-Length")
        return status, headers, await reader.readexactly(int(headers["content-length"]))

    async def aclose(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            connection.writer.close()
            await asyncio.gather(connection.writer.wait_closed(), return_exceptions=True)
