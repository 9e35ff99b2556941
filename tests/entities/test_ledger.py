"""The idempotency ledger is bounded and keeps the newest outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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


def test_what_it_evicts_while_asked_to_keep_it_is_recalled_until_dropped() -> None:
    """While commands are held back, what the ledger evicts can still be recalled, not
    listed nor carried; once dropped, it is forgotten, and nothing more is kept."""
    ledger = Ledger(2)
    ledger.record(outcome(0))
    ledger.record(outcome(1))
    ledger.record(outcome(2))  # c0 evicted before anything was kept
    ledger.keep_evicted()
    for n in range(3, 6):
        ledger.record(outcome(n))
    assert ledger.recall("c0") is None
    assert [ledger.recall(f"c{n}") for n in (1, 2, 3)] == [outcome(1), outcome(2), outcome(3)]
    assert "c1" not in ledger and [e.command_id for e in ledger.entries()] == ["c4", "c5"]
    ledger.drop_evicted()
    ledger.record(outcome(6))
    assert ledger.recall("c1") is None and ledger.recall("c4") is None


def test_what_was_kept_before_a_held_command_came_is_let_go() -> None:
    """What is kept is bounded by what was applied since the oldest command still held came
    (the eviction number it was held at): under a steady flood it no longer grows with all
    the flood brought."""
    ledger = Ledger(1)
    ledger.keep_evicted()
    for n in range(6):
        ledger.record(outcome(n))  # c0..c4 evicted, numbered 0..4
    assert ledger.evictions == 5
    ledger.drop_evicted_before(3)
    assert [ledger.recall(f"c{n}") is not None for n in range(5)] == [False] * 3 + [True] * 2
    ledger.record(outcome(0))  # c0 again, evicting c5 (number 5)
    ledger.record(outcome(7))  # evicting c0 (number 6)
    ledger.drop_evicted_before(6)
    assert [n for n in (0, 3, 4, 5) if ledger.recall(f"c{n}")] == [0]


def test_ledger_round_trips_through_its_entries() -> None:
    ledger = Ledger(4, [outcome(n) for n in range(6)])
    again = Ledger(4, ledger.entries())
    assert again.entries() == ledger.entries()


def test_ledger_keeps_fewer_outcomes_when_they_would_weigh_too_much() -> None:
    heavy = [
        Outcome(
            command_id=f"{n:0>128}",
            status=OutcomeStatus.REJECTED,
            code="INSUFFICIENT_FUNDS",
            message="m" * 300,
            sent_by="customer:" + "s" * 128,
        )
        for n in range(4096)
    ]
    ledger = Ledger(4096, heavy, max_bytes=640 * 1024)
    # The newest are kept, as many as fit: what travels in continue-as-new stays small.
    assert 0 < len(ledger) < 4096
    assert ledger.entries()[-1] == heavy[-1]
    serialized = sum(len(entry.model_dump_json()) for entry in ledger.entries())
    assert serialized <= 640 * 1024


def test_ledger_weighs_bytes_as_temporal_does_and_characters_for_runs_from_before() -> None:
    """4,096 refusals naming a sender in emoji weigh about 1 MB as JSON, though 580 K
    characters: the ledger keeps what fits in its 640 KiB of bytes (each of its bounded
    fields up to four times its characters could otherwise take it, with a state, past
    Temporal's 2 MB). A run begun when it counted characters counts them still."""
    wide = [
        Outcome(
            command_id=f"{n:0>16}",
            status=OutcomeStatus.REJECTED,
            message="m",
            sent_by="customer:" + "\N{GRINNING FACE}" * 40,
        )
        for n in range(4096)
    ]
    ledger = Ledger(4096, wide, max_bytes=640 * 1024)
    encoded = sum(len(entry.model_dump_json().encode()) for entry in ledger.entries())
    assert encoded <= 640 * 1024 and ledger.entries()[-1] == wide[-1]
    asked: list[bool] = []

    def counts_characters() -> bool:
        asked.append(False)
        return False

    before = Ledger(4096, wide, max_bytes=640 * 1024, bytes_=counts_characters)
    assert len(before) == 4096 > len(ledger) and asked
    asked.clear()
    Ledger(4096, [outcome(n) for n in range(10)], bytes_=counts_characters)
    assert not asked  # ASCII weighs the same either way: nothing asked


T0 = datetime(2026, 12, 1, tzinfo=UTC)


def at(n: int) -> Outcome:
    return outcome(n).model_copy(update={"at": T0 + timedelta(seconds=n)})


def test_a_ledger_knows_how_recent_what_it_forgot_is() -> None:
    """An undone command absent from it never came only if it was sent after the newest
    outcome the ledger forgot; before that, its absence tells nothing."""
    ledger = Ledger(3, [at(n) for n in range(3)])
    assert ledger.forgot_through is None
    assert not ledger.may_have_forgotten(None)  # it has forgotten nothing
    ledger.record(at(3))
    ledger.record(at(4))
    assert ledger.forgot_through == T0 + timedelta(seconds=1)
    assert ledger.may_have_forgotten(T0 + timedelta(seconds=1))
    assert ledger.may_have_forgotten(None)
    assert not ledger.may_have_forgotten(T0 + timedelta(seconds=2))
    # Carried across continue-as-new as told.
    again = Ledger.carried(3, ledger.entries(), ledger.forgot_through, told=True, now=T0)
    assert again.forgot_through == ledger.forgot_through


def test_a_full_ledger_from_a_run_that_did_not_tell_what_it_forgot_is_taken_to_have() -> None:
    full = [at(n) for n in range(5, 8)]
    later = T0 + timedelta(days=1)
    carried = Ledger.carried(3, full, None, told=False, now=later)
    assert carried.forgot_through == T0 + timedelta(seconds=5)
    assert Ledger.carried(4, full, None, told=False, now=later).forgot_through is None
    undated = [outcome(n) for n in range(3)]
    assert Ledger.carried(3, undated, None, told=False, now=later).forgot_through == later


def test_an_outcome_without_a_time_is_taken_as_older_than_the_oldest_with_one() -> None:
    """Outcomes from before they kept a time: evicted, one made `forgot_through` the end of
    time, and every compensation that could not find its command was refused for good."""
    ledger = Ledger(3, [outcome(0), at(10), at(11)])
    ledger.record(at(12))
    assert ledger.forgot_through == T0 + timedelta(seconds=10)
    assert not ledger.may_have_forgotten(T0 + timedelta(seconds=11))


def test_a_ledger_handed_over_with_no_times_is_bounded_by_its_hand_over() -> None:
    """Outcomes from before they kept a time, handed to a run with a smaller ledger: those
    evicted made `forgot_through` the end of time, refusing every compensation for good."""
    later = T0 + timedelta(days=1)
    ledger = Ledger.carried(2, [outcome(n) for n in range(4)], None, told=True, now=later)
    assert ledger.forgot_through == later
