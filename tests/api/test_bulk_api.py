"""Bulk commands through GraphQL: started once per idempotency key, watched to the end, and
refused before anything starts when the request is wrong."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.client import Client

from tests.api.test_accounts_api import open_active, read_account
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from workers.settings import Settings

START = """mutation($key: String!, $ids: [ID!], $filter: JSON, $payload: JSON,
                   $command: String! = "deposit") {
  startBulkCommand(entityType: "account", command: $command, payload: $payload, ids: $ids,
                   filter: $filter, idempotencyKey: $key) {
    id status total done applied rejected failed
  }
}"""
READ = """query($id: ID!) { bulkCommand(id: $id) {
  id entityType command status total done applied rejected failed
  rejectedByCode { code count } failures { entityId code message } startedAt endedAt } }"""


# As the README gives it.
INTEREST = """mutation {
  startBulkCommand(entityType: "account", command: "applyInterest",
                   payload: {rate_basis_points: 150},
                   filter: {tags: {status: ["ACTIVE"]}},
                   idempotencyKey: "interest-2026-11") { id status total }
}"""
DEPOSIT = "mutation($id: ID!) { depositToAccount(id: $id, amount: 10000, wait: true) { status } }"
SUSPEND = 'mutation($id: ID!) { suspendAccount(id: $id, reason: "review", wait: true) { status } }'
STATUSES = "{ accounts(first: 100) { edges { node { id status } } } }"


async def until_listed(gql: GraphQLClient, ids: list[str]) -> None:
    """Until the index shows each account as its last command left it."""
    for _ in range(100):
        edges = (await gql.data(STATUSES))["accounts"]["edges"]
        listed = {e["node"]["id"]: e["node"]["status"] for e in edges}
        if listed == {i: "SUSPENDED" if i == ids[0] else "ACTIVE" for i in ids}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not listed as expected: {listed}")


async def finished(gql: GraphQLClient, bulk_id: str) -> dict[str, Any]:
    for _ in range(200):
        bulk: dict[str, Any] = (await gql.data(READ, id=bulk_id))["bulkCommand"]
        if bulk["status"] != "RUNNING":
            return bulk
        await asyncio.sleep(0.1)
    raise AssertionError(f"bulk {bulk_id} still running: {bulk}")


async def test_a_bulk_deposit_reaches_every_account_once_however_often_it_is_sent(
    gql: GraphQLClient,
) -> None:
    ids = [new_id() for _ in range(6)]
    for account_id in ids:
        await open_active(gql, account_id)
    key = new_id()
    targets = [*ids, "nobody-" + new_id()[:8]]
    started = await gql.data(START, key=key, ids=targets, payload={"amount": 25})
    assert started["startBulkCommand"]["id"] == key
    again = await gql.data(START, key=key, ids=targets, payload={"amount": 25})
    assert again["startBulkCommand"]["id"] == key  # the same bulk command, not a second
    done = await finished(gql, key)
    assert done["status"] == "COMPLETED" and done["endedAt"] is not None
    assert (done["total"], done["done"], done["applied"], done["rejected"]) == (7, 7, 6, 1)
    assert done["rejectedByCode"] == [{"code": "NOT_FOUND", "count": 1}]
    assert [f["entityId"] for f in done["failures"]] == [targets[-1]]
    assert (done["entityType"], done["command"]) == ("account", "deposit")
    # Sent once more after it ended: still the same bulk command, nothing deposited twice.
    await gql.data(START, key=key, ids=targets, payload={"amount": 25})
    balances = [(await read_account(gql, i, "LIVE"))["balance"] for i in ids]
    assert balances == [25] * 6


async def test_a_wrong_bulk_command_is_refused_and_starts_nothing(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    wrong: list[tuple[dict[str, Any], str]] = [
        ({"payload": {"amount": -5}, "ids": [account_id]}, "amount"),
        ({"payload": {"amount": 5}, "command": "teleport", "ids": [account_id]}, "teleport"),
        ({"payload": {"amount": 5}}, "either ids or filter"),
        ({"payload": {"amount": 5}, "ids": [account_id], "filter": {}}, "either ids or filter"),
        ({"payload": {"amount": 5}, "filter": {"colour": "red"}}, "colour"),
        ({"payload": {"amount": 5}, "filter": {"closed": "soon"}}, "closed"),
        ({"payload": {"amount": 5}, "ids": ["no spaces allowed"]}, "ids"),
        ({"payload": [1, 2], "ids": [account_id]}, "payload"),
    ]
    for variables, named in wrong:
        key = new_id()
        body = await gql(START, key=key, **variables)
        error = body["errors"][0]
        assert error["extensions"]["code"] == "INVALID_INPUT", (variables, body)
        assert named in error["message"], (variables, error["message"])
        assert await gql.error_code(READ, id=key) == "NOT_FOUND"
    assert await gql.error_code(START, key="no spaces", ids=[account_id]) == "INVALID_INPUT"
    assert (await read_account(gql, account_id, "LIVE"))["balance"] == 0


async def test_the_readme_s_monthly_interest_reaches_only_active_accounts(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    own = settings.model_copy(update={"redis_prefix": f"{settings.redis_prefix}{new_id()[:8]}:"})
    async with run_worker(own), api_client(own, temporal_client) as http:
        gql = GraphQLClient(http)
        ids = [new_id() for _ in range(4)]
        for account_id in ids:
            await open_active(gql, account_id)
            await gql.data(DEPOSIT, id=account_id)
        await gql.data(SUSPEND, id=ids[0])
        await until_listed(gql, ids)
        key = "interest-" + new_id()[:8]
        interest = INTEREST.replace("interest-2026-11", key)
        assert (await gql.data(interest))["startBulkCommand"]["id"] == key
        done = await finished(gql, key)
        balances = [(await read_account(gql, i, "LIVE"))["balance"] for i in ids]
    assert (done["status"], done["total"], done["applied"]) == ("COMPLETED", 3, 3)
    assert balances == [10_000, 10_150, 10_150, 10_150]
