"""Every activity a workflow runs is served by the worker under its declared name, taking and
giving back the types its declaration names (`entities/runtime/activities.py`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client

from entities import catalog
from entities.runtime.activities import Activity
from workers.cache import SnapshotCache
from workers.settings import Settings
from workers.worker import activity_functions


def names(types: Iterable[Any]) -> list[str]:
    """Types by their full names: a test that imports a module again makes new classes."""
    return [f"{t.__module__}.{t.__qualname__}" for t in types]


def mismatches(declared: Mapping[str, Activity[Any, Any]], served: Iterable[Any]) -> list[str]:
    """What the worker serves otherwise than declared, or not at all."""
    definitions = {d.name: d for d in map(activity._Definition.must_from_callable, served)}
    found = []
    for name, declaration in sorted(declared.items()):
        definition = definitions.get(name)
        if definition is None:
            found.append(f"{name}: not served")
            continue
        takes = [] if declaration.argument is None else [declaration.argument]
        if definition.arg_types is None:  # not annotated
            found.append(f"{name}: takes what it does not say, declared {names(takes)}")
        elif names(definition.arg_types) != names(takes):
            found.append(f"{name}: takes {names(definition.arg_types)}, declared {names(takes)}")
        gives = declaration.result or type(None)
        if names([definition.ret_type]) != names([gives]):
            found.append(f"{name}: gives {names([definition.ret_type])}, declared {names([gives])}")
    return found


async def test_the_worker_serves_every_declared_activity_as_declared(
    temporal_client: Client, cache: SnapshotCache, settings: Settings
) -> None:
    catalog.workflows()  # every entities module imported: every activity declared
    assert {"request_entity", "publish_snapshot", "next_task", "bulk_settle"} <= set(
        Activity.declared
    )
    assert mismatches(Activity.declared, activity_functions(temporal_client, cache, settings)) == []


async def test_an_activity_served_with_other_types_or_not_at_all_is_found(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = activity_functions(temporal_client, cache, settings)
    publish = Activity.declared["publish_snapshot"]
    monkeypatch.setattr(Activity, "declared", {})  # these two declared for this test only
    Activity("publish_snapshot", str, publish.result)
    Activity("never_served", str, None)
    assert mismatches(Activity.declared, served) == [
        "never_served: not served",
        f"publish_snapshot: takes {names([publish.argument])}, declared ['builtins.str']",
    ]


def test_another_activity_under_a_declared_name_is_refused() -> None:
    catalog.workflows()
    publish = Activity.declared["publish_snapshot"]
    with pytest.raises(ValueError, match="declared already"):
        Activity("publish_snapshot", str, bool)
    assert Activity.declared["publish_snapshot"] is publish
