"""How the response-size limit counts an operation: from the schema's declared list bounds
and the operation's page arguments, every list counted full."""

from __future__ import annotations

import strawberry
from graphql import (
    FragmentDefinitionNode,
    GraphQLInterfaceType,
    GraphQLObjectType,
    OperationDefinitionNode,
    parse,
)

from api.response_size import ResponseSize, bounded, declared_bound
from api.schema import build_schema
from workers.settings import Settings

SCHEMA = build_schema(Settings())._schema


def count(query: str, limit: int = 100_000, **variables: object) -> int:
    document = parse(query)
    operation = document.definitions[0]
    assert isinstance(operation, OperationDefinitionNode)
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    return ResponseSize(limit).count(SCHEMA, operation, fragments, variables)


def test_every_list_in_the_schema_declares_its_bound() -> None:
    undeclared = [
        f"{kind.name}.{name}"
        for kind in SCHEMA.type_map.values()
        if isinstance(kind, GraphQLObjectType | GraphQLInterfaceType)
        and not kind.name.startswith("__")
        for name, field in kind.fields.items()
        if "List" in type(getattr(field.type, "of_type", field.type)).__name__
        and declared_bound(field)[0] is None
    ]
    assert undeclared == []


def test_lists_count_full_and_pages_count_what_they_ask() -> None:
    # The cart, its list, and 100 lines of 2 values.
    assert count('{ cart(id: "c") { lines { sku quantity } } }') == 202
    # A fragment counts where it is spread, on each item of the list it is spread in.
    spread = '{ cart(id: "c") { lines { ...L } } } fragment L on CartLine { sku quantity }'
    assert count(spread) == 202
    item = '{ inventoryItem(sku: "s") { reservations { reservationId } adjustments { at } } }'
    assert count(item) == 1 + (1 + 1000) + (1 + 20)
    page = 'query($n: Int) { account(id: "a") { history(last: $n) { entries { revision } } } }'
    assert count(page, n=7) == 3 + 7
    assert count(page) == 3 + 20  # history's default page
    assert count(page, n=5000) == 3 + 100  # the resolver refuses more than 100
    literal = '{ account(id: "a") { history(last: 3) { entries { sentBy { role } } } } }'
    assert count(literal) == 3 + 3 * 2


def test_a_fragment_is_counted_once_wherever_it_is_spread() -> None:
    # Each fragment spreads the next twice: 100 lines of 2^40 values, counted in 41 steps.
    chain = " ".join(f"fragment F{i} on CartLine {{ ...F{i + 1} ...F{i + 1} }}" for i in range(40))
    query = '{ cart(id: "c") { lines { ...F0 } } } ' + chain + " fragment F40 on CartLine { sku }"
    assert count(query, limit=2**60) == 2 + 100 * 2**40


def test_a_list_without_a_declared_bound_is_refused_whatever_it_selects() -> None:
    @strawberry.type
    class Query:
        undeclared: list[int] = strawberry.field(default_factory=list)
        declared: list[int] = bounded(3, description="at most three")

    schema = strawberry.Schema(query=Query)._schema
    size = ResponseSize(1000)
    assert size.check(schema, parse("{ declared }"), None, {}) is None
    refused = size.check(schema, parse("{ undeclared }"), None, {})
    assert refused is not None and refused.extensions == {"code": "RESPONSE_TOO_LARGE"}
