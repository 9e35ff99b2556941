"""Signing in to the admin console with a provider that nests its roles claim (Keycloak's
`realm_access.roles`): the console reads the claim where the API does, so an admin the API
accepts is let in, and a customer is still refused."""

from __future__ import annotations

import contextlib
from typing import Any

import jwt
import pytest

from tests.api.test_access import SECRET, token
from tests.browser.test_admin_console import sign_in
from workers.settings import Settings

# Without playwright, conftest's `chromium` skips every test here, or fails it in CI.
with contextlib.suppress(ImportError):
    from playwright.async_api import Page, expect

NESTED = "realm_access.roles"


@pytest.fixture
def secured(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"environment": "production", "auth_secret": SECRET, "auth_roles_claim": NESTED}
    )


def nested_token(role: str, sub: str) -> str:
    """The tests' token, its roles moved where Keycloak puts them."""
    claims: dict[str, Any] = jwt.decode(
        token(role, sub), SECRET, algorithms=["HS256"], audience="tenure-api"
    )
    claims["realm_access"] = {"roles": claims.pop("roles")}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_an_admin_whose_roles_are_nested_signs_in(served: str, page: Page) -> None:
    await sign_in(page, served, nested_token("admin", "ops-kc"))
    await expect(page.locator("#workspace")).to_be_visible()
    await expect(page.locator("#sign-in-error")).to_be_hidden()


async def test_a_customer_whose_roles_are_nested_is_refused(served: str, page: Page) -> None:
    await sign_in(page, served, nested_token("customer", "cust-kc"))
    await expect(page.locator("#sign-in-error")).to_contain_text("Refused")
    await expect(page.locator("#workspace")).to_be_hidden()
