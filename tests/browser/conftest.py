"""Browser fixtures: the system Chromium driven by Playwright, the API behind a real uvicorn
on a free port, and a screenshot of the page when a test fails.

Chromium comes from Debian's `chromium` package; no browser is ever downloaded. Without it
(or without the playwright package) the browser tests are skipped with a loud reason; with
TENURE_REQUIRE_BROWSER=1, as CI sets it, they fail instead, so CI never passes without
having run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from temporalio.client import Client

from api.app import create_app
from deploy.embedded import free_port
from tests.api.test_access import SECRET, token
from tests.conftest import WorkerFactory
from workers.settings import Settings

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # said by the `chromium` fixture, as a skip or a failure
    async_playwright = None  # type: ignore[assignment]

# Headless as root needs no sandbox; on a closed network Chromium must not phone home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = Path(__file__).parent / "screenshots"
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium's path, or a skip (a failure under TENURE_REQUIRE_BROWSER=1)."""
    path = os.environ.get("TENURE_CHROMIUM") or shutil.which("chromium")
    missing = []
    if async_playwright is None:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if path is None:
        missing.append("Chromium (apt-get install chromium chromium-driver)")
    if missing:
        reason = "BROWSER TESTS NOT RUN: this machine lacks " + " and ".join(missing)
        if os.environ.get("TENURE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; TENURE_REQUIRE_BROWSER=1 requires them")
        pytest.skip(reason)
    assert path is not None
    return path


@pytest.fixture(autouse=True)
def _needs_chromium(chromium: str) -> None:
    """Every test here, before any server starts for it."""


@pytest.fixture(scope="session")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh browser context's page; on failure, a screenshot and the page's console."""
    context = await browser.new_context()
    opened = await context.new_page()
    said: list[str] = []
    opened.on("console", lambda message: said.append(f"{message.type}: {message.text}"))
    opened.on("pageerror", lambda error: said.append(f"error: {error}"))
    yield opened
    if request.node.stash.get(_FAILED, False):
        SCREENSHOTS.mkdir(exist_ok=True)
        shot = SCREENSHOTS / f"{request.node.name}.png"
        await opened.screenshot(path=shot, full_page=True)
        log = shot.with_suffix(".console.txt")
        log.write_text("\n".join(said) + "\n")
        request.config.get_terminal_writer().line(
            f"\nbrowser test failed: screenshot {shot}, page console {log}", red=True
        )
    await context.close()


@pytest.fixture
def secured(settings: Settings) -> Settings:
    """Production: every request needs a token signed with the tests' secret."""
    return settings.model_copy(update={"environment": "production", "auth_secret": SECRET})


@contextlib.asynccontextmanager
async def app_served(settings: Settings, temporal_client: Client) -> AsyncIterator[str]:
    """The API's base URL: a real uvicorn on a free port, against the session's Temporal and
    Redis, with no worker of its own."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, temporal_client=temporal_client),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def served(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> AsyncIterator[str]:
    """`app_served`, with a worker applying commands."""
    async with run_worker(secured), app_served(secured, temporal_client) as url:
        yield url


ADMIN = token("admin", "ops-alice")


class Api:
    """Another client of the same API: the test's own, over HTTP, as an admin."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def data(self, query: str, **variables: Any) -> dict[str, Any]:
        response = await self.http.post("/graphql", json={"query": query, "variables": variables})
        body = response.json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data


@pytest.fixture
async def api(served: str) -> AsyncIterator[Api]:
    headers = {"authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=served, headers=headers, timeout=30) as http:
        yield Api(http)
