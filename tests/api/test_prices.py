"""What a cart line costs: the item's own price for a customer, whatever it sends; staff and
services may name another. A customer once named the price and bought any item for 1 minor
unit."""

from __future__ import annotations

import httpx

from entities.errors import ErrorCode
from tests.api.test_access import CREATE_CART, OPEN, VERIFY, Caller, token
from tests.conftest import new_id
from tests.entities.shop import eventually

RESTOCK = """mutation($sku: String!, $price: Long) {
  restock(sku: $sku, quantity: 10, name: "Pot", unitPrice: $price, wait: true) { commandId } }"""
ADD = """mutation($id: ID!, $sku: String!, $price: Long) {
  addCartItem(cartId: $id, sku: $sku, quantity: 2, unitPrice: $price, wait: true)
  { cart { lines { sku unitPrice } total } } }"""
DEPOSIT = """mutation($id: ID!) { depositToAccount(id: $id, amount: 10000, wait: true)
  { commandId } }"""
CHECKOUT = "mutation($id: ID!) { checkoutCart(cartId: $id) { checkoutId } }"
ORDER = "query($id: ID!) { checkout(id: $id) { status total } }"
BALANCE = "query($id: ID!) { account(id: $id, consistency: LIVE) { balance } }"
ITEM = "query($sku: String!) { inventoryItem(sku: $sku, consistency: LIVE) { unitPrice } }"
LINES = "query($id: ID!) { cart(id: $id, consistency: LIVE) { lines { sku unitPrice } } }"
SET_PRICE = """mutation($sku: String!, $price: Long!) {
  setPrice(sku: $sku, unitPrice: $price, wait: true) { inventoryItem { unitPrice onHand } } }"""


async def _shop(http: httpx.AsyncClient) -> tuple[Caller, Caller, str, str]:
    """Staff, and a customer with an account of 10,000 and an open cart."""
    admin = Caller(http, token("admin", "ops"))
    account, cart = new_id(), new_id()
    await admin.data(OPEN, id=account)
    await admin.data(VERIFY, id=account)
    await admin.data(DEPOSIT, id=account)
    await admin.data(CREATE_CART, id=cart, account=account)
    # A customer of its own: the rate limits are per principal, and every test of the session
    # shares one Redis prefix (a shared "ada" ran out of requests in a fast run).
    return admin, Caller(http, token("customer", f"ada-{account}", [account])), account, cart


async def test_a_customer_pays_the_item_s_price_whatever_it_sends(
    secured_http: httpx.AsyncClient,
) -> None:
    admin, ada, account, cart = await _shop(secured_http)
    sku = new_id()
    await admin.data(RESTOCK, sku=sku, price=300)
    assert (await admin.data(ITEM, sku=sku))["inventoryItem"] == {"unitPrice": 300}

    assert await ada.code(ADD, id=cart, sku=sku, price=1) == ErrorCode.INVALID_INPUT
    assert (await admin.data(LINES, id=cart))["cart"]["lines"] == []  # nothing stored
    added = (await ada.data(ADD, id=cart, sku=sku, price=None))["addCartItem"]["cart"]
    assert added == {"lines": [{"sku": sku, "unitPrice": 300}], "total": 600}

    checkout_id = (await ada.data(CHECKOUT, id=cart))["checkoutCart"]["checkoutId"]
    order = await eventually(
        lambda: ada.data(ORDER, id=checkout_id),
        lambda d: d["checkout"] is not None and d["checkout"]["status"] == "COMPLETED",
    )
    assert order["checkout"]["total"] == 600
    assert (await ada.data(BALANCE, id=account))["account"]["balance"] == 10000 - 600


async def test_an_item_without_a_price_is_not_for_customers(
    secured_http: httpx.AsyncClient,
) -> None:
    admin, ada, _, cart = await _shop(secured_http)
    sku = new_id()
    await admin.data(RESTOCK, sku=sku, price=None)
    for price in (None, 5):
        assert await ada.code(ADD, id=cart, sku=sku, price=price) == ErrorCode.INVALID_TRANSITION
    assert await ada.code(ADD, id=cart, sku=new_id(), price=None) == ErrorCode.NOT_FOUND
    # A restock that names one puts it on sale; one that does not leaves the price as it is.
    await admin.data(RESTOCK, sku=sku, price=250)
    await admin.data(RESTOCK, sku=sku, price=None)
    added = (await ada.data(ADD, id=cart, sku=sku, price=250))["addCartItem"]["cart"]
    assert added["lines"] == [{"sku": sku, "unitPrice": 250}]


async def test_staff_and_services_may_name_a_price(secured_http: httpx.AsyncClient) -> None:
    admin, _, _, cart = await _shop(secured_http)
    priced, unpriced = new_id(), new_id()
    await admin.data(RESTOCK, sku=priced, price=300)
    await admin.data(RESTOCK, sku=unpriced, price=None)
    await admin.data(ADD, id=cart, sku=priced, price=None)  # the item's
    shop = Caller(secured_http, token("service", "shop", scope="cart:addCartItem"))
    await shop.data(ADD, id=cart, sku=unpriced, price=99)  # a discount, or no list price
    assert await shop.code(ADD, id=cart, sku=new_id(), price=None) == ErrorCode.NOT_FOUND
    lines = (await admin.data(LINES, id=cart))["cart"]["lines"]
    assert sorted((line["sku"], line["unitPrice"]) for line in lines) == sorted(
        [(priced, 300), (unpriced, 99)]
    )


async def test_staff_set_a_price_without_touching_the_stock(
    secured_http: httpx.AsyncClient,
) -> None:
    """A price changed only with a restock, which takes at least one unit."""
    admin, ada, account, cart = await _shop(secured_http)
    sku = new_id()
    await admin.data(RESTOCK, sku=sku, price=300)
    await ada.data(ADD, id=cart, sku=sku, price=None)
    assert await ada.code(SET_PRICE, sku=sku, price=1) == ErrorCode.FORBIDDEN
    assert await admin.code(SET_PRICE, sku=sku, price=0) == ErrorCode.INVALID_INPUT
    item = (await admin.data(SET_PRICE, sku=sku, price=250))["setPrice"]["inventoryItem"]
    assert item == {"unitPrice": 250, "onHand": 10}
    # Lines already in carts keep their price; new ones take the new one.
    lines = (await admin.data(LINES, id=cart))["cart"]["lines"]
    assert lines == [{"sku": sku, "unitPrice": 300}]
    other = new_id()
    await admin.data(CREATE_CART, id=other, account=account)
    added = (await ada.data(ADD, id=other, sku=sku, price=None))["addCartItem"]["cart"]
    assert added["lines"] == [{"sku": sku, "unitPrice": 250}]


async def test_more_units_of_a_line_cost_the_item_s_price_now(
    secured_http: httpx.AsyncClient,
) -> None:
    """A line staff priced for one unit, or one added before the price rose, was raised to a
    hundred units at its old price by the customer."""
    admin, ada, _, cart = await _shop(secured_http)
    sku = new_id()
    await admin.data(RESTOCK, sku=sku, price=300)
    set_quantity = """mutation($id: ID!, $sku: String!, $quantity: Int!) {
      setCartItemQuantity(cartId: $id, sku: $sku, quantity: $quantity, wait: true)
      { cart { lines { sku quantity unitPrice } total } } }"""

    async def quantity(caller: Caller, units: int) -> dict[str, object]:
        data = await caller.data(set_quantity, id=cart, sku=sku, quantity=units)
        cart_now: dict[str, object] = data["setCartItemQuantity"]["cart"]
        return cart_now

    await admin.data(ADD, id=cart, sku=sku, price=99)  # a discount for two
    assert await quantity(admin, 3) == {  # staff keep it
        "lines": [{"sku": sku, "quantity": 3, "unitPrice": 99}],
        "total": 297,
    }
    assert await quantity(ada, 100) == {
        "lines": [{"sku": sku, "quantity": 100, "unitPrice": 300}],
        "total": 30000,
    }
    # Fewer units keep the line's price, risen since or not.
    await admin.data(RESTOCK, sku=sku, price=400)
    assert await quantity(ada, 2) == {
        "lines": [{"sku": sku, "quantity": 2, "unitPrice": 300}],
        "total": 600,
    }
    assert await quantity(ada, 0) == {"lines": [], "total": 0}


async def test_a_retry_under_its_key_after_the_price_changed_is_the_same_command(
    secured_http: httpx.AsyncClient,
) -> None:
    """The price a customer's line takes is filled in by the API: a retry of the same
    mutation under its key, after the price changed, was refused IDEMPOTENCY_KEY_REUSED,
    "this one was not applied: send it with a new key", and a client that did so added the
    units twice."""
    admin, ada, _, cart = await _shop(secured_http)
    sku = new_id()
    await admin.data(RESTOCK, sku=sku, price=300)
    keyed_add = """mutation($id: ID!, $sku: String!) {
      addCartItem(cartId: $id, sku: $sku, quantity: 2, idempotencyKey: "add-1", wait: true)
      { cart { lines { sku quantity unitPrice } } } }"""
    keyed_set = """mutation($id: ID!, $sku: String!) {
      setCartItemQuantity(cartId: $id, sku: $sku, quantity: 5, idempotencyKey: "set-1",
        wait: true) { cart { lines { sku quantity unitPrice } } } }"""
    for mutation, field, price in ((keyed_add, "addCartItem", 350), (keyed_set, None, 360)):
        first = await ada.data(mutation, id=cart, sku=sku)
        await admin.data(SET_PRICE, sku=sku, price=price)
        again = await ada.data(mutation, id=cart, sku=sku)
        assert again == first, field  # answered as the first, not applied again
    # Raised to 5 at 350, the price then; its retry at 360 changed nothing.
    lines = (await admin.data(LINES, id=cart))["cart"]["lines"]
    assert lines == [{"sku": sku, "unitPrice": 350}]
    assert (await admin.data(QUANTITY, id=cart))["cart"]["lines"][0]["quantity"] == 5


async def test_a_retry_naming_the_price_it_was_first_sent_at_is_the_same_command(
    secured_http: httpx.AsyncClient,
) -> None:
    """A customer may name the price it saw (it must be the item's): its retry under the
    same key after a price change was refused INVALID_INPUT, "costs 360; leave unitPrice
    out", though the first was applied, and a client that took that for "not applied" and
    sent it under a new key added the units twice. A new command naming an old price is
    still refused."""
    admin, ada, _, cart = await _shop(secured_http)
    sku = new_id()
    await admin.data(RESTOCK, sku=sku, price=300)
    add = """mutation($id: ID!, $sku: String!, $key: String!) {
      addCartItem(cartId: $id, sku: $sku, quantity: 2, unitPrice: 300, idempotencyKey: $key,
        wait: true) { cart { lines { sku quantity unitPrice } } } }"""
    first = await ada.data(add, id=cart, sku=sku, key="priced-1")
    await admin.data(SET_PRICE, sku=sku, price=360)
    assert await ada.data(add, id=cart, sku=sku, key="priced-1") == first
    body = (await ada.post(add, id=cart, sku=sku, key="priced-2")).json()
    assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
    assert "costs 360" in body["errors"][0]["message"]
    lines = (await admin.data(LINES, id=cart))["cart"]["lines"]
    assert lines == [{"sku": sku, "unitPrice": 300}]


async def test_a_customer_lowers_a_line_whose_item_has_no_price(
    secured_http: httpx.AsyncClient,
) -> None:
    """A line staff priced, of an item with no list price (or none at all): the customer's
    lower quantity was refused for the price it did not need."""
    admin, ada, _, cart = await _shop(secured_http)
    unpriced, gone = new_id(), new_id()
    await admin.data(RESTOCK, sku=unpriced, price=None)
    for sku in (unpriced, gone):
        await admin.data(ADD3, id=cart, sku=sku, price=99)
    set_quantity = """mutation($id: ID!, $sku: String!, $quantity: Int!) {
      setCartItemQuantity(cartId: $id, sku: $sku, quantity: $quantity, wait: true)
      { cart { lines { sku quantity unitPrice } } } }"""
    for sku in (unpriced, gone):
        lowered = await ada.data(set_quantity, id=cart, sku=sku, quantity=1)
        line = next(x for x in lowered["setCartItemQuantity"]["cart"]["lines"] if x["sku"] == sku)
        assert line == {"sku": sku, "quantity": 1, "unitPrice": 99}
        # More units need a price it has not: refused, the line as it was.
        raised = await ada.code(set_quantity, id=cart, sku=sku, quantity=9)
        assert raised == ErrorCode.INVALID_TRANSITION
    assert await ada.code(set_quantity, id=cart, sku=new_id(), quantity=1) == ErrorCode.NOT_FOUND
    lines = (await admin.data(QUANTITY, id=cart))["cart"]["lines"]
    assert sorted(line["quantity"] for line in lines) == [1, 1]


QUANTITY = "query($id: ID!) { cart(id: $id, consistency: LIVE) { lines { sku quantity } } }"
ADD3 = """mutation($id: ID!, $sku: String!, $price: Long) {
  addCartItem(cartId: $id, sku: $sku, quantity: 3, unitPrice: $price, wait: true)
  { commandId } }"""


async def test_a_customer_s_malformed_sku_is_named_as_such(
    secured_http: httpx.AsyncClient,
) -> None:
    """The item is looked up for a customer's line, and a malformed sku was refused as "an
    id is 1 to 128 letters...", which a client took for its cart's id."""
    _, ada, _, cart = await _shop(secured_http)
    add = """mutation($id: ID!) { addCartItem(cartId: $id, sku: "tea pot", quantity: 1,
        wait: true) { status } }"""
    error = (await ada.post(add, id=cart)).json()["errors"][0]
    assert error["extensions"]["code"] == "INVALID_INPUT"
    assert error["message"].startswith("sku: ")


ADD_UNITS = """mutation($id: ID!, $sku: String!, $quantity: Int!, $price: Long) {
  addCartItem(cartId: $id, sku: $sku, quantity: $quantity, unitPrice: $price, wait: true)
  { status } }"""
SET_UNITS = """mutation($id: ID!, $sku: String!, $quantity: Int!) {
  setCartItemQuantity(cartId: $id, sku: $sku, quantity: $quantity, wait: true) { status } }"""


async def test_a_line_worth_more_than_a_cart_may_total_is_refused_with_nothing_stored(
    secured_http: httpx.AsyncClient,
) -> None:
    """10,000 units at 5 x 10^11 is 5 x 10^15, over the 10^15 a cart may total and its
    checkout may charge: refused as bad input before the cart takes it, where it was
    accepted and then refused inside the cart (LIMIT_REACHED), seen only in its history. A
    customer's line at the item's price is refused so too."""
    admin, ada, _, cart = await _shop(secured_http)
    sku = new_id()
    price = 5 * 10**11
    await admin.data(RESTOCK, sku=sku, price=price)
    too_much = {"id": cart, "sku": sku, "quantity": 10_000, "price": price}
    assert await admin.code(ADD_UNITS, **too_much) == ErrorCode.INVALID_INPUT
    assert await ada.code(ADD_UNITS, **{**too_much, "price": None}) == ErrorCode.INVALID_INPUT
    assert (await admin.data(LINES, id=cart))["cart"]["lines"] == []
    await ada.data(ADD_UNITS, id=cart, sku=sku, quantity=2000, price=None)  # 10^15: room
    # The price doubled: fewer units keep the line's own, and the cart takes them (the edge
    # cannot tell a fall from a rise, and leaves setCartItemQuantity to the cart).
    await admin.data(SET_PRICE, sku=sku, price=2 * price)
    assert await ada.code(SET_UNITS, id=cart, sku=sku, quantity=1500) is None
    assert (await admin.data(LINES, id=cart))["cart"]["lines"] == [{"sku": sku, "unitPrice": price}]


async def test_a_customer_s_quantity_out_of_bounds_is_bad_input_whatever_the_item(
    secured_http: httpx.AsyncClient,
) -> None:
    """Refused for what it is, before the item is looked up: it was NOT_FOUND for an item
    that does not exist, and INVALID_TRANSITION for one with no price."""
    admin, ada, _, cart = await _shop(secured_http)
    unpriced = new_id()
    await admin.data(RESTOCK, sku=unpriced, price=None)
    for sku in (new_id(), unpriced):
        for quantity in (0, -1, 10_001):
            code = await ada.code(ADD_UNITS, id=cart, sku=sku, quantity=quantity, price=None)
            assert code == ErrorCode.INVALID_INPUT, (sku, quantity)
