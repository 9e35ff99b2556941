"""Dead letters for tests of webhook subscribers."""

from __future__ import annotations

from datetime import UTC, datetime

from workers.webhook_subscribers import DeadLetter


def failed_letter(n: int) -> DeadLetter:
    """The `n`th change to account `a<n>` whose retries ran out."""
    now = datetime.now(UTC)
    return DeadLetter(
        webhook_id=f"msg-{n}",
        entity_type="account",
        entity_id=f"a{n}",
        body="{}",
        attempts=8,
        error="HTTP 500",
        first_attempt_at=now,
        failed_at=now,
    )
