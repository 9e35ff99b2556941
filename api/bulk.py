"""GraphQL binding of bulk commands: start one over a filter or a list of ids, watch its
progress, pause, resume or cancel it (entities/bulk.py does the work; api/bulk_listing.py
lists them)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

import strawberry
from strawberry.scalars import JSON

from api.common import CREATE_GUARDS, told_of_state, unread_refusal
from api.context import Info
from api.gateway import MayHaveStarted, unbudgeted
from api.response_size import bounded
from entities import catalog
from entities.bulk import (
    BULK_WORKFLOW,
    MAX_ACTIONS_KEPT,
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
from entities.runtime.listing import MAX_TEXT_LENGTH
from entities.runtime.policy import READ, Principal, Role
from workers.bulk import list_filter

strawberry.enum(BulkStatus, name="BulkCommandStatus")

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Za-z0-9._:-]{1,100}")
ENTITY_ID = re.compile(ENTITY_ID_PATTERN)
_ENDED = frozenset({BulkStatus.COMPLETED, BulkStatus.CANCELLED})


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
    total: int | None = strawberry.field(
        description="Its targets: the filter's count when its first page was read, raised to "
        "`delivered` should more come to match, and exact once the last page is sent. Null "
        "until counted; a filter the index cannot count stays null until then."
    )
    delivered: int = strawberry.field(
        description="Targets sent the command: handed to Temporal, which has it applied, or "
        "settled while sending. Sending runs ahead of the entities applying."
    )
    delivered_at: datetime | None = strawberry.field(
        description="When the last target was sent the command; null until then."
    )
    done: int = strawberry.field(description="Targets whose outcome is counted.")
    applied: int
    rejected: int
    rejected_by_code: list[RejectedCount] = bounded(50)
    failed: int = strawberry.field(description="Not delivered within the retries.")
    failures: list[BulkFailure] = bounded(
        MAX_FAILURES_KEPT, description=f"The first {MAX_FAILURES_KEPT}."
    )
    started_at: datetime | None
    started_by: str | None = strawberry.field(
        description="Who started it (`role:subject`); null for one started before it was kept."
    )
    ended_at: datetime | None
    eta: datetime | None = strawberry.field(
        description="When it should end, at the pace of its time running (its pauses left "
        "out); null before the first outcome, and while paused."
    )
    cancel_requested: bool = strawberry.field(
        description="A cancel was asked: it ends CANCELLED once the page in flight is sent "
        "(COMPLETED if that was its last), and takes no pause or resume."
    )

    @classmethod
    def of(
        cls, bulk_id: str, progress: BulkProgress, now: datetime, states_shown: bool = True
    ) -> BulkCommand:
        """The bulk command as `progress` has it at `now`. Not `states_shown` (a service that
        may send the command but not read the entities), a refusal worded from an entity's
        state (a balance, a status) gives its code alone, as a single command's does."""
        eta = None
        working = progress.working_seconds(now)
        if progress.status is BulkStatus.RUNNING and working and progress.total and progress.done:
            left = max(progress.total - progress.done, 0)
            eta = now + timedelta(seconds=working * left / progress.done)
        return cls(
            id=strawberry.ID(bulk_id),
            entity_type=progress.entity_type,
            command=progress.command,
            status=progress.status,
            total=progress.total,
            delivered=progress.delivered,
            delivered_at=progress.delivered_at,
            done=progress.done,
            applied=progress.applied,
            rejected=sum(progress.rejected.values()),
            rejected_by_code=[RejectedCount(code=c, count=n) for c, n in progress.rejected.items()],
            failed=progress.failed,
            failures=[
                BulkFailure(
                    entity_id=strawberry.ID(f.entity_id),
                    code=f.code,
                    message=f.message
                    if states_shown or not told_of_state(f.code)
                    else unread_refusal(
                        progress.entity_type, f.entity_id, progress.command, f.code
                    ),
                )
                for f in progress.failures
            ],
            started_at=progress.started_at,
            started_by=progress.sent_by,
            ended_at=progress.ended_at,
            eta=eta,
            cancel_requested=progress.cancel_requested,
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


def _checked_key(key: str, argument: str = "idempotencyKey") -> str:
    """A bulk command's key, its id too; refused naming the `argument` it came in."""
    if not _KEY.fullmatch(key):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            f"{argument}: 1 to 100 letters, digits and . _ : -",
        )
    return key


async def _progress(info: Info, bulk_id: str) -> BulkProgress:
    """The bulk's progress, for a caller who may send its command; NOT_FOUND (or FORBIDDEN,
    telling nothing) otherwise."""
    progress = await info.context.gateway.read_workflow(
        bulk_workflow_id(_checked_key(bulk_id, "id")), BulkCommandWorkflow.progress, BulkProgress
    )
    principal = info.context.principal
    if progress is None:
        if principal.role is not Role.ADMIN:
            raise TenureError(ErrorCode.FORBIDDEN, "not allowed for this caller")
        raise TenureError(ErrorCode.NOT_FOUND, f"no bulk command {bulk_id}")
    _require(principal, progress.entity_type, progress.command)
    if principal.role is not Role.ADMIN and progress.sent_by != principal.sender:
        # A service follows, pauses and cancels its own bulk commands, not another's.
        raise TenureError(ErrorCode.FORBIDDEN, "not allowed for this caller")
    return progress


def now() -> datetime:
    return datetime.now().astimezone()


def _shown(info: Info, bulk_id: str, progress: BulkProgress) -> BulkCommand:
    """The bulk command as its caller may see it: the entities' refusals in full only to one
    that may read them."""
    principal = info.context.principal
    entity = catalog.entity_types().get(progress.entity_type)
    may_read = entity is not None and entity.policy.allows(
        principal, progress.entity_type, READ, owned=False
    )
    return BulkCommand.of(bulk_id, progress, now(), states_shown=may_read)


@strawberry.type
class BulkQuery:
    @strawberry.field(
        description="A bulk command and how far it has got; null when there is none by that id."
    )
    async def bulk_command(self, info: Info, id: strawberry.ID) -> BulkCommand | None:
        try:
            progress = await _progress(info, id)
        except TenureError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return None  # as an entity's read answers one that does not exist
            raise
        return _shown(info, id, progress)


ActionKey = Annotated[
    str | None,
    strawberry.argument(
        description="The action's id: sent again (a retry after a timeout, say), it is taken "
        "once and answered with the bulk command as it is then, even after a later pause or "
        f"resume, or the bulk's end (the last {MAX_ACTIONS_KEPT} keyed actions are kept); "
        "given for another action, IDEMPOTENCY_KEY_REUSED. Without one, a pause retried after "
        "a resume pauses again. 1 to 100 letters, digits and . _ : -"
    ),
]


@strawberry.type
class BulkMutation:
    @strawberry.mutation(
        description="Send one command to every entity a filter or a list of ids names. The "
        "idempotency key is the bulk command's id: sent again, it starts nothing and answers "
        "with the bulk command it started; given with another command, payload or targets, "
        "or by another caller, it is refused with IDEMPOTENCY_KEY_REUSED. Each entity's "
        "command id is `bulk:<key>:<entity id>`, so no entity gets it twice. `filter` is a "
        'listing filter as JSON: {"tags": {"status": ["ACTIVE"]}, '
        '"updated_before": "2026-11-01T00:00:00Z", "closed": false, "text": "ad", '
        '"below": {"available": 5}}, held to what the type\'s list takes: '
        f"its own tags, statuses and numbers, `text` of at most {MAX_TEXT_LENGTH} "
        "characters. Commands only Tenure's own workflows send (`completeCheckout`, "
        "`failCheckout`, `refund`), and creates checked as each is made (`createCart`), "
        "are refused with INVALID_INPUT."
    )
    async def start_bulk_command(
        self,
        info: Info,
        entity_type: str,
        command: str,
        idempotency_key: Annotated[
            str,
            strawberry.argument(
                description="The bulk command's id, 1 to 100 letters, digits and . _ : -: "
                "started again with it and the same arguments, it answers the first (with "
                "others, IDEMPOTENCY_KEY_REUSED)."
            ),
        ],
        payload: JSON | None = None,
        ids: list[strawberry.ID] | None = None,
        filter: JSON | None = None,
    ) -> BulkCommand | None:
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
            if entity.spec(command).internal:
                # Refused to every caller, admins too: it is not whose the call is, but
                # what no client sends (a cart marked CHECKED_OUT without its saga).
                raise Rejected(
                    ErrorCode.INVALID_INPUT,
                    f"command: {entity_type} {command} is sent by Tenure's own workflows "
                    "(the checkout saga), never by a client nor in bulk",
                )
            if (entity_type, command) in CREATE_GUARDS:
                # Its checks (a cart's account open, and room for it) run where it is sent
                # one at a time; in bulk they did not, and 10,000 carts went to one account.
                raise Rejected(
                    ErrorCode.INVALID_INPUT,
                    f"command: {entity_type} {command} is checked as each one is made: "
                    "send it one at a time, not in bulk",
                )
            entity.parse(command, given)
        except Rejected as exc:
            raise TenureError(exc.code, exc.message) from None
        _require(principal, entity_type, command)
        if (ids is None) == (filter is None):
            raise TenureError(ErrorCode.INVALID_INPUT, "give either ids or filter")
        if ids is not None:
            if not ids:  # it would start a bulk that does nothing, and use up its key
                raise TenureError(ErrorCode.INVALID_INPUT, "ids: at least one")
            if len(ids) > MAX_IDS:
                raise TenureError(ErrorCode.INVALID_INPUT, f"ids: at most {MAX_IDS}")
            if not all(ENTITY_ID.fullmatch(i) for i in ids):
                raise TenureError(ErrorCode.INVALID_INPUT, "ids: each an entity id")
        if filter is not None:
            if not entity.policy.allows(principal, entity_type, READ, owned=True):
                # A filter searches the type's list (names, emails): as listing it does.
                raise TenureError(
                    ErrorCode.FORBIDDEN,
                    f"a filter lists {entity_type} entities: it needs read:* or "
                    f"{entity_type}:read; name the entities with ids instead",
                )
            if not isinstance(filter, dict):
                raise TenureError(ErrorCode.INVALID_INPUT, "filter: a JSON object")
            try:
                list_filter(filter, entity)
            except (TypeError, ValueError, AttributeError) as exc:
                raise TenureError(ErrorCode.INVALID_INPUT, f"filter: {exc}") from None
        bulk_input = BulkInput(
            bulk_id=key,
            entity_type=entity_type,
            command=command,
            payload=given,
            ids=list(dict.fromkeys(str(i) for i in ids)) if ids is not None else None,
            filter=filter,
            sent_by=principal.sender,
        )
        try:
            started = await info.context.gateway.start_workflow(
                BULK_WORKFLOW, bulk_input, bulk_workflow_id(key), bulk=True
            )
        except MayHaveStarted as exc:
            raise TenureError(
                exc.code,
                f"{exc.message}: send it again with the same idempotencyKey, which starts it at "
                "most once",
            ) from exc
        try:
            progress = await _after_the_fact(info, key)
        except TenureError as exc:
            if started or exc.code is not ErrorCode.FORBIDDEN:
                raise
            # A bulk command's id is its key, whoever sent it: another caller's took it.
            # It was answered FORBIDDEN, as if this caller lacked a right.
            raise TenureError(
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                f"idempotencyKey {key} names another caller's bulk command; send this one "
                "with a new key",
            ) from exc
        if not started and progress.fingerprint not in ("", bulk_input.fingerprint()):
            raise TenureError(
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                f"idempotencyKey {key} was already used for another bulk command "
                f"({progress.entity_type} {progress.command}); send this one with a new key",
            )
        return _shown(info, key, progress)

    @strawberry.mutation(
        description="Stop a bulk command after the page it is sending. INVALID_TRANSITION "
        "once its last page is sent (nothing is left to pause), or it is being cancelled."
    )
    async def pause_bulk_command(
        self, info: Info, id: strawberry.ID, idempotency_key: ActionKey = None
    ) -> BulkCommand | None:
        return await _signal(info, id, BulkCommandWorkflow.pause, idempotency_key)

    @strawberry.mutation(
        description="Go on from where a paused bulk command stopped. INVALID_TRANSITION once "
        "it is being cancelled."
    )
    async def resume_bulk_command(
        self, info: Info, id: strawberry.ID, idempotency_key: ActionKey = None
    ) -> BulkCommand | None:
        return await _signal(info, id, BulkCommandWorkflow.resume, idempotency_key)

    @strawberry.mutation(
        description="End a bulk command after the page it is sending: it ends CANCELLED (or "
        "COMPLETED, should that page be its last). INVALID_TRANSITION once its last page is "
        "sent (nothing is left to cancel)."
    )
    async def cancel_bulk_command(
        self, info: Info, id: strawberry.ID, idempotency_key: ActionKey = None
    ) -> BulkCommand | None:
        return await _signal(info, id, BulkCommandWorkflow.cancel, idempotency_key)


def _refusal(
    bulk_id: str, progress: BulkProgress, signal: Callable[[BulkCommandWorkflow, str | None], None]
) -> str | None:
    """Why `signal` would change nothing for a bulk still running, or None. A cancel after
    the last page was accepted and ended it CANCELLED with every target sent its command; a
    resume after a cancel was accepted and did nothing."""
    if progress.status in _ENDED:
        return None  # told as ended, below
    if signal is not BulkCommandWorkflow.resume and progress.delivered_at is not None:
        return (
            f"bulk command {bulk_id} has sent its command to every target; its outcomes are "
            "being counted, and nothing is left to pause or cancel"
        )
    if signal is not BulkCommandWorkflow.cancel and progress.cancel_requested:
        return f"bulk command {bulk_id} is being cancelled; it can no longer be paused or resumed"
    return None


async def _signal(
    info: Info,
    bulk_id: str,
    signal: Callable[[BulkCommandWorkflow, str | None], None],
    key: str | None,
) -> BulkCommand:
    """Pause, resume or cancel a running bulk command; INVALID_TRANSITION once it has ended,
    as the checkout operator tools answer for an ended checkout, and when the signal would
    change nothing (`_refusal`). Under a key taken before it is answered as it is, sent
    nothing."""
    if key is not None:
        _checked_key(key)
    progress = await _progress(info, bulk_id)  # it exists, and the caller may act on it
    taken = progress.action_under(key) if key is not None else None
    if taken == signal.__name__:
        return _shown(info, bulk_id, progress)
    if taken is not None:
        raise _key_taken(key, taken, bulk_id, signal.__name__)
    refused = _refusal(bulk_id, progress, signal)
    if refused is not None:
        raise TenureError(ErrorCode.INVALID_TRANSITION, refused)
    if not await info.context.gateway.signal_workflow(bulk_workflow_id(bulk_id), signal, key):
        ended = await _progress(info, bulk_id)
        # One stopped from outside (terminated) still shows the status it last had.
        status = ended.status.value if ended.status in _ENDED else "stopped before its end"
        raise TenureError(
            ErrorCode.INVALID_TRANSITION,
            f"bulk command {bulk_id} has ended ({status}); it can no longer be paused, "
            "resumed or cancelled",
        )
    after = await _after_the_fact(info, bulk_id)
    taken = after.action_under(key) if key is not None else None
    if taken is not None and taken != signal.__name__:
        # Another action under the same key, sent at the same moment, reached the bulk
        # first: this one was not taken, and was answered as if it had been.
        raise _key_taken(key, taken, bulk_id, signal.__name__)
    return _shown(info, bulk_id, after)


def _key_taken(key: str | None, taken: str, bulk_id: str, action: str) -> TenureError:
    return TenureError(
        ErrorCode.IDEMPOTENCY_KEY_REUSED,
        f"idempotencyKey {key} was used to {taken} bulk command {bulk_id}; this {action} "
        "was not taken: send it with a new key",
    )


async def _after_the_fact(info: Info, bulk_id: str) -> BulkProgress:
    """A bulk command's progress read to answer what was done to it: not charged to the
    request's LIVE reads, which would refuse a start or signal already made (the sixth
    start of a request, or the third of three signals, answered TOO_MANY_LIVE_READS). A
    request sends at most `max_mutations`, so these reads are bounded all the same."""
    with unbudgeted():
        return await _progress(info, bulk_id)
