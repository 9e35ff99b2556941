"""The idempotency ledger is bounded and keeps the newest outcomes."""

from __future__ import annotations

from entities.runtime.envelope import Outcome, OutcomeStatus
from entities.runtime.ledger import Ledger


def outcome(n: int) -> Outcome:
    return Outcome(command_id=f"c{n}", status=OutcomeStatus.APPLIED, revision=n)


def test_ledger_remembers_outcomes_by_command_id() -> None:
    ledger = Ledger(10, [outcome(1), outcome(2)])
    assert "c1" in ledger
    found = ledger.get("c2")
    assert found is not None and found.revision == 2
    assert ledger.get("c3") is None


def test_ledger_evicts_the_oldest_beyond_its_capacity() -> None:
    ledger = Ledger(3)
    for n in range(5):
        ledger.record(outcome(n))
    assert len(ledger) == 3
    assert [e.command_id for e in ledger.entries()] == ["c2", "c3", "c4"]
    assert "c1" not in ledger


def test_ledger_round_trips_through_its_entries() -> None:
    ledger = Ledger(4, [outcome(n) for n in range(6)])
    again = Ledger(4, ledger.entries())
    assert again.entries() == ledger.entries()
