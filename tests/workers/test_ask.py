"""A worker short of CPU: a query it could not answer within the SDK's 2 s ("[TMPRL1101]
Potential deadlock detected") is asked again (`workers.temporal.ask`), and a workflow the
SDK then cannot drop from its cache does not stay frozen: the worker is replaced
(`workers.worker.run_worker`).

Found in `make bench`: its check of 20,000 accounts, each replayed by a worker still busy
with the scenario, failed on the first query that took over 2 s. Such an activation is
interrupted mid-way, the SDK cannot evict the workflow (temporalio/sdk-python#806), and
that workflow gets no task on the worker again: its queries go unanswered, its signals
unapplied, and the worker cannot shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from entities import catalog
from tests.conftest import WorkerFactory
from tests.workers.slow_workflows import SlowToAnswerOnce
from workers import worker as worker_module
from workers.settings import Settings
from workers.temporal import ask
from workers.worker import run_worker, until_eviction_stuck

SLOW_FOR = 2.5  # past the SDK's 2 s for one activation


@contextlib.asynccontextmanager
async def serving(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The production worker loop, hosting the entities and SlowToAnswerOnce."""
    workflows = catalog.workflows
    monkeypatch.setattr(catalog, "workflows", lambda: [*workflows(), SlowToAnswerOnce])
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)


async def slow_once(client: Client, settings: Settings, tmp_path: Path) -> WorkflowHandle:
    return await client.start_workflow(
        SlowToAnswerOnce.run,
        args=[str(tmp_path / "answered-slowly"), SLOW_FOR],
        id=f"slow-{uuid.uuid4().hex[:8]}",
        task_queue=settings.task_queue,
    )


async def test_a_workflow_whose_query_overran_is_answered_and_served_again(
    temporal_client: Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(settings, monkeypatch):
        handle = await slow_once(temporal_client, settings, tmp_path)
        # Running and idle: the next query goes to the worker on its own, outside any task.
        assert await ask(handle, SlowToAnswerOnce.ping, result_type=str, seconds=30) == "pong"
        answer = await ask(handle, SlowToAnswerOnce.answer, result_type=str, seconds=30)
        assert answer == "answered"
        assert (tmp_path / "answered-slowly").exists()  # its first answer overran
        # A query that fails for another reason is not asked again.
        with pytest.raises(WorkflowQueryFailedError, match="fails for good"):
            await ask(handle, SlowToAnswerOnce.broken, result_type=str, seconds=30)
        # One the worker does not know (an older release's, in a rolling deploy): the
        # entity is fine, and a newer worker would answer; UNAVAILABLE, not INTERNAL.
        with pytest.raises(RPCError) as unknown:
            await ask(handle, "added_in_a_later_release", result_type=str, seconds=30)
        assert unknown.value.status is RPCStatusCode.UNAVAILABLE
        # And it is served again: a signal is applied, and the workflow ends.
        await handle.signal(SlowToAnswerOnce.finish)
        await asyncio.wait_for(handle.result(), 30)


class _Stuck:
    """A worker as `until_eviction_stuck` sees it: one workflow it cannot drop."""

    def stuck_evictions(self) -> int:
        return 1


async def test_a_worker_replaced_for_a_stuck_eviction_is_not_replaced_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker whose evictions time out for want of CPU would otherwise drop its whole
    # cache again and again.
    monkeypatch.setattr(worker_module, "STUCK_REPLACEMENTS_APART", 0.5)
    monkeypatch.setattr(worker_module, "EVICTION_CHECK_INTERVAL", 0.05)
    stuck: Any = _Stuck()
    await asyncio.wait_for(until_eviction_stuck(stuck), 1)  # the first time: at once
    waiting = asyncio.create_task(until_eviction_stuck(stuck, time.monotonic()))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await asyncio.wait_for(waiting, 2)


async def test_a_worker_holding_a_workflow_it_cannot_evict_still_shuts_down(
    temporal_client: Client,
    settings: Settings,
    run_worker: WorkerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its shutdown would wait for that eviction for good (a test's worker hung so until
    the run's time limit); it gives up, and the next worker serves the workflow."""
    workflows = catalog.workflows
    monkeypatch.setattr(catalog, "workflows", lambda: [*workflows(), SlowToAnswerOnce])
    async with asyncio.timeout(60):
        async with run_worker() as stuck:
            handle = await slow_once(temporal_client, settings, tmp_path)
            assert await ask(handle, SlowToAnswerOnce.ping, result_type=str, seconds=30) == "pong"
            with pytest.raises(WorkflowQueryFailedError, match="TMPRL1101"):
                await handle.query(SlowToAnswerOnce.answer)
            while not stuck.stuck_evictions():
                await asyncio.sleep(0.1)
    async with run_worker():
        answer = await ask(handle, SlowToAnswerOnce.answer, result_type=str, seconds=30)
        assert answer == "answered"
        await handle.signal(SlowToAnswerOnce.finish)
        await asyncio.wait_for(handle.result(), 30)
