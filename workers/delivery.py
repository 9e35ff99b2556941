"""Delivering a command to an entity and awaiting its outcome: the one path by which the API
gateway and the request activity (one entity asking another) reach an entity.

A command whose sender waits goes as an update (`EntityWorkflow.apply`): one round trip where
a signal and then a query take two; one that creates its entity starts it with the update
(update-with-start), where a start with a signal and then a query took two. Temporal takes
at most 10 updates in flight per workflow and 2,000 per run, and an entity whose run began
under older code has no `apply`; so when the update is refused, the command goes by signal
and its outcome is queried, as it always was.
Both paths are safe to take for one command: the entity applies a command id once.

Temporal's client retries a refused update in the background for up to 10 s, whether or not
anyone still waits for it; under load those retries clogged a process's connection until no
signal got through either (the soak saw it). So a process never sends one entity more than
MAX_UPDATES_IN_FLIGHT updates at a time, far under Temporal's 10: the commands that come
meanwhile wait and go together in the next (`apply_batch`, workers/update_lanes.py). After
an update to an entity is refused or goes unanswered the process sends that entity signals
only, for a while: busy entities get their waited commands coalesced into signals, as
before updates."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.entity import EntityType
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandResult,
    CommandResults,
    EntityRunInput,
    OutcomeStatus,
    same_sender,
    sender_key,
)
from entities.runtime.workflow import COMMAND_SIGNAL, MAX_BATCH, EntityWorkflow
from workers.backpressure import EntityBackpressure
from workers.coalescing import SignalCoalescer
from workers.failures import is_missing, unavailable
from workers.settings import Settings
from workers.temporal import ask, within
from workers.update_lanes import UpdateLanes

log = logging.getLogger(__name__)

SIGNAL_TIMEOUT = 5.0
SIGNAL_RESERVE = 2.0
"""Of a waited command's time, what is kept for sending it by signal when its update goes
unanswered, so that the sender has its answer within the wait."""
OUTCOME_FLOOR = 0.5
"""The least time an outcome is asked for, however little of the sender's wait is left."""
OUTCOME_ATTEMPTS = 5
MAX_UPDATES_IN_FLIGHT = 2
"""Updates one process has in flight to one entity; the commands that come meanwhile wait
and go together in the next."""
MAX_WAITING = 512
"""Waited commands that may wait for an entity's next update in one process; more go by
signal."""
SIGNALS_ONLY_SECONDS = 30.0
"""How long an entity whose update was refused or went unanswered gets signals only."""
MAX_SIGNALS_ONLY = 4096
"""Entities remembered as getting signals only; the oldest are forgotten first."""


@dataclass(frozen=True)
class _Waited:
    """A waited command on its way to its entity by update (`_by_update`, `UpdateLanes`)."""

    entity: EntityType[Any, Any]
    entity_id: str
    envelope: CommandEnvelope


class EntityClosed(TenureError):
    """The entity's workflow has finished: it takes no more commands."""

    def __init__(self, entity: EntityType[Any, Any], entity_id: str) -> None:
        super().__init__(ErrorCode.INVALID_TRANSITION, f"{entity.name} {entity_id} is closed")


async def sender_outcome(
    outcome_of: Callable[[str], Awaitable[CommandResult]],
    command_id: str,
    sender: str | None,
    unknown_too: bool = False,
) -> CommandResult:
    """What became of `sender`'s command `command_id`, each id asked with `outcome_of`: under
    its id, or, when another sender's command holds that id (or, `unknown_too`, the id is not
    known: its first holder forgotten), under the sender's own (`sender_key`), as the entity
    records it then."""
    result = await outcome_of(command_id)
    outcome = result.outcome
    if sender is None:
        return result
    if outcome.status is OutcomeStatus.UNKNOWN:
        if not unknown_too:
            return result
    elif same_sender(outcome.sent_by, sender):
        return result
    own = await outcome_of(sender_key(sender, command_id))
    if outcome.status is not OutcomeStatus.UNKNOWN:
        return own  # the id is another sender's: this one's, not known yet, is asked again
    return own if own.outcome.status is not OutcomeStatus.UNKNOWN else result


class CommandDelivery:
    """Signals commands to entity workflows, starting those a command creates, and reads
    back what became of them. `on_signal` is told how many commands each signal carries."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        on_signal: Callable[[int], None] | None = None,
        on_update_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._settings = settings
        self._coalescer = SignalCoalescer(self._signal)
        self._backpressure = EntityBackpressure(client, settings.entity_history_limit_bytes)
        self._on_signal = on_signal
        self._on_update_refused = on_update_refused
        self._signals_only: OrderedDict[str, float] = OrderedDict()
        self._lanes = UpdateLanes[_Waited, CommandResult](
            self._by_update, MAX_UPDATES_IN_FLIGHT, MAX_BATCH, MAX_WAITING
        )

    async def _signal(self, workflow_id: str, batch: list[CommandEnvelope]) -> None:
        if self._on_signal is not None:
            self._on_signal(len(batch))
        handle = self._client.get_workflow_handle(workflow_id)
        timeout = timedelta(seconds=SIGNAL_TIMEOUT)
        if len(batch) == 1:
            await within(
                SIGNAL_TIMEOUT,
                handle.signal(EntityWorkflow.command, args=[batch[0]], rpc_timeout=timeout),
            )
        else:
            # The workflow takes the list raw and decodes it at its turn (Backlog): `args`,
            # since the handler's declared parameter is that raw payload, not the list.
            sent = handle.signal(EntityWorkflow.commands, args=[batch], rpc_timeout=timeout)
            await within(SIGNAL_TIMEOUT, sent)

    def start_input(self, entity_type: str, entity_id: str) -> EntityRunInput:
        return EntityRunInput(
            entity_id=entity_id,
            runtime=self._settings.runtime,
            options=self._settings.entity_options.get(entity_type, {}),
        )

    async def deliver(
        self, entity: EntityType[Any, Any], entity_id: str, envelope: CommandEnvelope
    ) -> WorkflowHandle[Any, Any]:
        """Hand the command to Temporal, durably; its outcome may not be known yet."""
        workflow_id = entity.workflow_id(entity_id)
        try:
            # Creating commands too: a restock, every stock receipt's, floods an item as
            # a deposit floods an account (an entity not there yet is not behind).
            await self._backpressure.admit(workflow_id, f"{entity.name} {entity_id}")
            if entity.spec(envelope.name).creates:
                return await self._client.start_workflow(
                    catalog.workflow_for(entity.name).run,  # type: ignore[attr-defined]
                    self.start_input(entity.name, entity_id),
                    id=workflow_id,
                    task_queue=self._settings.task_queue,
                    start_signal=COMMAND_SIGNAL,
                    start_signal_args=[envelope],
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                    rpc_timeout=timedelta(seconds=SIGNAL_TIMEOUT),
                )
            await self._coalescer.send(workflow_id, envelope)
            return self._client.get_workflow_handle(workflow_id)
        except WorkflowAlreadyStartedError:
            raise EntityClosed(entity, entity_id) from None
        except RPCError as exc:
            if is_missing(exc):
                status = await self._status(workflow_id)
                if status is None:
                    raise TenureError(
                        ErrorCode.NOT_FOUND, f"{entity.name} {entity_id} does not exist"
                    ) from None
                if status is not WorkflowExecutionStatus.RUNNING:
                    raise EntityClosed(entity, entity_id) from None
                # Started meanwhile (an open racing this command): it was not sent.
                raise TenureError(
                    ErrorCode.UNAVAILABLE,
                    f"{entity.name} {entity_id} was starting; nothing was stored; retry with "
                    "the same idempotencyKey",
                ) from None
            raise unavailable(exc) from exc

    async def _status(self, workflow_id: str) -> WorkflowExecutionStatus | None:
        """The status of the workflow's latest run; None if there is none. A Temporal that
        cannot tell is UNAVAILABLE, not a workflow missing (NOT_FOUND, for good)."""
        try:
            description = await self._client.get_workflow_handle(workflow_id).describe(
                rpc_timeout=timedelta(seconds=SIGNAL_TIMEOUT)
            )
        except RPCError as exc:
            if is_missing(exc):
                return None
            raise unavailable(exc) from exc
        return description.status

    async def await_outcome(
        self,
        handle: WorkflowHandle[Any, Any],
        envelope: CommandEnvelope,
        deadline: float | None = None,
    ) -> CommandResult:
        """The command's outcome with the state after it; UNAVAILABLE while not known (or
        past the sender's `deadline`), IDEMPOTENCY_KEY_REUSED when its id belongs to
        another command."""
        # Queries are strongly consistent: one sent after the signal was accepted sees it
        # applied, unless the entity holds it back behind a backlog (entities/runtime/
        # backlog.py). UNKNOWN means that, or a signal still being delivered: ask again
        # briefly, then tell the sender to retry with the same key.
        for attempt in range(OUTCOME_ATTEMPTS):
            last = attempt == OUTCOME_ATTEMPTS - 1
            result = await self._outcome_of(handle, envelope, unknown_too=last, deadline=deadline)
            if result.outcome.status is not OutcomeStatus.UNKNOWN:
                return _of_this_command(envelope, result)
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05 * (attempt + 1))
        raise not_yet_applied(envelope)

    async def _outcome_of(
        self,
        handle: WorkflowHandle[Any, Any],
        envelope: CommandEnvelope,
        unknown_too: bool = True,
        deadline: float | None = None,
    ) -> CommandResult:
        """What became of this sender's command: under its id, or, when another sender's
        command holds that id (or, `unknown_too`, the id is not known: its first holder
        forgotten), under the sender's own (`sender_key`), as the entity records it then.
        Not known is most often not applied yet: asked again, it is looked up once more
        only at the last asking."""
        return await sender_outcome(
            lambda command_id: self._outcome(handle, command_id, deadline),
            envelope.command_id,
            envelope.sent_by,
            unknown_too,
        )

    async def _outcome(
        self, handle: WorkflowHandle[Any, Any], command_id: str, deadline: float | None = None
    ) -> CommandResult:
        """The outcome the entity records under `command_id`, asked within the sender's
        `deadline` (at least OUTCOME_FLOOR), else within the whole wait: each of several
        asks took the whole wait, and a waited command ran to twice its bound and more."""
        seconds = self._settings.command_wait_timeout
        if deadline is not None:
            seconds = min(seconds, max(deadline - time.monotonic(), OUTCOME_FLOOR))
        try:
            result = await ask(
                handle,
                EntityWorkflow.outcome,
                command_id,
                result_type=CommandResult,
                seconds=seconds,
            )
        except RPCError as exc:
            raise TenureError(
                ErrorCode.UNAVAILABLE,
                f"command {command_id} was accepted but its outcome is not known yet "
                "(the entity is not answering); retry with the same idempotencyKey",
            ) from exc
        return result

    async def request(
        self, entity: EntityType[Any, Any], entity_id: str, envelope: CommandEnvelope
    ) -> CommandResult:
        """Deliver a command and wait for its outcome. Safe to repeat: when the entity has
        finished since, perhaps because of this very command, its recorded outcome stands."""
        workflow_id = entity.workflow_id(entity_id)
        deadline = time.monotonic() + self._settings.command_wait_timeout
        if self._may_update(workflow_id):
            # Waiting for a turn keeps the last SIGNAL_RESERVE of the wait for the signal. A
            # command that creates its entity never waits: it goes alone (update-with-start)
            # or by signal, since a batch goes to an entity that runs already.
            creates = entity.spec(envelope.name).creates
            result = await self._lanes.request(
                workflow_id,
                _Waited(entity, entity_id, envelope),
                deadline,
                wait_until=time.monotonic() if creates else deadline - SIGNAL_RESERVE,
            )
            if result is not None:
                return _of_this_command(envelope, result)
        try:
            # Within the wait on this path too: an update refused at once (a frozen Temporal
            # can answer UNAVAILABLE) left the signal its own 5 s.
            handle = await self._deliver_by(deadline, entity, entity_id, envelope)
        except EntityClosed:
            ended = await self._ended_outcome(entity, entity_id, envelope, deadline)
            if ended is None:
                raise
            return _of_this_command(envelope, ended)
        return await self.await_outcome(handle, envelope, deadline)

    async def _ended_outcome(
        self,
        entity: EntityType[Any, Any],
        entity_id: str,
        envelope: CommandEnvelope,
        deadline: float,
    ) -> CommandResult | None:
        """What an entity that has ended recorded of this sender's command, when its sending
        was refused as too late: the outcome of its first sending (perhaps the very command
        that ended it), or None when it never took it; one it cannot tell in time is
        UNAVAILABLE (`_outcome`)."""
        handle = self._client.get_workflow_handle(entity.workflow_id(entity_id))
        result = await self._outcome_of(handle, envelope, deadline=deadline)
        return None if result.outcome.status is OutcomeStatus.UNKNOWN else result

    def _may_update(self, workflow_id: str) -> bool:
        until = self._signals_only.get(workflow_id)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        del self._signals_only[workflow_id]
        return True

    async def _by_update(
        self, workflow_id: str, commands: Sequence[_Waited], deadline: float
    ) -> list[CommandResult | Exception | None]:
        """The commands applied as one update to their entity (`apply`, or `apply_batch` for
        several: `UpdateLanes`), each with its outcome; None for each when the update was
        refused (too many in flight, an entity on older code, a closed or missing one), and
        the commands are to go by signal. A command that creates its entity starts it with
        the update as its first work, unless it runs already (update-with-start). An update
        that gets no answer in time is no longer waited for: the commands go by signal,
        durably, and each sender is told to retry (an error for each); both within the
        senders' wait (`deadline`), the signal given the last `SIGNAL_RESERVE` of it, and at
        least a second."""
        left = deadline - time.monotonic()
        timeout = max(left - min(SIGNAL_RESERVE, left / 2), 0.1)
        rpc_timeout = timedelta(seconds=timeout)
        start: WithStartWorkflowOperation[Any, Any] | None = None
        handle = self._client.get_workflow_handle(workflow_id)
        answered: Awaitable[CommandResult | CommandResults]
        if len(commands) > 1:
            answered = handle.execute_update(
                EntityWorkflow.apply_batch,
                [command.envelope for command in commands],
                rpc_timeout=rpc_timeout,
            )
        elif commands[0].entity.spec(commands[0].envelope.name).creates:
            (one,) = commands
            start = WithStartWorkflowOperation(
                catalog.workflow_for(one.entity.name).run,  # type: ignore[attr-defined]
                self.start_input(one.entity.name, one.entity_id),
                id=workflow_id,
                task_queue=self._settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            )
            answered = self._client.execute_update_with_start_workflow(
                EntityWorkflow.apply,
                one.envelope,
                start_workflow_operation=start,
                rpc_timeout=rpc_timeout,
            )
        else:
            answered = handle.execute_update(
                EntityWorkflow.apply, commands[0].envelope, rpc_timeout=rpc_timeout
            )
        try:
            try:
                answer = await within(timeout, answered)
            finally:
                if start is not None:
                    _take_start_error(start)
            return list(answer.results()) if isinstance(answer, CommandResults) else [answer]
        except WorkflowAlreadyStartedError:  # it has ended: the signal path says how
            self._refused(workflow_id, "ended")
            return [None] * len(commands)
        except WorkflowUpdateFailedError:
            self._refused(workflow_id, "failed")
            return [None] * len(commands)
        except RPCError as exc:
            if exc.status is not RPCStatusCode.DEADLINE_EXCEEDED:
                self._refused(workflow_id, exc.status.name.lower() if exc.status else "unknown")
                return [None] * len(commands)
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            pass
        self._refused(workflow_id, "timed_out")
        sent = await asyncio.gather(
            *(self._after_the_update(deadline, command) for command in commands),
            return_exceptions=True,
        )
        return [
            answer if isinstance(answer, Exception | CommandResult) else not_yet_applied(c.envelope)
            for c, answer in zip(commands, sent, strict=True)
        ]

    async def _after_the_update(self, deadline: float, command: _Waited) -> CommandResult | None:
        """A command whose update went unanswered sent again by signal: None once sent. The
        update may apply all the same, so a send that fails is no refusal of the command
        (the entity behind: "nothing was stored"; closed, by this very command): the
        sender is told its outcome, when the entity knows it, or to retry with its key."""
        envelope = command.envelope
        try:
            await self._deliver_by(deadline, command.entity, command.entity_id, envelope)
        except EntityClosed:
            ended = await self._ended_outcome(command.entity, command.entity_id, envelope, deadline)
            if ended is None:
                raise not_yet_applied(envelope) from None
            return ended
        except TenureError as exc:
            if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_INPUT):
                raise  # the update cannot have applied either
            raise TenureError(
                ErrorCode.UNAVAILABLE,
                f"command {envelope.command_id} may have been applied: its update went "
                "unanswered, and sending it again failed; retry with the same idempotencyKey",
            ) from exc
        return None

    async def _deliver_by(
        self,
        deadline: float,
        entity: EntityType[Any, Any],
        entity_id: str,
        envelope: CommandEnvelope,
    ) -> WorkflowHandle[Any, Any]:
        """`deliver`, given up at the sender's `deadline` (UNAVAILABLE), but given at least a
        second: a Temporal merely slow still takes the command."""
        left = max(deadline - time.monotonic(), 1.0)
        try:
            return await within(left, self.deliver(entity, entity_id, envelope))
        except RPCError as exc:
            raise unavailable(exc) from exc

    def _refused(self, workflow_id: str, reason: str) -> None:
        self._signals_only[workflow_id] = time.monotonic() + SIGNALS_ONLY_SECONDS
        self._signals_only.move_to_end(workflow_id)
        while len(self._signals_only) > MAX_SIGNALS_ONLY:
            self._signals_only.popitem(last=False)
        if self._on_update_refused is not None:
            self._on_update_refused(reason)


def _take_start_error(start: WithStartWorkflowOperation[Any, Any]) -> None:
    """Take a failed start's error off its operation. The SDK leaves it on the operation's
    future when an update-with-start fails before the start (an ended entity, a server that
    refuses multi-operations, a timeout), and asyncio logs a future whose error nobody took
    as an ERROR ("Future exception was never retrieved")."""
    future = start._workflow_handle  # the SDK's own: its public reader would wait on it
    if future.done() and not future.cancelled():
        future.exception()


def not_yet_applied(envelope: CommandEnvelope) -> TenureError:
    return TenureError(
        ErrorCode.UNAVAILABLE,
        f"command {envelope.command_id} was accepted but not yet applied; "
        "retry with the same idempotencyKey",
    )


def _of_this_command(envelope: CommandEnvelope, result: CommandResult) -> CommandResult:
    """`result`, if it is the outcome of this very command and not of an earlier one that
    came with the same id (the entity applied that one and ignored this one), and the
    command's fate is known: an outcome UNKNOWN is no answer (the sender retries)."""
    if result.outcome.status is OutcomeStatus.UNKNOWN:
        raise not_yet_applied(envelope)
    recorded = result.outcome.fingerprint
    if recorded is not None and recorded != envelope.fingerprint:
        raise TenureError(
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            f"idempotencyKey {envelope.command_id} was already used for a different command "
            f"to {result.snapshot.entity_type} {result.snapshot.entity_id}; this one was not "
            "applied: send it with a new key",
        )
    return result
