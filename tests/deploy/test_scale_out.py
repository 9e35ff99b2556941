"""Scale-out on real processes: two workers and two APIs against one Temporal and one Redis.
32 clients send commands across both APIs; midway one worker and one API are SIGKILLed;
the rest carry on, and every acknowledged command is applied exactly once."""

from __future__ import annotations

import asyncio
import signal
from contextlib import ExitStack
from pathlib import Path

import httpx
from temporalio.client import Client

from deploy.embedded import free_port
from tests.api.test_accounts_api import open_active
from tests.conftest import GraphQLClient, api_client, new_id
from tests.deploy.test_shutdown import DEPOSIT, Load, process, settle, until_status
from workers.settings import Settings


async def test_two_workers_and_two_apis_lose_nothing_when_one_of_each_is_killed(
    settings: Settings, temporal_client: Client, tmp_path: Path
) -> None:
    workers = [
        settings.model_copy(update={"worker_health_port": free_port(), "worker_metrics_port": 0})
        for _ in range(2)
    ]
    apis = [settings.model_copy(update={"api_port": free_port()}) for _ in range(2)]
    with ExitStack() as running:
        worker_processes = [
            running.enter_context(process("workers", s, tmp_path / f"worker-{n}.log"))
            for n, s in enumerate(workers)
        ]
        api_processes = [
            running.enter_context(process("api", s, tmp_path / f"api-{n}.log"))
            for n, s in enumerate(apis)
        ]
        for s in workers:
            await until_status(f"http://127.0.0.1:{s.worker_health_port}/readyz", 200)
        bases = [f"http://127.0.0.1:{s.api_port}" for s in apis]
        for base in bases:
            await until_status(f"{base}/readyz", 200)

        async with (
            httpx.AsyncClient(base_url=bases[0], timeout=30) as first,
            httpx.AsyncClient(base_url=bases[1], timeout=30) as second,
        ):
            clients = [GraphQLClient(first), GraphQLClient(second)]
            accounts = [new_id() for _ in range(8)]
            for n, account in enumerate(accounts):
                await open_active(clients[n % 2], account)
            gone: set[int] = set()  # the APIs a client found dead, as a load balancer would

            async def send(account: str, key: str, wait: bool) -> bool:
                api = int(key[1:].split("-")[0]) % 2
                if api in gone:
                    api = 1 - api
                try:
                    body = await clients[api](DEPOSIT, id=account, key=key, wait=wait)
                except httpx.TransportError:
                    gone.add(api)
                    return False
                return "errors" not in body

            load = Load(send, accounts)
            async with load.running(clients=32):
                await asyncio.sleep(3)
                before = len(load.acknowledged)
                worker_processes[0].send_signal(signal.SIGKILL)
                api_processes[0].send_signal(signal.SIGKILL)
                await asyncio.sleep(6)
                after = len(load.acknowledged)
            assert worker_processes[0].wait() == -signal.SIGKILL
            assert api_processes[0].wait() == -signal.SIGKILL
            # The survivors carried on: commands kept being acknowledged after the kill.
            assert before > 0 and after > before, (before, after)
            assert worker_processes[1].poll() is None and api_processes[1].poll() is None

        # Every unsure command sent again with its key, through an API of the test's own
        # (the surviving worker serving): each account holds exactly one unit per key.
        async with api_client(settings, temporal_client) as http:
            await settle(GraphQLClient(http), load)
