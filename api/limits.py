"""Request limits: hostile input refused before it costs anything, each limit with its code.

In the order a request meets them:

- its body: more than `max_body_bytes` is answered 413 PAYLOAD_TOO_LARGE as soon as the
  Content-Length header or the bytes received so far say so, and the rest is never read
  (`BodyLimit`, outermost on /graphql, so nothing behind it can read more);
- its JSON: what is not one JSON object in UTF-8 is 400 INVALID_INPUT, and a JSON array of
  requests (a batch) 400 BATCH_NOT_SUPPORTED (`decode_json`, where all request JSON is read);
- its document: parsing stops at `max_tokens` tokens, comments included (TOO_MANY_TOKENS), so
  a huge document costs no more than a small one, and is never cached;
- each operation in it: how deep its fields nest, its aliases, directives and root fields,
  and a mutation's root fields, one command each (QUERY_TOO_DEEP, TOO_MANY_ALIASES,
  TOO_MANY_DIRECTIVES, TOO_MANY_ROOT_FIELDS, TOO_MANY_MUTATIONS), checked while validating;
  a fragment counts each time it is spread, as it would be executed;
- the operation to run, with its variables: its LIVE reads, each a Temporal query
  (TOO_MANY_LIVE_READS), checked just before execution; then, as it runs, the queries it
  makes, cache misses included, each event of a subscription counted on its own.

A refused request runs no resolver: it reads and stores nothing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

from graphql import (
    DocumentNode,
    EnumValueNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    VariableNode,
    Visitor,
    get_operation_ast,
    parse,
    visit,
)
from graphql.language.visitor import BREAK
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import SchemaExtension
from strawberry.types import StreamExecutionResult

from api.errors import LimitCode, RequestRefused, over_limit
from api.gateway import QUERY_BUDGET, Consistency, QueryBudget
from entities.errors import ErrorCode
from workers.settings import Settings

ALWAYS_LIVE = frozenset({"history"})
"""Fields that are a Temporal query whatever the consistency: each counts as a LIVE read,
and a document that selects one is never answered from rendered cached reads."""


def selects_always_live(document: DocumentNode) -> bool:
    """Whether any selection in the document, its fragments included, is `ALWAYS_LIVE`."""
    found = False

    class _Finder(Visitor):
        def enter_field(self, node: FieldNode, *_: object) -> object:
            nonlocal found
            if node.name.value in ALWAYS_LIVE:
                found = True
                return BREAK
            return None

    visit(document, _Finder())
    return found


def fragments_of(document: DocumentNode) -> dict[str, FragmentDefinitionNode]:
    """The document's fragment definitions, by name."""
    return {
        definition.name.value: definition
        for definition in document.definitions
        if isinstance(definition, FragmentDefinitionNode)
    }


# -- the body ---------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: refuses a request body over `max_bytes` with 413, reading no further."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        await _BodyLimitResponder(self._app, self._max_bytes)(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised out of `receive` through the app, which gets no byte past the limit."""


class _BodyLimitResponder:
    _receive: Receive

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes
        self._received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length", "")
        # More than 18 digits is over any limit (and thousands of them would not be an int).
        if re.fullmatch(r"[0-9]+", declared) and (
            len(declared) > 18 or int(declared) > self._max_bytes
        ):
            await self._refuse(scope, receive, send)
            return
        self._receive = receive
        try:
            await self._app(scope, self._receive_within_limit, send)
        except _BodyTooLarge:
            # Everything behind this reads the whole body before it answers, so nothing has
            # been sent yet.
            await self._refuse(scope, receive, send)

    async def _receive_within_limit(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._max_bytes:
                raise _BodyTooLarge
        return message

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = RequestRefused(
            413,
            LimitCode.PAYLOAD_TOO_LARGE,
            f"the request body is larger than {self._max_bytes} bytes",
        )
        response = refused.response()
        response.headers["connection"] = "close"  # the server drops the rest of the body
        await response(scope, receive, send)


# -- the JSON ---------------------------------------------------------------------------------

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
"""One decoder for every request: `json.loads` with an argument builds a new one each call."""


def decode_json(data: str | bytes) -> Any:
    """A request's JSON (its body, or a query parameter): an object, or an array of them,
    which only a batch is. Whatever `json` cannot take whole, invalid UTF-8, a number of
    thousands of digits, nesting deeper than the stack, NaN, an unpaired surrogate, is the
    client's error (400 INVALID_INPUT), not the server's."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = _DECODER.decode(text)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # an unpaired one raises
    except (ValueError, RecursionError) as exc:
        raise RequestRefused(
            400, ErrorCode.INVALID_INPUT, "the request is not well-formed JSON in UTF-8"
        ) from exc
    if not isinstance(value, dict | list):
        raise RequestRefused(400, ErrorCode.INVALID_INPUT, "a GraphQL request is a JSON object")
    return value


# -- the document -----------------------------------------------------------------------------

_TOKEN_LIMIT = "Document contains more than {} tokens"  # graphql-core's wording
MAX_INTROSPECTION_FIELDS = 400
"""Fields an operation's introspection may ask for: the whole schema as GraphiQL and code
generators ask for it is 213 to 226; fifteen aliases of a deep fragment were 2,160, answered
in 6.5 MB after seconds of the event loop."""


@dataclass(frozen=True)
class _Shape:
    """What a selection set asks for, through its fragments: `fields` and `names` (response
    names, counted) at its own level, the rest all the way down; `repeats` is the most times
    one response name is selected in any one selection set."""

    depth: int = 0
    fields: int = 0
    aliases: int = 0
    directives: int = 0
    all_fields: int = 0
    repeats: int = 0
    names: Counter[str] = field(default_factory=Counter, compare=False)
    object_repeats: int = 0
    object_names: Counter[str] = field(default_factory=Counter, compare=False)
    introspection_fields: int = 0

    def beside(self, other: _Shape) -> _Shape:
        return _Shape(
            max(self.depth, other.depth),
            self.fields + other.fields,
            self.aliases + other.aliases,
            self.directives + other.directives,
            self.all_fields + other.all_fields,
            max(self.repeats, other.repeats),
            self.names + other.names,
            max(self.object_repeats, other.object_repeats),
            self.object_names + other.object_names,
            self.introspection_fields + other.introspection_fields,
        )


class _Measure:
    """Measures a document's selection sets, counting a fragment's contents each time it is
    spread while walking each fragment once."""

    def __init__(self, document: DocumentNode) -> None:
        self._fragments = fragments_of(document)
        self._spread: dict[str, _Shape] = {}

    def selection_set(self, selection_set: SelectionSetNode) -> _Shape:
        total = _Shape()
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                inner = _Shape()
                if selection.selection_set is not None:
                    inner = self.selection_set(selection.selection_set)
                # Introspection is as deep as the type system, not the data: it has its own
                # switch, and its fields their own bound, since the query GraphiQL and code
                # generators send asks for 220 (aliased, it would ask for thousands).
                introspection = selection.name.value.startswith("__")
                shape = _Shape(
                    depth=1 if introspection else 1 + inner.depth,
                    fields=1,
                    aliases=inner.aliases + (selection.alias is not None),
                    directives=inner.directives,
                    all_fields=1 if introspection else 1 + inner.all_fields,
                    introspection_fields=inner.introspection_fields
                    + (inner.all_fields if introspection else 0),
                    repeats=inner.repeats,
                    names=Counter([(selection.alias or selection.name).value]),
                    object_repeats=inner.object_repeats,
                    object_names=Counter(
                        [(selection.alias or selection.name).value]
                        if selection.selection_set is not None
                        else []
                    ),
                )
            elif isinstance(selection, InlineFragmentNode):
                shape = self.selection_set(selection.selection_set)
            else:
                shape = self._fragment(cast(FragmentSpreadNode, selection).name.value)
            directives = shape.directives + len(selection.directives or ())
            total = total.beside(replace(shape, directives=directives))
        return replace(
            total,
            repeats=max(total.repeats, *total.names.values(), 0),
            object_repeats=max(total.object_repeats, *total.object_names.values(), 0),
        )

    def _fragment(self, name: str) -> _Shape:
        if name not in self._spread:
            self._spread[name] = _Shape()  # a fragment spread inside itself (invalid) is empty
            fragment = self._fragments.get(name)
            if fragment is not None:
                self._spread[name] = self.selection_set(fragment.selection_set)
        return self._spread[name]


class _LiveReads:
    """Counts a selection set's LIVE reads, through its fragments, as `_Measure` counts
    them, but nothing else: it runs for every request, with the request's variables, where
    `_Measure` runs once for each document parsed."""

    def __init__(self, document: DocumentNode, is_live: Callable[[FieldNode], bool]) -> None:
        self._fragments = fragments_of(document)
        self._is_live = is_live
        self._spread: dict[str, int] = {}

    def selection_set(self, selection_set: SelectionSetNode) -> int:
        found = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                found += self._is_live(selection)
                if selection.selection_set is not None:
                    found += self.selection_set(selection.selection_set)
            elif isinstance(selection, InlineFragmentNode):
                found += self.selection_set(selection.selection_set)
            else:
                found += self._fragment(cast(FragmentSpreadNode, selection).name.value)
        return found

    def _fragment(self, name: str) -> int:
        if name not in self._spread:
            self._spread[name] = 0  # a fragment spread inside itself (invalid) counts none
            fragment = self._fragments.get(name)
            if fragment is not None:
                self._spread[name] = self.selection_set(fragment.selection_set)
        return self._spread[name]


@dataclass(frozen=True)
class DocumentLimits:
    """The most a GraphQL document and the operation run from it may ask for."""

    depth: int
    aliases: int
    tokens: int
    directives: int
    root_fields: int
    mutations: int
    live_reads: int
    fields: int = 200
    repeats: int = 20
    object_repeats: int = 3
    chars: int = 16 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> DocumentLimits:
        return cls(
            fields=settings.max_fields,
            chars=settings.max_document_chars,
            repeats=settings.max_field_repeats,
            object_repeats=settings.max_object_repeats,
            depth=settings.max_query_depth,
            aliases=settings.max_aliases,
            tokens=settings.max_tokens,
            directives=settings.max_directives,
            root_fields=settings.max_root_fields,
            mutations=settings.max_mutations,
            live_reads=settings.max_live_reads,
        )

    def parse(self, query: str) -> DocumentNode:
        """`query` parsed and checked: refused when longer than `chars` (DOCUMENT_TOO_LARGE)
        before it is read, then (TOO_MANY_TOKENS) at its first token over the limit, and
        with the first of `check`'s errors before anything validates it."""
        if len(query) > self.chars:
            raise over_limit(
                LimitCode.DOCUMENT_TOO_LARGE,
                f"the document is {len(query)} characters long; at most {self.chars}",
            )
        try:
            document = parse(query, max_tokens=self.tokens)
        except GraphQLSyntaxError as error:
            if _TOKEN_LIMIT.format(self.tokens) not in error.message:
                raise
            raise over_limit(
                LimitCode.TOO_MANY_TOKENS, f"the document has more than {self.tokens} tokens"
            ) from None
        errors = self.check(document)
        if errors:
            raise errors[0]
        return document

    def check(self, document: DocumentNode) -> list[GraphQLError]:
        """What each operation in `document` asks for beyond the limits."""
        measure = _Measure(document)
        errors = []
        for operation in document.definitions:
            if not isinstance(operation, OperationDefinitionNode):
                continue
            shape = measure.selection_set(operation.selection_set)
            directives = shape.directives + len(operation.directives or ())
            mutation = operation.operation is OperationType.MUTATION
            checks = [
                (shape.depth, self.depth, LimitCode.QUERY_TOO_DEEP, "fields nested {} deep"),
                (shape.aliases, self.aliases, LimitCode.TOO_MANY_ALIASES, "{} aliases"),
                (directives, self.directives, LimitCode.TOO_MANY_DIRECTIVES, "{} directives"),
                (
                    shape.fields if mutation else 0,
                    self.mutations,
                    LimitCode.TOO_MANY_MUTATIONS,
                    "{} mutations",
                ),
                (shape.fields, self.root_fields, LimitCode.TOO_MANY_ROOT_FIELDS, "{} root fields"),
                (shape.all_fields, self.fields, LimitCode.TOO_MANY_FIELDS, "{} fields"),
                (
                    shape.introspection_fields,
                    MAX_INTROSPECTION_FIELDS,
                    LimitCode.TOO_MANY_FIELDS,
                    "{} fields in its introspection",
                ),
                # Validation compares every two fields of one name in a selection set: a
                # name selected hundreds of times costs its square.
                # Two selections of one object field are compared field by field, all the way
                # down: their repeats multiply (8 reads of a cart, each of its lines 12 times,
                # held the API's CPU 150-250 ms), so an object field repeats less.
                (
                    shape.object_repeats,
                    self.object_repeats,
                    LimitCode.TOO_MANY_FIELDS,
                    "a field with a selection of its own selected {} times in one selection set",
                ),
                (
                    shape.repeats,
                    self.repeats,
                    LimitCode.TOO_MANY_FIELDS,
                    "a field selected {} times in one selection set",
                ),
            ]
            errors += [
                over_limit(code, f"the operation has {what.format(found)}; at most {limit}")
                for found, limit, code, what in checks
                if found > limit
            ]
        return errors

    def check_live_reads(
        self, document: DocumentNode, operation_name: str | None, variables: dict[str, Any]
    ) -> GraphQLError | None:
        """TOO_MANY_LIVE_READS if the operation run with these variables has too many fields
        whose `consistency` is LIVE, written so or through a variable."""
        operation = get_operation_ast(document, operation_name)
        if operation is None:
            return None
        chosen: dict[str, object] = {
            definition.variable.name.value: definition.default_value.value
            for definition in operation.variable_definitions or ()
            if isinstance(definition.default_value, EnumValueNode)
        }
        chosen.update(variables)

        def is_live(selection: FieldNode) -> bool:
            if selection.name.value in ALWAYS_LIVE:
                return True
            value = next(
                (a.value for a in selection.arguments or () if a.name.value == "consistency"),
                None,
            )
            if isinstance(value, VariableNode):
                return chosen.get(value.name.value) == Consistency.LIVE
            return isinstance(value, EnumValueNode) and value.value == Consistency.LIVE

        found = _LiveReads(document, is_live).selection_set(operation.selection_set)
        if found <= self.live_reads:
            return None
        return over_limit(
            LimitCode.TOO_MANY_LIVE_READS,
            f"the operation has {found} LIVE reads; at most {self.live_reads}",
        )


# -- Strawberry's hooks -----------------------------------------------------------------------


class LiveReadLimit(SchemaExtension):
    """Refuses, just before execution, an operation with more LIVE reads than `limits` allow,
    and gives each execution its budget of queries to entities (`QueryBudget`): each
    operation, on a WebSocket too, and each event of a subscription, which reads what a
    request would."""

    def __init__(self, limits: DocumentLimits) -> None:
        super().__init__()
        self._limits = limits

    def on_execute(self) -> Iterator[None]:
        QUERY_BUDGET.set(QueryBudget(self._limits.live_reads))
        context = self.execution_context
        if context.graphql_document is not None and context.result is None:
            error = self._limits.check_live_reads(
                context.graphql_document, context.operation_name, context.variables or {}
            )
            if error is not None:
                context.result = ExecutionResult(data=None, errors=[error])
        yield

    def on_stream_result(self, result: StreamExecutionResult) -> Iterator[None]:
        yield
        # Resumed when the subscriber asks for the next event, before it is executed; the
        # first shares the operation's budget with the subscription's start.
        QUERY_BUDGET.set(QueryBudget(self._limits.live_reads))
