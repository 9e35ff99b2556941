"""Connecting to Temporal with the payload converter every part of Tenure shares."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from workers.settings import Settings


async def connect_temporal(settings: Settings) -> Client:
    """A Temporal client for `settings`, speaking pydantic payloads."""
    if not settings.temporal_address:
        raise ValueError("TEMPORAL_ADDRESS is not set")
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
