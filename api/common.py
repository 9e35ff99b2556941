"""GraphQL building blocks shared by every entity binding: scalars, enums, the read contract
and the command path."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import replace
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, NewType

import strawberry
import structlog
from strawberry.types.scalar import ScalarDefinition
from strawberry.utils.str_converters import to_camel_case

from api.context import Info
from api.gateway import Consistency as GatewayConsistency
from api.gateway import EntityGateway, EntityRead, Receipt, check_idempotency_key
from api.history import CommandHistory, command_history
from api.pacing import holds_long_lists, take_turn
from entities.errors import ErrorCode, TenureError
from entities.runtime.entity import Command
from entities.runtime.envelope import (
    SENDER_ROLES,
    SYSTEM_COMMAND_PREFIXES,
    command_fingerprint,
    shaped_as_sender_key,
)
from entities.runtime.policy import READ, Role


def _parse_long(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TenureError(ErrorCode.INVALID_INPUT, "expected a whole number")
    return value


Long = NewType("Long", int)
"""A whole number beyond GraphQL's 32-bit Int, e.g. an amount in minor units (cents)."""

SCALARS: dict[object, ScalarDefinition] = {
    Long: strawberry.scalar(
        name="Long",
        description="A whole number up to 2^53, e.g. an amount in minor units (cents).",
        serialize=int,
        parse_value=_parse_long,
    )
}


@strawberry.enum(description="Where a read may come from.")
class Consistency(Enum):
    CACHED = "CACHED"
    LIVE = "LIVE"


ReadConsistency = Annotated[
    Consistency | None,
    strawberry.argument(
        description="CACHED (the default): the last state the cache saw, from Redis, falling "
        "back to the entity when the cache has none. LIVE: asked of the entity itself, "
        "always current, and one of the request's live reads."
    ),
]


@strawberry.enum(description="Where a read came from.")
class Source(Enum):
    CACHE = "CACHE"
    LIVE = "LIVE"


IdempotencyKey = Annotated[
    str | None,
    strawberry.argument(
        description="The command's id: the same key sent again to the same entity (a "
        "retry after a timeout, say) is applied once and answered with the first outcome, "
        "while the entity remembers it (its last 4,096 commands by default, fewer when they "
        "weigh over 640 KiB: about 2,000 with 128-character keys); with another "
        "command or payload it is not applied (IDEMPOTENCY_KEY_REUSED when waited for). 1 to "
        "128 printable ASCII characters, no spaces, not beginning "
        f"{', '.join(SYSTEM_COMMAND_PREFIXES)} nor as a sender's own id, "
        "`<role>:<subject>/` (`service:billing/fee-1`). A new id each time when not given."
    ),
]
Wait = Annotated[
    bool,
    strawberry.argument(
        description="true: answer once the entity has applied the command (APPLIED, with the "
        "state after it and its revision) or refused it (an error with its code). false: "
        "answer once Temporal has durably accepted it (ACCEPTED)."
    ),
]


@strawberry.enum(description="What became of a command when the mutation returned.")
class CommandStatus(Enum):
    ACCEPTED = "ACCEPTED"
    APPLIED = "APPLIED"


@strawberry.interface(description="What a mutation answers about the command it sent.")
class CommandPayload:
    command_id: str
    status: CommandStatus
    revision: int | None = strawberry.field(
        description="When waited for: the entity's revision this command made. A repeat (the "
        "same idempotencyKey) answers the first's, while the entity read beside it is as it is "
        "now, other commands since included. Null when not waited for."
    )


def receipt_fields(receipt: Receipt) -> dict[str, Any]:
    """The CommandPayload fields of a receipt, to spread into a payload's constructor."""
    return {
        "command_id": receipt.command_id,
        "status": status_of(receipt),
        "revision": receipt.revision,
    }


@strawberry.interface(description="The read contract every entity honours.")
class EntityState:
    id: strawberry.ID
    revision: int = strawberry.field(description="Raised by one with each applied command.")
    updated_at: datetime | None = strawberry.field(description="When the state last changed.")
    stale: bool = strawberry.field(
        description="True when the entity could not be asked and this is its last-seen state."
    )
    source: Source
    cached_at: datetime | None = strawberry.field(
        description="When a CACHE read was written to the cache."
    )
    entity_type: strawberry.Private[str]

    @strawberry.field(
        description="The entity's recent commands, newest first: what each asked, when, who "
        "sent it and what became of it. Asked of the entity itself: a LIVE read. Null, with "
        "an error at its path, when it cannot be answered (the entity's worker out of reach, "
        "the caller not allowed, bad arguments, the live-read budget spent): the rest of the "
        "entity is still answered."
    )
    async def history(
        self, info: Info, last: int = 20, before: str | None = None
    ) -> CommandHistory | None:
        return await command_history(info, self.entity_type, self.id, last, before)


def read_fields(read: EntityRead) -> dict[str, Any]:
    """The EntityState fields of a read, to spread into an entity type's constructor."""
    return {
        "id": strawberry.ID(read.snapshot.entity_id),
        "revision": read.snapshot.revision,
        "updated_at": read.snapshot.updated_at,
        "stale": read.stale,
        "source": Source(read.source.value),
        "cached_at": read.cached_at,
        "entity_type": read.snapshot.entity_type,
    }


async def read_entity(
    info: Info, entity_type: str, entity_id: str, consistency: Consistency | None
) -> EntityRead | None:
    """Read an entity; a null `consistency` means the default, CACHED."""
    chosen = GatewayConsistency((consistency or Consistency.CACHED).value)
    prefetched = info.context.prefetched
    looked_up = prefetched.lookup(entity_type, entity_id) if prefetched else None
    await info.context.authorizer.require(
        info.context.principal, entity_type, entity_id, READ, looked_up=looked_up
    )
    read = await info.context.gateway.read(entity_type, entity_id, chosen, looked_up=looked_up)
    if prefetched is not None:
        prefetched.note(read, looked_up)
    if read is not None and holds_long_lists(read.snapshot.state):
        await take_turn()
    return read


async def authorize(
    info: Info,
    entity_type: str,
    entity_id: str,
    action: str,
    payload: dict[str, Any] | None = None,
) -> None:
    """Refuse with FORBIDDEN unless the request's caller may do `action` to the entity."""
    await info.context.authorizer.require(
        info.context.principal, entity_type, entity_id, action, payload
    )


async def send_command(
    info: Info,
    command: Command[Any, Any, Any],
    entity_id: str,
    payload: Mapping[str, Any],
    idempotency_key: str | None,
    wait: bool,
    filled: Collection[str] = (),
) -> Receipt:
    """Send `command` to the entity, on behalf of the request's caller, once it may; answers
    with the receipt, and with the state after the command when waited for and readable.
    `filled` names what of the payload the API filled in (a line's price), which its
    fingerprint leaves out: the caller's retry under its key, the same arguments, is the
    same command whatever was filled in since."""
    receipt = await send_unread(info, command, entity_id, payload, idempotency_key, wait, filled)
    return await readable(info, command.entity_type, receipt)


def check_client_key(idempotency_key: str | None) -> None:
    """Refuse a client's idempotency key that the gateway would not take, or that begins as
    Tenure's own command ids do: it could otherwise take one of them first."""
    if idempotency_key is None:
        return
    check_idempotency_key(idempotency_key)
    if idempotency_key.startswith(SYSTEM_COMMAND_PREFIXES):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            f"idempotencyKey may not begin with {', '.join(SYSTEM_COMMAND_PREFIXES)}: "
            "Tenure's own command ids begin so",
        )
    if shaped_as_sender_key(idempotency_key):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            f"idempotencyKey may not begin with a sender, `<role>:<subject>/` (role one of "
            f"{', '.join(sorted(SENDER_ROLES))}): an entity keeps a sender's key apart so",
        )


async def send_unread(
    info: Info,
    command: Command[Any, Any, Any],
    entity_id: str,
    payload: Mapping[str, Any],
    idempotency_key: str | None,
    wait: bool,
    filled: Collection[str] = (),
) -> Receipt:
    """`send_command`, with the state after the command whether or not the caller may read
    it: for a mutation that answers with part of it (a checkout's id) and then with
    `readable(info, entity_type, receipt)` for the rest."""
    entity_type = command.entity_type
    check_client_key(idempotency_key)
    given = {k: v for k, v in payload.items() if v is not None}
    # The rest of this command's log lines name it (its id once the gateway has made it).
    structlog.contextvars.bind_contextvars(
        entity=f"{entity_type}:{entity_id}", command=command.name
    )
    await authorize(info, entity_type, entity_id, command.name, given)
    principal = info.context.principal
    try:
        receipt = await info.context.gateway.send(
            entity_type,
            entity_id,
            command.name,
            given,
            idempotency_key=idempotency_key,
            wait=wait,
            sent_by=principal.sender,
            fingerprint=_fingerprint(command.name, given, filled),
        )
    except TenureError as exc:
        if exc.code is ErrorCode.ALREADY_EXISTS and principal.role is Role.CUSTOMER:
            # Allowed as the creator it names, it met an entity made meanwhile by another
            # (not yet known when it was allowed): whose that is decides what it may learn.
            await authorize(info, entity_type, entity_id, READ)
        if exc.code is ErrorCode.INVALID_INPUT:
            raise in_graphql_terms(exc) from None
        if told_of_state(exc.code) and not await info.context.authorizer.allows(
            principal, entity_type, entity_id, READ
        ):
            # A caller that may send it but not read the entity (a service scoped to
            # `account:withdraw` alone) learns the refusal's code, not the state that
            # made it: "balance 1234 is less than ..." read any account's balance.
            raise TenureError(
                exc.code, unread_refusal(entity_type, entity_id, command.name, exc.code)
            ) from None
        raise
    return receipt


def unread_refusal(entity_type: str, entity_id: str, command: str, code: str) -> str:
    """A refusal's words for a caller that may send the command but not read the entity:
    its code, not the state that made it."""
    return f"{entity_type} {entity_id} refused {command} ({code})"


def told_of_state(code: str) -> bool:
    """Whether an entity words a refusal with `code` from its state (a balance, a status, a
    count): told only to callers that may read the entity."""
    return code in _TOLD_OF_STATE


_TOLD_OF_STATE = frozenset(
    {
        ErrorCode.INSUFFICIENT_FUNDS,
        ErrorCode.INSUFFICIENT_STOCK,
        ErrorCode.INVALID_TRANSITION,
        ErrorCode.CHECKOUT_IN_PROGRESS,
        ErrorCode.LIMIT_REACHED,
        ErrorCode.CONFLICT,
    }
)
"""Refusals an entity words from its state (a balance, a status, a count)."""


def _fingerprint(name: str, given: Mapping[str, Any], filled: Collection[str]) -> str | None:
    """The command's fingerprint, of what its sender gave; None (of the whole payload) when
    the API filled nothing in."""
    if not filled:
        return None
    return command_fingerprint(name, {k: v for k, v in given.items() if k not in filled})


async def readable(info: Info, entity_type: str, receipt: Receipt) -> Receipt:
    """The receipt, without the state after the command unless the caller may read it."""
    if receipt.read is not None and not await info.context.authorizer.allows(
        info.context.principal, entity_type, receipt.entity_id, READ, known=receipt.read
    ):
        # A caller that may send the command but not read the entity (a service scoped to
        # `account:deposit` alone) learns that it was applied, not the state after it.
        receipt = replace(receipt, read=None)
    return receipt


async def require_open(gateway: EntityGateway, entity_type: str, entity_id: str) -> EntityRead:
    """Refuse a command that names another entity (a cart's account) unless that entity
    exists and is not closed; read from the cache when it can be. Its read."""
    read = await gateway.read(entity_type, entity_id, GatewayConsistency.CACHED)
    if read is None:
        raise TenureError(ErrorCode.NOT_FOUND, f"{entity_type} {entity_id} does not exist")
    if read.snapshot.closed:
        raise TenureError(ErrorCode.INVALID_TRANSITION, f"{entity_type} {entity_id} is closed")
    return read


_WHERE = re.compile(r"^([a-z][a-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


CreateGuard = Callable[[EntityGateway, str, Mapping[str, Any]], Awaitable[None]]
"""What a create must pass before it is sent, whoever sends it (a mutation, an inbound
webhook): given the gateway, the new entity's id and the command's payload; raises the
refusal. Declared by the entity's binding (`createCart`: its account open, and room for a
cart); bulk commands refuse a create that has one."""

CREATE_GUARDS: dict[tuple[str, str], CreateGuard] = {}
"""Each guarded create, by entity type and command name."""


def in_graphql_terms(refused: TenureError) -> TenureError:
    """A refusal of a command's payload (INVALID_INPUT) as the mutation's caller knows its
    fields (`graphql_field_names`); any other as it is."""
    if refused.code is not ErrorCode.INVALID_INPUT:
        return refused
    return TenureError(refused.code, graphql_field_names(refused.message))


def graphql_field_names(message: str) -> str:
    """A payload's refusal as a GraphQL caller knows its fields: the command names
    `owner_name: ...`, the mutation's argument is `ownerName`."""

    def renamed(part: str) -> str:
        found = _WHERE.match(part)
        if found is None:
            return part
        where = ".".join(to_camel_case(p) for p in found.group(1).split("."))
        return where + part[found.end(1) :]

    return "; ".join(renamed(part) for part in message.split("; "))


def status_of(receipt: Receipt) -> CommandStatus:
    return CommandStatus.APPLIED if receipt.applied else CommandStatus.ACCEPTED


_ID_NAMESPACE = uuid.UUID("6f1c1d8e-3f4a-4c1e-9d7b-2a5b8e0c4f10")


def new_entity_id(info: Info, idempotency_key: str | None) -> str:
    """An id for an entity the client did not name: derived from the caller and its
    idempotency key when there is one, so a retried create names the same entity, and
    another caller's create with the same key names another (a key is its caller's: one
    customer's key neither blocks nor reveals another's create)."""
    if idempotency_key:
        caller = info.context.principal.sender
        return str(uuid.uuid5(_ID_NAMESPACE, f"{caller}\n{idempotency_key}"))
    return str(uuid.uuid4())
