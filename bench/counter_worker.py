"""`python -m bench.counter_worker`: the raw counter's worker, with Tenure's worker settings.

It reads the same settings as `python -m workers` and builds its worker the same way (cache
size, concurrent workflow tasks, sandbox and its pass-through modules), so the baseline
differs from Tenure only in the workflow it hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from temporalio.client import Client
from temporalio.worker import Worker

from bench.counter import CounterWorkflow
from workers import event_loop
from workers.sandbox import workflow_runner
from workers.settings import Settings

RAW_QUEUE_SUFFIX = "-raw"


def build_counter_worker(client: Client, settings: Settings) -> Worker:
    """A worker for the counter on `<task queue>-raw`, configured like Tenure's worker."""
    return Worker(
        client,
        task_queue=settings.task_queue + RAW_QUEUE_SUFFIX,
        workflows=[CounterWorkflow],
        max_cached_workflows=settings.max_cached_workflows,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        workflow_runner=workflow_runner(settings, client.data_converter, "bench"),
    )


async def _main() -> None:
    settings = Settings.from_env()
    if not settings.temporal_address:
        raise SystemExit("TEMPORAL_ADDRESS is not set")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    async with build_counter_worker(client, settings):
        await stop.wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(_main())  # the event loop Tenure's worker runs on
