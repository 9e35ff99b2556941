"""Group commit for signals: commands to one entity that meet in flight share one signal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
    instead of one per command, and its history grows by as few events.
    """

    def __init__(self, send_batch: SendBatch, max_batch: int = 100) -> None:
        self._send_batch = send_batch
        self._max_batch = max_batch
        self._queues: dict[str, list[_Queued]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}

    async def send(self, workflow_id: str, envelope: CommandEnvelope) -> None:
        """Return once the signal carrying `envelope` was accepted; raise what it raised."""
        queued = _Queued(envelope, asyncio.get_running_loop().create_future())
        self._queues.setdefault(workflow_id, []).append(queued)
        if workflow_id not in self._senders:
            self._senders[workflow_id] = asyncio.create_task(self._drain(workflow_id))
        await queued.delivered

    async def _drain(self, workflow_id: str) -> None:
        try:
            while queue := self._queues.get(workflow_id):
                batch = [q for q in queue[: self._max_batch] if not q.delivered.done()]
                self._queues[workflow_id] = queue[self._max_batch :]
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
