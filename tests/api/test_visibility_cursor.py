"""Where a list read from Temporal's visibility resumes (`api.visibility.VisibilityCursor`):
the rows around a cursor change while an operator pages (a checkout resolved, one more
FAILED), and a cursor counting rows from the top of a page skipped a FAILED checkout once the
one above it was resolved. The pages here are given (the cursor's arithmetic alone); the
pages of a real Temporal are tests/api/test_checkout_operations.py's."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest

from api.listing import MAX_PAGE
from api.visibility import ABOVE, VisibilityCursor, _check
from entities.errors import ErrorCode, TenureError


@dataclass(frozen=True)
class Row:
    id: str
    run_id: str


def rows(*names: str) -> list[Row]:
    return [Row(name, f"run-{name}") for name in names]


def resumed(cursor: VisibilityCursor, page: list[Row]) -> list[str]:
    """The rows of `page` a list resuming at `cursor` shows."""
    return [row.id for row in page[cursor.resume_in(page) :]]


def test_the_cursor_after_a_page_s_last_row_is_the_next_page_s_token() -> None:
    start = VisibilityCursor(None, 3, 0, "", "checkouts")
    page = rows("a", "b", "c")
    assert start.after(page, 2, b"next") == VisibilityCursor(b"next", 3, 0, "", "checkouts")
    # The last page has no next: its cursor finds its row again.
    last = start.after(page, 2, None)
    assert (last.token, last.seen, last.row) == (None, 3, "run-c")


def test_a_cursor_inside_a_page_resumes_after_its_row_wherever_it_moved() -> None:
    cursor = VisibilityCursor(None, 4, 0, "", "checkouts").after(rows("a", "b", "c", "d"), 1, b"n")
    assert (cursor.seen, cursor.row) == (2, "run-b")
    # One more above it: its row moved down one.
    assert cursor.resume_in(rows("new", "a", "b", "c")) == 3
    # The one above it resolved: moved up one. Counting alone skipped "c" here.
    assert cursor.resume_in(rows("b", "c", "d", "e")) == 1
    # Its own row resolved: after the rows above it still there.
    assert rows("a", "c", "d", "e")[cursor.resume_in(rows("a", "c", "d", "e"))].id == "c"


def test_a_cursor_whose_row_and_rows_above_it_left_skips_none_after_it() -> None:
    page = rows("a", "b", "c", "d", "e", "f")
    cursor = VisibilityCursor(None, 6, 0, "", "checkouts").after(page, 3, b"n")
    assert (cursor.seen, cursor.row) == (4, "run-d")
    # "b" and its own "d" resolved while the operator read: resuming one row sooner than
    # it had seen (3 of 4) skipped "e".
    left = rows("a", "c", "e", "f")
    assert resumed(cursor, left) == ["e", "f"]
    # Every row it had seen resolved, one more came above: from the top, a row shown that
    # came meanwhile rather than one missed.
    fresh = rows("new", "e", "f")
    assert resumed(cursor, fresh) == ["new", "e", "f"]
    # As the client sends it back.
    again = VisibilityCursor.decode(cursor.encode(), 100, "checkouts")
    assert again == cursor and resumed(again, left) == ["e", "f"]


def test_the_cursors_of_a_page_of_the_most_rows_stay_small() -> None:
    page = [Row(str(i), f"{i:08x}-0000-4000-8000-{i:012x}") for i in range(MAX_PAGE)]
    start = VisibilityCursor(b"t" * 1500, MAX_PAGE, 0, "", "checkouts")
    # Every row's cursor names at most ABOVE rows above its own: a page of 100 rows once
    # carried 117 KB of cursors, and a long visibility token pushed the last ones past
    # the bound a cursor is read under, refused as not a cursor of this list.
    cursors = [start.after(page, i, None) for i in range(MAX_PAGE)]
    assert max(len(cursor.encode()) for cursor in cursors) <= 4096
    for cursor in cursors:
        assert VisibilityCursor.decode(cursor.encode(), MAX_PAGE, "checkouts") == cursor
    # More than ABOVE rows above it, and its own, left between two reads: from the top.
    last = cursors[-1]
    kept = [*page[: MAX_PAGE - ABOVE - 2], Row("new", "run-new")]
    assert last.resume_in(kept) == 0


def test_a_cursor_s_digests_are_as_its_list_made_them() -> None:
    cursor = VisibilityCursor(None, 4, 0, "", "checkouts").after(rows("a", "b", "c", "d"), 1, b"n")
    fields = json.loads(base64.urlsafe_b64decode(cursor.encode()))[:-1]
    for above in ("", fields[5][:-1], fields[5].upper(), fields[5] + "0" * 12):
        altered = [*fields[:5], above]
        encoded = base64.urlsafe_b64encode(json.dumps([*altered, _check(altered)]).encode())
        with pytest.raises(TenureError) as refused:
            VisibilityCursor.decode(encoded.decode(), 100, "checkouts")
        assert refused.value.code is ErrorCode.INVALID_INPUT, above


def test_a_cursor_is_its_own_list_s() -> None:
    cursor = VisibilityCursor(b"token", 10, 4, "run-x", "checkouts").encode()
    assert VisibilityCursor.decode(cursor, 100, "checkouts").row == "run-x"
    with pytest.raises(TenureError) as refused:
        VisibilityCursor.decode(cursor, 100, "bulkCommands")
    assert refused.value.code is ErrorCode.INVALID_INPUT
    # One made before cursors named the rows above theirs, or their row and list, is taken
    # as it was.
    before = [base64.b64encode(b"token").decode(), 10, 4, "run-x", "checkouts"]
    made = base64.urlsafe_b64encode(json.dumps([*before, _check(before)]).encode()).decode()
    assert VisibilityCursor.decode(made, 100, "checkouts") == VisibilityCursor(
        b"token", 10, 4, "run-x", "checkouts"
    )
    old = [base64.b64encode(b"token").decode(), 10, 4]
    encoded = base64.urlsafe_b64encode(json.dumps(old).encode()).decode()
    assert VisibilityCursor.decode(encoded, 100, "bulkCommands") == VisibilityCursor(
        b"token", 10, 4, "", "bulkCommands"
    )


def test_a_cursor_altered_is_refused_as_input() -> None:
    """A cursor whose token was altered reached Temporal, which asked it to be sent again:
    the list answered UNAVAILABLE after 5 s, "try again", and counted towards the page
    alert."""
    cursor = VisibilityCursor(b"token", 10, 4, "run-x", "checkouts").encode()
    fields = json.loads(base64.urlsafe_b64decode(cursor))
    fields[0] = base64.b64encode(b"tokeN").decode()
    altered = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()
    with pytest.raises(TenureError) as refused:
        VisibilityCursor.decode(altered, 100, "checkouts")
    assert refused.value.code is ErrorCode.INVALID_INPUT


def test_a_cursor_nested_deep_is_refused_as_input() -> None:
    """JSON nested thousands deep fits a cursor's 4,096 characters; its decoding ran out of
    stack, and the list answered INTERNAL."""
    deep = base64.urlsafe_b64encode(b"[" * 3000).decode()
    assert len(deep) <= 4096
    with pytest.raises(TenureError) as refused:
        VisibilityCursor.decode(deep, 100, "checkouts")
    assert refused.value.code is ErrorCode.INVALID_INPUT
