"""Operator tools for checkouts: the checkouts that need an operator, listed from Temporal's
visibility, and an admin's retry or resolve of a FAILED one, with the reason, recorded by the
checkout with who asked.

A list reads Temporal's visibility (api/visibility.py), not the sagas: each row is the status
the saga keeps in its `TenureCheckoutStatus` search attribute and the summary in its memo;
`checkout` on a row asks the saga itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any

import strawberry
from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecution, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api.checkouts import (
    Checkout,
    CheckoutStep,
    checked_checkout_id,
    read_checkout,
)
from api.common import Long
from api.context import Info
from api.gateway import check_idempotency_key, unbudgeted
from api.listing import DEFAULT_PAGE, FIRST, MAX_PAGE, After, Connection, Edge
from api.operators import require_operator
from api.response_size import bounded
from api.visibility import (
    MAX_PAGES_READ,
    TEMPORAL_TIMEOUT,
    VisibilityCursor,
    visibility_count,
    visibility_page,
)
from entities.checkout import (
    MAX_REFUSED_LISTED,
    SENT_AGAIN,
    STATUS_ATTRIBUTE,
    CheckoutState,
    CheckoutWorkflow,
)
from entities.checkout_input import CHECKOUT_WORKFLOW, checkout_workflow_id
from entities.errors import ErrorCode, TenureError
from entities.runtime.entity import PRINTABLE, shown_as_written
from entities.runtime.saga import (
    MAX_OPERATOR_REASON,
    OperatorActionKind,
    OperatorRequest,
    SagaStatus,
    StepRecord,
)
from workers.failures import is_missing, refusal, unavailable
from workers.temporal import within


@strawberry.type(
    description="A checkout in a list, as Temporal's visibility knows it; `checkout` reads "
    "the rest from the saga."
)
class CheckoutSummary:
    id: strawberry.ID
    cart_id: strawberry.ID
    status: SagaStatus | None = strawberry.field(
        description="Null for a checkout that ended before checkouts kept their status in "
        "visibility."
    )
    account_id: strawberry.ID | None
    total: Long | None
    failure_code: str | None
    failure_reason: str | None
    refused: list[CheckoutStep] = bounded(
        MAX_REFUSED_LISTED,
        description=f"While FAILED, why it waits for an operator: the first "
        f"{MAX_REFUSED_LISTED} steps refused (`checkout` has all); empty for a checkout that "
        "failed before lists showed them.",
    )
    awaiting_operator_until: datetime | None = strawberry.field(
        description="While FAILED, until when it waits for an operator; null when it does not."
    )
    started_at: datetime
    ended_at: datetime | None = strawberry.field(description="Null while its saga runs.")

    @strawberry.field(description="The whole checkout, asked of its saga: a LIVE read.")
    async def checkout(self, info: Info) -> Checkout | None:
        return await read_checkout(info, self.id)

    @classmethod
    async def of(cls, execution: WorkflowExecution) -> CheckoutSummary:
        checkout_id = execution.id.removeprefix(checkout_workflow_id(""))
        status = execution.typed_search_attributes.get(STATUS_ATTRIBUTE)
        memo: Mapping[str, Any] = await execution.memo()
        until = memo.get("awaiting_operator_until")
        account_id = memo.get("account_id")
        total = memo.get("total")
        return cls(
            id=strawberry.ID(checkout_id),
            cart_id=strawberry.ID(checkout_id.rpartition("-")[0]),
            status=SagaStatus(status) if status and status in SagaStatus.__members__ else None,
            account_id=strawberry.ID(account_id) if isinstance(account_id, str) else None,
            total=Long(total) if isinstance(total, int) else None,
            failure_code=memo.get("failure_code"),
            failure_reason=memo.get("failure_reason"),
            refused=_refused(memo.get("refused")),
            awaiting_operator_until=datetime.fromisoformat(until) if until else None,
            started_at=execution.start_time,
            ended_at=execution.close_time,
        )


def _refused(kept: object) -> list[CheckoutStep]:
    """The refused steps a checkout keeps in its memo; none when it kept none."""
    if not isinstance(kept, list):
        return []
    try:
        steps = [StepRecord.model_validate(step) for step in kept[:MAX_REFUSED_LISTED]]
    except ValidationError:
        return []
    return [CheckoutStep.of(step) for step in steps]


@strawberry.input
class CheckoutFilter:
    status: list[SagaStatus] | None = strawberry.field(
        default=None, description="FAILED lists the checkouts that need an operator."
    )


def visibility_query(where: CheckoutFilter) -> str:
    """The list filter for Temporal's visibility. A checkout sets its status there when it
    settles, so a RUNNING one is one with none, or RUNNING again under an operator's retry."""
    query = f"WorkflowType = '{CHECKOUT_WORKFLOW}'"
    if not where.status:
        return query
    chosen = [f"{STATUS_ATTRIBUTE.name} = '{SagaStatus(s).value}'" for s in set(where.status)]
    if SagaStatus.RUNNING in where.status:
        chosen.append(f"({STATUS_ATTRIBUTE.name} IS NULL AND ExecutionStatus = 'Running')")
    return f"{query} AND ({' OR '.join(sorted(chosen))})"


async def _rows(
    client: Client, query: str, first: int, after: VisibilityCursor
) -> tuple[list[tuple[WorkflowExecution, VisibilityCursor]], bool]:
    """Up to `first` rows after the cursor, each with its own cursor, and whether more
    follow."""
    rows: list[tuple[WorkflowExecution, VisibilityCursor]] = []
    cursor: VisibilityCursor | None = after
    for _ in range(MAX_PAGES_READ):
        assert cursor is not None
        page, following = await visibility_page(client, query, after.size, cursor.token)
        rows += [
            (page[i], cursor.after(page, i, following))
            for i in range(cursor.resume_in(page), len(page))
        ]
        cursor = cursor.next_page(following) if following else None
        if len(rows) > first or cursor is None:
            break
    return rows[:first], len(rows) > first or cursor is not None


async def list_checkouts(
    info: Info, where: CheckoutFilter, first: int, after: str | None
) -> Connection[CheckoutSummary]:
    """One page of checkouts, running ones first, then the most recently ended."""
    require_operator(info)
    start = VisibilityCursor.start(after, first, MAX_PAGE, "checkouts")
    if where.status == []:  # an empty list of statuses lets none in, as entity lists do
        return Connection.forward([], False, after, 0)
    client = info.context.gateway.client
    query = visibility_query(where)
    try:
        rows, more = await _rows(client, query, first, start) if first else ([], True)
        total = await visibility_count(client, query)
        if not first and after is None:  # a count alone: more only when there is any
            more = bool(total)
    except RPCError as exc:
        raise unavailable(exc) from exc
    edges = [Edge(cursor=c.encode(), node=await CheckoutSummary.of(e)) for e, c in rows]
    return Connection.forward(edges, more, edges[-1].cursor if edges else after, total)


async def operate(
    info: Info,
    checkout_id: str,
    action: OperatorActionKind,
    reason: str,
    idempotency_key: str | None = None,
) -> Checkout:
    """Ask a FAILED checkout to take an operator's action; the checkout as it is then. An
    action sent again under its key is answered as the first was, taken once."""
    require_operator(info)
    checkout_id = checked_checkout_id(checkout_id)
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    reason = reason.strip()
    if not 0 < len(reason) <= MAX_OPERATOR_REASON:
        raise TenureError(ErrorCode.INVALID_INPUT, f"reason: 1 to {MAX_OPERATOR_REASON} characters")
    if not re.fullmatch(PRINTABLE, reason) or not shown_as_written(reason):
        # Shown to every reader of the checkout, its customer too, as a suspension's is.
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            "reason: no control characters, invisible formatting (a direction override, a "
            "zero-width space...) or line separators",
        )
    principal = info.context.principal
    by = principal.sender[:160]
    request = OperatorRequest(action=action, reason=reason, by=by, key=idempotency_key)
    handle = info.context.gateway.client.get_workflow_handle(checkout_workflow_id(checkout_id))
    try:
        state: CheckoutState = await within(
            TEMPORAL_TIMEOUT,
            handle.execute_update(
                CheckoutWorkflow.operate,
                request,
                rpc_timeout=timedelta(seconds=TEMPORAL_TIMEOUT),
            ),
        )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError) and cause.type == SENT_AGAIN:
            state = await _as_taken(info, checkout_id, request, exc)
        else:
            refused = refusal(exc)
            if refused is None:
                raise
            raise refused from exc
    except RPCError as exc:
        if not is_missing(exc):
            raise unavailable(exc) from exc
        # Ended: this action, sent again, may have ended it (a resolve, say).
        state = await _as_taken(info, checkout_id, request, exc)
    return Checkout.from_state(state, info.context.principal)


async def _as_taken(
    info: Info, checkout_id: str, request: OperatorRequest, exc: Exception
) -> CheckoutState:
    """The checkout for an action it took no update for, ended or refusing it as sent
    again: as it is, when the checkout recorded this action under its key, else why not
    (it never existed, it has ended, the key was used for another action)."""
    # Bounded by the mutation itself, not charged to the request's LIVE reads: a request
    # of several actions on ended checkouts was refused TOO_MANY_LIVE_READS.
    with unbudgeted():
        state = await info.context.gateway.read_workflow(
            checkout_workflow_id(checkout_id), CheckoutWorkflow.status, CheckoutState
        )
    if state is None:
        raise TenureError(ErrorCode.NOT_FOUND, f"checkout {checkout_id} does not exist") from exc
    earlier = request.recorded_in(state.operator_actions)
    if earlier is None:
        raise TenureError(
            ErrorCode.INVALID_TRANSITION,
            f"checkout {checkout_id} has ended; it no longer takes an operator's action",
        ) from exc
    refused = request.refused_again(earlier, f"checkout {checkout_id}")
    if refused is not None:
        raise TenureError(*refused) from exc
    return state


REASON = strawberry.argument(
    description=f"Why, 1 to {MAX_OPERATOR_REASON} characters; recorded with who asked."
)
OperatorKey = Annotated[
    str | None,
    strawberry.argument(
        description="The action's id: sent again by the same operator (a retry after a "
        "timeout, say), it is taken once and answered as the first was, also once the "
        "checkout has ended; with another action or reason, IDEMPOTENCY_KEY_REUSED. 1 to 128 "
        "printable ASCII characters, no spaces."
    ),
]


@strawberry.type
class CheckoutOperatorQuery:
    @strawberry.field(
        description="Checkouts, for admins: `filter: {status: FAILED}` lists those that need "
        "an operator. Running ones first, then the most recently ended."
    )
    async def checkouts(
        self,
        info: Info,
        where: Annotated[CheckoutFilter | None, strawberry.argument(name="filter")] = None,
        first: Annotated[int, FIRST] = DEFAULT_PAGE,
        after: After = None,
    ) -> Connection[CheckoutSummary] | None:
        return await list_checkouts(info, where or CheckoutFilter(), first, after)


@strawberry.type
class CheckoutOperatorMutation:
    @strawberry.mutation(
        description="Admins: run a FAILED checkout's refused compensations again, last "
        "registered first, then its report if that failed. It ends COMPENSATED (or "
        "COMPLETED) when they succeed, or waits for an operator again."
    )
    async def retry_checkout_compensations(
        self,
        info: Info,
        id: strawberry.ID,
        reason: Annotated[str, REASON],
        idempotency_key: OperatorKey = None,
    ) -> Checkout | None:
        return await operate(info, id, OperatorActionKind.RETRY, reason, idempotency_key)

    @strawberry.mutation(
        description="Admins: mark a FAILED checkout as settled by hand; it ends RESOLVED and "
        "runs nothing more."
    )
    async def resolve_checkout(
        self,
        info: Info,
        id: strawberry.ID,
        reason: Annotated[str, REASON],
        idempotency_key: OperatorKey = None,
    ) -> Checkout | None:
        return await operate(info, id, OperatorActionKind.RESOLVE, reason, idempotency_key)
