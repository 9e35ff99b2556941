"""The entity runtime on a real Temporal server: exactly-once commands across continue-as-new,
durable timers, rejections that never fail the workflow, terminal entities."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from api.gateway import Consistency, EntityGateway
from entities.account import AccountWorkflow
from entities.errors import TenureError
from entities.runtime.envelope import RuntimeOptions, Snapshot
from tests.conftest import WorkerFactory, new_id
from workers.cache import SnapshotCache
from workers.settings import Settings


@pytest.fixture
async def gateway(
    temporal_client: Client, settings: Settings, cache: SnapshotCache
) -> AsyncIterator[EntityGateway]:
    yield EntityGateway(temporal_client, cache, settings)


async def open_active(gateway: EntityGateway, account_id: str) -> None:
    await gateway.send(
        "account", account_id, "open", {"owner_name": "Ada", "email": "ada@example.com"}, wait=True
    )
    await gateway.send("account", account_id, "verify", {}, wait=True)


async def live(gateway: EntityGateway, account_id: str) -> Snapshot:
    read = await gateway.read("account", account_id, Consistency.LIVE)
    assert read is not None
    return read.snapshot


async def test_a_thousand_concurrent_commands_with_duplicates_apply_exactly_once(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=50)})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    rng = random.Random(7)
    unique = [(f"dep-{i}", i + 1) for i in range(800)]
    # Ten waves of 100 concurrent commands: 80 new ones and 20 repeats of commands sent in
    # earlier waves, so most repeats reach a later run than their original.
    waves: list[list[tuple[str, int]]] = []
    for w in range(10):
        fresh = unique[w * 80 : (w + 1) * 80]
        earlier = unique[: w * 80] or fresh
        wave = fresh + rng.choices(earlier, k=20)
        rng.shuffle(wave)
        waves.append(wave)
    limit = asyncio.Semaphore(64)

    async def deposit(key: str, amount: int) -> None:
        async with limit:
            await gateway.send(
                "account", account_id, "deposit", {"amount": amount}, idempotency_key=key
            )

    async with run_worker():
        await open_active(gateway, account_id)
        for wave in waves:
            await asyncio.gather(*(deposit(k, a) for k, a in wave))
            # Waiting for one command lets the run catch up and continue as new.
            await gateway.send("account", account_id, "deposit", {"amount": 1}, wait=True)
        snapshot = await live(gateway, account_id)

    assert sum(len(w) for w in waves) + len(waves) == 1010
    assert snapshot.state is not None
    assert snapshot.state["balance"] == sum(a for _, a in unique) + len(waves)
    assert snapshot.revision == 2 + len(unique) + len(waves)
    runs = [
        wf async for wf in temporal_client.list_workflows(f'WorkflowId = "account:{account_id}"')
    ]
    assert len(runs) >= 6, f"expected several continue-as-new runs, saw {len(runs)}"


async def test_a_retried_command_reports_its_original_outcome(
    gateway: EntityGateway, worker: Any
) -> None:
    account_id = new_id()
    await open_active(gateway, account_id)
    first = await gateway.send(
        "account", account_id, "deposit", {"amount": 70}, idempotency_key="k1", wait=True
    )
    again = await gateway.send(
        "account", account_id, "deposit", {"amount": 70}, idempotency_key="k1", wait=True
    )
    assert first.read is not None and again.read is not None
    assert again.read.snapshot.revision == first.read.snapshot.revision
    assert again.read.snapshot.state == first.read.snapshot.state
    with pytest.raises(TenureError) as rejected:
        await gateway.send(
            "account", account_id, "withdraw", {"amount": 500}, idempotency_key="w1", wait=True
        )
    # Funds arrive; the refused withdrawal, retried, is still the refused one: its outcome
    # was decided when it first arrived, and a retry does not apply it anew.
    await gateway.send("account", account_id, "deposit", {"amount": 1000}, wait=True)
    with pytest.raises(TenureError) as rejected_again:
        await gateway.send(
            "account", account_id, "withdraw", {"amount": 500}, idempotency_key="w1", wait=True
        )
    assert rejected.value.code == rejected_again.value.code == "INSUFFICIENT_FUNDS"
    assert (await live(gateway, account_id)).state["balance"] == 1070  # type: ignore[index]


async def test_a_rejected_command_leaves_the_entity_running(
    gateway: EntityGateway, temporal_client: Client, worker: Any
) -> None:
    account_id = new_id()
    await open_active(gateway, account_id)
    with pytest.raises(TenureError):
        await gateway.send("account", account_id, "withdraw", {"amount": 1}, wait=True)
    with pytest.raises(TenureError):
        await gateway.send("account", account_id, "reactivate", {}, wait=True)
    description = await temporal_client.get_workflow_handle(f"account:{account_id}").describe()
    assert description.status is WorkflowExecutionStatus.RUNNING
    assert (await live(gateway, account_id)).revision == 2


async def test_an_idle_active_account_becomes_dormant_and_a_deposit_wakes_it(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"entity_options": {"account": {"dormancy_seconds": 1}}})
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker():
        await open_active(gateway, account_id)
        await gateway.send("account", account_id, "deposit", {"amount": 10}, wait=True)
        for _ in range(100):
            snapshot = await live(gateway, account_id)
            if snapshot.state and snapshot.state["status"] == "DORMANT":
                break
            await asyncio.sleep(0.1)
        assert snapshot.state is not None and snapshot.state["status"] == "DORMANT"
        assert snapshot.revision == 4  # open, verify, deposit, then the dormancy timer
        cached = await cache.get("account", account_id)
        assert cached is not None and cached.snapshot.state["status"] == "DORMANT"  # type: ignore[index]
        woken = await gateway.send("account", account_id, "withdraw", {"amount": 3}, wait=True)
        assert woken.read is not None and woken.read.snapshot.state is not None
        assert woken.read.snapshot.state["status"] == "ACTIVE"
        assert woken.read.snapshot.state["balance"] == 7


async def test_closing_completes_the_workflow_and_refuses_later_commands(
    gateway: EntityGateway, temporal_client: Client, worker: Any
) -> None:
    account_id = new_id()
    await open_active(gateway, account_id)
    closed = await gateway.send("account", account_id, "close", {}, wait=True)
    assert closed.read is not None and closed.read.snapshot.closed
    handle = temporal_client.get_workflow_handle_for(AccountWorkflow.run, f"account:{account_id}")
    result = await handle.result()
    assert result.state is not None and result.state["status"] == "CLOSED"
    for name, payload in [
        ("deposit", {"amount": 1}),
        ("open", {"owner_name": "X", "email": "x@y.io"}),
    ]:
        with pytest.raises(TenureError) as refused:
            await gateway.send("account", account_id, name, payload, wait=True)
        assert refused.value.code == "INVALID_TRANSITION"
    still = await live(gateway, account_id)
    assert still.state is not None and still.state["status"] == "CLOSED"
