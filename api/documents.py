"""Documents: each parsed, held to the request limits, and validated, once.

Parsing refuses a document longer than the limit before reading it, stops at the token
limit, and checks the document's shape (depth, fields, aliases, directives, root fields,
repeats of one field) right after, before validation, whose cost grows with the square of
fields sharing a name. Clients send the same few small documents over and over, so those are
kept, parsed and validated; a larger one (every copy new in an attack) is never kept, where
it would hold its whole tree in memory for the collector to walk. A document not kept is
parsed and validated in a thread: its milliseconds of pure Python are then shared out with
the event loop (the interpreter switches threads every few milliseconds) instead of holding
every other request for their whole length.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, TypeVar

from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    specified_rules,
)
from graphql.validation import ASTValidationRule
from strawberry.extensions import SchemaExtension
from strawberry.schema.schema import validate_document

from api.limits import DocumentLimits
from entities.errors import ErrorCode

K = TypeVar("K")
V = TypeVar("V")

KEPT_CHARS = 8 * 1024
"""The longest document kept; the documents clients send are a few hundred characters."""

Rules = tuple[type[ASTValidationRule], ...]


class Documents:
    """Parses and validates documents, keeping small ones in two bounded LRUs. Only the
    event loop's thread touches the LRUs; the work itself may run in another."""

    def __init__(self, limits: DocumentLimits, size: int = 256) -> None:
        self.limits = limits
        self._size = size
        self._parsed: OrderedDict[str, DocumentNode] = OrderedDict()
        self._validated: OrderedDict[tuple[str, Rules], list[GraphQLError]] = OrderedDict()

    async def parse(self, query: str) -> DocumentNode:
        """The document, within the limits (an over-limit error with its code raised
        otherwise, and never kept)."""
        document = self._parsed.get(query)
        if document is not None:
            self._parsed.move_to_end(query)
            return document
        document = await asyncio.to_thread(self.limits.parse, query)
        if len(query) <= KEPT_CHARS:
            self._keep(self._parsed, query, document)
        return document

    async def validate(
        self, schema: GraphQLSchema, query: str, document: DocumentNode, rules: Rules
    ) -> list[GraphQLError]:
        """What is wrong with the document against the schema, as Strawberry validates."""
        key = (query, rules)
        errors = self._validated.get(key)
        if errors is not None:
            self._validated.move_to_end(key)
            return errors
        errors = await asyncio.to_thread(validate_document, schema, document, rules)
        if len(query) <= KEPT_CHARS:
            self._keep(self._validated, key, errors)
        return errors

    def _keep(self, cache: OrderedDict[K, V], key: K, value: V) -> None:
        cache[key] = value
        if len(cache) > self._size:
            cache.popitem(last=False)


PLANNED_KEY = "tenure.planned_document"
"""Where the rendered-read planner (api/read_plans.py, run by api/cached_reads.py) leaves,
in the request's ASGI scope, the document it parsed within the limits and validated with
graphql-core's specified rules, with the query it was parsed from: Strawberry then neither
parses it again nor runs those rules again. A document seen once (each differs, as an
attacker's would) costs one parse and one validation, not two."""


def hand_over(scope: MutableMapping[str, Any], query: str, document: DocumentNode) -> None:
    """Leave `document`, parsed from `query` and valid under `specified_rules`, for
    `CheckedDocuments` to take."""
    scope[PLANNED_KEY] = (query, document)


class CheckedDocuments(SchemaExtension):
    """Strawberry's parse and validate steps, done by `Documents`, or taken from the planner
    (`hand_over`) for the rules it already ran."""

    def __init__(self, documents: Documents) -> None:
        super().__init__()
        self._documents = documents

    async def on_parse(self) -> AsyncIterator[None]:
        context = self.execution_context
        if context.graphql_document is None and context.query:
            planned = self._handed_over(context.query)
            context.graphql_document = planned or await self._documents.parse(context.query)
        yield

    async def on_validate(self) -> AsyncIterator[None]:
        context = self.execution_context
        if context.graphql_document is not None and context.query:
            rules = tuple(context.validation_rules)
            if context.graphql_document is self._handed_over(context.query):
                rules = tuple(rule for rule in rules if rule not in specified_rules)
            context.pre_execution_errors = (
                await self._documents.validate(
                    context.schema._schema, context.query, context.graphql_document, rules
                )
                if rules
                else []
            )
            # `operation_name` answers the first operation's name when none was given.
            named = context._provided_operation_name is not None
            if not named and _operations(context.graphql_document) > 1:
                # GraphQL asks for a name here; Strawberry would run the first operation, a
                # mutation even, when the client meant another.
                context.pre_execution_errors = [
                    *context.pre_execution_errors,
                    GraphQLError(
                        "Must provide operation name if query contains multiple operations.",
                        extensions={"code": ErrorCode.INVALID_INPUT.value},
                    ),
                ]
        yield

    def _handed_over(self, query: str) -> DocumentNode | None:
        request = getattr(self.execution_context.context, "request", None)
        scope = getattr(request, "scope", None) or {}
        planned = scope.get(PLANNED_KEY)
        if planned is None or planned[0] != query:
            return None
        document: DocumentNode = planned[1]
        return document


def _operations(document: DocumentNode) -> int:
    return sum(isinstance(d, OperationDefinitionNode) for d in document.definitions)
