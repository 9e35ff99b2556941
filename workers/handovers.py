"""Publishes an API process takes over from the entities it sends waited commands to.

An entity answering an update can hand the snapshot its command made, with the changes
since its last publish, to the sender (`CommandEnvelope.publishes`), and leave out its own
publish activity and the workflow task that activity's completion brings: about half of
what Temporal spends on a waited command (bench/primitives.py: an update costs the server
6.7 ms of CPU, an update and an activity 12.7). The API writes the answer to the cache
anyway, so that its caller reads its own write: it writes the changes with it.

A saga's request is an activity, retried until it has published (workers/requests.py). An
API request is not: its process can die between the answer and the write, or never get
the answer (an update answered after its sender gave up). So before such an update the API
notes a promise in Redis (`promise`), and removes it once the cache has what it was handed
(`kept`). A promise still there after `overdue` seconds is taken up by a worker
(`OverdueHandovers`): it asks the entity to publish itself (`hand_back`), which it does,
with every change since its last publish. When no promise can be noted (Redis down or slow,
or too many outstanding), the command goes without one, and its entity publishes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from datetime import timedelta
from typing import Any

from redis.exceptions import RedisError
from temporalio.client import Client
from temporalio.service import RPCError

from entities.runtime.publisher import PUBLISH_SIGNAL
from workers.cache import RedisClient
from workers.delivery import SIGNAL_TIMEOUT
from workers.failures import is_missing
from workers.logs import RepeatedLogFilter
from workers.temporal import within

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=10.0))

PROMISE_WAIT = 0.25
"""Seconds a waited command waits to note its promise before it goes without one."""
MAX_PROMISES = 100_000
"""Promises outstanding at most: past it, commands go without (a sweep that cannot reach
Temporal leaves them), so the set stays bounded."""
SWEEP_BATCH = 500
"""Overdue promises one sweep takes up at most."""


async def hand_back(client: Client, workflow_id: str) -> bool:
    """Ask the entity to publish what it handed over (`PUBLISH_SIGNAL`): whether it was
    asked. False when it has closed (an entity publishes its own end); raises RPCError when
    Temporal could not be reached."""
    handle = client.get_workflow_handle(workflow_id)
    try:
        await within(
            SIGNAL_TIMEOUT,
            handle.signal(PUBLISH_SIGNAL, rpc_timeout=timedelta(seconds=SIGNAL_TIMEOUT)),
        )
    except RPCError as exc:
        if is_missing(exc):
            return False
        raise
    return True


class Handovers:
    """The promises of publishes taken over, in one Redis sorted set: each member a
    workflow id and a command id, scored by when it was noted."""

    def __init__(self, client: RedisClient, prefix: str = "tenure:") -> None:
        self.client = client
        self.key = f"{prefix}handovers"
        self._chores: set[asyncio.Future[Any]] = set()

    @staticmethod
    def member(workflow_id: str, command_id: str) -> str:
        # Command ids have no spaces (inbox.COMMAND_ID): the last one splits the two.
        return f"{workflow_id} {command_id}"

    async def promise(self, workflow_id: str, command_id: str) -> str | None:
        """Note that this process will publish what the entity hands it for this command:
        the promise, or None when none could be noted (the entity then publishes)."""
        member = self.member(workflow_id, command_id)
        noting = asyncio.ensure_future(self._note(member))
        done, _ = await asyncio.wait([noting], timeout=PROMISE_WAIT)
        if not done:
            # Not cancelled (a Redis call cut short can leave its connection half used): a
            # promise noted late is withdrawn once noted.
            self._chores.add(noting)
            noting.add_done_callback(functools.partial(self._noted_late, member))
            log.info("no promise noted in %g s, the entity publishes", PROMISE_WAIT)
            return None
        try:
            outstanding = noting.result()
        except (RedisError, OSError) as exc:
            log.info("no promise noted, the entity publishes: %s", exc)
            return None
        if outstanding > MAX_PROMISES:
            await self.kept(member)
            log.warning(
                "%d publishes promised and not kept: waited commands go without a promise, "
                "and their entities publish them, until workers take the overdue ones up",
                outstanding,
            )
            return None
        return member

    async def _note(self, member: str) -> int:
        """Note the promise: how many are outstanding with it."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(self.key, {member: time.time()})
            pipe.zcard(self.key)
            _, outstanding = await pipe.execute()
        return int(outstanding)

    def _noted_late(self, member: str, noting: asyncio.Future[int]) -> None:
        self._chores.discard(noting)
        if noting.cancelled() or noting.exception() is not None:
            return
        withdrawing = asyncio.ensure_future(self.kept(member))
        self._chores.add(withdrawing)
        withdrawing.add_done_callback(self._chores.discard)

    async def aclose(self, timeout: float) -> None:
        """Wait at most `timeout` seconds for promises noted late to be withdrawn."""
        if self._chores:
            await asyncio.wait(self._chores, timeout=timeout)

    async def kept(self, member: str) -> None:
        """The cache has what was promised. A promise whose removal fails is taken up as
        overdue later: its entity publishes once more, which changes nothing."""
        try:
            await self.client.zrem(self.key, member)
        except (RedisError, OSError) as exc:
            log.info("a kept promise stays noted, to be taken up later: %s", exc)

    async def overdue(self, noted_before: float, limit: int = SWEEP_BATCH) -> list[str]:
        """Promises noted before `noted_before` (epoch seconds), oldest first."""
        members = await self.client.zrangebyscore(
            self.key, "-inf", noted_before, start=0, num=limit
        )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    async def claim(self, member: str) -> bool:
        """Take a promise up: whether this process did (another may have first)."""
        return bool(await self.client.zrem(self.key, member))

    async def renote(self, member: str) -> None:
        """Note a promise taken up and not handed back again, as new."""
        await self.client.zadd(self.key, {member: time.time()})

    async def outstanding(self) -> int:
        return int(await self.client.zcard(self.key))


class OverdueHandovers:
    """Asks the entities of promises not kept within `overdue` seconds to publish
    themselves, every `interval` seconds: one worker process takes each promise up."""

    def __init__(
        self, client: Client, handovers: Handovers, overdue: float, interval: float = 5.0
    ) -> None:
        self._client = client
        self._handovers = handovers
        self._overdue = overdue
        self._interval = interval

    async def sweep(self) -> int:
        """Take up the overdue promises once: how many entities were asked to publish."""
        asked: set[str] = set()
        for member in await self._handovers.overdue(time.time() - self._overdue):
            if not await self._handovers.claim(member):
                continue
            workflow_id = member.rpartition(" ")[0]
            if workflow_id in asked:
                continue
            try:
                if await hand_back(self._client, workflow_id):
                    asked.add(workflow_id)
            except RPCError:
                await self._handovers.renote(member)
                raise
        if asked:
            log.warning(
                "%d entities' publishes were promised by an API process and not kept "
                "within %g s (it stopped, or never got the answer): they were asked to "
                "publish",
                len(asked),
                self._overdue,
            )
        return len(asked)

    async def run(self) -> None:
        """Sweep every `interval` seconds until cancelled; a failed sweep is retried."""
        while True:
            try:
                await self.sweep()
            except (RPCError, RedisError, OSError) as exc:
                log.warning("taking up overdue publishes failed, retried later: %s", exc)
            await asyncio.sleep(self._interval)
