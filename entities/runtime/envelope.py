"""The payloads that cross the workflow boundary: commands, outcomes, snapshots, run input.

Each is a pydantic model so fields can be added without breaking recorded histories.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from entities.runtime.effects import OTHER_RUNNING_SENDER, StartWorkflow, saga_sender
from entities.runtime.policy import Role


class CommandEnvelope(BaseModel):
    """A command as it travels in a signal: its idempotency key, name and raw payload.

    A compensating command names in `undoes` the command it takes back. It is applied only
    if that command was applied; if that command never arrived, it is recorded as cancelled
    so that a late delivery can never apply it. The undone command must still be in the
    entity's ledger (its last `ledger_size` commands), so a compensation whose step is known
    to have been applied is sent without `undoes`; and one whose undone command, first sent
    at `undoes_since`, may have left the ledger is refused (CONFLICT), since the entity can
    no longer tell whether it was applied.
    """

    command_id: str
    name: str
    payload: dict[str, Any] = Field(default_factory=dict)
    undoes: str | None = None
    undoes_since: AwareDatetime | None = Field(
        default=None,
        description="When the undone command was first sent: a ledger that has forgotten "
        "nothing since can tell it never came. None from senders before it: any forgotten "
        "command might be it.",
    )
    first_sent: AwareDatetime | None = Field(
        default=None,
        description="When its sender first sent this command id, given when it sends it "
        "again: one the ledger may have forgotten since is refused OUTCOME_UNKNOWN rather "
        "than applied a second time. Sent by sagas, whose retries can come days later; "
        "None: the ledger's memory alone. A time with its offset (naive is unreadable).",
    )
    fingerprint: str | None = Field(
        default=None,
        description="What the command asks for (its name and payload), hashed; filled in "
        "when not given. A command id seen again with another fingerprint is a reused key.",
    )
    sent_by: str | None = Field(
        default=None,
        max_length=160,
        description="Who sent it, as `role:subject` (`customer:ada`); None when it came from "
        "inside (a saga) or before callers were recorded.",
    )
    reads_large_state: bool = Field(
        default=False,
        description="The sender, when it waits, reads a state larger than an update's "
        "answer carries itself (`Snapshot.state_omitted`). Senders from before it could not: "
        "they are answered with the whole state, as they were.",
    )
    publishes: bool = Field(
        default=False,
        description="The sender publishes the answer to its update itself (the snapshot with "
        "its changes, `CommandResult.publication`), and retries until it has, or asks the "
        "entity to (`PUBLISH_SIGNAL`): a saga's request, which its workflow retries until "
        "answered. The entity then leaves that publish out. Entities from before it ignore "
        "it and publish as they did.",
    )

    @model_validator(mode="after")
    def _fingerprinted(self) -> CommandEnvelope:
        if self.fingerprint is None:
            self.fingerprint = command_fingerprint(self.name, self.payload)
        return self


MAX_COMMAND_NAME = 64
MAX_FINGERPRINT = 64


def outsized(envelope: CommandEnvelope) -> str | None:
    """Why an envelope's name, `undoes` or fingerprint is too long to be recorded, or None.
    Recorded with its refusal, a 400,000-character name outweighed an entity's whole ledger,
    which forgot every other command to hold it. Asked by entities from rules level 5 on
    (`entity-rules-5`), and only of an envelope that has such a field."""
    for field, value, most in (
        ("name", envelope.name, MAX_COMMAND_NAME),
        ("undoes", envelope.undoes, MAX_COMMAND_ID),
        ("fingerprint", envelope.fingerprint, MAX_FINGERPRINT),
    ):
        if value is not None and len(value) > most:
            return f"unreadable command: {field}: at most {most} characters"
    return None


def command_fingerprint(name: str, payload: dict[str, Any]) -> str:
    """A short hash of a command's name and payload, the same for the same command however
    its payload's keys are ordered."""
    canonical = json.dumps([name, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


class OutcomeStatus(StrEnum):
    APPLIED = "APPLIED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"


class Outcome(BaseModel):
    """What became of one command: applied at a revision, or rejected with a code."""

    command_id: str
    status: OutcomeStatus
    revision: int = 0
    code: str | None = None
    message: str | None = None
    fingerprint: str | None = Field(
        default=None, description="The command's fingerprint; None in outcomes recorded before."
    )
    sent_by: str | None = Field(default=None, description="Who sent it (`role:subject`).")
    command: str | None = Field(default=None, description="The command's name.")
    at: datetime | None = Field(default=None, description="When the entity settled it.")

    @model_serializer(mode="wrap")
    def _without_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out empty fields: a full ledger of 4,096 outcomes travels in every
        continue-as-new, and most outcomes have no code and no message."""
        dumped: dict[str, Any] = handler(self)
        return {name: value for name, value in dumped.items() if value is not None}


MAX_HISTORY_PAGE = 100


MAX_COMMAND_ID = 512
"""The longest command id an entity takes (`entities.runtime.inbox.COMMAND_ID`)."""
SYSTEM_COMMAND_PREFIXES = ("bulk:", "checkout:", "other-running:", "timer:", "webhook:")
"""How the command ids Tenure makes itself begin: a bulk command's, a checkout's steps, the
command an entity applies when a workflow it starts runs already (`IfOtherRunning`), a
deadline's, an inbound webhook's. A client's idempotency key may not begin so, or it could
take one of them first, and the entity would take Tenure's own command as its repeat."""


def same_sender(recorded: str | None, sender: str | None) -> bool:
    """Whether a command id recorded as sent by `recorded` is `sender`'s own: the same
    sender, or one of them unknown (commands from inside, or from before senders were
    recorded), which is taken as the same, as it always was."""
    return recorded is None or sender is None or recorded == sender


def sender_key(sender: str, command_id: str) -> str:
    """The id under which an entity records `sender`'s command `command_id` when another
    sender's command took that id first: an idempotency key is its sender's own. Shown to
    clients as the key they sent (`shown_key`)."""
    return f"{sender}/{command_id}"


SENDER_ROLES = frozenset(
    {
        *(role.value for role in Role),
        OTHER_RUNNING_SENDER.partition(":")[0],
        saga_sender("").partition(":")[0],
    }
)
"""The roles a sender is recorded with (`role:subject`): a client's (`Role`), the runtime's
own (`OTHER_RUNNING_SENDER`), and a saga's (`saga_sender`)."""


def shaped_as_sender_key(key: str) -> bool:
    """Whether `key` reads as a sender's own id (`sender_key`): `role:subject/...` with a
    role of SENDER_ROLES. A client's key so shaped takes that id first: a customer who sent
    deposits under `fee-1` and `service:billing/fee-1` had billing's fee under `fee-1` dropped
    as a repeat. `orders/7` and `order:7` are not so shaped."""
    sender, slash, _ = key.partition("/")
    role, colon, _ = sender.partition(":")
    return bool(slash and colon) and role in SENDER_ROLES


def listed_id(command_id: str, sender: str | None, subject_shown: bool) -> str:
    """The id a command is listed under: its own, or, recorded under its sender's own id
    (`sender_key`) for a caller who may not see the sender's subject, the sender's role
    before the key (`service/fee-1`), as a history hides that subject."""
    if subject_shown or sender is None or not command_id.startswith(f"{sender}/"):
        return command_id
    role = sender.partition(":")[0]
    return f"{role}/{command_id.removeprefix(f'{sender}/')}"


def listed_as(outcome: Outcome, listed: str) -> bool:
    """Whether `listed`, a history's cursor, names this outcome, as any caller saw it."""
    hidden = listed_id(outcome.command_id, outcome.sent_by, subject_shown=False)
    return listed in (outcome.command_id, hidden)


class HistoryPage(BaseModel):
    """Which of an entity's recent commands to list: the `last` ones, newest first, older
    than the command `before` when given."""

    last: int = Field(default=20, ge=1, le=MAX_HISTORY_PAGE)
    before: str | None = Field(default=None, max_length=MAX_COMMAND_ID)


class CommandHistory(BaseModel):
    """A page of an entity's recent commands, newest first; `has_older` when the entity
    still remembers commands older than the page; `before_found` False when the page was
    asked for before a command the entity does not remember (then it is empty)."""

    entries: list[Outcome]
    has_older: bool
    before_found: bool = True


class Snapshot(BaseModel):
    """An entity's state at a revision, as queried, cached and served."""

    entity_type: str
    entity_id: str
    revision: int
    updated_at: datetime | None = None
    state: dict[str, Any] | None = None
    closed: bool = False
    incarnation: int = Field(
        default=0,
        description="When this entity's workflow chain began, in epoch milliseconds. An id "
        "used again once retention has deleted its closed workflow is a new incarnation, "
        "whose revisions count from 1 again; 0 in snapshots made before incarnations.",
    )
    state_omitted: bool = Field(
        default=False,
        description="The state was left out of this answer, `state` None, because it is "
        "larger than an update's answer carries (`INLINE_STATE_BYTES`): read it from the "
        "cache or the entity. Never cached.",
    )


class Publication(BaseModel):
    """What an entity publishes: its snapshot, and the changes it made since the revision
    it last published (`since`), one applied command or fired timer each, oldest first,
    as many as it still remembers (the change stream marks the rest as a gap).

    A publish scheduled before changes were streamed carried the bare snapshot; it still
    decodes, as a publication with no changes (`changes` None), which streams nothing."""

    snapshot: Snapshot
    since: int = 0
    changes: list[Outcome] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_snapshot(cls, data: Any) -> Any:
        if isinstance(data, dict) and "snapshot" not in data and "entity_type" in data:
            return {"snapshot": data}
        return data


class CommandResult(BaseModel):
    """A command's outcome together with the entity state after it."""

    outcome: Outcome
    snapshot: Snapshot
    since: int = 0
    changes: list[Outcome] | None = Field(
        default=None,
        description="To a sender that publishes (`CommandEnvelope.publishes`), the changes "
        "after revision `since`, the last the entity knows published, for the sender to "
        "publish with the snapshot; None when the entity publishes them itself.",
    )

    def publication(self) -> Publication | None:
        """What the sender is to publish, if anything."""
        if self.changes is None:
            return None
        return Publication(snapshot=self.snapshot, since=self.since, changes=self.changes)


class CommandResults(BaseModel):
    """The outcomes of commands applied together (`EntityWorkflow.apply_batch`), in the order
    they came, with the entity state after the last of them."""

    outcomes: list[Outcome]
    snapshot: Snapshot
    since: int = 0
    changes: list[Outcome] | None = None

    def results(self) -> list[CommandResult]:
        """Each command's result, all with the state after the last of them."""
        return [
            CommandResult(
                outcome=outcome, snapshot=self.snapshot, since=self.since, changes=self.changes
            )
            for outcome in self.outcomes
        ]


class RuntimeOptions(BaseModel):
    """How the runtime hosts an entity; set by whoever starts it, carried across runs."""

    max_commands_per_run: int = Field(default=4000, ge=1)
    max_updates_per_run: int = Field(
        default=1500,
        ge=1,
        le=1900,
        description="Commands a run takes as updates before it continues as new: Temporal "
        "refuses a run's 2,001st update, and its senders would fall back to a signal.",
    )
    ledger_size: int = Field(default=4096, ge=1)
    max_commands_per_task: int = Field(
        default=256,
        ge=1,
        description="Commands one workflow task applies; more that came with it are held "
        "and applied in the tasks after it, in order (entities/runtime/backlog.py). A task "
        "must end within the SDK's 2 s deadlock bound, or it fails on every retry.",
    )
    max_state_bytes: int = Field(
        default=512 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="The most an entity's state may weigh as JSON, in UTF-8 bytes; a command "
        "whose result would weigh more is refused (LIMIT_REACHED). It travels in every "
        "snapshot and in the continue-as-new input, which Temporal refuses past 2 MB, "
        "failing the workflow task "
        "for good; each entity type bounds its collections well under the default, and this "
        "refuses any command whose result would not fit, whatever a type forgot.",
    )
    publish_snapshots: bool = True
    publish_interval_seconds: float = Field(
        default=0.0,
        ge=0,
        description="0: the runtime's default (runs from entity-publish-offers on: 2 s, "
        "each change between offered to the worker; runs begun before: publish after every "
        "workflow task). Above 0: two publishes by activity back to back, then at most one "
        "per interval while commands keep coming, the last change brought by a timer, and "
        "each change between offered to the worker (runs from entity-publish-offers on).",
    )


class EntityRunInput(BaseModel):
    """Input of one entity workflow run; continue-as-new carries the state forward in it."""

    entity_id: str
    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)
    options: dict[str, Any] = Field(default_factory=dict)
    state: dict[str, Any] | None = None
    revision: int = 0
    updated_at: datetime | None = None
    ledger: list[Outcome] = Field(default_factory=list)
    ledger_forgot_through: datetime | None = Field(
        default=None,
        description="The newest time of an outcome the ledger has forgotten (`Ledger`); "
        "not given by runs before it was kept.",
    )
    published_revision: int = 0
    incarnation: int | None = Field(
        default=None, description="Set by the first run of the chain and carried from then on."
    )
    effects: list[StartWorkflow] = Field(
        default_factory=list, description="Effects the previous run had not yet carried out."
    )
    timers: list[Outcome] = Field(
        default_factory=list,
        description="Changes the entity's timer made that the previous run had not yet "
        "published, for the change stream.",
    )
