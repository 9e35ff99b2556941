"""Rebuilding the cache and the listing index from Temporal, for the day Redis is lost:
every entity that Temporal's visibility lists, asked for its snapshot (or, when it has
finished, its result), written through the cache's own never-backwards script; an entity
whose change-stream mark was lost with Redis announces a gap up to its revision there, so
that a consumer learns what it may have missed even of an entity that changes no more."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import Snapshot
from entities.runtime.workflow import EntityWorkflow
from workers.cache import CacheUnavailable, SnapshotCache
from workers.changes import Changes
from workers.forgetting import forgotten_by_now
from workers.temporal import ask, within

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (done, total) as entities are reindexed."""


@dataclass
class Reindexed:
    """What a reindex did: entities found, written (newer than what Redis held), and those
    that could not be read, by workflow id."""

    found: int = 0
    written: int = 0
    failed: list[str] = field(default_factory=list)


def _announced(snapshot: Snapshot, ended_retention: float | None) -> Changes | None:
    """What the snapshot's write streams: for an entity whose stream lost its mark (Redis
    lost its keys), a gap up to its revision (workers/changes.py), and nothing where the
    mark stands; nothing at all for an ended entity Redis has let go of by now on purpose
    (its mark with it), which Temporal still lists."""
    if snapshot.closed and forgotten_by_now(snapshot.updated_at, ended_retention, time.time()):
        return None
    return Changes(snapshot.revision, [], lost_only=True)


async def entity_ids(client: Client, entity_type: str, where: str | None = None) -> list[str]:
    """Every id of the type Temporal's visibility knows (and `where`, a visibility query,
    admits), once each: a continued-as-new entity is listed once a run."""
    workflow = catalog.workflow_for(entity_type)
    name = workflow.__temporal_workflow_definition.name  # type: ignore[attr-defined]
    prefix = catalog.entity_types()[entity_type].id_prefix
    found: dict[str, None] = {}
    query = f"WorkflowType = '{name}'" + (f" AND ({where})" if where else "")
    try:
        async for execution in client.list_workflows(query):
            if execution.id.startswith(prefix):
                found[execution.id.removeprefix(prefix)] = None
    except RPCError as exc:
        if exc.status is not RPCStatusCode.INVALID_ARGUMENT:
            raise
        # Only `where` can make it malformed; the whole query is what the position names.
        raise TenureError(
            ErrorCode.INVALID_INPUT, f"Temporal refused the query {query!r}: {exc.message}"
        ) from exc
    return list(found)


async def snapshot_of(
    client: Client, entity_type: str, entity_id: str, timeout: float
) -> Snapshot | None:
    """The entity's latest snapshot: its answer to `snapshot`, or its result when its
    chain has completed (a closed entity); None when it holds no state."""
    entity = catalog.entity_types()[entity_type]
    handle = client.get_workflow_handle(entity.workflow_id(entity_id), result_type=Snapshot)
    rpc = timedelta(seconds=timeout)
    description = await within(timeout, handle.describe(rpc_timeout=rpc))
    if description.status is WorkflowExecutionStatus.COMPLETED:
        snapshot: Snapshot = await within(timeout, handle.result(rpc_timeout=rpc))
    else:
        snapshot = await ask(handle, EntityWorkflow.snapshot, result_type=Snapshot, seconds=timeout)
    return snapshot if snapshot.state is not None else None


async def reindex(
    client: Client,
    cache: SnapshotCache,
    entity_types: list[str],
    *,
    where: str | None = None,
    concurrency: int = 16,
    timeout: float = 15.0,
    progress: Progress | None = None,
    rounds: int = 3,
    pause: float = 2.0,
    ended_retention: float | None = None,
) -> Reindexed:
    """Write every listed entity's snapshot to the cache and the index, `concurrency` at a
    time; `where` narrows the visibility query (`TaskQueue = 'tenure'`). A snapshot older
    than what Redis holds changes nothing. Listings rendered before it are not replayed
    after it starts (`SnapshotCache.new_epoch`). Those not read are asked again, up to
    `rounds` in all, `pause` seconds apart: workers just started replay long histories
    before they answer (the runbook runs this right after starting them), and a query to an
    entity whose worker is gone waits out the sticky timeout (10 s) first: hence `timeout`."""
    for entity_type in entity_types:
        await cache.new_epoch(entity_type)
    work = [(t, i) for t in entity_types for i in await entity_ids(client, t, where)]
    done = Reindexed(found=len(work))
    total, finished = len(work), 0

    async def one_at_a_time(pending: Iterator[tuple[str, str]], failed: list[str]) -> None:
        nonlocal finished
        for entity_type, entity_id in pending:
            try:
                snapshot = await snapshot_of(client, entity_type, entity_id, timeout)
                announced = _announced(snapshot, ended_retention) if snapshot else None
                if snapshot is not None and await cache.put(snapshot, announced):
                    done.written += 1
                finished += 1
            except (RPCError, TimeoutError, CacheUnavailable):
                failed.append(f"{entity_type}:{entity_id}")
            except Exception as exc:  # its own failure (a query its code failed) ends no other
                log.warning("%s:%s could not be read: %r", entity_type, entity_id, exc)
                failed.append(f"{entity_type}:{entity_id}")
            if progress is not None:
                progress(finished, total)

    for round_ in range(max(1, rounds)):
        if round_:
            await asyncio.sleep(pause)
        failed: list[str] = []
        pending = iter(work)
        await asyncio.gather(*(one_at_a_time(pending, failed) for _ in range(max(1, concurrency))))
        if not failed:
            break
        work = [(t, i) for t, _, i in (name.partition(":") for name in failed)]
    done.failed = failed
    return done
