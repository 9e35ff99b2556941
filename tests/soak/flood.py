"""`make flood`: one account flooded with deposits while its worker is killed and kept down.

64 senders deposit 1 to one account through the API's delivery path (`CommandDelivery`:
coalesced signals and the per-entity backpressure; GraphQL itself would cap the rate at
what its CPU allows) for FLOOD_SECONDS (40). A third of the way in the worker is SIGKILLed
and kept down for FLOOD_DOWN_SECONDS (15). Then every deposit Temporal accepted must be
applied exactly once (balance and revision) within FLOOD_SETTLE_SECONDS (120) of the flood,
and no workflow task may have failed for a cause the faults do not explain. Exits 1 if not.

Before the fixes in entities/runtime/backlog.py and workers/backpressure.py the account was
stuck for good (a task that outlasted the SDK's 2 s on every retry) and its run's history
grew without bound while the worker was down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from entities.account import account
from entities.errors import TenureError
from entities.runtime.envelope import CommandEnvelope, Snapshot
from entities.runtime.workflow import EntityWorkflow
from tests.soak.driver import Stack, task_failures
from workers.delivery import CommandDelivery
from workers.settings import Settings

SENDERS = 64
OPENED = 2  # open, verify
# Causes the faults explain: the server asking the worker to look at new signals first; a
# task force-closed because more than 100 signals came while it ran; the killed worker's
# tasks timed out.
EXPLAINED = {
    "WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND",
    "WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND",
    "TIMED_OUT",
}


async def flood(seconds: float, down: float, settle: float) -> list[str]:
    """Run the flood; the problems found."""
    with tempfile.TemporaryDirectory(prefix="tenure-flood-") as tmp:
        stack = Stack(Path(tmp), Settings(task_queue=f"flood-{uuid.uuid4().hex[:6]}"))
        await stack.start()
        try:
            client = await Client.connect(
                stack.settings.temporal_address, data_converter=pydantic_data_converter
            )
            return await _flood(stack, client, seconds, down, settle)
        finally:
            stack.stop()


async def _flood(
    stack: Stack, client: Client, seconds: float, down: float, settle: float
) -> list[str]:
    delivery = CommandDelivery(client, stack.settings)
    account_id = f"flood-{uuid.uuid4().hex[:6]}"
    workflow_id = account.workflow_id(account_id)
    opening = {"owner_name": "Flo", "email": "flo@example.com"}
    await delivery.request(
        account, account_id, CommandEnvelope(command_id="o", name="open", payload=opening)
    )
    await delivery.request(account, account_id, CommandEnvelope(command_id="v", name="verify"))
    accepted = 0
    refused: Counter[str] = Counter()
    started = time.monotonic()
    stop = started + seconds

    async def sender(i: int) -> None:
        nonlocal accepted
        n = 0
        while time.monotonic() < stop:
            n += 1
            deposit = CommandEnvelope(command_id=f"{i}-{n}", name="deposit", payload={"amount": 1})
            try:
                await delivery.deliver(account, account_id, deposit)
            except TenureError as exc:
                refused[exc.code.value] += 1
                await asyncio.sleep(0.2)  # a client retries later (this one with a new key)
            else:
                accepted += 1

    async def fault() -> None:
        await asyncio.sleep(seconds / 3)
        stack.kill_worker()
        print(f"{time.monotonic() - started:5.1f} s: worker killed, {accepted:,} accepted")
        await asyncio.sleep(down)
        stack.start_worker()
        print(
            f"{time.monotonic() - started:5.1f} s: worker started, {accepted:,} accepted, "
            f"{sum(refused.values()):,} refused"
        )

    await asyncio.gather(*(sender(i) for i in range(SENDERS)), fault())
    print(
        f"{time.monotonic() - started:5.1f} s: flood over, {accepted:,} accepted, "
        f"refused {dict(refused)}"
    )
    handle = client.get_workflow_handle(workflow_id)
    snapshot: Snapshot | None = None
    while time.monotonic() < stop + settle:
        try:
            snapshot = await asyncio.wait_for(
                handle.query(EntityWorkflow.snapshot, result_type=Snapshot), 10
            )
        except Exception:  # any failure to read is another try
            snapshot = None
        if snapshot is not None and snapshot.revision >= OPENED + accepted:
            break
        await asyncio.sleep(1)
    problems: list[str] = []
    if snapshot is None or snapshot.state is None:
        problems.append(f"the account could not be read within {settle:g} s of the flood")
    else:
        print(f"{time.monotonic() - stop:5.1f} s after the flood: revision {snapshot.revision:,}")
        if snapshot.revision != OPENED + accepted or snapshot.state["balance"] != accepted:
            problems.append(
                f"revision {snapshot.revision:,} and balance {snapshot.state['balance']:,}, "
                f"expected {OPENED + accepted:,} and {accepted:,}"
            )
    runs, failures = await task_failures(client, workflow_id)
    causes = Counter(cause for cause, _ in failures)
    problems += [
        f"a workflow task failed: {cause}, at {where}"
        for cause, where in failures
        if cause not in EXPLAINED
    ]
    print(f"{runs} runs; workflow tasks failed: {dict(causes) or 'none'}")
    return problems[:10]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    problems = asyncio.run(
        flood(
            float(os.environ.get("FLOOD_SECONDS", "40")),
            float(os.environ.get("FLOOD_DOWN_SECONDS", "15")),
            float(os.environ.get("FLOOD_SETTLE_SECONDS", "120")),
        )
    )
    print("problems: " + ("; ".join(problems) if problems else "none"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
