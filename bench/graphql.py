"""The benchmark's GraphQL client: Account documents posted over real HTTP to the API."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.http import HTTPClient, HTTPError

OPEN = """mutation($id: ID!, $key: String, $wait: Boolean!) {
  openAccount(id: $id, ownerName: "Bench", email: "bench@example.com", idempotencyKey: $key,
              wait: $wait) { commandId } }"""
VERIFY = """mutation($id: ID!, $key: String, $wait: Boolean!) {
  verifyAccount(id: $id, idempotencyKey: $key, wait: $wait) { commandId } }"""
DEPOSIT = """mutation($id: ID!, $amount: Long!, $key: String) {
  depositToAccount(id: $id, amount: $amount, idempotencyKey: $key) { commandId status } }"""
DEPOSIT_WAIT = """mutation($id: ID!, $amount: Long!, $key: String) {
  depositToAccount(id: $id, amount: $amount, idempotencyKey: $key, wait: true) {
    status account { balance revision } } }"""
READ = """query($id: ID!, $consistency: Consistency!) {
  account(id: $id, consistency: $consistency) { balance revision source stale } }"""

RETRYABLE = {"UNAVAILABLE", "INTERNAL"}
ATTEMPTS = 3


class GraphQLFailed(Exception):
    """The API answered with an error; `code` is its `extensions.code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class GraphQL:
    """Posts documents to /graphql; commands are retried with their idempotency key, which
    is what the API asks of a client whose command may or may not have been applied."""

    def __init__(self, http: HTTPClient) -> None:
        self.http = http
        self.retries = 0

    async def __call__(self, document: str, **variables: Any) -> dict[str, Any]:
        body: dict[str, Any] = await self.http.post(
            "/graphql", {"query": document, "variables": variables}
        )
        if body.get("errors"):
            error = body["errors"][0]
            raise GraphQLFailed(error.get("extensions", {}).get("code", "?"), error["message"])
        data: dict[str, Any] = body["data"]
        return data

    async def command(self, document: str, **variables: Any) -> dict[str, Any]:
        """Send a command, retrying a transient failure with the same variables."""
        for attempt in range(ATTEMPTS):
            try:
                return await self(document, **variables)
            except (GraphQLFailed, HTTPError) as exc:
                transient = not isinstance(exc, GraphQLFailed) or exc.code in RETRYABLE
                if not transient or attempt == ATTEMPTS - 1:
                    raise
                self.retries += 1
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def open_account(self, account_id: str, *, wait: bool) -> None:
        """Open and verify an account, ready for deposits: its revision is then 2."""
        await self.command(OPEN, id=account_id, key=f"open-{account_id}", wait=wait)
        await self.command(VERIFY, id=account_id, key=f"verify-{account_id}", wait=wait)
