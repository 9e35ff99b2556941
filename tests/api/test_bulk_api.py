"""Bulk commands through GraphQL: started once per idempotency key, watched to the end,
refused before anything starts when the request is wrong, and listed for admins, each with
its progress, by status and page by page."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError

from api import bulk_listing
from api.bulk import BulkCommand
from api.webhooks import idempotency_key as webhook_key
from entities.bulk import (
    MAX_ACTIONS_KEPT,
    BulkCommandWorkflow,
    BulkInput,
    BulkProgress,
    BulkStatus,
    bulk_command_id,
    bulk_workflow_id,
)
from entities.checkout_input import checkout_workflow_id
from entities.runtime.effects import other_running_id
from entities.runtime.envelope import SYSTEM_COMMAND_PREFIXES
from tests.api.test_access import CLOSE, OPEN, VERIFY, Caller, token
from tests.api.test_accounts_api import open_active, read_account
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.entities.test_bulk import elsewhere, open_accounts
from workers.settings import Settings

START = """mutation($key: String!, $ids: [ID!], $filter: JSON, $payload: JSON,
                   $command: String! = "deposit") {
  startBulkCommand(entityType: "account", command: $command, payload: $payload, ids: $ids,
                   filter: $filter, idempotencyKey: $key) {
    id status total done applied rejected failed
  }
}"""
READ = """query($id: ID!) { bulkCommand(id: $id) {
  id entityType command status total delivered deliveredAt done applied rejected failed
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
    gql: GraphQLClient, temporal_client: Client, settings: Settings
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
    # On a task queue of its own, not behind the entity tasks it causes.
    described = await temporal_client.get_workflow_handle(bulk_workflow_id(key)).describe()
    assert described.task_queue == settings.bulk_task_queue != settings.task_queue
    done = await finished(gql, key)
    assert done["status"] == "COMPLETED" and done["endedAt"] is not None
    assert done["startedAt"] <= done["deliveredAt"] <= done["endedAt"]
    assert (done["total"], done["delivered"], done["done"]) == (7, 7, 7)
    assert (done["applied"], done["rejected"]) == (6, 1)
    assert done["rejectedByCode"] == [{"code": "NOT_FOUND", "count": 1}]
    assert [f["entityId"] for f in done["failures"]] == [targets[-1]]
    assert (done["entityType"], done["command"]) == ("account", "deposit")
    # Sent once more after it ended: still the same bulk command, nothing deposited twice.
    await gql.data(START, key=key, ids=targets, payload={"amount": 25})
    # The same key with another amount, or other targets, is another bulk command: refused.
    for other in (
        {"ids": targets, "payload": {"amount": 26}},
        {"ids": ids, "payload": {"amount": 25}},
    ):
        body = await gql(START, key=key, **other)
        assert body["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED", body
        assert "new key" in body["errors"][0]["message"]
    balances = [(await read_account(gql, i, "LIVE"))["balance"] for i in ids]
    assert balances == [25] * 6


async def test_six_bulk_commands_started_in_one_request_are_each_answered(
    gql: GraphQLClient,
) -> None:
    """Reading back a started bulk command was charged to the request's five LIVE reads: the
    sixth start of a request was made, then answered TOO_MANY_LIVE_READS, as if refused."""
    account_id = new_id()
    await open_active(gql, account_id)
    keys = [new_id() for _ in range(6)]
    starts = " ".join(
        f'b{n}: startBulkCommand(entityType: "account", command: "deposit", '
        f'payload: {{amount: 1}}, ids: ["{account_id}"], idempotencyKey: "{key}") {{ id }}'
        for n, key in enumerate(keys)
    )
    body = await gql(f"mutation {{ {starts} }}")
    assert body.get("errors") is None, body["errors"]
    assert [body["data"][f"b{n}"]["id"] for n in range(6)] == keys
    for key in keys:
        assert (await finished(gql, key))["applied"] == 1


async def test_no_client_key_takes_a_bulk_command_s_id_first(gql: GraphQLClient) -> None:
    """A bulk command's id for an entity is `bulk:<key>:<entity id>`: a client that sent a
    command under that id first would have the bulk skip its entity as a repeat. Keys that
    begin as Tenure's own ids do are refused."""
    account_id = new_id()
    await open_active(gql, account_id)
    key = new_id()
    keyed = """mutation($id: ID!, $key: String!) {
      depositToAccount(id: $id, amount: 1, idempotencyKey: $key) { commandId } }"""
    for taken in (
        f"bulk:{key}:{account_id}",
        f"checkout:{account_id}-1:report",
        "webhook:x:1",
        f"other-running:checkout:{account_id}-2",
    ):
        assert await gql.error_code(keyed, id=account_id, key=taken) == "INVALID_INPUT", taken
    await gql.data(START, key=key, payload={"amount": 100}, ids=[account_id])
    assert (await finished(gql, key))["applied"] == 1
    assert (await read_account(gql, account_id, "LIVE"))["balance"] == 100
    # Each builder of Tenure's own ids begins with one of the refused prefixes.
    own = [
        bulk_command_id(key, account_id),
        checkout_workflow_id(f"{account_id}-1") + ":report",
        webhook_key("payments", "evt_1"),
        webhook_key("payments", "e" * 200),
        other_running_id(checkout_workflow_id(f"{account_id}-2")),
    ]
    assert all(i.startswith(SYSTEM_COMMAND_PREFIXES) for i in own), own


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
        assert (await gql.data(READ, id=key))["bulkCommand"] is None
    # None by that id: null, as an entity's read answers, and the rest of the answer stands.
    beside = await gql('{ accountStats { total } bulkCommand(id: "nope") { status } }')
    assert "errors" not in beside and beside["data"]["bulkCommand"] is None
    assert beside["data"]["accountStats"]["total"] >= 1
    assert await gql.error_code(START, key="no spaces", ids=[account_id]) == "INVALID_INPUT"
    refused = (await gql(READ, id="x" * 2000))["errors"][0]
    assert refused["extensions"]["code"] == "INVALID_INPUT"
    assert refused["message"].startswith("id:")  # the argument it came in, not another's
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


LIST = """query($status: [BulkCommandStatus!], $first: Int! = 20, $after: String) {
  bulkCommands(filter: {status: $status}, first: $first, after: $after) {
    edges { cursor node { id running bulkCommand {
      id entityType command status total done applied rejected failed } } }
    pageInfo { hasNextPage endCursor } totalCount } }"""
CANCEL = "mutation($id: ID!) { cancelBulkCommand(id: $id) { status } }"


async def everything_listed(
    gql: GraphQLClient, status: list[str] | None = None, first: int = 20
) -> list[dict[str, Any]]:
    """Every row of the list, page after page; the session's other bulk commands too."""
    rows: list[dict[str, Any]] = []
    after = None
    for _ in range(200):
        page = (await gql.data(LIST, status=status, first=first, after=after))["bulkCommands"]
        assert len(page["edges"]) <= first
        rows += [edge["node"] for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            return rows
        after = page["pageInfo"]["endCursor"]
    raise AssertionError("the list never ended")


async def listed_as(
    gql: GraphQLClient, expected: dict[str, str | None], status: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The rows of `expected`'s bulk commands once each is listed in its expected status
    (None: not listed at all). Temporal's visibility is eventually consistent: a bulk
    command just started or just ended takes a moment to show as it is."""
    for _ in range(100):
        rows = {row["id"]: row for row in await everything_listed(gql, status)}
        shown = {
            key: (rows[key]["bulkCommand"] or {}).get("status") if key in rows else None
            for key in expected
        }
        if shown == expected:
            return {key: rows[key] for key in expected if key in rows}
        await asyncio.sleep(0.1)
    raise AssertionError(f"listed as {shown}, not {expected}")


async def paused_bulk(
    temporal_client: Client, task_queue: str, key: str, ids: list[str], **fields: Any
) -> WorkflowHandle[Any, Any]:
    """A bulk deposit started paused, as the bulk workflow can be (the API starts them
    running): it waits, RUNNING in Temporal, for resume or cancel. `fields` set the rest of
    its input (`paused=False`, its paging)."""
    return await temporal_client.start_workflow(
        BulkCommandWorkflow.run,
        BulkInput(
            bulk_id=key,
            entity_type="account",
            command="deposit",
            payload={"amount": 5},
            ids=ids,
            sent_by="admin:tests",
            **{"paused": True, **fields},
        ),
        id=bulk_workflow_id(key),
        task_queue=task_queue,
    )


async def test_an_admin_lists_bulk_commands_with_their_progress_and_by_status(
    gql: GraphQLClient, temporal_client: Client, settings: Settings
) -> None:
    ids = [new_id() for _ in range(2)]
    for account_id in ids:
        await open_active(gql, account_id)
    completed, paused = new_id(), new_id()
    await gql.data(START, key=completed, ids=ids, payload={"amount": 25})
    await finished(gql, completed)
    await paused_bulk(temporal_client, settings.bulk_task_queue, paused, ids)

    rows = await listed_as(gql, {completed: "COMPLETED", paused: "PAUSED"})
    assert rows[completed]["running"] is False
    assert rows[completed]["bulkCommand"] == {
        "id": completed,
        "entityType": "account",
        "command": "deposit",
        "status": "COMPLETED",
        "total": 2,
        "done": 2,
        "applied": 2,
        "rejected": 0,
        "failed": 0,
    }
    assert rows[paused]["running"] is True
    assert rows[paused]["bulkCommand"]["done"] == 0

    await listed_as(gql, {completed: None, paused: "PAUSED"}, ["PAUSED"])
    await listed_as(gql, {completed: "COMPLETED", paused: None}, ["COMPLETED", "CANCELLED"])
    running = (await gql.data(LIST, status=["RUNNING", "PAUSED"]))["bulkCommands"]
    assert running["totalCount"] is not None  # visibility tells running from ended
    one_of_two = (await gql.data(LIST, status=["PAUSED"]))["bulkCommands"]
    assert one_of_two["totalCount"] is None  # only each bulk command tells PAUSED

    await gql.data(CANCEL, id=paused)
    await listed_as(gql, {completed: None, paused: "CANCELLED"}, ["CANCELLED"])
    assert (await read_account(gql, ids[0], "LIVE"))["balance"] == 25  # paused sent nothing


async def test_a_bulk_command_whose_progress_fails_is_one_row_without_it_not_a_failed_page(
    gql: GraphQLClient, temporal_client: Client, settings: Settings, monkeypatch: Any
) -> None:
    """A listed bulk's `progress` query failed in its own code (WorkflowQueryFailedError):
    the whole list was INTERNAL, and the console's tab, which reads it every few seconds,
    stayed broken while that bulk was listed. Now its row alone shows no progress."""
    ids = [new_id()]
    await open_active(gql, ids[0])
    completed, broken = new_id(), new_id()
    await gql.data(START, key=completed, ids=ids, payload={"amount": 1})
    await finished(gql, completed)
    await paused_bulk(temporal_client, settings.bulk_task_queue, broken, ids)
    await listed_as(gql, {completed: "COMPLETED", broken: "PAUSED"})
    asked = bulk_listing.ask

    async def failing(handle: WorkflowHandle[Any, Any], *args: Any, **kwargs: Any) -> Any:
        if handle.id == bulk_workflow_id(broken):
            raise WorkflowQueryFailedError("progress: KeyError 'paging'")
        return await asked(handle, *args, **kwargs)

    monkeypatch.setattr(bulk_listing, "ask", failing)
    rows = {row["id"]: row for row in await everything_listed(gql)}
    assert rows[broken]["running"] is True and rows[broken]["bulkCommand"] is None
    assert rows[completed]["bulkCommand"]["status"] == "COMPLETED"
    await gql.data(CANCEL, id=broken)


async def test_the_bulk_command_list_pages_one_at_a_time_without_losing_one(
    gql: GraphQLClient,
) -> None:
    ids = [new_id()]
    await open_active(gql, ids[0])
    keys = [new_id() for _ in range(2)]
    for key in keys:
        await gql.data(START, key=key, ids=ids, payload={"amount": 1})
        await finished(gql, key)
    await listed_as(gql, dict.fromkeys(keys, "COMPLETED"))

    # The ended ones: what other tests left running could end between the two walks.
    ended = ["COMPLETED", "CANCELLED"]
    one_by_one = await everything_listed(gql, ended, first=1)
    at_once = await everything_listed(gql, ended, first=20)
    paged = [row["id"] for row in one_by_one]
    assert len(paged) == len(set(paged))  # no bulk command twice
    assert set(keys) <= set(paged)
    assert paged == [row["id"] for row in at_once]  # nothing ended meanwhile: the same order
    first = (await gql.data(LIST, first=1))["bulkCommands"]
    assert len(first["edges"]) == 1 and first["pageInfo"]["hasNextPage"] is True
    assert first["pageInfo"]["endCursor"] == first["edges"][0]["cursor"]
    assert first["totalCount"] >= 2
    for counting in (["RUNNING", "PAUSED"], ["COMPLETED", "CANCELLED"]):  # counted exactly
        counted = (await gql.data(LIST, first=0, status=counting))["bulkCommands"]
        # A count alone: a next page only when there is any.
        assert counted["pageInfo"]["hasNextPage"] is (counted["totalCount"] > 0), counting
    nothing = (await gql.data(LIST, status=[]))["bulkCommands"]
    assert (nothing["edges"], nothing["totalCount"]) == ([], 0)  # none let in, as lists do
    assert await gql.error_code(LIST, first=21) == "INVALID_INPUT"
    assert await gql.error_code(LIST, after="not-a-cursor") == "INVALID_INPUT"


async def test_a_bulk_command_whose_worker_is_gone_is_listed_without_its_progress(
    gql: GraphQLClient, temporal_client: Client
) -> None:
    key = new_id()
    # On a task queue no worker polls: its workflow cannot answer a query.
    orphan = await paused_bulk(temporal_client, f"nobody-{new_id()}", key, [new_id()])
    try:
        for _ in range(100):  # until visibility lists it
            rows = [row for row in await everything_listed(gql) if row["id"] == key]
            if rows:
                break
            await asyncio.sleep(0.1)
        assert rows == [{"id": key, "running": True, "bulkCommand": None}]
    finally:
        await orphan.terminate("test over")  # a terminated bulk is not listed


async def test_only_admins_list_bulk_commands(secured_http: httpx.AsyncClient) -> None:
    callers = {
        "admin": token("admin", "ops"),
        "customer": token("customer", "ada", ["ada"]),
        "service": token("service", "billing", scope="account:* read:*"),
    }
    answers = {}
    for role, bearer in callers.items():
        response = await secured_http.post(
            "/graphql",
            json={"query": LIST, "variables": {"first": 1}},
            headers={"authorization": f"Bearer {bearer}"},
        )
        answers[role] = _code(response)
    assert answers == {"admin": None, "customer": "FORBIDDEN", "service": "FORBIDDEN"}


def _code(response: httpx.Response) -> str | None:
    errors = response.json().get("errors")
    return errors[0]["extensions"]["code"] if errors else None


START_ON = """mutation($type: String!, $command: String!, $key: String!, $payload: JSON,
                      $ids: [ID!], $filter: JSON) {
  startBulkCommand(entityType: $type, command: $command, payload: $payload, ids: $ids,
                   filter: $filter, idempotencyKey: $key) { id status } }"""
PAUSE = "mutation($id: ID!) { pauseBulkCommand(id: $id) { status } }"
RESUME = "mutation($id: ID!) { resumeBulkCommand(id: $id) { status } }"


async def ended_as(gql: GraphQLClient, bulk_id: str, status: str) -> None:
    for _ in range(200):
        if (await gql.data(READ, id=bulk_id))["bulkCommand"]["status"] == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"bulk {bulk_id} never {status}")


async def test_an_ended_bulk_command_can_no_longer_be_paused_resumed_or_cancelled(
    gql: GraphQLClient, temporal_client: Client, settings: Settings
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    completed, cancelled = new_id(), new_id()
    await gql.data(START, key=completed, ids=[account_id], payload={"amount": 25})
    await finished(gql, completed)
    await paused_bulk(temporal_client, settings.bulk_task_queue, cancelled, [account_id])
    await gql.data(CANCEL, id=cancelled)
    await ended_as(gql, cancelled, "CANCELLED")

    for key, status in ((completed, "COMPLETED"), (cancelled, "CANCELLED")):
        for mutation in (PAUSE, RESUME, CANCEL):
            body = await gql(mutation, id=key)
            assert body.get("errors"), (key, mutation, body)
            error = body["errors"][0]
            assert error["extensions"]["code"] == "INVALID_TRANSITION", (key, mutation, error)
            assert "has ended" in error["message"] and status in error["message"], error
        assert (await gql.data(READ, id=key))["bulkCommand"]["status"] == status
    assert await gql.error_code(PAUSE, id=new_id()) == "NOT_FOUND"  # as before
    assert (await read_account(gql, account_id, "LIVE"))["balance"] == 25


async def test_bulk_refuses_the_commands_only_the_checkout_saga_sends(
    gql: GraphQLClient,
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    cart_id = new_id()
    await gql.data(
        "mutation($id: ID!, $a: ID!) { createCart(id: $id, accountId: $a, wait: true) { status } }",
        id=cart_id,
        a=account_id,
    )
    saga_only = [
        ("cart", "completeCheckout", {"checkout_id": f"{cart_id}-1", "order_id": "o-1"}, cart_id),
        ("cart", "failCheckout", {"checkout_id": f"{cart_id}-1"}, cart_id),
        ("account", "refund", {"amount": 25}, account_id),
    ]
    for entity_type, command, payload, target in saga_only:
        key = new_id()
        body = await gql(
            START_ON, type=entity_type, command=command, key=key, payload=payload, ids=[target]
        )
        assert body.get("errors"), (command, body)
        error = body["errors"][0]
        assert error["extensions"]["code"] == "INVALID_INPUT", (command, body)
        assert command in error["message"] and "checkout saga" in error["message"], error
        assert (await gql.data(READ, id=key))["bulkCommand"] is None  # nothing started
    # createCart's account is checked as each cart is made (it exists, and has room): in
    # bulk it was not, and carts were made for an account that does not exist.
    key = new_id()
    body = await gql(
        START_ON,
        type="cart",
        command="createCart",
        key=key,
        payload={"account_id": "no-such-account"},
        ids=[new_id()],
    )
    assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT", body
    assert "one at a time" in body["errors"][0]["message"]
    assert (await gql.data(READ, id=key))["bulkCommand"] is None
    # A command a client sends through its own mutation is still sent in bulk.
    key = new_id()
    await gql.data(START_ON, type="cart", command="clearCart", key=key, ids=[cart_id])
    assert (await finished(gql, key))["applied"] == 1
    cart = "query($id: ID!) { cart(id: $id, consistency: LIVE) { status revision } }"
    assert (await gql.data(cart, id=cart_id))["cart"] == {"status": "OPEN", "revision": 2}
    assert (await read_account(gql, account_id, "LIVE"))["balance"] == 0  # no refund


async def test_a_bulk_of_no_ids_is_refused_and_its_key_stays_free(gql: GraphQLClient) -> None:
    """An empty list started a bulk command that did nothing and used up its key: the
    client's command meant for some ids, sent again under that key with them, was answered
    with the empty bulk."""
    key = new_id()
    body = await gql(START, key=key, payload={"amount": 1}, ids=[])
    assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT", body
    assert (await gql.data(READ, id=key))["bulkCommand"] is None


async def test_a_bulk_filter_is_held_to_the_listing_s_rules_and_starts_nothing(
    gql: GraphQLClient,
) -> None:
    long_text = "z" * 100_000
    wrong: list[tuple[str, dict[str, Any], str]] = [
        ("account", {"text": long_text}, "text: at most 200 characters"),
        ("account", {"text": "z" * 201}, "text: at most 200 characters"),
        ("account", {"tags": {"nope": ["x"]}}, "no tag nope"),
        ("account", {"tags": {"status": ["ACTIVE", "NOPE"]}}, "no status NOPE"),
        ("account", {"tags": {"account_id": ["x"]}}, "no tag account_id"),
        ("account", {"below": {"available": 5}}, "no number available"),
        ("cart", {"tags": {"status": ["ACTIVE"]}}, "no status ACTIVE"),  # an account's
        ("cart", {"tags": {"account_id": ["x"] * 101}}, "at most 100 values"),
        ("inventory", {"tags": {"status": ["OPEN"]}}, "no tag status"),
        ("account", {"updated_before": "y" * 10_000}, "updated_before: an ISO 8601"),
        # What it quotes back stays short: names cut, the first three of many.
        ("account", {"tags": {"n" * 5_000: ["x"]}}, "no tag nnnn"),
        ("account", {"tags": {f"t{n}" * 50: ["x"] for n in range(40)}}, "and 37 more"),
        ("account", {"tags": {"status": ["S" * 150, "T" * 150]}}, "no status SSSS"),
        ("account", {"below": {"b" * 5_000: 1}}, "no number bbbb"),
        ("account", {"x" * 5_000: 1}, "unknown filter fields: xxxx"),
    ]
    payloads = {"account": {"amount": 1}, "cart": {}, "inventory": {"quantity": 1}}
    commands = {"account": "deposit", "cart": "clearCart", "inventory": "restock"}
    for entity_type, where, named in wrong:
        key = new_id()
        body = await gql(
            START_ON,
            type=entity_type,
            command=commands[entity_type],
            key=key,
            payload=payloads[entity_type],
            filter=where,
        )
        assert body.get("errors"), (where, body)
        error = body["errors"][0]
        assert error["extensions"]["code"] == "INVALID_INPUT", (where, body)
        assert named in error["message"] and len(error["message"]) < 300, error["message"]
        assert (await gql.data(READ, id=key))["bulkCommand"] is None  # nothing started
    # The GraphQL list refuses the same text, and both take the longest it allows.
    listed = "query($t: String!) { accounts(filter: {text: $t}) { totalCount } }"
    assert await gql.error_code(listed, t="z" * 201) == "INVALID_INPUT"
    await gql.data(listed, t="z" * 200)
    key = new_id()
    longest = {"text": "z" * 200, "tags": {"status": ["ACTIVE", "SUSPENDED"]}}
    await gql.data(START, key=key, payload={"amount": 1}, filter=longest)
    assert (await finished(gql, key))["total"] == 0


async def test_a_service_acts_on_its_own_bulk_commands_and_filters_only_what_it_may_list(
    secured_http: httpx.AsyncClient,
) -> None:
    """A service whose scope names a command starts it in bulk over ids, and follows,
    pauses and cancels the bulk commands it started: not an operator's, nor another
    service's. A filter searches the type's list, so it needs the type's read scope."""

    def caller(bearer: str) -> Caller:
        return Caller(secured_http, bearer)

    admin = caller(token("admin", "ops"))
    partner = caller(token("service", "partner-x", scope="account:deposit"))
    other = caller(token("service", "partner-y", scope="account:deposit"))
    reader = caller(token("service", "partner-z", scope="account:deposit account:read"))
    ids = [new_id(), new_id()]
    operators, partners = new_id(), new_id()
    await admin.data(START, key=operators, payload={"amount": 1}, ids=ids)
    await partner.data(START, key=partners, payload={"amount": 1}, ids=ids)

    assert await partner.code(READ, id=operators) == "FORBIDDEN"
    assert await partner.code(CANCEL, id=operators) == "FORBIDDEN"
    assert await other.code(READ, id=partners) == "FORBIDDEN"
    assert await other.code(CANCEL, id=partners) == "FORBIDDEN"
    # Its key is taken by another's bulk command: not a right it lacks (it was FORBIDDEN).
    taken = await other.code(START, key=partners, payload={"amount": 1}, ids=ids)
    assert taken == "IDEMPOTENCY_KEY_REUSED"
    mine = (await partner.data(READ, id=partners))["bulkCommand"]
    assert (mine["id"], mine["command"]) == (partners, "deposit")
    whose = "query($id: ID!) { bulkCommand(id: $id) { startedBy } }"
    assert (await admin.data(whose, id=operators))["bulkCommand"]["startedBy"] == "admin:ops"
    assert (await partner.data(whose, id=partners))["bulkCommand"]["startedBy"] == (
        "service:partner-x"
    )
    assert (await admin.data(READ, id=partners))["bulkCommand"]["id"] == partners

    searching = {"text": "ada"}
    key = new_id()
    assert await partner.code(START, key=key, payload={"amount": 1}, filter=searching) == (
        "FORBIDDEN"
    )
    assert (await admin.data(READ, id=key))["bulkCommand"] is None  # nothing started
    started = await reader.data(START, key=new_id(), payload={"amount": 1}, filter=searching)
    assert started["startBulkCommand"]["status"] in ("RUNNING", "COMPLETED")


async def test_a_service_that_may_not_read_the_entities_learns_only_the_refusals_codes(
    secured_http: httpx.AsyncClient,
) -> None:
    """A service scoped to `account:close` alone, closing accounts in bulk, read each
    account's balance from its refusal ("cannot close an account holding 4321"), which a
    single closeAccount tells it only as a code. A service that may read them sees it."""
    admin = Caller(secured_http, token("admin", "ops"))
    closer = Caller(secured_http, token("service", "closer", scope="account:close"))
    reader = Caller(secured_http, token("service", "auditor", scope="account:close read:account"))
    account_id = new_id()
    await admin.data(OPEN, id=account_id)
    await admin.data(VERIFY, id=account_id)
    await admin.data(DEPOSIT_4321, id=account_id)
    single = (await closer.post(CLOSE, id=account_id)).json()["errors"][0]
    assert single["extensions"]["code"] == "INVALID_TRANSITION" and "holding" not in str(single)

    for caller, shown in ((closer, False), (reader, True)):
        key = new_id()
        await caller.data(START_ON, type="account", command="close", key=key, ids=[account_id])
        for _ in range(200):
            bulk = (await caller.data(READ, id=key))["bulkCommand"]
            if bulk["status"] == "COMPLETED":
                break
            await asyncio.sleep(0.1)
        assert (bulk["status"], bulk["rejected"]) == ("COMPLETED", 1), bulk
        [failure] = bulk["failures"]
        assert failure["code"] == "INVALID_TRANSITION", failure
        assert ("holding 4321" in failure["message"]) is shown, failure


DEPOSIT_4321 = """mutation($id: ID!) { depositToAccount(id: $id, amount: 4321, wait: true)
  { commandId } }"""


async def read_until(
    gql: GraphQLClient, bulk_id: str, ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    for _ in range(200):
        bulk: dict[str, Any] = (await gql.data(READ_MORE, id=bulk_id))["bulkCommand"]
        if ok(bulk):
            return bulk
        await asyncio.sleep(0.1)
    raise AssertionError(f"bulk {bulk_id} never so: {bulk}")


READ_MORE = """query($id: ID!) { bulkCommand(id: $id) {
  status total delivered deliveredAt done cancelRequested eta } }"""


async def test_a_bulk_refuses_what_would_change_nothing_pause_or_cancel_once_all_sent(
    gql: GraphQLClient, temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A cancel once the last page was sent ended the bulk CANCELLED with every target sent
    its command, and a resume after a cancel was accepted and did nothing: each is now
    INVALID_TRANSITION, saying why."""
    unserved = elsewhere(settings)  # their worker down: their bulk waits to count them
    async with run_worker(unserved):
        ids = await open_accounts(temporal_client, unserved, 2)
    all_sent = new_id()
    await gql.data(START, key=all_sent, ids=ids[:1], payload={"amount": 5})
    sent = await read_until(gql, all_sent, lambda b: b["deliveredAt"] is not None)
    assert (sent["status"], sent["done"]) == ("RUNNING", 0)
    for mutation in (PAUSE, CANCEL):
        error = (await gql(mutation, id=all_sent))["errors"][0]
        assert error["extensions"]["code"] == "INVALID_TRANSITION", error
        assert "nothing is left to pause or cancel" in error["message"], error

    # Cancelled while its first page waits to be counted, with a page left to send.
    cancelling = new_id()
    await paused_bulk(
        temporal_client,
        settings.bulk_task_queue,
        cancelling,
        ids,
        paused=False,
        page_size=1,
        pages_per_run=1,
    )
    await read_until(gql, cancelling, lambda b: b["delivered"] == 1)
    assert (await gql.data(CANCEL, id=cancelling))["cancelBulkCommand"]["status"] == "RUNNING"
    asked = await read_until(gql, cancelling, lambda b: b["cancelRequested"])
    assert asked["status"] == "RUNNING"
    for mutation in (RESUME, PAUSE):
        error = (await gql(mutation, id=cancelling))["errors"][0]
        assert error["extensions"]["code"] == "INVALID_TRANSITION", error
        assert "is being cancelled" in error["message"], error

    async with run_worker(unserved):
        completed = await read_until(gql, all_sent, lambda b: b["status"] != "RUNNING")
        cancelled = await read_until(gql, cancelling, lambda b: b["status"] != "RUNNING")
    assert (completed["status"], completed["total"], completed["done"]) == ("COMPLETED", 1, 1)
    assert (cancelled["status"], cancelled["delivered"], cancelled["done"]) == ("CANCELLED", 1, 1)


PAUSE_KEYED = """mutation($id: ID!, $key: String) {
  pauseBulkCommand(id: $id, idempotencyKey: $key) { status } }"""
RESUME_KEYED = """mutation($id: ID!, $key: String) {
  resumeBulkCommand(id: $id, idempotencyKey: $key) { status } }"""


async def test_a_pause_sent_again_after_a_resume_does_not_stop_the_bulk_again(
    gql: GraphQLClient, temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A pause whose answer was lost, retried after someone resumed, stopped the bulk again,
    to wait for another resume: under its key it is taken once, and answered as it is."""
    unserved = elsewhere(settings)  # their worker down: the first page waits to be counted
    async with run_worker(unserved):
        ids = await open_accounts(temporal_client, unserved, 2)
    bulk_id, pause_key, resume_key = new_id(), new_id(), new_id()
    handle = await paused_bulk(
        temporal_client, settings.bulk_task_queue, bulk_id, ids, page_size=1, pages_per_run=1
    )
    paused = await gql.data(PAUSE_KEYED, id=bulk_id, key=pause_key)
    assert paused["pauseBulkCommand"]["status"] == "PAUSED"
    await gql.data(RESUME_KEYED, id=bulk_id, key=resume_key)
    await read_until(gql, bulk_id, lambda b: b["delivered"] == 1)

    again = await gql.data(PAUSE_KEYED, id=bulk_id, key=pause_key)
    assert again["pauseBulkCommand"]["status"] == "RUNNING"
    # A retry that passed the API's check before the resume came reaches the bulk itself.
    await handle.signal(BulkCommandWorkflow.pause, pause_key)
    reused = await gql(RESUME_KEYED, id=bulk_id, key=pause_key)
    assert reused["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED", reused
    assert "used to pause" in reused["errors"][0]["message"], reused

    async with run_worker(unserved):
        ended = await read_until(gql, bulk_id, lambda b: b["status"] != "RUNNING")
    assert (ended["status"], ended["delivered"], ended["done"]) == ("COMPLETED", 2, 2)
    for account_id in ids:
        assert (await read_account(gql, account_id, "LIVE"))["balance"] == 5
    # Sent again once the bulk has ended, it is answered as it is; a new pause is refused.
    late = await gql.data(PAUSE_KEYED, id=bulk_id, key=pause_key)
    assert late["pauseBulkCommand"]["status"] == "COMPLETED"
    assert await gql.error_code(PAUSE_KEYED, id=bulk_id, key=new_id()) == "INVALID_TRANSITION"
    bad = await gql(PAUSE_KEYED, id=bulk_id, key="no spaces")
    assert bad["errors"][0]["extensions"]["code"] == "INVALID_INPUT", bad


async def test_a_pause_without_a_key_is_sent_as_workers_from_before_keys_take_it(
    gql: GraphQLClient, temporal_client: Client, settings: Settings
) -> None:
    """Signals sent with a key argument, even a null one, failed every workflow task of a
    bulk on a worker from before keys (its handlers take none) while a rollout was under way:
    one without a key carries no argument."""
    bulk_id = new_id()
    handle = await paused_bulk(temporal_client, settings.bulk_task_queue, bulk_id, [new_id()])
    await gql.data(PAUSE, id=bulk_id)
    await gql.data(PAUSE_KEYED, id=bulk_id, key=new_id())
    sent = [
        event.workflow_execution_signaled_event_attributes
        async for event in handle.fetch_history_events()
        if event.HasField("workflow_execution_signaled_event_attributes")
    ]
    assert [(s.signal_name, len(s.input.payloads)) for s in sent] == [("pause", 0), ("pause", 1)]
    await handle.terminate()


async def test_a_bulk_paused_for_long_goes_on_paused_in_a_new_run_however_often_paused(
    gql: GraphQLClient, temporal_client: Client, settings: Settings
) -> None:
    """A paused bulk waited in one run: each pause sent to it meanwhile (a script's, every
    few seconds for days) grew that run, and past Temporal's 10,000 signals it could be
    neither resumed nor cancelled. It continues as new, still paused, keyed actions kept."""
    account_id = new_id()
    await open_active(gql, account_id)
    bulk_id, kept = new_id(), new_id()
    handle = await paused_bulk(
        temporal_client,
        settings.bulk_task_queue,
        bulk_id,
        [account_id],
        paused_history_events=50,
    )
    first_run = (await handle.describe()).run_id
    await gql.data(PAUSE_KEYED, id=bulk_id, key=kept)
    for _ in range(4):
        await asyncio.gather(*(handle.signal(BulkCommandWorkflow.pause) for _ in range(20)))
    for _ in range(100):
        if (await handle.describe()).run_id != first_run:
            break
        await asyncio.sleep(0.1)
    assert (await handle.describe()).run_id != first_run
    assert (await gql.data(READ, id=bulk_id))["bulkCommand"]["status"] == "PAUSED"
    # Its keyed actions went with it: the pause's key is still the pause's.
    reused = await gql(RESUME_KEYED, id=bulk_id, key=kept)
    assert reused["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED", reused
    await gql.data(RESUME, id=bulk_id)
    done = await finished(gql, bulk_id)
    assert (done["status"], done["applied"]) == ("COMPLETED", 1)
    assert (await read_account(gql, account_id, "LIVE"))["balance"] == 5


async def test_two_actions_sent_at_once_under_one_key_are_one_taken_and_one_refused(
    gql: GraphQLClient, temporal_client: Client, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A pause and a resume sent at the same moment under one key both answered success,
    and the bulk took only the first to reach it: a client that sent a cancel so was told
    it was cancelling while the bulk ran on."""
    unserved = elsewhere(settings)
    async with run_worker(unserved):
        ids = await open_accounts(temporal_client, unserved, 2)
    bulk_id = new_id()
    handle = await paused_bulk(
        temporal_client, settings.bulk_task_queue, bulk_id, ids, page_size=1, pages_per_run=1
    )
    for _ in range(6):
        key = new_id()
        answers = await asyncio.gather(
            gql(PAUSE_KEYED, id=bulk_id, key=key), gql(RESUME_KEYED, id=bulk_id, key=key)
        )
        codes = [a["errors"][0]["extensions"]["code"] if a.get("errors") else None for a in answers]
        assert sorted(map(str, codes)) == ["IDEMPOTENCY_KEY_REUSED", "None"], answers
        taken = "pause" if codes[0] is None else "resume"
        again = await gql(PAUSE_KEYED if taken == "pause" else RESUME_KEYED, id=bulk_id, key=key)
        assert not again.get("errors"), again  # the one taken, answered again as taken
    await handle.terminate()  # its page waits for a worker that is gone


def test_a_bulk_remembers_its_last_keyed_actions_only() -> None:
    progress = BulkProgress()
    assert progress.take("pause", None) and progress.take("pause", None)  # unkeyed: always
    assert progress.take("pause", "p-1")
    assert not progress.take("pause", "p-1") and not progress.take("resume", "p-1")
    assert progress.action_under("p-1") == "pause"
    for n in range(MAX_ACTIONS_KEPT):
        assert progress.take("resume", f"r-{n}")
    assert len(progress.actions) == MAX_ACTIONS_KEPT
    assert progress.action_under("p-1") is None  # the oldest, forgotten
    assert progress.take("pause", "p-1")


def test_a_bulk_s_eta_leaves_its_pauses_out() -> None:
    """Ten minutes in, five of them paused (three, then two so far), half done: five more
    minutes of work, not ten."""
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    progress = BulkProgress(
        status=BulkStatus.RUNNING,
        total=100,
        done=50,
        started_at=at,
        paused_seconds=180.0,
        paused_at=at + timedelta(minutes=8),
    )
    now = at + timedelta(minutes=10)
    assert BulkCommand.of("b", progress, now).eta == now + timedelta(minutes=5)
    resumed = progress.model_copy(update={"paused_seconds": 300.0, "paused_at": None})
    assert BulkCommand.of("b", resumed, now).eta == now + timedelta(minutes=5)
    # done past a total counted early never puts it in the past
    ahead = progress.model_copy(update={"done": 120, "paused_at": None, "paused_seconds": 0})
    assert BulkCommand.of("b", ahead, now).eta == now
