"""Logs as a log pipeline reads them in production (one JSON object a line, the standard
library's records included) and as a developer reads them (text), never with a token."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog

from tests.conftest import LogCapture
from workers.logs import log_format
from workers.settings import Settings

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


def lines(output: str) -> list[dict[str, Any]]:
    """Each line of the output as the JSON object it must be."""
    parsed = [json.loads(line) for line in output.splitlines()]
    assert parsed and all(isinstance(entry, dict) for entry in parsed)
    return parsed


def test_production_logs_are_one_json_object_a_line_the_sdks_records_included(
    captured_logs: LogCapture,
) -> None:
    stream = captured_logs(Settings(environment="production"), "worker")
    structlog.contextvars.bind_contextvars(request_id="r-1", principal="customer:ada")
    try:
        structlog.stdlib.get_logger("workers.test").info("published", entity="account:ada")
        logging.getLogger("temporalio.worker").warning(
            "task %s failed\nwith two lines",
            "wf-1",
            extra={"temporal_workflow": {"workflow_id": "account:ada"}},
        )
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("temporalio.activity").exception("activity failed")
    finally:
        structlog.contextvars.clear_contextvars()

    ours, sdk, failed = lines(stream.getvalue())
    assert ours["event"] == "published" and ours["entity"] == "account:ada"
    assert (ours["level"], ours["logger"], ours["process"]) == ("info", "workers.test", "worker")
    assert ours["timestamp"].endswith("Z")
    assert sdk["event"] == "task wf-1 failed\nwith two lines"
    assert (sdk["level"], sdk["logger"]) == ("warning", "temporalio.worker")
    assert sdk["temporal_workflow"] == {"workflow_id": "account:ada"}
    # Bound in the request's context: on every line written in it, stdlib's too.
    assert all(e["request_id"] == "r-1" and e["principal"] == "customer:ada" for e in (ours, sdk))
    assert "RuntimeError: boom" in failed["exception"]


def test_development_logs_are_readable_lines(captured_logs: LogCapture) -> None:
    stream = captured_logs(Settings(environment="development"), "dev")
    logging.getLogger("tenure.dev").warning("starting Valkey on port %d", 6380)
    line = stream.getvalue()
    assert "starting Valkey on port 6380" in line and "warning" in line and "process=dev" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_the_format_is_chosen_by_setting_else_by_environment() -> None:
    assert log_format(Settings(environment="production")) == "json"
    assert log_format(Settings(environment="development")) == "text"
    assert log_format(Settings(environment="production", log_format="text")) == "text"
    assert log_format(Settings(environment="development", log_format="json")) == "json"
    with pytest.raises(ValueError, match="'json' or 'text'"):  # refused with the settings
        Settings(log_format="xml")


def test_tokens_never_reach_the_output(captured_logs: LogCapture) -> None:
    stream = captured_logs(Settings(environment="production"), "api")
    log = structlog.stdlib.get_logger("api.test")
    log.info("headers", authorization=f"Bearer {JWT}", token=JWT, path="/graphql")
    logging.getLogger("api.auth").warning("refused Bearer %s from a client", JWT)
    log.info(f"a token pasted where it should not be: {JWT}")
    output = stream.getvalue()
    assert JWT not in output and JWT.split(".")[2] not in output
    first, second, third = lines(output)
    assert first["authorization"] == first["token"] == "[redacted]"
    assert first["path"] == "/graphql"
    assert second["event"] == "refused Bearer [redacted] from a client"
    assert third["event"] == "a token pasted where it should not be: [redacted]"
