"""Rendered responses to CACHED reads, replayed while the cache entries behind them stand.

A GraphQL document whose root fields are all entity reads served from the cache answers
with bytes that depend only on the document, its variables and those cache entries. So the
first such request is executed as usual, through Strawberry, with the entries fetched up
front, and its response is kept under (request, entries). A later request for the same
document, variables and entries (dashboards polling an entity that has not changed) is
answered with those bytes, without executing GraphQL. A new revision writes a new entry, so
it is a new key: nothing is ever invalidated, old responses age out of a bounded LRU.

Listings and counts (`listing_field`) are replayed the same way while the index
generations they depend on stand (workers/index.py `generations_key`): a list filtered to
some values of a tag (status SUSPENDED or DORMANT, a cart's account) on the generations of
those values, which every change to an entity that had or has one of them raises; any other
on its type's, which every change raises. Every listing also depends on its type's stuck
marks and on the epoch `tenure reindex` sets.

Anything else (mutations, LIVE reads, documents with fragments or directives at the root,
invalid documents, entities the cache has not seen, Redis down) goes to Strawberry as is.
Nothing about the caller goes into a read's response, so the caller is no part of the key;
but a response is replayed only to a caller the policy lets read every entity in it without
a look at their state (`Authorizer.decided_without_state`); others go through the resolvers,
which check the long way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from graphql import (
    DocumentNode,
    EnumValueNode,
    FieldNode,
    GraphQLField,
    GraphQLSchema,
    OperationDefinitionNode,
    OperationType,
    StringValueNode,
    ValueNode,
    VariableDefinitionNode,
    VariableNode,
    parse,
    specified_rules,
    validate,
)
from graphql.error import GraphQLError
from graphql.execution.values import get_argument_values, get_variable_values
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.authentication import principal_of
from api.authorization import Authorizer
from api.documents import KEPT_CHARS, hand_over
from api.errors import RequestRefused
from api.gateway import CacheLookup, EntityRead, Source
from api.limits import DocumentLimits, decode_json, selects_always_live
from api.metrics import ApiMetrics
from api.rate_limits import charge_answer, limiter_of, send_rate_limited
from api.request_context import note_operation
from api.response_size import ResponseSize
from entities.runtime.policy import Role
from workers.cache import CachedSnapshot, CacheUnavailable, RawEntry, SnapshotCache
from workers.index import EPOCH, EVERY, STUCK, generations_key, tag_generation

SCOPE_KEY = "tenure.prefetched_reads"
MAX_BODY = 64 * 1024
MAX_RENDERED_BYTES = 32 * 1024 * 1024
"""What the kept responses may weigh together: clients that vary their bodies (whitespace is
enough) make new entries, and each may be up to MAX_BODY."""
MAX_PLANS = 256
MAX_DEPENDENCIES = 1024


@dataclass(frozen=True)
class EntityReadField:
    """A root query field that reads one entity: its type and the argument naming it."""

    entity_type: str
    id_argument: str


@dataclass(frozen=True)
class ListingField:
    """A root query field that lists (or counts) entities of a type from the listing index,
    and the fields of its `filter` argument that each keep it to some values of a tag."""

    entity_type: str
    tags: tuple[tuple[str, str], ...] = ()
    argument: str = "filter"


ENTITY_READ_FIELDS: dict[str, EntityReadField] = {}
LISTING_FIELDS: dict[str, ListingField] = {}
"""Root query fields that list (or count) entities of a type from the listing index."""


def entity_read_field(field_name: str, entity_type: str, id_argument: str = "id") -> None:
    """Declare `field_name` (a root Query field taking `id_argument` and `consistency`) as a
    read of `entity_type`, so its CACHED responses can be replayed."""
    ENTITY_READ_FIELDS[field_name] = EntityReadField(entity_type, id_argument)


def listing_field(field_name: str, entity_type: str, tags: dict[str, str] | None = None) -> None:
    """Declare `field_name` (a root Query field) as a listing of `entity_type` from the
    index, so its responses can be replayed while the index generations it depends on
    stand. `tags` maps each field of its `filter` argument that lists only entities whose
    index tag has one of the values given (`{"status": "status"}`) to that tag, the most
    selective first: a listing so filtered depends only on the generations of those values,
    any other on the type's."""
    LISTING_FIELDS[field_name] = ListingField(entity_type, tuple((tags or {}).items()))


@dataclass(frozen=True)
class _Argument:
    """An argument as written: a literal, or a variable with the literal it defaults to."""

    literal: str | None = None
    variable: str | None = None

    @classmethod
    def of(cls, value: ValueNode | None, defaults: dict[str, str]) -> _Argument | None:
        if value is None:
            return cls()
        if isinstance(value, VariableNode):
            name = value.name.value
            return cls(literal=defaults.get(name), variable=name)
        if isinstance(value, StringValueNode | EnumValueNode):
            return cls(literal=value.value)
        return None

    def value(self, variables: dict[str, Any]) -> object:
        if self.variable is not None and self.variable in variables:
            return variables[self.variable]
        return self.literal


@dataclass(frozen=True)
class _RootRead:
    entity_type: str
    entity_id: _Argument
    consistency: _Argument


@dataclass(frozen=True)
class _Listing:
    """A listing field as the document writes it."""

    declared: ListingField
    node: FieldNode
    definition: GraphQLField

    def generations(self, variables: Any) -> list[str]:
        """The fields of its type's generations (workers/index.py `generations_key`) its
        answer depends on, given the coerced variables (None when they do not coerce)."""
        kept = self._kept_to(variables)
        if kept is None:
            return [EPOCH, STUCK, EVERY]
        tag, values = kept
        return [EPOCH, STUCK, *(tag_generation(tag, value) for value in sorted(values))]

    def _kept_to(self, variables: Any) -> tuple[str, frozenset[str]] | None:
        """The first declared tag its filter keeps it to, and the values allowed; None when
        it may show any entity of its type, or when that cannot be told for sure."""
        if not self.declared.tags or variables is None:
            return None
        try:
            arguments = get_argument_values(self.definition, self.node, variables)
        except GraphQLError:
            return None
        where = arguments.get(self.declared.argument)
        if not isinstance(where, dict):
            return None
        for name, tag in self.declared.tags:
            given = where.get(name)
            values = given if isinstance(given, list) else [] if given is None else [given]
            if not values:  # an empty list keeps nothing out
                continue
            texts = {v.value if isinstance(v, Enum) else v for v in values}
            if not all(isinstance(text, str) for text in texts):
                return None
            return tag, frozenset(texts)
        return None


@dataclass(frozen=True)
class ReadPlan:
    """The entity reads a document's operation makes: one per root field."""

    reads: tuple[_RootRead, ...]
    operation_name: str | None = None
    listings: tuple[_Listing, ...] = ()
    variable_definitions: tuple[VariableDefinitionNode, ...] = ()
    document: DocumentNode | None = field(default=None, compare=False)
    """The document, parsed within the limits and valid under graphql-core's rules."""

    @property
    def listed_types(self) -> tuple[str, ...]:
        return tuple(sorted({listing.declared.entity_type for listing in self.listings}))

    def listing_generations(
        self, schema: GraphQLSchema, variables: dict[str, Any]
    ) -> list[tuple[str, list[str]]]:
        """For each listing, its type and the fields of that type's generations its answer
        depends on with these variables."""
        if not self.listings:
            return []
        coerced: Any = None
        if any(listing.declared.tags for listing in self.listings):
            try:
                coerced = get_variable_values(schema, self.variable_definitions, variables)
            except GraphQLError:
                coerced = None
            if isinstance(coerced, list):  # errors: Strawberry answers with them
                coerced = None
        return [
            (listing.declared.entity_type, listing.generations(coerced))
            for listing in self.listings
        ]

    def entities(self, variables: dict[str, Any]) -> list[tuple[str, str]] | None:
        """The (type, id) pairs these variables read, or None if any read is not a CACHED
        read of a named entity (Strawberry then answers, with its errors if need be)."""
        chosen = []
        for read in self.reads:
            consistency = read.consistency.value(variables)
            entity_id = read.entity_id.value(variables)
            if consistency not in (None, "CACHED") or not isinstance(entity_id, str):
                return None
            chosen.append((read.entity_type, entity_id))
        return chosen


def plan_reads(
    schema: GraphQLSchema,
    query: str,
    operation_name: str | None,
    limits: DocumentLimits | None = None,
) -> ReadPlan | None:
    """The read plan of a valid query operation made only of entity reads, and within
    `limits`, else None."""
    try:
        document = limits.parse(query) if limits else parse(query)
    except GraphQLError:
        return None
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation_name is not None:
        operations = [o for o in operations if o.name and o.name.value == operation_name]
    if len(operations) != 1 or operations[0].operation is not OperationType.QUERY:
        return None
    operation = operations[0]
    if operation.directives or selects_always_live(document):
        return None
    defaults = {
        definition.variable.name.value: definition.default_value.value
        for definition in operation.variable_definitions or ()
        if isinstance(definition.default_value, StringValueNode | EnumValueNode)
    }
    reads = []
    listings: list[_Listing] = []
    for selection in operation.selection_set.selections:
        if not isinstance(selection, FieldNode) or selection.directives:
            return None
        listed = LISTING_FIELDS.get(selection.name.value)
        if listed is not None:
            root = schema.query_type
            definition = root.fields.get(selection.name.value) if root is not None else None
            if definition is None:
                return None
            # Its arguments are in the body, part of the key; its filter, what it depends on.
            listings.append(_Listing(listed, selection, definition))
            continue
        declared = ENTITY_READ_FIELDS.get(selection.name.value)
        if declared is None:
            return None
        arguments = {a.name.value: a.value for a in selection.arguments or ()}
        entity_id = _Argument.of(arguments.pop(declared.id_argument, None), defaults)
        consistency = _Argument.of(arguments.pop("consistency", None), defaults)
        if arguments or entity_id is None or consistency is None:
            return None
        reads.append(_RootRead(declared.entity_type, entity_id, consistency))
    if not (reads or listings) or validate(schema, document, specified_rules):
        return None
    name = operation.name.value if operation.name else None
    return ReadPlan(
        tuple(reads),
        name,
        tuple(listings),
        tuple(operation.variable_definitions or ()),
        document if limits else None,
    )


@dataclass
class PrefetchedReads:
    """Cache entries read before execution, for the resolvers to use instead of asking
    Redis again; `served` counts the reads answered from them, unchanged and not stale."""

    entries: dict[tuple[str, str], CacheLookup]
    served: int = 0

    def lookup(self, entity_type: str, entity_id: str) -> CacheLookup | None:
        return self.entries.get((entity_type, entity_id))

    def note(self, read: EntityRead | None, looked_up: CacheLookup | None) -> None:
        if (
            looked_up is not None
            and looked_up.entry is not None
            and read is not None
            and read.source is Source.CACHE
            and not read.stale
            and read.snapshot is looked_up.entry.snapshot
        ):
            self.served += 1


def _key(
    body: bytes, scope: Scope, entries: list[RawEntry], generations: list[bytes] | None = None
) -> bytes:
    """A digest of what a rendered response depends on: the body, the headers that choose
    the response's form (content type asked for and sent), the cache entries read and the
    index generations the listings depend on."""
    digest = hashlib.blake2b(digest_size=16)
    parts = [body]
    parts += [name + b":" + value for name, value in scope["headers"] if name in _NEGOTIATING]
    for document, cached_at, stuck in entries:
        parts += [document, cached_at, stuck or b""]
    parts += generations or []
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


_NEGOTIATING = {b"accept", b"content-type"}


@dataclass
class _Rendered:
    start: Message
    body: bytes


@dataclass
class _Plans:
    schema: GraphQLSchema
    limits: DocumentLimits | None
    plans: OrderedDict[tuple[str, str | None], ReadPlan | None] = field(default_factory=OrderedDict)

    async def get(self, query: str, operation_name: str | None) -> ReadPlan | None:
        if len(query) > KEPT_CHARS:
            return None  # no dashboard's read is that long: not worth a second validation
        key = (query, operation_name)
        if key in self.plans:
            self.plans.move_to_end(key)
            return self.plans[key]
        # A new document's parsing and validation is pure Python: in a thread, as Strawberry's.
        plan = await asyncio.to_thread(plan_reads, self.schema, query, operation_name, self.limits)
        self.plans[key] = plan
        if len(self.plans) > MAX_PLANS:
            self.plans.popitem(last=False)
        return plan


class CachedReadResponses:
    """ASGI wrapper of the GraphQL endpoint that replays rendered CACHED-read responses."""

    def __init__(
        self,
        app: ASGIApp,
        schema: GraphQLSchema,
        size: int,
        limits: DocumentLimits | None = None,
        metrics: ApiMetrics | None = None,
        answer_size: ResponseSize | None = None,
    ) -> None:
        self._app = app
        self._answer_size = answer_size
        self._metrics = metrics or ApiMetrics()
        self._plans = _Plans(schema, limits)
        self._size = size
        self._rendered: OrderedDict[bytes, _Rendered] = OrderedDict()
        self._rendered_bytes = 0
        # Renders under way, by key: the same request arriving meanwhile waits for its bytes
        # instead of rendering them too (32 dashboards after one write, one render).
        self._rendering: dict[bytes, asyncio.Future[_Rendered | None]] = {}
        # What each body's listings depend on, by the body's digest: coercing its variables
        # again would cost a tenth of a replay.
        self._depended_on: OrderedDict[bytes, list[tuple[str, list[str]]]] = OrderedDict()
        self.replayed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._size <= 0 or scope["type"] != "http" or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        body, whole = await _read_body(receive)
        if not whole:
            return  # the client went away before it finished sending
        replay = _replaying(body, receive)
        request = _json_request(body) if len(body) <= MAX_BODY else None
        plan = request and await self._plans.get(request[0], request[2])
        if plan and request and plan.document is not None:
            hand_over(scope, request[0], plan.document)
        entities = plan.entities(request[1]) if plan and request else None
        if (
            not plan
            or entities is None
            or not (entities or plan.listings)
            or not _allowed_to_list(scope, plan.listed_types)
        ):
            await self._app(scope, replay, send)
            return
        cache: SnapshotCache = scope["app"].state.gateway.cache
        if not _allowed_at_once(scope, entities):
            # Never replayed to this caller: the policy looks at each entity's state. The
            # entities are still read in one batch, for the policy and the resolvers alike,
            # rather than each twice (a customer's 12 reads of one cart were 24 reads).
            await self._prefetch(scope, entities, cache)
            await self._app(scope, replay, send)
            return
        depended_on = self._listings_depend_on(body, plan, request[1]) if request else []
        try:
            raw = await _look_up(cache, entities) if entities else []
            generations = await _generations(cache, depended_on)
        except CacheUnavailable:
            # Redis is down: the resolvers go to the workflows without trying it again.
            scope[SCOPE_KEY] = PrefetchedReads(dict.fromkeys(entities, CacheLookup(None)))
            await self._app(scope, replay, send)
            return
        present = [entry for entry in raw if entry is not None]
        key = _key(body, scope, present, generations) if len(present) == len(entities) else None
        rendered = self._rendered.get(key) if key else None
        if key and rendered is None and key in self._rendering:
            rendered = await asyncio.shield(self._rendering[key])
        if key and rendered is not None:
            variables = request[1] if request else {}
            overdrawn = await charge_answer(
                limiter_of(scope), principal_of(scope), lambda: self._values(plan, variables)
            )
            if overdrawn is not None:
                await send_rate_limited(send, overdrawn.retry_after, overdrawn.message)
                return
            if key in self._rendered:
                self._rendered.move_to_end(key)
            self.replayed += 1
            note_operation(plan.operation_name)
            self._metrics.cache_read("hit", len(entities))
            # Middleware outside adds its headers to the message it is sent: a copy each time.
            await send({**rendered.start, "headers": list(rendered.start["headers"])})
            await send({"type": "http.response.body", "body": rendered.body})
            return
        prefetched = _prefetched(entities, raw)
        if prefetched is not None:
            scope[SCOPE_KEY] = prefetched
        if key is None or prefetched is None:  # read live (and filled) by the resolvers
            await self._app(scope, replay, send)
            return
        rendering = self._rendering[key] = asyncio.get_running_loop().create_future()
        kept: _Rendered | None = None
        try:
            captured = await _capture(self._app, scope, replay, send)
            if (
                captured is not None
                and prefetched.served == len(entities)
                and captured.start["status"] == 200
                and len(captured.body) <= MAX_BODY
                and "errors" not in json.loads(captured.body)
            ):
                kept = captured
                self._keep(key, captured)
        finally:
            # Those waiting replay it, or render for themselves when it was not kept.
            rendering.set_result(kept)
            if self._rendering.get(key) is rendering:
                del self._rendering[key]

    @staticmethod
    async def _prefetch(
        scope: Scope, entities: list[tuple[str, str]], cache: SnapshotCache
    ) -> None:
        """The entries the cache holds, for the policy and the resolvers. An entity it does
        not hold (or an unreachable cache) is left to them: the policy's live read fills
        the cache, and the resolver finds it there rather than asking the workflow again."""
        distinct = list(dict.fromkeys(entities))
        try:
            prefetched = _prefetched(distinct, await _look_up(cache, distinct))
        except CacheUnavailable:
            return
        if prefetched is not None:
            found = {e: hit for e, hit in prefetched.entries.items() if hit.entry is not None}
            scope[SCOPE_KEY] = PrefetchedReads(found)

    def _values(self, plan: ReadPlan, variables: dict[str, Any]) -> int | None:
        """The values a replayed answer is charged for: as many as executing it is."""
        if self._answer_size is None or plan.document is None:
            return None
        return self._answer_size.values(
            self._plans.schema, plan.document, plan.operation_name, variables
        )

    def _listings_depend_on(
        self, body: bytes, plan: ReadPlan, variables: dict[str, Any]
    ) -> list[tuple[str, list[str]]]:
        if not plan.listings:
            return []
        digest = hashlib.blake2b(body, digest_size=16).digest()
        found = self._depended_on.get(digest)
        if found is None:
            found = plan.listing_generations(self._plans.schema, variables)
            self._depended_on[digest] = found
            if len(self._depended_on) > MAX_DEPENDENCIES:
                self._depended_on.popitem(last=False)
        else:
            self._depended_on.move_to_end(digest)
        return found

    def _keep(self, key: bytes, rendered: _Rendered) -> None:
        replaced = self._rendered.pop(key, None)
        if replaced is not None:
            self._rendered_bytes -= len(replaced.body)
        self._rendered[key] = rendered
        self._rendered_bytes += len(rendered.body)
        while len(self._rendered) > self._size or self._rendered_bytes > MAX_RENDERED_BYTES:
            _, evicted = self._rendered.popitem(last=False)
            self._rendered_bytes -= len(evicted.body)


def _allowed_at_once(scope: Scope, entities: list[tuple[str, str]]) -> bool:
    """Whether the caller may read every one of these entities, as far as that can be told
    without looking at them; otherwise the resolvers decide (and refuse) the long way."""
    principal = principal_of(scope)
    authorizer: Authorizer = scope["app"].state.authorizer
    return principal is not None and all(
        authorizer.decided_without_state(principal, entity_type, entity_id)
        for entity_type, entity_id in entities
    )


def _allowed_to_list(scope: Scope, entity_types: tuple[str, ...]) -> bool:
    """Whether the caller sees every entity of these types in a listing, whoever it is: a
    customer's listing is its own, so it is never replayed to anyone."""
    if not entity_types:
        return True
    principal = principal_of(scope)
    authorizer: Authorizer = scope["app"].state.authorizer
    return (
        principal is not None
        and principal.role is not Role.CUSTOMER
        and all(
            authorizer.decided_without_state(principal, entity_type, "")
            for entity_type in entity_types
        )
    )


async def _generations(
    cache: SnapshotCache, depended_on: list[tuple[str, list[str]]]
) -> list[bytes]:
    """The index generations each listing depends on (workers/index.py `generations_key`),
    named, as parts of a rendered response's key."""
    if not depended_on:
        return []
    try:
        async with cache.client.pipeline(transaction=False) as pipe:
            for entity_type, fields in depended_on:  # a type's generations are one hash
                pipe.hmget(generations_key(cache.prefix, entity_type), fields)
            answers: list[list[bytes | None]] = await pipe.execute()
    except (RedisError, OSError) as exc:
        raise CacheUnavailable(str(exc)) from exc
    parts = []
    for (entity_type, fields), values in zip(depended_on, answers, strict=True):
        if fields and fields[0] == EPOCH and values[0] is None:
            values = [await _new_epoch(cache, entity_type), *values[1:]]
        parts.append(entity_type.encode())
        parts += [f.encode() + b"=" + (v or b"") for f, v in zip(fields, values, strict=True)]
    return parts


async def _new_epoch(cache: SnapshotCache, entity_type: str) -> bytes | None:
    """The type's epoch, made now if it has none: Redis lost it (or never had it), and its
    counters, counting up again from nothing, could meet the values a page was rendered at.
    A fresh token means nothing rendered before matches."""
    key = generations_key(cache.prefix, entity_type)
    try:
        await cache.client.hsetnx(key, EPOCH, uuid.uuid4().hex)
        epoch = await cache.client.hget(key, EPOCH)
    except (RedisError, OSError) as exc:
        raise CacheUnavailable(str(exc)) from exc
    return epoch.encode() if isinstance(epoch, str) else epoch


async def _look_up(cache: SnapshotCache, entities: list[tuple[str, str]]) -> list[RawEntry | None]:
    """Each entity's raw cache entry, None where the cache has none."""
    if len(entities) == 1:
        return [await cache.get_raw(*entities[0])]
    return list(await asyncio.gather(*(cache.get_raw(*entity) for entity in entities)))


def _prefetched(
    entities: list[tuple[str, str]], raw: list[RawEntry | None]
) -> PrefetchedReads | None:
    """The entries parsed for the resolvers; None when one cannot be read by this version
    (the resolvers then meet it themselves and answer with an error)."""
    try:
        parsed = [CachedSnapshot.from_raw(entry) if entry else None for entry in raw]
    except ValueError:
        return None
    return PrefetchedReads(
        {entity: CacheLookup(entry) for entity, entry in zip(entities, parsed, strict=True)}
    )


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body as far as it came, and whether it came whole."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already-read body to the app first."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _json_request(body: bytes) -> tuple[str, dict[str, Any], str | None] | None:
    """(query, variables, operationName) of a plain JSON GraphQL request, else None."""
    try:
        request = decode_json(body)
    except RequestRefused:
        return None
    if not isinstance(request, dict) or set(request) - {"query", "variables", "operationName"}:
        return None
    query, variables, operation_name = (
        request.get("query"),
        request.get("variables") or {},
        request.get("operationName"),
    )
    if not isinstance(query, str) or not isinstance(variables, dict):
        return None
    if operation_name is not None and not isinstance(operation_name, str):
        return None
    return query, variables, operation_name


async def _capture(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> _Rendered | None:
    """Run `app`, passing its response on, and return that response once it is complete."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def capturing(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = {**message, "headers": list(message["headers"])}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        await send(message)

    await app(scope, receive, capturing)
    return None if start is None else _Rendered(start, b"".join(chunks))
