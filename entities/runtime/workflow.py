"""The generic entity workflow: one long-lived actor per entity, driven by commands: signals,
or updates when the sender waits for the outcome."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta
from typing import Any, ClassVar, NoReturn

from temporalio import workflow
from temporalio.common import MetricCounter, RawValue, RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from entities.errors import ErrorCode, Rejected
    from entities.runtime.backlog import BOUNDED_TASKS_PATCH, NEXT_TASK_ACTIVITY, Backlog
    from entities.runtime.effects import (
        CHILDREN_CLOSE_FIRST,
        OTHER_RUNNING_SENDER,
        Effects,
        StartWorkflow,
        other_running_id,
    )
    from entities.runtime.entity import (
        RULES_1_PATCH,
        RULES_2_PATCH,
        RULES_3_PATCH,
        RULES_4_PATCH,
        RULES_5_PATCH,
        STRICT_INPUTS_2_PATCH,
        STRICT_INPUTS_3_PATCH,
        STRICT_INPUTS_4_PATCH,
        STRICT_INPUTS_PATCH,
        CommandContext,
        EntityType,
    )
    from entities.runtime.envelope import (
        MAX_COMMAND_NAME,
        CommandEnvelope,
        CommandHistory,
        CommandResult,
        CommandResults,
        EntityRunInput,
        HistoryPage,
        Outcome,
        OutcomeStatus,
        Publication,
        Snapshot,
        listed_as,
        outsized,
        same_sender,
        sender_key,
    )
    from entities.runtime.inbox import (
        COMMAND_ID,
        COMMAND_ID_RULE,
        Received,
        Unreadable,
        read_command,
        read_commands,
    )
    from entities.runtime.ledger import Ledger, json_size
    from entities.runtime.patches import PatchSet
    from entities.runtime.publisher import (
        PUBLISH_BY_ACTIVITY,
        PUBLISH_OFFERS,
        PUBLISH_SIGNAL,
        SnapshotPublisher,
    )


MAX_PUBLISHED_CHANGES = 1000
"""The most changes one publish carries for the change stream (the newest; the stream marks
older ones as a gap): with the largest state they keep its input far below Temporal's 2 MB."""

INLINE_STATE_BYTES = 16 * 1024
"""The largest state an update's answer carries. Temporal records every answer in the
history and sends the answers of up to 10 updates in flight in one workflow task's
completion, which gRPC bounds at 4 MiB with the run's own commands; a larger state is read
from the cache or the entity by whoever needs it (`Snapshot.state_omitted`)."""

MAX_TIMER_CHANGES = 64
"""Timer firings remembered for the change stream until published."""
MAX_REFUSAL = 1000
"""The longest refusal message an outcome keeps, in characters."""

NEXT_TASK_TIMEOUT = timedelta(seconds=10)
NEXT_TASK_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)

KEYS_PER_SENDER = "entity-keys-per-sender"
"""Runs from here on record a command whose id another sender's command took first under its
sender's own id (`EntityWorkflow._own_key`); runs begun before took it for that command's
repeat. Asked only where two senders' ids meet, so no other run records its marker: it
belongs to no patch set."""

ENDED_CONTINUES = "entity-ended-continues-as-new"
"""Runs from here on continue as new, when their history asks it, while their end waits to
be published (Redis down): commands sent meanwhile, each refused, grew the run's history
until Temporal ended it at its limit, the end never published. Runs begun before waited on.
Asked only where an ended run's history asks it, so no other run records its marker: it
belongs to no patch set."""

SIZES_IN_BYTES = "entity-sizes-in-bytes"
"""Runs from here on weigh their state and ledger in bytes (`json_size`), and take a command
that leaves a state past its bound no heavier (`_shrinks`); runs begun before counted
characters. Asked only where text that is not ASCII makes the two differ, or a state is past
its bound, so no other run records its marker: it belongs to no patch set."""

HELD_RETRIES = "entity-recalls-held-retries"
"""Runs from here on take a command held back as the repeat of one the ledger evicted since
it came (`Ledger.keep_evicted`): a client's retry held behind a backlog deeper than the
ledger was applied a second time. Asked only where such a repeat is found, so no other run
records its marker: it belongs to no patch set."""

RECORD_UNREADABLE_PATCH = "entity-records-unreadable-commands"
"""Runs from here on refuse a command whose envelope cannot be read under its id, and apply
the rest of a batch around it (entities/runtime/inbox.py); runs begun before drop it, as the
SDK did, a batch with it whole."""

LOOP_FOLLOWS_CHANGES_PATCH = "entity-loop-follows-every-change"
"""Runs from here on wake their main loop on every change of state, which arms the entity's
deadline (a reservation's expiry) in the task that changed it. Runs begun before woke it for
a publish, which every change brought until a sender could publish its own (`hand`): they
replay as they were made, and hand nothing over."""

ENTITY_PATCHES = PatchSet(
    "entity-patch-set-5",
    [RULES_3_PATCH],
    after=PatchSet(
        "entity-patch-set-4",
        [PUBLISH_OFFERS],
        after=PatchSet(
            "entity-patch-set-3",
            [RULES_1_PATCH],
            after=PatchSet(
                "entity-patch-set-2",
                [STRICT_INPUTS_4_PATCH],
                after=PatchSet(
                    "entity-patch-set-1",
                    [
                        STRICT_INPUTS_PATCH,
                        STRICT_INPUTS_2_PATCH,
                        STRICT_INPUTS_3_PATCH,
                        BOUNDED_TASKS_PATCH,
                        RECORD_UNREADABLE_PATCH,
                        LOOP_FOLLOWS_CHANGES_PATCH,
                        PUBLISH_BY_ACTIVITY,
                        CHILDREN_CLOSE_FIRST,
                    ],
                ),
            ),
        ),
    ),
)
"""Runs from here on record one patch marker, where they recorded one for each of these
(`PatchSet`); besides, their main loop has a change published before it carries out the
change's effects, so that a cart's publish is under way while its checkout starts (it waited
for the checkout's start, a workflow task later)."""

MAX_BATCH = 64
"""The most commands one `apply_batch` update carries."""

NOTHING_TO_UNDO = "nothing to undo"
TIMER_SENDER = "entity:timer"

COMMANDS_METRIC = "tenure_commands"
COMMAND_SIGNAL = "command"
"""The signal of one command, also the start signal of an entity a command creates."""
CONTINUE_AS_NEW_METRIC = "tenure_continue_as_new"
OK = "OK"

LATE_COMMAND = (
    "tenure: a command came after this run had issued its last command (continue-as-new or "
    "completion); the workflow task fails, so that it replays with the command in place"
)
"""How a workflow task fails that brought a command to a run already ended (`LateCommand`)."""


class LateCommand(RuntimeError):
    """A command reached a run after the run issued its last command: its carried-over
    state (or its result) was built without it, so applied now it would be lost with the
    run. A live run never sees this: a workflow task's signals and updates are all handled
    before its main loop resumes. It would take the SDK's core handing a run events of a
    task not yet started (`workers/query_guard.py`), the loop ending the run on them, and
    the task then bringing more. Raised in a handler, it fails the workflow task (not the
    workflow), and the retry replays the run from its history with every command in
    place."""

    def __init__(self) -> None:
        super().__init__(LATE_COMMAND)


class EntityWorkflow:
    """Hosts one entity of `entity`'s type. Subclasses set `entity` and define `run`.

    Commands arrive on the `command` signal (or `commands`, a batch) and are applied in the
    handler itself, so a query sent after a signal sees its outcome. A sender that waits for
    the outcome sends the command as the `apply` update instead: one round trip, the same
    handler. Every applied command raises the revision by one. The main loop has the
    snapshot published (`SnapshotPublisher` decides when), fires the entity's durable timer,
    carries out effects, and continues as new when the run has seen enough commands (or
    updates) or the server suggests it, only once nothing runs beside it (`_quiesce`).
    """

    entity: ClassVar[EntityType[Any, Any]]
    registry: ClassVar[dict[str, type[EntityWorkflow]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        EntityWorkflow.registry[cls.entity.name] = cls

    @workflow.init
    def __init__(self, input: EntityRunInput) -> None:
        entity = self.entity
        self._input = input
        self._options: BaseModel = entity.options_model.model_validate(input.options)
        self._state: BaseModel | None = (
            entity.state_model.model_validate(input.state) if input.state is not None else None
        )
        self._state_bytes = json_size(self._state, _in_bytes) if self._state is not None else 0
        self._revision = input.revision
        self._updated_at = input.updated_at
        self._incarnation = (
            input.incarnation
            if input.incarnation is not None
            else int(workflow.now().timestamp() * 1000)
        )
        self._ledger = Ledger.carried(
            input.runtime.ledger_size,
            input.ledger,
            input.ledger_forgot_through,
            told="ledger_forgot_through" in input.model_fields_set,
            now=workflow.now(),
            bytes_=_in_bytes,
        )
        self._received_this_run = 0
        self._updates_this_run = 0
        self._backlog: Backlog[RawValue] = Backlog(
            input.runtime.max_commands_per_task, self._unpack_held
        )
        self._timers: list[Outcome] = list(input.timers)
        self._publisher = SnapshotPublisher(
            input.runtime, self.publication, input.published_revision
        )
        self._effects = Effects(input.effects)
        self._commands_metric: MetricCounter | None = None
        self._follows_changes = False  # decided by `run` (LOOP_FOLLOWS_CHANGES_PATCH)
        self._end_senders: list[str | None] = []  # who its end was handed to (`_ends_by_child`)
        self._ended = False  # the run has issued its last command (`LateCommand`)

    # -- commands -------------------------------------------------------------------------

    @workflow.signal(name=COMMAND_SIGNAL)
    def command(self, sent: RawValue) -> None:
        """Apply one command (a `CommandEnvelope`), or record why it was refused, or hold it
        back while this workflow task has applied its most (`Backlog`); raises only in a
        run already ended (`LateCommand`). An envelope that cannot be read is refused under
        its id (`inbox`)."""
        self._still_open()
        received = _bounded(read_command(workflow.payload_converter(), sent.payload))
        envelope = self._refused(received) if isinstance(received, Unreadable) else received
        if envelope is not None:
            self._receive(envelope)

    def _still_open(self) -> None:
        """Raise `LateCommand` if this run has issued its last command."""
        if self._ended:
            raise LateCommand()

    def _receive(self, envelope: CommandEnvelope) -> None:
        self._received_this_run += 1
        if self._held_back(envelope):
            return
        # Nothing is held: every command held before has been applied and answered.
        self._ledger.drop_evicted()
        self._backlog.applied()
        self._apply(envelope)

    def _held_back(self, item: CommandEnvelope | RawValue) -> bool:
        """Hold a command or a batch back if this workflow task may apply no more, or
        commands are held before it (`Backlog`); whether it was."""
        task = workflow.info().get_current_history_length()
        if not self._backlog.admits(task) and ENTITY_PATCHES.patched(BOUNDED_TASKS_PATCH):
            self._backlog.hold(item, self._ledger.evictions)
            self._ledger.keep_evicted()
            return True
        return False

    def _apply(self, envelope: CommandEnvelope) -> None:
        self._own_key(envelope)
        if self._recorded(envelope.command_id) is not None:
            self._count("duplicate", OK)
            # Its sender is retrying: an earlier answer may have been handed to nobody (an
            # update the sender gave up on, applied all the same), and a retry by signal, or
            # from a sender that does not publish (older code), gets nothing to publish. The
            # entity publishes what is not published yet, whatever it hands over.
            self._publisher.take_back(self._revision)
            return
        if self._cannot_tell(envelope):
            return
        if envelope.undoes is not None and self._nothing_to_undo(envelope):
            return
        now = workflow.now()
        ctx = CommandContext(
            self._input.entity_id,
            now,
            self._options,
            envelope.command_id,
            # Runs that began before the bounds came replay as they were made (the SDK
            # answers the same for the rest of the run).
            strict_inputs=_strictness(),
            rules_from=_rules_from,
            sent_by=envelope.sent_by,
            incarnation=self._incarnation,
        )
        try:
            new_state = self.entity.apply(self._state, envelope.name, envelope.payload, ctx)
        except Rejected as rejection:
            self._reject(envelope.command_id, rejection.code, rejection.message, envelope)
            return
        except Exception:
            workflow.logger.exception("command %s failed in its transition", envelope.name)
            self._reject(envelope.command_id, ErrorCode.INTERNAL, "internal error", envelope)
            return
        size = json_size(new_state, _in_bytes)
        if size > self._input.runtime.max_state_bytes and not self._shrinks(size):
            self._reject(
                envelope.command_id,
                ErrorCode.LIMIT_REACHED,
                f"{self.entity.name} {self._input.entity_id} would grow past its size limit",
                envelope,
            )
            return
        self._commit(new_state, now, size)
        self._effects.extend(ctx.effects)
        self._ledger.record(
            Outcome(
                command_id=envelope.command_id,
                status=OutcomeStatus.APPLIED,
                revision=self._revision,
                fingerprint=envelope.fingerprint,
                sent_by=envelope.sent_by,
                command=envelope.name,
                at=now,
            )
        )
        self._count("applied", OK)

    @workflow.signal(name="commands")
    def commands(self, batch: RawValue) -> None:
        """Apply a batch of commands (a JSON list of them) in order, as if each had come in
        its own signal. A batch that would only be held back is held as it came, decoded
        when its turn comes (`Backlog`): the same commands held in the same order, at a
        fraction of the cost to the task that brings a flood of batches."""
        self._still_open()
        if self._held_back(batch):
            return
        for envelope in self._read_batch(batch):
            self._receive(envelope)

    def _unpack_held(self, batch: RawValue) -> list[CommandEnvelope]:
        """A held batch's commands, counted as received now: before its turn nothing asks
        the count (the main loop drains every held command before it looks), so a run
        continues as new where it did when batches were decoded on arrival."""
        envelopes = self._read_batch(batch)
        self._received_this_run += len(envelopes)
        return envelopes

    def _read_batch(self, batch: RawValue) -> list[CommandEnvelope]:
        """The commands of a `commands` signal to apply, in order, those that cannot be read
        refused (`_refused`). A payload that is not a JSON list is dropped and logged, as
        the SDK drops any signal it cannot decode: raised, the error would fail this
        workflow task and every retry of it."""
        read = read_commands(workflow.payload_converter(), batch.payload)
        if read is None:
            workflow.logger.warning("a commands signal that is not a list of commands, dropped")
            return []
        received = [_bounded(item) for item in read]
        readable = [item for item in received if isinstance(item, CommandEnvelope)]
        if len(readable) == len(received):
            return readable
        if not ENTITY_PATCHES.patched(RECORD_UNREADABLE_PATCH):
            decoded = [
                item if isinstance(item, CommandEnvelope) else item.envelope for item in received
            ]
            if None in decoded:  # the SDK could not decode the batch: all of it dropped
                workflow.logger.warning("a commands signal with an unreadable command, dropped")
                return []
            return [envelope for envelope in decoded if envelope is not None]
        envelopes = []
        for item in received:
            envelope = self._refused(item) if isinstance(item, Unreadable) else item
            if envelope is not None:
                envelopes.append(envelope)
        return envelopes

    def _refused(self, unreadable: Unreadable) -> CommandEnvelope | None:
        """Record a command that cannot be read as refused (`INVALID_INPUT`, with why) under
        its id; with no sound id, log and count it. Returns the command to apply all the same
        in a run begun before (`RECORD_UNREADABLE_PATCH`), if that run would have."""
        if not ENTITY_PATCHES.patched(RECORD_UNREADABLE_PATCH):
            if unreadable.envelope is None:
                workflow.logger.warning("dropped a command: %s", unreadable.reason)
            return unreadable.envelope
        command_id = unreadable.command_id
        if command_id is None:
            workflow.logger.warning(
                "dropped a command with no sound command_id, so with nowhere to record its "
                "refusal: %s",
                unreadable.reason,
            )
            self._count("rejected", ErrorCode.INVALID_INPUT)
        elif self._recorded(command_id) is not None:
            self._count("duplicate", OK)
        else:
            self._reject(
                command_id,
                ErrorCode.INVALID_INPUT,
                unreadable.reason,
                name=unreadable.name,
                sent_by=unreadable.sent_by,
            )
            self._count("rejected", ErrorCode.INVALID_INPUT)
        return None

    @workflow.update  # named "apply", as its method: the name the senders use
    async def apply(self, envelope: CommandEnvelope) -> CommandResult:
        """Apply one command as the `command` signal does, and answer with its outcome: a
        duplicate's is the one recorded. Raises only in a run already ended (`LateCommand`).
        It waits only when the command is held back (`Backlog`), for the main loop to apply
        it, which it does before it may continue as new; otherwise it is finished within the
        activation that brought it."""
        answer = await self._apply_all([envelope])
        return answer.results()[0]

    @workflow.update  # named "apply_batch", as its method
    async def apply_batch(self, envelopes: list[CommandEnvelope]) -> CommandResults:
        """Apply commands that came together (workers/update_lanes.py), in order, as
        `apply` does each: one update, one workflow task, an outcome for each."""
        return await self._apply_all(envelopes)

    @apply_batch.validator
    def _sound_batch(self, envelopes: list[CommandEnvelope]) -> None:
        if not 1 <= len(envelopes) <= MAX_BATCH:
            raise ApplicationError(
                f"a batch holds 1 to {MAX_BATCH} commands, not {len(envelopes)}",
                type=ErrorCode.INVALID_INPUT,
                non_retryable=True,
            )
        for envelope in envelopes:
            self._sound_command_id(envelope)

    async def _apply_all(self, envelopes: list[CommandEnvelope]) -> CommandResults:
        self._still_open()
        self._updates_this_run += 1
        self._publisher.updated()
        held = self._backlog.ever_held
        for envelope in envelopes:
            self._receive(envelope)
        if self._backlog.ever_held > held:  # held back: this is the latest ticket
            ticket = self._backlog.ever_held
            await workflow.wait_condition(lambda: self._backlog.released(ticket))
        answer = CommandResults(
            outcomes=[self._outcome(envelope.command_id) for envelope in envelopes],
            snapshot=self._snapshot(
                with_state=self._state_bytes <= INLINE_STATE_BYTES
                or not all(envelope.reads_large_state for envelope in envelopes)
            ),
        )
        if (
            any(envelope.publishes for envelope in envelopes)
            and not answer.snapshot.state_omitted
            and self._follows_changes
            and (not self._is_terminal() or self._ends_by_child(envelopes))
            and self._publisher.may_hand(answer.snapshot.revision)
        ):
            # The sender publishes it, and sees to it that it is published (saga requests).
            since = self._publisher.published_revision
            answer.since, answer.changes = since, self._changes(since, answer.snapshot.revision)
            self._publisher.hand(answer.snapshot.revision)
            if self._is_terminal():
                self._end_senders = [envelope.sent_by for envelope in envelopes]
        return answer

    def _ends_by_child(self, envelopes: list[CommandEnvelope]) -> bool:
        """Whether the entity's last state may go to its senders to publish: each is a
        child this run started (a checkout's report to its cart), which the run waits for
        before it ends; once the child has closed, its requests have published what they
        were handed or asked the entity to (PUBLISH_SIGNAL). Any other sender could ask too
        late, so the run publishes its end itself. Runs from before ENTITY_PATCHES always
        do."""
        return ENTITY_PATCHES.current() and all(
            self._effects.started(envelope.sent_by) for envelope in envelopes
        )

    @workflow.signal(name=PUBLISH_SIGNAL)
    def publish_handed(self) -> None:
        """A sender could not publish what its update's answer handed it: publish it."""
        self._publisher.take_back(self._revision)

    @apply.validator
    def _sound_command_id(self, envelope: CommandEnvelope) -> None:
        """Refuse an update whose command id is not one (`inbox.COMMAND_ID`), or whose name,
        `undoes` or fingerprint is too long to record (`outsized`, which the `command`
        signal refuses as unreadable): nothing is recorded, and the sender learns why. A
        direct Temporal client's 600,000-character fingerprint, sent as an update, was
        recorded with its outcome, and the ledger forgot every other command to hold it.
        Validators are not run in a replay, so runs that took such commands before replay as
        they were made."""
        reason = (
            f"command_id: {COMMAND_ID_RULE}"
            if not COMMAND_ID.fullmatch(envelope.command_id)
            else outsized(envelope)
        )
        if reason is not None:
            raise ApplicationError(reason, type=ErrorCode.INVALID_INPUT, non_retryable=True)

    def _own_key(self, envelope: CommandEnvelope) -> None:
        """Give `envelope` the id the entity knows its command by: its own, unless another
        sender's command took that id first; then the sender's own (`sender_key`), so that
        one sender cannot take another's idempotency key. A customer who sent a deposit
        under the key an operator's withdrawal would come with had the withdrawal dropped as
        its repeat (and answered ACCEPTED). Runs begun before this rule (`KEYS_PER_SENDER`,
        asked only where keys meet) took it for the repeat."""
        sender = envelope.sent_by
        if sender is None:
            return
        own = sender_key(sender, envelope.command_id)
        mine = self._recorded(own)
        # Its repeat, or one since the first sender's was forgotten: recorded under its own
        # id by this sender (a client's key may look like one: `service:billing/fee-1`).
        if mine is not None and mine.sent_by == sender and workflow.patched(KEYS_PER_SENDER):
            envelope.command_id = own
            return
        taken = self._recorded(envelope.command_id)
        if taken is None or same_sender(taken.sent_by, sender):
            return
        if workflow.patched(KEYS_PER_SENDER):
            envelope.command_id = own

    def _shrinks(self, size: int) -> bool:
        """Whether a state already past its bound would weigh no more after the command: a
        state carried from a run that counted characters may weigh more bytes than its
        bound, and refusing every command, a close or a withdrawal too, would leave it stuck
        as it is. Runs begun before (`SIZES_IN_BYTES`) refused it."""
        return size <= self._state_bytes and _in_bytes()

    def _recorded(self, command_id: str) -> Outcome | None:
        """The outcome recorded under `command_id`: in the ledger, or evicted from it since
        the command being applied was held back (`HELD_RETRIES`)."""
        recorded = self._ledger.get(command_id)
        if recorded is not None:
            return recorded
        recalled = self._ledger.recall(command_id)
        if recalled is not None and workflow.patched(HELD_RETRIES):
            return recalled
        return None

    def _cannot_tell(self, envelope: CommandEnvelope) -> bool:
        """Refuse, OUTCOME_UNKNOWN, a command first sent before the newest outcome the ledger
        has forgotten: it may have been applied then, and forgotten. A saga's step retried
        under its id (an activity's later attempt, an operator's retry days later) was
        applied a second time: a withdrawal charged twice, a commit refused as unknown. Runs begun
        before this rule (`RULES_1_PATCH`) applied it."""
        first_sent = envelope.first_sent
        if first_sent is None or not self._ledger.may_have_forgotten(first_sent):
            return False
        if not _rules_from(1):
            return False
        self._reject(
            envelope.command_id,
            ErrorCode.OUTCOME_UNKNOWN,
            f"{envelope.command_id} was first sent before the oldest commands "
            f"{self.entity.name} {self._input.entity_id} remembers (its last "
            f"{self._ledger.capacity}): it cannot tell whether it applied it then; not "
            "applied now",
            envelope,
        )
        return True

    def _nothing_to_undo(self, envelope: CommandEnvelope) -> bool:
        """Settle a compensating command whose undone command was not applied: there is
        nothing to take back, and a command that never arrived is cancelled for good.
        When the ledger may have forgotten the undone command (sent before the newest outcome
        it evicted), the compensation is refused, each time it comes, and the undone command
        cancelled all the same (OUTCOME_UNKNOWN, as `_cannot_tell` refuses one), so that it
        never applies late, nor twice:
        answered "nothing to undo", a refund of a withdrawal applied and since forgotten was
        never made, and its checkout ended COMPENSATED. Runs begun before this rule
        (`RULES_1_PATCH`) answered so."""
        assert envelope.undoes is not None
        undone = self._recorded(envelope.undoes)
        if undone is not None and undone.status is OutcomeStatus.APPLIED:
            return False
        untold = undone is not None and undone.code == ErrorCode.OUTCOME_UNKNOWN
        if undone is None or untold:
            forgotten = untold or self._ledger.may_have_forgotten(envelope.undoes_since)
            if forgotten and _rules_from(1):
                if undone is None:
                    self._reject(
                        envelope.undoes,
                        ErrorCode.OUTCOME_UNKNOWN,
                        f"cancelled by {envelope.command_id}, which could not tell whether "
                        "it was applied",
                    )
                self._reject(
                    envelope.command_id,
                    ErrorCode.CONFLICT,
                    f"cannot tell whether {envelope.undoes} was applied: "
                    f"{self.entity.name} {self._input.entity_id} no longer remembers the "
                    f"commands of then (it remembers its last {self._ledger.capacity}); check "
                    "it and settle by hand",
                    envelope,
                )
                return True
        if undone is None:
            self._reject(envelope.undoes, ErrorCode.CONFLICT, f"cancelled by {envelope.command_id}")
        self._count("applied", OK)
        self._ledger.record(
            Outcome(
                command_id=envelope.command_id,
                status=OutcomeStatus.APPLIED,
                revision=self._revision,
                message=f"{NOTHING_TO_UNDO}: {envelope.undoes} was not applied",
                fingerprint=envelope.fingerprint,
                sent_by=envelope.sent_by,
                command=envelope.name,
                at=workflow.now(),
            )
        )
        return True

    def _reject(
        self,
        command_id: str,
        code: str,
        message: str,
        envelope: CommandEnvelope | None = None,
        *,
        name: str | None = None,
        sent_by: str | None = None,
    ) -> None:
        """Record the command as refused; `envelope` is the refused command itself, when it
        is the one that arrived (not a command cancelled before it came), else `name` and
        `sent_by` are what is known of it. Its message is cut to MAX_REFUSAL: one that named
        a sender's 700,000-character payload key outweighed the whole ledger, which forgot
        every other command to hold it."""
        if len(message) > MAX_REFUSAL and _rules_from(5):
            message = message[: MAX_REFUSAL - 1] + "…"
        self._ledger.record(
            Outcome(
                command_id=command_id,
                status=OutcomeStatus.REJECTED,
                revision=self._revision,
                code=code,
                message=message,
                fingerprint=envelope.fingerprint if envelope is not None else None,
                sent_by=envelope.sent_by if envelope is not None else sent_by,
                command=envelope.name if envelope is not None else name,
                at=workflow.now(),
            )
        )
        if envelope is not None:
            self._count("rejected", str(code))

    def _count(self, outcome: str, code: str) -> None:
        """Count a command received, in the worker's metrics; not while replaying, so each
        is counted once however often its history is replayed."""
        if workflow.unsafe.is_replaying():
            return
        if self._commands_metric is None:
            self._commands_metric = workflow.metric_meter().create_counter(
                COMMANDS_METRIC,
                "Commands received by entities, by outcome (applied, rejected, duplicate) "
                "and code (OK, or the rejection's).",
            )
        self._commands_metric.add(
            1, {"entity_type": self.entity.name, "outcome": outcome, "code": code}
        )

    def _commit(self, state: BaseModel, now: datetime, size: int | None = None) -> None:
        self._state = state
        self._state_bytes = size if size is not None else json_size(state, _in_bytes)
        self._revision += 1
        self._updated_at = now

    # -- reads ----------------------------------------------------------------------------

    @workflow.query(name="snapshot")
    def snapshot(self) -> Snapshot:
        """The current state with its revision."""
        return self._snapshot()

    def _snapshot(self, with_state: bool = True) -> Snapshot:
        """The current snapshot; without `with_state`, its state left out (`state_omitted`)."""
        return Snapshot(
            entity_type=self.entity.name,
            entity_id=self._input.entity_id,
            revision=self._revision,
            updated_at=self._updated_at,
            state=self._state.model_dump(mode="json")
            if with_state and self._state is not None
            else None,
            closed=self._is_terminal(),
            incarnation=self._incarnation,
            state_omitted=self._state is not None and not with_state,
        )

    def publication(self, since: int) -> Publication:
        """The current snapshot, with the changes made after revision `since` that the
        ledger (and the timers' list) still hold: the newest MAX_PUBLISHED_CHANGES, one per
        revision, oldest first."""
        snapshot = self.snapshot()
        return Publication(
            snapshot=snapshot, since=since, changes=self._changes(since, snapshot.revision)
        )

    def _changes(self, since: int, revision: int) -> list[Outcome]:
        """The changes after revision `since` up to `revision` still remembered, the newest
        MAX_PUBLISHED_CHANGES, oldest first."""
        by_revision: dict[int, Outcome] = {}
        for outcome in self._ledger.newest_first():
            if outcome.revision <= since or len(by_revision) >= MAX_PUBLISHED_CHANGES:
                break
            if (
                outcome.status is OutcomeStatus.APPLIED
                and outcome.revision <= revision
                # settled without a change: the revision is its predecessor's
                and not (outcome.message or "").startswith(NOTHING_TO_UNDO)
            ):
                by_revision[outcome.revision] = outcome
        for timer in self._timers:
            if since < timer.revision <= revision:
                by_revision[timer.revision] = timer
        return [by_revision[r] for r in sorted(by_revision)][-MAX_PUBLISHED_CHANGES:]

    @workflow.query(name="outcome")
    def outcome(self, command_id: str) -> CommandResult:
        """What became of a command, with the state as it is now."""
        return CommandResult(outcome=self._outcome(command_id), snapshot=self._snapshot())

    def _outcome(self, command_id: str) -> Outcome:
        return (
            self._ledger.get(command_id)
            or self._ledger.recall(command_id)
            or Outcome(command_id=command_id, status=OutcomeStatus.UNKNOWN, revision=self._revision)
        )

    @workflow.query(name="history")
    def history(self, page: HistoryPage) -> CommandHistory:
        """The entity's recent commands, newest first, as its ledger remembers them."""
        newest_first = reversed(self._ledger.entries())
        if page.before is not None:
            for outcome in newest_first:
                if listed_as(outcome, page.before):  # as the caller saw it listed
                    break
            else:
                return CommandHistory(entries=[], has_older=False, before_found=False)
        entries = list(itertools.islice(newest_first, page.last + 1))
        return CommandHistory(entries=entries[: page.last], has_older=len(entries) > page.last)

    # -- the main loop --------------------------------------------------------------------

    def _is_terminal(self) -> bool:
        return self._state is not None and self.entity.is_terminal(self._state)

    def _should_continue_as_new(self) -> bool:
        return (
            self._received_this_run >= self._input.runtime.max_commands_per_run
            or self._updates_this_run >= self._input.runtime.max_updates_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    async def run_entity(self) -> Snapshot:
        """Serve commands until the entity reaches a terminal state; returns its last snapshot.

        The loop never blocks on anything but its wake-up condition: publishing runs beside
        it. So the decision to continue as new is always taken in the activation that
        delivered the commands crossing the threshold, never after a local activity resolves
        from history, where signals that raced the previous attempt would be left out of
        the carried-over state.
        """
        timer: asyncio.Task[None] | None = None
        armed_for: datetime | None = None
        self._publisher.start_run(
            ENTITY_PATCHES.patched(PUBLISH_BY_ACTIVITY), ENTITY_PATCHES.patched(PUBLISH_OFFERS)
        )
        self._follows_changes = ENTITY_PATCHES.patched(LOOP_FOLLOWS_CHANGES_PATCH)
        publish_first = ENTITY_PATCHES.current()
        while True:
            deadline = self.entity.deadline(self._state, self._options)
            if deadline is not None and (armed_for is None or deadline < armed_for):
                if timer is not None:
                    timer.cancel()
                delay = max((deadline - workflow.now()).total_seconds(), 0.0)
                timer = asyncio.create_task(workflow.sleep(delay))
                armed_for = deadline
            looked_at = self._revision

            def has_work(armed: asyncio.Task[None] | None = timer, seen: int = looked_at) -> bool:
                return (
                    bool(self._backlog)
                    or (self._follows_changes and self._revision != seen)
                    or self._publisher.needs_attention(self._revision)
                    or bool(self._effects)
                    or self._is_terminal()
                    or self._should_continue_as_new()
                    or (armed is not None and armed.done())
                )

            await workflow.wait_condition(has_work)
            await self._catch_up()
            if timer is not None and timer.done():
                timer, armed_for = None, None
                self._fire_deadline()
            if self._is_terminal():
                self._publisher.withdraw_offers()
                await self._effects.run(self._other_running)
                if self._publisher.enabled:
                    await self._quiesce()
                    await self._last_publish()
                else:
                    await self._effects.children_closed(ENTITY_PATCHES.patched)
                await self._quiesce()
                self._ended = True
                return self.snapshot()
            if self._should_continue_as_new():
                await self._quiesce()
                self._continue_as_new()
            if publish_first:
                self._publisher.schedule(self._revision)
                await self._effects.run(self._other_running)
            else:
                await self._effects.run(self._other_running)
                self._publisher.schedule(self._revision)

    def _continue_as_new(self) -> NoReturn:
        """End the run and go on in a new one, from `run` once quiet (`_quiesce`)."""
        workflow.metric_meter().create_counter(
            CONTINUE_AS_NEW_METRIC, "Entity runs continued as new."
        ).add(1, {"entity_type": self.entity.name})
        # The next run publishes whatever this one did not.
        self._ended = True
        self._publisher.withdraw_offers()
        workflow.continue_as_new(self._carry_over())

    async def _last_publish(self) -> None:
        """Publish the entity's end, once its children have closed (`children_closed`).

        An end handed to a child that publishes it (`_ends_by_child`) is published by the
        run only if the child asked it to (`take_back`), did not close in time, or closed
        without completing (failed, terminated), when it may not have published. Runs from
        ENTITY_PATCHES on publish until it is done, Redis down or not, and publish too what
        commands held during the wait changed; runs from before try once, as they did."""
        children_closed = self._effects.children_closed(ENTITY_PATCHES.patched)
        if self._publisher.left_to_sender(self._revision):  # runs from ENTITY_PATCHES on only
            await children_closed
        else:
            # Side by side: the last publish and the children's close most often end in
            # one workflow task.
            await asyncio.gather(self._publisher.publish(), children_closed)
        if not ENTITY_PATCHES.current():
            return
        while True:
            await self._quiesce()
            if self._end_published():
                return
            # Commands sent to the ended entity meanwhile are refused, each in its history:
            # the next run, ended too, publishes its end.
            if self._should_continue_as_new() and workflow.patched(ENDED_CONTINUES):
                self._continue_as_new()
            await self._publisher.backed_off()
            await self._quiesce()
            await self._publisher.publish()

    def _end_published(self) -> bool:
        """Whether the entity's end is in the cache, or its senders' to publish: children
        that completed and asked nothing back."""
        if self._publisher.published_revision >= self._revision:
            return True
        return (
            self._publisher.left_to_sender(self._revision)
            and bool(self._end_senders)
            and all(self._effects.completed(sender) for sender in self._end_senders)
        )

    async def _quiesce(self) -> None:
        """Wait until nothing runs beside the main loop: no handler, no publish in flight.

        A run's last command (continue-as-new, completion) must be the last in its workflow
        task, but a local activity still running when it is issued gets its marker recorded
        after it (temporalio/sdk-rust#659). The server refuses that sequence, and since a
        retried task replays to the same point the entity would refuse it forever. So a run
        that publishes with local activities (one started before PUBLISH_BY_ACTIVITY) ends
        only once its publish has resolved; the main loop alone starts publishes, and it is
        here, so none starts in between. An activity in flight is no obstacle: the next run
        publishes again whatever this one has not seen confirmed. Signals that arrive
        meanwhile are applied by their handlers, or held back and applied here, and carried
        over with the state: a run never ends with commands held.
        """
        while True:
            await workflow.wait_condition(
                lambda: (
                    bool(self._backlog)
                    or (self._publisher.lets_run_end() and workflow.all_handlers_finished())
                )
            )
            if not self._backlog:
                return
            await self._catch_up()

    async def _catch_up(self) -> None:
        """Apply the commands held back, oldest first, a workflow task's worth at a time."""
        while self._backlog:
            # What was evicted before the oldest held command came is no repeat's to find;
            # answers of commands applied in an earlier task have been given.
            front = self._backlog.front_mark()
            if front is not None:
                self._ledger.drop_evicted_before(front)
            task = workflow.info().get_current_history_length()
            for envelope in self._backlog.next_slice(task):
                self._apply(envelope)
            if self._backlog:
                await NEXT_TASK_ACTIVITY.execute(
                    start_to_close_timeout=NEXT_TASK_TIMEOUT,
                    retry_policy=NEXT_TASK_RETRY,
                )

    def _other_running(self, effect: StartWorkflow) -> None:
        """Apply the entity's own command for an effect that another's workflow, running
        under its id, kept from starting (`IfOtherRunning`)."""
        told = effect.if_other_running
        assert told is not None
        self._apply(
            CommandEnvelope(
                command_id=other_running_id(effect.workflow_id),
                name=told.command,
                payload=told.payload,
                sent_by=OTHER_RUNNING_SENDER,
            )
        )

    def _fire_deadline(self) -> None:
        deadline = self.entity.deadline(self._state, self._options)
        now = workflow.now()
        if self._state is None or deadline is None or deadline > now:
            return
        ctx = CommandContext(
            self._input.entity_id,
            now,
            self._options,
            "timer",
            rules_from=_rules_from,
            incarnation=self._incarnation,
        )
        self._commit(self.entity.fire_deadline(self._state, ctx), now)
        self._effects.extend(ctx.effects)
        self._timers.append(
            Outcome(
                command_id=f"timer:{self._revision}",
                status=OutcomeStatus.APPLIED,
                revision=self._revision,
                sent_by=TIMER_SENDER,
                command=self.entity.timer_name,
                at=now,
            )
        )
        del self._timers[:-MAX_TIMER_CHANGES]

    def _carry_over(self) -> EntityRunInput:
        return EntityRunInput(
            entity_id=self._input.entity_id,
            runtime=self._input.runtime,
            options=self._input.options,
            state=self._state.model_dump(mode="json") if self._state is not None else None,
            revision=self._revision,
            updated_at=self._updated_at,
            ledger=self._ledger.entries(),
            ledger_forgot_through=self._ledger.forgot_through,
            published_revision=self._publisher.published_revision,
            incarnation=self._incarnation,
            effects=self._effects.pending,
            timers=[
                timer
                for timer in self._timers
                if timer.revision > self._publisher.published_revision
            ],
        )


RULES_PATCHES = {
    1: RULES_1_PATCH,
    2: RULES_2_PATCH,
    3: RULES_3_PATCH,
    4: RULES_4_PATCH,
    5: RULES_5_PATCH,
}


def _rules_from(level: int) -> bool:
    """Whether this run applies the entity types' rules of `level` (`CommandContext`): by
    its patch set, or, for a rule only a rare case meets, by a patch of its own."""
    patch = RULES_PATCHES[level]
    if patch in ENTITY_PATCHES.patches:
        return ENTITY_PATCHES.patched(patch)
    return workflow.patched(patch)


def _in_bytes() -> bool:
    """Whether this run weighs in bytes (`SIZES_IN_BYTES`)."""
    return workflow.patched(SIZES_IN_BYTES)


def _bounded(received: Received) -> Received:
    """A command whose name, `undoes` or fingerprint is too long to record, refused as
    unreadable (`outsized`), from rules level 5 on: runs begun before took it as it came."""
    if isinstance(received, Unreadable):
        return received
    reason = outsized(received)
    if reason is None or not _rules_from(5):
        return received
    name = received.name[:MAX_COMMAND_NAME]
    return Unreadable(received.command_id, name, received.sent_by, reason)


def _strictness() -> int:
    """Which bounds of `strict_bound` this run applies: those up to the newest level whose
    patch it has (`entities.runtime.entity`). Asked newest first, so that a run from before
    ENTITY_PATCHES recorded one patch marker, not one per level."""
    levels = (
        (4, STRICT_INPUTS_4_PATCH),
        (3, STRICT_INPUTS_3_PATCH),
        (2, STRICT_INPUTS_2_PATCH),
        (1, STRICT_INPUTS_PATCH),
    )
    return next((level for level, patch in levels if ENTITY_PATCHES.patched(patch)), 0)
