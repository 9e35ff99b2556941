"""Backpressure per entity: commands to an entity that has fallen far behind are refused
before they are sent, so that nothing from outside can grow its history without bound.

Signals are accepted by Temporal whether or not the entity keeps up: with no worker, or
while one replays, a flood through the API (a hundred commands a signal, thousands a
second) piled 240,000 commands into one run in 40 s, 31 MiB of history. Every task after
that replays all of it, and Temporal terminates a run at 50 MiB, with everything it held
unapplied. A healthy run continues as new near 4 MiB, when Temporal suggests it; one past
`limit_bytes` is behind. Commands to it are refused UNAVAILABLE, nothing stored, until it
has caught up and continued as new.

Looking costs one DescribeWorkflowExecution, so an entity is looked at only while it is
hot here (`HOT_COMMANDS` in a second from this process), or while it was last seen
behind, and at most once per `LOOK_EVERY` seconds; in between the last verdict stands. A
look that fails lets commands through: they then succeed or fail on their own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import Client
from temporalio.service import RPCError

from entities.errors import ErrorCode, TenureError
from workers.temporal import within

HOT_COMMANDS = 50
"""Commands to one entity within a second, from this process, that make it worth a look."""
LOOK_EVERY = 1.0
"""Seconds between two looks at one entity."""
LOOK_TIMEOUT = 1.0
MAX_WATCHED = 10_000
"""Entities watched at once; the least recently commanded are forgotten first."""


@dataclass
class _Watch:
    window_started: float
    commands: int = 0
    looked_at: float = float("-inf")
    behind_bytes: int | None = None


class EntityBackpressure:
    """Refuses commands to entities whose current run's history is past `limit_bytes`."""

    def __init__(self, client: Client, limit_bytes: int) -> None:
        self._client = client
        self.limit_bytes = limit_bytes
        self._watches: OrderedDict[str, _Watch] = OrderedDict()

    async def admit(self, workflow_id: str, what: str) -> None:
        """Return if a command to `workflow_id` (`what`: the entity, for the message) may
        be sent; raise UNAVAILABLE if the entity is behind."""
        now = time.monotonic()
        watch = self._watch(workflow_id, now)
        watch.commands += 1
        due = now - watch.looked_at >= LOOK_EVERY
        if due and (watch.commands >= HOT_COMMANDS or watch.behind_bytes is not None):
            watch.looked_at = now  # before the call: those arriving meanwhile do not look
            watch.behind_bytes = await self._history_bytes_past_limit(workflow_id)
        if watch.behind_bytes is not None:
            raise TenureError(
                ErrorCode.UNAVAILABLE,
                f"{what} is behind: its current run holds {watch.behind_bytes / 2**20:.1f} MiB "
                f"of history (limit {self.limit_bytes / 2**20:.1f} MiB) not yet worked "
                "through; nothing was stored; retry later with the same idempotencyKey",
            )

    def _watch(self, workflow_id: str, now: float) -> _Watch:
        watch = self._watches.get(workflow_id)
        if watch is None:
            watch = self._watches[workflow_id] = _Watch(now)
            if len(self._watches) > MAX_WATCHED:
                self._watches.popitem(last=False)
        else:
            self._watches.move_to_end(workflow_id)
        if now - watch.window_started >= 1.0:
            watch.window_started, watch.commands = now, 0
        return watch

    async def _history_bytes_past_limit(self, workflow_id: str) -> int | None:
        handle = self._client.get_workflow_handle(workflow_id)
        try:
            description = await within(
                LOOK_TIMEOUT, handle.describe(rpc_timeout=timedelta(seconds=LOOK_TIMEOUT))
            )
        except RPCError:
            return None
        size = description.raw_description.workflow_execution_info.history_size_bytes
        return size if size > self.limit_bytes else None
