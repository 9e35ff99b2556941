"""Each API request's logs as an operator searches them: its id (the client's, when sane,
else a new one, returned in X-Request-Id), its caller and its command; never its token."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.test_access import SECRET, token
from tests.conftest import LogCapture, new_id
from workers.settings import Settings

OPEN = """mutation Open($id: ID!) { openAccount(id: $id, ownerName: "Ada",
  email: "ada@example.com", wait: true) { status } }"""
VERIFY = "mutation Verify($id: ID!) { verifyAccount(id: $id, wait: true) { status } }"
DEPOSIT = """mutation Deposit($id: ID!, $amount: Long!) {
  depositToAccount(id: $id, amount: $amount, wait: true) { commandId } }"""


@pytest.fixture
def secured(secured: Settings) -> Settings:
    """The secured API's settings, logging JSON as in production."""
    return secured.model_copy(update={"log_format": "json"})


async def post(
    http: httpx.AsyncClient,
    bearer: str,
    query: str,
    request_id: str | None = None,
    **variables: Any,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return await http.post(
        "/graphql", json={"query": query, "variables": variables}, headers=headers
    )


async def test_request_logs_carry_the_request_id_caller_and_command_and_never_the_token(
    secured: Settings, secured_http: httpx.AsyncClient, captured_logs: LogCapture
) -> None:
    account_id = new_id()
    admin = token("admin", "ops")
    customer = token("customer", "ada", accounts=[account_id])
    forged = token("admin", "mallory")[:-4] + "AAAA"  # a bad signature
    stream = captured_logs(secured, "api")

    await post(secured_http, admin, OPEN, id=account_id)
    await post(secured_http, admin, VERIFY, id=account_id)
    deposited = await post(secured_http, customer, DEPOSIT, "trace-me:42", id=account_id, amount=7)
    refused = await post(secured_http, customer, DEPOSIT, id=account_id, amount=-1)
    unauthenticated = await post(secured_http, forged, DEPOSIT, "x" * 200, id=account_id, amount=7)

    output = stream.getvalue()
    for secret in (admin, customer, forged, SECRET):
        assert secret not in output
    entries = [json.loads(line) for line in output.splitlines()]  # one object a line
    requests = [entry for entry in entries if entry["event"] == "request"]
    assert [entry["operation"] for entry in requests] == [
        "Open",
        "Verify",
        "Deposit",
        "Deposit",
        "unknown",
    ]
    by_id = {entry["request_id"]: entry for entry in requests}
    assert len(by_id) == 5

    # The client's id, sane, is kept and returned.
    assert deposited.headers["x-request-id"] == "trace-me:42"
    deposit = by_id["trace-me:42"]
    assert deposit["principal"] == "customer:ada"
    assert deposit["entity"] == f"account:{account_id}"
    assert deposit["command"] == "deposit"
    assert deposit["command_id"] == deposited.json()["data"]["depositToAccount"]["commandId"]
    assert (deposit["status"], deposit["code"]) == (200, "OK")
    assert deposit["level"] == "debug" and deposit["process"] == "api"
    assert deposit["duration_ms"] > 0

    rejected = by_id[refused.headers["x-request-id"]]
    assert rejected["code"] == "INVALID_INPUT" and rejected["principal"] == "customer:ada"

    # An id that is not sane is replaced; a refused caller is named by nothing.
    replaced = unauthenticated.headers["x-request-id"]
    assert len(replaced) == 32 and replaced != "x" * 200
    assert unauthenticated.status_code == 401
    denied = by_id[replaced]
    assert (denied["status"], denied["code"]) == (401, "UNAUTHENTICATED")
    assert "principal" not in denied and "entity" not in denied
