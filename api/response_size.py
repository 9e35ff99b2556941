"""The size of a response, bounded before execution: RESPONSE_TOO_LARGE for an operation
whose answer could hold more values than `max_response_values`.

A response's cost is in its values: each one a resolver call, an object made and a piece of
JSON, on the event loop every reader shares. The document limits bound how many fields a
document names, not how many values they become: 5 aliased reads of an inventory item's
1,000 reservations, or of a cart's 100 lines, are a few dozen fields and tens of thousands of
values. So every list in the schema declares the most items it can hold (`bounded`), and the
operation is counted as GitHub counts its node limit, from the schema and the arguments, as
if every list were full: a field is one value, a list of them as many as its bound, and what
a list's items select is counted once for each item. A list paged by an argument (`first` or
`last`, on it or, with `paged`, on the field it belongs to) counts what that argument asks.
A list with no declared bound counts as the whole limit: deny by default, and a test holds
every list in the schema to a declaration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import strawberry
from graphql import (
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLList,
    GraphQLNonNull,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    VariableNode,
    get_named_type,
    get_operation_ast,
    is_composite_type,
)
from graphql.type.definition import GraphQLNamedType, GraphQLObjectType
from strawberry.extensions import SchemaExtension

from api.errors import LimitCode, over_limit
from api.limits import fragments_of
from api.pacing import answering
from api.rate_limits import charge_answer, limiter_of, rate_limited

MAX_ITEMS = "tenure.max_items"
PAGED = "tenure.paged"
PAGE_ARGUMENTS = ("first", "last")


def bounded(max_items: int, *, paged: bool = False, description: str | None = None) -> Any:
    """A list field holding at most `max_items` items; with `paged`, at most as many as the
    `first` or `last` argument of the field it belongs to asks for (`history(last: 5)`
    makes its `entries` 5)."""
    return strawberry.field(description=description, metadata={MAX_ITEMS: max_items, PAGED: paged})


def declared_bound(field: GraphQLField) -> tuple[int | None, bool]:
    """A list field's declared bound and whether a page argument above it narrows it."""
    definition = (field.extensions or {}).get("strawberry-definition")
    metadata: Mapping[str, Any] = getattr(definition, "metadata", None) or {}
    return metadata.get(MAX_ITEMS), bool(metadata.get(PAGED))


def _is_list(field: GraphQLField) -> bool:
    kind = field.type
    if isinstance(kind, GraphQLNonNull):
        kind = kind.of_type
    return isinstance(kind, GraphQLList)


class _Count:
    """Counts the values an operation's answer can hold, its lists full."""

    def __init__(
        self,
        schema: GraphQLSchema,
        fragments: dict[str, FragmentDefinitionNode],
        variables: Mapping[str, Any],
        defaults: Mapping[str, Any],
        limit: int,
    ) -> None:
        self._schema = schema
        self._fragments = fragments
        self._variables = variables
        self._defaults = defaults
        self._limit = limit
        self._spread: dict[tuple[str, str, int | None], int] = {}

    def selection_set(
        self, selection_set: SelectionSetNode, parent: GraphQLNamedType, page: int | None
    ) -> int:
        total = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                total += self._field(selection, parent, page)
            elif isinstance(selection, InlineFragmentNode):
                kind = parent
                if selection.type_condition is not None:
                    kind = self._schema.get_type(selection.type_condition.name.value) or parent
                total += self.selection_set(selection.selection_set, kind, page)
            else:
                total += self._fragment(_name(selection), parent, page)
            if total > self._limit:
                return total  # over already: stop before a deep document costs more
        return total

    def _fragment(self, name: str, parent: GraphQLNamedType, page: int | None) -> int:
        """A fragment's values, counted once for each type and page it is spread at: a
        chain of fragments each spreading the next twice costs steps, not 2^n."""
        key = (name, parent.name, page)
        if key not in self._spread:
            self._spread[key] = 0  # spread inside itself: invalid, and refused before this
            fragment = self._fragments.get(name)
            if fragment is not None:
                kind = self._schema.get_type(fragment.type_condition.name.value) or parent
                self._spread[key] = self.selection_set(fragment.selection_set, kind, page)
        return self._spread[key]

    def _field(self, node: FieldNode, parent: GraphQLNamedType, page: int | None) -> int:
        fields = getattr(parent, "fields", None)
        field: GraphQLField | None = fields.get(node.name.value) if fields else None
        if field is None:  # __typename, or introspection, which has its own switch
            return 1
        own_page = self._page(node, field)
        inner = 1
        kind = get_named_type(field.type)
        if node.selection_set is not None and is_composite_type(kind):
            inner = self.selection_set(
                node.selection_set, kind, own_page if own_page is not None else page
            )
        if not _is_list(field):
            return 1 + inner if node.selection_set is not None else 1
        items = self._items(field, own_page, page)
        return 1 + items * inner

    def _items(self, field: GraphQLField, own_page: int | None, page: int | None) -> int:
        bound, paged = declared_bound(field)
        if bound is None:
            return self._limit + 1  # undeclared: refused whatever its items select
        for asked in (own_page, page if paged else None):
            if asked is not None:
                return max(0, min(bound, asked))
        return bound

    def _page(self, node: FieldNode, field: GraphQLField) -> int | None:
        """What the field's `first` or `last` argument asks, as it will run."""
        for name in PAGE_ARGUMENTS:
            if name not in field.args:
                continue
            value: Any = field.args[name].default_value
            for argument in node.arguments or ():
                if argument.name.value != name:
                    continue
                if isinstance(argument.value, IntValueNode):
                    value = int(argument.value.value)
                elif isinstance(argument.value, VariableNode):
                    # A variable not given and with no default leaves the argument's own.
                    variable = argument.value.name.value
                    for given in (self._variables, self._defaults):
                        if variable in given:
                            value = given[variable]
                            break
                else:
                    value = None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


def _name(spread: FragmentSpreadNode | Any) -> str:
    return str(spread.name.value)


@dataclass(frozen=True)
class ResponseSize:
    """The most values an operation's answer may hold."""

    limit: int

    def count(
        self,
        schema: GraphQLSchema,
        operation: OperationDefinitionNode,
        fragments: dict[str, FragmentDefinitionNode],
        variables: Mapping[str, Any],
    ) -> int:
        """The values the operation's answer can hold with every list full; once over the
        limit, a number over it."""
        root: GraphQLObjectType | None = schema.get_root_type(operation.operation)
        if root is None:
            return 0
        defaults = {
            definition.variable.name.value: int(definition.default_value.value)
            for definition in operation.variable_definitions or ()
            if isinstance(definition.default_value, IntValueNode)
        }
        counter = _Count(schema, fragments, variables, defaults, self.limit)
        return counter.selection_set(operation.selection_set, root, None)

    def values(
        self,
        schema: GraphQLSchema,
        document: Any,
        operation_name: str | None,
        variables: Mapping[str, Any],
    ) -> int | None:
        """What the operation run with these variables could answer with, in values (None
        when the document names no such operation); once over the limit, a number over it."""
        operation = get_operation_ast(document, operation_name)
        if operation is None:
            return None
        return self.count(schema, operation, fragments_of(document), variables)

    def check(
        self,
        schema: GraphQLSchema,
        document: Any,
        operation_name: str | None,
        variables: Mapping[str, Any],
    ) -> GraphQLError | None:
        """RESPONSE_TOO_LARGE when the operation run with these variables could answer with
        more values than the limit."""
        found = self.values(schema, document, operation_name, variables)
        return None if found is None else self.refusal(found)

    def refusal(self, found: int) -> GraphQLError | None:
        """RESPONSE_TOO_LARGE for an answer of `found` values, when that is over the limit."""
        if found <= self.limit:
            return None
        return over_limit(
            LimitCode.RESPONSE_TOO_LARGE,
            f"the answer could hold more than {self.limit} values (every list counted full, "
            "or as many items as `first` or `last` asks); select fewer fields or ask for "
            "smaller pages",
        )


class ResponseSizeLimit(SchemaExtension):
    """Just before execution: refuses an operation whose answer could be too large, charges
    the caller's rate limit for the answer's size (`api/rate_limits.py`), and marks a heavy
    answer heavy while it runs (`api/pacing.py`). A subscription is bounded by its events'
    size alone: it is charged at the door, as a request, and its events are not paced."""

    def __init__(self, size: ResponseSize) -> None:
        super().__init__()
        self._size = size

    async def on_execute(self) -> AsyncIterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is None or context.result is not None:
            yield
            return
        operation = get_operation_ast(document, context.operation_name)
        found = self._size.values(
            context.schema._schema, document, context.operation_name, context.variables or {}
        )
        error = None if found is None else self._size.refusal(found)
        request = getattr(context.context, "request", None)
        once = operation is not None and operation.operation is not OperationType.SUBSCRIPTION
        if error is None and found is not None and request is not None and once:
            principal = getattr(context.context, "principal", None)
            limiter = limiter_of(request.scope)
            overdrawn = await charge_answer(limiter, principal, lambda: found)
            if overdrawn is not None:
                error = rate_limited(request.scope, overdrawn)
        if error is not None and not once:
            # Strawberry runs a subscription whatever the result set here says, but answers
            # an error raised here as its only result.
            raise error
        if error is not None:
            context.result = ExecutionResult(data=None, errors=[error])
        if error is None and found is not None and once:
            with answering(found):
                yield
        else:
            yield
