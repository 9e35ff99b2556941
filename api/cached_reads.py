"""Rendered responses to CACHED reads, replayed while the cache entries behind them stand.

A GraphQL document whose root fields are all entity reads served from the cache answers
with bytes that depend only on the document, its variables and those cache entries. So the
first such request is executed as usual, through Strawberry, with the entries fetched up
front, and its response is kept under (request, entries). A later request for the same
document, variables and entries (dashboards polling an entity that has not changed) is
answered with those bytes, without executing GraphQL. A new revision writes a new entry, so
it is a new key: nothing is ever invalidated, old responses age out of a bounded LRU.

Listings and counts (`listing_field`; `api/read_plans.py` plans which reads a document
makes) are replayed the same way while the index generations they depend on stand
(workers/index.py `generations_key`): a list filtered to some values of a tag (status
SUSPENDED or DORMANT, a cart's account) on the generations of those values, which every
change to an entity that had or has one of them raises; any other on its type's, which every
change raises. Every listing also depends on its type's stuck marks and on the epoch `tenure
reindex` sets.

Anything else (mutations, LIVE reads, documents with fragments or directives at the root,
invalid documents, entities the cache has not seen, Redis down) goes to Strawberry as is.
Nothing about the caller but whether it is a customer goes into a read's response (a
customer is shown no item's reservations), so that is part of the key and the caller is not;
and a response
is replayed only to a caller the policy lets read every entity in it without a look at their
state (`Authorizer.decided_without_state`); others go through the resolvers, which check the
long way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import OrderedDict
from typing import Any

from graphql import GraphQLSchema
from starlette.types import ASGIApp, Receive, Scope, Send

from api.asgi_capture import Captured, capture, read_body, replaying
from api.authentication import principal_of
from api.authorization import Authorizer
from api.documents import hand_over
from api.errors import RequestRefused
from api.gateway import CacheLookup
from api.limits import DocumentLimits, decode_json
from api.metrics import ApiMetrics
from api.prefetched_reads import SCOPE_KEY, PrefetchedReads, look_up
from api.rate_limits import charge_answer, limiter_of, send_rate_limited
from api.read_plans import ReadPlan, ReadPlans
from api.request_context import note_operation
from api.response_size import ResponseSize
from entities.runtime.policy import Role
from workers.cache import CacheUnavailable, RawEntry, SnapshotCache
from workers.failures import REDIS_FAILURES
from workers.index import EPOCH, generations_key

MAX_BODY = 64 * 1024
MAX_RENDERED_BYTES = 32 * 1024 * 1024
"""What the kept responses may weigh together: clients that vary their bodies (whitespace is
enough) make new entries, and each may be up to MAX_BODY."""
MAX_DEPENDENCIES = 1024


def _key(
    body: bytes, scope: Scope, entries: list[RawEntry], generations: list[bytes] | None = None
) -> bytes:
    """A digest of what a rendered response depends on: the body, whether the caller is a
    customer, the headers that choose the response's form (content type asked for and
    sent), the cache entries read and the index generations the listings depend on."""
    digest = hashlib.blake2b(digest_size=16)
    principal = principal_of(scope)
    customer = principal is not None and principal.role is Role.CUSTOMER
    parts = [body, b"customer" if customer else b"staff"]
    parts += [name + b":" + value for name, value in scope["headers"] if name in _NEGOTIATING]
    for document, cached_at, stuck in entries:
        parts += [document, cached_at, stuck or b""]
    parts += generations or []
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


_NEGOTIATING = {b"accept", b"content-type"}


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
        self._plans = ReadPlans(schema, limits)
        self._size = size
        self._rendered: OrderedDict[bytes, Captured] = OrderedDict()
        self._rendered_bytes = 0
        # Renders under way, by key: the same request arriving meanwhile waits for its bytes
        # instead of rendering them too (32 dashboards after one write, one render).
        self._rendering: dict[bytes, asyncio.Future[Captured | None]] = {}
        # What each body's listings depend on, by the body's digest: coercing its variables
        # again would cost a tenth of a replay.
        self._depended_on: OrderedDict[bytes, list[tuple[str, list[str]]]] = OrderedDict()
        self.replayed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._size <= 0 or scope["type"] != "http" or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        body, whole = await read_body(receive)
        if not whole:
            return  # the client went away before it finished sending
        replay = replaying(body, receive)
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
            raw = await look_up(cache, entities) if entities else []
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
        prefetched = PrefetchedReads.parsed(entities, raw)
        if prefetched is not None:
            scope[SCOPE_KEY] = prefetched
        if key is None or prefetched is None:  # read live (and filled) by the resolvers
            await self._app(scope, replay, send)
            return
        rendering = self._rendering[key] = asyncio.get_running_loop().create_future()
        kept: Captured | None = None
        try:
            captured = await capture(self._app, scope, replay, send)
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
            prefetched = PrefetchedReads.parsed(distinct, await look_up(cache, distinct))
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

    def _keep(self, key: bytes, rendered: Captured) -> None:
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
    except REDIS_FAILURES as exc:
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
    except REDIS_FAILURES as exc:
        raise CacheUnavailable(str(exc)) from exc
    return epoch.encode() if isinstance(epoch, str) else epoch


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
