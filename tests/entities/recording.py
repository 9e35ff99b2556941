"""Recording workflow histories for the replay tests.

`python -m tests.entities.recording` runs every scenario in `SCENARIOS` against a fresh
embedded Temporal and Redis and writes each run's history to `histories/<name>-<n>.json`.
Re-record only when a change to a workflow is meant to be incompatible (and then version
it): the point of the recorded files is that an accidental non-deterministic change fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.gateway import EntityGateway
from deploy.embedded import EmbeddedRedis, EmbeddedTemporal
from entities.errors import TenureError
from entities.runtime.envelope import RuntimeOptions
from workers.cache import SnapshotCache, connect_redis
from workers.settings import Settings
from workers.worker import build_worker

HISTORIES = Path(__file__).parent / "histories"

Scenario = Callable[[EntityGateway, Client], Awaitable[list[str]]]
"""Drives entities through a gateway; returns the workflow ids whose histories to keep."""


async def account_lifecycle(gateway: EntityGateway, client: Client) -> list[str]:
    """Every Account command, a rejection, dormancy and continue-as-new."""
    account_id = f"replay-{uuid.uuid4().hex[:8]}"

    async def send(name: str, **payload: object) -> None:
        with contextlib.suppress(TenureError):  # rejections belong in the history too
            await gateway.send("account", account_id, name, dict(payload), wait=True)

    await send("open", owner_name="Ada", email="ada@example.com", currency="GBP")
    await send("verify", kyc_reference="kyc-1")
    await send("deposit", amount=100)
    await send("withdraw", amount=1000)  # rejected: insufficient funds
    await send("suspend", reason="check")
    await send("reactivate")
    await asyncio.sleep(1.5)  # dormancy_seconds=1: the durable timer fires
    await send("withdraw", amount=100)
    await send("close")
    return [f"account:{account_id}"]


SCENARIOS: dict[str, tuple[Scenario, dict[str, object]]] = {
    "account": (
        account_lifecycle,
        {
            "runtime": RuntimeOptions(max_commands_per_run=4),
            "entity_options": {"account": {"dormancy_seconds": 1}},
        },
    ),
}


async def record(names: list[str] | None = None) -> None:
    HISTORIES.mkdir(exist_ok=True)
    async with EmbeddedTemporal() as temporal, EmbeddedRedis() as redis_server:
        client = await Client.connect(
            temporal.address,  # type: ignore[attr-defined]
            data_converter=pydantic_data_converter,
        )
        for name, (scenario, overrides) in SCENARIOS.items():
            if names and name not in names:
                continue
            settings = Settings(
                temporal_address=temporal.address,  # type: ignore[attr-defined]
                redis_url=redis_server.url,  # type: ignore[attr-defined]
                task_queue=f"record-{name}",
                **overrides,  # type: ignore[arg-type]
            )
            redis_client = connect_redis(settings)
            cache = SnapshotCache(redis_client, settings.redis_prefix)
            async with build_worker(client, settings, cache):
                workflow_ids = await scenario(EntityGateway(client, cache, settings), client)
            await redis_client.aclose()
            for old in HISTORIES.glob(f"{name}-*.json"):
                old.unlink()
            n = 0
            for workflow_id in workflow_ids:
                runs = [r async for r in client.list_workflows(f'WorkflowId = "{workflow_id}"')]
                for run in sorted(runs, key=lambda r: r.start_time):
                    handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
                    history = await handle.fetch_history()
                    n += 1
                    (HISTORIES / f"{name}-{n}.json").write_text(history.to_json())
            print(f"{name}: {n} histories")


if __name__ == "__main__":
    import sys

    asyncio.run(record(sys.argv[1:] or None))
