"""Waited commands to one entity, from one process, in at most a few updates at a time: the
commands that come while those are in flight wait and go together in the next one.

Temporal takes at most 10 updates in flight per workflow, and a process keeps to
`per_entity` of them (workers/delivery.py says why). Commands beyond those went by signal,
each followed by queries for its outcome until it was applied: on an entity many sagas
reserve from at once, most of its commands took that path, and every query cost the server
and the worker a task of its own. Here they wait for the next update instead, which carries
all of them (up to `max_batch`): one workflow task applies them and answers each, in the
order they came. A command waits only while its entity is busy with this process's updates;
the first ones go at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

C = TypeVar("C")
R = TypeVar("R")

Send = Callable[[str, Sequence[C], float], Awaitable[Sequence[R | Exception | None]]]
"""Sends one update to an entity (its workflow id) carrying these commands, to be answered by
the deadline (`time.monotonic()`): for each, its answer, None for it to go another way, or
the error it is to fail with."""


@dataclass
class _Waiting(Generic[C, R]):
    command: C
    deadline: float
    answer: asyncio.Future[R | None]


@dataclass
class _Lane(Generic[C, R]):
    in_flight: int = 0
    waiting: list[_Waiting[C, R]] = field(default_factory=list)


class UpdateLanes(Generic[C, R]):
    """Per entity, at most `per_entity` updates in flight; commands that come meanwhile,
    at most `max_waiting` of them, wait and go together in the next, `max_batch` at most.
    A command that cannot wait (the lane is full) is answered None at once."""

    def __init__(self, send: Send[C, R], per_entity: int, max_batch: int, max_waiting: int) -> None:
        self._send = send
        self._per_entity = per_entity
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._lanes: dict[str, _Lane[C, R]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Entities with updates in flight or commands waiting."""
        return len(self._lanes)

    async def request(
        self, workflow_id: str, command: C, deadline: float, wait_until: float
    ) -> R | None:
        """The command's answer, sent alone if its entity has room, else with the commands
        that wait with it; None if it is to go another way: refused, no room to wait, or
        no answer by `wait_until` (`time.monotonic()`) while it waited. One given up on
        after it was sent may still be applied: the other way must be safe to take too."""
        lane = self._lanes.setdefault(workflow_id, _Lane())
        if lane.in_flight < self._per_entity:
            lane.in_flight += 1
            try:
                (answer,) = await self._send(workflow_id, [command], deadline)
            finally:
                self._sent(workflow_id, lane)
            if isinstance(answer, Exception):
                raise answer
            return answer
        patience = wait_until - time.monotonic()
        if len(lane.waiting) >= self._max_waiting or patience <= 0:
            return None
        waiting = _Waiting[C, R](command, deadline, asyncio.get_running_loop().create_future())
        lane.waiting.append(waiting)
        try:
            await asyncio.wait([waiting.answer], timeout=patience)
        finally:
            if not waiting.answer.done():  # given up on (or cancelled): never sent, or let go
                waiting.answer.cancel()
                if waiting in lane.waiting:
                    lane.waiting.remove(waiting)
        if waiting.answer.cancelled():
            return None
        return waiting.answer.result()

    def _sent(self, workflow_id: str, lane: _Lane[C, R]) -> None:
        """An update of the lane's has been answered: send what waits, or drop the lane."""
        lane.in_flight -= 1
        if lane.waiting:
            batch = lane.waiting[: self._max_batch]
            del lane.waiting[: self._max_batch]
            lane.in_flight += 1
            task = asyncio.create_task(self._send_batch(workflow_id, lane, batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        elif not lane.in_flight:
            del self._lanes[workflow_id]

    async def _send_batch(
        self, workflow_id: str, lane: _Lane[C, R], batch: list[_Waiting[C, R]]
    ) -> None:
        try:
            answers = list(
                await self._send(
                    workflow_id, [w.command for w in batch], min(w.deadline for w in batch)
                )
            )
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers to {len(batch)} commands")
        except Exception as exc:
            answers = [exc] * len(batch)
        except BaseException:  # cancelled (the process stops): so are its commands
            for waiting in batch:
                waiting.answer.cancel()
            raise
        finally:
            self._sent(workflow_id, lane)
        for waiting, answer in zip(batch, answers, strict=True):
            if waiting.answer.done():  # given up on meanwhile
                continue
            if isinstance(answer, Exception):
                waiting.answer.set_exception(answer)
            else:
                waiting.answer.set_result(answer)
