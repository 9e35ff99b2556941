"""Reading the commands a signal brings, including the ones that cannot be read.

The SDK drops a signal whose input does not decode to its handler's type, with a log line
and nothing else, so a command sent straight through Temporal with a malformed envelope was
lost without an outcome (docs/signals.md promises `REJECTED`). The entity's signals take
their input raw and read it here: an envelope that reads is a command; one that does not,
but names a sound `command_id`, is refused under that id (`INVALID_INPUT`, with why), so its
sender can ask its outcome; one with no sound id cannot be recorded anywhere, and is only
logged and counted. A `commands` batch is read envelope by envelope, so one bad envelope no
longer drops the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from temporalio.converter import PayloadConverter

from entities.runtime.envelope import MAX_COMMAND_ID, CommandEnvelope

COMMAND_ID = re.compile(rf"[\x20-\x7e]{{1,{MAX_COMMAND_ID}}}")
"""A command id an entity takes: 1 to 512 printable ASCII characters. The API's idempotency
keys are at most 128, with no spaces; Tenure's own ids are longer (a bulk command's
`bulk:<bulk id>:<entity id>`, a checkout's steps)."""
COMMAND_ID_RULE = f"1 to {MAX_COMMAND_ID} printable ASCII characters"
"""What a refusal of a command id says it must be."""
MAX_REASON = 300


@dataclass(frozen=True)
class Unreadable:
    """A command whose envelope could not be read: its id when that alone is sound (None:
    nothing can be recorded), what else it said of itself, and why it was refused.
    `envelope` is the command when only its id is unsound, which runs begun before ids were
    checked applied all the same."""

    command_id: str | None
    name: str | None
    sent_by: str | None
    reason: str
    envelope: CommandEnvelope | None = None


Received = CommandEnvelope | Unreadable


def read_command(converter: PayloadConverter, payload: Any) -> Received:
    """The command in one `command` signal's payload."""
    try:
        envelope: CommandEnvelope = converter.from_payload(payload, CommandEnvelope)
    except Exception:  # what reads it again below says why
        pass
    else:
        return _checked(envelope)
    try:
        value = converter.from_payload(payload, Any)
    except Exception as exc:
        return Unreadable(None, None, None, _reason(exc))
    return read_value(value)


def read_commands(converter: PayloadConverter, payload: Any) -> list[Received] | None:
    """The commands of one `commands` signal's payload, in order; None if it is not a JSON
    list at all."""
    try:
        envelopes: list[CommandEnvelope] = converter.from_payload(payload, list[CommandEnvelope])
    except Exception:
        pass
    else:
        return [_checked(envelope) for envelope in envelopes]
    try:
        values = converter.from_payload(payload, Any)
    except Exception:
        return None
    if not isinstance(values, list):
        return None
    return [read_value(value) for value in values]


def read_value(value: Any) -> Received:
    """One envelope, decoded from JSON but not yet checked."""
    try:
        return _checked(CommandEnvelope.model_validate(value))
    except ValidationError as exc:
        said = value if isinstance(value, dict) else {}
        return Unreadable(
            _sound_id(said.get("command_id")),
            _text(said.get("name"), 64),
            _text(said.get("sent_by"), 160),
            _reason(exc),
        )


def _checked(envelope: CommandEnvelope) -> Received:
    if _sound_id(envelope.command_id) is not None:
        return envelope
    reason = f"unreadable command: command_id: {COMMAND_ID_RULE}"
    return Unreadable(None, envelope.name[:64], envelope.sent_by, reason, envelope)


def _sound_id(value: object) -> str | None:
    return value if isinstance(value, str) and COMMAND_ID.fullmatch(value) else None


def _text(value: object, most: int) -> str | None:
    return value[:most] if isinstance(value, str) else None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = [
            f"{'.'.join(str(part) for part in error['loc']) or 'envelope'}: {error['msg']}"
            for error in exc.errors(include_url=False)[:3]
        ]
        reason = "; ".join(parts)
    else:
        reason = f"not a JSON command envelope ({type(exc).__name__})"
    return f"unreadable command: {reason}"[:MAX_REASON]
