"""Operator tools for checkouts over HTTP: the FAILED ones listed for admins, retried after
the cause is fixed or resolved with a reason, recorded with who did it; refused to everyone
else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from api.visibility import VisibilityCursor
from entities.checkout_input import checkout_workflow_id
from entities.runtime.saga import MAX_OPERATOR_ACTIONS, MAX_RECORDED_REFUSALS, SagaStatus
from tests.api.test_access import Caller, token
from tests.conftest import WorkerFactory, api_client
from tests.entities.failing_checkout import FailedCheckout, failed_checkout
from tests.entities.shop import Shop, eventually, shop_settings
from workers.cache import SnapshotCache
from workers.settings import Settings

LIST = """query($status: [CheckoutStatus!], $first: Int, $after: String) {
  checkouts(filter: {status: $status}, first: $first, after: $after) {
    edges { cursor node { id cartId accountId status total failureCode awaitingOperatorUntil
                          endedAt refused { name status code } } }
    pageInfo { hasNextPage endCursor } totalCount } }"""
READ = """query($id: ID!) { checkout(id: $id) { status awaitingOperatorUntil
  refused { name status code } compensations { name status code }
  operatorActions { action reason by at refused } } }"""
RETRY = """mutation($id: ID!, $reason: String!) {
  retryCheckoutCompensations(id: $id, reason: $reason) {
    status operatorActions { action reason by } } }"""
RESOLVE = """mutation($id: ID!, $reason: String!) { resolveCheckout(id: $id, reason: $reason) {
  status operatorActions { action reason by } } }"""


@pytest.fixture
def secured(secured: Settings) -> Settings:
    """The secured API's settings, with the shop's payment adapter and stock."""
    return shop_settings(secured)


@pytest.fixture
def shop(temporal_client: Client, cache: SnapshotCache, secured: Settings) -> Shop:
    return Shop(temporal_client, cache, secured)


@pytest.fixture
async def http(secured: Settings, temporal_client: Client) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(secured, temporal_client) as client:
        yield client


def callers(http: httpx.AsyncClient, failed: FailedCheckout) -> dict[str, Caller]:
    return {
        "admin": Caller(http, token("admin", "ops-1")),
        "customer": Caller(http, token("customer", "ada", [failed.account_id])),
        "service": Caller(http, token("service", "billing", scope="account:* read:* cart:*")),
    }


async def listed(admin: Caller, status: str, checkout_id: str) -> dict[str, Any] | None:
    """The checkout's row in the list of that status, once visibility shows it there."""

    async def row() -> dict[str, Any] | None:
        page = (await admin.data(LIST, status=[status], first=100))["checkouts"]
        return next((e["node"] for e in page["edges"] if e["node"]["id"] == checkout_id), None)

    return await eventually(row, lambda found: found is not None)


async def test_an_admin_lists_a_failed_checkout_and_retries_it_once_the_cause_is_fixed(
    shop: Shop, run_worker: WorkerFactory, http: httpx.AsyncClient
) -> None:
    async with failed_checkout(shop, run_worker) as failed:
        who = callers(http, failed)
        admin, checkout_id = who["admin"], failed.checkout_id
        row = await listed(admin, "FAILED", checkout_id)
        assert row is not None
        assert (row["status"], row["cartId"], row["accountId"]) == (
            "FAILED",
            failed.cart_id,
            failed.account_id,
        )
        assert (row["total"], row["failureCode"], row["endedAt"]) == (600, "UNAVAILABLE", None)
        assert row["awaitingOperatorUntil"] is not None
        for status in ("FAILED", "RESOLVED"):  # a count alone: more only when there is any
            counted = (await admin.data(LIST, status=[status], first=0))["checkouts"]
            assert counted["pageInfo"]["hasNextPage"] is (counted["totalCount"] > 0)
        nothing = (await admin.data(LIST, status=[], first=100))["checkouts"]
        assert (nothing["edges"], nothing["totalCount"]) == ([], 0)  # none let in
        # Why it waits: the refund was refused (its failure was the stock, above).
        refund = {"name": "refund", "status": "FAILED", "code": "LIMIT_REACHED"}
        assert row["refused"] == [refund]

        for name in ("customer", "service"):
            assert await who[name].code(LIST, status=["FAILED"]) == "FORBIDDEN", name
            assert await who[name].code(RETRY, id=checkout_id, reason="x") == "FORBIDDEN", name
            assert await who[name].code(RESOLVE, id=checkout_id, reason="x") == "FORBIDDEN", name
        # The customer still reads its own checkout, and sees it needs an operator.
        mine = (await who["customer"].data(READ, id=checkout_id))["checkout"]
        refunds = [c for c in mine["compensations"] if c["name"] == "refund"]
        assert (mine["status"], refunds[0]["code"]) == ("FAILED", "LIMIT_REACHED")
        assert mine["refused"] == [refund]

        await failed.fix()
        retried = (await admin.data(RETRY, id=checkout_id, reason="  limit lifted  "))[
            "retryCheckoutCompensations"
        ]
        assert retried["operatorActions"] == [
            {"action": "RETRY", "reason": "limit lifted", "by": "admin:ops-1"}
        ]
        done = await eventually(
            lambda: admin.data(READ, id=checkout_id),
            lambda d: d["checkout"]["status"] == SagaStatus.COMPENSATED,
        )
        assert done["checkout"]["awaitingOperatorUntil"] is None
        assert done["checkout"]["refused"] == []
        assert {c["status"] for c in done["checkout"]["compensations"]} == {"DONE"}
        assert await failed.bank.balance(failed.account_id) == 1_000
        assert await listed(admin, "COMPENSATED", checkout_id) is not None
        # Ended: nothing more to retry or resolve.
        assert await admin.code(RESOLVE, id=checkout_id, reason="late") == "INVALID_TRANSITION"


async def test_a_resolve_is_recorded_with_its_reason_and_who_did_it(
    shop: Shop, run_worker: WorkerFactory, http: httpx.AsyncClient
) -> None:
    async with failed_checkout(shop, run_worker) as failed:
        admin, customer = callers(http, failed)["admin"], callers(http, failed)["customer"]
        reason = "refunded by bank transfer, ticket 4711"
        assert await admin.code(RESOLVE, id=failed.checkout_id, reason=" ") == "INVALID_INPUT"
        # Shown to its customer too: no control or invisible formatting characters (they were
        # recorded and shown as sent), and nothing recorded for them.
        for hidden in ("refunded\u0000", "refunded \u001b[31m", "by Ada\u202egnp.exe"):
            code = await admin.code(RESOLVE, id=failed.checkout_id, reason=hidden)
            assert code == "INVALID_INPUT", hidden
        await admin.data(RESOLVE, id=failed.checkout_id, reason=reason)
        done = await eventually(
            lambda: admin.data(READ, id=failed.checkout_id),
            lambda d: d["checkout"]["status"] == SagaStatus.RESOLVED,
        )
        [action] = done["checkout"]["operatorActions"]
        assert (action["action"], action["reason"], action["by"], action["refused"]) == (
            "RESOLVE",
            reason,
            "admin:ops-1",
            None,
        )
        assert action["at"] is not None
        assert await listed(admin, "RESOLVED", failed.checkout_id) is not None
        # Its customer sees that an operator settled it, and not which one (as in history).
        [seen] = (await customer.data(READ, id=failed.checkout_id))["checkout"]["operatorActions"]
        assert (seen["action"], seen["reason"], seen["by"]) == ("RESOLVE", reason, "admin")


async def updates_taken(shop: Shop, checkout_id: str) -> int:
    """Updates the checkout's history holds."""
    handle = shop.client.get_workflow_handle(checkout_workflow_id(checkout_id))
    accepted = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    return sum([event.event_type == accepted async for event in handle.fetch_history_events()])


RETRY_KEYED = """mutation($id: ID!, $reason: String!, $key: String) {
  retryCheckoutCompensations(id: $id, reason: $reason, idempotencyKey: $key) {
    status operatorActions { action reason } } }"""
RESOLVE_KEYED = """mutation($id: ID!, $reason: String!, $key: String) {
  resolveCheckout(id: $id, reason: $reason, idempotencyKey: $key) {
    status operatorActions { action reason } } }"""


async def test_an_operator_action_sent_again_under_its_key_is_taken_once(
    shop: Shop, run_worker: WorkerFactory, http: httpx.AsyncClient
) -> None:
    """A retry or resolve whose answer was lost (a timeout) and sent again: without a key it
    was a second action (a second retry run), or refused once the first had ended the
    checkout. Under its key it is answered as the first, and taken once."""
    admin = Caller(http, token("admin", "ops-1"))
    other = Caller(http, token("admin", "ops-2"))
    async with failed_checkout(shop, run_worker) as failed:
        checkout_id = failed.checkout_id
        # The cause is not fixed: the retry runs, fails, and the checkout waits again.
        await admin.data(RETRY_KEYED, id=checkout_id, reason="try once", key="r-1")
        again = await eventually(
            lambda: admin.data(READ, id=checkout_id),
            lambda d: d["checkout"]["awaitingOperatorUntil"] is not None,
        )
        assert len(again["checkout"]["operatorActions"]) == 1
        # However often: none enters its history (Temporal takes 2,000 updates a run).
        updates = await updates_taken(shop, checkout_id)
        for _ in range(MAX_OPERATOR_ACTIONS + 5):
            repeat = await admin.data(RETRY_KEYED, id=checkout_id, reason="try once", key="r-1")
            assert repeat["retryCheckoutCompensations"]["operatorActions"] == [
                {"action": "RETRY", "reason": "try once"}
            ]
        assert await updates_taken(shop, checkout_id) == updates == 1
        # The key with another action is refused, unrecorded; another operator's is its own.
        reused = await admin.code(RESOLVE_KEYED, id=checkout_id, reason="settled", key="r-1")
        assert reused == "IDEMPOTENCY_KEY_REUSED"
        await failed.fix()
        await other.data(RESOLVE_KEYED, id=checkout_id, reason="settled", key="r-1")
        done = await eventually(
            lambda: admin.data(READ, id=checkout_id),
            lambda d: d["checkout"]["status"] == SagaStatus.RESOLVED,
        )
        actions = [(a["action"], a["by"]) for a in done["checkout"]["operatorActions"]]
        assert actions == [("RETRY", "admin:ops-1"), ("RESOLVE", "admin:ops-2")]
        # Ended by that resolve, the checkout answers it sent again as it was taken.
        ended = await other.data(RESOLVE_KEYED, id=checkout_id, reason="settled", key="r-1")
        assert ended["resolveCheckout"]["status"] == "RESOLVED"
        assert len(ended["resolveCheckout"]["operatorActions"]) == 2
        late = await other.code(RESOLVE_KEYED, id=checkout_id, reason="other", key="r-1")
        assert late == "IDEMPOTENCY_KEY_REUSED"
        # Several in one request: each answered, none charged to its LIVE reads.
        aliased = " ".join(
            f'a{i}: resolveCheckout(id: $id, reason: "settled", idempotencyKey: "r-1") {{ status }}'
            for i in range(6)
        )
        six = await other.data(f"mutation($id: ID!) {{ {aliased} }}", id=checkout_id)
        assert [six[f"a{i}"]["status"] for i in range(6)] == ["RESOLVED"] * 6
        assert await other.code(RESOLVE, id=checkout_id, reason="settled") == ("INVALID_TRANSITION")
        assert await admin.code(RESOLVE_KEYED, id=checkout_id, reason="x", key="no space") == (
            "INVALID_INPUT"
        )


async def test_refused_actions_never_use_up_what_an_operator_has_left(
    shop: Shop, run_worker: WorkerFactory, http: httpx.AsyncClient
) -> None:
    """Clicks while the checkout still runs are refused: the first ten are recorded, the rest
    refused alike and not recorded; once it waits for an operator, a resolve is taken.
    Twenty recorded refusals used to lock a FAILED checkout for good (LIMIT_REACHED)."""
    admin = Caller(http, token("admin", "ops-1"))

    async def early_clicks(checkout_id: str) -> None:
        codes = [
            await admin.code(RESOLVE, id=checkout_id, reason=f"early {i}")
            for i in range(MAX_OPERATOR_ACTIONS)
        ]
        assert codes == ["INVALID_TRANSITION"] * MAX_OPERATOR_ACTIONS

    async with failed_checkout(shop, run_worker, while_running=early_clicks) as failed:
        await admin.data(RESOLVE, id=failed.checkout_id, reason="refunded by bank")
        done = await eventually(
            lambda: admin.data(READ, id=failed.checkout_id),
            lambda d: d["checkout"]["status"] == SagaStatus.RESOLVED,
        )
    actions = done["checkout"]["operatorActions"]
    assert [action["refused"] is not None for action in actions] == [True] * (
        MAX_RECORDED_REFUSALS
    ) + [False]
    assert [action["reason"] for action in actions[:2]] == ["early 0", "early 1"]
    assert (actions[-1]["action"], actions[-1]["reason"]) == ("RESOLVE", "refunded by bank")


async def test_checkouts_are_listed_a_page_at_a_time(
    shop: Shop, run_worker: WorkerFactory, http: httpx.AsyncClient
) -> None:
    admin = Caller(http, token("admin", "ops-1"))
    async with run_worker(shop.settings):
        account_id = await shop.account(1_000)
        sku = await shop.stock(5)
        for _ in range(3):
            await shop.finished(await shop.checkout(await shop.cart(account_id, (sku, 1, 10))))
        await eventually(
            lambda: admin.data(LIST, status=["COMPLETED"]),
            lambda d: d["checkouts"]["totalCount"] >= 3,
        )
        seen: list[str] = []
        after = None
        for n in range(3):
            page = (await admin.data(LIST, status=["COMPLETED"], first=1, after=after))["checkouts"]
            [edge] = page["edges"]
            seen.append(edge["node"]["id"])
            assert page["pageInfo"]["endCursor"] == edge["cursor"]
            after = edge["cursor"]
            if n == 0:
                # One more ends meanwhile, at the top of the list: a cursor counting rows
                # from the top showed the first page's row again on the next.
                await shop.finished(await shop.checkout(await shop.cart(account_id, (sku, 1, 10))))
                await eventually(
                    lambda: admin.data(LIST, status=["COMPLETED"]),
                    lambda d: d["checkouts"]["totalCount"] >= 4,
                )
        assert len(set(seen)) == 3
        assert await admin.code(LIST, status=["COMPLETED"], first=1, after=after) is None


async def test_bad_ids_cursors_and_pages_are_refused_as_input_not_errors(
    http: httpx.AsyncClient, run_worker: WorkerFactory
) -> None:
    admin = Caller(http, token("admin", "ops-1"))
    async with run_worker():
        for bad in ("no-attempt", "", "x" * 300 + "-1", "bad id-1", "cart-\u0661", "cart-\u00b2"):
            response = await admin.post(RETRY, id=bad, reason="r")
            assert response.status_code == 200
            assert response.json()["errors"][0]["extensions"]["code"] == "INVALID_INPUT", bad
        assert await admin.code(RESOLVE, id="never-existed-1", reason="r") == "NOT_FOUND"
        assert await admin.code(LIST, first=101) == "INVALID_INPUT"
        assert await admin.code(LIST, after="not a cursor") == "INVALID_INPUT"
        # A cursor of another list is not this one's: its token was taken as this list's.
        others = VisibilityCursor(b"a token", 10, 0, "", "bulkCommands").encode()
        assert await admin.code(LIST, after=others) == "INVALID_INPUT"
        assert await admin.code(RETRY, id="cart-1", reason="r" * 501) == "INVALID_INPUT"
