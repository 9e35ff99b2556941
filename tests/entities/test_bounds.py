"""No entity can be broken from outside: every collection is bounded, with a clear code when
full, and an entity at its fullest still continues as new and keeps serving."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from api.gateway import Consistency, EntityGateway
from deploy.embedded import EmbeddedRedis
from entities.account import account
from entities.cart import cart
from entities.catalog import workflow_for
from entities.errors import ErrorCode, Rejected, TenureError
from entities.inventory import inventory
from entities.runtime import publisher
from entities.runtime.entity import MAX_MONEY, EntityType
from entities.runtime.envelope import (
    CommandEnvelope,
    CommandResult,
    EntityRunInput,
    RuntimeOptions,
    Snapshot,
)
from entities.runtime.workflow import EntityWorkflow
from tests.conftest import WorkerFactory, new_id
from tests.entities.shop import eventually, until_cached
from tests.entities.test_runtime import open_active
from workers.cache import SnapshotCache
from workers.delivery import CommandDelivery
from workers.settings import Settings


def bounded(settings: Settings, **entity_options: dict[str, object]) -> Settings:
    return settings.model_copy(
        update={
            "runtime": RuntimeOptions(max_commands_per_run=150),
            "entity_options": entity_options,
        }
    )


async def continues_as_new_at_its_fullest(
    client: Client, workflow_id: str, keep_full: object
) -> None:
    """Send a run's worth of commands that leave the entity at its fullest (`keep_full`, a
    coroutine function of n), and see its run change: the run input that carried the state
    over was the largest the entity can have."""
    handle = client.get_workflow_handle(workflow_id)
    full_run = (await handle.describe()).run_id
    await asyncio.gather(*(keep_full(n) for n in range(150)))  # type: ignore[operator]
    assert await eventually(lambda: handle.describe(), lambda d: d.run_id != full_run, 30), (
        "no continue-as-new at its fullest"
    )


async def code_of(send: object) -> ErrorCode:
    with pytest.raises(TenureError) as refused:
        await send  # type: ignore[misc]
    return refused.value.code


async def test_an_item_at_its_most_reservations_refuses_one_more_and_continues_as_new(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = bounded(settings)  # the default bound: 1,000 reservations held at once
    gateway = EntityGateway(temporal_client, cache, settings)
    sku = new_id()
    async with run_worker(settings):
        await gateway.send("inventory", sku, "restock", {"quantity": 5000, "name": "Pot"})
        gate = asyncio.Semaphore(64)

        async def send(command: str, reservation_id: str) -> None:
            async with gate:
                payload = {"reservation_id": reservation_id}
                if command == "reserveStock":
                    payload |= {"quantity": 1, "ttl_seconds": 3600}
                await gateway.send("inventory", sku, command, payload)

        await asyncio.gather(*(send("reserveStock", f"r{n}") for n in range(1000)))
        # Every log the item keeps, full too: the 500 settled reservations it remembers
        # (released here) and its 20 latest adjustments.
        await asyncio.gather(*(send("releaseReservation", f"r{n}") for n in range(500)))
        await asyncio.gather(*(send("reserveStock", f"s{n}") for n in range(500)))
        for n in range(25):
            adjust = {"delta": 1, "reason": f"stocktake {n} " + "x" * 150}
            await gateway.send("inventory", sku, "adjustStock", adjust)
        full = {"reservation_id": "one-more", "quantity": 1}
        assert (
            await code_of(gateway.send("inventory", sku, "reserveStock", full, wait=True))
            == ErrorCode.LIMIT_REACHED
        )
        await gateway.send(
            "inventory", sku, "releaseReservation", {"reservation_id": "s0"}, wait=True
        )
        done = await gateway.send("inventory", sku, "reserveStock", full, wait=True)
        assert done.read is not None and done.read.snapshot.state is not None
        state = done.read.snapshot.state
        assert len(state["reservations"]) == 1000
        assert (len(state["settled"]), len(state["adjustments"])) == (500, 20)

        async def refused_reserve(n: int) -> None:
            async with gate:
                over = {"reservation_id": f"over-{n}", "quantity": 1}
                await gateway.send("inventory", sku, "reserveStock", over)

        await continues_as_new_at_its_fullest(temporal_client, f"inventory:{sku}", refused_reserve)
        after = await gateway.read("inventory", sku, Consistency.LIVE)
    assert after is not None and after.snapshot.state is not None
    assert len(after.snapshot.state["reservations"]) == 1000  # still serving, still full
    assert (len(after.snapshot.state["settled"]), len(after.snapshot.state["adjustments"])) == (
        500,
        20,
    )
    assert len(done.read.snapshot.model_dump_json()) < 512 * 1024


async def test_a_cart_at_its_most_lines_refuses_one_more_and_continues_as_new(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    settings = bounded(settings)  # the default bound: 100 lines
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id, cart_id = new_id(), new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
        await gateway.send("cart", cart_id, "createCart", {"account_id": account_id}, wait=True)
        for n in range(100):
            # Each line twice, with a new price: 200 commands, so more than one run.
            for price in (1, 2):
                line = {"sku": f"sku-{n:03}", "quantity": 1, "unit_price": price}
                await gateway.send("cart", cart_id, "addCartItem", line)
        extra = {"sku": "sku-extra", "quantity": 1, "unit_price": 1}
        assert (
            await code_of(gateway.send("cart", cart_id, "addCartItem", extra, wait=True))
            == ErrorCode.INVALID_INPUT
        )
        read = await gateway.read("cart", cart_id, Consistency.LIVE)
        assert read is not None and read.snapshot.state is not None
        assert len(read.snapshot.state["lines"]) == 100
        assert read.snapshot.revision == 1 + 200

        async def reprice(n: int) -> None:
            line = {"sku": f"sku-{n % 100:03}", "quantity": 1, "unit_price": 3 + n}
            await gateway.send("cart", cart_id, "addCartItem", line)

        await continues_as_new_at_its_fullest(temporal_client, f"cart:{cart_id}", reprice)
        after = await gateway.read("cart", cart_id, Consistency.LIVE)
    assert after is not None and after.snapshot.state is not None
    assert len(after.snapshot.state["lines"]) == 100  # still serving, still full
    assert after.snapshot.revision == 1 + 200 + 150


async def test_a_balance_never_passes_what_a_long_carries(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    async with run_worker():
        await open_active(gateway, account_id)
        step = 10**15
        for _ in range(MAX_MONEY // step):
            await gateway.send("account", account_id, "deposit", {"amount": step})
        last = await gateway.send(
            "account", account_id, "deposit", {"amount": MAX_MONEY % step}, wait=True
        )
        assert last.read is not None and last.read.snapshot.state is not None
        assert last.read.snapshot.state["balance"] == MAX_MONEY
        assert (
            await code_of(gateway.send("account", account_id, "deposit", {"amount": 1}, wait=True))
            == ErrorCode.LIMIT_REACHED
        )
        again = await gateway.read("account", account_id, Consistency.LIVE)
    assert again is not None and again.snapshot.state is not None
    assert again.snapshot.state["balance"] == MAX_MONEY


# Bounds added after entities first ran: a payload each refuses, the field it names, and the
# level they came at (`strict_bound`, patch strict-inputs-<level>).
LATER_BOUNDS = [
    (cart, "addCartItem", {"sku": "s1", "quantity": 1, "unit_price": 0}, "unit_price", 1),
    (
        account,
        "open",
        {"owner_name": "Ada", "email": "ada@example.com", "currency": "XYZ"},
        "currency",
        1,
    ),
    (inventory, "reserveStock", {"reservation_id": "r#1", "quantity": 1}, "reservation_id", 1),
    (
        inventory,
        "reserveStock",
        {"reservation_id": "r1", "quantity": 1, "ttl_seconds": 10**9},
        "ttl_seconds",
        1,
    ),
    *(
        (account, "open", {"owner_name": "Ada", "email": email}, "email", 2)
        for email in ("a\u0000@b.co", "a@b\u0007.co", "\u202ea@b.co", "a\u200b@b.co")
    ),
    # Text shown as written: a direction override, an isolate, separators, a zero-width space,
    # a byte order mark, a soft hyphen, an annotation anchor, a tag character.
    *(
        (account, "open", {"owner_name": name, "email": "ada@example.com"}, "owner_name", 4)
        for name in (
            "Ada\u202egnp.exe",
            "Ada\u2066x",
            "Ada\u2028Lovelace",
            "Ada\u2029Lovelace",
            "A\u200bda",
            "\ufeffAda",
            "Ada\u00adLovelace",
            "Ada\ufff9",
            "Ada\U000e0041",
        )
    ),
    (account, "suspend", {"reason": "fraud\u202e"}, "reason", 4),
    (account, "verify", {"kyc_reference": "kyc\u200b1"}, "kyc_reference", 4),
    (inventory, "restock", {"quantity": 1, "name": "Tea\u202epot"}, "name", 4),
    (inventory, "adjustStock", {"delta": -1, "reason": "chip\u2028ped"}, "reason", 4),
]


@pytest.mark.parametrize("entity, command, payload, field, level", LATER_BOUNDS)
def test_a_bound_added_later_refuses_at_the_edge_but_not_in_runs_older_than_it(
    entity: EntityType[Any, Any], command: str, payload: dict[str, Any], field: str, level: int
) -> None:
    with pytest.raises(Rejected) as refused:
        entity.parse(command, payload)
    assert refused.value.code is ErrorCode.INVALID_INPUT and field in refused.value.message
    # A run that began before the bound replays its history as it was made.
    assert entity.parse(command, payload, strict=level - 1) is not None


@pytest.mark.parametrize(
    "name",
    [
        "Ada Lovelace",
        "\u0645\u06cc\u200c\u0631\u0636\u0627",
        "\U0001f469\u200d\U0001f52c",
        "\u200f\u05e9\u05e8\u05d4 (IL)",
    ],
)
def test_names_that_need_joiners_or_direction_marks_are_taken(name: str) -> None:
    """Persian needs the zero-width non-joiner, emoji sequences the joiner, mixed-direction
    text its direction marks: formatting characters that text is written with."""
    assert account.parse("open", {"owner_name": name, "email": "ada@example.com"}) is not None


def test_an_email_without_control_characters_is_taken() -> None:
    assert account.parse("open", {"owner_name": "Ada", "email": "ada@example.com"}) is not None


def test_a_reservation_held_under_an_id_the_bounds_now_refuse_can_still_be_settled() -> None:
    for command in ("releaseReservation", "commitReservation", "returnReservation"):
        assert inventory.parse(command, {"reservation_id": "order/7"}) is not None


async def test_a_new_run_refuses_what_the_later_bounds_refuse_however_it_is_sent(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """Commands that never met the API (sent by a Temporal client of one's own, say) meet
    the same bounds in the entity; a reservation made before them, under an id they refuse,
    can still be settled."""
    gateway = EntityGateway(temporal_client, cache, settings)
    delivery = CommandDelivery(temporal_client, settings)
    sku = new_id()
    asks = {
        "bad id": {"reservation_id": "r#1", "quantity": 1},
        "a ttl of years": {"reservation_id": "r1", "quantity": 1, "ttl_seconds": 10**9},
    }
    async with run_worker():
        await gateway.send("inventory", sku, "restock", {"quantity": 5, "name": "Pot"}, wait=True)
        outcomes = {
            name: (
                await delivery.request(
                    inventory,
                    sku,
                    CommandEnvelope(command_id=new_id(), name="reserveStock", payload=payload),
                )
            ).outcome
            for name, payload in asks.items()
        }
        item = await gateway.read("inventory", sku, Consistency.LIVE)
        # Held under an id only runs older than the bounds took: still released.
        released = await gateway.send(
            "inventory", sku, "releaseReservation", {"reservation_id": "order/7"}, wait=True
        )
    assert {name: o.code for name, o in outcomes.items()} == dict.fromkeys(asks, "INVALID_INPUT")
    assert item is not None and item.snapshot.state is not None
    assert item.snapshot.state["on_hand"] == 5 and item.snapshot.state["reservations"] == []
    assert released.applied


async def test_a_command_whose_state_would_weigh_past_the_runtime_bound_is_refused(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """The runtime's own net, under every entity type's bounds: with the state bounded at
    4 KiB, a cart refuses the line that would make it heavier, keeps serving, and still
    continues as new at its heaviest."""
    settings = settings.model_copy(
        update={"runtime": RuntimeOptions(max_commands_per_run=150, max_state_bytes=4096)}
    )
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id, cart_id = new_id(), new_id()
    async with run_worker(settings):
        await open_active(gateway, account_id)
        await gateway.send("cart", cart_id, "createCart", {"account_id": account_id}, wait=True)
        refused: ErrorCode | None = None
        for n in range(100):  # far fewer lines than a cart's own bound fit in 4 KiB
            line = {"sku": f"sku-{n:03}-{'x' * 40}", "quantity": 1, "unit_price": 1}
            try:
                await gateway.send("cart", cart_id, "addCartItem", line, wait=True)
            except TenureError as exc:
                refused = exc.code
                break
        read = await gateway.read("cart", cart_id, Consistency.LIVE)
        assert read is not None and read.snapshot.state is not None
        held = len(read.snapshot.state["lines"])

        async def reprice(k: int) -> None:
            line = {"sku": f"sku-{k % held:03}-{'x' * 40}", "quantity": 1, "unit_price": 2 + k}
            await gateway.send("cart", cart_id, "addCartItem", line)

        await continues_as_new_at_its_fullest(temporal_client, f"cart:{cart_id}", reprice)
        after = await gateway.read("cart", cart_id, Consistency.LIVE)
    assert refused is ErrorCode.LIMIT_REACHED and 10 < held < 100
    assert len(read.snapshot.model_dump_json()) <= 4096 + 1024  # the state, and its envelope
    assert after is not None and after.snapshot.state is not None
    assert len(after.snapshot.state["lines"]) == held  # still serving, still at its heaviest


async def test_a_state_is_weighed_in_bytes_not_characters(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """Temporal counts bytes: a character of a name weighs up to four. With the state
    bounded at 1 KiB, a KYC reference of 200 emoji on an account named in 100 more weighs
    about 1.4 KiB and is refused, though it is some 500 characters; the same account in
    ASCII (some 500 bytes) takes it."""
    settings = settings.model_copy(update={"runtime": RuntimeOptions(max_state_bytes=1024)})
    gateway = EntityGateway(temporal_client, cache, settings)
    wide, narrow = new_id(), new_id()
    async with run_worker(settings):
        for account_id, letter in ((wide, "\N{GRINNING FACE}"), (narrow, "a")):
            await gateway.send(
                "account",
                account_id,
                "open",
                {"owner_name": letter * 100, "email": "ada@example.com"},
                wait=True,
            )
        verify = {"kyc_reference": "\N{GRINNING FACE}" * 200}
        refused = await code_of(gateway.send("account", wide, "verify", verify, wait=True))
        taken = await gateway.send(
            "account", narrow, "verify", {"kyc_reference": "a" * 200}, wait=True
        )
        read = await gateway.read("account", wide, Consistency.LIVE)
    assert refused is ErrorCode.LIMIT_REACHED and taken.applied
    assert read is not None and read.snapshot.state is not None
    assert read.snapshot.state["status"] == "PENDING"  # the refused command stored nothing


async def test_a_state_carried_past_its_bound_still_takes_what_does_not_grow_it(
    temporal_client: Client, settings: Settings, cache: SnapshotCache, run_worker: WorkerFactory
) -> None:
    """A run that counted characters could carry a state that weighs more bytes than its
    bound (1 KiB here: some 550 characters, 1.4 KiB). A deposit, which leaves it no
    heavier, is taken, and a suspension with a reason, which would grow it, is refused: it
    is not stuck as it was."""
    account_id = new_id()
    state = {
        "status": "ACTIVE",
        "owner_name": "\N{GRINNING FACE}" * 200,
        "email": "ada@example.com",
        "currency": "EUR",
        "kyc_reference": "\N{GRINNING FACE}" * 100,
        "last_activity_at": "2026-12-01T00:00:00.123456Z",  # as long as any
    }
    gateway = EntityGateway(temporal_client, cache, settings)
    async with run_worker(settings):
        await temporal_client.start_workflow(
            workflow_for("account").run,  # type: ignore[attr-defined]
            EntityRunInput(
                entity_id=account_id,
                runtime=RuntimeOptions(max_state_bytes=1024),
                state=state,
                revision=2,
            ),
            id=account.workflow_id(account_id),
            task_queue=settings.task_queue,
        )
        deposit = await gateway.send("account", account_id, "deposit", {"amount": 7}, wait=True)
        suspend = gateway.send("account", account_id, "suspend", {"reason": "x" * 100}, wait=True)
        refused = await code_of(suspend)
    assert deposit.applied and deposit.read is not None and deposit.read.snapshot.state
    assert deposit.read.snapshot.state["balance"] == 7
    assert refused is ErrorCode.LIMIT_REACHED


async def test_a_sender_s_outsized_command_is_refused_without_the_entity_forgetting_the_rest(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    """A signal sender's command with a 400,000-character name, or a 700,000-character
    payload key, was refused with a message that held it (twice, for the name): one outcome
    outweighed the whole ledger, which forgot every other command to hold it, and a retry of
    a deposit applied a moment before was applied again."""
    gateway = EntityGateway(temporal_client, cache, settings)
    delivery = CommandDelivery(temporal_client, settings)
    async with run_worker(settings):
        account_id, other_id = new_id(), new_id()
        await open_active(gateway, account_id)
        await open_active(gateway, other_id)
        deposit = CommandEnvelope(command_id=new_id(), name="deposit", payload={"amount": 7})
        await delivery.request(account, account_id, deposit)
        handle = temporal_client.get_workflow_handle(account.workflow_id(account_id))
        outsized: list[dict[str, Any]] = [
            {"command_id": new_id(), "name": "d" * 400_000, "payload": {}},
            {"command_id": new_id(), "name": "deposit", "payload": {"amount": 1, "k" * 700_000: 1}},
        ]
        for envelope in outsized:
            await handle.signal("command", envelope)
        again = await delivery.request(account, account_id, deposit)
        assert again.outcome.revision == 3, again.outcome  # the first's outcome, not another
        assert again.snapshot.state["balance"] == 7
        for envelope in outsized:
            refused = await handle.query(
                EntityWorkflow.outcome, envelope["command_id"], result_type=CommandResult
            )
            assert refused.outcome.code == ErrorCode.INVALID_INPUT, refused.outcome
            assert len(refused.outcome.message or "") <= 1000
    # Runs from before the bounds took such commands as they came, and replay so: the rules
    # are asked (a marker in the history) only of a command they refuse.
    assert await rules_asked(handle) == {"entity-rules-5"}
    plain = temporal_client.get_workflow_handle(account.workflow_id(other_id))
    assert await rules_asked(plain) == set()


async def rules_asked(handle: Any) -> set[str]:
    """The rules levels from 5 on that a run's history records it asked."""
    asked = set()
    async for event in handle.fetch_history_events():
        if event.HasField("marker_recorded_event_attributes"):
            details = event.marker_recorded_event_attributes.details
            if "patch-data" in details:
                patch = json.loads(details["patch-data"].payloads[0].data)["id"]
                if patch.startswith("entity-rules-") and int(patch.rsplit("-", 1)[1]) >= 5:
                    asked.add(patch)
    return asked


async def test_an_ended_entity_waiting_to_publish_its_end_continues_as_new(
    temporal_client: Client,
    own_redis: EmbeddedRedis,
    own_redis_settings: Settings,
    own_cache: SnapshotCache,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A closed account whose end could not be published (Redis down) waited in one run:
    every command sent to it meanwhile, each refused, grew that run's history until
    Temporal ended the run at its limit, its end never published. It now continues as new
    when its history asks it, between its tries to publish, and the next run publishes its
    end once Redis is back."""
    # Each try gives up after 2 s, not 10 minutes: the workflows run unsandboxed, so that
    # they read the module's constant as patched here.
    monkeypatch.setattr(publisher, "PUBLISH_GIVE_UP", timedelta(seconds=2))
    settings = own_redis_settings.model_copy(
        update={"runtime": RuntimeOptions(max_commands_per_run=6), "workflow_sandbox": False}
    )
    gateway = EntityGateway(temporal_client, own_cache, settings)
    account_id = new_id()
    handle = temporal_client.get_workflow_handle(f"account:{account_id}")
    async with run_worker(settings):
        await open_active(gateway, account_id)
        await until_cached(own_cache, "account", account_id, 2)
        first_run = (await handle.describe()).run_id
        own_redis.stop()
        await gateway.send("account", account_id, "close", {}, wait=True)
        for n in range(8):  # refused by the closed account, each in its history
            await gateway.send("account", account_id, "deposit", {"amount": n + 1})
        later = await eventually(lambda: handle.describe(), lambda d: d.run_id != first_run, 60)
        assert later is not None and later.status is WorkflowExecutionStatus.RUNNING
        await own_redis.start()
        last = Snapshot.model_validate(await asyncio.wait_for(handle.result(), 60))
        hit = await until_cached(own_cache, "account", account_id, last.revision)
    assert hit.snapshot.closed
    assert hit.snapshot.state is not None and hit.snapshot.state["status"] == "CLOSED"
    assert hit.snapshot.state["balance"] == 0  # none of the deposits applied
