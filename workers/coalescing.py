"""Group commit for signals: commands to one entity that meet in flight share one signal."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import CommandEnvelope

SendBatch = Callable[[str, list[CommandEnvelope]], Awaitable[None]]


@dataclass
class _Queued:
    envelope: CommandEnvelope
    delivered: asyncio.Future[None]


class SignalCoalescer:
    """Sends each workflow its commands in as few signals as possible, in arrival order.

    A command to a workflow with no signal in flight goes at once, alone: no added latency.
    Commands that arrive while one is in flight wait for it and then go together in one
    signal, up to `max_batch`. A hot entity then costs Temporal one signal per round trip
    instead of one per command, and its history grows by as few events. At most
    `max_queued` wait for one workflow (ten signals' worth): while Temporal does not answer
    (a signal may take 5 s), a flood to one entity parked every request, tens of thousands
    in a minute, the last for many minutes; beyond it a command is refused, not stored.
    """

    def __init__(
        self, send_batch: SendBatch, max_batch: int = 100, max_queued: int | None = None
    ) -> None:
        self._send_batch = send_batch
        self._max_batch = max_batch
        self._max_queued = max_queued if max_queued is not None else 10 * max_batch
        self._queues: dict[str, deque[_Queued]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}

    async def send(self, workflow_id: str, envelope: CommandEnvelope) -> None:
        """Return once the signal carrying `envelope` was accepted; raise what it raised."""
        queue = self._queues.setdefault(workflow_id, deque())
        if len(queue) >= self._max_queued:
            raise TenureError(
                ErrorCode.UNAVAILABLE,
                f"{workflow_id} has {len(queue)} commands waiting to be sent to it; nothing "
                "was stored; retry later with the same idempotencyKey",
            )
        queued = _Queued(envelope, asyncio.get_running_loop().create_future())
        queue.append(queued)
        if workflow_id not in self._senders:
            self._senders[workflow_id] = asyncio.create_task(self._drain(workflow_id))
        await queued.delivered

    async def _drain(self, workflow_id: str) -> None:
        try:
            while queue := self._queues.get(workflow_id):
                taken = [queue.popleft() for _ in range(min(self._max_batch, len(queue)))]
                batch = [q for q in taken if not q.delivered.done()]
                if not batch:
                    continue
                try:
                    await self._send_batch(workflow_id, [q.envelope for q in batch])
                except Exception as exc:
                    for q in batch:
                        if not q.delivered.done():
                            q.delivered.set_exception(exc)
                else:
                    for q in batch:
                        if not q.delivered.done():
                            q.delivered.set_result(None)
        finally:
            # No await since the loop found the queue empty: nothing can have slipped in.
            self._senders.pop(workflow_id, None)
            self._queues.pop(workflow_id, None)
