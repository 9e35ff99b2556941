"""Carts, inventory and checkouts through GraphQL, against real servers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.checkouts import STARTING_PAUSES
from api.gateway import EntityGateway
from entities.checkout_input import checkout_workflow_id
from tests.api.test_access import token
from tests.api.test_listing import indexed_cart, put_all
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from tests.entities.shop import Shop, eventually
from workers.cache import SnapshotCache
from workers.creations import Creations
from workers.settings import Settings

CART = """
    id status revision updatedAt source stale accountId total checkoutId orderId
    failureCode failureReason lines { sku quantity unitPrice lineTotal }
"""
ITEM = "sku name onHand reserved available sold revision source stale"
CHECKOUT = """
    id cartId accountId status total orderId failureCode failureReason
    lines { sku quantity unitPrice }
    steps { name status code message }
    compensations { name status reason code message }
"""


async def open_account(gql: GraphQLClient, balance: int) -> str:
    account_id = new_id()
    await gql.data(
        """mutation($id: ID!) { openAccount(id: $id, ownerName: "Ada", email: "a@b.io",
           wait: true) { accountId } }""",
        id=account_id,
    )
    await gql.data(
        "mutation($id: ID!) { verifyAccount(id: $id, wait: true) { status } }", id=account_id
    )
    if balance:
        await gql.data(
            "mutation($id: ID!, $n: Long!) { depositToAccount(id: $id, amount: $n, wait: true) "
            "{ status } }",
            id=account_id,
            n=balance,
        )
    return account_id


async def restock(gql: GraphQLClient, units: int) -> str:
    sku = new_id()
    await gql.data(
        """mutation($sku: String!, $n: Long!) { restock(sku: $sku, quantity: $n, name: "Teapot",
           wait: true) { inventoryItem { onHand } } }""",
        sku=sku,
        n=units,
    )
    return sku


async def cart_with(gql: GraphQLClient, account_id: str, *lines: tuple[str, int, int]) -> str:
    data = await gql.data(
        "mutation($a: ID!) { createCart(accountId: $a, wait: true) { cartId cart { status } } }",
        a=account_id,
    )
    cart_id: str = data["createCart"]["cartId"]
    assert data["createCart"]["cart"]["status"] == "OPEN"
    for sku, quantity, price in lines:
        await gql.data(
            """mutation($c: ID!, $s: String!, $q: Int!, $p: Long!) {
                 addCartItem(cartId: $c, sku: $s, quantity: $q, unitPrice: $p, wait: true)
                 { status } }""",
            c=cart_id,
            s=sku,
            q=quantity,
            p=price,
        )
    return cart_id


async def checkout(gql: GraphQLClient, cart_id: str) -> str:
    data = await gql.data(
        "mutation($c: ID!) { checkoutCart(cartId: $c) { checkoutId cart { status } } }",
        c=cart_id,
    )
    assert data["checkoutCart"]["cart"]["status"] == "CHECKING_OUT"
    checkout_id: str = data["checkoutCart"]["checkoutId"]
    return checkout_id


async def checkout_state(gql: GraphQLClient, checkout_id: str) -> dict[str, Any] | None:
    data = await gql.data(
        f"query($id: ID!) {{ checkout(id: $id) {{ {CHECKOUT} }} }}", id=checkout_id
    )
    state: dict[str, Any] | None = data["checkout"]
    return state


async def finished(gql: GraphQLClient, checkout_id: str) -> dict[str, Any]:
    state = await eventually(
        lambda: checkout_state(gql, checkout_id),
        lambda s: s is not None and s["status"] != "RUNNING",
        30,
    )
    assert state is not None
    return state


async def live(gql: GraphQLClient, field: str, key: str, value: str, selection: str) -> Any:
    data = await gql.data(
        f"query($v: {'ID' if key == 'id' else 'String'}!) "
        f"{{ {field}({key}: $v, consistency: LIVE) {{ {selection} }} }}",
        v=value,
    )
    return data[field]


async def test_a_cart_from_first_line_to_order(gql: GraphQLClient) -> None:
    account_id = await open_account(gql, 10_000)
    a, b = await restock(gql, 5), await restock(gql, 3)
    cart_id = await cart_with(gql, account_id, (a, 1, 1000), (b, 3, 500), (a, 1, 900))
    await gql.data(
        """mutation($c: ID!, $s: String!) { setCartItemQuantity(cartId: $c, sku: $s,
           quantity: 2, wait: true) { status } }""",
        c=cart_id,
        s=b,
    )
    cart = await live(gql, "cart", "id", cart_id, CART)
    assert cart["lines"] == [
        {"sku": a, "quantity": 2, "unitPrice": 900, "lineTotal": 1800},
        {"sku": b, "quantity": 2, "unitPrice": 500, "lineTotal": 1000},
    ]
    assert (cart["total"], cart["source"], cart["stale"], cart["revision"]) == (
        2800,
        "LIVE",
        False,
        5,
    )

    checkout_id = await checkout(gql, cart_id)
    assert checkout_id == f"{cart_id}-1"
    done = await finished(gql, checkout_id)
    assert done["status"] == "COMPLETED"
    assert [s["name"] for s in done["steps"]] == [
        f"reserve:{a}",
        f"reserve:{b}",
        "withdraw",
        f"commit:{a}",
        f"commit:{b}",
        "report",
    ]
    assert (done["total"], done["compensations"]) == (2800, [])

    cart = await eventually(
        lambda: live(gql, "cart", "id", cart_id, CART), lambda c: c["status"] == "CHECKED_OUT"
    )
    assert cart["orderId"] == done["orderId"] is not None
    account = await live(gql, "account", "id", account_id, "balance")
    assert account["balance"] == 10_000 - 2800
    item = await live(gql, "inventoryItem", "sku", a, ITEM)
    assert (item["onHand"], item["available"], item["sold"], item["name"]) == (3, 3, 2, "Teapot")

    # the cached read contract: same fields, from the cache once published
    cached = await eventually(
        lambda: gql.data("query($s: String!) { inventoryItem(sku: $s) { " + ITEM + " } }", s=a),
        lambda d: d["inventoryItem"]["revision"] == item["revision"],
    )
    assert (cached["inventoryItem"]["source"], cached["inventoryItem"]["stale"]) == (
        "CACHE",
        False,
    )
    code = await gql.error_code(
        """mutation($c: ID!, $s: String!) { addCartItem(cartId: $c, sku: $s, quantity: 1,
           unitPrice: 1, wait: true) { status } }""",
        c=cart_id,
        s=a,
    )
    assert code == "INVALID_TRANSITION"


async def test_a_failed_checkout_shows_its_compensations_and_reopens_the_cart(
    gql: GraphQLClient,
) -> None:
    account_id = await open_account(gql, 100)
    a = await restock(gql, 5)
    cart_id = await cart_with(gql, account_id, (a, 2, 300))
    checkout_id = await checkout(gql, cart_id)
    done = await finished(gql, checkout_id)

    assert (done["status"], done["failureCode"]) == ("COMPENSATED", "INSUFFICIENT_FUNDS")
    assert [(s["name"], s["status"], s["code"]) for s in done["steps"]] == [
        (f"reserve:{a}", "DONE", None),
        ("withdraw", "FAILED", "INSUFFICIENT_FUNDS"),
        ("report", "DONE", None),
    ]
    assert [(c["name"], c["status"]) for c in done["compensations"]] == [
        ("refund", "DONE"),
        (f"release:{a}", "DONE"),
    ]
    assert done["compensations"][0]["message"] == "nothing to undo: withdraw was refused"
    assert all(c["reason"].startswith("withdraw:") for c in done["compensations"])

    cart = await live(gql, "cart", "id", cart_id, CART)
    assert (cart["status"], cart["failureCode"]) == ("OPEN", "INSUFFICIENT_FUNDS")
    assert (await live(gql, "inventoryItem", "sku", a, ITEM))["available"] == 5
    assert (await live(gql, "account", "id", account_id, "balance"))["balance"] == 100

    # the cart is open again: a second attempt has an id of its own
    await gql.data(
        "mutation($a: ID!) { depositToAccount(id: $a, amount: 500, wait: true) { status } }",
        a=account_id,
    )
    again = await checkout(gql, cart_id)
    assert again == f"{cart_id}-2"
    assert (await finished(gql, again))["status"] == "COMPLETED"


async def test_line_changes_while_checking_out_are_refused_with_a_clear_code(
    temporal_client: Client,
    cache: SnapshotCache,
    settings: Settings,
    run_worker: WorkerFactory,
    gql: GraphQLClient,
) -> None:
    # The account's worker is stopped, so the checkout waits at its withdrawal.
    bank, account_id = await Shop(temporal_client, cache, settings).unserved_account(
        run_worker, 10_000
    )
    a = await restock(gql, 5)
    cart_id = await cart_with(gql, account_id, (a, 1, 100))
    checkout_id = await checkout(gql, cart_id)
    for mutation in [
        f'addCartItem(cartId: $c, sku: "{a}", quantity: 1, unitPrice: 1, wait: true)',
        f'removeCartItem(cartId: $c, sku: "{a}", wait: true)',
        f'setCartItemQuantity(cartId: $c, sku: "{a}", quantity: 3, wait: true)',
        "clearCart(cartId: $c, wait: true)",
    ]:
        code = await gql.error_code(f"mutation($c: ID!) {{ {mutation} {{ status }} }}", c=cart_id)
        assert code == "CHECKOUT_IN_PROGRESS"
    assert await gql.error_code(
        "mutation($c: ID!) { checkoutCart(cartId: $c) { checkoutId } }", c=cart_id
    ) == ("CHECKOUT_IN_PROGRESS")
    running = await checkout_state(gql, checkout_id)
    assert running is not None and running["status"] == "RUNNING"
    async with run_worker(bank.settings):
        assert (await finished(gql, checkout_id))["status"] == "COMPLETED"


async def test_inventory_mutations(gql: GraphQLClient) -> None:
    sku = await restock(gql, 5)

    async def send(mutation: str) -> dict[str, Any]:
        data = await gql.data(
            f"mutation($s: String!) {{ m: {mutation} {{ sku inventoryItem {{ {ITEM} }} }} }}",
            s=sku,
        )
        item: dict[str, Any] = data["m"]["inventoryItem"]
        return item

    item = await send('reserveStock(sku: $s, reservationId: "r1", quantity: 3, wait: true)')
    assert (item["reserved"], item["available"]) == (3, 2)
    item = await send('reserveStock(sku: $s, reservationId: "r1", quantity: 3, wait: true)')
    assert item["reserved"] == 3
    code = await gql.error_code(
        'mutation($s: String!) { reserveStock(sku: $s, reservationId: "r2", quantity: 3, '
        "wait: true) { sku } }",
        s=sku,
    )
    assert code == "INSUFFICIENT_STOCK"
    item = await send('commitReservation(sku: $s, reservationId: "r1", wait: true)')
    assert (item["onHand"], item["sold"], item["available"]) == (2, 3, 2)
    item = await send('returnReservation(sku: $s, reservationId: "r1", wait: true)')
    assert (item["onHand"], item["sold"]) == (5, 0)
    item = await send('reserveStock(sku: $s, reservationId: "r3", quantity: 1, wait: true)')
    item = await send('releaseReservation(sku: $s, reservationId: "r3", wait: true)')
    assert item["available"] == 5
    item = await send('adjustStock(sku: $s, delta: -2, reason: "water damage", wait: true)')
    assert item["onHand"] == 3
    code = await gql.error_code(
        'mutation($s: String!) { adjustStock(sku: $s, delta: -4, reason: "x", wait: true) '
        "{ sku } }",
        s=sku,
    )
    assert code == "INSUFFICIENT_STOCK"
    # An adjustment of nothing is refused at once, not accepted and refused by the item.
    revision = "query($s: String!) { inventoryItem(sku: $s, consistency: LIVE) { revision } }"
    before = (await gql.data(revision, s=sku))["inventoryItem"]
    zero = await gql(
        'mutation($s: String!) { adjustStock(sku: $s, delta: 0, reason: "x") { status } }', s=sku
    )
    assert zero["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
    assert "delta" in zero["errors"][0]["message"]
    await asyncio.sleep(0.5)  # a command accepted would have been applied by now
    assert (await gql.data(revision, s=sku))["inventoryItem"] == before
    data = await gql.data(
        "query($s: String!) { inventoryItem(sku: $s, consistency: LIVE) "
        "{ reservations { reservationId } adjustments { delta reason } } }",
        s=sku,
    )
    assert data["inventoryItem"] == {
        "reservations": [],
        "adjustments": [{"delta": -2, "reason": "water damage"}],
    }


async def test_a_cart_is_only_created_for_an_account_that_is_open(gql: GraphQLClient) -> None:
    create = (
        "mutation($id: ID!, $a: ID!) { createCart(id: $id, accountId: $a, wait: true) { status } }"
    )
    missing, closed = new_id(), await open_account(gql, 0)
    await gql.data("mutation($id: ID!) { closeAccount(id: $id, wait: true) { status } }", id=closed)
    for account_id, code in [(missing, "NOT_FOUND"), (closed, "INVALID_TRANSITION")]:
        cart_id = new_id()
        assert await gql.error_code(create, id=cart_id, a=account_id) == code
        assert (await gql.data("query($id: ID!) { cart(id: $id) { id } }", id=cart_id)) == {
            "cart": None
        }
    assert await gql.error_code(create, id=new_id(), a="not an id") == "INVALID_INPUT"


async def test_a_cart_is_only_for_an_account_in_the_shop_s_currency(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """Prices are in the shop's currency (TENURE_SHOP_CURRENCY), minor units: a JPY
    account's cart paid a 15.00 EUR teapot as 1,500 yen. A cart for an account in another
    currency is refused, and nothing is made."""
    in_euros = settings.model_copy(update={"shop_currency": "EUR"})
    create = (
        "mutation($id: ID!, $a: ID!) { createCart(id: $id, accountId: $a, wait: true) { status } }"
    )
    async with run_worker(in_euros), api_client(in_euros, temporal_client) as http:
        gql = GraphQLClient(http)
        yen = new_id()
        await gql.data(
            """mutation($id: ID!) { openAccount(id: $id, ownerName: "Kei", email: "k@x.io",
               currency: "JPY", wait: true) { status } }""",
            id=yen,
        )
        cart_id = new_id()
        body = await gql(create, id=cart_id, a=yen)
        error = body["errors"][0]
        assert error["extensions"]["code"] == "INVALID_TRANSITION"
        assert "JPY" in error["message"] and "EUR" in error["message"]
        assert (await gql.data("query($id: ID!) { cart(id: $id) { id } }", id=cart_id)) == {
            "cart": None
        }
        euro = await open_account(gql, 0)  # opened in EUR, the default
        assert (await gql.data(create, id=new_id(), a=euro))["createCart"]["status"] == "APPLIED"


def test_the_shop_s_currency_is_an_iso_4217_code() -> None:
    with pytest.raises(ValueError, match="ISO 4217"):
        Settings(shop_currency="euro")
    assert Settings.from_env({"TENURE_SHOP_CURRENCY": "GBP"}).shop_currency == "GBP"


async def test_a_create_retried_after_its_account_closed_still_gets_its_cart(
    gql: GraphQLClient,
) -> None:
    account_id, cart_id = await open_account(gql, 0), new_id()
    create = """mutation($id: ID!, $a: ID!) {
        createCart(id: $id, accountId: $a, idempotencyKey: "cart-once", wait: true) {
          status cart { status revision } } }"""
    first = (await gql.data(create, id=cart_id, a=account_id))["createCart"]
    await gql.data(
        "mutation($id: ID!) { closeAccount(id: $id, wait: true) { status } }", id=account_id
    )
    assert (await gql.data(create, id=cart_id, a=account_id))["createCart"] == first


async def test_unknown_and_malformed_ids(gql: GraphQLClient) -> None:
    assert await checkout_state(gql, f"{new_id()}-1") is None
    data = await gql.data(
        "query($id: ID!, $s: String!) { cart(id: $id) { id } inventoryItem(sku: $s) { sku } }",
        id=new_id(),
        s=new_id(),
    )
    assert data == {"cart": None, "inventoryItem": None}
    for bad in ["no-attempt-x", "bad id-1", "-1"]:
        assert await gql.error_code("query($id: ID!) { checkout(id: $id) { id } }", id=bad) == (
            "INVALID_INPUT"
        )
    assert await gql.error_code(
        'mutation($c: ID!) { addCartItem(cartId: $c, sku: "s", quantity: 1, unitPrice: 1, '
        "wait: true) { status } }",
        c=new_id(),
    ) == ("NOT_FOUND")


async def test_a_finished_checkout_is_read_from_its_history_when_no_worker_answers(
    http: httpx.AsyncClient, run_worker: WorkerFactory
) -> None:
    gql = GraphQLClient(http)
    async with run_worker():
        account_id = await open_account(gql, 1000)
        sku = await restock(gql, 2)
        cart_id = await cart_with(gql, account_id, (sku, 1, 100))
        checkout_id = await checkout(gql, cart_id)
        done = await finished(gql, checkout_id)
    assert await checkout_state(gql, checkout_id) == done


async def test_a_burst_of_creates_makes_no_more_carts_than_an_account_may_have(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """The index shows a cart a moment after it is made: counted from it alone, twenty
    requests of ten creates at once made 40 carts of an account allowed 3."""
    three = secured.model_copy(update={"max_carts_per_account": 3})
    ten = " ".join(f"c{i}: createCart(accountId: $a) {{ cartId }}" for i in range(10))
    async with run_worker(three), api_client(three, temporal_client) as http:
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        account_id = await open_account(GraphQLClient(http), 0)
        http.headers["Authorization"] = f"Bearer {token('customer', 'ada', [account_id])}"
        gql = GraphQLClient(http)
        answers = await asyncio.gather(
            *(gql(f"mutation($a: ID!) {{ {ten} }}", a=account_id) for _ in range(20))
        )
        made = [cart for body in answers for cart in (body["data"] or {}).values() if cart]
        codes = {error["extensions"]["code"] for body in answers for error in body["errors"]}
        listed = "query($a: ID!) { carts(filter: {accountId: $a}) { totalCount } }"
        settled = await eventually(
            lambda: gql.data(listed, a=account_id),
            lambda data: data["carts"]["totalCount"] >= len(made),
        )
    assert 1 <= len(made) <= 3
    assert codes == {"LIMIT_REACHED"}
    assert settled["carts"]["totalCount"] == len(made)


async def test_an_account_of_thousands_of_carts_checked_out_still_has_its_bound(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory, cache: SnapshotCache
) -> None:
    """Past the 2,000 carts a count reads one by one, the index could not tell how many an
    account held not checked out, and the cart was made: a customer with a long history
    could then make carts without end."""
    three = secured.model_copy(update={"max_carts_per_account": 3})
    create = "mutation($a: ID!) { createCart(accountId: $a, wait: true) { cartId } }"
    async with run_worker(three), api_client(three, temporal_client) as http:
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        account_id = await open_account(GraphQLClient(http), 0)
        at = datetime.now(UTC)
        bought = [
            indexed_cart(f"{account_id}-bought-{n}", account_id, at, status="CHECKED_OUT")
            for n in range(2_001)
        ]
        await put_all(cache, bought)
        http.headers["Authorization"] = f"Bearer {token('customer', 'ada', [account_id])}"
        gql = GraphQLClient(http)
        for _ in range(3):
            await gql.data(create, a=account_id)
        assert await gql.error_code(create, a=account_id) == "LIMIT_REACHED"


async def test_an_account_has_only_so_many_carts_not_checked_out(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """Each cart is a workflow that lives until it is checked out: a probe's customer made
    2,610 in 100 s. An account may have only so many at once, its customer told so with
    LIMIT_REACHED; a create retried is still answered by its cart, and another account is
    not held back."""
    three = secured.model_copy(update={"max_carts_per_account": 3})
    create = """mutation($id: ID!, $a: ID!, $key: String) {
        createCart(id: $id, accountId: $a, idempotencyKey: $key, wait: true) {
          status cart { id } } }"""
    async with run_worker(three), api_client(three, temporal_client) as http:
        admin = GraphQLClient(http)
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        account_id, other = await open_account(admin, 0), await open_account(admin, 0)
        # From here on, as the accounts' customer.
        http.headers["Authorization"] = f"Bearer {token('customer', 'ada', [account_id, other])}"
        gql = GraphQLClient(http)
        carts = [new_id() for _ in range(3)]
        for n, cart_id in enumerate(carts):
            await gql.data(create, id=cart_id, a=account_id, key=f"cart-{n}")
        listed = "query($a: ID!) { carts(filter: {accountId: $a}) { totalCount } }"
        await eventually(
            lambda: gql.data(listed, a=account_id),
            lambda data: data["carts"]["totalCount"] == 3,
        )
        assert await gql.error_code(create, id=new_id(), a=account_id) == "LIMIT_REACHED"
        again = await gql.data(create, id=carts[0], a=account_id, key="cart-0")
        assert again["createCart"]["cart"] == {"id": carts[0]}
        await gql.data(create, id=new_id(), a=other)


async def test_a_discarded_cart_frees_its_place_and_takes_no_more_commands(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """An abandoned cart counted towards its account's carts until checked out, and
    `clearCart` revived it rather than freed its place: a customer at the bound could make
    no more carts until it bought something. `discardCart` gives one up for good."""
    three = secured.model_copy(update={"max_carts_per_account": 3})
    create = "mutation($a: ID!) { createCart(accountId: $a, wait: true) { cartId } }"
    discard = """mutation($id: ID!) { discardCart(cartId: $id, wait: true) {
        status cart { status } } }"""
    async with run_worker(three), api_client(three, temporal_client) as http:
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        admin = GraphQLClient(http)
        account_id = await open_account(admin, 1_000)
        sku = await restock(admin, 5)
        http.headers["Authorization"] = f"Bearer {token('customer', 'ada', [account_id])}"
        gql = GraphQLClient(http)
        carts = [(await gql.data(create, a=account_id))["createCart"]["cartId"] for _ in range(3)]
        body = await gql(create, a=account_id)
        assert body["errors"][0]["extensions"]["code"] == "LIMIT_REACHED"
        assert "discard" in body["errors"][0]["message"]

        gone = (await gql.data(discard, id=carts[0]))["discardCart"]
        assert gone == {"status": "APPLIED", "cart": {"status": "DISCARDED"}}
        assert (
            await gql.error_code(
                "mutation($id: ID!, $s: String!) { addCartItem(cartId: $id, sku: $s, quantity: 1, "
                "wait: true) { status } }",
                id=carts[0],
                s=sku,
            )
            == "INVALID_TRANSITION"
        )
        made = await eventually(
            lambda: gql(create, a=account_id), lambda body: not body.get("errors")
        )
        assert made["data"]["createCart"]["cartId"] not in carts

        # Not while checking out: the checkout's lines are the cart's.
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        await admin.data(
            "mutation($id: ID!, $s: String!) { addCartItem(cartId: $id, sku: $s, quantity: 1, "
            "unitPrice: 100, wait: true) { status } }",
            id=carts[1],
            s=sku,
        )
        await checkout(admin, carts[1])
        code = await admin.error_code(discard, id=carts[1])
        assert code == "CHECKOUT_IN_PROGRESS"


async def test_creates_refused_as_input_hold_no_room_for_a_cart(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A create refused for its id, its key or its account id holds none of the account's
    room: each held a cart's place for a minute, and three bad ones left a customer allowed
    three carts unable to make one."""
    three = secured.model_copy(update={"max_carts_per_account": 3})
    create = """mutation($id: ID!, $a: ID!, $key: String) {
        createCart(id: $id, accountId: $a, idempotencyKey: $key, wait: true) {
          cart { id } } }"""
    async with run_worker(three), api_client(three, temporal_client) as http:
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        gql = GraphQLClient(http)
        account_id = await open_account(gql, 0)
        refused = [
            await gql.error_code(create, id="bad id", a=account_id, key=None),
            await gql.error_code(create, id=new_id(), a=account_id, key="a key"),
            await gql.error_code(create, id=new_id(), a=account_id, key="bulk:mine"),
            await gql.error_code(create, id=new_id(), a=account_id, key="x" * 129),
        ]
        assert refused == ["INVALID_INPUT"] * 4
        bad_account = await gql(create, id=new_id(), a="no such id", key=None)
        error = bad_account["errors"][0]
        assert error["extensions"]["code"] == "INVALID_INPUT"
        assert error["message"].startswith("accountId: "), error  # the mutation's name for it
        made = [await gql.data(create, id=new_id(), a=account_id, key=None) for _ in range(3)]
    assert all(data["createCart"]["cart"] for data in made)


async def test_creates_the_entity_refuses_hold_no_room_for_a_cart(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A create refused by the cart itself (its id another account's cart's) held a cart's
    place in the account for a minute: three such left an account allowed three carts
    unable to make one. A refused create gives its place back."""
    three = secured.model_copy(update={"max_carts_per_account": 3})
    create = """mutation($id: ID!, $a: ID!) {
        createCart(id: $id, accountId: $a, wait: true) { cart { id } } }"""
    async with run_worker(three), api_client(three, temporal_client) as http:
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        gql = GraphQLClient(http)
        mine, theirs = await open_account(gql, 0), await open_account(gql, 0)
        taken = [new_id() for _ in range(3)]
        for cart_id in taken:
            await gql.data(create, id=cart_id, a=theirs)
        refused = [await gql.error_code(create, id=cart_id, a=mine) for cart_id in taken]
        assert refused == ["ALREADY_EXISTS"] * 3
        made = [await gql.data(create, id=new_id(), a=mine) for _ in range(3)]
    assert all(data["createCart"]["cart"] for data in made)


async def test_a_create_beside_the_one_that_made_its_cart_keeps_the_cart_s_place(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory, cache: SnapshotCache
) -> None:
    """A create retried without a key, or sent twice at once, is refused ALREADY_EXISTS by
    the cart the other made: it gave back that cart's place, which the index may not show
    yet, and the account could pass its bound by one cart for each such pair."""
    create = """mutation($id: ID!, $a: ID!) {
        createCart(id: $id, accountId: $a, wait: true) { cart { id } } }"""
    async with run_worker(secured), api_client(secured, temporal_client) as http:
        http.headers["Authorization"] = f"Bearer {token('admin', 'ops')}"
        gql = GraphQLClient(http)
        mine = await open_account(gql, 0)
        cart_id = new_id()
        await gql.data(create, id=cart_id, a=mine)
        assert await gql.error_code(create, id=cart_id, a=mine) == "ALREADY_EXISTS"
        made = Creations.of(cache)._key("cart", "account_id", mine)
        assert await cache.client.zscore(made, cart_id) is not None


async def test_a_late_repeat_of_a_checkout_is_answered_with_its_own_checkout(
    gql: GraphQLClient,
) -> None:
    """Its first checkout compensated, the cart checked out again under another key; the
    first key sent again (a client retrying after a timeout) was answered with the second
    checkout's id, and the client followed someone else's order."""
    account_id = await open_account(gql, 10_000)
    short, plenty = await restock(gql, 1), await restock(gql, 5)
    cart_id = await cart_with(gql, account_id, (short, 2, 100))
    send = """mutation($c: ID!, $k: String!) {
      checkoutCart(cartId: $c, idempotencyKey: $k) { checkoutId } }"""
    first = (await gql.data(send, c=cart_id, k=f"first-{cart_id}"))["checkoutCart"]["checkoutId"]
    assert (await finished(gql, first))["status"] == "COMPENSATED"
    await gql.data(
        """mutation($c: ID!, $s: String!) { setCartItemQuantity(cartId: $c, sku: $s,
           quantity: 0, wait: true) { status } }""",
        c=cart_id,
        s=short,
    )
    await gql.data(
        """mutation($c: ID!, $s: String!) { addCartItem(cartId: $c, sku: $s, quantity: 1,
           unitPrice: 100, wait: true) { status } }""",
        c=cart_id,
        s=plenty,
    )
    second = (await gql.data(send, c=cart_id, k=f"second-{cart_id}"))["checkoutCart"]
    assert (await finished(gql, second["checkoutId"]))["status"] == "COMPLETED"
    again = (await gql.data(send, c=cart_id, k=f"first-{cart_id}"))["checkoutCart"]
    assert (first, second["checkoutId"], again["checkoutId"]) == (
        f"{cart_id}-1",
        f"{cart_id}-2",
        f"{cart_id}-1",
    )


async def test_a_checkout_its_cart_is_taking_is_never_answered_as_never_made(
    http: httpx.AsyncClient,
    temporal_client: Client,
    run_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """checkoutCart answers once the cart has taken it; Temporal makes the checkout a moment
    later, and a read in between was answered null, "never existed" (3 of 30 reads straight
    after the answer, in a review's probe). Here the moment is made long: the worker stops
    with the cart taking its checkout, and the checkout is deleted. The read waits for it,
    then answers UNAVAILABLE, never null; an attempt the cart never made is null."""
    gql = GraphQLClient(http)
    async with run_worker():
        account_id = await open_account(gql, 10_000)
        sku = await restock(gql, 5)
        cart_id = await cart_with(gql, account_id, (sku, 1, 100))
        checkout_id = await checkout(gql, cart_id)
    handle = temporal_client.get_workflow_handle(checkout_workflow_id(checkout_id))
    await temporal_client.workflow_service.delete_workflow_execution(
        DeleteWorkflowExecutionRequest(
            namespace=temporal_client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=handle.id),
        )
    )

    async def gone() -> bool:
        try:
            await handle.describe()
        except RPCError as exc:
            return exc.status is RPCStatusCode.NOT_FOUND
        return False

    await eventually(gone, bool, 90)
    asked: list[str] = []
    read_workflow = EntityGateway.read_workflow

    async def counted(self: EntityGateway, workflow_id: str, *args: Any) -> Any:
        asked.append(workflow_id)
        return await read_workflow(self, workflow_id, *args)

    monkeypatch.setattr(EntityGateway, "read_workflow", counted)
    query = "query($id: ID!) { checkout(id: $id) { status } }"
    assert await gql.error_code(query, id=checkout_id) == "UNAVAILABLE"
    assert len(asked) == 1 + len(STARTING_PAUSES)
    # Its waits are not charged to the request's LIVE reads: aliases do not multiply them.
    asked.clear()
    aliases = "query($id: ID!) { a: checkout(id: $id) { status } b: checkout(id: $id) { status }"
    body = await gql(aliases + " c: checkout(id: $id) { status } }", id=checkout_id)
    assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAVAILABLE"] * 3
    assert len(asked) == 3 + len(STARTING_PAUSES)
    assert (await gql.data(query, id=f"{cart_id}-9"))["checkout"] is None
