"""Fixtures the API tests share: the API as production serves it, where every GraphQL
request needs a token signed with `SECRET` (tests/api/test_access.py mints them)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from temporalio.client import Client

from tests.api.test_access import SECRET
from tests.conftest import WorkerFactory, api_client
from workers.settings import Settings


@pytest.fixture
def secured(settings: Settings) -> Settings:
    """This test's settings in production, verifying tokens; a module that needs more
    overrides it with its own `secured`."""
    return settings.model_copy(update={"environment": "production", "auth_secret": SECRET})


@pytest.fixture
async def secured_http(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API on `secured`, with a worker on the same settings."""
    async with run_worker(secured), api_client(secured, temporal_client) as client:
        yield client
