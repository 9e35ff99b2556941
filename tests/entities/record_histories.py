"""Records the histories that test_replay.py replays: `python -m tests.entities.record_histories`.

Re-record only after a deliberate change to a workflow that old histories cannot replay
against (and say so in the commit): the point of the replay tests is that running
workflows survive a deploy. Starts its own Temporal and Valkey servers; writes
tests/entities/histories/<entity type>.<id>[.runN].json, Temporal's own JSON history format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.gateway import EntityGateway
from deploy.embedded import EmbeddedRedis, EmbeddedTemporal
from entities import catalog
from entities.bulk import BulkCommandWorkflow, BulkInput, bulk_workflow_id
from entities.cart import CartStatus
from entities.checkout import CheckoutWorkflow
from entities.checkout_input import checkout_workflow_id
from entities.errors import ErrorCode, TenureError
from entities.inventory import Settlement
from entities.runtime.envelope import CommandEnvelope, RuntimeOptions
from entities.runtime.saga import OperatorActionKind, OperatorRequest
from tests.entities.failing_checkout import failed_checkout
from tests.entities.shop import FAST_COMPENSATION, FAST_STEP, Shop, eventually, until_cached
from workers.cache import SnapshotCache, connect_redis
from workers.delivery import CommandDelivery
from workers.settings import Settings
from workers.worker import TenureWorker, build_worker

HISTORIES = Path(__file__).parent / "histories"
# Histories recorded since runs ask one patch set (entities.runtime.patches): today's code.
# Those of older code stay in folders of their own: in HISTORIES itself, runs that publish with
# local activities; in PUBLISHED_BY_ACTIVITY, runs that publish with activities and ask each
# patch on its own.
CURRENT = "patch-sets"
PUBLISHED_BY_ACTIVITY = "publish-by-activity"
# Checkouts under the first checkout patch set, which reserve one line after another.
CHECKOUT_SET_1 = "checkout-set-1"
# Checkouts under the second, which sent their report as a local try in the workflow task of
# the steps before it, and undid only the steps they had reached.
CHECKOUT_SET_2 = "checkout-set-2"
# Checkouts under the third, which ran every compensation one after another.
CHECKOUT_SET_3 = "checkout-set-3"
# Entities under the first entity patch set, which took text with invisible formatting.
ENTITY_SET_1 = "entity-set-1"
# Entities under the second, whose items took back a sale they had forgotten as returned.
ENTITY_SET_2 = "entity-set-2"
# Entities under the third, before the patches asked only where their case arises: an
# account whose service's withdrawal was taken for a customer's deposit under the same key
# (entity-keys-per-sender), an item that took back a sale it was told to release unknowing
# as a release (entity-rules-2).
ENTITY_SET_3 = "entity-set-3"
# Entities under the third set as it was last, which published every change by activity:
# before the fourth, whose runs offer changes to their worker between publishes.
ENTITY_SET_3_PUBLISHED = "entity-set-3-published"
# Entities under the fourth, whose carts named their checkout's requests after the time they
# applied `checkoutCart`: before the fifth, which names them after the cart's incarnation
# (entity-rules-3).
ENTITY_SET_4 = "entity-set-4"


def workflow_id_of(path: Path) -> str:
    """`checkout.cart-done-1.json` holds the history of workflow `checkout:cart-done-1`;
    `account.acct-lifecycle.run2.json` the second run of `account:acct-lifecycle`."""
    return path.stem.split(".run")[0].replace(".", ":", 1)


async def _scenarios(shop: Shop) -> list[str]:
    """Drive the entities through their paths; the workflow ids whose histories to keep."""
    teapot = await shop.stock(5, "sku-teapot")
    kettle = await shop.stock(1, "sku-kettle")
    ada = await shop.account(10_000, "acct-ada")
    poor = await shop.account(100, "acct-poor")

    # a checkout that completes: reserve, withdraw, commit, report
    done = await shop.cart(ada, (teapot, 2, 1000), (kettle, 1, 500), cart_id="cart-done")
    await shop.finished(await shop.checkout(done))

    # one that runs out of stock (release) and one out of money (refund, release)
    short = await shop.cart(ada, (teapot, 1, 1000), (kettle, 1, 500), cart_id="cart-short")
    await shop.finished(await shop.checkout(short))
    broke = await shop.cart(poor, (teapot, 1, 1000), cart_id="cart-broke")
    await shop.finished(await shop.checkout(broke))

    # the broke cart idles into ABANDONED and is revived
    await eventually(lambda: shop.cart_state(broke), lambda s: s.status is CartStatus.ABANDONED, 10)
    await shop.send("cart", broke, "addCartItem", sku=kettle, quantity=1, unit_price=500)

    # the rest of the teapot's commands, and a reservation that expires
    await shop.send(
        "inventory", teapot, "reserveStock", reservation_id="r1", quantity=1, ttl_seconds=0.5
    )
    await eventually(
        lambda: shop.item(teapot),
        lambda s: "r1" in s.settled and s.settled["r1"].settlement is Settlement.EXPIRED,
        10,
    )
    await shop.send("inventory", teapot, "reserveStock", reservation_id="r2", quantity=2)
    await shop.send("inventory", teapot, "commitReservation", reservation_id="r2")
    await shop.send("inventory", teapot, "returnReservation", reservation_id="r2")
    await shop.send("inventory", teapot, "releaseReservation", reservation_id="r3")
    # a return of a sale the item does not remember: refused (entity-rules-1)
    try:
        await shop.send("inventory", teapot, "returnReservation", reservation_id="r-forgotten")
    except TenureError as refused:
        assert refused.code is ErrorCode.INVALID_TRANSITION, refused
    else:
        raise AssertionError("a return of a sale the item does not remember was applied")
    await shop.send("inventory", teapot, "adjustStock", delta=-1, reason="chipped")
    return [
        f"checkout:{done}-1",
        f"checkout:{short}-1",
        f"checkout:{broke}-1",
        f"cart:{done}",
        f"cart:{broke}",
        f"inventory:{teapot}",
    ]


STUCK_CART = "cart-stuck"


async def _failed_checkout(client: Client, settings: Settings, cache: SnapshotCache) -> str:
    """A checkout whose refund is refused: FAILED, waiting for an operator, retried in vain,
    then retried after the fix and COMPENSATED. Runs its own workers (one for the account,
    stopped for a while); the workflow id whose history to keep."""

    @contextlib.asynccontextmanager
    async def run_worker(chosen: Settings | None = None) -> AsyncIterator[TenureWorker]:
        async with build_worker(client, chosen or settings, cache) as worker:
            yield worker

    shop = Shop(client, cache, settings)
    retry = OperatorRequest(action=OperatorActionKind.RETRY, reason="limit lifted", by="admin:a")
    async with failed_checkout(shop, run_worker, cart_id=STUCK_CART) as failed:
        handle = client.get_workflow_handle(checkout_workflow_id(failed.checkout_id))
        refund = [c.name for c in failed.state.compensations].index("refund")
        first = failed.state.compensations[refund].at
        await handle.execute_update(CheckoutWorkflow.operate, retry)
        await eventually(
            lambda: shop.progress(failed.checkout_id),
            lambda p: (
                p is not None
                and p.awaiting_operator_until is not None
                and p.compensations[refund].at > first
            ),
        )
        await failed.fix()
        await handle.execute_update(CheckoutWorkflow.operate, retry)
        await handle.result()
    return handle.id


ACCOUNT_ID = "acct-lifecycle"
BURST_ID = "acct-burst"


async def _account_burst(gateway: EntityGateway, cache: SnapshotCache) -> None:
    """Commands faster than a publish interval of 1 s: a timer brings the trailing publish."""
    await gateway.send(
        "account", BURST_ID, "open", {"owner_name": "Bo", "email": "bo@example.com"}, wait=True
    )
    await gateway.send("account", BURST_ID, "verify", {}, wait=True)
    for amount in range(1, 11):
        await gateway.send("account", BURST_ID, "deposit", {"amount": amount})
    await until_cached(cache, "account", BURST_ID, 12)


OFFERS_ID = "acct-offers"


async def _account_offers(
    gateway: EntityGateway, cache: SnapshotCache, client: Client, settings: Settings
) -> str:
    """Commands under the default settings, faster than the interval of an entity that
    offers: the burst's two publishes, offers between, and a timer that brings the trailing
    publish by activity; then, within the next interval, a change offered and a waited
    command whose sender does not publish, which the entity publishes by activity at once.
    The workflow id whose history to keep."""
    await gateway.send(
        "account", OFFERS_ID, "open", {"owner_name": "Oz", "email": "oz@example.com"}
    )
    await gateway.send("account", OFFERS_ID, "verify", {})
    for amount in range(1, 11):
        await gateway.send("account", OFFERS_ID, "deposit", {"amount": amount})
    await until_cached(cache, "account", OFFERS_ID, 12)
    handle = client.get_workflow_handle(f"account:{OFFERS_ID}")

    async def published(times: int) -> bool:
        events = [event.event_type async for event in handle.fetch_history_events()]
        return (
            EventType.EVENT_TYPE_TIMER_FIRED in events
            and events[-1] == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
            and events.count(EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED) >= times
        )

    await eventually(lambda: published(3), bool, 15)
    await gateway.send("account", OFFERS_ID, "deposit", {"amount": 11})
    account = catalog.entity_types()["account"]
    withdrawal = CommandEnvelope(
        command_id="offers-withdraw", name="withdraw", payload={"amount": 1}
    )
    await CommandDelivery(client, settings).request(account, OFFERS_ID, withdrawal)
    await until_cached(cache, "account", OFFERS_ID, 14)
    await eventually(lambda: published(4), bool, 15)
    return f"account:{OFFERS_ID}"


KEYS_ID = "acct-keys"
KEY = "fee-1"


async def _keys_meet(gateway: EntityGateway) -> str:
    """A customer's deposit, then a service's withdrawal under the same key: today's account
    records the withdrawal as the service's own command (entity-keys-per-sender); one begun
    before took it for the deposit's repeat. The workflow id whose history to keep."""
    service = "service:billing"
    opening = {"owner_name": "Kay", "email": "kay@example.com"}
    await gateway.send("account", KEYS_ID, "open", opening, wait=True, sent_by=service)
    await gateway.send("account", KEYS_ID, "verify", {}, wait=True, sent_by=service)
    await gateway.send("account", KEYS_ID, "deposit", {"amount": 10}, wait=True, sent_by=service)
    mine = {"idempotency_key": KEY, "wait": True}
    await gateway.send("account", KEYS_ID, "deposit", {"amount": 1}, sent_by="customer:ada", **mine)
    try:
        await gateway.send("account", KEYS_ID, "withdraw", {"amount": 5}, sent_by=service, **mine)
    except TenureError as taken:  # code from before: the deposit's repeat
        assert taken.code is ErrorCode.IDEMPOTENCY_KEY_REUSED, taken
    return f"account:{KEYS_ID}"


TOMB_ID = "sku-tomb"


async def _released_unknown(shop: Shop) -> str:
    """A reservation released before the item knew it, then its return: today's item refuses
    it (entity-rules-2: it may have sold it and forgotten it); one begun before took it for
    a release, nothing to take back. The workflow id whose history to keep."""
    sku = await shop.stock(3, TOMB_ID)
    await shop.send("inventory", sku, "releaseReservation", reservation_id="r-gone")
    try:
        await shop.send("inventory", sku, "returnReservation", reservation_id="r-gone")
    except TenureError as refused:
        assert refused.code is ErrorCode.INVALID_TRANSITION, refused
    return f"inventory:{sku}"


async def _account_lifecycle(gateway: EntityGateway) -> None:
    """Every Account command, a rejection, the dormancy timer, continue-as-new and close."""

    async def send(name: str, **payload: object) -> None:
        with contextlib.suppress(TenureError):  # rejections belong in the history too
            await gateway.send("account", ACCOUNT_ID, name, dict(payload), wait=True)

    await send("open", owner_name="Ada", email="ada@example.com", currency="GBP")
    await send("verify", kyc_reference="kyc-1")
    await send("deposit", amount=100)
    await send("withdraw", amount=1000)  # refused: insufficient funds
    await send("suspend", reason="check")
    await send("reactivate")
    await asyncio.sleep(1.5)  # dormancy_seconds=1: the durable timer fires
    await send("withdraw", amount=100)
    await send("close")


BACKLOG_ID = "acct-backlog"


async def _account_backlog(client: Client, cache: SnapshotCache, settings: Settings) -> str:
    """Commands that waited for a worker, more than a task applies (3): held, and applied
    three a task, a waited one among them."""
    settings = settings.model_copy(
        update={
            "task_queue": "record-backlog",
            "runtime": RuntimeOptions(max_commands_per_task=3),
        }
    )
    gateway = EntityGateway(client, cache, settings)

    async def deposit(amount: int, wait: bool = False) -> None:
        await gateway.send("account", BACKLOG_ID, "deposit", {"amount": amount}, wait=wait)

    async with build_worker(client, settings, cache):
        opening = {"owner_name": "Bea", "email": "bea@example.com"}
        await gateway.send("account", BACKLOG_ID, "open", opening, wait=True)
        await gateway.send("account", BACKLOG_ID, "verify", {}, wait=True)
    for amount in range(1, 9):
        await deposit(amount)
    async with build_worker(client, settings, cache):
        await deposit(100, wait=True)
        await until_cached(cache, "account", BACKLOG_ID, 11)
    return f"account:{BACKLOG_ID}"


BULK_ID = "bulk-deposit"


async def _bulk(shop: Shop, client: Client, settings: Settings) -> str:
    """A bulk deposit over three pages of two, two pages a run, one target never opened."""
    ids = [await shop.account(0, f"acct-bulk-{n}") for n in range(5)]
    handle = await client.start_workflow(
        BulkCommandWorkflow.run,
        BulkInput(
            bulk_id=BULK_ID,
            entity_type="account",
            command="deposit",
            payload={"amount": 5},
            ids=[*ids, "never-opened"],
            sent_by="admin:record",
            page_size=2,
            window=2,
            pages_per_run=2,
        ),
        id=bulk_workflow_id(BULK_ID),
        task_queue=settings.bulk_task_queue,
    )
    await handle.result()
    return bulk_workflow_id(BULK_ID)


async def _write_runs(client: Client, workflow_id: str, into: Path) -> list[Path]:
    """Every run of `workflow_id`, oldest first: `<type>.<id>.json`, or `.runN.json` when
    it continued as new."""
    query = f'WorkflowId = "{workflow_id}"'
    runs = sorted([r async for r in client.list_workflows(query)], key=lambda r: r.start_time)
    written = []
    for n, run in enumerate(runs, start=1):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        history = await handle.fetch_history()
        suffix = f".run{n}" if len(runs) > 1 else ""
        path = into / f"{workflow_id.replace(':', '.', 1)}{suffix}.json"
        path.write_text(history.to_json())
        written.append(path)
    return written


async def record(into: Path = HISTORIES) -> list[Path]:
    """Run the scenarios on fresh servers and write their histories into `into`."""
    async with EmbeddedTemporal() as temporal, EmbeddedRedis() as valkey:
        client = await Client.connect(
            temporal.address,  # type: ignore[attr-defined]
            data_converter=pydantic_data_converter,
        )
        settings = Settings(
            temporal_address=temporal.address,  # type: ignore[attr-defined]
            redis_url=valkey.url,  # type: ignore[attr-defined]
            task_queue="record-histories",
            entity_options={
                "cart": {
                    "abandon_after_seconds": 1,
                    "checkout": {"step": FAST_STEP, "compensation": FAST_COMPENSATION},
                }
            },
        )
        # A low continue-as-new threshold and a short dormancy period, on a queue of their own.
        account_settings = settings.model_copy(
            update={
                "task_queue": "record-account",
                "runtime": RuntimeOptions(max_commands_per_run=4),
                "entity_options": {"account": {"dormancy_seconds": 1}},
            }
        )
        redis_client = connect_redis(settings)
        cache = SnapshotCache(redis_client, "record:")
        shop = Shop(client, cache, settings)
        into.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        try:
            async with build_worker(client, settings, cache):
                workflow_ids = await _scenarios(shop)
                throttled = settings.model_copy(
                    update={"runtime": RuntimeOptions(publish_interval_seconds=1.0)}
                )
                await _account_burst(EntityGateway(client, cache, throttled), cache)
                workflow_ids.append(f"account:{BURST_ID}")
                workflow_ids.append(await _bulk(shop, client, settings))
                workflow_ids.append(await _keys_meet(EntityGateway(client, cache, settings)))
                workflow_ids.append(await _released_unknown(shop))
                gateway = EntityGateway(client, cache, settings)
                workflow_ids.append(await _account_offers(gateway, cache, client, settings))
                for workflow_id in workflow_ids:
                    written += await _write_runs(client, workflow_id, into)
            async with build_worker(client, account_settings, cache):
                await _account_lifecycle(EntityGateway(client, cache, account_settings))
                # Closed, it still publishes its last state before it completes.
                await client.get_workflow_handle(f"account:{ACCOUNT_ID}").result()
                written += await _write_runs(client, f"account:{ACCOUNT_ID}", into)
            backlog = await _account_backlog(client, cache, settings)
            written += await _write_runs(client, backlog, into)
            # Its own queues: it stops and starts its account's worker.
            operator_settings = settings.model_copy(update={"task_queue": "record-operator"})
            stuck = await _failed_checkout(client, operator_settings, cache)
            written += await _write_runs(client, stuck, into)
            return written
        finally:
            await redis_client.aclose()


def main() -> None:
    """Record every history into tests/entities/histories/<CURRENT>, or with arguments only
    those whose names start with one of them (`account.acct-burst`), leaving the others as
    they were recorded. The histories of older code stay in the folders named after it."""
    # The scenarios' refusals are logged by the worker as failed activities: expected here.
    logging.basicConfig(level=logging.ERROR)
    wanted = tuple(sys.argv[1:])
    target = HISTORIES / CURRENT
    target.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt), tempfile.TemporaryDirectory() as scratch:
        for path in asyncio.run(record(Path(scratch))):
            if not wanted or path.stem.startswith(wanted):
                kept = target / path.name
                shutil.copyfile(path, kept)
                print(kept)


if __name__ == "__main__":
    main()
