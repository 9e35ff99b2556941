"""A worker process runs on uvloop, which the project installs everywhere but Windows."""

from __future__ import annotations

import asyncio

import uvloop

from workers import event_loop


def test_a_worker_process_runs_its_coroutine_to_the_end_on_uvloop() -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert event_loop.run(main()) == uvloop.Loop.__module__
