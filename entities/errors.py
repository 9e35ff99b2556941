"""Stable error codes shared by entities, the worker and the GraphQL API."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes a client can rely on; the message beside them is for humans and may change."""

    INVALID_INPUT = "INVALID_INPUT"
    INVALID_TRANSITION = "INVALID_TRANSITION"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"
    CHECKOUT_IN_PROGRESS = "CHECKOUT_IN_PROGRESS"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CONFLICT = "CONFLICT"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    UNAVAILABLE = "UNAVAILABLE"
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    """The entity cannot tell whether it applied the command already: it was first sent
    before the oldest commands the entity still remembers. Not applied now; it may have
    been then (`CommandEnvelope.first_sent`)."""
    INTERNAL = "INTERNAL"
    LIMIT_REACHED = "LIMIT_REACHED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"

    @classmethod
    def named(cls, name: str | None) -> ErrorCode | None:
        """The code called `name` (an ApplicationError's type), or None when none is."""
        return cls.__members__.get(name) if name else None


class TenureError(Exception):
    """A failure with a stable code, safe to show to a client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Rejected(TenureError):
    """A command the entity refused: recorded in its ledger, never raised out of a signal."""


def quote_few(names: list[str]) -> str:
    """Names a caller gave, quoted back within bounds: the first three, each cut short."""
    shown = [name if len(name) <= 40 else name[:40] + "..." for name in names[:3]]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(shown) + more
