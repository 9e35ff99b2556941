"""`python -m workers`: run a worker against TEMPORAL_ADDRESS and REDIS_URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from workers.settings import Settings
from workers.worker import run_worker


async def _main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_worker(Settings.from_env(), stop)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())


if __name__ == "__main__":
    main()
