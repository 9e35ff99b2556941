"""Lists read from Temporal's visibility, page by page: Temporal pages a list with its own
tokens, so a cursor is a page's token and a place in that page. Every call is bounded, and
an unanswered one is UNAVAILABLE to whoever maps `RPCError`s."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError, RPCStatusCode

from api.listing import MAX_PAGE
from entities.errors import ErrorCode, TenureError
from workers.temporal import within

TEMPORAL_TIMEOUT = 5.0
MAX_PAGES_READ = 4  # visibility pages one list may read to fill its page


class Listed(Protocol):
    """A row of a visibility list, as a cursor knows it (a `WorkflowExecution`)."""

    @property
    def run_id(self) -> str: ...


@dataclass(frozen=True)
class VisibilityCursor:
    """Where a list resumes: after `seen` rows of the visibility page at `token`, read
    `size` rows at a time; the row it follows is `row` (its run id), found again by it, and
    `above` names (`row_digest`) that row and the rows above it in the page.

    A cursor after a page's last row is the next page's token, which Temporal keys on that
    row's place in the order, so it stands whatever changes above it. One inside a page
    finds its row again by its run id; when that row has left the list (a checkout
    resolved), it resumes after the nearest of the ABOVE rows above it that is still there,
    or at the top of the page when none is, showing rows again rather than missing one.
    Counting alone skipped a FAILED checkout once the one above it was resolved; resuming
    one row sooner skipped one once two were. `above` holds the digests of its row and of
    up to ABOVE rows above it, the farthest first: every row's cursor carries them, so a
    page's cursors grow with ABOVE, not with the page."""

    token: bytes | None
    size: int
    seen: int
    row: str = ""
    list_name: str = ""
    above: str = ""

    def encode(self) -> str:
        token = base64.b64encode(self.token).decode() if self.token else ""
        fields: list[object] = [token, self.size, self.seen, self.row, self.list_name]
        if self.above:
            fields.append(self.above)
        document = json.dumps([*fields, _check(fields)], separators=(",", ":"))
        return base64.urlsafe_b64encode(document.encode()).decode()

    def after(
        self, page: Sequence[Listed], index: int, following: bytes | None
    ) -> VisibilityCursor:
        """The cursor after row `index` of `page`, read at this cursor's token, whose next
        page is at `following`."""
        if index + 1 == len(page) and following is not None:
            return self.next_page(following)
        nearest = page[max(index - ABOVE, 0) : index + 1]
        above = "".join(row_digest(execution.run_id) for execution in nearest)
        return VisibilityCursor(
            self.token, self.size, index + 1, page[index].run_id, self.list_name, above
        )

    def resume_in(self, page: Sequence[Listed]) -> int:
        """Where the rows after the cursor begin in `page`, read at its token."""
        if not self.row:
            return min(self.seen, len(page))
        for index, execution in enumerate(page):
            if execution.run_id == self.row:
                return index + 1
        if not self.above:  # a cursor made before cursors named the rows above theirs
            return min(max(self.seen - 1, 0), len(page))
        found = {row_digest(execution.run_id): i for i, execution in enumerate(page)}
        digests = [self.above[i : i + DIGEST] for i in range(0, len(self.above), DIGEST)]
        for digest in reversed(digests):  # the nearest first
            if digest in found:
                return found[digest] + 1
        return 0

    def next_page(self, following: bytes) -> VisibilityCursor:
        """The cursor at the top of the next page, at its token `following`."""
        return VisibilityCursor(following, self.size, 0, "", self.list_name)

    @classmethod
    def start(
        cls, after: str | None, first: int, max_size: int, list_name: str
    ) -> VisibilityCursor:
        """Where a page of `first` rows of the list `list_name` starts: after the cursor
        `after`, or at the top of the list, read `first` rows at a time. INVALID_INPUT when
        `first` is not from 0 to `max_size`, or `after` is not a cursor of this list read at
        most `max_size` rows at a time."""
        if not 0 <= first <= max_size:
            raise TenureError(ErrorCode.INVALID_INPUT, f"first: from 0 to {max_size}")
        if after is None:
            return cls(None, max(first, 1), 0, "", list_name)
        return cls.decode(after, max_size, list_name)

    @classmethod
    def decode(cls, cursor: str, max_size: int = MAX_PAGE, list_name: str = "") -> VisibilityCursor:
        """A cursor, of the list `list_name`, as it was made (its check): a token altered
        or cut short reached Temporal, which asked it to be sent again, and the list
        answered UNAVAILABLE after 5 s. One made before cursors named their row and list
        (three fields), or the rows above their row (six), is taken as it was."""
        try:
            if len(cursor) > 4096:
                raise ValueError
            fields = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            if not isinstance(fields, list) or len(fields) not in (3, 6, 7):
                raise ValueError
            if len(fields) > 3 and fields.pop() != _check(fields):
                raise ValueError
            token, size, seen, row, made_for, above = [*fields, "", list_name, ""][:6]
            if not (isinstance(size, int) and 1 <= size <= max_size):
                raise ValueError
            if not (isinstance(seen, int) and 0 <= seen <= size):
                raise ValueError
            if not (isinstance(row, str) and len(row) <= 64 and made_for == list_name):
                raise ValueError
            named = min(seen, ABOVE + 1) if row and len(fields) == 6 else 0
            if not (isinstance(above, str) and len(above) == named * DIGEST):
                raise ValueError
            if above and not _HEX.fullmatch(above):
                raise ValueError
            token_bytes = base64.b64decode(token, validate=True) or None
            return cls(token_bytes, size, seen, row, list_name, above)
        # RecursionError: JSON nested thousands deep fits the 4,096 characters.
        except (ValueError, TypeError, binascii.Error, RecursionError):
            raise TenureError(ErrorCode.INVALID_INPUT, "after: not a cursor of this list") from None


DIGEST = 12
"""Hex digits of a row's digest in a cursor: 48 bits, so that one of a cursor's digests
matching another row of its page (at most MAX_PAGE) is about one chance in 300 billion."""
ABOVE = 8
"""Rows above its own that a cursor inside a page names: more than that leaving between two
reads resumes at the top of the page, showing its rows again."""
_HEX = re.compile(r"[0-9a-f]+")


def row_digest(run_id: str) -> str:
    """A row as a cursor names the rows above its own."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:DIGEST]


def _check(fields: list[object]) -> str:
    """What a cursor's fields were when it was made: a checksum, not a signature (the lists
    are operators'), so that a cursor altered by mistake is refused as input."""
    document = json.dumps(fields, separators=(",", ":")).encode()
    return hashlib.sha256(document).hexdigest()[:16]


async def visibility_page(
    client: Client, query: str, size: int, token: bytes | None
) -> tuple[list[WorkflowExecution], bytes | None]:
    """One page of the workflows `query` matches, and the token of the next (None after
    the last). A token Temporal refuses is the caller's cursor's fault: INVALID_INPUT, not
    UNAVAILABLE, which told the caller to try again, and counted towards the page alert."""
    pages = client.list_workflows(
        query,
        page_size=size,
        next_page_token=token,
        rpc_timeout=timedelta(seconds=TEMPORAL_TIMEOUT),
    )
    try:
        await within(TEMPORAL_TIMEOUT, pages.fetch_next_page())
    except RPCError as exc:
        if token is not None and exc.status is RPCStatusCode.INVALID_ARGUMENT:
            raise TenureError(ErrorCode.INVALID_INPUT, "after: not a cursor of this list") from exc
        raise
    return list(pages.current_page or []), pages.next_page_token or None


async def visibility_count(client: Client, query: str) -> int:
    counted = await within(
        TEMPORAL_TIMEOUT,
        client.count_workflows(query, rpc_timeout=timedelta(seconds=TEMPORAL_TIMEOUT)),
    )
    return counted.count
