"""1,000 subscribers of one hot account, each over its own graphql-transport-ws connection
from this process to the API process: the latency from a deposit being applied (the `at`
the entity gives it, on the same machine's clock) to each subscriber seeing it.

Deposits are sent one after another, each waited for, so that what is measured is the
fan-out, not a queue of commands; a subscriber that falls behind gets the newest state
(coalesced), so some deposits are seen by fewer than all subscribers, and the figure is
over every change seen.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

from websockets.asyncio.client import ClientConnection, connect

from bench.graphql import DEPOSIT_WAIT, VERIFY
from bench.load import Measured
from bench.scenarios import Bench, Result

SUBSCRIBERS = {"small": 1_000, "default": 1_000}
DEPOSITS = {"small": 50, "default": 200}
FOLLOW = """subscription($id: ID!) {
  accountChanged(id: $id) { revision at missedRevisions node { balance } } }"""


async def _subscriber(
    url: str,
    account_id: str,
    last: int,
    seen: list[float],
    ready: asyncio.Event,
    subscribed: list[int],
) -> int:
    """Follow the account until revision `last`, adding each change's latency (seconds) to
    `seen`; `subscribed` is [so far, all], and `ready` is set once all have their first."""
    async with connect(url, subprotocols=["graphql-transport-ws"], open_timeout=60) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        await _expect(ws, "connection_ack")
        payload = {"query": FOLLOW, "variables": {"id": account_id}}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        first = True
        revision = 0
        while revision < last:
            message = json.loads(await ws.recv())
            if message["type"] != "next":
                raise RuntimeError(f"subscription answered {message}")
            change = message["payload"]["data"]["accountChanged"]
            revision = change["revision"]
            if first:
                first = False
                subscribed[0] += 1
                if subscribed[0] >= subscribed[1]:
                    ready.set()
                continue
            if change["at"]:
                seen.append(time.time() - datetime.fromisoformat(change["at"]).timestamp())
        return revision


async def _expect(ws: ClientConnection, kind: str) -> None:
    message = json.loads(await ws.recv())
    if message["type"] != kind:
        raise RuntimeError(f"expected {kind}, got {message}")


async def subscriptions(bench: Bench) -> Result:
    count = SUBSCRIBERS.get(bench.scale.name, SUBSCRIBERS["default"])
    deposits = DEPOSITS.get(bench.scale.name, DEPOSITS["default"])
    settings = bench.stack.settings
    url = f"ws://{settings.api_host}:{settings.api_port}/graphql"
    account_id = f"{bench.tag}-followed"
    await bench.gql.open_account(account_id, wait=True)
    await bench.gql.command(VERIFY, id=account_id, key=f"verify-{account_id}", wait=True)
    last = 2 + deposits
    latencies: list[float] = []
    ready = asyncio.Event()
    subscribed = [0, count]
    started = time.perf_counter()
    followers = [
        asyncio.create_task(_subscriber(url, account_id, last, latencies, ready, subscribed))
        for _ in range(count)
    ]
    await asyncio.wait_for(ready.wait(), timeout=300)
    connect_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(deposits):
        await bench.gql.command(DEPOSIT_WAIT, id=account_id, amount=1, key=f"{account_id}-d{i}")
    finals = await asyncio.wait_for(asyncio.gather(*followers, return_exceptions=True), 300)
    elapsed = time.perf_counter() - started
    failed = [f for f in finals if not isinstance(f, int)]
    behind = [f for f in finals if isinstance(f, int) and f < last]
    problems = []
    if failed:
        problems.append(f"{len(failed)} subscribers failed: {failed[0]!r}")
    if behind:
        problems.append(f"{len(behind)} subscribers did not reach revision {last}")
    measured = Measured(ops=len(latencies), elapsed=elapsed, latencies=latencies)
    return Result(
        "subscriptions",
        f"{count:,} subscribers of one account, {deposits} deposits",
        "changes seen",
        measured,
        problems=problems,
        details={
            "subscribers": count,
            "deposits": deposits,
            "changes_seen_per_subscriber": round(len(latencies) / count, 1),
            "connect_s": round(connect_s, 1),
            "transport": "graphql-transport-ws, one connection per subscriber",
        },
    )
