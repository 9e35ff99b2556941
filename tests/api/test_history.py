"""An entity's command history through GraphQL: every command with its name, time, sender
and outcome, newest first, page by page across continue-as-new; saga steps name their saga;
each history read is a LIVE read; a rendered cached read never serves an old history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import Client

from entities.runtime.envelope import RuntimeOptions
from tests.api.test_accounts_api import DEPOSIT, WITHDRAW, open_active
from tests.api.test_carts_api import cart_with, checkout, finished, open_account, restock
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from workers.settings import Settings

HISTORY = """query($id: ID!, $last: Int!, $before: String) { account(id: $id) {
  revision history(last: $last, before: $before) { hasOlder entries {
    commandId command at sentBy { role subject } outcome code message revision } } } }"""


async def page(
    gql: GraphQLClient, account_id: str, last: int, before: str | None = None
) -> dict[str, Any]:
    data = await gql.data(HISTORY, id=account_id, last=last, before=before)
    history: dict[str, Any] = data["account"]["history"]
    return history


async def test_pages_of_history_name_every_command_across_continue_as_new(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_commands_per_run=4)})
    account_id = new_id()
    started = datetime.now(UTC) - timedelta(seconds=1)
    async with api_client(settings, temporal_client) as http, run_worker(settings):
        gql = GraphQLClient(http)
        await open_active(gql, account_id)
        for n in range(6):
            await gql.data(DEPOSIT, id=account_id, amount=1, key=f"deposit-{n}")
        refused = await gql(WITHDRAW, id=account_id, amount=100, key="too-much")
        assert refused["errors"][0]["extensions"]["code"] == "INSUFFICIENT_FUNDS"
        await gql.data(DEPOSIT, id=account_id, amount=1, key="deposit-6")  # a fourth run

        entries: list[dict[str, Any]] = []
        before = None
        while True:
            got = await page(gql, account_id, 3, before)
            entries += got["entries"]
            if not got["hasOlder"]:
                break
            before = got["entries"][-1]["commandId"]

    names = [entry["command"] for entry in entries]
    assert names == ["deposit", "withdraw", *["deposit"] * 6, "verify", "open"]
    keys = [entry["commandId"] for entry in entries[:3]]
    assert keys == ["deposit-6", "too-much", "deposit-5"]
    assert [entry["revision"] for entry in entries] == [9, 8, 8, 7, 6, 5, 4, 3, 2, 1]
    withdraw = entries[1]
    assert (withdraw["outcome"], withdraw["code"]) == ("REJECTED", "INSUFFICIENT_FUNDS")
    assert withdraw["message"]
    assert all(entry["outcome"] == "APPLIED" for entry in entries if entry is not withdraw)
    times = [datetime.fromisoformat(entry["at"]) for entry in entries]
    assert times == sorted(times, reverse=True)
    assert started <= times[-1] and times[0] <= datetime.now(UTC)
    # Development lets every caller in as its admin, and that is who sent them all.
    assert {(e["sentBy"]["role"], e["sentBy"]["subject"]) for e in entries} == {
        ("admin", "development")
    }


async def test_saga_steps_name_their_saga(gql: GraphQLClient) -> None:
    account_id = await open_account(gql, 1_000)
    sku = await restock(gql, 5)
    cart_id = await cart_with(gql, account_id, (sku, 2, 100))
    checkout_id = await checkout(gql, cart_id)
    assert (await finished(gql, checkout_id))["status"] == "COMPLETED"
    newest = (await page(gql, account_id, 1))["entries"][0]
    assert newest["command"] == "withdraw"
    assert newest["sentBy"] == {"role": "saga", "subject": f"checkout:{checkout_id}"}


async def test_history_is_always_read_live(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    query = (
        "query($id: ID!) { account(id: $id) { revision history(last: 1) { entries { command } } } }"
    )
    first = (await gql.data(query, id=account_id))["account"]
    await gql.data(DEPOSIT, id=account_id, amount=1, key="one")
    # The cached account may lag its entity; its history never does.
    for _ in range(2):
        second = (await gql.data(query, id=account_id))["account"]
        assert second["history"]["entries"] == [{"command": "deposit"}]
    assert first["history"]["entries"] == [{"command": "verify"}]

    # Each history is a Temporal query: more than the LIVE reads a request may make is
    # refused before any runs.
    many = " ".join(f"h{n}: history(last: 1) {{ hasOlder }}" for n in range(6))
    code = await gql.error_code(
        f"query($id: ID!) {{ account(id: $id) {{ {many} }} }}", id=account_id
    )
    assert code == "TOO_MANY_LIVE_READS"


async def test_a_page_out_of_bounds_is_refused(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    for last in (0, 101):
        body = await gql(HISTORY, id=account_id, last=last)
        assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
        assert "last" in body["errors"][0]["message"]
    assert (await page(gql, account_id, 100))["hasOlder"] is False
    # A command the entity does not remember is no cursor: not an empty last page, which
    # would read as the end of its history.
    unknown = await gql(HISTORY, id=account_id, last=1, before="no-such-command")
    assert unknown["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
    assert "remembers no command" in unknown["errors"][0]["message"]
    # A cursor is a command id: 1 to 512 printable ASCII characters (a bulk command's are
    # longer than an idempotency key).
    longest = await gql(HISTORY, id=account_id, last=1, before="b" * 512)
    assert "remembers no command" in longest["errors"][0]["message"]  # read, not refused
    for before in ("", "a\u0000b", "c" * 513):
        body = await gql(HISTORY, id=account_id, last=1, before=before)
        assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
        assert "before" in body["errors"][0]["message"]
