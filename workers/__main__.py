"""`python -m workers`: run a worker against TEMPORAL_ADDRESS and REDIS_URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from functools import partial

from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from workers.health import Readiness, serve_health
from workers.settings import Settings
from workers.watchdog import RepeatedLogFilter
from workers.worker import WorkerStatus, run_worker

# The SDK logs a failing workflow task on every retry, from Python and from its core;
# both go through one filter that says each thing once per ten minutes.
_REPEATING_LOGGERS = ("temporalio.core", "temporalio.worker._workflow_instance")


def _quiet_repeats() -> None:
    repeats = RepeatedLogFilter()
    for name in _REPEATING_LOGGERS:
        logging.getLogger(name).addFilter(repeats)
    core = LogForwardingConfig(logger=logging.getLogger(_REPEATING_LOGGERS[0]))
    Runtime.set_default(
        Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                    forwarding=core,
                )
            )
        )
    )


async def _main() -> None:
    settings = Settings.from_env()
    stop = asyncio.Event()
    status = WorkerStatus()
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
        await run_worker(settings, stop, status)
    finally:
        if health is not None:
            health.cancel()


async def _polling(status: WorkerStatus) -> bool:
    return status.polling


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    _quiet_repeats()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
    # Drained and shut down: exit now. Left to the interpreter's finalization, the SDK
    # core's threads could still call into Python and abort it ("PyGILState_Release"), and
    # an orchestrator would see a crash where there was a clean stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
