"""Session fixtures: a real Temporal dev server and a real Redis-compatible server.

REDIS_URL, when set (CI sets it to the machine's Redis 7), is used instead of an embedded
Valkey; every test session writes under a key prefix of its own, so it never sees other
data there. Each test gets its own task queue and entity ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
import structlog
from starlette.applications import Starlette
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter

from api.app import create_app
from deploy.embedded import EmbeddedRedis, EmbeddedTemporal
from entities import catalog
from entities.runtime.envelope import CommandEnvelope
from workers.cache import SnapshotCache, connect_redis
from workers.delivery import CommandDelivery
from workers.logs import configure_logging
from workers.settings import Settings
from workers.worker import TenureWorker, build_worker

TEST_TIME_LIMIT = float(os.environ.get("TENURE_TEST_TIME_LIMIT", "600"))
"""Seconds any one test may take. The slowest take about a minute; one that runs past this
has hung, and ends the run with every thread's and every asyncio task's stack printed,
rather than holding CI until its own limit with nothing to show."""


LEFT_TASKS_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
async def _no_tasks_left() -> AsyncIterator[None]:
    """Tasks a test started and left running (a failed test's followers, a worker that
    could not shut down) are cancelled when it ends, and given LEFT_TASKS_TIMEOUT to go:
    they neither run on into the tests after it nor fail one of them when collected there.
    The session's servers and clients were started before it, so they are left alone."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() - before if task is not current]
    if not left:
        return
    logging.getLogger("tests").warning(
        "cancelling %d tasks the test left running: %s",
        len(left),
        sorted({getattr(task.get_coro(), "__qualname__", task.get_name()) for task in left}),
    )
    for task in left:
        task.cancel()
    done, _ = await asyncio.wait(left, timeout=LEFT_TASKS_TIMEOUT)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: its error was the test's to see


@pytest.fixture(autouse=True)
async def _time_limit(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    timer = threading.Timer(TEST_TIME_LIMIT, _hung, (request, loop))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _hung(request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop) -> None:
    """Print where everything is, past pytest's capturing, then end the run."""
    capturing = request.config.pluginmanager.getplugin("capturemanager")
    if capturing is not None:
        capturing.suspend_global_capture(in_=True)
    out = sys.stderr
    print(
        f"\n{request.node.nodeid} ran past {TEST_TIME_LIMIT:g} s: stacks follow",
        file=out,
        flush=True,
    )
    faulthandler.dump_traceback(file=out, all_threads=True)
    printed = threading.Event()

    def tasks() -> None:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task!r}", file=out)
            task.print_stack(file=out)
        printed.set()

    loop.call_soon_threadsafe(tasks)
    printed.wait(5)  # the loop may itself be stuck
    out.flush()
    os._exit(3)


@pytest.fixture(scope="session")
async def temporal_server() -> AsyncIterator[EmbeddedTemporal]:
    async with EmbeddedTemporal() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    async with EmbeddedRedis() as server:
        yield server.url  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"tenure-test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session", autouse=True)
async def _clean_redis_prefix(redis_url: str, redis_prefix: str) -> AsyncIterator[None]:
    yield
    client = redis.from_url(redis_url)
    async for key in client.scan_iter(match=f"{redis_prefix}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="session")
async def temporal_client(temporal_server: EmbeddedTemporal) -> Client:
    return await Client.connect(temporal_server.address, data_converter=pydantic_data_converter)


@pytest.fixture
def settings(temporal_server: EmbeddedTemporal, redis_url: str, redis_prefix: str) -> Settings:
    """Settings for one test: its own task queue, the session's servers."""
    return Settings(
        temporal_address=temporal_server.address,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        task_queue=f"test-{uuid.uuid4().hex}",
        live_read_timeout=1.5,
        # Room for a new worker to take over an entity (up to 3 s for a lost sticky queue).
        command_wait_timeout=6.0,
        # No key source: every caller is the development admin. Tests of who may do what
        # configure a key and mint their own tokens (tests/api/test_access.py).
        environment="development",
    )


@pytest.fixture
async def own_redis() -> AsyncIterator[EmbeddedRedis]:
    """A Redis-compatible server of the test's own, which it may stop and start."""
    server = EmbeddedRedis()
    await server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def cache_of(settings: Settings) -> AsyncIterator[SnapshotCache]:
    """A cache on the settings' Redis, closed with its client on the way out."""
    client = connect_redis(settings)
    cache = SnapshotCache(client, settings.redis_prefix)
    try:
        yield cache
    finally:
        await cache.aclose()
        await client.aclose()


@pytest.fixture
async def cache(settings: Settings) -> AsyncIterator[SnapshotCache]:
    async with cache_of(settings) as cache:
        yield cache


@pytest.fixture
def own_redis_settings(settings: Settings, own_redis: EmbeddedRedis) -> Settings:
    """The test's settings on a Redis of its own, with timeouts short enough that a stopped
    Redis costs a read half a second."""
    return settings.model_copy(update={"redis_url": own_redis.url, "redis_timeout": 0.5})


@pytest.fixture
async def own_cache(own_redis_settings: Settings) -> AsyncIterator[SnapshotCache]:
    """A cache on the test's own Redis (`own_redis`, which it may stop and start)."""
    async with cache_of(own_redis_settings) as cache:
        yield cache


WorkerFactory = Callable[..., contextlib.AbstractAsyncContextManager[TenureWorker]]


@pytest.fixture
def run_worker(temporal_client: Client, settings: Settings) -> WorkerFactory:
    """`async with run_worker(): ...` runs a worker for this test's task queue."""

    @contextlib.asynccontextmanager
    async def running(
        worker_settings: Settings | None = None, cache: SnapshotCache | None = None
    ) -> AsyncIterator[TenureWorker]:
        chosen = worker_settings or settings
        async with (
            cache_of(chosen) as own,
            build_worker(temporal_client, chosen, cache or own) as worker,
        ):
            yield worker

    return running


@pytest.fixture
async def worker(run_worker: WorkerFactory) -> AsyncIterator[TenureWorker]:
    async with run_worker() as running:
        yield running


@contextlib.asynccontextmanager
async def api_client(
    settings: Settings, temporal_client: Client, cache: SnapshotCache | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app: Starlette = create_app(settings, temporal_client=temporal_client, cache=cache)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tenure") as http:
            yield http


@pytest.fixture
async def http(settings: Settings, temporal_client: Client) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings, temporal_client) as client:
        yield client


class GraphQLClient:
    """Posts GraphQL documents and returns the decoded response body."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        response = await self.http.post("/graphql", json={"query": query, "variables": variables})
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, **variables: Any) -> dict[str, Any]:
        body = await self(query, **variables)
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def error_code(self, query: str, **variables: Any) -> str:
        body = await self(query, **variables)
        assert body.get("errors"), body
        code: str = body["errors"][0]["extensions"]["code"]
        return code


@pytest.fixture
def gql(http: httpx.AsyncClient, worker: TenureWorker) -> GraphQLClient:
    return GraphQLClient(http)


def new_id() -> str:
    return uuid.uuid4().hex


async def start_over(
    client: Client,
    settings: Settings,
    entity_type: str,
    entity_id: str,
    command: str,
    payload: dict[str, Any],
) -> None:
    """Start a new workflow chain for an entity whose workflow has finished, with `command`,
    as once retention has deleted it. The dev server takes half a minute to delete a
    workflow; a chain started over the finished one leaves Temporal and the cache as
    deletion would. It waits for the finishing run to end (its last publish)."""
    await client.get_workflow_handle(f"{entity_type}:{entity_id}").result()
    await client.start_workflow(
        catalog.workflow_for(entity_type).run,  # type: ignore[attr-defined]
        CommandDelivery(client, settings).start_input(entity_type, entity_id),
        id=f"{entity_type}:{entity_id}",
        task_queue=settings.task_queue,
        start_signal="command",
        start_signal_args=[CommandEnvelope(command_id=new_id(), name=command, payload=payload)],
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )


async def reopen_account(client: Client, settings: Settings, account_id: str) -> None:
    """A closed account's id used again: a new account opened under it (`start_over`)."""
    opening = {"owner_name": "Ada Lovelace", "email": "ada@example.com"}
    await start_over(client, settings, "account", account_id, "open", opening)


LogCapture = Callable[..., io.StringIO]


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    """`captured_logs(settings, process_name)` configures the process's logging as an entry
    point does, at debug level, into a stream it returns; put back as it was afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    on_message = workflow.logger.workflow_info_on_message, activity.logger.activity_info_on_message

    def capture(settings: Settings, process_name: str = "api") -> io.StringIO:
        stream = io.StringIO()
        configure_logging(settings, process_name, stream=stream, level=logging.DEBUG)
        return stream

    yield capture
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
    workflow.logger.workflow_info_on_message, activity.logger.activity_info_on_message = on_message


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """`app` behind a real uvicorn on a free port: its `http://127.0.0.1:<port>` address."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


_UNCLOSED_AT_EXIT = (
    "AbstractConnection.__del__",  # redis-py's
    "_SelectorTransport.__del__",
    "StreamWriter.__del__",
)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect what the tests left for the garbage collector, and report Redis connections
    (and their sockets) found unclosed then, instead of failing a run whose every test
    passed. pytest collects once more after this hook, and its `error` filter made a
    connection left in a reference cycle, collected only then, fail CI once with no test
    failed (db 13 of the machine's Redis, 2026-12-07). Collected during a test, one still
    fails that test. Anything else unraisable goes to pytest as before."""
    import gc

    forward = sys.unraisablehook

    def report(unraisable: Any) -> None:
        where = getattr(unraisable.object, "__qualname__", "")
        network = where in _UNCLOSED_AT_EXIT or isinstance(unraisable.object, socket.socket)
        if isinstance(unraisable.exc_value, ResourceWarning) and network:
            print(f"\nleft unclosed at the session's end: {unraisable.exc_value}", file=sys.stderr)
            return
        forward(unraisable)

    sys.unraisablehook = report
    try:
        gc.collect()
        gc.collect()
    finally:
        sys.unraisablehook = forward
