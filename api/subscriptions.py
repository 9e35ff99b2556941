"""Live subscriptions, derived from the entity bindings: `<read field>Changed` for one
entity (`accountChanged(id)`, `inventoryItemChanged(sku)`) for every root read declared
with `entity_read_field`, and `changes(entityType, filter)` over a type.

Each is fed by the process's one `ChangeFeed` (api/change_feed.py). An entity's
subscription starts with its current state from the cache (with `sinceRevision`, only when
the subscriber has missed revisions since), then each new state; `previousRevision` and
`missedRevisions` show every revision the subscriber did not see one by one.

They are served over graphql-transport-ws and over Server-Sent Events (api/transports.py),
with the same checks and the same error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

import strawberry
from strawberry.types.base import StrawberryOptional, get_object_definition
from strawberry.utils.str_converters import to_camel_case

from api.authorization import Forbidden, sees_command_ids
from api.change_feed import Change as FeedChange
from api.change_feed import ChangeFeed, Mailbox
from api.common import EntityState
from api.context import Info
from api.errors import coded_stream
from api.gateway import Consistency, EntityRead, Source, check_entity_id
from api.history import listed_command_id, sender_shown
from api.read_plans import ENTITY_READ_FIELDS
from entities import catalog
from entities.errors import ErrorCode, TenureError, quote_few
from entities.runtime.envelope import Snapshot
from entities.runtime.policy import READ, Principal, Role

N = TypeVar("N")
Render = Callable[[EntityRead], Any]

MAX_FILTER_IDS = 100
MAX_FILTER_STATUSES = 64
# Entities a `changes` subscriber may be behind on before it is ended (LIMIT_REACHED).
MAX_PENDING_ENTITIES = 1000
# Entities a `changes` subscriber remembers the revision of, the least recent forgotten. A
# status-filtered one that has forgotten any is told of every entity that leaves its statuses.
MAX_REMEMBERED = 10_000
# Where a request answered as an event stream waits to hear that its subscription is
# established (an asyncio.Event).
ESTABLISHED_KEY = "tenure.subscription_established"


@strawberry.type(
    description="An entity's state after a change. `command` and its fields are null when "
    "the state was read from the cache (the first one of a subscription, or after a gap)."
)
class Change(Generic[N]):
    entity_id: strawberry.ID
    revision: int
    incarnation: str = strawberry.field(
        description="Which life of the id the entity is in: an id used again once its closed "
        "entity was deleted starts a new one, whose revisions count from 1 again. Give it "
        "back as `sinceIncarnation` with `sinceRevision` to resume."
    )
    previous_revision: int | None = strawberry.field(
        description="The revision this subscription showed before; null on its first change."
    )
    missed_revisions: bool = strawberry.field(
        description="True when revisions between `previousRevision` (or `sinceRevision`) "
        "and this one were not shown one by one: they came faster than the subscriber read, "
        "were published together, or the stream had a gap. The state is the newest."
    )
    command: str | None
    command_id: str | None
    sent_by: str | None = strawberry.field(
        description="Who sent it, e.g. `admin:alice`; to a customer, someone else's role alone "
        "(`admin`), as in the entity's history."
    )
    at: datetime | None = strawberry.field(description="When the entity applied it.")
    node: N


# The entity types as the `changes` subscription names them: ACCOUNT, CART, INVENTORY.
EntityTypeName: Any = strawberry.enum(
    enum.Enum("EntityTypeName", {name.upper(): name for name in catalog.entity_types()}),  # type: ignore[call-overload]
    description="An entity type.",
)


@strawberry.input(description="Which changes to send; every change of the type by default.")
class ChangeFilter:
    ids: list[strawberry.ID] | None = strawberry.field(
        default=None, description=f"Only these entities (at most {MAX_FILTER_IDS})."
    )
    status: list[str] | None = strawberry.field(
        default=None,
        description="Only entities whose state's `status` is one of these; the change that "
        "takes one shown out of them is shown too, once (its node in its new status).",
    )


def _same_life(seen: tuple[int, int], position: tuple[int, int]) -> bool:
    """Whether a change at `position` (incarnation, revision) is of the same life of its id
    as one `seen`. An entity from before incarnations (0) that gets one keeps its revisions:
    it is the same life when its revision goes on."""
    if seen[0] == position[0]:
        return True
    return 0 in (seen[0], position[0]) and position[1] > seen[1]


class _Follower:
    """One subscription's view of its changes: never backwards, every jump shown. Following
    only some `statuses`, the change that takes a shown entity out of them is shown too,
    once, so that a view of them can drop it. Past MAX_REMEMBERED entities shown, it cannot
    tell which it showed: then each entity's first change out of them is shown, once."""

    def __init__(
        self,
        since: int | None,
        viewer: Principal,
        entity_type: str,
        statuses: frozenset[str] | None = None,
        since_incarnation: int | None = None,
    ) -> None:
        self._seen: dict[str, tuple[int, int]] = {}
        # Entities shown leaving the statuses, at the change that took them out: one that
        # comes back is shown as following it, a jump where it changed meanwhile.
        self._left: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._since = since
        self._since_incarnation = since_incarnation
        self._viewer = viewer
        self._shows_ids = sees_command_ids(viewer, entity_type)
        self._statuses = statuses
        self._admitted: OrderedDict[str, None] = OrderedDict()
        self._forgot = False
        # Once it forgot: entities told they left, not told again while they stay out.
        self._told_out: OrderedDict[str, None] = OrderedDict()

    def admit(self, entity_id: str, inside: bool) -> bool:
        """Whether a change of the entity goes to the subscriber, decided as the feed offers
        it, ahead of what the subscriber has read: one in the statuses does; one out of them
        does when the entity's last change let in was in them, since it takes the entity
        out (in then out offered before the first is read: the mailbox keeps the newest,
        the out, which `change` drops when the entity was never shown). Once it has forgotten
        entities it showed, one out of them does the first time, as it may have been shown."""
        if inside:
            self._told_out.pop(entity_id, None)
            self._admitted.pop(entity_id, None)
            self._admitted[entity_id] = None
            if len(self._admitted) > MAX_REMEMBERED:
                self._admitted.popitem(last=False)
                self._forgot = True
            return True
        shown = self._admitted.pop(entity_id, False) is None
        if not self._forgot:
            return shown
        if not shown and entity_id in self._told_out:
            return False
        self._told_out[entity_id] = None  # told it left: not again while it stays out
        if len(self._told_out) > MAX_REMEMBERED:
            self._told_out.popitem(last=False)
        return True

    def change(self, change: FeedChange, render: Render) -> Change[Any] | None:
        incarnation, revision = change.position
        seen = self._seen.get(change.entity_id)
        last = seen if seen is not None else self._left.get(change.entity_id)
        if last is not None and last >= change.position:
            return None
        status = (change.snapshot.state or {}).get("status")
        leaving = self._statuses is not None and status not in self._statuses
        if leaving and seen is None and not self._forgot:
            return None  # out, and not shown: nothing to take back
        previous = last[1] if last is not None and _same_life(last, change.position) else None
        after = previous if previous is not None else self._since
        if last is not None and previous is None:
            after = -1  # another life of the id than the one shown: a jump
        elif after is not None and seen is None:
            named = self._since_incarnation
            if named is not None and 0 in (named, incarnation):
                named = None  # from before incarnations (0): it tells nothing, revisions do
            if named is not None and incarnation != named:
                if incarnation < named:
                    return None  # older than what the subscriber saw
                after = -1  # another life of the id: shown, as a jump
            elif named is None and revision < after:
                # Behind what the subscriber names: not the life of the id it saw (its id
                # used again since), or a revision it never saw. Shown, as a jump.
                after = -1
            elif revision <= after:
                return None  # the subscriber had it before it reconnected
        self._seen.pop(change.entity_id, None)
        self._left.pop(change.entity_id, None)
        if not leaving:
            self._seen[change.entity_id] = change.position
        else:
            self._left[change.entity_id] = change.position
            if len(self._left) > MAX_REMEMBERED:
                self._left.popitem(last=False)
        if len(self._seen) > MAX_REMEMBERED:
            del self._seen[next(iter(self._seen))]
            self._forgot = True
        self._since = None
        from_cache = change.command is None
        missed = after is not None and (revision > after + 1 or (from_cache and revision > after))
        node = change.rendered.get(render)
        if node is None:
            node = change.rendered[render] = render(
                EntityRead(change.snapshot, Source.CACHE, stale=False, cached_at=None)
            )
        return Change(
            entity_id=strawberry.ID(change.entity_id),
            revision=revision,
            incarnation=str(incarnation),
            previous_revision=previous,
            missed_revisions=missed or change.gap,
            command=change.command,
            command_id=self._command_id(change.command_id, change.sent_by),
            sent_by=self._sender(change.sent_by),
            at=change.at,
            node=node,
        )

    def _command_id(self, command_id: str | None, sent_by: str | None) -> str | None:
        """As the entity's history lists it to the viewer, when shown."""
        if command_id is None or not self._shows_ids:
            return None
        return listed_command_id(command_id, sent_by, self._viewer)

    def _sender(self, sent_by: str | None) -> str | None:
        """As the entity's history shows it to the viewer: an operator's name is not a
        customer's to see."""
        if sent_by is None:
            return None
        role, subject = sender_shown(sent_by, self._viewer)
        return role if subject is None else f"{role}:{subject}"


@contextlib.asynccontextmanager
async def _subscribed(
    info: Info,
    entity_type: str,
    entity_id: str | None,
    wants: Callable[[FeedChange], bool] = lambda change: True,
    capacity: int = 1,
) -> AsyncIterator[Mailbox]:
    """A mailbox of the process's one change feed, once every check has passed; an event
    stream waiting to answer (`EventStream`) hears that the subscription is established."""
    feed: ChangeFeed = info.context.request.app.state.change_feed
    principal = info.context.principal
    # Customers are many, and each is bounded; staff and services are few and trusted.
    holder = principal.sender if principal.role is Role.CUSTOMER else None
    async with feed.subscribe(entity_type, entity_id, wants, capacity, holder) as mailbox:
        established: asyncio.Event | None = info.context.request.scope.get(ESTABLISHED_KEY)
        if established is not None:
            established.set()
        yield mailbox


async def follow_entity(
    info: Info,
    entity_type: str,
    entity_id: str,
    since_revision: int | None,
    render: Render,
    since_incarnation: str | None = None,
) -> AsyncGenerator[Change[Any], None]:
    """One entity's states: its current one at once (with `since_revision`, only if newer,
    in the same life of the id), then each new one."""
    check_entity_id(entity_id)
    if since_revision is not None and since_revision < 0:
        raise TenureError(ErrorCode.INVALID_INPUT, "sinceRevision: 0 or more")
    incarnation = None
    if since_incarnation is not None:
        if since_revision is None:
            raise TenureError(ErrorCode.INVALID_INPUT, "sinceIncarnation: only with sinceRevision")
        digits = since_incarnation.isascii() and since_incarnation.isdigit()
        if not digits or len(since_incarnation) > 19:
            raise TenureError(
                ErrorCode.INVALID_INPUT, "sinceIncarnation: a change's `incarnation`, as given"
            )
        incarnation = int(since_incarnation)
    await info.context.authorizer.require(info.context.principal, entity_type, entity_id, READ)
    follower = _Follower(
        since_revision, info.context.principal, entity_type, since_incarnation=incarnation
    )
    async with _subscribed(info, entity_type, entity_id) as mailbox:
        # After subscribing, so that nothing falls between the state read and the stream.
        read = await info.context.gateway.read(entity_type, entity_id, Consistency.CACHED)
        if read is not None:
            await _still_readable(info, read.snapshot)
            first = follower.change(FeedChange(entity_type, read.snapshot), render)
            if first is not None:
                yield first
        while True:
            change = await mailbox.next()
            await _still_readable(info, change.snapshot)
            shown = follower.change(change, render)
            if shown is not None:
                yield shown


async def _still_readable(info: Info, snapshot: Snapshot) -> None:
    """Raise FORBIDDEN unless the caller may read the entity as this state of it shows it:
    an id used again, for another account, ends a customer's subscription where the new
    entity was streamed to the old one's owner. The authorizer decides from the state, with
    no look of its own."""
    if snapshot.state is None:
        return  # whose it is cannot be told from it: as when the subscription began
    known = EntityRead(snapshot, Source.CACHE, stale=False)
    await info.context.authorizer.require(
        info.context.principal, snapshot.entity_type, snapshot.entity_id, READ, known=known
    )


def _entity_subscription(
    field_name: str, entity_type: str, id_argument: str, id_type: object, node: Any
) -> Any:
    async def changed(
        self: Any,
        info: Info,
        entity_id: str,
        since_revision: int | None = None,
        since_incarnation: str | None = None,
    ) -> AsyncGenerator[Change[Any], None]:
        changes = follow_entity(
            info, entity_type, entity_id, since_revision, node.from_read, since_incarnation
        )
        async for change in coded_stream(changes):
            yield change

    # Annotations built here, for the entity's own type and argument name.
    changed.__annotations__ = {
        "info": Info,
        "entity_id": Annotated[id_type, strawberry.argument(name=id_argument)],
        "since_revision": Annotated[
            int | None,
            strawberry.argument(
                description="The last revision the subscriber saw: its current state is "
                "sent at once only if it is newer (or behind it: the id is in another life "
                "than the one seen, and the state comes as a jump)."
            ),
        ],
        "since_incarnation": Annotated[
            str | None,
            strawberry.argument(
                description="The `incarnation` of the change whose revision is "
                "`sinceRevision`: a state of another life of the id is sent at once, as a "
                "jump, whatever its revision."
            ),
        ],
        "return": AsyncGenerator[Change[node], None],
    }
    return strawberry.subscription(
        changed,
        name=f"{field_name}Changed",
        description=f"One {node.__name__}: its state now, then after each change.",
    )


def _read_fields(query: type) -> dict[str, tuple[Any, object]]:
    """Each root read field's GraphQL type and the type of its id argument (`account` ->
    Account, ID), from the Query type."""
    definition = get_object_definition(query, strict=True)
    found: dict[str, tuple[Any, object]] = {}
    for schema_field in definition.fields:
        name = schema_field.graphql_name or to_camel_case(schema_field.python_name)
        declared = ENTITY_READ_FIELDS.get(name)
        of = schema_field.type
        if declared is None or not isinstance(of, StrawberryOptional):
            continue
        assert isinstance(of.of_type, type)
        for argument in schema_field.arguments:
            if (argument.graphql_name or to_camel_case(argument.python_name)) == (
                declared.id_argument
            ):
                found[name] = (of.of_type, argument.type)
    return found


def _scoped(
    info: Info, entity_type: str, where: ChangeFilter, admit: Callable[[str, bool], bool]
) -> Callable[[FeedChange], bool]:
    """What the caller may follow of the type, as `api/listing.py` lists: admins and
    services by the policy, customers only what they own (FORBIDDEN when they name another
    account, or the type cannot tell whose an entity is). With statuses, `admit` decides
    by whether the change leaves the entity in them (`_Follower.admit`)."""
    principal = info.context.principal
    policy = info.context.gateway.entity(entity_type).policy
    if not policy.allows(principal, entity_type, READ, owned=True):
        raise Forbidden()
    ids = frozenset(str(i) for i in where.ids) if where.ids is not None else None
    statuses = frozenset(where.status) if where.status is not None else None
    if ids is not None and len(ids) > MAX_FILTER_IDS:
        raise TenureError(ErrorCode.INVALID_INPUT, f"filter.ids: at most {MAX_FILTER_IDS}")
    if statuses is not None and len(statuses) > MAX_FILTER_STATUSES:
        raise TenureError(ErrorCode.INVALID_INPUT, f"filter.status: at most {MAX_FILTER_STATUSES}")
    for name, given in (("ids", ids), ("status", statuses)):
        if given is not None and not given:  # it would wait for a change that never comes
            raise TenureError(
                ErrorCode.INVALID_INPUT, f"filter.{name} is empty: no change would ever match"
            )
    known = info.context.gateway.entity(entity_type).statuses()
    if statuses and known is None:
        raise TenureError(ErrorCode.INVALID_INPUT, f"filter.status: {entity_type} has no status")
    wrong = sorted(statuses - known) if statuses and known is not None else []
    if wrong:  # it would wait for a change that never comes
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            f"filter.status: {entity_type} has no status {quote_few(wrong)} "
            f"(its statuses: {', '.join(sorted(known or ()))})",
        )
    for entity_id in ids or ():
        check_entity_id(entity_id)
    own: frozenset[str] | None = None
    if principal.role is Role.CUSTOMER and policy.owner is not None:
        own = frozenset(principal.accounts)
        for entity_id in ids or ():
            owner = policy.owner(entity_id, None)
            if owner is not None and owner not in own:
                raise Forbidden()
    owner_of = policy.owner

    def wants(change: FeedChange) -> bool:
        state = change.snapshot.state or {}
        if ids is not None and change.entity_id not in ids:
            return False
        if own is not None:
            assert owner_of is not None
            if owner_of(change.entity_id, state) not in own:
                return False
        if statuses is None:
            return True
        return admit(change.entity_id, state.get("status") in statuses)

    return wants


def subscription_type(query: type) -> type:
    """The Subscription root: an entity's subscription per root read of `query`, and
    `changes` over any type."""
    reads = _read_fields(query)
    renderers: dict[str, Render] = {}
    fields: dict[str, Any] = {}
    for field_name, (node, id_type) in reads.items():
        declared = ENTITY_READ_FIELDS[field_name]
        renderers[declared.entity_type] = node.from_read
        fields[f"{field_name}_changed"] = _entity_subscription(
            field_name, declared.entity_type, declared.id_argument, id_type, node
        )

    @strawberry.subscription(
        description="Changes to a type's entities that the filter names, each entity's "
        "newest state first when several are waiting. A subscriber behind on more than "
        f"{MAX_PENDING_ENTITIES} entities is ended with LIMIT_REACHED."
    )
    async def changes(
        self: Any,
        info: Info,
        entity_type: EntityTypeName,
        where: Annotated[ChangeFilter | None, strawberry.argument(name="filter")] = None,
    ) -> AsyncGenerator[Change[EntityState], None]:
        name: str = entity_type.value
        render = renderers.get(name)
        if render is None:
            raise TenureError(ErrorCode.INVALID_INPUT, f"{name} has no subscription")
        where = where or ChangeFilter()
        statuses = frozenset(where.status) if where.status is not None else None
        follower = _Follower(None, info.context.principal, name, statuses)
        wants = _scoped(info, name, where, follower.admit)

        async def shown() -> AsyncGenerator[Change[EntityState], None]:
            async with _subscribed(info, name, None, wants, MAX_PENDING_ENTITIES) as mailbox:
                while True:
                    change = follower.change(await mailbox.next(), render)
                    if change is not None:
                        yield change

        async for change in coded_stream(shown()):
            yield change

    fields["changes"] = changes
    return strawberry.type(type("Subscription", (), fields))
