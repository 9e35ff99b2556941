"""The gateway between the API and the entities: commands as signals, reads cached or live."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from entities import catalog
from entities.errors import ErrorCode, Rejected, TenureError
from entities.runtime.entity import EntityType
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandResult,
    EntityRunInput,
    OutcomeStatus,
    Snapshot,
)
from workers.cache import CacheUnavailable, SnapshotCache
from workers.settings import Settings

log = logging.getLogger(__name__)

ENTITY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
SIGNAL_TIMEOUT = 5.0
OUTCOME_ATTEMPTS = 5


class Source(StrEnum):
    CACHE = "CACHE"
    LIVE = "LIVE"


class Consistency(StrEnum):
    CACHED = "CACHED"
    LIVE = "LIVE"


@dataclass(frozen=True)
class EntityRead:
    """A snapshot with where it came from and whether it may be behind."""

    snapshot: Snapshot
    source: Source
    stale: bool
    cached_at: datetime | None = None


@dataclass(frozen=True)
class Receipt:
    """What a client learns about its command: accepted, or applied with the state after it."""

    entity_id: str
    command_id: str
    applied: bool
    read: EntityRead | None = None


def check_entity_id(entity_id: str) -> str:
    if not ENTITY_ID.match(entity_id):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            "an id is 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return entity_id


class EntityGateway:
    """Sends commands to entities and reads their state; the only API code that talks to
    Temporal or Redis."""

    def __init__(self, client: Client, cache: SnapshotCache, settings: Settings) -> None:
        self._client = client
        self._cache = cache
        self._settings = settings
        self._types = catalog.entity_types()

    def entity(self, entity_type: str) -> EntityType[Any, Any]:
        return self._types[entity_type]

    def start_input(self, entity_type: str, entity_id: str) -> EntityRunInput:
        return EntityRunInput(
            entity_id=entity_id,
            runtime=self._settings.runtime,
            options=self._settings.entity_options.get(entity_type, {}),
        )

    # -- commands -------------------------------------------------------------------------

    async def send(
        self,
        entity_type: str,
        entity_id: str,
        command: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        wait: bool = False,
    ) -> Receipt:
        """Deliver one command. With `wait`, return the state after it was applied, or raise
        its rejection; without, return as soon as Temporal has durably accepted it."""
        entity = self.entity(entity_type)
        check_entity_id(entity_id)
        if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
            raise TenureError(
                ErrorCode.INVALID_INPUT, "idempotencyKey is 1 to 128 printable ASCII characters"
            )
        try:
            entity.parse(command, payload)
        except Rejected as exc:
            raise TenureError(exc.code, exc.message) from None
        envelope = CommandEnvelope(
            command_id=idempotency_key or str(uuid.uuid4()), name=command, payload=payload
        )
        handle = await self._deliver(entity, entity_id, envelope)
        if not wait:
            return Receipt(entity_id, envelope.command_id, applied=False)
        result = await self._await_outcome(handle, envelope.command_id)
        await self._remember(result.snapshot)
        if result.outcome.status is OutcomeStatus.REJECTED:
            raise TenureError(
                ErrorCode(result.outcome.code or ErrorCode.INTERNAL),
                result.outcome.message or "command rejected",
            )
        read = EntityRead(result.snapshot, Source.LIVE, stale=False)
        return Receipt(entity_id, envelope.command_id, applied=True, read=read)

    async def _deliver(
        self, entity: EntityType[Any, Any], entity_id: str, envelope: CommandEnvelope
    ) -> WorkflowHandle[Any, Any]:
        workflow_id = entity.workflow_id(entity_id)
        try:
            if entity.commands[envelope.name].creates:
                return await self._client.start_workflow(
                    catalog.workflow_for(entity.name).run,  # type: ignore[arg-type]
                    self.start_input(entity.name, entity_id),
                    id=workflow_id,
                    task_queue=self._settings.task_queue,
                    start_signal="command",
                    start_signal_args=[envelope],
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                    rpc_timeout=timedelta(seconds=SIGNAL_TIMEOUT),
                )
            handle = self._client.get_workflow_handle(workflow_id)
            await handle.signal("command", envelope, rpc_timeout=timedelta(seconds=SIGNAL_TIMEOUT))
            return handle
        except WorkflowAlreadyStartedError:
            raise _closed(entity, entity_id) from None
        except RPCError as exc:
            if exc.status is RPCStatusCode.NOT_FOUND:
                if await self._has_completed(workflow_id):
                    raise _closed(entity, entity_id) from None
                raise TenureError(
                    ErrorCode.NOT_FOUND, f"{entity.name} {entity_id} does not exist"
                ) from None
            raise _unavailable(exc) from exc

    async def _has_completed(self, workflow_id: str) -> bool:
        try:
            await self._client.get_workflow_handle(workflow_id).describe(
                rpc_timeout=timedelta(seconds=SIGNAL_TIMEOUT)
            )
        except RPCError:
            return False
        return True

    async def _await_outcome(
        self, handle: WorkflowHandle[Any, Any], command_id: str
    ) -> CommandResult:
        # Queries are strongly consistent: one sent after the signal was accepted sees it
        # applied. UNKNOWN can only mean a signal still being delivered; ask again briefly.
        for attempt in range(OUTCOME_ATTEMPTS):
            try:
                result: CommandResult = await handle.query(
                    "outcome",
                    command_id,
                    result_type=CommandResult,
                    rpc_timeout=timedelta(seconds=self._settings.live_read_timeout),
                )
            except RPCError as exc:
                raise TenureError(
                    ErrorCode.UNAVAILABLE,
                    f"command {command_id} was accepted but its outcome is not known yet "
                    "(the entity is not answering); retry with the same idempotencyKey",
                ) from exc
            if result.outcome.status is not OutcomeStatus.UNKNOWN:
                return result
            await asyncio.sleep(0.05 * (attempt + 1))
        raise TenureError(
            ErrorCode.UNAVAILABLE,
            f"command {command_id} was accepted but not yet applied; "
            "retry with the same idempotencyKey",
        )

    # -- reads ----------------------------------------------------------------------------

    async def read(
        self, entity_type: str, entity_id: str, consistency: Consistency = Consistency.CACHED
    ) -> EntityRead | None:
        """The entity's state: from the cache when allowed and present, else from the
        workflow; the cached copy marked stale when the workflow cannot answer."""
        entity = self.entity(entity_type)
        check_entity_id(entity_id)
        cached = None
        if consistency is Consistency.CACHED:
            cached = await self._cached(entity_type, entity_id)
            if cached is not None:
                return cached
        handle = self._client.get_workflow_handle(entity.workflow_id(entity_id))
        try:
            snapshot: Snapshot = await handle.query(
                "snapshot",
                result_type=Snapshot,
                rpc_timeout=timedelta(seconds=self._settings.live_read_timeout),
            )
        except RPCError as exc:
            fallback = cached or await self._cached(entity_type, entity_id)
            if fallback is not None:
                return EntityRead(
                    fallback.snapshot, Source.CACHE, stale=True, cached_at=fallback.cached_at
                )
            if exc.status is RPCStatusCode.NOT_FOUND:
                return None
            raise _unavailable(exc) from exc
        if snapshot.state is None:
            return None
        await self._remember(snapshot)
        return EntityRead(snapshot, Source.LIVE, stale=False)

    async def _cached(self, entity_type: str, entity_id: str) -> EntityRead | None:
        try:
            hit = await self._cache.get(entity_type, entity_id)
        except CacheUnavailable as exc:
            log.warning("cache unavailable, reading live: %s", exc)
            return None
        if hit is None or hit.snapshot.state is None:
            return None
        return EntityRead(hit.snapshot, Source.CACHE, stale=False, cached_at=hit.cached_at)

    async def _remember(self, snapshot: Snapshot) -> None:
        try:
            await self._cache.put(snapshot)
        except CacheUnavailable as exc:
            log.warning("cache unavailable, not refreshed: %s", exc)


def _closed(entity: EntityType[Any, Any], entity_id: str) -> TenureError:
    return TenureError(ErrorCode.INVALID_TRANSITION, f"{entity.name} {entity_id} is closed")


def _unavailable(exc: RPCError) -> TenureError:
    log.warning("temporal unavailable: %s", exc)
    return TenureError(ErrorCode.UNAVAILABLE, "the entity service is unavailable; try again")
