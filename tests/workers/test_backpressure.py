"""Commands to an entity that has fallen far behind are refused before they are sent
(workers/backpressure.py): a flood while no worker runs cannot grow its history past the
limit, what was refused was never stored, what was accepted is applied once, and the
entity takes commands again once it has caught up."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from api.gateway import EntityGateway
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import RuntimeOptions
from tests.conftest import WorkerFactory, new_id
from tests.entities.test_runtime import live, open_active
from workers.backpressure import HOT_COMMANDS
from workers.cache import SnapshotCache
from workers.settings import Settings

LIMIT = 64 * 1024


async def test_a_flood_to_an_entity_left_behind_is_refused_and_nothing_refused_is_stored(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    # Runs continue as new after 100 commands, and carry over a ledger of 64, so that a
    # run caught up is small again: a new run's history starts with all it carries over.
    settings = settings.model_copy(
        update={
            "entity_history_limit_bytes": LIMIT,
            "runtime": RuntimeOptions(max_commands_per_run=100, ledger_size=64),
        }
    )
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
    accepted: list[str] = []
    refused: dict[str, TenureError] = {}
    gate = asyncio.Semaphore(16)

    async def deposit(key: str) -> None:
        async with gate:
            try:
                await gateway.send(
                    "account", account_id, "deposit", {"amount": 1}, idempotency_key=key
                )
            except TenureError as exc:
                refused[key] = exc
            else:
                accepted.append(key)

    async def burst(tag: str) -> None:
        await asyncio.gather(*(deposit(f"{tag}-{i}") for i in range(HOT_COMMANDS)))

    handle = temporal_client.get_workflow_handle(f"account:{account_id}")

    async def history_bytes() -> int:
        info = (await handle.describe()).raw_description.workflow_execution_info
        return info.history_size_bytes

    async def signals() -> int:
        kind = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        return len([e async for e in handle.fetch_history_events() if e.event_type == kind])

    # No worker: every accepted deposit waits in the history. Sent in bursts, so that the
    # entity is hot enough here to be looked at.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    bursts = 0
    while not refused and loop.time() < deadline:
        await burst(f"d{bursts}")
        bursts += 1
    assert refused, f"{len(accepted)} deposits accepted, none refused"
    error = next(iter(refused.values()))
    assert error.code is ErrorCode.UNAVAILABLE
    assert "is behind" in error.message and "same idempotencyKey" in error.message
    assert await history_bytes() > LIMIT
    # Behind it stays: every deposit is refused, at the next look too, and no signal more
    # reaches the history.
    taken, signalled = len(accepted), await signals()
    await burst("more")
    await asyncio.sleep(1.1)
    await burst("after-a-look")
    assert len(accepted) == taken and await signals() == signalled
    refused_key = sorted(refused)[0]

    async with run_worker(settings):
        for _ in range(100):
            snapshot = await live(gateway, account_id)
            if snapshot.state is not None and snapshot.state["balance"] == len(accepted):
                break
            await asyncio.sleep(0.2)
        assert snapshot.state is not None and snapshot.state["balance"] == len(accepted)
        # A refused deposit never reached the entity; sent again with its key once the
        # entity has caught up and continued as new, it is accepted, and applied once.
        for _ in range(60):
            try:
                await gateway.send(
                    "account", account_id, "deposit", {"amount": 1}, idempotency_key=refused_key
                )
                break
            except TenureError as exc:
                assert exc.code is ErrorCode.UNAVAILABLE, exc
                await asyncio.sleep(0.5)
        else:
            raise AssertionError("the entity never took commands again")
        assert await history_bytes() < LIMIT
        for _ in range(100):
            snapshot = await live(gateway, account_id)
            if snapshot.state is not None and snapshot.state["balance"] > len(accepted):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # nothing more comes
        snapshot = await live(gateway, account_id)
        assert snapshot.state is not None and snapshot.state["balance"] == len(accepted) + 1


async def test_a_flood_of_restocks_to_an_item_left_behind_is_refused_too(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """A restock creates its item, and goes with a start: it skipped the look at how far
    behind the entity is, so a flood of stock receipts to one SKU while no worker ran
    grew its history past the limit, towards the run's 10,000 signals."""
    settings = settings.model_copy(update={"entity_history_limit_bytes": LIMIT})
    gateway = EntityGateway(temporal_client, cache, settings)
    sku = new_id()
    receipt = {"quantity": 1, "unit_price": 100}
    async with run_worker(settings):
        await gateway.send("inventory", sku, "restock", receipt, wait=True)
    refused: list[TenureError] = []
    gate = asyncio.Semaphore(16)

    async def restock(key: str) -> None:
        async with gate:
            try:
                await gateway.send("inventory", sku, "restock", receipt, idempotency_key=key)
            except TenureError as exc:
                refused.append(exc)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    bursts = 0
    while not refused and loop.time() < deadline:
        await asyncio.gather(*(restock(f"r{bursts}-{i}") for i in range(HOT_COMMANDS)))
        bursts += 1
    assert refused, "no restock refused"
    assert refused[0].code is ErrorCode.UNAVAILABLE and "is behind" in refused[0].message
