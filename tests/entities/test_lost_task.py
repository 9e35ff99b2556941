"""A workflow task taken by a worker that died holding it: Temporal gives it again after its
timeout, with whatever came meanwhile. The commands it carried are applied once, a waited
one answers once retried with its key, and the history it leaves replays.

The dying worker is a bare poll of the task queue that never answers, so that the task it
holds is known: an update's, or signals'. Everything else is the real worker and server.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    PollWorkflowTaskQueueRequest,
    PollWorkflowTaskQueueResponse,
)
from temporalio.client import Client

from api.gateway import EntityGateway, Receipt
from entities.runtime.envelope import RuntimeOptions
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import send_as_a_client, until_idle
from tests.entities.test_backlog import run_histories
from tests.entities.test_runtime import live, open_active
from workers.cache import SnapshotCache
from workers.sandbox import entity_replayer
from workers.settings import Settings

SIGNALS = 5  # more than a task applies (3): some are held back, the patch marked
SENDS = 8  # a waited command sent again with its key, at most (each waits up to 6 s)


@pytest.mark.parametrize("lost", ["update", "signals"])
async def test_a_task_lost_with_its_worker_is_applied_once_and_replays(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    run_worker: WorkerFactory,
    lost: str,
) -> None:
    settings = settings.model_copy(
        update={
            "runtime": RuntimeOptions(max_commands_per_task=3, max_commands_per_run=1000),
            # So that the task is not held for the stopped worker first (10 s more).
            "sticky_timeout": 1.0,
        }
    )
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    handle = temporal_client.get_workflow_handle(f"account:{account_id}")
    async with run_worker(settings):
        await open_active(gateway, account_id)
        await until_idle(temporal_client, handle.id)  # no task pending when the worker goes
    await asyncio.sleep(settings.sticky_timeout + 0.5)

    async def deposit(key: str, wait: bool) -> Receipt:
        return await send_as_a_client(
            gateway,
            "account",
            account_id,
            "deposit",
            {"amount": 1},
            key=key,
            wait=wait,
            sends=SENDS,
        )

    async def signals() -> None:
        for n in range(SIGNALS):
            await deposit(f"s{n}", wait=False)

    dying = asyncio.create_task(_poll(temporal_client, settings.task_queue))
    await asyncio.sleep(0.5)  # polling before anything comes
    if lost == "update":
        waited = asyncio.create_task(deposit("u", wait=True))
        held = await dying
        assert len(held.messages) == 1  # the task held is the update's
        await signals()
    else:
        await signals()
        held = await dying
        assert not held.messages and held.history.events  # the signals'
        waited = asyncio.create_task(deposit("u", wait=True))
    async with run_worker(settings):
        receipt = await waited
        assert receipt.applied
        # Sent again: applied once.
        await deposit("u", wait=True)
        await deposit("s0", wait=True)
        snapshot = await live(gateway, account_id)
        histories = await run_histories(temporal_client, handle.id)
    assert snapshot.state is not None and snapshot.state["balance"] == SIGNALS + 1
    assert snapshot.revision == 2 + SIGNALS + 1  # open, verify, the deposits once each
    replayer = entity_replayer(temporal_client.data_converter)
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, result.replay_failure


async def _poll(client: Client, task_queue: str) -> PollWorkflowTaskQueueResponse:
    """Take the queue's next workflow task as a worker would, and never answer it."""
    return await client.workflow_service.poll_workflow_task_queue(
        PollWorkflowTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            identity="a worker about to die",
        )
    )
