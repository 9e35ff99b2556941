"""`python -m workers`: run a worker against TEMPORAL_ADDRESS and REDIS_URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from workers.settings import Settings
from workers.watchdog import RepeatedLogFilter
from workers.worker import run_worker

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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_worker(Settings.from_env(), stop)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    _quiet_repeats()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())


if __name__ == "__main__":
    main()
