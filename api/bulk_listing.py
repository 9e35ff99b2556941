"""The list of bulk commands, for admins: Temporal's visibility for the bulk workflows
(api/visibility.py), then each one's progress: a finished one's from its result (a history
read, no worker), a running one's from its `progress` query. That is a query a running
row, so a page is at most `MAX_LISTED` rows, read at once under one deadline.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Annotated, Any

import strawberry
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError

from api.bulk import BulkCommand, now
from api.context import Info
from api.listing import After, Connection, Edge
from api.operators import require_operator
from api.visibility import VisibilityCursor, visibility_count, visibility_page
from entities.bulk import (
    BULK_WORKFLOW,
    BulkCommandWorkflow,
    BulkProgress,
    BulkStatus,
    bulk_workflow_id,
)
from workers.failures import unavailable
from workers.temporal import ask, within

log = logging.getLogger(__name__)

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
    handle: WorkflowHandle[Any, BulkProgress] = client.get_workflow_handle(
        execution.id, result_type=BulkProgress
    )
    timeout = timedelta(seconds=PROGRESS_TIMEOUT)
    try:
        if execution.status is WorkflowExecutionStatus.COMPLETED:
            return await within(PROGRESS_TIMEOUT, handle.result(rpc_timeout=timeout))
        return await ask(handle, BulkCommandWorkflow.progress, seconds=PROGRESS_TIMEOUT)
    except RPCError as exc:
        log.warning("bulk command %s did not answer: %s", execution.id, exc)
        return None
    except Exception:
        # Its own failure (a query its code failed, a result of an older shape) is its row's
        # alone: it failed the whole page INTERNAL, and the console's tab with it.
        log.exception("bulk command %s: its progress could not be read", execution.id)
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
    cursor: VisibilityCursor | None = after
    last = None
    at = now()
    for _ in range(MAX_PAGES_READ):
        assert cursor is not None
        listed, following = await visibility_page(client, query, after.size, cursor.token)
        seen = cursor.resume_in(listed)
        page = listed[seen:]
        progresses = await asyncio.gather(*(_listed_progress(client, e) for e in page))
        for offset, (execution, progress) in enumerate(zip(page, progresses, strict=True)):
            here = cursor.after(listed, seen + offset, following)
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
                bulk_command=BulkCommand.of(bulk_id, progress, at) if progress else None,
            )
            ids.add(execution.id)
            rows.append((summary, here))
            last = here
        cursor = cursor.next_page(following) if following else None
        if len(rows) == first or cursor is None:
            break
    return rows, last, cursor is not None


async def list_bulk_commands(
    info: Info, where: BulkCommandFilter, first: int, after: str | None
) -> Connection[BulkCommandSummary]:
    """One page of bulk commands, running ones first, then the most recently ended; for
    admins alone, as the checkouts' operator list is: it spans every entity type and
    command, whatever a service's scopes name."""
    require_operator(info)
    start = VisibilityCursor.start(after, first, MAX_LISTED, "bulkCommands")
    if where.status == []:  # an empty list of statuses lets none in, as entity lists do
        return Connection.forward([], False, after, 0)
    wanted = frozenset(where.status or ())
    client = info.context.gateway.client
    try:
        rows, last, more = await _rows(client, wanted, first, start) if first else ([], None, True)
        total = None
        if _exact(wanted):
            total = await visibility_count(client, _visibility_query(wanted))
        if (
            not first and after is None and total is not None
        ):  # a count alone: more only when there is any
            more = bool(total)
    except RPCError as exc:
        raise unavailable(exc) from exc
    edges = [Edge(cursor=cursor.encode(), node=summary) for summary, cursor in rows]
    return Connection.forward(edges, more, last.encode() if last else after, total)


LISTED_FIRST = strawberry.argument(description=f"At most {MAX_LISTED}; 10 when not given.")


@strawberry.type
class BulkListQuery:
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
        after: After = None,
    ) -> Connection[BulkCommandSummary] | None:
        return await list_bulk_commands(info, where or BulkCommandFilter(), first, after)
