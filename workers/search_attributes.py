"""The custom search attributes Tenure's workflows set, and the worker's check, before it
polls, that its namespace has them.

A workflow that upserts an attribute its namespace does not have fails its workflow task on
every retry: a checkout would stop at its first settled status. The embedded dev server is
started with them (deploy/embedded.py); a Temporal cluster needs them created once
(docs/operations.md), and a worker pointed at a namespace without them refuses to start,
naming the command that creates them.
"""

from __future__ import annotations

from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

from entities.checkout import STATUS_ATTRIBUTE

REQUIRED: tuple[SearchAttributeKey[Any], ...] = (STATUS_ATTRIBUTE,)

_KINDS = {
    IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD: "Keyword",
    IndexedValueType.INDEXED_VALUE_TYPE_TEXT: "Text",
    IndexedValueType.INDEXED_VALUE_TYPE_INT: "Int",
    IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE: "Double",
    IndexedValueType.INDEXED_VALUE_TYPE_BOOL: "Bool",
    IndexedValueType.INDEXED_VALUE_TYPE_DATETIME: "Datetime",
    IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST: "KeywordList",
}


def kind_of(key: SearchAttributeKey[Any]) -> str:
    """The attribute's type as `temporal operator search-attribute create --type` takes it."""
    return _KINDS[IndexedValueType.ValueType(int(key.indexed_value_type))]


def required_attributes() -> dict[str, str]:
    """Each required attribute's name and type."""
    return {key.name: kind_of(key) for key in REQUIRED}


class MissingSearchAttributes(RuntimeError):
    """The namespace lacks attributes Tenure's workflows set."""


async def check_search_attributes(client: Client, namespace: str) -> None:
    """Raise MissingSearchAttributes, with the commands that fix it, unless `namespace` has
    every required attribute with its type."""
    answer = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    have = {**answer.system_attributes, **answer.custom_attributes}
    wrong = [
        (name, kind)
        for name, kind in required_attributes().items()
        if _KINDS.get(have.get(name, IndexedValueType.INDEXED_VALUE_TYPE_UNSPECIFIED)) != kind
    ]
    if wrong:
        commands = "; ".join(
            f"temporal operator search-attribute create --namespace {namespace} "
            f"--name {name} --type {kind}"
            for name, kind in wrong
        )
        raise MissingSearchAttributes(
            f"namespace {namespace!r} lacks the search attributes "
            f"{', '.join(name for name, _ in wrong)} that Tenure's workflows set (a checkout "
            f"would stop at its first status); create them once: {commands}"
        )
