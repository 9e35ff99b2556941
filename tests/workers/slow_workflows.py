"""A workflow whose query answers slowly once: for the tests of a worker short of CPU."""

from __future__ import annotations

import os
import time

from temporalio import workflow


@workflow.defn(name="SlowToAnswerOnce")
class SlowToAnswerOnce:
    """Waits as an entity does; its `answer` query takes `seconds` the first time (as a
    replay does on a worker short of CPU), marking `marker`, and is quick after."""

    @workflow.init
    def __init__(self, marker: str, seconds: float) -> None:
        self._marker = marker
        self._seconds = seconds
        self._done = False

    @workflow.run
    async def run(self, marker: str, seconds: float) -> None:
        await workflow.wait_condition(lambda: self._done)

    @workflow.signal
    def finish(self) -> None:
        self._done = True

    @workflow.query
    def answer(self) -> str:
        with workflow.unsafe.sandbox_unrestricted():
            if not os.path.exists(self._marker):
                open(self._marker, "w").close()
                time.sleep(self._seconds)
        return "answered"

    @workflow.query
    def broken(self) -> str:
        raise ValueError("a query that fails for good")

    @workflow.query
    def ping(self) -> str:
        return "pong"
