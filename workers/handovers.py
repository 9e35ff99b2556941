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
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote

from temporalio.client import Client
from temporalio.service import RPCError

from entities.runtime.envelope import CommandResult, OutcomeStatus
from entities.runtime.publisher import PUBLISH_SIGNAL
from entities.runtime.workflow import EntityWorkflow
from workers.cache import RedisClient
from workers.delivery import SIGNAL_TIMEOUT, sender_outcome
from workers.failures import REDIS_FAILURES, is_missing
from workers.logs import RepeatedLogFilter
from workers.temporal import ask, within

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=10.0))

PROMISE_WAIT = 0.25
"""Seconds a waited command waits to note its promise before it goes without one."""
MAX_PROMISES = 100_000
"""Promises outstanding at most: past it, commands go without (a sweep that cannot reach
Temporal leaves them), so the set stays bounded."""
SWEEP_BATCH = 500
"""Overdue promises one sweep takes up at most."""
PENDING_FOR = 600.0
"""How long a promise whose command is not applied yet (an update admitted behind a busy
entity) is kept, taken up again each time it is overdue again, to have its entity publish
once it is: past it, a command still not applied is let go, its entity asked to publish
(it publishes the command's change at its next change)."""
OUTCOME_SECONDS = 5.0
"""How long a sweep asks an entity whether a promise's command is applied."""
OUTCOMES_AT_ONCE = 16
"""How many entities a sweep asks at once."""


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


# Scores are Redis's own clock (TIME), so that API and worker hosts whose clocks differ agree
# on which promises are overdue.
_NOTE = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""
# Takes up to ARGV[2] promises noted ARGV[1] seconds ago or earlier, leasing each: its score
# moves to now, so that one worker takes it, and it is overdue again, for any worker to take
# up, if the one that took it stops before it is done. Answers the lease (a score, as a
# string) followed by the members.
_CLAIM = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
    'LIMIT', 0, tonumber(ARGV[2]))
local lease = string.format('%.6f', now)
for _, member in ipairs(due) do
    redis.call('ZADD', KEYS[1], lease, member)
end
table.insert(due, 1, lease)
return due
"""
# Removes a promise taken up, unless it was noted again since (its score is not the lease).
_DONE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and math.abs(tonumber(score) - tonumber(ARGV[2])) < 0.000001 then
    return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


class Handovers:
    """The promises of publishes taken over, in one Redis sorted set: each member names
    the entity's workflow, the command and this send of it, scored by when it was noted
    (Redis's clock)."""

    def __init__(self, client: RedisClient, prefix: str = "tenure:") -> None:
        self.client = client
        self.key = f"{prefix}handovers"
        self._note = client.register_script(_NOTE)
        self._claim = client.register_script(_CLAIM)
        self._done = client.register_script(_DONE)
        self._chores: set[asyncio.Future[Any]] = set()

    @staticmethod
    def member(workflow_id: str, command_id: str, sent_by: str | None = None) -> str:
        """A promise of its own for each send, so that two sends of one command (a retry,
        a key reused for another command) keep theirs apart, with its sender, if known,
        and when it was made (this host's clock, for PENDING_FOR). Workflow ids have no
        spaces (entity ids do not): the first one ends it; nor do command ids, nor a
        sender as written here (quoted)."""
        sender = f" {quote(sent_by, safe='')}" if sent_by is not None else ""
        return f"{workflow_id} {command_id}{sender} {uuid.uuid4().hex[:12]}.{int(time.time())}"

    @staticmethod
    def workflow_of(member: str) -> str:
        return member.split(" ", 1)[0]

    @staticmethod
    def command_of(member: str) -> str:
        return member.split(" ")[1]

    @staticmethod
    def sender_of(member: str) -> str | None:
        """Who sent the promise's command; None for one made before promises said."""
        parts = member.split(" ")
        return unquote(parts[2]) if len(parts) == 4 else None

    @staticmethod
    def made_at(member: str) -> float | None:
        """When the promise was made, epoch seconds; None for one made before they said."""
        _, _, made = member.rpartition(".")
        return float(made) if made.isdigit() else None

    async def promise(
        self, workflow_id: str, command_id: str, sent_by: str | None = None
    ) -> str | None:
        """Note that this process will publish what the entity hands it for `sent_by`'s
        command: the promise, or None when none could be noted (the entity then
        publishes)."""
        member = self.member(workflow_id, command_id, sent_by)
        noting = asyncio.ensure_future(self._note(keys=[self.key], args=[member]))
        try:
            done, _ = await asyncio.wait([noting], timeout=PROMISE_WAIT)
        except asyncio.CancelledError:
            self._withdraw_once_noted(member, noting)
            raise
        if not done:
            # Not cancelled (a Redis call cut short can leave its connection half used): a
            # promise noted late is withdrawn once noted.
            self._withdraw_once_noted(member, noting)
            log.info("no promise noted in %g s, the entity publishes", PROMISE_WAIT)
            return None
        try:
            outstanding = int(noting.result())
        except REDIS_FAILURES as exc:
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

    def _withdraw_once_noted(self, member: str, noting: asyncio.Future[Any]) -> None:
        self._chores.add(noting)
        noting.add_done_callback(functools.partial(self._noted_late, member))

    def _noted_late(self, member: str, noting: asyncio.Future[Any]) -> None:
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
        """The cache has what was promised, or nothing was handed over for it. A promise
        whose removal fails is taken up as overdue later: its entity publishes once more,
        which changes nothing."""
        try:
            await self.client.zrem(self.key, member)
        except REDIS_FAILURES as exc:
            log.info("a kept promise stays noted, to be taken up later: %s", exc)

    async def claim(self, overdue: float, limit: int = SWEEP_BATCH) -> tuple[str, list[str]]:
        """Take up promises noted `overdue` seconds ago or earlier, oldest first: the lease
        to finish them with (`done`), and the promises."""
        answer = await self._claim(keys=[self.key], args=[overdue, limit])
        lease, *members = (m.decode() if isinstance(m, bytes) else str(m) for m in answer)
        return lease, members

    async def done(self, member: str, lease: str) -> None:
        """A promise taken up under `lease` is done with."""
        await self._done(keys=[self.key], args=[member, lease])


class OverdueHandovers:
    """Asks the entities of promises not kept within `overdue` seconds to publish
    themselves, every `interval` seconds. Each promise is taken up by one worker at a time;
    one whose worker stops before it is done is taken up again `overdue` seconds later."""

    def __init__(
        self, client: Client, handovers: Handovers, overdue: float, interval: float = 5.0
    ) -> None:
        self._client = client
        self._handovers = handovers
        self._overdue = overdue
        self._interval = interval

    async def sweep(self) -> int:
        """Take up the overdue promises once: how many entities were asked to publish. A
        promise whose entity cannot be asked (Temporal out of reach) is left to its lease,
        and taken up again later."""
        lease, members = await self._handovers.claim(self._overdue)
        asked: set[str] = set()
        try:
            # Asked first, and its entity only once it is applied: a publish asked before
            # the command's task can come before it, and the command's change then went to
            # no one all the same.
            waiting = await self._not_applied_yet(members)
            for member in members:
                if member in waiting:
                    continue  # left leased: taken up again once overdue again
                workflow_id = Handovers.workflow_of(member)
                if workflow_id not in asked and await hand_back(self._client, workflow_id):
                    asked.add(workflow_id)
                await self._handovers.done(member, lease)
        finally:
            if asked:
                log.warning(
                    "%d entities' publishes were promised by an API process and not kept "
                    "within %g s (it stopped, or never got the answer): they were asked to "
                    "publish",
                    len(asked),
                    self._overdue,
                )
        return len(asked)

    async def _not_applied_yet(self, members: list[str]) -> set[str]:
        """The promises whose command is not applied yet, young enough (PENDING_FOR) to wait
        for it, asked of their entities OUTCOMES_AT_ONCE at a time. An update admitted
        behind a busy entity is applied later, handed over to a sender that is gone, and
        counted published: taken up once and let go, the promise left that change in no
        cache and no stream until the entity changed again (for a dormant account,
        never)."""
        limit = asyncio.Semaphore(OUTCOMES_AT_ONCE)

        async def waiting(member: str) -> bool:
            made = Handovers.made_at(member)
            if made is None or time.time() - made > PENDING_FOR:
                return False
            handle = self._client.get_workflow_handle(Handovers.workflow_of(member))

            async def outcome_of(command_id: str) -> CommandResult:
                return await ask(
                    handle,
                    EntityWorkflow.outcome,
                    command_id,
                    result_type=CommandResult,
                    seconds=OUTCOME_SECONDS,
                )

            async with limit:
                try:
                    # Another sender's command under the key: this sender's is recorded
                    # under its own id (`sender_key`), applied or not yet.
                    result = await sender_outcome(
                        outcome_of, Handovers.command_of(member), Handovers.sender_of(member)
                    )
                except RPCError as exc:
                    return not is_missing(exc)  # asked again later, unless it is gone
                except Exception as exc:  # its own failure holds back no other promise
                    log.warning("%s could not tell its outcome, asked again later: %s", member, exc)
                    return True
            return result.outcome.status is OutcomeStatus.UNKNOWN

        answers = await asyncio.gather(*(waiting(member) for member in members))
        return {member for member, wait in zip(members, answers, strict=True) if wait}

    async def run(self) -> None:
        """Sweep every `interval` seconds until cancelled; a sweep that fails, whatever
        failed, is retried."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # a loop that ended would leave promises for good
                log.warning("taking up overdue publishes failed, retried later: %s", exc)
            await asyncio.sleep(self._interval)
