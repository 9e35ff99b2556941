"""Health and shutdown of the real processes, as an orchestrator sees them: `/livez` and
`/readyz` on the API and the worker, and SIGTERM during load losing no acknowledged command,
the worker's and the API's alike."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from temporalio.client import Client

from deploy.embedded import EmbeddedRedis, die_with_parent, free_port
from entities.runtime.envelope import OutcomeStatus
from entities.runtime.workflow import EntityWorkflow
from tests.api.test_accounts_api import open_active, read_account
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from workers.health import Readiness, health_routes
from workers.settings import Settings

DEPOSIT = """mutation($id: ID!, $key: String!, $wait: Boolean!) {
  depositToAccount(id: $id, amount: 1, idempotencyKey: $key, wait: $wait) { status } }"""


@contextmanager
def process(module: str, settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def until_status(url: str, status: int, within: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            try:
                response = await http.get(url)
                if response.status_code == status:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} never answered {status}"
            await asyncio.sleep(0.1)


async def exit_code(child: subprocess.Popen[bytes], within: float) -> int | None:
    deadline = time.monotonic() + within
    while child.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return child.poll()


class Load:
    """Clients depositing 1 to a few accounts with keys of their own, half of them waited,
    each remembering which keys were acknowledged and which must be sent again."""

    def __init__(self, send: Any, accounts: list[str]) -> None:
        self._send = send
        self.accounts = accounts
        self.acknowledged: set[str] = set()
        self.unsure: set[str] = set()
        self.stopped = asyncio.Event()
        self._n = 0

    async def client(self, n: int) -> None:
        while not self.stopped.is_set():
            self._n += 1
            key = f"c{n}-{self._n}"
            account = self.accounts[self._n % len(self.accounts)]
            ok = await self._send(account, key, wait=self._n % 2 == 0)
            (self.acknowledged if ok else self.unsure).add(key)
            if not ok:
                await asyncio.sleep(0.1)

    @asynccontextmanager
    async def running(self, clients: int) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self.client(n)) for n in range(clients)]
        try:
            yield
        finally:
            self.stopped.set()
            await asyncio.gather(*tasks)

    def account_of(self, key: str) -> str:
        return self.accounts[int(key.split("-")[1]) % len(self.accounts)]


async def deposit(gql: GraphQLClient, account: str, key: str, wait: bool) -> bool:
    try:
        body = await gql(DEPOSIT, id=account, key=key, wait=wait)
    except httpx.TransportError:
        return False
    return "errors" not in body


async def settle(gql: GraphQLClient, load: Load) -> None:
    """Send every unsure key again, with its key, until each is acknowledged; then every
    account holds exactly one unit per key: nothing lost, nothing applied twice."""
    for key in sorted(load.unsure - load.acknowledged):
        for _ in range(20):
            if await deposit(gql, load.account_of(key), key, wait=True):
                load.acknowledged.add(key)
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"{key} was never applied")
    for account in load.accounts:
        keys = {key for key in load.acknowledged if load.account_of(key) == account}
        state = await fresh(gql, account)
        assert (state["balance"], state["revision"]) == (len(keys), len(keys) + 2), account
        # Per key, not only in total: the entity's history holds each key once, applied.
        applied = await deposits_applied(gql, account)
        assert sorted(applied) == sorted(keys), account


async def fresh(gql: GraphQLClient, account: str) -> dict[str, Any]:
    """The account as its entity answers now. Right after a worker changes, an entity's
    tasks may wait out the old worker's sticky queue (3 s), longer than a LIVE read waits:
    that read is the cache's, marked stale, and asked again."""
    deadline = time.monotonic() + 30
    while True:
        state = await read_account(gql, account, "LIVE")
        if not state["stale"]:
            return state
        assert time.monotonic() < deadline, f"{account} never answered live"
        await asyncio.sleep(0.5)


async def deposits_applied(gql: GraphQLClient, account: str) -> list[str]:
    """The ids of every deposit the account applied, from its history, page by page."""
    query = """query($id: ID!, $before: String) { account(id: $id) {
        history(last: 100, before: $before) { hasOlder entries { commandId command outcome } }
    } }"""
    applied: list[str] = []
    before = None
    while True:
        page = (await gql.data(query, id=account, before=before))["account"]["history"]
        applied += [
            e["commandId"]
            for e in page["entries"]
            if e["command"] == "deposit" and e["outcome"] == "APPLIED"
        ]
        if not page["hasOlder"]:
            return applied
        before = page["entries"][-1]["commandId"]


async def test_the_worker_is_ready_while_it_polls_and_drains_on_sigterm(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings.model_copy(
        update={"worker_health_port": port, "worker_shutdown_grace": 5.0}
    )
    health = f"http://127.0.0.1:{port}"
    async with api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        with process("workers", settings, tmp_path / "worker.log") as worker:
            ready = await until_status(f"{health}/readyz", 200)
            assert ready == {"status": "ready", "checks": {"polling": True}}
            assert (await until_status(f"{health}/livez", 200)) == {"status": "ok"}
            accounts = [new_id() for _ in range(4)]
            for account in accounts:
                await open_active(gql, account)
            load = Load(lambda a, k, wait: deposit(gql, a, k, wait), accounts)
            async with load.running(clients=16):
                await asyncio.sleep(2)
                before = len(load.acknowledged)
                worker.send_signal(signal.SIGTERM)
                # It exits by itself once drained, well within the grace it has.
                assert await exit_code(worker, within=25) == 0
                async with run_worker(settings):  # another worker takes over
                    await asyncio.sleep(2)
            assert before > 0 and len(load.acknowledged) > before
            async with run_worker(settings):
                await settle(gql, load)
    assert (
        "stopping: running activities have 5 s to finish" in (tmp_path / "worker.log").read_text()
    )


async def test_the_api_is_ready_with_its_servers_and_finishes_requests_on_sigterm(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings.model_copy(update={"api_port": port, "api_shutdown_grace": 10.0})
    base = f"http://127.0.0.1:{port}"
    async with run_worker(settings):
        with process("api", settings, tmp_path / "api.log") as api:
            ready = await until_status(f"{base}/readyz", 200)
            assert ready == {"status": "ready", "checks": {"temporal": True, "redis": True}}
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                gql = GraphQLClient(http)
                accounts = [new_id() for _ in range(4)]
                for account in accounts:
                    await open_active(gql, account)
                broken: list[tuple[str, str, BaseException]] = []

                async def send(account: str, key: str, wait: bool) -> bool:
                    try:
                        body = await gql(DEPOSIT, id=account, key=key, wait=wait)
                    except httpx.ConnectError:
                        await asyncio.sleep(0.1)  # refused: never sent, so never applied
                        return False
                    except httpx.TransportError as exc:  # cut off while in flight
                        broken.append((account, key, exc))
                        return False
                    return "errors" not in body

                load = Load(send, accounts)
                async with load.running(clients=16):
                    await asyncio.sleep(1.5)
                    api.send_signal(signal.SIGTERM)
                    # Nothing new is sent from here, as a load balancer stops sending to an
                    # API being stopped; what is in flight must still be answered.
                    load.stopped.set()
                in_flight_answered = len(load.acknowledged | load.unsure)
                # uvicorn ends by raising the signal again once it has drained, as a
                # process without a handler would: the status an orchestrator expects.
                assert await exit_code(api, within=15) == -signal.SIGTERM
                with pytest.raises(httpx.ConnectError):
                    await http.get("/livez")
            # Every request the API had taken was answered, none cut off. One whose connection
            # closed unanswered had reached a connection the API was closing as idle, unread
            # (HTTP keep-alive's race, which a load balancer's retry covers): its command was
            # never sent, as its entity tells.
            for account, key, exc in broken:
                handle = temporal_client.get_workflow_handle(f"account:{account}")
                result = await handle.query(EntityWorkflow.outcome, key)
                assert result.outcome.status is OutcomeStatus.UNKNOWN, (key, exc)
            assert load.acknowledged and in_flight_answered
        async with api_client(settings, temporal_client) as http:
            await settle(GraphQLClient(http), load)


async def test_the_api_keeps_an_idle_connection_open_past_uvicorns_five_seconds(
    settings: Settings, tmp_path: Path
) -> None:
    """A proxy keeps its upstream connections 60 s (nginx); an API that closed them after
    uvicorn's default 5 s idle raced it, and a client pausing between bursts connected again
    at each. Answered, idle 6 s, then asked again on the same connection: answered."""
    port = free_port()
    settings = settings.model_copy(update={"api_port": port})
    request = f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with process("api", settings, tmp_path / "api.log"):
        await until_status(f"http://127.0.0.1:{port}/livez", 200)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for pause in (0.0, 6.0):
                await asyncio.sleep(pause)
                writer.write(request)
                await writer.drain()
                status = await asyncio.wait_for(reader.readline(), timeout=5)
                assert status.startswith(b"HTTP/1.1 200"), (pause, status)
                headers = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()


async def test_the_api_stays_ready_without_redis_and_says_it_is_degraded(
    settings: Settings, temporal_client: Client, own_redis: EmbeddedRedis
) -> None:
    """Without Redis every request still goes through, to Temporal: an orchestrator that
    took the API out of its Service for it would turn a cache outage into an outage. Its
    `/readyz` stays 200, and says what is missing."""
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    async with api_client(settings, temporal_client) as http:
        ready = await http.get("/readyz")
        assert ready.json() == {"status": "ready", "checks": {"temporal": True, "redis": True}}
        own_redis.stop()
        await asyncio.sleep(1.1)  # past the answer kept for a second
        down = await http.get("/readyz")
        assert down.status_code == 200
        assert down.json() == {"status": "degraded", "checks": {"temporal": True, "redis": False}}
        assert (await http.get("/livez")).status_code == 200


async def test_a_required_check_that_fails_makes_the_process_not_ready() -> None:
    async def down() -> bool:
        return False

    readiness = Readiness({"temporal": down})
    app = Starlette(routes=health_routes(readiness))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://h") as h:
        answer = await h.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "not ready", "checks": {"temporal": False}}


async def test_a_stopping_process_is_not_ready_and_answers_are_kept_a_second() -> None:
    asked = 0

    async def redis() -> bool:
        nonlocal asked
        asked += 1
        return True

    readiness = Readiness({"redis": redis})
    app = Starlette(routes=health_routes(readiness))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://h") as h:
        for _ in range(50):  # a crowd of probes costs one check a second
            assert (await h.get("/readyz")).status_code == 200
        assert asked == 1
        readiness.stopping = True
        stopping = await h.get("/readyz")
        assert stopping.status_code == 503
        assert stopping.json() == {"status": "stopping", "checks": {"redis": True}}
        assert (await h.get("/livez")).status_code == 200
