"""The admin console as an operator meets it in Chromium: sign in with an admin token, filter
the accounts, open one, see its balance change when another client deposits, suspend it and
find the suspension in its history under the admin's name; a customer's token is refused; a
bulk deposit followed to its end, and one listed with its progress bar; a FAILED checkout
found and resolved with a reason."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from temporalio.client import Client

from entities.checkout_input import checkout_workflow_id
from tests.api.test_access import SECRET, token
from tests.api.test_bulk_api import paused_bulk
from tests.browser.conftest import ADMIN, Api, app_served
from tests.conftest import WorkerFactory, new_id
from tests.entities.failing_checkout import failed_checkout
from tests.entities.shop import Shop, shop_settings
from workers.cache import SnapshotCache
from workers.settings import Settings

try:
    from playwright.async_api import Dialog, Locator, Page, Route, expect

    # A page refreshes its detail every second; a slow shared machine gets room to spare.
    expect.set_options(timeout=20_000)
except ImportError:  # conftest's `chromium` skips every test here, or fails it in CI
    pass

OPEN = """mutation($id: ID!, $owner: String!) { openAccount(id: $id, ownerName: $owner,
  email: "ops@example.com", wait: true) { commandId } }"""
VERIFY = "mutation($id: ID!) { verifyAccount(id: $id, wait: true) { commandId } }"
DEPOSIT = """mutation($id: ID!, $amount: Long!) { depositToAccount(id: $id, amount: $amount,
  wait: true) { account { balance } } }"""
LISTED = """query($text: String!) { accounts(filter: {text: $text}) {
  edges { node { id revision } } } }"""
STATUS = "query($id: ID!) { account(id: $id, consistency: LIVE) { status } }"
RESTOCK = """mutation($sku: String!, $quantity: Long!) { restock(sku: $sku, quantity: $quantity,
  name: "Teapot", wait: true) { commandId } }"""
ITEM = "query($sku: String!) { inventoryItem(sku: $sku, consistency: LIVE) { revision } }"
CREATE_CART = """mutation($id: ID!, $account: ID!) { createCart(id: $id, accountId: $account,
  wait: true) { commandId } }"""
ADD = """mutation($id: ID!, $sku: String!) { addCartItem(cartId: $id, sku: $sku, quantity: 2,
  unitPrice: 1500, wait: true) { commandId } }"""
CHECKOUT = "mutation($id: ID!) { checkoutCart(cartId: $id) { checkoutId } }"
SAGA = "query($id: ID!) { checkout(id: $id) { status } }"
NEEDING_OPERATOR = """{ checkouts(filter: {status: [FAILED]}, first: 100) {
  edges { node { id } } } }"""
BULK_DEPOSIT = """mutation($key: String!, $ids: [ID!]) { startBulkCommand(entityType: "account",
  command: "deposit", payload: {amount: 25}, ids: $ids, idempotencyKey: $key) { id } }"""

RESUME_BULK = "mutation($id: ID!) { resumeBulkCommand(id: $id) { status } }"


async def sign_in(page: Page, served: str, bearer: str) -> None:
    await page.goto(f"{served}/admin/")
    await page.locator("#token").fill(bearer)
    await page.get_by_role("button", name="Sign in").click()


async def open_listed(page: Page, pane: str, field: str, value: str, key: str) -> None:
    """In the console's list `pane`, filter by one field and open the entity `key`."""
    listed = page.locator(f'[data-pane="{pane}"]')
    await listed.locator(f'input[name="{field}"]').fill(value)
    await listed.get_by_role("button", name="Apply").click()
    await listed.locator(f'tr[data-key="{key}"]').click()


async def test_an_admin_follows_an_account_live_and_suspends_it(
    served: str, api: Api, page: Page
) -> None:
    prefix = f"b{new_id()[:10]}"
    active, pending = f"{prefix}-active", f"{prefix}-pending"
    await api.data(OPEN, id=active, owner="Ada Browser")
    await api.data(VERIFY, id=active)
    await api.data(DEPOSIT, id=active, amount=1000)
    await api.data(OPEN, id=pending, owner="Pat Pending")
    for _ in range(100):  # the index is written with each published snapshot
        listed = await api.data(LISTED, text=prefix)
        if len(listed["accounts"]["edges"]) == 2:
            break
        await asyncio.sleep(0.1)

    await sign_in(page, served, ADMIN)
    await expect(page.locator("#who-name")).to_have_text("admin:ops-alice")

    accounts = page.locator('[data-pane="accounts"]')
    await accounts.locator('input[name="text"]').fill(prefix)
    await accounts.get_by_role("button", name="Apply").click()
    await expect(accounts.locator("tbody tr[data-key]")).to_have_count(2)
    # Two entities match, on one page: the count does not read as a count of pages.
    await expect(accounts.locator("[data-position]")).to_have_text("page 1 · 2 matching")
    await accounts.get_by_label("ACTIVE", exact=True).check()
    await accounts.get_by_role("button", name="Apply").click()
    await expect(accounts.locator("tbody tr[data-key]")).to_have_count(1)
    await expect(accounts.locator("[data-stats]")).to_contain_text("ACTIVE")
    row = accounts.locator(f'tr[data-key="{active}"]')
    await expect(row).to_contain_text("Ada Browser")
    await row.click()

    detail = page.locator("#detail")
    balance = detail.locator('[data-field="balance"]')
    await expect(balance).to_have_text("1000")
    # Followed through the subscription (graphql-transport-ws under the page's CSP), not a poll
    await expect(detail).to_have_attribute("data-live", "subscribed")
    await api.data(DEPOSIT, id=active, amount=500)  # another client, not the page
    await expect(balance).to_have_text("1500")

    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await detail.locator('[data-action="suspend"] input[name="reason"]').fill("fraud check")
    await detail.get_by_role("button", name="Suspend").click()
    await expect(detail.locator('[data-field="status"]')).to_have_text("SUSPENDED")
    # The list on screen (ACTIVE accounts) follows, without Apply pressed again.
    await expect(row).to_have_count(0)
    line = detail.locator('tr[data-command="suspend"]')
    await expect(line).to_have_count(1)
    await expect(line.locator("[data-by]")).to_have_text("admin:ops-alice")
    await expect(detail.locator('[data-field="suspensionReason"]')).to_have_text("fraud check")
    assert asked == [f"Suspend account {active}? Money commands will be refused."]
    assert (await api.data(STATUS, id=active))["account"]["status"] == "SUSPENDED"


WITHDRAW = """mutation($id: ID!, $amount: Long!) { withdrawFromAccount(id: $id, amount: $amount,
  wait: true) { commandId } }"""


async def test_a_close_refused_while_money_is_held_closes_once_the_money_is_out(
    served: str, api: Api, page: Page
) -> None:
    """Close refused (the account holds money): the form kept its idempotency key, and the
    entity answers a key it refused with that refusal ever after, so Close stayed refused
    after the money went out, until the page was loaded again. A refusal now drops the key;
    only an answer that may not have come keeps it."""
    account_id = f"c{new_id()[:10]}"
    await api.data(OPEN, id=account_id, owner="Carl Close")
    await api.data(VERIFY, id=account_id)
    await api.data(DEPOSIT, id=account_id, amount=700)
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await sign_in(page, served, ADMIN)
    await open_listed(page, "accounts", "text", account_id, account_id)
    detail = page.locator("#detail")
    await expect(detail.locator('[data-field="balance"]')).to_have_text("700")
    await detail.get_by_role("button", name="Close account").click()
    await expect(page.locator("#notice")).to_contain_text("failed: INVALID_TRANSITION")
    await api.data(WITHDRAW, id=account_id, amount=700)
    await expect(detail.locator('[data-field="balance"]')).to_have_text("0")
    await detail.get_by_role("button", name="Close account").click()
    await expect(detail.locator('[data-field="status"]')).to_have_text("CLOSED")
    assert (await api.data(STATUS, id=account_id))["account"]["status"] == "CLOSED"


async def test_an_operator_reads_a_checkout_saga_and_declines_a_restock(
    served: str, api: Api, page: Page
) -> None:
    account, sku, cart = (f"b{new_id()[:10]}" for _ in range(3))
    await api.data(RESTOCK, sku=sku, quantity=5)
    await api.data(OPEN, id=account, owner="Cy Shopper")
    await api.data(VERIFY, id=account)
    await api.data(DEPOSIT, id=account, amount=1000)  # less than the cart's 3000
    await api.data(CREATE_CART, id=cart, account=account)
    await api.data(ADD, id=cart, sku=sku)
    checkout = (await api.data(CHECKOUT, id=cart))["checkoutCart"]["checkoutId"]
    for _ in range(100):
        # Null until the cart has started its checkout's workflow, just after it answers.
        saga = (await api.data(SAGA, id=checkout))["checkout"]
        if saga is not None and saga["status"] == "COMPENSATED":
            break
        await asyncio.sleep(0.1)

    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Carts").click()
    await open_listed(page, "carts", "accountId", account, cart)
    detail = page.locator("#detail")
    await expect(detail.locator('[data-field="failureCode"]')).to_have_text("INSUFFICIENT_FUNDS")
    await detail.locator('[data-field="checkoutId"]').get_by_role("button").click()
    await expect(detail.locator("[data-title]")).to_have_text(f"Checkout {checkout}")
    await expect(detail.locator('[data-field="status"]')).to_have_text("COMPENSATED")
    steps = detail.locator('[data-saga="steps"] tbody tr')
    await expect(steps.nth(0)).to_contain_text(f"reserve:{sku}")
    await expect(steps.nth(1)).to_contain_text("withdraw")
    await expect(steps.nth(1)).to_contain_text("FAILED INSUFFICIENT_FUNDS")
    released = detail.locator('[data-saga="compensations"] tbody tr', has_text=f"release:{sku}")
    await expect(released).to_contain_text("DONE")
    await expect(released).to_contain_text("withdraw: the balance is less than the 3000 asked for")

    await page.get_by_role("button", name="Inventory").click()
    items = page.locator('[data-pane="inventory"]')
    # Counted in words, not by the GraphQL field's name.
    await expect(items.locator("[data-stats]")).to_contain_text("All inventory items:")
    await open_listed(page, "inventory", "text", sku, sku)
    await expect(detail.locator('[data-field="available"]')).to_have_text("5")
    revision = (await api.data(ITEM, sku=sku))["inventoryItem"]["revision"]

    async def decline(dialog: Dialog) -> None:
        await dialog.dismiss()

    page.once("dialog", decline)
    await detail.locator('[data-action="restock"] input[name="quantity"]').fill("7")
    await detail.get_by_role("button", name="Restock").click()
    await page.wait_for_timeout(1500)  # longer than a refresh: had it been sent, it would show
    await expect(detail.locator('[data-field="onHand"]')).to_have_text("5")
    assert (await api.data(ITEM, sku=sku))["inventoryItem"]["revision"] == revision


async def test_a_customer_token_is_refused_at_sign_in(served: str, page: Page) -> None:
    await sign_in(page, served, token("customer", "cust-bob", accounts=["bob"]))
    refusal = page.locator("#sign-in-error")
    await expect(refusal).to_contain_text("Refused")
    await expect(refusal).to_contain_text("A customer token cannot sign in here")
    await expect(page.locator("#workspace")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('tenure.admin.token')") is None


async def bulk_deposit_started(api: Api) -> str:
    """A bulk deposit to three accounts opened for it; its id."""
    ids = [f"b{new_id()[:10]}" for _ in range(3)]
    for account in ids:
        await api.data(OPEN, id=account, owner="Bea Bulk")
        await api.data(VERIFY, id=account)
    bulk = new_id()
    await api.data(BULK_DEPOSIT, key=bulk, ids=ids)
    return bulk


async def follow_bulk(page: Page, served: str, bulk: str) -> Locator:
    """Signed in as the admin, the bulk command `bulk` followed in its tab: its pane."""
    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Bulk commands").click()
    pane = page.locator('[data-pane="bulk"]')
    await pane.locator('input[name="id"]').fill(bulk)
    await pane.get_by_role("button", name="Follow").click()
    return pane.locator("#bulk")


async def test_an_operator_follows_a_bulk_deposit_to_its_end(
    served: str, api: Api, page: Page
) -> None:
    bulk = await bulk_deposit_started(api)

    followed = await follow_bulk(page, served, bulk)
    await expect(followed.locator('[data-field="status"]')).to_have_text("COMPLETED")
    await expect(followed.locator('[data-field="applied"]')).to_have_text("3")
    await expect(followed.locator("[data-count]")).to_have_text("3/3 done, 3/3 sent")
    await expect(followed.locator('[data-field="delivered"]')).to_have_text("3")
    await expect(followed.locator('[data-field="startedBy"]')).to_contain_text("admin:")
    progress = followed.locator("progress")
    await expect(progress).to_have_attribute("max", "3")
    await expect(progress).to_have_attribute("value", "3")
    await expect(followed.get_by_role("button", name="Pause")).to_be_disabled()
    await expect(followed.get_by_role("button", name="Cancel")).to_be_disabled()


async def test_a_bulk_command_started_elsewhere_shows_in_the_list_with_its_progress(
    served: str, api: Api, page: Page
) -> None:
    ids = [f"b{new_id()[:10]}" for _ in range(3)]
    for account in ids:
        await api.data(OPEN, id=account, owner="Lee List")
        await api.data(VERIFY, id=account)

    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Bulk commands").click()
    listed = page.locator("[data-bulk-list]")
    await expect(listed.locator("tbody tr").first).to_be_visible()  # the list has been read
    bulk = new_id()
    await api.data(BULK_DEPOSIT, key=bulk, ids=ids)  # by another client, after the page opened

    row = listed.locator(f'tr[data-key="{bulk}"]')  # once visibility lists it, read again
    await expect(row.locator('[data-column="status"]')).to_have_text("COMPLETED")
    await expect(row.locator('[data-column="command"]')).to_have_text("account: deposit")
    await expect(row.locator('[data-column="applied"]')).to_have_text("3")
    await expect(row.locator("[data-count]")).to_have_text("3/3")
    # A count of bulk commands, not of pages ("page 1 of 57" read as pages).
    await expect(listed.locator("[data-position]")).to_have_text(
        re.compile(r"^page 1 · \d+ bulk commands$")
    )
    progress = row.locator("progress")
    await expect(progress).to_have_attribute("max", "3")
    await expect(progress).to_have_attribute("value", "3")

    # A keyboard user on the row's Open button stays there when the list is read again
    # (every few seconds): the focus fell back to the page's start at each read.
    await row.get_by_role("button", name="Open").focus()
    await row.evaluate("row => { row.dataset.before = 'read again' }")
    await expect(row).not_to_have_attribute("data-before", "read again")  # a new row
    focused = await page.evaluate(
        "(() => { const e = document.activeElement;"
        " return [e.tagName, e.closest('tr') && e.closest('tr').dataset.key] })()"
    )
    assert focused == ["BUTTON", bulk]

    await row.get_by_role("button", name="Open").click()
    followed = page.locator("#bulk")
    await expect(followed.locator("[data-title]")).to_have_text(f"Bulk command {bulk}")
    await expect(followed.locator('[data-field="status"]')).to_have_text("COMPLETED")
    await expect(followed.locator("[data-count]")).to_have_text("3/3 done, 3/3 sent")
    await expect(followed.locator('[data-field="delivered"]')).to_have_text("3")

    await listed.get_by_label("PAUSED", exact=True).check()
    await listed.get_by_role("button", name="Apply").click()
    await expect(row).to_have_count(0)  # COMPLETED: left out when only PAUSED is asked


async def test_a_followed_paused_bulk_command_resumed_elsewhere_is_shown_as_it_ends(
    served: str, api: Api, page: Page, temporal_client: Client, secured: Settings
) -> None:
    """The detail was read only while RUNNING: one resumed by another operator showed PAUSED
    with Resume offered after it had completed, and Resume was then refused."""
    account = f"p{new_id()[:10]}"
    await api.data(OPEN, id=account, owner="Pat Paused")
    key = new_id()
    await paused_bulk(temporal_client, secured.bulk_task_queue, key, [account])

    followed = await follow_bulk(page, served, key)
    await expect(followed.locator('[data-field="status"]')).to_have_text("PAUSED")
    await expect(followed.get_by_role("button", name="Resume")).to_be_enabled()
    await api.data(RESUME_BULK, id=key)  # another operator, or a script
    await expect(followed.locator('[data-field="status"]')).to_have_text("COMPLETED")
    await expect(followed.get_by_role("button", name="Resume")).to_be_disabled()


async def test_a_bulk_action_is_sent_once_however_often_its_button_is_pressed(
    served: str, api: Api, page: Page, temporal_client: Client, secured: Settings
) -> None:
    """Pause, Resume and Cancel stayed offered while their request was under way: a second
    press sent it again, and its refusal took the place of the first one's "sent"."""
    account = f"r{new_id()[:10]}"
    await api.data(OPEN, id=account, owner="Rae Resume")
    key = new_id()
    await paused_bulk(temporal_client, secured.bulk_task_queue, key, [account])
    sent: list[str] = []

    async def slow_resume(route: Route) -> None:
        if "resumeBulkCommand" in (route.request.post_data or ""):
            sent.append(key)
            await asyncio.sleep(1.0)  # long enough to press again
        await route.continue_()

    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.route("**/graphql", slow_resume)
    followed = await follow_bulk(page, served, key)
    resume = followed.get_by_role("button", name="Resume")
    await expect(resume).to_be_enabled()
    await resume.click()
    for _ in range(100):  # its request reached the API, where it is held a second
        if sent:
            break
        await asyncio.sleep(0.02)
    assert await resume.is_disabled()  # while its request is under way
    await resume.click(force=True)  # pressed again while it is
    await expect(page.locator("#notice")).to_contain_text("resume sent")
    await expect(followed.locator('[data-field="status"]')).to_have_text("COMPLETED")
    assert sent == [key]


def secured_shop(settings: Settings, **checkout: object) -> Settings:
    """The secured API's settings, with checkouts that retry quickly (and `checkout`)."""
    update = {"environment": "production", "auth_secret": SECRET}
    return shop_settings(settings.model_copy(update=update), checkout=checkout)


class TestAFailedCheckout:
    """A checkout driven to FAILED (its refund refused), with checkouts that retry quickly."""

    @pytest.fixture
    def secured(self, settings: Settings) -> Settings:
        return secured_shop(settings)

    async def test_an_operator_finds_it_and_resolves_it_with_a_reason(
        self,
        served: str,
        api: Api,
        page: Page,
        secured: Settings,
        temporal_client: Client,
        cache: SnapshotCache,
        run_worker: WorkerFactory,
    ) -> None:
        # Its entities on a task queue of their own: the helper runs and stops their workers.
        shop = Shop(temporal_client, cache, secured).elsewhere()
        async with failed_checkout(shop, run_worker) as failed:
            checkout = failed.checkout_id
            for _ in range(100):  # listed once visibility shows it FAILED
                page_ = (await api.data(NEEDING_OPERATOR))["checkouts"]
                if any(e["node"]["id"] == checkout for e in page_["edges"]):
                    break
                await asyncio.sleep(0.1)

            await sign_in(page, served, ADMIN)
            await page.get_by_role("button", name="Needing an operator").click()
            pane = page.locator('[data-pane="operator"]')
            row = pane.locator(f'tr[data-key="{checkout}"]')
            await expect(row).to_contain_text("UNAVAILABLE")
            await expect(row.locator('[data-column="refused"]')).to_contain_text(
                "refund: LIMIT_REACHED"
            )
            await row.click()
            detail = page.locator("#detail")
            await expect(detail.locator('[data-field="status"]')).to_have_text("FAILED")
            await expect(detail.locator('[data-saga="compensations"]')).to_contain_text(
                "LIMIT_REACHED"
            )

            asked: list[str] = []

            async def accept(dialog: Dialog) -> None:
                asked.append(dialog.message)
                await dialog.accept()

            page.once("dialog", accept)
            resolve = detail.locator('[data-action="resolve"]')
            await resolve.locator('input[name="reason"]').fill("refunded by bank transfer")
            await resolve.get_by_role("button", name="Resolve by hand").click()
            await expect(detail.locator('[data-field="status"]')).to_have_text("RESOLVED")
            done = detail.locator("[data-operator-actions] tbody tr")
            await expect(done).to_have_count(1)
            await expect(done).to_contain_text("RESOLVE")
            await expect(done).to_contain_text("admin:ops-alice")
            await expect(done).to_contain_text("refunded by bank transfer")
            assert asked == [
                f"Mark checkout {checkout} as settled by hand (refunded by bank transfer)? "
                "Nothing more will run for it."
            ]


class TestAFailedCheckoutPastItsWait:
    """A FAILED checkout whose wait for an operator has run out (2 s here) is listed still,
    and takes no action any more: Retry and Resolve were offered, and always refused "has
    ended"."""

    @pytest.fixture
    def secured(self, settings: Settings) -> Settings:
        return secured_shop(settings, operator_wait_seconds=2.0)

    async def test_it_is_listed_as_settled_by_hand_with_no_actions_offered(
        self,
        served: str,
        api: Api,
        page: Page,
        secured: Settings,
        temporal_client: Client,
        cache: SnapshotCache,
        run_worker: WorkerFactory,
    ) -> None:
        shop = Shop(temporal_client, cache, secured).elsewhere()
        async with failed_checkout(shop, run_worker) as failed:
            checkout = failed.checkout_id
            handle = temporal_client.get_workflow_handle(checkout_workflow_id(checkout))
            await asyncio.wait_for(handle.result(), 30)  # its wait is over: it has ended

            await sign_in(page, served, ADMIN)
            await page.get_by_role("button", name="Needing an operator").click()
            row = page.locator(f'[data-pane="operator"] tr[data-key="{checkout}"]')
            waits = row.locator('[data-column="awaitingOperatorUntil"]')
            await expect(waits).to_have_text("wait over: settle by hand")
            await row.click()
            detail = page.locator("#detail")
            await expect(detail.locator('[data-field="status"]')).to_have_text("FAILED")
            await expect(detail.locator('[data-actions="checkout"]')).to_be_hidden()


async def test_while_its_worker_is_down_an_account_is_shown_and_its_history_says_why(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory, page: Page
) -> None:
    """An on-call engineer opens an account during a worker outage: its fields come from the
    cache, and only its history, which only the entity can tell, says it is not available
    (the whole detail was an error before)."""
    quick = secured.model_copy(update={"live_read_timeout": 1.0})
    prefix = f"d{new_id()[:10]}"
    account = f"{prefix}-down"
    headers = {"authorization": f"Bearer {ADMIN}"}
    async with (
        app_served(quick, temporal_client) as url,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http,
    ):
        api = Api(http)
        async with run_worker(quick):
            await api.data(OPEN, id=account, owner="Ada Outage")
            await api.data(VERIFY, id=account)
            await api.data(DEPOSIT, id=account, amount=700)
            for _ in range(100):  # listed once its last snapshot is published
                listed = await api.data(LISTED, text=prefix)
                if [e["node"]["revision"] for e in listed["accounts"]["edges"]] == [3]:
                    break
                await asyncio.sleep(0.1)
        # No worker runs from here on.
        await sign_in(page, url, ADMIN)
        await open_listed(page, "accounts", "text", prefix, account)
        detail = page.locator("#detail")
        await expect(detail.locator('[data-field="balance"]')).to_have_text("700")
        await expect(detail.locator("[data-history-error]")).to_contain_text(
            "History not available: UNAVAILABLE"
        )
        assert await detail.locator("[data-error]").is_hidden()


ON_HAND = "query($sku: String!) { inventoryItem(sku: $sku, consistency: LIVE) { onHand } }"


async def test_a_restock_a_proxy_answered_502_for_is_applied_once_when_sent_again(
    served: str, api: Api, page: Page
) -> None:
    """The API took the restock and nginx answered 502 (the API went away before its
    answer): an answer that is no GraphQL dropped the form's key, and the operator's second
    press restocked again. The key is kept for it: 10 units, not 20. Once an action has
    succeeded, the same form sent again is a new command."""
    sku = f"p{new_id()[:10]}"
    await api.data(RESTOCK, sku=sku, quantity=5)
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    gone = [True]

    async def bad_gateway_once(route: Route) -> None:
        if gone and "restock(" in (route.request.post_data or ""):
            gone.clear()
            await route.fetch()  # the API takes it
            await route.fulfill(status=502, content_type="text/html", body="<h1>502</h1>")
            return
        await route.continue_()

    await sign_in(page, served, ADMIN)
    await page.route("**/graphql", bad_gateway_once)
    await page.get_by_role("button", name="Inventory").click()
    await open_listed(page, "inventory", "text", sku, sku)
    detail = page.locator("#detail")
    await expect(detail.locator('[data-field="onHand"]')).to_have_text("5")
    await detail.locator('[data-action="restock"] input[name="quantity"]').fill("10")
    await detail.get_by_role("button", name="Restock").click()
    await expect(page.locator("#notice")).to_contain_text("failed: HTTP_502")
    await detail.get_by_role("button", name="Restock").click()  # the operator presses again
    await expect(page.locator("#notice")).to_contain_text(f"{sku} restocked")
    assert (await api.data(ON_HAND, sku=sku))["inventoryItem"]["onHand"] == 15
    await detail.locator('[data-action="restock"] input[name="quantity"]').fill("10")
    await detail.get_by_role("button", name="Restock").click()  # a new restock
    await expect(detail.locator('[data-field="onHand"]')).to_have_text("25")
