"""GraphQL binding of bulk commands: start one over a filter or a list of ids, watch its
progress, pause, resume or cancel it, list them (entities/bulk.py does the work).

A list reads Temporal's visibility for the bulk workflows, then each one's progress: a
finished one's from its result (a history read, no worker), a running one's from its
`progress` query. That is a query a running row, so a page is at most `MAX_LISTED` rows,
read at once under one deadline.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime, timedelta
from typing import Annotated, Any

import strawberry
from strawberry.scalars import JSON
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError

from api.authorization import Forbidden
from api.context import Info
from api.listing import Connection, Edge, PageInfo
from api.response_size import bounded
from api.visibility import VisibilityCursor, visibility_count, visibility_page
from entities import catalog
from entities.bulk import (
    BULK_WORKFLOW,
    MAX_FAILURES_KEPT,
    MAX_IDS,
    BulkCommandWorkflow,
    BulkInput,
    BulkProgress,
    BulkStatus,
    bulk_workflow_id,
)
from entities.errors import ErrorCode, Rejected, TenureError
from entities.runtime.entity import ENTITY_ID_PATTERN
from entities.runtime.policy import Principal, Role
from workers.bulk import list_filter
from workers.delivery import unavailable
from workers.temporal import within

strawberry.enum(BulkStatus, name="BulkCommandStatus")

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Za-z0-9._:-]{1,100}")
ENTITY_ID = re.compile(ENTITY_ID_PATTERN)


@strawberry.type(description="How many targets a bulk command's entities refused, by code.")
class RejectedCount:
    code: str
    count: int


@strawberry.type(description="A target that refused the command or could not be reached.")
class BulkFailure:
    entity_id: strawberry.ID
    code: str
    message: str


@strawberry.type(description="One command sent to many entities, and how far it has got.")
class BulkCommand:
    id: strawberry.ID
    entity_type: str
    command: str
    status: BulkStatus
    total: int | None = strawberry.field(description="Null until its targets are counted.")
    done: int
    applied: int
    rejected: int
    rejected_by_code: list[RejectedCount] = bounded(50)
    failed: int = strawberry.field(description="Not delivered within the retries.")
    failures: list[BulkFailure] = bounded(
        MAX_FAILURES_KEPT, description=f"The first {MAX_FAILURES_KEPT}."
    )
    started_at: datetime | None
    ended_at: datetime | None
    eta: datetime | None = strawberry.field(
        description="When it should end, at the pace so far; null before the first page."
    )

    @classmethod
    def of(cls, bulk_id: str, progress: BulkProgress, now: datetime) -> BulkCommand:
        eta = None
        if (
            progress.status is BulkStatus.RUNNING
            and progress.started_at
            and progress.total
            and progress.done
        ):
            spent = now - progress.started_at
            eta = progress.started_at + spent * (progress.total / progress.done)
        return cls(
            id=strawberry.ID(bulk_id),
            entity_type=progress.entity_type,
            command=progress.command,
            status=progress.status,
            total=progress.total,
            done=progress.done,
            applied=progress.applied,
            rejected=sum(progress.rejected.values()),
            rejected_by_code=[RejectedCount(code=c, count=n) for c, n in progress.rejected.items()],
            failed=progress.failed,
            failures=[
                BulkFailure(entity_id=strawberry.ID(f.entity_id), code=f.code, message=f.message)
                for f in progress.failures
            ],
            started_at=progress.started_at,
            ended_at=progress.ended_at,
            eta=eta,
        )


def _require(principal: Principal, entity_type: str, command: str) -> None:
    """Operators, and services whose scopes name the command: never customers, who act on
    one account at a time."""
    entity = catalog.entity_types().get(entity_type)
    if (
        principal.role is Role.CUSTOMER
        or entity is None
        or not entity.policy.allows(principal, entity_type, command, owned=False)
    ):
        raise TenureError(ErrorCode.FORBIDDEN, "not allowed for this caller")


def _checked_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            "idempotencyKey: 1 to 100 letters, digits and . _ : -",
        )
    return key


async def _progress(info: Info, bulk_id: str) -> BulkProgress:
    """The bulk's progress, for a caller who may send its command; NOT_FOUND (or FORBIDDEN,
    telling nothing) otherwise."""
    progress = await info.context.gateway.read_workflow(
        bulk_workflow_id(_checked_key(bulk_id)), "progress", BulkProgress
    )
    if progress is None:
        if info.context.principal.role is not Role.ADMIN:
            raise TenureError(ErrorCode.FORBIDDEN, "not allowed for this caller")
        raise TenureError(ErrorCode.NOT_FOUND, f"no bulk command {bulk_id}")
    _require(info.context.principal, progress.entity_type, progress.command)
    return progress


def _now() -> datetime:
    return datetime.now().astimezone()


MAX_LISTED = 20
"""Bulk commands one page may list: each running one costs a query to its workflow."""
MAX_PAGES_READ = 3
"""Visibility pages one list may read to fill its page when its filter leaves rows out."""
PROGRESS_TIMEOUT = 2.0
"""How long a listed bulk's workflow has to answer; one whose worker is down would hold
the whole page for half a minute."""
_OPEN = frozenset({BulkStatus.RUNNING, BulkStatus.PAUSED})


@strawberry.type(description="A bulk command in a list, with its progress when it answered.")
class BulkCommandSummary:
    id: strawberry.ID
    running: bool = strawberry.field(
        description="Whether its workflow runs: RUNNING or PAUSED, as Temporal's visibility "
        "knows it."
    )
    bulk_command: BulkCommand | None = strawberry.field(
        description="How far it has got; null when its workflow did not answer within "
        f"{PROGRESS_TIMEOUT:g} s (no worker runs it)."
    )


@strawberry.input
class BulkCommandFilter:
    status: list[BulkStatus] | None = strawberry.field(
        default=None,
        description="A running one that does not answer is listed under RUNNING and PAUSED alike.",
    )


def _visibility_query(wanted: frozenset[BulkStatus]) -> str:
    """The bulk workflows that can hold `wanted` (any when empty): RUNNING and PAUSED ones
    run, COMPLETED and CANCELLED ones have completed. A bulk that continued as new is
    listed by its latest run; a terminated one has no progress to show."""
    states = []
    if not wanted or wanted & _OPEN:
        states.append("'Running'")
    if not wanted or wanted - _OPEN:
        states.append("'Completed'")
    return f"WorkflowType = '{BULK_WORKFLOW}' AND ExecutionStatus IN ({', '.join(states)})"


def _exact(wanted: frozenset[BulkStatus]) -> bool:
    """Whether visibility alone tells the rows in `wanted`, and so can count them."""
    return not wanted or wanted in (_OPEN, frozenset(BulkStatus) - _OPEN, frozenset(BulkStatus))


async def _listed_progress(client: Client, execution: WorkflowExecution) -> BulkProgress | None:
    """A listed bulk's progress: its result once completed (a history read, no worker),
    else its answer to `progress`; None when it gave none in time, or has gone since."""
    handle = client.get_workflow_handle_for(BulkCommandWorkflow.run, execution.id)
    timeout = timedelta(seconds=PROGRESS_TIMEOUT)
    try:
        if execution.status is WorkflowExecutionStatus.COMPLETED:
            return await within(PROGRESS_TIMEOUT, handle.result(rpc_timeout=timeout))
        return await within(
            PROGRESS_TIMEOUT, handle.query(BulkCommandWorkflow.progress, rpc_timeout=timeout)
        )
    except RPCError as exc:
        log.warning("bulk command %s did not answer: %s", execution.id, exc)
        return None


def _listed(wanted: frozenset[BulkStatus], progress: BulkProgress | None) -> bool:
    return not wanted or progress is None or progress.status in wanted


Row = tuple[BulkCommandSummary, VisibilityCursor]


async def _rows(
    client: Client, wanted: frozenset[BulkStatus], first: int, after: VisibilityCursor
) -> tuple[list[Row], VisibilityCursor | None, bool]:
    """Up to `first` bulk commands in `wanted` after the cursor, each with its cursor; the
    cursor after the last row that counted (past the rows a filter left out, when the page
    ends early); and whether more may follow."""
    query = _visibility_query(wanted)
    rows: list[Row] = []
    ids: set[str] = set()
    token, seen, last = after.token, after.seen, None
    now = _now()
    for _ in range(MAX_PAGES_READ):
        listed, following = await visibility_page(client, query, after.size, token)
        page = listed[seen:]
        progresses = await asyncio.gather(*(_listed_progress(client, e) for e in page))
        for offset, (execution, progress) in enumerate(zip(page, progresses, strict=True)):
            here = VisibilityCursor(token, after.size, seen + offset + 1)
            # Visibility may list a bulk twice for a moment while it continues as new.
            if execution.id in ids or not _listed(wanted, progress):
                last = here if len(rows) < first else last
                continue
            if len(rows) == first:
                return rows, last, True
            bulk_id = execution.id.removeprefix(bulk_workflow_id(""))
            summary = BulkCommandSummary(
                id=strawberry.ID(bulk_id),
                running=execution.status is WorkflowExecutionStatus.RUNNING,
                bulk_command=BulkCommand.of(bulk_id, progress, now) if progress else None,
            )
            ids.add(execution.id)
            rows.append((summary, here))
            last = here
        token, seen = following, 0
        if len(rows) == first or not token:
            break
    return rows, last, token is not None


async def list_bulk_commands(
    info: Info, where: BulkCommandFilter, first: int, after: str | None
) -> Connection[BulkCommandSummary]:
    """One page of bulk commands, running ones first, then the most recently ended; for
    admins alone, as the checkouts' operator list is: it spans every entity type and
    command, whatever a service's scopes name."""
    if info.context.principal.role is not Role.ADMIN:
        raise Forbidden()
    if not 0 <= first <= MAX_LISTED:
        raise TenureError(ErrorCode.INVALID_INPUT, f"first: from 0 to {MAX_LISTED}")
    start = (
        VisibilityCursor.decode(after)
        if after is not None
        else VisibilityCursor(None, max(first, 1), 0)
    )
    if start.size > MAX_LISTED:
        raise TenureError(ErrorCode.INVALID_INPUT, "after: not a cursor of this list")
    wanted = frozenset(where.status or ())
    client = info.context.gateway.client
    try:
        rows, last, more = await _rows(client, wanted, first, start) if first else ([], None, True)
        total = None
        if _exact(wanted):
            total = await visibility_count(client, _visibility_query(wanted))
    except RPCError as exc:
        raise unavailable(exc) from exc
    edges = [Edge(cursor=cursor.encode(), node=summary) for summary, cursor in rows]
    return Connection(
        edges=edges,
        page_info=PageInfo(
            has_next_page=more,
            has_previous_page=False,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=last.encode() if last else after,
        ),
        total_count=total,
    )


LISTED_FIRST = strawberry.argument(description=f"At most {MAX_LISTED}; 10 when not given.")


@strawberry.type
class BulkQuery:
    @strawberry.field(description="A bulk command and how far it has got.")
    async def bulk_command(self, info: Info, id: strawberry.ID) -> BulkCommand:
        return BulkCommand.of(id, await _progress(info, id), _now())

    @strawberry.field(
        description="Bulk commands, for admins: running ones first, then the most recently "
        "ended, each with how far it has got (a running one's asked of its workflow, a page "
        f"of at most {MAX_LISTED} at once). `totalCount` is null when the filter tells "
        "RUNNING from PAUSED or COMPLETED from CANCELLED, which only each bulk command "
        "knows. Temporal's visibility is eventually consistent: one just started may take "
        "a second to be listed."
    )
    async def bulk_commands(
        self,
        info: Info,
        where: Annotated[BulkCommandFilter | None, strawberry.argument(name="filter")] = None,
        first: Annotated[int, LISTED_FIRST] = 10,
        after: str | None = None,
    ) -> Connection[BulkCommandSummary]:
        return await list_bulk_commands(info, where or BulkCommandFilter(), first, after)


@strawberry.type
class BulkMutation:
    @strawberry.mutation(
        description="Send one command to every entity a filter or a list of ids names. The "
        "idempotency key is the bulk command's id: sent again, it starts nothing and answers "
        "with the bulk command it started; given with another command, payload or targets, "
        "it is refused with IDEMPOTENCY_KEY_REUSED. Each entity's command id is "
        "`bulk:<key>:<entity id>`, so no entity gets it twice. `filter` is a listing filter "
        'as JSON: {"tags": {"status": ["ACTIVE"]}, "updated_before": "2026-11-01T00:00:00Z", '
        '"closed": false, "text": "ad", "below": {"available": 5}}.'
    )
    async def start_bulk_command(
        self,
        info: Info,
        entity_type: str,
        command: str,
        idempotency_key: str,
        payload: JSON | None = None,
        ids: list[strawberry.ID] | None = None,
        filter: JSON | None = None,
    ) -> BulkCommand:
        key = _checked_key(idempotency_key)
        principal = info.context.principal
        entity = catalog.entity_types().get(entity_type)
        if entity is None:
            raise TenureError(
                ErrorCode.INVALID_INPUT, f"entityType: no entity type {entity_type!r}"
            )
        if payload is not None and not isinstance(payload, dict):
            raise TenureError(ErrorCode.INVALID_INPUT, "payload: a JSON object")
        given: dict[str, Any] = payload or {}
        try:
            entity.parse(command, given)
        except Rejected as exc:
            raise TenureError(exc.code, exc.message) from None
        _require(principal, entity_type, command)
        if (ids is None) == (filter is None):
            raise TenureError(ErrorCode.INVALID_INPUT, "give either ids or filter")
        if ids is not None:
            if len(ids) > MAX_IDS:
                raise TenureError(ErrorCode.INVALID_INPUT, f"ids: at most {MAX_IDS}")
            if not all(ENTITY_ID.fullmatch(i) for i in ids):
                raise TenureError(ErrorCode.INVALID_INPUT, "ids: each an entity id")
        if filter is not None:
            if not isinstance(filter, dict):
                raise TenureError(ErrorCode.INVALID_INPUT, "filter: a JSON object")
            try:
                list_filter(filter)
            except (TypeError, ValueError, AttributeError) as exc:
                raise TenureError(ErrorCode.INVALID_INPUT, f"filter: {exc}") from None
        bulk_input = BulkInput(
            bulk_id=key,
            entity_type=entity_type,
            command=command,
            payload=given,
            ids=[str(i) for i in ids] if ids is not None else None,
            filter=filter,
            sent_by=f"{principal.role.value}:{principal.subject}",
        )
        started = await info.context.gateway.start_workflow(
            BULK_WORKFLOW, bulk_input, bulk_workflow_id(key)
        )
        progress = await _progress(info, key)
        if not started and progress.fingerprint not in ("", bulk_input.fingerprint()):
            raise TenureError(
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                f"idempotencyKey {key} was already used for another bulk command "
                f"({progress.entity_type} {progress.command}); send this one with a new key",
            )
        return BulkCommand.of(key, progress, _now())

    @strawberry.mutation(description="Stop a bulk command after the page it is sending.")
    async def pause_bulk_command(self, info: Info, id: strawberry.ID) -> BulkCommand:
        return await _signal(info, id, "pause")

    @strawberry.mutation(description="Go on from where a paused bulk command stopped.")
    async def resume_bulk_command(self, info: Info, id: strawberry.ID) -> BulkCommand:
        return await _signal(info, id, "resume")

    @strawberry.mutation(description="End a bulk command after the page it is sending.")
    async def cancel_bulk_command(self, info: Info, id: strawberry.ID) -> BulkCommand:
        return await _signal(info, id, "cancel")


async def _signal(info: Info, bulk_id: str, signal: str) -> BulkCommand:
    await _progress(info, bulk_id)  # it exists, and the caller may act on it
    await info.context.gateway.signal_workflow(bulk_workflow_id(bulk_id), signal)
    return BulkCommand.of(bulk_id, await _progress(info, bulk_id), _now())
