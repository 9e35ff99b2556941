"""A process's health for its orchestrator: `/livez` while the process runs, `/readyz`
while it can do its work (503 naming what is missing). The API serves both beside
`/graphql`; the worker serves them on a port of their own (`serve_health`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]
"""One thing the process needs, answering within about a second."""


class Readiness:
    """Whether every check passes, asked at most once per `ttl` seconds however often an
    orchestrator (or a crowd of load balancers) polls."""

    def __init__(self, checks: dict[str, Check] | None = None, ttl: float = 1.0) -> None:
        self._checks = dict(checks or {})
        self._optional: set[str] = set()
        self._ttl = ttl
        self._answer: dict[str, bool] = {}
        self._asked = float("-inf")
        self._lock = asyncio.Lock()
        self.stopping = False

    def check(self, name: str, check: Check, *, required: bool = True) -> None:
        """Add what the process needs, once it has it (a client made at startup). One not
        `required` is reported, and the process is ready without it (degraded): the API
        serves every request without Redis, slower."""
        self._checks[name] = check
        if not required:
            self._optional.add(name)

    def ready(self, answer: dict[str, bool]) -> bool:
        """Whether every required check of `answer` passed."""
        return all(passed for name, passed in answer.items() if name not in self._optional)

    async def __call__(self) -> dict[str, bool]:
        async with self._lock:
            if time.monotonic() - self._asked >= self._ttl:
                names = list(self._checks)
                results = await asyncio.gather(*(self._checks[name]() for name in names))
                self._answer = dict(zip(names, results, strict=True))
                self._asked = time.monotonic()
        return self._answer


async def _livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def readyz_endpoint(readiness: Readiness) -> Callable[[Request], Awaitable[JSONResponse]]:
    """`/readyz`: 200 with each check's answer when every required one passes ("degraded"
    when another does not), else 503; 503 once the process is stopping, so no new work is
    sent its way."""

    async def readyz(request: Request) -> JSONResponse:
        checks = await readiness()
        ready = readiness.ready(checks) and not readiness.stopping
        state = "stopping" if readiness.stopping else "ready" if ready else "not ready"
        if ready and not all(checks.values()):
            state = "degraded"  # ready, without something it does better with
        body: dict[str, object] = {"status": state, "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    return readyz


def health_routes(readiness: Readiness) -> list[Route]:
    return [
        Route("/livez", _livez),
        Route("/healthz", _livez),  # the name before /livez, kept for probes that use it
        Route("/readyz", readyz_endpoint(readiness)),
    ]


class _Server(uvicorn.Server):
    """uvicorn inside a process that handles its own signals: it leaves them alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_health(readiness: Readiness, host: str, port: int) -> None:
    """Serve `/livez` and `/readyz` on `host:port` until cancelled."""
    config = uvicorn.Config(
        Starlette(routes=health_routes(readiness)),
        host=host,
        port=port,
        log_level="warning",
        log_config=None,  # its records go through the process's logging, JSON or text
        access_log=False,
        server_header=False,
        lifespan="off",
    )
    server = _Server(config)
    try:
        await server.serve()
    except SystemExit:  # uvicorn's answer to a port it cannot bind: the worker goes on
        log.error("health not served: cannot listen on %s:%d", host, port)
    finally:
        server.should_exit = True
