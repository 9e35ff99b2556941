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
it reports the completion done. An eviction drops what its run holds. A task with a query
has several activations, and the core reports it with the last: offers wait for that one.
The run's next task proves the last recorded (the server sends it only then), and lets its
offers go at once.

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
from dataclasses import dataclass
from typing import Any

from temporalio.common import MetricMeter
from temporalio.worker import Worker, WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner

from entities.runtime import offers
from entities.runtime.envelope import Publication
from workers.cache import CacheUnavailable, SnapshotCache
from workers.logs import RepeatedLogFilter
from workers.publish_lag import BY_OFFER, lag_histogram, record_lag
from workers.runners import Activation, Completion, WrappedInstance, WrappingRunner

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter(window=10.0))

OFFERS_METRIC = "tenure_offered_publishes"
OFFERS_DESCRIPTION = (
    "Snapshots entities offered to their worker, by outcome: published; superseded (a newer "
    "offer of the entity, which carries its changes, came before it was written); dropped "
    "(Redis did not take it, too many waited, or its workflow task may not have been "
    "recorded), which its entity's next publish by activity publishes, within its interval."
)
MAX_WAITING_BYTES = 64 * 1024 * 1024
"""The most the offers waiting to be written may weigh; past it new ones are dropped."""
WRITES_AT_ONCE = 32
"""Offers written at once, each to its own entity."""
SETTLE_SECONDS = 0.1
"""How long after Temporal took a task's completion its offers wait for an eviction of the
run, which would say the server refused it."""
LATE_SECONDS = 0.02
"""A settling timer that runs later than this waits once more: the loop was behind, and may
not have taken in an eviction the core had handed over."""
ENDS_RUN = (
    "complete_workflow_execution",
    "fail_workflow_execution",
    "cancel_workflow_execution",
    "continue_as_new_workflow_execution",
)
"""Commands that end a run: Temporal refuses the completion that carries one when a command
came meanwhile, and the task runs again."""

Offer = offers.Offer


@dataclass(frozen=True, eq=False)
class _Batch:
    """The offers one activation made, at the history length it ran at."""

    history_length: int
    offers: list[Offer]


@dataclass(frozen=True)
class Taken:
    """What a completion took when it went to the core: the batches its activation made,
    the number of the last poll of its run, and whether the run was being evicted."""

    batches: list[_Batch]
    polled: int
    evicting: bool


class OfferedPublishes:
    """The offers of one worker's entities, written to `cache` from the event loop that
    `start` runs on. `hold` may be called from any thread; `polled`, `take_held` and
    `completed` from the loop (`_WatchedCore`)."""

    def __init__(self, cache: SnapshotCache, meter: MetricMeter | None = None) -> None:
        self._cache = cache
        self._lag = lag_histogram(meter) if meter is not None else None
        self._counter = (
            meter.create_counter(OFFERS_METRIC, OFFERS_DESCRIPTION) if meter is not None else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        # By run id: made, their task not reported to the server yet; reported, let go after
        # SETTLE_SECONDS unless the run is evicted; between an eviction and its completion.
        self._held: dict[str, list[_Batch]] = {}
        self._settling: dict[str, list[_Batch]] = {}
        self._evicting: set[str] = set()
        self._polls = 0
        self._polled: dict[str, tuple[int, int]] = {}  # by run id: poll number, history length
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
        self._count("dropped", len(self._waiting))
        self._drop([b for held in (*self._held.values(), *self._settling.values()) for b in held])
        self._waiting.clear()
        self._waiting_bytes = 0
        self._held.clear()
        self._settling.clear()
        self._evicting.clear()
        self._polled.clear()  # a settling timer still due finds nothing, and no loop

    def hold(self, run_id: str, history_length: int, made: list[Offer]) -> None:
        """Keep the offers an activation at `history_length` made until its task is
        recorded; from any thread."""
        loop = self._loop
        if loop is None or not self.watching:
            return
        # A loop that has closed raises: the entities publish by activity.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._hold, run_id, _Batch(history_length, made))

    def _hold(self, run_id: str, batch: _Batch) -> None:
        if run_id in self._evicting:  # an activation that ended after its run's eviction
            self._drop([batch])
        else:
            self._held.setdefault(run_id, []).append(batch)

    def polled(self, run_id: str, history_length: int, eviction: bool) -> None:
        """The core handed over an activation of `run_id`. An eviction drops what the run
        holds. An activation at a longer history proves the tasks before it recorded (the
        server sends a run's next task once it recorded the last), which lets theirs go;
        one at the same length is of the same task, whose completions so far were only the
        core's (it reports a task once all its activations are done): theirs wait for this
        one's."""
        self._polls += 1
        self._polled[run_id] = (self._polls, history_length)
        held = [*self._settling.pop(run_id, []), *self._held.pop(run_id, [])]
        if eviction:
            self._evicting.add(run_id)
            self._drop(held)
            return
        self._hold_or_release(run_id, held, history_length)

    def _hold_or_release(self, run_id: str, batches: list[_Batch], history_length: int) -> None:
        """Release what tasks before `history_length` made; hold the rest for the run's
        next completion."""
        waiting = [batch for batch in batches if batch.history_length >= history_length]
        if waiting:
            self._held[run_id] = [*waiting, *self._held.get(run_id, [])]
        for batch in batches:
            if batch.history_length < history_length:
                self._release(batch)

    def take_held(self, run_id: str) -> Taken:
        """What `run_id`'s activations made since its last completion, as that completion
        goes to the core, with what had been polled of the run by then."""
        polled, _ = self._polled.get(run_id, (0, 0))
        return Taken(self._held.pop(run_id, []), polled, run_id in self._evicting)

    def completed(self, run_id: str, taken: Taken, successful: bool, ends_run: bool) -> None:
        """The core returned from a completion of `run_id`, having reported the task to the
        server when it was the task's last, and evicted the run if the server refused it:
        what the activation made goes once no eviction of the run follows within
        SETTLE_SECONDS. A failed completion, one that ends the run (Temporal refuses it when
        a command came meanwhile) or one of a run being evicted drops it; the eviction's own
        completion ends the eviction. An activation polled while the core had this
        completion (the core may hand over the next before it returns) decides instead:
        one of the same task holds it for that one's completion, a later task's releases
        it."""
        if run_id in self._evicting:
            if taken.evicting:  # begun after the eviction was polled: the eviction's own
                self._evicting.discard(run_id)
                self._polled.pop(run_id, None)
            self._drop(taken.batches)
            return
        if not successful or ends_run or self._loop is None:
            self._drop(taken.batches)
            return
        if not taken.batches:
            return
        polled, history_length = self._polled.get(run_id, (0, 0))
        if polled > taken.polled:
            self._hold_or_release(run_id, taken.batches, history_length)
            return
        self._settle(run_id, taken.batches)

    def _settle(self, run_id: str, batches: list[_Batch], rearmed: bool = False) -> None:
        if self._loop is None:
            return
        self._settling.setdefault(run_id, []).extend(batches)
        due = self._loop.time() + SETTLE_SECONDS
        self._loop.call_later(SETTLE_SECONDS, self._settled, run_id, batches, due, rearmed)

    def _settled(self, run_id: str, batches: list[_Batch], due: float, rearmed: bool) -> None:
        """Let `batches` go, unless an eviction dropped them or an activation took them back
        meanwhile. A loop running late may not have seen an eviction the core already
        handed over: the batches wait once more, and then go after what is ready now."""
        if self._loop is None:
            return
        if not rearmed and self._loop.time() - due > LATE_SECONDS:
            late = self._take_settling(run_id, batches)
            if late:
                self._settle(run_id, late, rearmed=True)
            return
        self._loop.call_soon(self._release_settled, run_id, batches)

    def _release_settled(self, run_id: str, batches: list[_Batch]) -> None:
        for batch in self._take_settling(run_id, batches):
            self._release(batch)

    def _take_settling(self, run_id: str, batches: list[_Batch]) -> list[_Batch]:
        """Those of `batches` still settling for `run_id`, no longer settling."""
        settling = self._settling.get(run_id, [])
        taken = [batch for batch in settling if any(batch is b for b in batches)]
        left = [batch for batch in settling if not any(batch is b for b in batches)]
        if left:
            self._settling[run_id] = left
        else:
            self._settling.pop(run_id, None)
        return taken

    def _drop(self, batches: list[_Batch]) -> None:
        self._count("dropped", sum(len(batch.offers) for batch in batches))

    def _release(self, batch: _Batch) -> None:
        for offer in batch.offers:
            key = (offer.entity_type, offer.entity_id)
            waiting = self._waiting.get(key)
            if waiting is not None and waiting.revision > offer.revision:
                self._count("superseded")
                continue
            size = len(offer.publication) - (len(waiting.publication) if waiting else 0)
            if self._waiting_bytes + size > MAX_WAITING_BYTES:
                self._count("dropped")
                continue
            if waiting is not None:
                self._count("superseded")  # the newer one carries its changes
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
            if await self._cache.put_publication(publication) and self._lag is not None:
                record_lag(self._lag, publication.snapshot, BY_OFFER)
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
        eviction = any(job.HasField("remove_from_cache") for job in act.jobs)
        self._publishes.polled(act.run_id, act.history_length, eviction)
        return act

    async def complete_workflow_activation(self, completion: Completion) -> None:
        # Taken before the core has it: the run's next activation may come back with its
        # answer, and what that one makes is not this one's.
        taken = self._publishes.take_held(completion.run_id)
        successful = completion.HasField("successful")
        ends_run = successful and any(
            command.WhichOneof("variant") in ENDS_RUN for command in completion.successful.commands
        )
        try:
            await self._inner.complete_workflow_activation(completion)
        except BaseException:
            self._publishes.completed(completion.run_id, taken, False, ends_run)
            raise
        self._publishes.completed(completion.run_id, taken, successful, ends_run)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


Hold = Callable[[str, int, list[Offer]], None]


class OfferingRunner(WrappingRunner):
    """Runs workflows with `inner`, collecting the offers of each activation and handing
    those of one that completed without failing to `publishes` to hold."""

    def __init__(self, inner: WorkflowRunner, publishes: OfferedPublishes) -> None:
        super().__init__(inner)
        self._hold: Hold = publishes.hold

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _OfferingInstance(self._inner.create_instance(det), self._hold)


class _OfferingInstance(WrappedInstance):
    def __init__(self, inner: WorkflowInstance, hold: Hold) -> None:
        super().__init__(inner)
        self._hold = hold

    def activate(self, act: Activation) -> Completion:
        with offers.collecting() as made:
            completion = self._inner.activate(act)
        if made and completion.HasField("successful"):
            try:
                self._hold(act.run_id, act.history_length, made)
            except Exception:  # never the task's failure: its entity publishes by activity
                log.exception("the offers of run %s could not be held", act.run_id)
        return completion
