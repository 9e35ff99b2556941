"""An entity's recent commands as GraphQL: what each asked, when, who sent it, and what
became of it. Every entity type has `history` (through `EntityState`), each read a Temporal
query of the entity's ledger, so it counts as a LIVE read (`limits.ALWAYS_LIVE`)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

import strawberry

from api.context import Info
from api.pacing import paced
from api.response_size import bounded
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import (
    MAX_HISTORY_PAGE,
    HistoryPage,
    Outcome,
    OutcomeStatus,
    listed_id,
    shaped_as_sender_key,
)
from entities.runtime.inbox import COMMAND_ID, COMMAND_ID_RULE
from entities.runtime.policy import Principal, Role


@strawberry.enum(description="What became of a command.")
class CommandOutcome(Enum):
    APPLIED = "APPLIED"
    REJECTED = "REJECTED"


@strawberry.type(description="Who sent a command.")
class Sender:
    role: str = strawberry.field(
        description="admin, service or customer; saga for a step of a saga."
    )
    subject: str | None = strawberry.field(
        description="The token's subject, or the saga's id; null when hidden from the caller: "
        "a customer sees only their own subject."
    )


@strawberry.type(description="One command an entity settled.")
class CommandRecord:
    command_id: str = strawberry.field(
        description="Its idempotency key; where another sender's command took that key first, "
        "the sender's own (`role:subject/key`, `role/key` when its subject is hidden): the "
        "cursor `before` takes it as listed."
    )
    command: str | None = strawberry.field(
        description="Its name; null for commands settled before names were recorded."
    )
    at: datetime | None = strawberry.field(description="When the entity settled it.")
    sent_by: Sender | None = strawberry.field(
        description="Null for commands sent before senders were recorded."
    )
    outcome: CommandOutcome
    code: str | None = strawberry.field(description="Why it was rejected.")
    message: str | None
    revision: int = strawberry.field(
        description="The revision it produced, or the entity's revision when it was rejected."
    )


@strawberry.type(description="A page of an entity's recent commands, newest first.")
class CommandHistory:
    entries: list[CommandRecord] = bounded(MAX_HISTORY_PAGE, paged=True)
    has_older: bool = strawberry.field(
        description="The entity remembers older commands: ask with `before` set to the last "
        "entry's `commandId`."
    )


def sender_shown(sent_by: str, caller: Principal) -> tuple[str, str | None]:
    """Who sent a command (`role:subject`) as `caller` may see it: the role always; the
    subject to all but customers, and to a customer for its own commands."""
    role, _, subject = sent_by.partition(":")
    shown = caller.role is not Role.CUSTOMER or sent_by == caller.sender
    return role, subject if shown else None


def listed_command_id(command_id: str, sent_by: str | None, caller: Principal) -> str:
    """A command's id as `caller` may see it listed (`listed_id`): recorded under another
    sender's own id, with that sender's subject only where the caller may see it."""
    shown = sent_by is None or sender_shown(sent_by, caller)[1] is not None
    return listed_id(command_id, sent_by, shown)


def _sender(sent_by: str | None, caller: Principal) -> Sender | None:
    if sent_by is None:
        return None
    role, subject = sender_shown(sent_by, caller)
    return Sender(role=role, subject=subject)


def _record(outcome: Outcome, caller: Principal) -> CommandRecord:
    return CommandRecord(
        command_id=listed_command_id(outcome.command_id, outcome.sent_by, caller),
        command=outcome.command,
        at=outcome.at,
        sent_by=_sender(outcome.sent_by, caller),
        outcome=CommandOutcome(outcome.status.value),
        code=outcome.code,
        message=outcome.message,
        revision=outcome.revision,
    )


async def command_history(
    info: Info, entity_type: str, entity_id: str, last: int, before: str | None
) -> CommandHistory:
    """The page of the entity's recent commands, for a caller who may read its history
    (`Authorizer.require_history`)."""
    if not 1 <= last <= MAX_HISTORY_PAGE:
        raise TenureError(ErrorCode.INVALID_INPUT, f"last: from 1 to {MAX_HISTORY_PAGE}")
    if before is not None and not COMMAND_ID.fullmatch(before):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            f"before: a command id, {COMMAND_ID_RULE}",
        )
    caller = info.context.principal
    await info.context.authorizer.require_history(caller, entity_type, entity_id)
    unknown = TenureError(
        ErrorCode.INVALID_INPUT,
        f"before: {entity_type} {entity_id} remembers no command {before!r} (it keeps its "
        "last commands only): ask again without `before`, from the newest",
    )
    # Another sender's command is listed to a customer without that sender's subject
    # (`service/fee-1`): found under its whole id, it would tell whose the command was. The
    # customer's own (`customer:ada/fee-1`, whose subject may hold a slash) is its to name.
    if (
        before is not None
        and caller.role is Role.CUSTOMER
        and shaped_as_sender_key(before)
        and not before.startswith(f"{caller.sender}/")
    ):
        raise unknown
    page = await info.context.gateway.history(
        entity_type, entity_id, HistoryPage(last=last, before=before)
    )
    if page is None:
        return CommandHistory(entries=[], has_older=False)
    if not page.before_found:
        # Not the end of the history: a cursor it no longer has (or never had).
        raise unknown
    return CommandHistory(
        entries=paced(
            _record(o, caller) for o in page.entries if o.status is not OutcomeStatus.UNKNOWN
        ),
        has_older=page.has_older,
    )
