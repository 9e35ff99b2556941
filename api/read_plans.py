"""Which GraphQL documents are plain reads, and of what: each root field an entity read
(`entity_read_field`) or a listing of the index (`listing_field`), as the entity bindings
declare them. A document's `ReadPlan` names the entities (and index generations) its answer
depends on, so `api/cached_reads.py` can replay that answer while they stand."""

from __future__ import annotations

import asyncio
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

from api.documents import KEPT_CHARS
from api.limits import DocumentLimits, selects_always_live
from workers.index import EPOCH, EVERY, STUCK, tag_generation

MAX_PLANS = 256


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
            if given is None:
                continue
            values = given if isinstance(given, list) else [given]
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
class ReadPlans:
    """The plans of the documents seen last, by document and operation name."""

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
