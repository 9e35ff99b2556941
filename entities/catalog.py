"""Finds every workflow and entity type declared in this package, so adding one is one module."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

import entities
from entities.runtime.entity import EntityType
from entities.runtime.workflow import EntityWorkflow

_NOT_DOMAIN = {"catalog", "errors"}


@cache
def _modules() -> tuple[Any, ...]:
    return tuple(
        importlib.import_module(f"entities.{info.name}")
        for info in pkgutil.iter_modules(entities.__path__)
        if not info.ispkg and info.name not in _NOT_DOMAIN
    )


def workflows() -> list[type]:
    """Every `@workflow.defn` class declared in an `entities` module."""
    found: dict[str, type] = {}
    for module in _modules():
        for value in vars(module).values():
            if isinstance(value, type) and hasattr(value, "__temporal_workflow_definition"):
                found[value.__qualname__] = value
    return list(found.values())


def entity_types() -> dict[str, EntityType[Any, Any]]:
    """Every hosted entity type, by name (`account`, `cart`, ...)."""
    _modules()
    return {name: cls.entity for name, cls in EntityWorkflow.registry.items()}


def workflow_for(entity_type: str) -> type[EntityWorkflow]:
    _modules()
    return EntityWorkflow.registry[entity_type]
