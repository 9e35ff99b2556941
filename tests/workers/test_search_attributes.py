"""A worker checks, before it polls, that its namespace has the search attributes Tenure's
workflows set: without them a checkout would fail its workflow task at its first status,
for ever."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client

from workers.search_attributes import (
    MissingSearchAttributes,
    check_search_attributes,
    required_attributes,
)
from workers.settings import Settings
from workers.worker import run_worker


async def bare_namespace(client: Client) -> str:
    """A namespace of the test's own, made without Tenure's search attributes."""
    name = f"bare-{uuid.uuid4().hex[:8]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=name,
            workflow_execution_retention_period=Duration(
                seconds=int(timedelta(days=1).total_seconds())
            ),
        )
    )
    return name


async def test_the_embedded_server_has_every_attribute(temporal_client: Client) -> None:
    assert required_attributes() == {"TenureCheckoutStatus": "Keyword"}
    await check_search_attributes(temporal_client, temporal_client.namespace)


async def test_a_worker_refuses_a_namespace_without_them_naming_the_fix(
    temporal_client: Client, settings: Settings
) -> None:
    namespace = await bare_namespace(temporal_client)
    with pytest.raises(MissingSearchAttributes) as refused:
        await check_search_attributes(temporal_client, namespace)
    message = str(refused.value)
    assert "TenureCheckoutStatus" in message
    assert (
        f"temporal operator search-attribute create --namespace {namespace} "
        "--name TenureCheckoutStatus --type Keyword"
    ) in message
    # The worker itself stops before polling, instead of serving checkouts that would stick.
    bare = settings.model_copy(update={"temporal_namespace": namespace})
    with pytest.raises(MissingSearchAttributes):
        await asyncio.wait_for(run_worker(bare), timeout=30)
