"""Every Account mutation and query through the ASGI app, with each error code a client sees."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from entities.runtime.envelope import RuntimeOptions
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id, reopen_account
from tests.entities.shop import eventually
from workers.settings import Settings

ACCOUNT_FIELDS = """
    id status ownerName email currency balance lastActivityAt suspensionReason kycReference
    revision updatedAt stale source cachedAt
"""

OPEN = f"""
mutation Open($id: ID, $key: String, $wait: Boolean = true, $email: String = "ada@example.com") {{
  openAccount(id: $id, ownerName: "Ada Lovelace", email: $email, currency: "GBP",
              idempotencyKey: $key, wait: $wait) {{
    accountId commandId status account {{ {ACCOUNT_FIELDS} }}
  }}
}}"""


def mutation(name: str, args: str = "", arg_types: str = "") -> str:
    return f"""
mutation($id: ID!, $key: String, $wait: Boolean = true {arg_types}) {{
  {name}(id: $id, idempotencyKey: $key, wait: $wait {args}) {{
    accountId commandId status revision account {{ {ACCOUNT_FIELDS} }}
  }}
}}"""


VERIFY = mutation("verifyAccount", ", kycReference: $kyc", ", $kyc: String")
DEPOSIT = mutation("depositToAccount", ", amount: $amount", ", $amount: Long!")
WITHDRAW = mutation("withdrawFromAccount", ", amount: $amount", ", $amount: Long!")
SUSPEND = mutation("suspendAccount", ", reason: $reason", ", $reason: String")
REACTIVATE = mutation("reactivateAccount")
CLOSE = mutation("closeAccount")
READ = f"""
query($id: ID!, $consistency: Consistency = CACHED) {{
  account(id: $id, consistency: $consistency) {{ {ACCOUNT_FIELDS} }}
}}"""


async def open_active(gql: GraphQLClient, account_id: str) -> None:
    await gql.data(OPEN, id=account_id)
    await gql.data(VERIFY, id=account_id)


def account_of(data: dict[str, Any], field: str) -> dict[str, Any]:
    account: dict[str, Any] = data[field]["account"]
    return account


async def test_an_account_lifecycle_through_every_mutation(gql: GraphQLClient) -> None:
    account_id = new_id()
    opened = (await gql.data(OPEN, id=account_id))["openAccount"]
    assert opened["accountId"] == account_id and opened["status"] == "APPLIED"
    assert opened["commandId"]
    account = opened["account"]
    assert account["status"] == "PENDING" and account["balance"] == 0
    assert account["ownerName"] == "Ada Lovelace" and account["currency"] == "GBP"
    assert (account["revision"], account["source"], account["stale"]) == (1, "LIVE", False)

    verified = account_of(await gql.data(VERIFY, id=account_id, kyc="kyc-7"), "verifyAccount")
    assert (verified["status"], verified["kycReference"], verified["revision"]) == (
        "ACTIVE",
        "kyc-7",
        2,
    )
    deposited = account_of(
        await gql.data(DEPOSIT, id=account_id, amount=5_000_000_000), "depositToAccount"
    )
    assert deposited["balance"] == 5_000_000_000  # beyond GraphQL's 32-bit Int
    withdrawn = account_of(
        await gql.data(WITHDRAW, id=account_id, amount=4_999_999_000), "withdrawFromAccount"
    )
    assert withdrawn["balance"] == 1000
    suspended = account_of(
        await gql.data(SUSPEND, id=account_id, reason="fraud check"), "suspendAccount"
    )
    assert (suspended["status"], suspended["suspensionReason"]) == ("SUSPENDED", "fraud check")
    reactivated = account_of(await gql.data(REACTIVATE, id=account_id), "reactivateAccount")
    assert (reactivated["status"], reactivated["suspensionReason"]) == ("ACTIVE", None)
    await gql.data(WITHDRAW, id=account_id, amount=1000)
    closed = account_of(await gql.data(CLOSE, id=account_id), "closeAccount")
    assert closed["status"] == "CLOSED" and closed["revision"] == 8

    read = (await gql.data(READ, id=account_id))["account"]
    assert read["status"] == "CLOSED" and read["revision"] == 8
    assert read["source"] == "CACHE" and read["stale"] is False and read["cachedAt"]
    live = (await gql.data(READ, id=account_id, consistency="LIVE"))["account"]
    assert (live["status"], live["revision"], live["source"]) == ("CLOSED", 8, "LIVE")
    assert live["updatedAt"] == read["updatedAt"]


async def test_a_mutation_without_wait_is_accepted_then_applied(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    accepted = (await gql.data(DEPOSIT, id=account_id, amount=25, wait=False))["depositToAccount"]
    assert accepted["status"] == "ACCEPTED" and accepted["account"] is None
    # A waited command sent after it is applied after it.
    after = account_of(await gql.data(DEPOSIT, id=account_id, amount=5), "depositToAccount")
    assert after["balance"] == 30 and after["revision"] == 4


async def test_idempotency_key_applies_a_repeated_mutation_once(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    first = (await gql.data(DEPOSIT, id=account_id, amount=40, key="pay-1"))["depositToAccount"]
    second = (await gql.data(DEPOSIT, id=account_id, amount=40, key="pay-1"))["depositToAccount"]
    assert first["commandId"] == second["commandId"] == "pay-1"
    assert second["account"]["balance"] == 40 and second["account"]["revision"] == 3


async def test_an_idempotency_key_reused_for_another_command_is_refused(
    gql: GraphQLClient,
) -> None:
    """A key names one command: sent again with other arguments, or for another mutation,
    it is refused with IDEMPOTENCY_KEY_REUSED, not reported as the first command's success."""
    account_id = new_id()
    await open_active(gql, account_id)
    await gql.data(DEPOSIT, id=account_id, amount=40, key="pay-1")
    for document, extra in [(DEPOSIT, {"amount": 41}), (WITHDRAW, {"amount": 40})]:
        body = await gql(document, id=account_id, key="pay-1", **extra)
        assert body["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED"
        assert "pay-1" in body["errors"][0]["message"]
    account = await read_account(gql, account_id, "LIVE")
    assert (account["balance"], account["revision"]) == (40, 3)
    # The same command again is still the same command.
    again = account_of(
        await gql.data(DEPOSIT, id=account_id, amount=40, key="pay-1"), "depositToAccount"
    )
    assert (again["balance"], again["revision"]) == (40, 3)


async def test_a_reused_idempotency_key_is_recognised_after_continue_as_new(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=5)})
    account_id = new_id()
    async with api_client(settings, temporal_client) as http, run_worker(settings):
        gql = GraphQLClient(http)
        await open_active(gql, account_id)
        await gql.data(DEPOSIT, id=account_id, amount=7, key="first")
        for n in range(12):  # two more runs
            await gql.data(DEPOSIT, id=account_id, amount=1, key=f"more-{n}")
        body = await gql(WITHDRAW, id=account_id, key="first", amount=7)
        assert body["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED"
        account = await read_account(gql, account_id, "LIVE")
        assert (account["balance"], account["revision"]) == (19, 15)


async def test_open_without_an_id_derives_it_from_the_idempotency_key(gql: GraphQLClient) -> None:
    key = new_id()
    first = (await gql.data(OPEN, key=key))["openAccount"]
    again = (await gql.data(OPEN, key=key))["openAccount"]
    assert first["accountId"] == again["accountId"]
    assert again["account"]["revision"] == 1
    other = (await gql.data(OPEN))["openAccount"]
    assert other["accountId"] != first["accountId"]


async def test_reading_an_account_that_never_existed_is_null(gql: GraphQLClient) -> None:
    for consistency in ("CACHED", "LIVE", None):
        assert (await gql.data(READ, id=new_id(), consistency=consistency))["account"] is None


@pytest.mark.parametrize(
    ("document", "variables"),
    [
        (DEPOSIT, {"amount": -5}),
        (DEPOSIT, {"amount": 0}),
        (DEPOSIT, {"amount": 1.5}),
        (DEPOSIT, {"amount": "ten"}),
        (READ, {"id": "bad id!"}),
        (DEPOSIT, {"id": "x" * 200, "amount": 1}),
        (DEPOSIT, {"amount": 1, "key": ""}),
        ('mutation { depositToAccount(id: "a", amount: 1, colour: "red") { commandId } }', {}),
        ('{ account(id: "a") { favouriteColour } }', {}),
        ("{ account(id: ", {}),
    ],
)
async def test_bad_input_is_invalid_input(
    gql: GraphQLClient, document: str, variables: dict[str, Any]
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    params = {"id": account_id, **variables}
    assert await gql.error_code(document, **params) == "INVALID_INPUT"
    read = (await gql.data(READ, id=account_id, consistency="LIVE"))["account"]
    assert read["balance"] == 0 and read["revision"] == 2


async def test_open_with_a_malformed_email_is_invalid_input(gql: GraphQLClient) -> None:
    account_id = new_id()
    assert await gql.error_code(OPEN, id=account_id, email="nope") == "INVALID_INPUT"
    assert (await gql.data(READ, id=account_id))["account"] is None


async def test_rejections_carry_their_codes_and_change_nothing(gql: GraphQLClient) -> None:
    account_id = new_id()
    await gql.data(OPEN, id=account_id)
    assert await gql.error_code(DEPOSIT, id=account_id, amount=5) == "INVALID_TRANSITION"
    assert await gql.error_code(OPEN, id=account_id) == "ALREADY_EXISTS"
    await gql.data(VERIFY, id=account_id)
    await gql.data(DEPOSIT, id=account_id, amount=10)
    assert await gql.error_code(WITHDRAW, id=account_id, amount=11) == "INSUFFICIENT_FUNDS"
    assert await gql.error_code(REACTIVATE, id=account_id) == "INVALID_TRANSITION"
    assert await gql.error_code(CLOSE, id=account_id) == "INVALID_TRANSITION"
    read = (await gql.data(READ, id=account_id, consistency="LIVE"))["account"]
    assert (read["status"], read["balance"], read["revision"]) == ("ACTIVE", 10, 3)


async def test_a_refused_mutation_among_several_leaves_the_others_answered_and_run(
    gql: GraphQLClient,
) -> None:
    """Mutations run one after another; one refused is null with its error, and neither
    hides the one before it nor stops the one after it (the whole answer was null, and the
    mutations after the refused one were never sent)."""
    account_id = new_id()
    await open_active(gql, account_id)
    body = await gql(
        """mutation($id: ID!) {
          a: depositToAccount(id: $id, amount: 5, idempotencyKey: "several-a", wait: true) {
            commandId status revision account { balance } }
          b: withdrawFromAccount(id: $id, amount: 500, idempotencyKey: "several-b", wait: true) {
            commandId status }
          c: depositToAccount(id: $id, amount: 7, idempotencyKey: "several-c", wait: true) {
            commandId status revision account { balance } }
        }""",
        id=account_id,
    )
    assert [(e["path"], e["extensions"]["code"]) for e in body["errors"]] == [
        (["b"], "INSUFFICIENT_FUNDS")
    ]
    data = body["data"]
    assert data["b"] is None
    assert (data["a"]["status"], data["a"]["revision"], data["a"]["account"]["balance"]) == (
        "APPLIED",
        3,
        5,
    )
    assert (data["c"]["status"], data["c"]["revision"], data["c"]["account"]["balance"]) == (
        "APPLIED",
        4,
        12,
    )


async def test_a_repeated_waited_command_answers_the_revision_it_made(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    first = (await gql.data(DEPOSIT, id=account_id, amount=40, key="rev-1"))["depositToAccount"]
    await gql.data(DEPOSIT, id=account_id, amount=2, key="rev-2")
    again = (await gql.data(DEPOSIT, id=account_id, amount=40, key="rev-1"))["depositToAccount"]
    assert first["revision"] == again["revision"] == 3
    # The entity beside it is as it is now, the later deposit included.
    assert (again["account"]["revision"], again["account"]["balance"]) == (4, 42)
    unwaited = await gql.data(DEPOSIT, id=account_id, amount=1, key="rev-3", wait=False)
    assert unwaited["depositToAccount"]["revision"] is None


async def test_commands_to_a_missing_account_are_not_found(gql: GraphQLClient) -> None:
    for document, extra in [(DEPOSIT, {"amount": 1}), (VERIFY, {}), (CLOSE, {})]:
        assert await gql.error_code(document, id=new_id(), **extra) == "NOT_FOUND"


async def test_commands_to_a_closed_account_are_invalid_transitions(gql: GraphQLClient) -> None:
    account_id = new_id()
    await gql.data(OPEN, id=account_id)
    await gql.data(CLOSE, id=account_id)
    for document, extra in [(DEPOSIT, {"amount": 1}), (REACTIVATE, {}), (CLOSE, {})]:
        assert await gql.error_code(document, id=account_id, **extra) == "INVALID_TRANSITION"
    assert await gql.error_code(OPEN, id=account_id) == "INVALID_TRANSITION"


async def test_an_id_reused_after_its_closed_account_was_deleted_reads_as_the_new_account(
    gql: GraphQLClient, temporal_client: Client, settings: Settings
) -> None:
    """Once the namespace's retention has deleted a closed account's workflow, its id can be
    opened again: reads, cached ones included, show the new account, not the old one."""
    account_id = new_id()
    await open_active(gql, account_id)
    await gql.data(DEPOSIT, id=account_id, amount=70)
    await gql.data(WITHDRAW, id=account_id, amount=70)
    await gql.data(CLOSE, id=account_id)
    closed = await read_account(gql, account_id)
    assert (closed["status"], closed["revision"]) == ("CLOSED", 5)

    await reopen_account(temporal_client, settings, account_id)
    for consistency in ("LIVE", "CACHED"):
        account = await read_account(gql, account_id, consistency)
        assert (account["status"], account["revision"], account["balance"]) == ("PENDING", 1, 0)
    await gql.data(VERIFY, id=account_id)
    account = await read_account(gql, account_id)
    assert (account["status"], account["revision"], account["source"]) == ("ACTIVE", 2, "CACHE")


async def test_a_retry_of_the_command_that_closed_an_account_is_answered_as_the_first(
    gql: GraphQLClient, temporal_client: Client
) -> None:
    """A client that sent closeAccount without waiting, heard nothing and sends it again
    under its key once the account has ended is told ACCEPTED, as the first sending was,
    not "is closed", which told it its close failed. A new command to the closed account is
    still refused; the close's key named for another command is ACCEPTED and not applied,
    as a running account answers a reused key without `wait`."""
    account_id = new_id()
    await open_active(gql, account_id)
    first = (await gql.data(CLOSE, id=account_id, key="close-1", wait=False))["closeAccount"]
    handle = temporal_client.get_workflow_handle(f"account:{account_id}")
    await eventually(handle.describe, lambda d: d.status is WorkflowExecutionStatus.COMPLETED)

    again = (await gql.data(CLOSE, id=account_id, key="close-1", wait=False))["closeAccount"]
    assert first["status"] == again["status"] == "ACCEPTED"
    assert again["commandId"] == "close-1"
    late = await gql(DEPOSIT, id=account_id, amount=5, key="late-1", wait=False)
    assert late["errors"][0]["extensions"]["code"] == "INVALID_TRANSITION", late
    assert "is closed" in late["errors"][0]["message"]
    reused = await gql.data(DEPOSIT, id=account_id, amount=5, key="close-1", wait=False)
    assert reused["depositToAccount"]["status"] == "ACCEPTED"
    account = await read_account(gql, account_id, "LIVE")
    assert (account["status"], account["balance"]) == ("CLOSED", 0)


async def read_account(
    gql: GraphQLClient, account_id: str, consistency: str = "CACHED"
) -> dict[str, Any]:
    account: dict[str, Any] = (await gql.data(READ, id=account_id, consistency=consistency))[
        "account"
    ]
    return account


async def test_waiting_on_an_entity_with_no_worker_is_unavailable_then_retry_is_safe(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    account_id = new_id()
    async with api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        async with run_worker():
            await open_active(gql, account_id)
        body = await gql(DEPOSIT, id=account_id, amount=9, key="late-1")
        assert body["errors"][0]["extensions"]["code"] == "UNAVAILABLE"
        assert "late-1" in body["errors"][0]["message"]
        async with run_worker():
            # As the README asks of a client: UNAVAILABLE is sent again, with the same key,
            # until it is answered (a new worker may take a few seconds to take over).
            for _ in range(5):
                retried = await gql(DEPOSIT, id=account_id, amount=9, key="late-1")
                if not retried.get("errors"):
                    break
                assert retried["errors"][0]["extensions"]["code"] == "UNAVAILABLE"
        assert retried["data"]["depositToAccount"]["account"]["balance"] == 9


async def test_errors_never_leak_internals(http: httpx.AsyncClient, gql: GraphQLClient) -> None:
    body = await gql(DEPOSIT, id=new_id(), amount=-1)
    text = str(body)
    assert "Traceback" not in text and "temporalio" not in text and "pydantic" not in text


async def test_graphiql_is_served(http: httpx.AsyncClient) -> None:
    page = await http.get("/graphql", headers={"accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()
