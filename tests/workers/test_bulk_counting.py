"""How a page's counting reads the change stream: pure parts, no servers."""

from __future__ import annotations

from entities.bulk import PageToSend, bulk_command_id
from workers.bulk import _of_bulk, _Tally


def test_a_bulk_s_progress_is_its_own_and_not_that_of_a_bulk_whose_key_extends_its_key() -> None:
    ours = bulk_command_id("a", "")
    assert _of_bulk(bulk_command_id("a", "acct-1"), ours)
    assert not _of_bulk(bulk_command_id("a:b", "acct-1"), ours)  # bulk "a:b", not "a"
    assert not _of_bulk(bulk_command_id("ab", "acct-1"), ours)
    assert not _of_bulk("dep-1", ours)


def test_each_command_of_a_page_is_counted_once_however_its_outcome_is_learnt() -> None:
    page = PageToSend(
        bulk_id="b",
        entity_type="account",
        command="deposit",
        payload={"amount": 1},
        ids=["x", "y"],
        sent_by=None,
        window=5,
    )
    tally = _Tally("deposit")
    tally.expect(page)
    x = bulk_command_id("b", "x")
    assert tally.applied(x, "deposit")
    assert not tally.applied(x, "deposit")  # seen again in the stream: counted once
    assert not tally.applied(bulk_command_id("b", "y"), "withdraw")  # another command
    assert tally.unsettled() == ["y"]
    assert (tally.sent.done, tally.sent.applied) == (1, 1)
