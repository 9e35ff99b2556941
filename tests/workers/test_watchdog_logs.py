"""A failure the SDK logs on every retry reaches the log once per window, with a count."""

from __future__ import annotations

import logging

import pytest

from workers.logs import RepeatedLogFilter


def test_a_repeated_failure_is_logged_once_then_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("workers.logs.time.monotonic", lambda: now[0])
    logger = logging.getLogger("temporalio.core.test")
    logger.addFilter(RepeatedLogFilter(window=600))
    try:
        with caplog.at_level(logging.WARNING, logger="temporalio.core.test"):
            for _ in range(60):  # ten minutes of retries, one every 10 s
                logger.warning("Failing workflow task %s", "run-1")
                now[0] += 10
            logger.warning("Failing workflow task %s", "run-2")
            logger.warning("Failing workflow task %s", "run-1")
    finally:
        logger.filters.clear()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "Failing workflow task run-1",
        "Failing workflow task run-2",
        "Failing workflow task run-1 (and 59 times more in the last 600 s)",
    ]
