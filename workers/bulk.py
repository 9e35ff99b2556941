"""The bulk command's activities: the next page of its targets, a page sent, and a sent
page's outcomes counted.

Sending a page hands the command to each entity's workflow, at most `window` at once,
heartbeating as it goes; counting reads the outcomes from the change stream, and asks the
entities what it does not show. Sent again (its activity retried after a worker died), a
page costs each entity a look in its ledger: every command id is the bulk's and the
entity's (`bulk:<bulk id>:<entity id>`), so it is applied once and counted as it first
settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from entities import catalog
from entities.bulk import (
    DELIVER_ACTIVITY,
    MAX_FAILURES_KEPT,
    PAGE_ACTIVITY,
    SEND_ACTIVITY,
    SETTLE_ACTIVITY,
    BulkFailure,
    PageDelivered,
    PageRequest,
    PageSent,
    PageToSend,
    PageToSettle,
    TargetPage,
    bulk_command_id,
)
from entities.errors import ErrorCode, TenureError, quote_few
from entities.runtime.entity import MAX_MONEY, EntityType
from entities.runtime.envelope import CommandEnvelope, CommandResult, OutcomeStatus
from entities.runtime.listing import MAX_TEXT_LENGTH, searchable
from workers.cache import CacheUnavailable, SnapshotCache
from workers.changes import stream_end, stream_key, watch_applied
from workers.delivery import CommandDelivery, EntityClosed
from workers.failures import REDIS_FAILURES
from workers.index import STATUS
from workers.listing import EntityIndex, ListFilter, Order
from workers.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
STREAM_QUIET_SECONDS = 2.0
"""How long the change stream may show none of the bulk's commands applied (a page's own,
or those of the pages sent before it, which the entities apply first) before the page's
remaining commands are asked of their entities."""
SETTLE_ATTEMPTS = 10
"""Attempts at counting a delivered page while some outcomes stay unknown, before those
count as failed (the activity's retries, at most 30 s apart)."""
UNKNOWN_ATTEMPTS = 5
"""Tries of one entity's command while its outcome is unknown, before it counts as failed."""
RETRY_SECONDS = 1.0
"""The pause before a second try of one entity's command, doubled before each next, at most
ten seconds."""


MAX_TAG_VALUES = 100
"""Values one tag of a bulk's filter may allow (a status's few, or some accounts' carts)."""


def list_filter(
    data: dict[str, Any] | None, entity: EntityType[Any, Any] | None = None
) -> ListFilter:
    """A listing filter from its JSON form: `{"tags": {"status": ["ACTIVE"]}, "closed":
    false, "text": "ad", "updated_before": "2026-01-01T00:00:00+00:00", "below": {...}}`.

    With `entity`, it is also held to what the type's listing declares, as its GraphQL list
    is: the API checks a bulk's filter so before it starts it. The page
    activity reads it without, so that a bulk started before those checks ends as it began.
    """
    data = data or {}
    known = {"tags", "updated_after", "updated_before", "text", "below", "closed"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown filter fields: {quote_few(sorted(unknown))}")

    def moment(name: str) -> datetime | None:
        value = data.get(name)
        if value is None:
            return None
        try:
            if not isinstance(value, str):
                raise ValueError
            return datetime.fromisoformat(value)
        except ValueError:
            # Not its own message: that would quote the whole value back.
            raise ValueError(f"{name}: an ISO 8601 date and time") from None

    tags = data.get("tags") or {}
    below = data.get("below") or {}
    closed, text = data.get("closed"), data.get("text")
    if not isinstance(tags, dict) or not all(
        isinstance(values, list) and all(isinstance(v, str) for v in values)
        for values in tags.values()
    ):
        raise ValueError('tags: an object of lists of strings, {"status": ["ACTIVE"]}')
    if not isinstance(below, dict) or not all(
        isinstance(bound, int) and not isinstance(bound, bool) for bound in below.values()
    ):
        raise ValueError('below: an object of integers, {"available": 5}')
    if closed is not None and not isinstance(closed, bool):
        raise ValueError("closed: true, false or null")
    if text is not None and not isinstance(text, str):
        raise ValueError("text: a string")
    if entity is not None:
        _as_listed(entity, tags, below, text)
    return ListFilter(
        tags={tag: frozenset(values) for tag, values in tags.items()},
        updated_after=moment("updated_after"),
        updated_before=moment("updated_before"),
        text=searchable(text) if text is not None else None,
        below=dict(below),
        closed=closed,
    )


def _as_listed(
    entity: EntityType[Any, Any],
    tags: dict[str, list[str]],
    below: dict[str, int],
    text: str | None,
) -> None:
    """Refuse (ValueError) what the GraphQL lists refuse, since it would match nothing: a
    tag, status or number the type does not list, text longer than the index keeps; and
    more values than a bulk's stored input should carry."""
    listed = entity.listed
    names = sorted({*listed.tags, *([STATUS] if listed.status else [])})
    unknown = sorted(set(tags) - set(names))
    if unknown:
        raise ValueError(
            f"tags: {entity.name} has no tag {quote_few(unknown)} "
            f"(its tags: {', '.join(names) or 'none'})"
        )
    for tag, values in tags.items():
        if len(values) > MAX_TAG_VALUES or any(len(v) > MAX_TEXT_LENGTH for v in values):
            raise ValueError(
                f"tags.{tag}: at most {MAX_TAG_VALUES} values of at most "
                f"{MAX_TEXT_LENGTH} characters"
            )
    statuses = entity.statuses()
    wrong = sorted(set(tags.get(STATUS, ())) - statuses) if statuses is not None else []
    if wrong:
        raise ValueError(
            f"tags.{STATUS}: {entity.name} has no status {quote_few(wrong)} "
            f"(its statuses: {', '.join(sorted(statuses or ()))})"
        )
    numbers = sorted(listed.numbers)
    unknown = sorted(set(below) - set(numbers))
    if unknown:
        raise ValueError(
            f"below: {entity.name} has no number {quote_few(unknown)} "
            f"(its numbers: {', '.join(numbers) or 'none'})"
        )
    if any(abs(bound) > MAX_MONEY for bound in below.values()):
        raise ValueError(f"below: each bound at most {MAX_MONEY} (2^53 - 1) either way")
    if text is not None and len(text) > MAX_TEXT_LENGTH:
        raise ValueError(f"text: at most {MAX_TEXT_LENGTH} characters")


class BulkActivities:
    """Pages of targets from the listing index, and pages of commands delivered."""

    def __init__(self, client: Client, cache: SnapshotCache, settings: Settings) -> None:
        self._delivery = CommandDelivery(client, settings)
        self._index = EntityIndex.of(cache)
        self._redis = cache.client
        self._prefix = cache.prefix

    def activities(self) -> list[Callable[..., Any]]:
        return [self.bulk_page, self.bulk_deliver, self.bulk_settle, self.bulk_send]

    @PAGE_ACTIVITY.defn
    async def bulk_page(self, request: PageRequest) -> TargetPage:
        """The next page of targets after the cursor, in id order."""
        if request.ids is not None:
            return TargetPage.of_ids(request.ids, request.cursor, request.size)
        try:
            where = list_filter(request.filter)
        except (TypeError, ValueError) as exc:
            raise ApplicationError(
                str(exc), type=ErrorCode.INVALID_INPUT, non_retryable=True
            ) from exc
        try:
            page = await self._index.page(
                request.entity_type, where, Order.ID, request.size, request.cursor
            )
        except CacheUnavailable as exc:
            raise ApplicationError(f"the listing index is unavailable: {exc}") from exc
        return TargetPage(
            ids=page.ids,
            cursor=page.end_key if page.has_next else None,
            total=page.total if request.count_total else None,
        )

    @DELIVER_ACTIVITY.defn
    async def bulk_deliver(self, page: PageToSend) -> PageDelivered:
        """Hand the command to every entity of the page, at most `window` at once, as a
        client sending signals would; what is learnt meanwhile (a closed entity's answer, a
        refusal) is settled, and the rest is left to `bulk_settle`."""
        tally = _Tally(page.command)
        position = await self._send(page, tally)
        return PageDelivered(settled=tally.sent, waiting=tally.unsettled(), position=position)

    @SETTLE_ACTIVITY.defn
    async def bulk_settle(self, settle: PageToSettle) -> PageSent:
        """Count what became of a delivered page's commands.

        Their outcomes are read from the entity type's change stream after the position
        taken before the page was sent, which the entities' own publishes append to: an
        applied command costs no query. What the stream does not show while it shows none
        of the bulk's commands for `STREAM_QUIET_SECONDS` (a rejected command, which
        changes nothing; one the stream marked as a gap; one applied by an earlier attempt;
        a stream Redis cannot serve) is asked of its entity."""
        tally = _Tally(settle.page.command)
        tally.expect(settle.page)
        await self._settle(settle.page, settle.position, tally)
        if tally.sent.failed and activity.info().attempt < SETTLE_ATTEMPTS:
            # Delivered, so applied once its entity runs (a worker restarting, a backlog):
            # counted again from the stream's position, not yet as failed.
            raise ApplicationError(
                f"{tally.sent.failed} outcomes of bulk {settle.page.bulk_id} not known yet"
            )
        return tally.sent

    @SEND_ACTIVITY.defn
    async def bulk_send(self, page: PageToSend) -> PageSent:
        """A page sent and counted in one activity, for the runs from before sending and
        counting were apart."""
        tally = _Tally(page.command)
        position = await self._send(page, tally)
        await self._settle(page, position, tally)
        return tally.sent

    async def _send(self, page: PageToSend, tally: _Tally) -> str | None:
        """Deliver the page's commands; the change stream's end before them, or None when
        Redis cannot tell."""
        entity = self._entity(page)
        tally.expect(page)
        stream = stream_key(self._prefix, page.entity_type)
        try:
            position: str | None = await stream_end(self._redis, stream)
        except REDIS_FAILURES as exc:
            log.warning("bulk %s: the change stream cannot be read: %s", page.bulk_id, exc)
            position = None
        window = asyncio.Semaphore(page.window)
        sent = 0

        # A later attempt sends the page again: its commands say when they were first sent.
        again = activity.info().attempt > 1

        async def deliver(entity_id: str) -> None:
            nonlocal sent
            envelope = _envelope(page, entity_id, again)
            async with window:
                try:
                    await self._deliver(entity, entity_id, envelope)
                except EntityClosed:
                    await self._ask(entity, entity_id, envelope, tally)
                except TenureError as exc:
                    # Not known to have reached its entity (Temporal restarting, the entity
                    # behind): it waits, and counting the page asks the entity, sending it
                    # again under its id, as long as the page's counting is retried.
                    if exc.code is not ErrorCode.UNAVAILABLE:
                        tally.error(entity_id, envelope.command_id, exc)
                sent += 1

        async with _heartbeating(lambda: sent):
            await asyncio.gather(*(deliver(i) for i in page.ids))
        return position

    async def _settle(self, page: PageToSend, position: str | None, tally: _Tally) -> None:
        """Settle the tally's waiting commands from the change stream after `position`, and
        ask their entities about the rest."""
        entity = self._entity(page)
        async with _heartbeating(lambda: tally.sent.done):
            if position is not None:
                stream = stream_key(self._prefix, page.entity_type)
                await self._watch(stream, position, tally, page.bulk_id)
            window = asyncio.Semaphore(page.window)

            async def ask(entity_id: str) -> None:
                async with window:
                    await self._ask(entity, entity_id, _envelope(page, entity_id, True), tally)

            await asyncio.gather(*(ask(entity_id) for entity_id in tally.unsettled()))

    def _entity(self, page: PageToSend) -> EntityType[Any, Any]:
        entity = catalog.entity_types().get(page.entity_type)
        if entity is None:
            raise ApplicationError(
                f"no entity type {page.entity_type!r}",
                type=ErrorCode.INVALID_INPUT,
                non_retryable=True,
            )
        return entity

    async def _watch(self, stream: str, position: str, tally: _Tally, bulk_id: str) -> None:
        """Settle the commands the change stream shows applied, until every one is, or the
        stream has shown none of the bulk's commands for `STREAM_QUIET_SECONDS`."""
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        ours = bulk_command_id(bulk_id, "")

        def applied(entry: dict[str, str]) -> None:
            nonlocal last_progress
            command_id = entry.get("command_id", "")
            if tally.applied(command_id, entry.get("command", "")) or _of_bulk(command_id, ours):
                last_progress = loop.time()

        def enough() -> bool:
            return not tally.waiting() or loop.time() - last_progress > STREAM_QUIET_SECONDS

        try:
            await watch_applied(self._redis, stream, position, applied, enough)
        except REDIS_FAILURES as exc:
            log.warning("bulk: the change stream cannot be read, asking instead: %s", exc)

    async def _deliver(
        self, entity: EntityType[Any, Any], entity_id: str, envelope: CommandEnvelope
    ) -> None:
        """Hand the command to Temporal, again while Temporal is unavailable: its id makes
        every attempt the same command, applied once."""
        for attempt in range(UNKNOWN_ATTEMPTS):
            try:
                await self._delivery.deliver(entity, entity_id, envelope)
                return
            except TenureError as exc:
                if exc.code is not ErrorCode.UNAVAILABLE or attempt == UNKNOWN_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(min(RETRY_SECONDS * 2.0**attempt, 10.0))

    async def _ask(
        self,
        entity: EntityType[Any, Any],
        entity_id: str,
        envelope: CommandEnvelope,
        tally: _Tally,
    ) -> None:
        """Settle one command by asking its entity (delivering it again if it must)."""
        try:
            result = await self._request(entity, entity_id, envelope)
        except TenureError as exc:
            tally.error(entity_id, envelope.command_id, exc)
        else:
            tally.outcome(entity_id, envelope.command_id, result)

    async def _request(
        self, entity: EntityType[Any, Any], entity_id: str, envelope: CommandEnvelope
    ) -> CommandResult:
        """The command's outcome, asked again while it is not known: its id makes every
        attempt the same command, applied once."""
        for attempt in range(UNKNOWN_ATTEMPTS):
            try:
                return await self._delivery.request(entity, entity_id, envelope)
            except TenureError as exc:
                if exc.code is not ErrorCode.UNAVAILABLE or attempt == UNKNOWN_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(min(RETRY_SECONDS * 2.0**attempt, 10.0))
        raise AssertionError("unreachable")


def _of_bulk(command_id: str, prefix: str) -> bool:
    """Whether the command id is the bulk's (`bulk:<bulk id>:<entity id>`), and not that of
    a bulk whose id only starts with its id (`bulk:<bulk id>:more:<entity id>`): an entity
    id holds no colon."""
    return command_id.startswith(prefix) and ":" not in command_id[len(prefix) :]


def _envelope(page: PageToSend, entity_id: str, again: bool) -> CommandEnvelope:
    """The bulk's command to one entity, the same at every attempt; sent `again`, it says
    when the page was first sent, so that an entity that may have forgotten it since refuses
    it (OUTCOME_UNKNOWN) rather than apply it twice: an entity asked about its command long
    after it applied it, behind thousands of others, applied it again."""
    return CommandEnvelope(
        command_id=bulk_command_id(page.bulk_id, entity_id),
        name=page.command,
        payload=page.payload,
        sent_by=page.sent_by,
        reads_large_state=True,  # a bulk command counts outcomes alone
        first_sent=page.sent_at if again else None,
    )


@contextlib.asynccontextmanager
async def _heartbeating(progress: Callable[[], int]) -> AsyncIterator[None]:
    """Heartbeat the activity every `HEARTBEAT_SECONDS` while the block runs."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            activity.heartbeat(progress())

    beating = asyncio.create_task(beat())
    try:
        yield
    finally:
        beating.cancel()


class _Tally:
    """A page's counts, each command settled once, whichever way its outcome was learnt."""

    def __init__(self, command: str) -> None:
        self.sent = PageSent()
        self._command = command
        self._waiting: dict[str, str] = {}  # command id -> entity id

    def expect(self, page: PageToSend) -> None:
        self._waiting = {bulk_command_id(page.bulk_id, i): i for i in page.ids}

    def waiting(self) -> bool:
        return bool(self._waiting)

    def unsettled(self) -> list[str]:
        return list(self._waiting.values())

    def applied(self, command_id: str, command: str) -> bool:
        """Settle a command the change stream shows applied; False if it is none of ours
        (or another command that came with its id, which its entity will tell)."""
        if command_id not in self._waiting or command != self._command:
            return False
        del self._waiting[command_id]
        self.sent.applied += 1
        self.sent.done += 1
        return True

    def outcome(self, entity_id: str, command_id: str, result: CommandResult) -> None:
        if self._waiting.pop(command_id, None) is None:
            return
        outcome = result.outcome
        if outcome.status is OutcomeStatus.APPLIED:
            self.sent.applied += 1
        else:
            self._reject(entity_id, outcome.code or ErrorCode.INTERNAL, outcome.message or "")
        self.sent.done += 1

    def error(self, entity_id: str, command_id: str, exc: TenureError) -> None:
        if self._waiting.pop(command_id, None) is None:
            return
        if exc.code is ErrorCode.UNAVAILABLE:
            self.sent.failed += 1
            self._keep(entity_id, exc.code, exc.message)
        else:
            self._reject(entity_id, exc.code, exc.message)
        self.sent.done += 1

    def _reject(self, entity_id: str, code: str, message: str) -> None:
        self.sent.rejected[code] = self.sent.rejected.get(code, 0) + 1
        self._keep(entity_id, code, message)

    def _keep(self, entity_id: str, code: str, message: str) -> None:
        if len(self.sent.failures) < MAX_FAILURES_KEPT:
            self.sent.failures.append(BulkFailure(entity_id=entity_id, code=code, message=message))
