"""Every activity a workflow runs is served by the worker under its declared name, taking and
giving back the types its declaration names (`entities/runtime/activities.py`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.testing import ActivityEnvironment

from deploy.embedded import free_port
from entities import catalog
from entities.runtime.activities import Activity
from entities.runtime.envelope import Publication, Snapshot
from tests.conftest import new_id
from workers.activities import CacheActivities
from workers.cache import SnapshotCache, connect_redis
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


async def test_a_publish_while_redis_is_down_fails_benign_and_is_said_once_in_a_while(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: each entity's publish fails and is retried. Each attempt logged a warning
    with its traceback (675 in a 25 s outage); it now fails as a benign error, which the SDK
    logs at debug, and the worker says so once in a while."""
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    client = connect_redis(down)
    publishing = CacheActivities(SnapshotCache(client, down.redis_prefix))
    snapshot = Snapshot(entity_type="account", entity_id=new_id(), revision=1, state={})
    env = ActivityEnvironment()
    caplog.set_level(logging.WARNING, logger="workers.activities")
    try:
        for _ in range(20):
            with pytest.raises(ApplicationError) as failed:
                await env.run(publishing.publish_snapshot, Publication(snapshot=snapshot))
            assert failed.value.category is ApplicationErrorCategory.BENIGN
            assert failed.value.type == "CacheUnavailable" and not failed.value.non_retryable
    finally:
        await client.aclose()
    said = [r for r in caplog.records if r.name == "workers.activities"]
    assert len(said) == 1 and "Redis unavailable" in said[0].getMessage()
