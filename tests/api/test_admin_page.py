"""The admin console's page as the API serves it: a page of its own policy that loads only
its own script and style, with no data and no CDN, whoever asks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from api.admin import ADMIN_POLICY
from api.app import API_POLICY, create_app
from tests.api.test_access import SECRET
from workers.settings import Settings


async def client(settings: Settings) -> httpx.AsyncClient:
    app = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1"}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tenure")


@pytest.fixture
async def production() -> AsyncIterator[httpx.AsyncClient]:
    async with await client(Settings(environment="production", auth_secret=SECRET)) as http:
        yield http


async def test_the_page_has_a_policy_of_its_own(production: httpx.AsyncClient) -> None:
    page = await production.get("/admin/")  # no token: the page holds no data
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == ADMIN_POLICY
    assert "script-src 'self';" in ADMIN_POLICY and "unsafe-inline" not in ADMIN_POLICY
    assert 'data-auth-required="true"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # runs offline
    assert "<script>" not in page.text  # the policy would refuse an inline one


async def test_its_script_and_style_are_served_beside_it(production: httpx.AsyncClient) -> None:
    page = (await production.get("/admin/")).text
    for path, media_type in [("console.js", "text/javascript"), ("console.css", "text/css")]:
        assert f'"static/{path}"' in page
        asset = await production.get(f"/admin/static/{path}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(media_type)
        assert asset.headers["content-security-policy"] == API_POLICY
        # Asked again on each load, as the page is: a deploy's page never runs an old script.
        assert asset.headers["cache-control"] == "no-cache"
        etag = asset.headers["etag"]
        again = await production.get(f"/admin/static/{path}", headers={"if-none-match": etag})
        assert again.status_code == 304
    assert (await production.get("/admin")).headers["location"].endswith("/admin/")


async def test_in_development_without_a_key_source_the_page_says_so() -> None:
    async with await client(Settings(environment="development")) as http:
        page = (await http.get("/admin/")).text
    assert 'data-auth-required="false"' in page
    assert "development admin" in page
