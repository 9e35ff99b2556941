"""Finding entities that have stopped making progress, and saying so once.

An entity whose workflow tasks keep failing takes signals but applies none of them. Temporal
flags such a workflow in visibility (the `TemporalReportedProblems` search attribute, set
after a few consecutive task failures or timeouts and cleared by the next good task; a
cluster turns it on with the dynamic config value
`system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute`, the embedded dev server
here sets it to 3). The watchdog asks for flagged entities of its task queue every
`interval` seconds, marks each in the cache so that its cached reads say `stale: true`,
logs it once with how to repair it, and clears the mark (and logs the recovery) when the
flag goes. The marks of a task queue are listed in Redis (`SnapshotCache.stuck_marks`), so a
watchdog clears a mark it did not make (its worker restarted, another worker's watchdog
made it) or could not clear before (Redis away): one only remembered in memory outlived
them, and a healthy entity read `stale: true` until its next change. A newer snapshot clears
the mark as well (see `workers/cache.py`). With
`auto_repair`, an entity stuck because its history no longer replays is repaired at once.

Other workflows of the task queue found so (a checkout saga) are logged once too, with no
mark or repair: they are no entity. With a metric meter it exports how many workflows it
finds stuck, by type (STUCK_METRIC, a gauge set at each sweep), and its repairs by outcome
(REPAIRS_METRIC), for alerts that page: a log line alone told no one of one stuck account.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.service import RPCError, RPCStatusCode

from entities import catalog
from entities.errors import TenureError
from workers import leases
from workers.cache import CacheUnavailable, SnapshotCache
from workers.failures import REDIS_FAILURES
from workers.logs import RepeatedLogFilter
from workers.repair import RepairDeferred, repair

log = logging.getLogger(__name__)
_deferred = logging.getLogger(f"{__name__}.deferred")
# Deferred at every sweep (10 s) for as long as a deploy lasts: said once in five minutes.
_deferred.addFilter(RepeatedLogFilter(window=300.0))

PROBLEMS = "TemporalReportedProblems"
REPAIR_CLAIM_SECONDS = 300.0
"""How long a watchdog's claim to repair a run keeps others' off it: far longer than a
repair takes (a history fetched and replayed a dozen times at most, seconds), short enough
that a worker that died while repairing leaves the run to others five minutes on."""
PASSING = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.ABORTED,
    }
)
"""Temporal's answers that say nothing of the run (out of reach, busy): a repair met with
one is tried again at the next sweep; any other is the run's answer, and it is not."""
NONDETERMINISM = "NonDeterministicError"
STUCK_METRIC = "tenure_stuck_workflows"
STUCK_DESCRIPTION = (
    "Workflows of the task queue whose workflow tasks keep failing, at the last sweep, by "
    "workflow type: entities, and the checkouts and others the watchdog can only report."
)
REPAIR_OUTCOMES = ("repaired", "failed", "deferred")
REPAIRS_METRIC = "tenure_entity_repairs"
REPAIRS_DESCRIPTION = (
    "The watchdog's automatic repairs by outcome: repaired; failed (left to an operator); "
    "deferred (the build that went on still polls)."
)


class StuckEntityWatchdog:
    """Marks the entities of one task queue whose workflow tasks keep failing."""

    def __init__(
        self,
        client: Client,
        cache: SnapshotCache,
        task_queue: str,
        interval: float = 10.0,
        auto_repair: bool = False,
        build_id: str | None = None,
        meter: MetricMeter | None = None,
    ) -> None:
        self._client = client
        self._cache = cache
        self._task_queue = task_queue
        self._interval = interval
        self._auto_repair = auto_repair
        self._build_id = build_id
        """Its worker's build: a run whose later tasks another build completed is not
        repaired automatically (`repair`'s `only_build`)."""
        self._stuck_gauge = meter.create_gauge(STUCK_METRIC, STUCK_DESCRIPTION) if meter else None
        self._repairs = meter.create_counter(REPAIRS_METRIC, REPAIRS_DESCRIPTION) if meter else None
        if self._repairs is not None:
            # Each series from 0, so that its first repair is an increase Prometheus sees
            # (TenureRepairFailed): one born at 1 never was.
            for outcome in REPAIR_OUTCOMES:
                self._repairs.add(0, {"outcome": outcome})
        self._types = set(catalog.entity_types())
        self.stuck: dict[str, str] = {}
        """Workflow id of each entity found stuck, and why."""
        self.stuck_others: dict[str, str] = {}
        """Workflow id of each other workflow found stuck (a checkout), and why."""
        self._types_reported: set[str] = set()
        self._tried: dict[str, str] = {}
        """The run of each stuck entity that auto-repair tried: tried once, not again."""

    async def sweep(self) -> dict[str, str]:
        """Look once; returns the entities stuck now, by workflow id."""
        query = (
            f'TaskQueue = "{self._task_queue}" AND ExecutionStatus = "Running" '
            f"AND {PROBLEMS} IS NOT NULL"
        )
        # The marks read before the look: one another worker makes after it, of an entity
        # this look did not find yet, is not cleared by this sweep.
        try:
            marked = await self._cache.stuck_marks(self._task_queue)
        except CacheUnavailable as exc:  # the marks cleared at the next sweep
            log.warning("cache unavailable, stuck marks not read: %s", exc)
            marked = set()
        found: dict[str, str] = {}
        others: dict[str, str] = {}
        runs: dict[str, str] = {}
        by_type: dict[str, int] = {}
        async for execution in self._client.list_workflows(query):
            entity_type, _, entity_id = execution.id.partition(":")
            reason = _reason(execution.search_attributes.get(PROBLEMS))
            by_type[execution.workflow_type] = by_type.get(execution.workflow_type, 0) + 1
            if entity_type in self._types and entity_id:
                found[execution.id] = reason
                runs[execution.id] = execution.run_id
            else:
                others[execution.id] = reason
        for workflow_id, reason in others.items():
            if workflow_id not in self.stuck_others:
                log.error(
                    "workflow %s is stuck: its workflow tasks keep failing (%s). Fix the "
                    "cause (deploy the fix); it goes on once its code replays its history, "
                    "or reset it with `temporal workflow reset`.",
                    workflow_id,
                    reason,
                )
        self.stuck_others = others
        self._report(by_type)  # before anything below that may fail: never left stale
        for workflow_id, reason in found.items():
            if workflow_id not in self.stuck:
                log.error(
                    "entity %s is stuck: its workflow tasks keep failing (%s). It takes "
                    "commands but applies none, and its reads now say stale: true. Fix the "
                    "cause, then run `tenure repair %s` to reset it to its last good task.",
                    workflow_id,
                    reason,
                    workflow_id.replace(":", " ", 1),
                )
            await self._mark(workflow_id, reason)
            if self._auto_repair and NONDETERMINISM in reason:
                await self._repair(workflow_id, runs[workflow_id])
        for workflow_id in (set(self.stuck) | marked) - set(found):
            entity_type, _, entity_id = workflow_id.partition(":")
            try:
                await self._cache.clear_stuck(entity_type, entity_id, self._task_queue)
            except CacheUnavailable as exc:  # still listed: cleared at a later sweep
                log.warning("cache unavailable, %s still marked stuck: %s", workflow_id, exc)
                continue
            log.warning("entity %s makes progress again", workflow_id)
        self.stuck = found
        self._tried = {w: run for w, run in self._tried.items() if w in found}
        return found

    def _report(self, by_type: dict[str, int]) -> None:
        """The stuck workflows counted by type; 0 for a type none of which is stuck now."""
        if self._stuck_gauge is None:
            return
        for workflow_type in self._types_reported | set(by_type):
            self._stuck_gauge.set(by_type.get(workflow_type, 0), {"workflow_type": workflow_type})
        self._types_reported |= set(by_type)
        if not self._types_reported:
            self._stuck_gauge.set(0)  # a series from the first sweep, for the alert

    def _count(self, outcome: str) -> None:
        if self._repairs is not None:
            self._repairs.add(1, {"outcome": outcome})

    async def _repair(self, workflow_id: str, run_id: str) -> None:
        """Reset an entity whose history its own code no longer replays to its last good
        task, commands re-applied (each command still applied once: the ledger), unless
        another worker's watchdog repairs it now (`_claim`). The SDK's core has written such
        histories itself, after a worker was killed mid-task (the soak saw "No command
        scheduled for event ActivityTaskScheduled"); left alone, the entity would take
        commands and apply none for good. Each stuck run is tried once: one that cannot be
        repaired (no task of it replays) was tried at every sweep, a history fetched and
        replayed every 10 s, until an operator came; a run a repair made that is stuck again
        is a new run, tried once in its turn. Only a repair Temporal did not answer (out of
        reach, busy) is tried again at the next sweep."""
        if self._tried.get(workflow_id) == run_id:
            return
        claim = await self._claim(workflow_id)
        if claim is None:
            return  # another worker's watchdog repairs it now
        entity_type, _, entity_id = workflow_id.partition(":")
        try:
            done = await repair(self._client, entity_type, entity_id, only_build=self._build_id)
        except RepairDeferred as exc:  # tried again at the next sweep
            _deferred.warning("not repairing %s yet: %s", workflow_id, exc)
            self._count("deferred")
            return
        except (RPCError, TenureError) as exc:
            if isinstance(exc, RPCError) and exc.status in PASSING:
                log.warning("could not repair %s yet: %s", workflow_id, exc)
                return
            self._tried[workflow_id] = run_id
            self._count("failed")
            log.warning(
                "could not repair %s: %s; its run %s is not tried again (`tenure repair` it "
                "once its cause is fixed)",
                workflow_id,
                exc,
                run_id,
            )
            return
        finally:
            await self._release(workflow_id, claim)
        self._tried[workflow_id] = run_id
        self._count("repaired")
        log.error(
            "entity %s repaired: reset to the task completed at event %d, %d commands re-applied",
            workflow_id,
            done.reset_to_event,
            done.commands_reapplied,
        )

    def _claim_key(self, workflow_id: str) -> str:
        return f"{self._cache.prefix}repair-claim:{{{workflow_id}}}"

    async def _claim(self, workflow_id: str) -> str | None:
        """This watchdog's claim to repair the workflow's run now, or None while another
        worker's holds one (in Redis, for at most REPAIR_CLAIM_SECONDS). Every worker's watchdog
        finds a stuck entity, and two repairs of one run whose checks and resets met reset
        it twice, the second ending the run the first made and the commands it had taken
        since; a repair re-checks the run just before its reset, which leaves milliseconds.
        With Redis out of reach, it repairs unclaimed, as before."""
        claim = uuid.uuid4().hex
        try:
            taken = await leases.take(
                self._cache.client, self._claim_key(workflow_id), claim, REPAIR_CLAIM_SECONDS
            )
        except REDIS_FAILURES as exc:
            log.warning("cache unavailable, repairing %s unclaimed: %s", workflow_id, exc)
            return claim
        return claim if taken else None

    async def _release(self, workflow_id: str, claim: str) -> None:
        """Let the claim go once the repair is over, whatever came of it: a run Temporal
        did not answer for is tried again at the next sweep, by whichever worker."""
        with contextlib.suppress(*REDIS_FAILURES):
            await leases.release(self._cache.client, self._claim_key(workflow_id), claim)

    async def _mark(self, workflow_id: str, reason: str) -> None:
        entity_type, _, entity_id = workflow_id.partition(":")
        try:
            await self._cache.mark_stuck(entity_type, entity_id, reason, self._task_queue)
        except CacheUnavailable as exc:
            log.warning("cache unavailable, %s not marked stuck: %s", workflow_id, exc)

    async def run(self) -> None:
        """Sweep every `interval` seconds until cancelled; a failed sweep is retried."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # whatever failed: a loop that ended would watch no more
                log.warning("stuck-entity sweep failed: %s", exc)
            await asyncio.sleep(self._interval)


def _reason(problems: Any) -> str:
    if isinstance(problems, list | tuple) and problems:
        return ", ".join(str(p) for p in problems)
    return "repeated workflow task failures"
