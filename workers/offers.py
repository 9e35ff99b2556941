"""Publishing what entities offer: their snapshots written to the cache by the worker that
runs them, outside their histories (`entities.runtime.offers` says what an entity offers and
why losing one is safe).

An offer is written only once Temporal has recorded the workflow task that made it. Until
then the task may be refused (a completion Temporal answers with an error, a task that timed
out) and run again at a later time, where a rule that reads the clock can decide otherwise:
the state offered would never have been. So the runner holds each activation's offers
(`OfferingRunner`), and they are let go once Temporal has taken the task's completion
(`watch` wraps the SDK's calls to its core) and no eviction of the run followed within
`SETTLE_SECONDS`: the SDK's core evicts a run whose completion the server refused, before
it reports the completion done. An eviction drops what its run holds.

`OfferedPublishes` then keeps the newest offer of each entity (a newer one carries every
change an older one did, and more) and writes them from the worker's event loop, a bounded
number at a time, within a byte budget. An offer Redis does not take is counted as dropped:
its entity publishes it by activity within its interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from temporalio.common import MetricMeter
from temporalio.worker import Worker, WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner

from entities.runtime import offers
from entities.runtime.envelope import Publication
from workers.cache import CacheUnavailable, SnapshotCache
from workers.changes import Changes
from workers.logs import RepeatedLogFilter
from workers.runners import Activation, Completion, WrappedInstance, WrappingRunner

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=10.0))

OFFERS_METRIC = "tenure_offered_publishes"
OFFERS_DESCRIPTION = (
    "Snapshots entities offered to their worker, by outcome: published; dropped (Redis did "
    "not take it, too many waited, or its workflow task was not recorded); a dropped one is "
    "published by its entity's next publish by activity, within its interval."
)
MAX_WAITING_BYTES = 64 * 1024 * 1024
"""The most the offers waiting to be written may weigh; past it new ones are dropped."""
WRITES_AT_ONCE = 32
"""Offers written at once, each to its own entity."""
SETTLE_SECONDS = 0.1
"""How long after Temporal took a task's completion its offers wait for an eviction of the
run, which would say the server refused it."""

Offer = offers.Offer


class OfferedPublishes:
    """The offers of one worker's entities, written to `cache` from the event loop that
    `start` runs on. `hold` may be called from any thread; `completed` and `evicted` from the
    loop."""

    def __init__(self, cache: SnapshotCache, meter: MetricMeter | None = None) -> None:
        self._cache = cache
        self._counter = (
            meter.create_counter(OFFERS_METRIC, OFFERS_DESCRIPTION) if meter is not None else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: dict[str, list[Offer]] = {}  # by run id, until its task is recorded
        self._settling: dict[str, list[list[Offer]]] = {}  # by run id, recorded, may be evicted
        self._waiting: dict[tuple[str, str], Offer] = {}  # by entity, until written
        self._waiting_bytes = 0
        self._writing: set[tuple[str, str]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self.watching = False

    def watch(self, worker: Worker) -> bool:
        """Learn when `worker`'s workflow task completions are taken and its runs evicted,
        by wrapping the SDK's calls to its core; False, and offers never written, when this
        SDK does not have them where this expects."""
        workflow_worker = getattr(worker, "_workflow_worker", None)
        bridge = getattr(workflow_worker, "_bridge_worker", None)
        if workflow_worker is None or not callable(bridge):
            log.error(
                "the SDK's workflow worker is not where Tenure expects it: entities publish "
                "by activity only, once per interval (the cache trails by up to 2 s)"
            )
            return False
        workflow_worker._bridge_worker = lambda: _WatchedCore(bridge(), self)
        self.watching = True
        return True

    def start(self) -> None:
        """Write offers from the running event loop until `stop`."""
        if self._running is None:
            self._loop = asyncio.get_running_loop()
            self._running = asyncio.create_task(self._write_all())

    async def stop(self) -> None:
        """Stop writing; offers not written yet are dropped (their entities publish them)."""
        running, self._running, self._loop = self._running, None, None
        tasks = [task for task in (running, *self._writes) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = [*self._held.values(), *(b for bs in self._settling.values() for b in bs)]
        self._count("dropped", len(self._waiting) + sum(map(len, held)))
        self._waiting.clear()
        self._waiting_bytes = 0
        self._held.clear()
        self._settling.clear()

    def hold(self, run_id: str, made: list[Offer]) -> None:
        """Keep one activation's offers until its task is recorded; from any thread."""
        loop = self._loop
        if loop is None or not self.watching:
            return
        # A loop that has closed raises: the entities publish by activity.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._hold, run_id, made)

    def _hold(self, run_id: str, made: list[Offer]) -> None:
        self._held.setdefault(run_id, []).extend(made)

    def completed(self, run_id: str) -> None:
        """Temporal took the completion of `run_id`'s last activation: the offers it made go
        once no eviction of the run follows."""
        made = self._held.pop(run_id, None)
        if made is None or self._loop is None:
            return
        self._settling.setdefault(run_id, []).append(made)
        self._loop.call_later(SETTLE_SECONDS, self._release, run_id, made)

    def evicted(self, run_id: str) -> None:
        """`run_id` is evicted (its completion may have been refused): drop what it holds."""
        held = [self._held.pop(run_id, []), *self._settling.pop(run_id, [])]
        self._count("dropped", sum(map(len, held)))

    def _release(self, run_id: str, made: list[Offer]) -> None:
        settling = self._settling.get(run_id, [])
        left = [batch for batch in settling if batch is not made]
        if len(left) == len(settling):
            return  # evicted meanwhile
        if left:
            self._settling[run_id] = left
        else:
            del self._settling[run_id]
        for offer in made:
            key = (offer.entity_type, offer.entity_id)
            waiting = self._waiting.get(key)
            if waiting is not None and waiting.revision > offer.revision:
                self._count("dropped")
                continue
            size = len(offer.publication) - (len(waiting.publication) if waiting else 0)
            if self._waiting_bytes + size > MAX_WAITING_BYTES:
                self._count("dropped")
                continue
            if waiting is not None:
                self._count("dropped")  # superseded: the newer one carries its changes
            self._waiting[key] = offer
            self._waiting_bytes += size
        self._ready.set()

    async def _write_all(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            for key in [key for key in self._waiting if key not in self._writing]:
                if len(self._writes) >= WRITES_AT_ONCE:
                    break
                offer = self._waiting.pop(key)
                self._waiting_bytes -= len(offer.publication)
                self._writing.add(key)
                write = asyncio.create_task(self._write(key, offer))
                self._writes.add(write)
                write.add_done_callback(self._writes.discard)

    async def _write(self, key: tuple[str, str], offer: Offer) -> None:
        try:
            publication = Publication.model_validate_json(offer.publication)
            changes = (
                Changes(publication.since, publication.changes)
                if publication.changes is not None
                else None
            )
            await self._cache.put(publication.snapshot, changes)
            self._count("published")
        except CacheUnavailable as exc:
            self._count("dropped")
            log.warning(
                "an offered snapshot did not reach the cache (Redis unavailable: %s); its "
                "entity publishes it by activity",
                exc,
            )
        except Exception:
            self._count("dropped")
            log.exception("an offered snapshot of %s %s could not be written", *key)
        finally:
            self._writing.discard(key)
            self._ready.set()  # a slot is free, and this entity may have a newer one

    def _count(self, outcome: str, n: int = 1) -> None:
        if self._counter is not None and n:
            self._counter.add(n, {"outcome": outcome})


class _WatchedCore:
    """The SDK's handle on its core, telling `OfferedPublishes` when a workflow activation's
    completion was taken (the core returns once the server answered) and when a run is
    evicted."""

    def __init__(self, inner: Any, publishes: OfferedPublishes) -> None:
        self._inner = inner
        self._publishes = publishes

    async def poll_workflow_activation(self) -> Activation:
        act: Activation = await self._inner.poll_workflow_activation()
        if any(job.HasField("remove_from_cache") for job in act.jobs):
            self._publishes.evicted(act.run_id)
        return act

    async def complete_workflow_activation(self, completion: Completion) -> None:
        try:
            await self._inner.complete_workflow_activation(completion)
        except BaseException:
            self._publishes.evicted(completion.run_id)
            raise
        self._publishes.completed(completion.run_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class OfferingRunner(WrappingRunner):
    """Runs workflows with `inner`, collecting the offers of each activation and handing
    those of one that completed without failing to `publishes` to hold."""

    def __init__(self, inner: WorkflowRunner, publishes: OfferedPublishes) -> None:
        super().__init__(inner)
        self._hold: Callable[[str, list[Offer]], None] = publishes.hold

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _OfferingInstance(self._inner.create_instance(det), self._hold)


class _OfferingInstance(WrappedInstance):
    def __init__(self, inner: WorkflowInstance, hold: Callable[[str, list[Offer]], None]) -> None:
        super().__init__(inner)
        self._hold = hold

    def activate(self, act: Activation) -> Completion:
        with offers.collecting() as made:
            completion = self._inner.activate(act)
        if made and completion.HasField("successful"):
            self._hold(act.run_id, made)
        return completion
