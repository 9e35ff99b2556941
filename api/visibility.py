"""Lists read from Temporal's visibility, page by page: Temporal pages a list with its own
tokens, so a cursor is a page's token and a place in that page. Every call is bounded, and
an unanswered one is UNAVAILABLE to whoever maps `RPCError`s."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import Client, WorkflowExecution

from api.listing import MAX_PAGE
from entities.errors import ErrorCode, TenureError
from workers.temporal import within

TEMPORAL_TIMEOUT = 5.0
MAX_PAGES_READ = 4  # visibility pages one list may read to fill its page


@dataclass(frozen=True)
class VisibilityCursor:
    """Where a list resumes: after `seen` rows of the visibility page at `token`, read
    `size` rows at a time."""

    token: bytes | None
    size: int
    seen: int

    def encode(self) -> str:
        token = base64.b64encode(self.token).decode() if self.token else ""
        document = json.dumps([token, self.size, self.seen], separators=(",", ":"))
        return base64.urlsafe_b64encode(document.encode()).decode()

    @classmethod
    def start(cls, after: str | None, first: int, max_size: int) -> VisibilityCursor:
        """Where a page of `first` rows starts: after the cursor `after`, or at the top of
        the list, read `first` rows at a time. INVALID_INPUT when `first` is not from 0 to
        `max_size`, or `after` is not a cursor read at most `max_size` rows at a time."""
        if not 0 <= first <= max_size:
            raise TenureError(ErrorCode.INVALID_INPUT, f"first: from 0 to {max_size}")
        if after is None:
            return cls(None, max(first, 1), 0)
        return cls.decode(after, max_size)

    @classmethod
    def decode(cls, cursor: str, max_size: int = MAX_PAGE) -> VisibilityCursor:
        try:
            if len(cursor) > 4096:
                raise ValueError
            token, size, seen = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            if not (isinstance(size, int) and 1 <= size <= max_size):
                raise ValueError
            if not (isinstance(seen, int) and 0 <= seen <= size):
                raise ValueError
            return cls(base64.b64decode(token, validate=True) or None, size, seen)
        except (ValueError, TypeError, binascii.Error):
            raise TenureError(ErrorCode.INVALID_INPUT, "after: not a cursor of this list") from None


async def visibility_page(
    client: Client, query: str, size: int, token: bytes | None
) -> tuple[list[WorkflowExecution], bytes | None]:
    """One page of the workflows `query` matches, and the token of the next (None after
    the last)."""
    pages = client.list_workflows(
        query,
        page_size=size,
        next_page_token=token,
        rpc_timeout=timedelta(seconds=TEMPORAL_TIMEOUT),
    )
    await within(TEMPORAL_TIMEOUT, pages.fetch_next_page())
    return list(pages.current_page or []), pages.next_page_token or None


async def visibility_count(client: Client, query: str) -> int:
    counted = await within(
        TEMPORAL_TIMEOUT,
        client.count_workflows(query, rpc_timeout=timedelta(seconds=TEMPORAL_TIMEOUT)),
    )
    return counted.count
