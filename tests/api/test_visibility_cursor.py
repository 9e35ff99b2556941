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

from api.visibility import VisibilityCursor
from entities.errors import ErrorCode, TenureError


@dataclass(frozen=True)
class Row:
    id: str
    run_id: str


def rows(*names: str) -> list[Row]:
    return [Row(name, f"run-{name}") for name in names]


def test_the_cursor_after_a_page_s_last_row_is_the_next_page_s_token() -> None:
    start = VisibilityCursor(None, 3, 0, "", "checkouts")
    page = rows("a", "b", "c")
    assert start.after(page, 2, b"next") == VisibilityCursor(b"next", 3, 0, "", "checkouts")
    # The last page has no next: its cursor finds its row again.
    assert start.after(page, 2, None) == VisibilityCursor(None, 3, 3, "run-c", "checkouts")


def test_a_cursor_inside_a_page_resumes_after_its_row_wherever_it_moved() -> None:
    cursor = VisibilityCursor(None, 4, 0, "", "checkouts").after(rows("a", "b", "c", "d"), 1, b"n")
    assert (cursor.seen, cursor.row) == (2, "run-b")
    # One more above it: its row moved down one.
    assert cursor.resume_in(rows("new", "a", "b", "c")) == 3
    # The one above it resolved: moved up one. Counting alone skipped "c" here.
    assert cursor.resume_in(rows("b", "c", "d", "e")) == 1
    # Its own row resolved: one row sooner, a row shown again rather than one missed.
    assert rows("a", "c", "d", "e")[cursor.resume_in(rows("a", "c", "d", "e"))].id == "c"


def test_a_cursor_is_its_own_list_s() -> None:
    cursor = VisibilityCursor(b"token", 10, 4, "run-x", "checkouts").encode()
    assert VisibilityCursor.decode(cursor, 100, "checkouts").row == "run-x"
    with pytest.raises(TenureError) as refused:
        VisibilityCursor.decode(cursor, 100, "bulkCommands")
    assert refused.value.code is ErrorCode.INVALID_INPUT
    # One made before cursors named their row and list is taken as it was.
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
