"""Command envelopes: the fingerprint that tells a retried command from a reused key."""

from __future__ import annotations

from entities.runtime.envelope import CommandEnvelope


def envelope(
    name: str, payload: dict[str, object], fingerprint: str | None = None
) -> CommandEnvelope:
    return CommandEnvelope(command_id="k", name=name, payload=payload, fingerprint=fingerprint)


def test_the_same_command_has_the_same_fingerprint_whatever_its_key_order() -> None:
    first = envelope("deposit", {"amount": 5, "note": "rent"})
    assert first.fingerprint == envelope("deposit", {"note": "rent", "amount": 5}).fingerprint


def test_another_payload_or_command_has_another_fingerprint() -> None:
    first = envelope("deposit", {"amount": 5})
    assert first.fingerprint != envelope("deposit", {"amount": 6}).fingerprint
    assert first.fingerprint != envelope("withdraw", {"amount": 5}).fingerprint


def test_a_fingerprint_sent_along_is_kept_and_survives_a_round_trip() -> None:
    sent = envelope("deposit", {"amount": 5})
    assert CommandEnvelope.model_validate_json(sent.model_dump_json()) == sent
    assert envelope("deposit", {"amount": 5}, fingerprint="given").fingerprint == "given"
