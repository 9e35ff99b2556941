"""Publishing an entity's snapshot to the last-seen cache, from inside its workflow.

One publish is in flight at a time, of the state as it is when it starts; a change made
meanwhile is published once it ends. With a publish interval, a token bucket lets
`PUBLISH_BURST` publishes through back to back and then one per interval, and a timer brings
the last change of a stream. A publish that fails is retried after a backoff; the cache is
best effort, the entity keeps serving.

Runs from PUBLISH_OFFERS on have an interval (OFFERED_INTERVAL unless their input gives
one), and offer each change the interval holds back to the worker that runs them, which
writes it to the cache at once, outside the history (`entities.runtime.offers`). An offer
may be lost; the interval's next publish by activity carries every change since the last,
so each reaches the cache and the change stream within the interval all the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import FailureError

with workflow.unsafe.imports_passed_through():
    from entities.runtime import offers
    from entities.runtime.activities import Activity
    from entities.runtime.envelope import Publication, RuntimeOptions

PUBLISH_ACTIVITY = Activity("publish_snapshot", Publication, bool)
"""Whether the cache took the snapshot: False when it held a newer one."""
PUBLISH_TIMEOUT = timedelta(seconds=5)
PUBLISH_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=2)
PUBLISH_BACKOFF_MAX = timedelta(seconds=30)
# Publishes allowed back to back before the interval applies: an entity made and set up in
# two quick commands (open, verify) is published twice at once, with no timer.
PUBLISH_BURST = 2.0
# Runs started from here on publish with an activity, not a local activity. A local
# activity's marker is written when the activity resolves, wherever that falls, and the
# SDK's core gets that wrong in two ways that froze entities for good: a marker recorded
# after the run's final command (sdk-rust#659), and, when a workflow task's completion is
# lost because Temporal restarts, results of that lost attempt's local activities recorded
# in the next task, so that the history no longer replays ("Missing associated machine for
# LocalActivity"). An activity is a command placed when it is scheduled and a result that
# arrives as a history event, both replayed exactly. The server retries it (no workflow
# timers), every 2 s at most, so the cache catches up within about 2 s of Redis returning.
PUBLISH_BY_ACTIVITY = "publish-by-activity"
PUBLISH_ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=2),
)
PUBLISH_GIVE_UP = timedelta(minutes=10)
MAX_HANDED_CHANGES = 16
"""The most changes an update's answer carries for its sender to publish
(`CommandEnvelope.publishes`). Past it the entity publishes itself, so that what it knows
published, and with it what the next answer carries, moves on."""
PUBLISH_SIGNAL = "publish"
"""Asks an entity to publish what it handed to a sender that could not publish it."""
PUBLISH_OFFERS = "entity-publish-offers"
"""Runs from here on publish by activity at most once per OFFERED_INTERVAL after a burst of
PUBLISH_BURST, and offer each change in between to the worker that runs them, which writes
it to the cache outside the history (`entities.runtime.offers`). Runs begun before publish
by activity after every change, or as their input's interval says."""
OFFERED_INTERVAL = 2.0
"""Seconds between publishes by activity of an entity that offers its changes, when its
input gives no interval: how long a change whose offer was lost (a worker that died, Redis
down) waits for the cache and the change stream."""
MAX_OFFERED_CHANGES = 64
"""The most changes an offer carries (every change since the last publish by activity):
past it the entity publishes by activity without waiting for its interval, so that a hot
entity's offers stay small."""


class SnapshotPublisher:
    """Decides when an entity publishes its snapshot, and publishes it.

    `publication(since)` gives the entity's current snapshot with its changes after
    revision `since`; `published_revision` is the last one known to be in the cache,
    carried across continue-as-new.
    """

    def __init__(
        self,
        runtime: RuntimeOptions,
        publication: Callable[[int], Publication],
        published_revision: int,
    ) -> None:
        self._runtime = runtime
        self._publication = publication
        self.published_revision = published_revision
        self._publishing: asyncio.Task[None] | None = None
        self._by_activity = False
        self._backoff: asyncio.Task[None] | None = None
        self._failures = 0
        self._credit = PUBLISH_BURST
        self._credited_at: datetime | None = None
        self._timer: asyncio.Task[None] | None = None
        self._handed = 0
        self._owed = 0
        self._offers = False
        self._offered = published_revision
        self._updated_in_task: int | None = None

    def start_run(self, by_activity: bool, offers: bool = False) -> None:
        """Choose how this run publishes: whether it has PUBLISH_BY_ACTIVITY and
        PUBLISH_OFFERS; called once, from the workflow's `run`."""
        self._by_activity = by_activity
        self._offers = offers and by_activity

    def updated(self) -> None:
        """An update is being applied in this workflow task: its state is not offered (the
        task, and the update with it, may yet be refused)."""
        self._updated_in_task = workflow.info().get_current_history_length()

    @property
    def enabled(self) -> bool:
        return self._runtime.publish_snapshots

    def lets_run_end(self) -> bool:
        """Whether the run may issue its final command now: not while a local activity is
        in flight, whose marker would land after it (see `EntityWorkflow._quiesce`)."""
        return self._publishing is None or self._by_activity

    def needs_attention(self, revision: int) -> bool:
        """A publish is due, or one will be and no timer is set for it yet."""
        if self._timer is not None and self._timer.done():
            return True
        return self._has_unpublished(revision) and (
            self._timer is None or self._wait() == 0.0 or self._taken_back()
        )

    def schedule(self, revision: int) -> None:
        """Publish now if due, else make sure a timer wakes the loop when it is."""
        if self._timer is not None and self._timer.done():
            self._timer = None
        if not self._has_unpublished(revision):
            if self._offers and self._unpublished(revision):
                # A publish by activity in flight, or backing off: offered meanwhile.
                self._offer(revision)
            return
        wait = self._wait()
        if wait > 0.0 and self._offers and (not self._may_offer(revision) or self._taken_back()):
            wait = 0.0  # what cannot be offered, or was handed back, is published now
        if wait == 0.0:
            # Never below none: a publish forced past the interval (MAX_OFFERED_CHANGES)
            # would otherwise put the next one, and an offer it lost, minutes away.
            self._credit = max(self._credit_now() - 1.0, 0.0)
            self._credited_at = workflow.now()
            self._publishing = asyncio.create_task(self.publish())
            return
        if self._offers:
            self._offer(revision)
        if self._timer is None:
            self._timer = asyncio.create_task(workflow.sleep(wait))

    def _offer(self, revision: int) -> None:
        """Offer the snapshot at `revision`, with every change since the last publish, to
        the worker (`entities.runtime.offers`), unless an update came in this task. What it
        publishes is not known here, so nothing changes in the entity's state but which
        revision it offered last: the same whether or not anything collects it, and in
        replay."""
        if revision <= self._offered or not self._may_offer(revision):
            return
        self._offered = revision
        if workflow.unsafe.is_replaying() or not offers.collects():
            return
        publication = self._publication(self.published_revision)
        snapshot = publication.snapshot
        offers.offer(
            offers.Offer(
                snapshot.entity_type,
                snapshot.entity_id,
                snapshot.revision,
                publication.model_dump_json().encode(),
            )
        )

    def withdraw_offers(self) -> None:
        """This workflow task ends the run: what it offered is taken back
        (`offers.withdraw`); the run's last publish, or the next run's, carries it."""
        if self._offers:
            offers.withdraw()

    def _taken_back(self) -> bool:
        """A run that offers has changes handed back to publish (`take_back`): a sender
        that could not publish them, or a repeat, published at once as before offers."""
        return self._offers and self._owed > self.published_revision

    def _may_offer(self, revision: int) -> bool:
        """Whether the snapshot at `revision` may be offered: no update came in this task
        (the task, and the update with it, may yet be refused), and its changes since the
        last publish are few enough to carry (MAX_OFFERED_CHANGES)."""
        return (
            self._updated_in_task != workflow.info().get_current_history_length()
            and revision - self.published_revision <= MAX_OFFERED_CHANGES
        )

    def may_hand(self, revision: int) -> bool:
        """Whether the snapshot at `revision` may be handed to its sender to publish
        (`hand`): publishing is on, and its changes since the last publish this entity knows
        of are few enough to carry."""
        return self.enabled and revision - self.published_revision <= MAX_HANDED_CHANGES

    def hand(self, revision: int) -> None:
        """The snapshot at `revision`, with every change since `published_revision`, was
        handed to a sender that publishes it: the entity need not, unless it changes again.
        What the entity knows published stays where it was: the next publication, the
        sender's or its own, carries those changes again, and the stream appends each
        once."""
        self._handed = max(self._handed, revision)

    def take_back(self, revision: int) -> None:
        """Publish from here every change up to `revision`, whatever is handed over later: a
        sender could not publish what it was handed, or is retrying a command, so that an
        answer may have gone to a sender no longer waiting for it (an update that timed out
        at the sender is still applied, and answered to nobody)."""
        self._owed = max(self._owed, revision)

    async def backed_off(self) -> None:
        """Wait out the pause after a failed publish, if one is on."""
        if self._backoff is not None:
            await self._backoff

    def left_to_sender(self, revision: int) -> bool:
        """Whether the changes up to `revision` are the sender's to publish: handed over,
        and not taken back since."""
        return self._handed >= revision and self._owed <= self.published_revision

    async def publish(self) -> None:
        """Publish the current snapshot, with the changes since the last publish, and wait
        for it."""
        publication = self._publication(self.published_revision)
        try:
            await self._publish(publication)
        finally:
            self._publishing = None

    def _interval(self) -> float:
        """The input's interval; OFFERED_INTERVAL for a run that offers and was given none."""
        interval = self._runtime.publish_interval_seconds
        return OFFERED_INTERVAL if self._offers and not interval else interval

    def _unpublished(self, revision: int) -> bool:
        """Changes up to `revision` are this entity's to publish, and not all published."""
        return (
            self._runtime.publish_snapshots
            and revision > self.published_revision
            and (revision > self._handed or self._owed > self.published_revision)
        )

    def _has_unpublished(self, revision: int) -> bool:
        return (
            self._unpublished(revision)
            and self._publishing is None
            and (self._backoff is None or self._backoff.done())
        )

    def _credit_now(self) -> float:
        """Publishes that may start now: a token bucket of PUBLISH_BURST, refilled by one
        per publish interval."""
        interval = self._interval()
        if self._credited_at is None or not interval:
            return PUBLISH_BURST
        elapsed = (workflow.now() - self._credited_at).total_seconds()
        return min(PUBLISH_BURST, self._credit + elapsed / interval)

    def _wait(self) -> float:
        """Seconds until the next publish may start: 0 when it is due now. Runs started
        before the interval existed carry none (0) in their input, so their histories
        replay as they were made."""
        interval = self._interval()
        if not interval:
            return 0.0
        credit = self._credit_now()
        return 0.0 if credit >= 1.0 else (1.0 - credit) * interval

    async def _publish(self, publication: Publication) -> None:
        try:
            if self._by_activity:
                await PUBLISH_ACTIVITY.execute(
                    publication,
                    start_to_close_timeout=PUBLISH_TIMEOUT,
                    schedule_to_close_timeout=PUBLISH_GIVE_UP,
                    retry_policy=PUBLISH_ACTIVITY_RETRY,
                )
            else:
                await PUBLISH_ACTIVITY.execute_local(
                    publication,
                    start_to_close_timeout=PUBLISH_TIMEOUT,
                    retry_policy=PUBLISH_RETRY,
                )
        except FailureError:
            # A failure arrives as its cause (ApplicationError, timeout). The cache is best
            # effort: the entity keeps serving, and retries later.
            self._failures += 1
            backoff = min(timedelta(seconds=2**self._failures), PUBLISH_BACKOFF_MAX)
            self._backoff = asyncio.create_task(workflow.sleep(backoff))
            return
        self._failures = 0
        self._backoff = None
        self.published_revision = publication.snapshot.revision
