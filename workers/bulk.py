"""The bulk command's activities: the next page of its targets, and one page sent.

Sending a page delivers the command to each entity and waits for its outcome, at most
`window` entities at once, heartbeating as it goes. Sent again (its activity retried after a
worker died), a page costs each entity a look in its ledger: every command id is the bulk's
and the entity's (`bulk:<bulk id>:<entity id>`), so it is applied once and counted as it
first settled.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from entities import catalog
from entities.bulk import (
    PAGE_ACTIVITY,
    SEND_ACTIVITY,
    BulkFailure,
    PageRequest,
    PageSent,
    PageToSend,
    TargetPage,
    bulk_command_id,
)
from entities.errors import ErrorCode, TenureError
from entities.runtime.entity import EntityType
from entities.runtime.envelope import CommandEnvelope, CommandResult, OutcomeStatus
from workers.cache import CacheUnavailable, SnapshotCache
from workers.delivery import CommandDelivery
from workers.listing import EntityIndex, ListFilter, Order
from workers.settings import Settings

HEARTBEAT_SECONDS = 5.0
UNKNOWN_ATTEMPTS = 5
"""Tries of one entity's command while its outcome is unknown, before it counts as failed."""


def list_filter(data: dict[str, Any] | None) -> ListFilter:
    """A listing filter from its JSON form: `{"tags": {"status": ["ACTIVE"]}, "closed":
    false, "text": "ad", "updated_before": "2026-01-01T00:00:00+00:00", "below": {...}}`."""
    data = data or {}
    known = {"tags", "updated_after", "updated_before", "text", "below", "closed"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown filter fields: {', '.join(sorted(unknown))}")

    def moment(name: str) -> datetime | None:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: an ISO 8601 date and time")
        return datetime.fromisoformat(value) if value is not None else None

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
    return ListFilter(
        tags={tag: frozenset(values) for tag, values in tags.items()},
        updated_after=moment("updated_after"),
        updated_before=moment("updated_before"),
        text=text.lower() if text is not None else None,
        below=dict(below),
        closed=closed,
    )


class BulkActivities:
    """Pages of targets from the listing index, and pages of commands delivered."""

    def __init__(self, client: Client, cache: SnapshotCache, settings: Settings) -> None:
        self._delivery = CommandDelivery(client, settings)
        self._index = EntityIndex(cache.client, cache.prefix)

    @activity.defn(name=PAGE_ACTIVITY)
    async def bulk_page(self, request: PageRequest) -> TargetPage:
        """The next page of targets after the cursor, in id order."""
        if request.ids is not None:
            start = int(request.cursor or 0)
            end = start + request.size
            return TargetPage(
                ids=request.ids[start:end],
                cursor=str(end) if end < len(request.ids) else None,
                total=len(request.ids),
            )
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

    @activity.defn(name=SEND_ACTIVITY)
    async def bulk_send(self, page: PageToSend) -> PageSent:
        """Deliver the command to every entity of the page and count what became of it."""
        entity = catalog.entity_types().get(page.entity_type)
        if entity is None:
            raise ApplicationError(
                f"no entity type {page.entity_type!r}",
                type=ErrorCode.INVALID_INPUT,
                non_retryable=True,
            )
        sent = PageSent()
        window = asyncio.Semaphore(page.window)

        def failure(entity_id: str, code: str, message: str) -> None:
            if len(sent.failures) < 20:
                sent.failures.append(BulkFailure(entity_id=entity_id, code=code, message=message))

        async def send(entity_id: str) -> None:
            envelope = CommandEnvelope(
                command_id=bulk_command_id(page.bulk_id, entity_id),
                name=page.command,
                payload=page.payload,
                sent_by=page.sent_by,
            )
            async with window:
                try:
                    result = await self._request(entity, entity_id, envelope)
                except TenureError as exc:
                    if exc.code is ErrorCode.UNAVAILABLE:
                        sent.failed += 1
                    else:
                        sent.rejected[exc.code] = sent.rejected.get(exc.code, 0) + 1
                    failure(entity_id, exc.code, exc.message)
                else:
                    outcome = result.outcome
                    if outcome.status is OutcomeStatus.APPLIED:
                        sent.applied += 1
                    else:
                        code = outcome.code or ErrorCode.INTERNAL
                        sent.rejected[code] = sent.rejected.get(code, 0) + 1
                        failure(entity_id, code, outcome.message or "")
            sent.done += 1

        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_SECONDS)
                activity.heartbeat(sent.done)

        beating = asyncio.create_task(beat())
        try:
            await asyncio.gather(*(send(entity_id) for entity_id in page.ids))
        finally:
            beating.cancel()
        return sent

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
                await asyncio.sleep(min(2.0**attempt, 10.0))
        raise AssertionError("unreachable")
