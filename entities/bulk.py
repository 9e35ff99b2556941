"""BulkCommand: one command sent to many entities, a page at a time, in a bounded window.

The targets come a page at a time, from the listing index (a filter, paged by id so that the
command's own changes never move an entity across a page boundary) or from a given list of
ids. Each page is sent by one activity, at most `window` commands at once, and its outcomes
are counted by another, which runs while the next pages are sent: sending keeps the pace at
which Temporal accepts the commands, not the pace at which entities apply them. After
`pages_per_run` pages the run waits for every outcome and continues as new, carrying only
its counters and its cursor, so its history stays a few hundred events long whatever the
number of targets. Every entity's command id is `bulk:<bulk id>:<entity id>`: a page sent
again (its activity retried after a worker died, or the bulk replayed) is applied once by
each entity's own ledger, and its outcome counted as first settled.

Pause and cancel take effect between pages; a paused bulk waits, with its cursor, for
resume. Runs started before sending and counting were apart (patch `bulk-pipelined`) send
and count one page per run, as they were recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from entities.runtime.activities import Activity
    from entities.runtime.entity import EntityId

BULK_WORKFLOW = "BulkCommand"
PIPELINED = "bulk-pipelined"
PAUSED_RENEWAL = "bulk-paused-renewal"
"""Runs from this patch on continue as new while paused, once their history is long."""
MAX_IDS = 10_000
"""Ids a bulk command may name outright; more come from a filter."""
MAX_FAILURES_KEPT = 20
MAX_CODES = 50
MAX_ACTIONS_KEPT = 20
"""Keyed pauses, resumes and cancels a bulk command remembers: one sent again after this many
others is taken again."""


def bulk_workflow_id(bulk_id: str) -> str:
    return f"bulk:{bulk_id}"


def bulk_command_id(bulk_id: str, entity_id: str) -> str:
    """The idempotency key of the bulk's command to one entity."""
    return f"bulk:{bulk_id}:{entity_id}"


class BulkStatus(StrEnum):
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    CANCELLED = "CANCELLED"
    COMPLETED = "COMPLETED"


class BulkFailure(BaseModel):
    entity_id: str
    code: str
    message: str


class BulkProgress(BaseModel):
    """What a bulk command has done so far, carried across continue-as-new."""

    entity_type: str = ""
    command: str = ""
    status: BulkStatus = BulkStatus.RUNNING
    total: int | None = None
    delivered: int = Field(
        default=0,
        description="Targets sent the command: handed to Temporal, which will have it "
        "applied, or settled while sending (refused); one Temporal could not take then is "
        "sent again while counting.",
    )
    delivered_at: datetime | None = Field(
        default=None, description="When the last target was sent the command."
    )
    done: int = 0
    applied: int = 0
    rejected: dict[str, int] = Field(default_factory=dict, description="By the entity's code.")
    failed: int = Field(default=0, description="Not delivered within the retries.")
    failures: list[BulkFailure] = Field(
        default_factory=list, description=f"The first {MAX_FAILURES_KEPT} rejections and failures."
    )
    started_at: datetime | None = None
    ended_at: datetime | None = None
    sent_by: str | None = Field(
        default=None, description="Who started it (`role:subject`): a service acts on its own."
    )
    cursor: str | None = Field(default=None, description="Where the next page starts.")
    pages: int = 0
    paused_seconds: float = Field(
        default=0.0, description="How long it has been paused, pauses that have ended."
    )
    paused_at: datetime | None = Field(default=None, description="When its pause began.")
    cancel_requested: bool = Field(
        default=False,
        description="A cancel was asked: it ends CANCELLED once the page in flight is sent "
        "(COMPLETED if that was its last), and takes no pause or resume.",
    )
    actions: list[str] = Field(
        default_factory=list,
        max_length=MAX_ACTIONS_KEPT,
        description="The last keyed pauses, resumes and cancels taken, as `<signal>:<key>`, "
        "oldest first: one sent again (a retry whose answer was lost, arriving after a later "
        "action) is not taken again.",
    )
    fingerprint: str = Field(
        default="",
        description="What the bulk command sends to what (`BulkInput.fingerprint`): its "
        "idempotency key given again with another command is refused. Empty in bulk "
        "commands started before it was kept.",
    )

    def working_seconds(self, now: datetime) -> float | None:
        """Seconds it has spent sending and counting by `now`: since it started, less its
        pauses."""
        if self.started_at is None:
            return None
        paused = self.paused_seconds
        if self.paused_at is not None:
            paused += max((now - self.paused_at).total_seconds(), 0.0)
        return max((now - self.started_at).total_seconds() - paused, 0.0)

    def action_under(self, key: str) -> str | None:
        """The signal taken under `key` (`pause`, `resume` or `cancel`), or None."""
        for action in self.actions:
            signal, _, taken = action.partition(":")
            if taken == key:
                return signal
        return None

    def take(self, signal: str, key: str | None) -> bool:
        """Whether `signal` is to be taken: not when its key was taken before. Its key is
        remembered, the oldest forgotten past `MAX_ACTIONS_KEPT`."""
        if key is None:
            return True
        if self.action_under(key) is not None:
            return False
        self.actions = [*self.actions, f"{signal}:{key}"][-MAX_ACTIONS_KEPT:]
        return True

    def add(self, sent: PageSent) -> None:
        self.done += sent.done
        self.applied += sent.applied
        for code, count in sent.rejected.items():
            if code in self.rejected or len(self.rejected) < MAX_CODES:
                self.rejected[code] = self.rejected.get(code, 0) + count
        self.failed += sent.failed
        room = MAX_FAILURES_KEPT - len(self.failures)
        self.failures += sent.failures[: max(room, 0)]


class BulkInput(BaseModel):
    bulk_id: str
    entity_type: str
    command: str
    payload: dict[str, Any] = Field(default_factory=dict)
    ids: list[EntityId] | None = Field(default=None, max_length=MAX_IDS)
    filter: dict[str, Any] | None = Field(
        default=None, description="A listing filter (workers/listing.py's, as JSON)."
    )
    sent_by: str | None = Field(default=None, max_length=160)
    page_size: int = Field(default=1000, ge=1, le=1000)
    window: int = Field(default=50, ge=1, le=500)
    pages_per_run: int = Field(
        default=10,
        ge=1,
        le=100,
        description="Pages sent in one run ahead of their outcomes; the run waits for them all "
        "before it continues as new, so no more than this many pages are ever in flight.",
    )
    progress: BulkProgress = Field(default_factory=BulkProgress)
    paused: bool = False
    paused_history_events: int = Field(
        default=2000,
        ge=50,
        le=9000,
        description="Events a paused run's history may reach (each pause, resume or cancel "
        "adds to it) before it continues as new, still paused: Temporal takes at most "
        "10,000 signals in a run, and a bulk paused for days, sent a pause every few "
        "seconds, could then be neither resumed nor cancelled.",
    )

    def fingerprint(self) -> str:
        """A digest of what is sent to what: the same for the same request sent again."""
        request = self.model_dump(
            mode="json", include={"entity_type", "command", "payload", "ids", "filter"}
        )
        document = json.dumps(request, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(document.encode()).hexdigest()[:32]


class PageRequest(BaseModel):
    """The next page of a bulk's targets."""

    entity_type: str
    ids: list[str] | None = None
    filter: dict[str, Any] | None = None
    cursor: str | None = None
    size: int
    count_total: bool = False


class TargetPage(BaseModel):
    ids: list[str]
    cursor: str | None = Field(description="After the last id; None when it was the last page.")
    total: int | None = None

    @classmethod
    def of_ids(cls, ids: list[str], cursor: str | None, size: int) -> TargetPage:
        """The page of a given list of ids after `cursor` (an index into it)."""
        start = int(cursor or 0)
        end = start + size
        return cls(
            ids=list(ids[start:end]),
            cursor=str(end) if end < len(ids) else None,
            total=len(ids),
        )


class PageToSend(BaseModel):
    bulk_id: str
    entity_type: str
    command: str
    payload: dict[str, Any]
    ids: list[str]
    sent_by: str | None
    window: int
    sent_at: AwareDatetime | None = Field(
        default=None,
        description="When the page was first sent: its commands sent again say so "
        "(`CommandEnvelope.first_sent`). None in pages of runs from before it.",
    )


class PageSent(BaseModel):
    done: int = 0
    applied: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    failed: int = 0
    failures: list[BulkFailure] = Field(default_factory=list)


class PageDelivered(BaseModel):
    """A page handed to Temporal: what was settled while sending, and whose outcome is still
    to be learnt, from the change stream after `position`."""

    settled: PageSent
    waiting: list[str]
    position: str | None = Field(
        description="The change stream's end before the page was sent; None when Redis could "
        "not tell, and the outcomes are asked of the entities."
    )


class PageToSettle(BaseModel):
    """A delivered page's commands whose outcomes are to be counted."""

    page: PageToSend
    position: str | None


_PAGE_TIMEOUT = timedelta(seconds=30)
_SEND_TIMEOUT = timedelta(minutes=10)
_SETTLE_TIMEOUT = timedelta(hours=1)  # a long backlog ahead of the page; heartbeats show life
_HEARTBEAT = timedelta(seconds=30)
_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


PAGE_ACTIVITY = Activity("bulk_page", PageRequest, TargetPage)
SEND_ACTIVITY = Activity("bulk_send", PageToSend, PageSent)
"""One page sent and counted in one activity: runs from before `PIPELINED` replay it."""
DELIVER_ACTIVITY = Activity("bulk_deliver", PageToSend, PageDelivered)
SETTLE_ACTIVITY = Activity("bulk_settle", PageToSettle, PageSent)


@workflow.defn(name=BULK_WORKFLOW)
class BulkCommandWorkflow:
    """One bulk command, from its first page to its last."""

    @workflow.init
    def __init__(self, input: BulkInput) -> None:
        self._input = input
        self._progress = input.progress
        self._paused = input.paused
        self._cancelled = False
        self._sending = False
        self._settling = 0
        self._renews = False
        if self._progress.started_at is None:
            self._progress.started_at = workflow.now()
            self._progress.entity_type = input.entity_type
            self._progress.command = input.command
            self._progress.fingerprint = input.fingerprint()
        if self._paused and self._progress.paused_at is None:
            self._progress.paused_at = workflow.now()  # started paused
        # Runs begun before it was kept learn it from their input, carried as it came.
        self._progress.sent_by = self._progress.sent_by or input.sent_by

    @workflow.query(name="progress")
    def progress(self) -> BulkProgress:
        status = self._progress.status
        if status is BulkStatus.RUNNING and self._paused and not self._busy():
            status = BulkStatus.PAUSED  # what is in flight is finished first
        return self._progress.model_copy(update={"status": status})

    @workflow.signal(name="pause")
    def pause(self, key: str | None = None) -> None:
        """Stop after the page in flight; one under a key already taken does nothing."""
        if not self._progress.take("pause", key):
            return
        if not self._paused:
            self._progress.paused_at = workflow.now()
        self._paused = True

    @workflow.signal(name="resume")
    def resume(self, key: str | None = None) -> None:
        """Go on; a bulk being cancelled goes on to its end (the API refuses the resume). One
        under a key already taken does nothing."""
        if not self._progress.take("resume", key):
            return
        if self._paused and self._progress.paused_at is not None:
            pause = workflow.now() - self._progress.paused_at
            self._progress.paused_seconds += max(pause.total_seconds(), 0.0)
        self._progress.paused_at = None
        self._paused = False

    @workflow.signal(name="cancel")
    def cancel(self, key: str | None = None) -> None:
        if not self._progress.take("cancel", key):
            return
        self._cancelled = True
        self._progress.cancel_requested = True

    @workflow.run
    async def run(self, input: BulkInput) -> BulkProgress:
        self._renews = workflow.patched(PAUSED_RENEWAL)
        if workflow.patched(PIPELINED):
            more = await self._send_pages(input)
        else:
            more = await self._send_one_page_and_count_it(input)
        if more and not self._cancelled:
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(
                input.model_copy(update={"progress": self._progress, "paused": self._paused})
            )
        # Cancelled once its last page was sent, there was nothing left to cancel: it ends
        # COMPLETED (it ended CANCELLED, with every target sent its command).
        cut_short = self._cancelled and more
        self._progress.status = BulkStatus.CANCELLED if cut_short else BulkStatus.COMPLETED
        self._progress.ended_at = workflow.now()
        if self._progress.paused_at is not None:
            self.resume()  # its pause ends with it
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._progress

    def _paused_too_long(self, input: BulkInput) -> bool:
        """Whether a paused run's history has grown enough to go on in a new one."""
        if not self._renews:
            return False
        info = workflow.info()
        too_long = info.get_current_history_length() >= input.paused_history_events
        return too_long or info.is_continue_as_new_suggested()

    def _busy(self) -> bool:
        return self._sending or self._settling > 0

    async def _send_pages(self, input: BulkInput) -> bool:
        """Send up to `pages_per_run` pages, counted one after the other while the next are
        sent; True when targets remain for the next run."""
        counting: asyncio.Task[None] | None = None
        more = True
        for _ in range(input.pages_per_run):
            await workflow.wait_condition(
                lambda: not self._paused or self._cancelled or self._paused_too_long(input)
            )
            if self._cancelled or self._paused:
                break  # paused too long, it goes on paused in a new run
            self._sending = True
            page = await self._next_page(input)
            if page.ids:
                to_send = self._to_send(input, page)
                delivered = await DELIVER_ACTIVITY.execute(
                    to_send,
                    start_to_close_timeout=_SEND_TIMEOUT,
                    heartbeat_timeout=_HEARTBEAT,
                    retry_policy=_RETRY,
                )
                self._progress.add(delivered.settled)
                if delivered.waiting:
                    self._settling += 1
                    counting = asyncio.create_task(self._count(to_send, delivered, counting))
            self._sending = False
            self._sent(page)
            if page.cursor is None:
                more = False
                break
        if counting is not None:
            await counting
        return more

    async def _count(
        self,
        sent_page: PageToSend,
        delivered: PageDelivered,
        after: asyncio.Task[None] | None,
    ) -> None:
        """Count the outcomes of a delivered page's commands still waiting for one, once the
        page sent before it is counted: entities apply the pages roughly in order, so one
        page at a time is asked about what the change stream does not show."""
        try:
            if after is not None:
                await after
            sent = await SETTLE_ACTIVITY.execute(
                PageToSettle(
                    page=sent_page.model_copy(update={"ids": delivered.waiting}),
                    position=delivered.position,
                ),
                start_to_close_timeout=_SETTLE_TIMEOUT,
                heartbeat_timeout=_HEARTBEAT,
                retry_policy=_RETRY,
            )
            self._progress.add(sent)
        finally:
            self._settling -= 1

    async def _send_one_page_and_count_it(self, input: BulkInput) -> bool:
        """Runs from before `PIPELINED`: one page per run, sent and counted by one activity."""
        await workflow.wait_condition(lambda: not self._paused or self._cancelled)
        if self._cancelled:
            return True  # targets remain, cancelled
        self._sending = True
        page = await self._next_page(input, by_activity=True)
        if page.ids:
            sent = await SEND_ACTIVITY.execute(
                self._to_send(input, page),
                start_to_close_timeout=_SEND_TIMEOUT,
                heartbeat_timeout=_HEARTBEAT,
                retry_policy=_RETRY,
            )
            self._progress.add(sent)
        self._sending = False
        self._sent(page)
        return page.cursor is not None

    async def _next_page(self, input: BulkInput, by_activity: bool = False) -> TargetPage:
        """The next page after the cursor: a slice of the given ids, or the listing index's."""
        if input.ids is not None and not by_activity:
            return TargetPage.of_ids(input.ids, self._progress.cursor, input.page_size)
        return await PAGE_ACTIVITY.execute(
            PageRequest(
                entity_type=input.entity_type,
                ids=input.ids,
                filter=input.filter,
                cursor=self._progress.cursor,
                size=input.page_size,
                # The first page's count only: a later one counts what still matches, and
                # the bulk's own commands take entities out of the filter (`_sent`).
                count_total=self._progress.pages == 0,
            ),
            start_to_close_timeout=_PAGE_TIMEOUT,
            retry_policy=_RETRY,
        )

    def _to_send(self, input: BulkInput, page: TargetPage) -> PageToSend:
        """The page to send, as first sent now."""
        return PageToSend(
            bulk_id=input.bulk_id,
            entity_type=input.entity_type,
            command=input.command,
            payload=input.payload,
            ids=page.ids,
            sent_by=input.sent_by,
            window=input.window,
            sent_at=workflow.now(),
        )

    def _sent(self, page: TargetPage) -> None:
        """Count a page sent. The total is the filter's count when the first page was read:
        entities that come to match ahead of the cursor raise it to what was sent (`done` went
        past `total`, and the eta into the past), and the last page makes it exact, which
        one the index could not count (null until then) needs as much. Only the first page
        is counted: a later count, of what still matched once the bulk's own commands had
        taken entities out of the filter, made the total about what was sent, and the
        progress read full with pages to go."""
        progress = self._progress
        if page.total is not None:
            progress.total = page.total
        progress.delivered += len(page.ids)
        progress.pages += 1
        progress.cursor = page.cursor
        if page.cursor is None:
            progress.delivered_at = workflow.now()
            progress.total = progress.delivered
        elif progress.total is not None:
            progress.total = max(progress.total, progress.delivered)
