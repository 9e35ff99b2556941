"""The admin console keeps up after a refusal it can outlive: a detail whose subscription the
server refuses (its subscribers full, or shutting down for a deploy) reads every second
instead, a followed bulk command is read again after one failed read, and a list's pager
moves only once a page has come, paging the list shown rather than the form being edited.
A read that is never answered fails after 30 s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from tests.api.test_access import SECRET
from tests.browser.conftest import ADMIN, Api
from tests.browser.test_admin_console import (
    DEPOSIT,
    OPEN,
    VERIFY,
    bulk_deposit_started,
    open_listed,
    sign_in,
)
from tests.conftest import new_id
from workers.settings import Settings

try:
    from playwright.async_api import Browser, Locator, Page, Route, expect

    expect.set_options(timeout=20_000)
except ImportError:  # conftest's `chromium` skips every test here, or fails it in CI
    pass


class TestARefusedSubscription:
    """One subscriber on the server: a second console watching an entity is refused its
    subscription (LIMIT_REACHED, try again later)."""

    @pytest.fixture
    def secured(self, settings: Settings) -> Settings:
        return settings.model_copy(
            update={"environment": "production", "auth_secret": SECRET, "max_subscribers": 1}
        )

    async def test_the_detail_reads_every_second_instead(
        self, served: str, api: Api, page: Page, browser: Browser
    ) -> None:
        prefix = f"s{new_id()[:10]}"
        first, second = f"{prefix}-one", f"{prefix}-two"
        for account in (first, second):
            await api.data(OPEN, id=account, owner="Sue Scriber")
            await api.data(VERIFY, id=account)
            await api.data(DEPOSIT, id=account, amount=100)
        # Another operator's console holds the server's one subscription.
        context = await browser.new_context()
        try:
            other = await context.new_page()
            await sign_in(other, served, ADMIN)
            await open_listed(other, "accounts", "text", first, first)
            await expect(other.locator("#detail")).to_have_attribute("data-live", "subscribed")

            await sign_in(page, served, ADMIN)
            await open_listed(page, "accounts", "text", second, second)
            detail = page.locator("#detail")
            balance = detail.locator('[data-field="balance"]')
            await expect(balance).to_have_text("100")
            await expect(detail.locator("[data-error]")).to_contain_text("LIMIT_REACHED")
            await expect(detail).to_have_attribute("data-live", "polling")
            await api.data(DEPOSIT, id=second, amount=50)  # another client, not the page
            await expect(balance).to_have_text("150")
        finally:
            await context.close()


class BulkReads:
    """A page's reads of a followed bulk command: the first as it was a moment earlier,
    while the command ran; the second as `second` routes it; the rest as they come."""

    def __init__(self, second: Callable[[Route], Awaitable[None]]) -> None:
        self.count = 0
        self._second = second

    async def __call__(self, route: Route) -> None:
        if "bulk: bulkCommand" not in (route.request.post_data or ""):
            await route.continue_()
            return
        self.count += 1
        if self.count == 1:
            response = await route.fetch()
            data = await response.json()
            data["data"]["bulk"].update(status="RUNNING", done=1, applied=1, endedAt=None)
            await route.fulfill(response=response, body=json.dumps(data))
        elif self.count == 2:
            await self._second(route)
        else:
            await route.continue_()


async def followed_bulk(page: Page, served: str, bulk: str) -> Locator:
    """The bulk command followed in the console, once it shows RUNNING: its status."""
    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Bulk commands").click()
    pane = page.locator('[data-pane="bulk"]')
    await pane.locator('input[name="id"]').fill(bulk)
    await pane.get_by_role("button", name="Follow").click()
    status = pane.locator("#bulk").locator('[data-field="status"]')
    await expect(status).to_have_text("RUNNING")
    return status


async def test_a_followed_bulk_command_is_read_again_after_one_failed_read(
    served: str, api: Api, page: Page
) -> None:
    bulk = await bulk_deposit_started(api)

    async def blip(route: Route) -> None:
        await route.abort("connectionreset")  # one network blip

    reads = BulkReads(blip)
    await page.route("**/graphql", reads)
    status = await followed_bulk(page, served, bulk)
    await expect(status).to_have_text("COMPLETED")
    assert reads.count >= 3


async def test_a_read_that_is_never_answered_fails_in_30_s_and_is_read_again(
    served: str, api: Api, page: Page
) -> None:
    """A followed bulk command whose read the network holds with no answer (a proxy that
    lost it): the console waited for it for good, showing RUNNING long after the command
    ended. The read now fails UNAVAILABLE after 30 s (the page's clock moved on) and the
    console reads again."""
    bulk = await bulk_deposit_started(api)
    held = asyncio.Event()

    async def hold(route: Route) -> None:
        held.set()  # and never answered

    reads = BulkReads(hold)
    await page.clock.install()
    await page.route("**/graphql", reads)
    status = await followed_bulk(page, served, bulk)
    await asyncio.wait_for(held.wait(), 20)
    await page.clock.fast_forward(31_000)
    await expect(page.locator("#notice")).to_contain_text("did not answer within 30 s")
    await expect(status).to_have_text("COMPLETED")
    assert reads.count >= 3


RESTOCK = """mutation($sku: String!) { restock(sku: $sku, quantity: 3, name: "Pager",
  wait: true) { commandId } }"""
LISTED = """query($text: String!) { inventoryItems(filter: {text: $text}, first: 100) {
  totalCount } }"""


async def stocked(api: Api, prefix: str, count: int) -> None:
    """`count` items whose SKUs begin with `prefix`, once the list shows them all."""
    for n in range(count):
        await api.data(RESTOCK, sku=f"{prefix}{n:02d}")
    for _ in range(100):
        if (await api.data(LISTED, text=prefix))["inventoryItems"]["totalCount"] == count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} items not listed")


async def test_a_page_that_did_not_come_leaves_the_pager_where_it_was(
    served: str, api: Api, page: Page
) -> None:
    """A Next that failed once moved the pager anyway: the next page came labelled page 3,
    one Previous showed it again, and the error stayed over the fresh page."""
    prefix = f"p{new_id()[:8]}"
    await stocked(api, prefix, 21)
    failed = 0

    async def blip(route: Route) -> None:
        nonlocal failed
        body = route.request.post_data or ""
        if "inventoryItems(" in body and '"after":"' in body and not failed:
            failed += 1
            await route.abort("connectionreset")  # one network blip
        else:
            await route.continue_()

    await page.route("**/graphql", blip)
    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Inventory").click()
    pane = page.locator('[data-pane="inventory"]')
    rows = pane.locator("tbody tr[data-key]")
    position = pane.locator("[data-position]")
    await pane.locator('input[name="text"]').fill(prefix)
    await pane.get_by_role("button", name="Apply").click()
    # The filtered page, not the whole inventory's first 20 that opening the pane asked for:
    # Next pages the list on screen, and paged that one when it came first.
    await expect(position).to_have_text("page 1 · 21 matching")
    await expect(rows).to_have_count(20)
    await pane.get_by_role("button", name="Next").click()
    await expect(page.locator("#notice")).to_contain_text("Cannot list")
    await expect(pane.locator("table.list")).to_have_attribute("data-stale", "true")
    await expect(position).to_have_text("page 1 · 21 matching")
    await pane.get_by_role("button", name="Next").click()
    await expect(rows).to_have_count(1)
    await expect(position).to_have_text("page 2 · 21 matching")
    await expect(page.locator("#notice")).to_be_hidden()
    await expect(pane.locator("table.list")).to_have_attribute("data-stale", "false")
    await pane.get_by_role("button", name="Previous").click()
    await expect(rows).to_have_count(20)
    await expect(position).to_have_text("page 1 · 21 matching")


async def test_next_pages_the_list_shown_not_the_form_being_edited(
    served: str, api: Api, page: Page
) -> None:
    """An order chosen and not applied yet was sent with the shown list's cursor: refused
    (not a cursor of this list in this order), and every Next after it too."""
    prefix = f"q{new_id()[:8]}"
    await stocked(api, prefix, 21)
    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Inventory").click()
    pane = page.locator('[data-pane="inventory"]')
    rows = pane.locator("tbody tr[data-key]")
    await pane.locator('input[name="text"]').fill(prefix)
    await pane.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(20)
    await pane.locator('select[name="orderBy"]').select_option("ID")
    await pane.locator('input[name="text"]').fill("something else")
    await pane.get_by_role("button", name="Next").click()
    await expect(rows).to_have_count(1)
    await expect(pane.locator("[data-position]")).to_have_text("page 2 · 21 matching")
    await expect(page.locator("#notice")).to_be_hidden()


async def test_a_subscribed_detail_whose_read_after_a_change_fails_reads_again(
    served: str, api: Api, page: Page
) -> None:
    """An account's detail, subscribed: a change came, and its read failed UNAVAILABLE. The
    detail kept the state from before the change, shown live, until another change came,
    which for a quiet account may be never. It reads again a second later."""
    account = f"q{new_id()[:10]}"
    await api.data(OPEN, id=account, owner="Quinn Quiet")
    await api.data(VERIFY, id=account)
    await api.data(DEPOSIT, id=account, amount=100)
    failing = [False]

    async def fails_once(route: Route) -> None:
        if failing[0] and "entity: account(" in (route.request.post_data or ""):
            failing[0] = False
            error = {"message": "Temporal cannot be reached", "extensions": {"code": "UNAVAILABLE"}}
            await route.fulfill(status=200, json={"data": None, "errors": [error]})
            return
        await route.continue_()

    await page.route("**/graphql", fails_once)
    await sign_in(page, served, ADMIN)
    await open_listed(page, "accounts", "text", account, account)
    detail = page.locator("#detail")
    balance = detail.locator('[data-field="balance"]')
    await expect(balance).to_have_text("100")
    await expect(detail).to_have_attribute("data-live", "subscribed")
    failing[0] = True
    await api.data(DEPOSIT, id=account, amount=50)  # the one change that comes
    await expect(detail.locator("[data-error]")).to_contain_text("UNAVAILABLE")
    await expect(balance).to_have_text("150")
    assert not failing[0]
