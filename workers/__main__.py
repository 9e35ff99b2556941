"""`python -m workers`: run a worker against TEMPORAL_ADDRESS and REDIS_URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from functools import partial

from opentelemetry.sdk.trace import TracerProvider
from temporalio.runtime import Runtime

from workers import event_loop
from workers.health import Readiness, serve_health
from workers.logs import RepeatedLogFilter, configure_logging
from workers.search_attributes import MissingSearchAttributes
from workers.settings import Settings, settings_or_exit
from workers.telemetry import configure_tracing
from workers.worker import WorkerStatus, run_worker, worker_runtime

# The SDK logs a failing workflow task on every retry, from Python and from its core;
# both go through one filter that says each thing once per ten minutes.
_REPEATING_LOGGERS = ("temporalio.core", "temporalio.worker._workflow_instance")

logger = logging.getLogger("workers")


def _quiet_repeats() -> logging.Logger:
    """Filter the SDK's repeating loggers; returns the one its core's logs go to."""
    repeats = RepeatedLogFilter()
    for name in _REPEATING_LOGGERS:
        logging.getLogger(name).addFilter(repeats)
    return logging.getLogger(_REPEATING_LOGGERS[0])


async def _main(
    settings: Settings, tracer_provider: TracerProvider | None, status: WorkerStatus
) -> None:
    stop = asyncio.Event()
    readiness = Readiness({"polling": partial(_polling, status)}, ttl=0)

    def stopping() -> None:
        readiness.stopping = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)
    health = None
    if settings.worker_health_port:
        health = asyncio.create_task(
            serve_health(readiness, settings.worker_health_host, settings.worker_health_port)
        )
    try:
        await run_worker(settings, stop, status, tracer_provider)
    finally:
        if health is not None:
            health.cancel()


async def _polling(status: WorkerStatus) -> bool:
    return status.polling


def main() -> None:
    settings = settings_or_exit("tenure worker")
    configure_logging(settings, "worker")
    # One SDK runtime for the process: its core's logs through the filter above, its
    # metrics (the SDK's and Tenure's) on the metrics port.
    Runtime.set_default(worker_runtime(settings, core_logs=_quiet_repeats()))
    tracer_provider = configure_tracing("tenure-worker")
    status = WorkerStatus()
    failed = False
    try:
        with contextlib.suppress(KeyboardInterrupt):
            event_loop.run(_main(settings, tracer_provider, status))
    except MissingSearchAttributes as exc:  # says what to run: no traceback needed
        failed = True
        logger.error("the worker cannot start: %s", exc)
    except Exception as exc:
        # One record in the configured format (a JSON line in production), not a bare
        # traceback on stderr that a log pipeline splits into dozens of lines.
        failed = True
        logger.error("the worker stopped: %s", exc, exc_info=exc)
    if tracer_provider is not None:
        tracer_provider.shutdown()  # the spans still buffered
    # Shut down: exit now, 0 when drained in time, 1 when not. Left to the interpreter's
    # finalization, the SDK core's threads could still call into Python and abort it
    # ("PyGILState_Release"), and an orchestrator would see a crash where there was a
    # clean stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status.drained and not failed else 1)


if __name__ == "__main__":
    main()
