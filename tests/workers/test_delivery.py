"""Delivering commands while an entity continues as new over and over: every command sent
from many API processes at once is applied once, none refused."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from api.gateway import Consistency, EntityGateway
from entities.runtime.envelope import RuntimeOptions
from tests.conftest import WorkerFactory, new_id
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache
from workers.settings import Settings


async def test_commands_racing_a_run_that_closes_are_all_applied(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # A new run every five commands, and 32 gateways (as 32 API processes would) each
    # sending its own signals: many arrive while a run is closing.
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=5)})
    gateways = [EntityGateway(temporal_client, cache, settings) for _ in range(32)]
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateways[0], account_id)
        await asyncio.gather(
            *(
                gateways[i % 32].send(
                    "account", account_id, "deposit", {"amount": 1}, idempotency_key=f"d{i}"
                )
                for i in range(2000)
            )
        )
        await gateways[0].send("account", account_id, "deposit", {"amount": 1}, wait=True)
        read = await gateways[0].read("account", account_id, Consistency.LIVE)
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["balance"] == 2001
    assert read.snapshot.revision == 2 + 2001
