"""Mixed traffic: 64 clients depositing, half of them with `wait: true`, a fifth of them
sending again a key already sent, to one hot account and to 100 accounts. Every key the API
acknowledged must be applied exactly once, also across continue-as-new."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

from bench.checks import check_accounts, history_lengths
from bench.graphql import DEPOSIT, DEPOSIT_WAIT, GraphQL
from bench.http import HTTPClient
from bench.scaling import history_details
from bench.scenarios import OPENED_REVISION, Bench, Load, Result, until_cached

CLIENTS = 64
SPREAD_ACCOUNTS = 100
REPEATED = 0.2
WAITED = 0.5
MAX_AMOUNT = 100
ACKNOWLEDGED = {"ACCEPTED", "APPLIED"}


@dataclass(frozen=True)
class Deposit:
    """One planned mutation; a repeat carries its original's account, key and amount."""

    account: str
    key: str
    amount: int
    wait: bool
    repeat: bool = False


def plan(accounts: list[str], count: int, prefix: str, recent: int, seed: str) -> list[Deposit]:
    """`count` deposits to `accounts` in turn, each waited for or not at random, a fifth of
    them repeating one of the `recent` keys planned before: a client sending a command again,
    while the original may still be in flight, and while the entity still remembers it."""
    rng = random.Random(seed)
    fresh: list[Deposit] = []
    planned: list[Deposit] = []
    for _ in range(count):
        wait = rng.random() < WAITED
        if fresh and rng.random() < REPEATED:
            original = fresh[rng.randrange(max(0, len(fresh) - recent), len(fresh))]
            planned.append(replace(original, wait=wait, repeat=True))
            continue
        n = len(fresh)
        deposit = Deposit(
            accounts[n % len(accounts)], f"{prefix}-{n}", rng.randint(1, MAX_AMOUNT), wait
        )
        fresh.append(deposit)
        planned.append(deposit)
    return planned


async def mixed(bench: Bench) -> list[Result]:
    """The same mix, first on one hot account, then on 100 accounts, all opened before the
    clock starts; sent through a connection pool of its own, one connection per client."""
    hot = [f"{bench.tag}-xhot"]
    spread = [f"{bench.tag}-x{i}" for i in range(SPREAD_ACCOUNTS)]
    settings, scale = bench.stack.settings, bench.scale
    http = HTTPClient(settings.api_host, settings.api_port, CLIENTS)
    try:
        gql = GraphQL(http)
        opened = hot + spread
        await bench.setup(len(opened), lambda i: gql.open_account(opened[i], wait=True))
        return [
            await _mixed(
                bench, gql, "mixed_hot", "mixed traffic, one hot account", hot, scale.mixed_hot
            ),
            await _mixed(
                bench,
                gql,
                "mixed_spread",
                "mixed traffic, 100 accounts",
                spread,
                scale.mixed_spread,
            ),
        ]
    finally:
        await http.aclose()


async def _mixed(
    bench: Bench, gql: GraphQL, key: str, title: str, accounts: list[str], count: int
) -> Result:
    # Repeats stay well inside what each account's ledger remembers, reordering included.
    recent = bench.stack.settings.runtime.ledger_size // 4
    deposits = plan(accounts, count, f"{bench.tag}-{key}", recent, seed=key)
    acknowledged: dict[str, dict[str, int]] = {account: {} for account in accounts}
    unseen = 0

    async def deposit(i: int) -> None:
        nonlocal unseen
        d = deposits[i]
        keys = acknowledged[d.account]
        # Every key acknowledged before this one was sent is applied before it.
        floor = OPENED_REVISION + len(keys) + (d.key not in keys)
        document = DEPOSIT_WAIT if d.wait else DEPOSIT
        data = await gql.command(document, id=d.account, amount=d.amount, key=d.key)
        payload = data["depositToAccount"]
        if payload["status"] not in ACKNOWLEDGED:
            raise RuntimeError(f"{d.key}: status {payload['status']}")
        keys[d.key] = d.amount
        if d.wait:
            unseen += payload["status"] != "APPLIED" or payload["account"]["revision"] < floor

    def revisions() -> dict[str, int]:
        return {account: OPENED_REVISION + len(keys) for account, keys in acknowledged.items()}

    retries = gql.retries
    load = Load(
        deposit,
        count,
        bench.stack.window(bench.stack.worker),
        settle=lambda: until_cached(bench, revisions()),
    )
    await bench.alternate([load], concurrency=CLIENTS)
    retries = gql.retries - retries

    started = time.perf_counter()
    problems = await check_accounts(
        bench.stack.client,
        {account: len(keys) for account, keys in acknowledged.items()},
        OPENED_REVISION,
        bench.scale.concurrency,
        balances={account: sum(keys.values()) for account, keys in acknowledged.items()},
    )
    if unseen:
        problems.append(f"{unseen} waited mutations did not see their own command")
    details: dict[str, object] = {
        "clients": CLIENTS,
        "accounts": len(accounts),
        "waited": sum(d.wait for d in deposits),
        "repeats": sum(d.repeat for d in deposits),
        "keys": sum(len(keys) for keys in acknowledged.values()),
        "retries": retries,
        "check_s": round(time.perf_counter() - started, 2),
    }
    if len(accounts) == 1:
        lengths = await history_lengths(bench.stack.client, f"account:{accounts[0]}")
        details.update(history_details(bench, lengths, load))
    return Result(
        key,
        title,
        "commands",
        load.measured,
        window=load.window,
        problems=problems[:5],
        details=details,
    )
