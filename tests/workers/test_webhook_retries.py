"""The retry schedule of a failing webhook entry (pure: no server)."""

from __future__ import annotations

from workers.webhook_retries import MAX_BACKOFF_SECONDS, RetrySchedule, appended_at


def test_a_failing_entry_waits_twice_as_long_each_time_never_past_the_cap_or_its_deadline() -> None:
    schedule = RetrySchedule(retry_for=3600.0, backoff=2.0)
    waits = [schedule.next_due(n, since=0, now=0) for n in (1, 2, 3)]
    assert waits == [2, 4, 8]
    assert schedule.next_due(20, since=0, now=0) == min(MAX_BACKOFF_SECONDS, 3600)
    assert schedule.next_due(3, since=0, now=3599) == 3600  # its deadline, not later
    assert schedule.gives_up(since=0, now=3600, attempts=3)
    assert not schedule.gives_up(since=0, now=3599, attempts=3)


def test_a_retry_period_of_months_keeps_its_schedule_after_a_thousand_attempts() -> None:
    """The 1,025th attempt's wait, 2 s doubled 1,024 times, overflowed a float: the
    subscriber's delivery failed on it, and on every retry of its activity, for good."""
    days = 86_400.0
    schedule = RetrySchedule(retry_for=90 * days, backoff=2.0)
    first, now = 0.0, 50 * days
    for attempts in (1_024, 1_025, 5_000, 10**9):
        assert schedule.next_due(attempts, first, now) == now + MAX_BACKOFF_SECONDS


def test_an_entry_is_appended_when_its_stream_id_says() -> None:
    assert appended_at("1796680000123-7") == 1796680000.123


def test_an_entry_appended_long_ago_is_still_tried_a_few_times() -> None:
    """After an outage of the delivery longer than the retry period, each change kept
    waiting had one try: one 503 dead-lettered it."""
    schedule = RetrySchedule(retry_for=3600.0, backoff=2.0)
    since, now = 0.0, 5 * 3600.0  # appended five hours ago
    assert not schedule.gives_up(since, now, attempts=1)
    assert schedule.next_due(1, since, now) == now + 2
    assert not schedule.gives_up(since, now + 2, attempts=2)
    assert schedule.next_due(2, since, now + 2) == now + 2 + 4
    assert schedule.gives_up(since, now + 6, attempts=3)
