"""The admin console keeps up after a refusal it can outlive: a detail whose subscription the
server refuses (its subscribers full, or shutting down for a deploy) reads every second
instead, and a followed bulk command is read again after one failed read."""

from __future__ import annotations

import json

import pytest

from tests.api.test_access import SECRET
from tests.browser.conftest import ADMIN, Api
from tests.browser.test_admin_console import (
    BULK_DEPOSIT,
    DEPOSIT,
    OPEN,
    VERIFY,
    open_listed,
    sign_in,
)
from tests.conftest import new_id
from workers.settings import Settings

try:
    from playwright.async_api import Browser, Page, Route, expect

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


async def test_a_followed_bulk_command_is_read_again_after_one_failed_read(
    served: str, api: Api, page: Page
) -> None:
    ids = [f"b{new_id()[:10]}" for _ in range(3)]
    for account in ids:
        await api.data(OPEN, id=account, owner="Bea Bulk")
        await api.data(VERIFY, id=account)
    bulk = new_id()
    await api.data(BULK_DEPOSIT, key=bulk, ids=ids)
    reads = 0

    async def blip(route: Route) -> None:
        nonlocal reads
        if "bulk: bulkCommand" not in (route.request.post_data or ""):
            await route.continue_()
            return
        reads += 1
        if reads == 1:
            # The first read as it was a moment earlier, while the command ran.
            response = await route.fetch()
            data = await response.json()
            data["data"]["bulk"].update(status="RUNNING", done=1, applied=1, endedAt=None)
            await route.fulfill(response=response, body=json.dumps(data))
        elif reads == 2:
            await route.abort("connectionreset")  # one network blip
        else:
            await route.continue_()

    await page.route("**/graphql", blip)
    await sign_in(page, served, ADMIN)
    await page.get_by_role("button", name="Bulk commands").click()
    pane = page.locator('[data-pane="bulk"]')
    await pane.locator('input[name="id"]').fill(bulk)
    await pane.get_by_role("button", name="Follow").click()
    status = pane.locator("#bulk").locator('[data-field="status"]')
    await expect(status).to_have_text("RUNNING")
    await expect(status).to_have_text("COMPLETED")
    assert reads >= 3
