"""The gateway between the API and the entities: commands as signals, reads cached or live."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.errors import TooManyQueries
from api.metrics import ApiMetrics
from entities import catalog
from entities.errors import ErrorCode, Rejected, TenureError
from entities.runtime.entity import ENTITY_ID_PATTERN, EntityType
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandHistory,
    CommandResult,
    HistoryPage,
    OutcomeStatus,
    Snapshot,
    same_sender,
)
from entities.runtime.workflow import EntityWorkflow
from workers.cache import CachedSnapshot, CacheUnavailable, SnapshotCache
from workers.delivery import CommandDelivery, EntityClosed, sender_outcome
from workers.failures import is_missing, may_have_taken_it, unavailable
from workers.handovers import Handovers, hand_back
from workers.settings import Settings
from workers.temporal import ask, within


class MayHaveStarted(TenureError):
    """Temporal did not answer a workflow's start in time: it may have started."""

    def __init__(self) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE,
            "the entity service did not answer in time; it may have started",
        )


log = logging.getLogger(__name__)

ENTITY_ID = re.compile(ENTITY_ID_PATTERN)
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
M = TypeVar("M", bound=BaseModel)


class QueryBudget:
    """The queries to entity workflows one request may still make. Each request sets its
    own (`QUERY_BUDGET`, a context variable, so every resolver of the request shares it and
    no other request sees it); the gateway spends from it before each query."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit
        self.waited_for_a_start = False
        """Whether the request has waited for a checkout being started (`api.checkouts`),
        which it may do once: those asks are not spent from the budget."""

    def spend(self) -> None:
        if self.left <= 0:
            raise TooManyQueries(self.limit)
        self.left -= 1


QUERY_BUDGET: ContextVar[QueryBudget | None] = ContextVar("tenure_query_budget", default=None)


@contextlib.contextmanager
def unbudgeted() -> Iterator[None]:
    """Queries made inside are not charged to the request's budget: those a bound of their
    own already limits (one a mutation, and a request has few)."""
    token = QUERY_BUDGET.set(None)
    try:
        yield
    finally:
        QUERY_BUDGET.reset(token)


def _spend_a_query() -> None:
    budget = QUERY_BUDGET.get()
    if budget is not None:
        budget.spend()


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
class CacheLookup:
    """An entity's cache entry as already looked up: None when the cache had none or could
    not be read (the read then goes to the workflow without asking the cache again)."""

    entry: CachedSnapshot | None


@dataclass(frozen=True)
class Receipt:
    """What a client learns about its command: accepted, or applied with the state after it."""

    entity_id: str
    command_id: str
    applied: bool
    read: EntityRead | None = None
    revision: int | None = None
    """The revision the command made, from its recorded outcome: a repeat's is the first's."""


def check_idempotency_key(idempotency_key: str) -> None:
    if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            "idempotencyKey is 1 to 128 printable ASCII characters, no spaces",
        )


def check_entity_id(entity_id: str) -> str:
    if not ENTITY_ID.fullmatch(entity_id):  # `$` alone lets a trailing newline through
        raise TenureError(
            ErrorCode.INVALID_INPUT,
            "an id is 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return entity_id


READ_SINCE_PAUSES = (0.02, 0.05, 0.1, 0.2)
"""Pauses between reads of the cache for the state a command made, before the entity is
asked: its publish follows the command within milliseconds, unless the worker is busy."""


MAY_HAVE_APPLIED = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL})
"""The errors of a waited command that may have been applied, and its publish handed to a
sender that never got the answer: its promise is left to be taken up."""
CHORES_WAIT = 2.0
"""Seconds the gateway's closing waits for what answered commands left to do."""


class EntityGateway:
    """Sends commands to entities and reads their state; the only API code that talks to
    Temporal or Redis."""

    def __init__(
        self,
        client: Client,
        cache: SnapshotCache,
        settings: Settings,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self._client = client
        self._cache = cache
        self._settings = settings
        self._metrics = metrics or ApiMetrics()
        self._types = catalog.entity_types()
        self._handovers = Handovers(cache.client, cache.prefix)
        self._chores: set[asyncio.Task[Any]] = set()
        self._delivery = CommandDelivery(
            client,
            settings,
            on_signal=self._metrics.signal_batch_size.observe,
            on_update_refused=lambda reason: self._metrics.update_refusals.labels(reason).inc(),
        )

    async def aclose(self) -> None:
        """Finish what answered commands left to do (promises kept, publishes handed back),
        for at most CHORES_WAIT seconds: what is not done by then is taken up by a worker
        (workers/handovers.py)."""
        await self._handovers.aclose(CHORES_WAIT)
        if self._chores:
            await asyncio.wait(self._chores, timeout=CHORES_WAIT)

    @property
    def cache(self) -> SnapshotCache:
        return self._cache

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def client(self) -> Client:
        """The Temporal client, for what is not an entity (a checkout's operator tools)."""
        return self._client

    def entity(self, entity_type: str) -> EntityType[Any, Any]:
        return self._types[entity_type]

    # -- commands -------------------------------------------------------------------------

    def checked(
        self,
        entity_type: str,
        entity_id: str,
        command: str,
        payload: Mapping[str, Any],
        idempotency_key: str | None = None,
    ) -> EntityType[Any, Any]:
        """The entity type, once the command is one it would take as sent: its id, its key
        and its payload, as `send` checks them before anything is stored; raises the
        refusal (INVALID_INPUT, or the command's own code)."""
        entity = self.entity(entity_type)
        check_entity_id(entity_id)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        try:
            entity.parse(command, payload)
        except Rejected as exc:
            raise TenureError(exc.code, exc.message) from None
        return entity

    async def send(
        self,
        entity_type: str,
        entity_id: str,
        command: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        wait: bool = False,
        sent_by: str | None = None,
        fingerprint: str | None = None,
    ) -> Receipt:
        """Deliver one command. With `wait`, return the state after it was applied, or raise
        its rejection; without, return as soon as Temporal has durably accepted it.
        `fingerprint` is the command's, when not its whole payload's."""
        entity = self.checked(entity_type, entity_id, command, payload, idempotency_key)
        command_id = idempotency_key or str(uuid.uuid4())
        structlog.contextvars.bind_contextvars(command_id=command_id)
        # A waited command's answer is written to the cache here anyway: the entity hands
        # over its publish with it, once a promise to publish is noted (workers/handovers.py).
        workflow_id = entity.workflow_id(entity_id)
        promise = await self._handovers.promise(workflow_id, command_id, sent_by) if wait else None
        envelope = CommandEnvelope(
            command_id=command_id,
            name=command,
            payload=payload,
            sent_by=sent_by,
            reads_large_state=True,
            publishes=promise is not None,
            fingerprint=fingerprint,
        )
        if not wait:
            try:
                await self._delivery.deliver(entity, entity_id, envelope)
            except EntityClosed:
                if idempotency_key is None or not await self._took_before_it_ended(
                    entity, entity_id, envelope
                ):
                    raise
                log.info("%s: a repeat of a command it took before it ended", workflow_id)
            return Receipt(entity_id, envelope.command_id, applied=False)
        try:
            result = await self._delivery.request(entity, entity_id, envelope)
        except TenureError as exc:
            if promise is not None and exc.code not in MAY_HAVE_APPLIED:
                # Refused before it was applied, or not this send's command (a key reused,
                # which makes the entity publish): nothing was handed to it.
                self._chore(self._handovers.kept(promise))
            raise
        newest = await self._publish(workflow_id, result, promise)
        read = EntityRead(newest, Source.LIVE, False) if newest is not None else None
        if result.outcome.status is OutcomeStatus.REJECTED:
            raise TenureError(
                ErrorCode(result.outcome.code or ErrorCode.INTERNAL),
                result.outcome.message or "command rejected",
            )
        if result.snapshot.state_omitted:
            read = await self._read_since(entity_type, entity_id, result.snapshot)
            if read is None:
                raise TenureError(
                    ErrorCode.UNAVAILABLE,
                    f"command {envelope.command_id} was applied (revision "
                    f"{result.outcome.revision}), but the state after it could not be read in "
                    "time: read the entity (sending it again with the same idempotencyKey is "
                    "safe)",
                )
        return Receipt(
            entity_id,
            envelope.command_id,
            applied=True,
            read=read,
            revision=result.outcome.revision,
        )

    async def _took_before_it_ended(
        self, entity: EntityType[Any, Any], entity_id: str, envelope: CommandEnvelope
    ) -> bool:
        """Whether a command refused because its entity has ended repeats one the entity
        took from its sender before: a client's retry of the command that closed it, or a
        provider's repeat of the event that did, is answered as the first was (ACCEPTED,
        whatever the entity made of it, as a running entity answers a repeat), where "is
        closed" told a client it failed and had a provider retry for days and flag the
        endpoint. Asked as a read is, within the live-read timeout and from the request's
        query budget; when it cannot tell in time (its history not replayed, no worker, a
        query failure), the refusal stands, as before."""
        try:
            return await self.recorded(
                entity.name, entity_id, envelope.command_id, envelope.sent_by
            )
        except TenureError as exc:
            failure: Exception = exc
        except WorkflowQueryFailedError as exc:
            failure = exc
        log.warning("%s %s ended: could not tell a repeat: %s", entity.name, entity_id, failure)
        return False

    async def _publish(
        self, workflow_id: str, result: CommandResult, promise: str | None
    ) -> Snapshot | None:
        """Write a waited command's answer to the cache, with the changes its entity handed
        over when it did, and keep the promise (in the background, off the answer's way):
        the newest state known of the entity, or None when the answer left it out. What the
        cache could not take is handed back to the entity to publish."""
        publication = result.publication()
        if publication is None:  # the entity publishes it itself
            if promise is not None:
                self._chore(self._handovers.kept(promise))
            if result.snapshot.state_omitted:
                return None
            return await self._cache.put_newest(result.snapshot)
        newest, written = await self._cache.publish_newest(publication)
        if written:
            if promise is not None:
                self._chore(self._handovers.kept(promise))
        else:
            self._chore(self._hand_back(workflow_id))
        return newest

    async def _hand_back(self, workflow_id: str) -> None:
        """Ask the entity to publish what the cache could not take; if Temporal cannot be
        reached either, the promise left noted is taken up later (workers/handovers.py)."""
        try:
            await hand_back(self._client, workflow_id)
        except RPCError as exc:
            log.warning("%s: a publish left to a worker to take up later: %s", workflow_id, exc)

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _read_since(
        self, entity_type: str, entity_id: str, seen: Snapshot
    ) -> EntityRead | None:
        """The entity at `seen`'s revision or later, for an answer that left its large state
        out: from the cache once the entity's publish, which follows the command, has
        reached it, else from the entity; None when neither can tell in time (the command's
        outcome stands all the same)."""
        current = (seen.incarnation, seen.revision)
        for pause in READ_SINCE_PAUSES:
            cached = await self._cached(entity_type, entity_id)
            if (
                cached is not None
                and (cached.snapshot.incarnation, cached.snapshot.revision) >= current
            ):
                return cached
            await asyncio.sleep(pause)
        try:
            read = await self.read(entity_type, entity_id, Consistency.LIVE)
        except (TenureError, TooManyQueries):  # out of reach, or the request's reads spent
            return None
        if (
            read is None
            or read.stale
            or (read.snapshot.incarnation, read.snapshot.revision) < current
        ):
            return None
        return read

    # -- reads ----------------------------------------------------------------------------

    async def read(
        self,
        entity_type: str,
        entity_id: str,
        consistency: Consistency = Consistency.CACHED,
        *,
        looked_up: CacheLookup | None = None,
    ) -> EntityRead | None:
        """The entity's state: from the cache when allowed and present, else from the
        workflow; the cached copy marked stale when the workflow cannot answer.
        `looked_up` is the entity's cache entry when the caller has already read it."""
        entity = self.entity(entity_type)
        check_entity_id(entity_id)
        cached = None
        if consistency is Consistency.CACHED:
            if looked_up is not None:
                cached = self._from_cache(looked_up.entry) if looked_up.entry else None
            else:
                cached = await self._cached(entity_type, entity_id)
            if cached is not None:
                self._metrics.cache_read("stale" if cached.stale else "hit")
                return cached
            self._metrics.cache_read("miss")
        handle = self._client.get_workflow_handle(entity.workflow_id(entity_id))
        try:
            snapshot = await self._ask(handle, EntityWorkflow.snapshot, Snapshot)
        except RPCError as exc:
            fallback = cached
            if fallback is None and looked_up is None:
                fallback = await self._cached(entity_type, entity_id)
            if fallback is not None:
                self._metrics.live_read_fallbacks.inc()
                return EntityRead(
                    fallback.snapshot, Source.CACHE, stale=True, cached_at=fallback.cached_at
                )
            if is_missing(exc):
                return None
            raise unavailable(exc) from exc
        if snapshot.state is None:
            return None
        return EntityRead(await self._cache.put_newest(snapshot), Source.LIVE, stale=False)

    async def history(
        self, entity_type: str, entity_id: str, page: HistoryPage
    ) -> CommandHistory | None:
        """The entity's recent commands, asked of its workflow; None when it never existed."""
        entity = self.entity(entity_type)
        check_entity_id(entity_id)
        handle = self._client.get_workflow_handle(entity.workflow_id(entity_id))
        try:
            history = await self._ask(handle, EntityWorkflow.history, CommandHistory, page)
        except RPCError as exc:
            if is_missing(exc):
                return None
            raise unavailable(exc) from exc
        return history

    async def recorded(
        self, entity_type: str, entity_id: str, command_id: str, sent_by: str | None
    ) -> bool:
        """Whether the entity has recorded an outcome of `sent_by`'s command `command_id`
        (a retry's first sending): asked of its workflow, under the id and, when another
        sender's command holds it, under the sender's own."""
        entity = self.entity(entity_type)
        handle = self._client.get_workflow_handle(entity.workflow_id(entity_id))

        async def outcome_of(each: str) -> CommandResult:
            return await self._ask(handle, EntityWorkflow.outcome, CommandResult, each)

        try:
            result = await sender_outcome(outcome_of, command_id, sent_by, unknown_too=True)
        except RPCError as exc:
            if is_missing(exc):
                return False
            raise unavailable(exc) from exc
        outcome = result.outcome
        return outcome.status is not OutcomeStatus.UNKNOWN and same_sender(outcome.sent_by, sent_by)

    async def read_workflow(
        self, workflow_id: str, query: Callable[..., M], result_type: type[M]
    ) -> M | None:
        """A workflow that is not an entity (a saga): its answer to `query`, else, when no
        worker can answer, its result if it has finished; None when it never existed."""
        handle = self._client.get_workflow_handle(workflow_id, result_type=result_type)
        seconds = self._settings.live_read_timeout
        timeout = timedelta(seconds=seconds)
        try:
            value = await self._ask(handle, query, result_type)
        except RPCError as exc:
            if is_missing(exc):
                return None
            try:
                description = await within(seconds, handle.describe(rpc_timeout=timeout))
                if description.status is not WorkflowExecutionStatus.COMPLETED:
                    raise unavailable(exc) from exc
                result: M = await within(seconds, handle.result(rpc_timeout=timeout))
                return result
            except RPCError as again:
                raise unavailable(again) from again
        return value

    async def start_workflow(
        self, workflow: str, input: BaseModel, workflow_id: str, *, bulk: bool = False
    ) -> bool:
        """Start a workflow that is not an entity (a webhook delivery; with `bulk`, a bulk
        command, on the bulk commands' task queue) unless one with its id runs or ran
        already: True when this call started it."""
        queue = self._settings.bulk_task_queue if bulk else self._settings.task_queue
        seconds = self._settings.live_read_timeout
        try:
            await within(
                seconds,
                self._client.start_workflow(
                    workflow,
                    input,
                    id=workflow_id,
                    task_queue=queue,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    rpc_timeout=timedelta(seconds=seconds),
                ),
            )
        except WorkflowAlreadyStartedError:
            return False
        except RPCError as exc:
            refused = unavailable(exc)  # logged as any other
            if not may_have_taken_it(exc):
                raise refused from exc
            # Temporal may have started it and not answered in time: said plainly, since a
            # caller told only "unavailable" took it for not started.
            raise MayHaveStarted() from exc
        return True

    async def signal_workflow(
        self, workflow_id: str, signal: Callable[[Any, str | None], None], key: str | None
    ) -> bool:
        """Signal a workflow that is not an entity, with the caller's idempotency key; False
        when it does not run."""
        seconds = self._settings.live_read_timeout
        handle = self._client.get_workflow_handle(workflow_id)
        # Without a key it goes with no argument, as workers from before keys take it.
        args = () if key is None else (key,)
        sent = handle.signal(signal, *args, rpc_timeout=timedelta(seconds=seconds))
        try:
            await within(seconds, sent)
        except RPCError as exc:
            if is_missing(exc):
                return False
            raise unavailable(exc) from exc
        return True

    async def _ask(
        self,
        handle: WorkflowHandle[Any, Any],
        query: Callable[..., M] | str,
        result_type: type[M],
        *args: Any,
    ) -> M:
        """One query to a workflow: spent from the request's budget, and answered within
        the live-read timeout (a hard deadline: `rpc_timeout` alone is not one)."""
        _spend_a_query()
        return await ask(
            handle, query, *args, result_type=result_type, seconds=self._settings.live_read_timeout
        )

    async def _cached(self, entity_type: str, entity_id: str) -> EntityRead | None:
        try:
            hit = await self._cache.get(entity_type, entity_id)
        except CacheUnavailable as exc:
            log.warning("cache unavailable, reading live: %s", exc)
            return None
        return self._from_cache(hit) if hit is not None else None

    @staticmethod
    def _from_cache(hit: CachedSnapshot) -> EntityRead | None:
        if hit.snapshot.state is None:
            return None
        return EntityRead(
            hit.snapshot, Source.CACHE, stale=hit.stuck is not None, cached_at=hit.cached_at
        )
