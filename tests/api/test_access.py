"""Who may do what, as callers meet it over HTTP: every read and every mutation against every
kind of caller, each allowed or refused with FORBIDDEN; no token, 401."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast
from unittest.mock import ANY

import httpx
import jwt
import pytest
from temporalio.client import Client

from api.app import create_app
from api.authorization import Authorizer, Forbidden
from api.gateway import EntityGateway
from entities import catalog
from entities.errors import ErrorCode
from entities.runtime.policy import Policy, Principal, Role
from tests.conftest import WorkerFactory, api_client, new_id, start_over
from tests.entities.shop import eventually
from workers.settings import Settings

SECRET = "test-secret-" + "x" * 32


@pytest.fixture
def secured(settings: Settings) -> Settings:
    """This module's settings in production, verifying tokens, with no rate limits: its
    callers send more than a customer's burst in a second (the limits have tests of their
    own, in test_rate_limits.py)."""
    return settings.model_copy(
        update={"environment": "production", "auth_secret": SECRET, "rate_limits": {}}
    )


def token(role: str, sub: str, accounts: list[str] = [], scope: str = "") -> str:  # noqa: B006
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "iss": "tenure",
        "aud": "tenure-api",
        "iat": now,
        "exp": now + 600,
        "roles": [role],
        "accounts": accounts,
        "scope": scope,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Caller:
    def __init__(self, http: httpx.AsyncClient, bearer: str | None) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}

    async def post(self, query: str, **variables: Any) -> httpx.Response:
        return await self.http.post(
            "/graphql", json={"query": query, "variables": variables}, headers=self.headers
        )

    async def code(self, query: str, **variables: Any) -> str | None:
        """The first error's code, None when the request succeeded."""
        body = (await self.post(query, **variables)).json()
        errors = body.get("errors")
        return errors[0]["extensions"]["code"] if errors else None

    async def data(self, query: str, **variables: Any) -> dict[str, Any]:
        body = (await self.post(query, **variables)).json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data


OPEN = """mutation($id: ID!) { openAccount(id: $id, ownerName: "A", email: "a@b.cc", wait: true)
  { commandId } }"""
VERIFY = "mutation($id: ID!) { verifyAccount(id: $id, wait: true) { commandId } }"
DEPOSIT = """mutation($id: ID!) { depositToAccount(id: $id, amount: 100, wait: true)
  { commandId } }"""
WITHDRAW = """mutation($id: ID!) { withdrawFromAccount(id: $id, amount: 1, wait: true)
  { commandId } }"""
SUSPEND = "mutation($id: ID!) { suspendAccount(id: $id, wait: true) { commandId } }"
REACTIVATE = "mutation($id: ID!) { reactivateAccount(id: $id, wait: true) { commandId } }"
CLOSE = "mutation($id: ID!) { closeAccount(id: $id, wait: true) { commandId } }"
READ_ACCOUNT = "query($id: ID!) { account(id: $id) { balance revision } }"
READ_HISTORY = "query($id: ID!) { account(id: $id) { history(last: 5) { hasOlder } } }"
READ_CART_HISTORY = "query($id: ID!) { cart(id: $id) { history { hasOlder } } }"
READ_ACCOUNT_LIVE = "query($id: ID!) { account(id: $id, consistency: LIVE) { revision } }"
CREATE_CART = """mutation($id: ID!, $account: ID!) { createCart(id: $id, accountId: $account,
  wait: true) { commandId } }"""
ADD = """mutation($id: ID!, $sku: String!) { addCartItem(cartId: $id, sku: $sku, quantity: 1,
  unitPrice: 10, wait: true) { commandId } }"""
REMOVE = """mutation($id: ID!, $sku: String!) { removeCartItem(cartId: $id, sku: $sku,
  wait: true) { commandId } }"""
SET_QUANTITY = """mutation($id: ID!, $sku: String!) { setCartItemQuantity(cartId: $id, sku: $sku,
  quantity: 2, wait: true) { commandId } }"""
CLEAR = "mutation($id: ID!) { clearCart(cartId: $id, wait: true) { commandId } }"
CHECKOUT = "mutation($id: ID!) { checkoutCart(cartId: $id) { checkoutId } }"
READ_CART = "query($id: ID!) { cart(id: $id) { status } }"
READ_CHECKOUT = "query($id: ID!) { checkout(id: $id) { status } }"
RESTOCK = """mutation($sku: String!) { restock(sku: $sku, quantity: 5, name: "Pot", unitPrice: 10,
  wait: true) { commandId } }"""
ADJUST = """mutation($sku: String!) { adjustStock(sku: $sku, delta: -1, reason: "chipped",
  wait: true) { commandId } }"""
SET_PRICE = """mutation($sku: String!) { setPrice(sku: $sku, unitPrice: 10, wait: true)
  { commandId } }"""
RESERVE = """mutation($sku: String!) { reserveStock(sku: $sku, reservationId: "r1", quantity: 1,
  wait: true) { commandId } }"""
RELEASE = """mutation($sku: String!) { releaseReservation(sku: $sku, reservationId: "r1",
  wait: true) { commandId } }"""
COMMIT = """mutation($sku: String!) { commitReservation(sku: $sku, reservationId: "r1",
  wait: true) { commandId } }"""
RETURN = """mutation($sku: String!) { returnReservation(sku: $sku, reservationId: "r1",
  wait: true) { commandId } }"""
READ_ITEM = "query($sku: String!) { inventoryItem(sku: $sku) { onHand } }"
READ_ITEM_HISTORY = """query($sku: String!) { inventoryItem(sku: $sku) { history(last: 5)
  { hasOlder } } }"""
LIST_FAILED_CHECKOUTS = "{ checkouts(filter: {status: FAILED}) { totalCount } }"
RETRY_CHECKOUT = """mutation($id: ID!) { retryCheckoutCompensations(id: $id, reason: "r")
  { status } }"""
RESOLVE_CHECKOUT = """mutation($id: ID!) { resolveCheckout(id: $id, reason: "r") { status } }"""
START_BULK = """mutation($key: String!, $ids: [ID!]) { startBulkCommand(entityType: "account",
  command: "deposit", payload: {amount: 1}, ids: $ids, idempotencyKey: $key) { id } }"""
READ_BULK = "query($id: ID!) { bulkCommand(id: $id) { status done } }"
PAUSE_BULK = "mutation($id: ID!) { pauseBulkCommand(id: $id) { status } }"
RESUME_BULK = "mutation($id: ID!) { resumeBulkCommand(id: $id) { status } }"
CANCEL_BULK = "mutation($id: ID!) { cancelBulkCommand(id: $id) { status } }"
LIST_BULKS = "{ bulkCommands(first: 5) { edges { node { id } } } }"
LIST_ACCOUNTS = "{ accounts(first: 5) { edges { node { id } } } }"
LIST_CARTS = "{ carts(first: 5) { edges { node { id } } } }"
LIST_ITEMS = "{ inventoryItems(first: 5) { edges { node { sku } } } }"
ACCOUNT_STATS = "{ accountStats { total } }"
CART_STATS = "{ cartStats { total } }"
ITEM_STATS = "{ inventoryStats { total } }"
LIST_SUBSCRIBERS = "{ webhookSubscribers { id } }"
DEAD_LETTERS = '{ webhookDeadLetters(subscriberId: "wh_0000000000000000") { hasMore } }'
# An address the API refuses (an admin gets INVALID_INPUT): nothing is registered.
REGISTER_SUBSCRIBER = """mutation { registerWebhookSubscriber(url: "not a url",
  events: {account: ["deposit"]}) { secret } }"""
REMOVE_SUBSCRIBER = 'mutation { removeWebhookSubscriber(id: "wh_0000000000000000") }'
REPLAY_DEAD_LETTER = """mutation { replayWebhookDeadLetter(subscriberId: "wh_0000000000000000",
  id: "1-0") }"""
REPLAY_DEAD_LETTERS = """mutation {
  replayWebhookDeadLetters(subscriberId: "wh_0000000000000000") }"""

# The words, as a table: for each kind of caller, what it may do. Customers own the
# account "mine" (and so its cart); "theirs" is another customer's.
ADMIN, SERVICE, STOCKIST, CUSTOMER, STRANGER = (
    "admin",
    "service account:* read:*",
    "service inventory:*",
    "customer of mine",
    "customer of theirs",
)
CALLERS = [ADMIN, SERVICE, STOCKIST, CUSTOMER, STRANGER]

Case = tuple[str, str, Callable[[dict[str, str]], dict[str, Any]], set[str]]
CASES: list[Case] = [
    ("read my account", READ_ACCOUNT, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE, CUSTOMER}),
    ("read it live", READ_ACCOUNT_LIVE, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE, CUSTOMER}),
    ("read my history", READ_HISTORY, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE, CUSTOMER}),
    ("read their history", READ_HISTORY, lambda e: {"id": e["theirs"]}, {ADMIN, SERVICE, STRANGER}),
    ("read their account", READ_ACCOUNT, lambda e: {"id": e["theirs"]}, {ADMIN, SERVICE, STRANGER}),
    ("open an account", OPEN, lambda e: {"id": new_id()}, {ADMIN, SERVICE}),
    ("verify", VERIFY, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE}),
    ("deposit", DEPOSIT, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE, CUSTOMER}),
    ("withdraw", WITHDRAW, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE, CUSTOMER}),
    ("suspend", SUSPEND, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE}),
    ("reactivate", REACTIVATE, lambda e: {"id": e["mine"]}, {ADMIN, SERVICE}),
    ("close", CLOSE, lambda e: {"id": e["spare"]}, {ADMIN, SERVICE}),
    ("read my cart", READ_CART, lambda e: {"id": e["cart"]}, {ADMIN, SERVICE, CUSTOMER}),
    (
        "read my cart's history",
        READ_CART_HISTORY,
        lambda e: {"id": e["cart"]},
        {ADMIN, SERVICE, CUSTOMER},
    ),
    (
        "create a cart for my account",
        CREATE_CART,
        lambda e: {"id": new_id(), "account": e["mine"]},
        {ADMIN, CUSTOMER},
    ),
    ("add an item", ADD, lambda e: {"id": e["cart"], "sku": e["sku"]}, {ADMIN, CUSTOMER}),
    (
        "set its quantity",
        SET_QUANTITY,
        lambda e: {"id": e["cart"], "sku": e["sku"]},
        {ADMIN, CUSTOMER},
    ),
    ("remove it", REMOVE, lambda e: {"id": e["cart"], "sku": e["sku"]}, {ADMIN, CUSTOMER}),
    ("clear the cart", CLEAR, lambda e: {"id": e["cart"]}, {ADMIN, CUSTOMER}),
    ("check it out", CHECKOUT, lambda e: {"id": e["cart"]}, {ADMIN, CUSTOMER}),
    (
        "read its checkout",
        READ_CHECKOUT,
        lambda e: {"id": f"{e['cart']}-1"},
        {ADMIN, SERVICE, CUSTOMER},
    ),
    ("read stock", READ_ITEM, lambda e: {"sku": e["sku"]}, set(CALLERS)),
    # An item's commands name the carts and checkouts that reserved it: not a customer's.
    (
        "read stock's history",
        READ_ITEM_HISTORY,
        lambda e: {"sku": e["sku"]},
        {ADMIN, SERVICE, STOCKIST},
    ),
    ("restock", RESTOCK, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    ("adjust stock", ADJUST, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    ("set a price", SET_PRICE, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    ("reserve stock", RESERVE, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    ("commit it", COMMIT, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    ("return it", RETURN, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    ("release it", RELEASE, lambda e: {"sku": e["sku"]}, {ADMIN, STOCKIST}),
    # Operator tools: admins alone, whatever a service's scopes.
    ("list failed checkouts", LIST_FAILED_CHECKOUTS, lambda e: {}, {ADMIN}),
    ("retry a checkout", RETRY_CHECKOUT, lambda e: {"id": f"{e['cart']}-1"}, {ADMIN}),
    ("resolve a checkout", RESOLVE_CHECKOUT, lambda e: {"id": f"{e['cart']}-1"}, {ADMIN}),
    (
        "deposit to many accounts at once",
        START_BULK,
        lambda e: {"key": new_id(), "ids": [e["mine"]]},
        {ADMIN, SERVICE},
    ),
    # An operator's bulk command: a service acts on its own only (tests/api/test_bulk_api.py).
    ("read a bulk command", READ_BULK, lambda e: {"id": e["bulk"]}, {ADMIN}),
    ("pause it", PAUSE_BULK, lambda e: {"id": e["bulk"]}, {ADMIN}),
    ("resume it", RESUME_BULK, lambda e: {"id": e["bulk"]}, {ADMIN}),
    ("list bulk commands", LIST_BULKS, lambda e: {}, {ADMIN}),
    # Lists: customers see their own entities only; counts span every entity, so only
    # callers who may read them all get them.
    ("list accounts", LIST_ACCOUNTS, lambda e: {}, {ADMIN, SERVICE, CUSTOMER, STRANGER}),
    ("list carts", LIST_CARTS, lambda e: {}, {ADMIN, SERVICE, CUSTOMER, STRANGER}),
    ("list stock", LIST_ITEMS, lambda e: {}, set(CALLERS)),
    ("count accounts", ACCOUNT_STATS, lambda e: {}, {ADMIN, SERVICE}),
    ("count carts", CART_STATS, lambda e: {}, {ADMIN, SERVICE}),
    ("count stock", ITEM_STATS, lambda e: {}, set(CALLERS)),
    # Outbound webhooks: admins alone.
    ("list webhook subscribers", LIST_SUBSCRIBERS, lambda e: {}, {ADMIN}),
    ("read dead letters", DEAD_LETTERS, lambda e: {}, {ADMIN}),
    ("register a subscriber", REGISTER_SUBSCRIBER, lambda e: {}, {ADMIN}),
    ("remove a subscriber", REMOVE_SUBSCRIBER, lambda e: {}, {ADMIN}),
    ("replay a dead letter", REPLAY_DEAD_LETTER, lambda e: {}, {ADMIN}),
    ("replay dead letters", REPLAY_DEAD_LETTERS, lambda e: {}, {ADMIN}),
    # Last: a cancelled bulk command is over.
    ("cancel it", CANCEL_BULK, lambda e: {"id": e["bulk"]}, {ADMIN}),
]


def callers(http: httpx.AsyncClient, entities: dict[str, str]) -> dict[str, Caller]:
    return {
        ADMIN: Caller(http, token("admin", "ops-1")),
        SERVICE: Caller(http, token("service", "billing", scope="account:* read:*")),
        STOCKIST: Caller(http, token("service", "warehouse", scope="inventory:*")),
        CUSTOMER: Caller(http, token("customer", "ada", [entities["mine"]])),
        STRANGER: Caller(http, token("customer", "bob", [entities["theirs"]])),
    }


async def setup(admin: Caller) -> dict[str, str]:
    entities = {k: new_id() for k in ("mine", "theirs", "spare", "cart", "sku")}
    for account in ("mine", "theirs", "spare"):
        await admin.data(OPEN, id=entities[account])
        await admin.data(VERIFY, id=entities[account])
    await admin.data(RESTOCK, sku=entities["sku"])
    await admin.data(CREATE_CART, id=entities["cart"], account=entities["mine"])
    entities["bulk"] = new_id()
    await admin.data(START_BULK, key=entities["bulk"], ids=[entities["theirs"]])
    return entities


@pytest.mark.parametrize("caller", CALLERS)
async def test_every_read_and_mutation_is_allowed_or_forbidden_by_role(
    secured_http: httpx.AsyncClient, caller: str
) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    who = callers(secured_http, entities)[caller]
    outcomes = {}
    for name, document, variables, allowed in CASES:
        code = await who.code(document, **variables(entities))
        outcomes[name] = code
        if caller in allowed:
            assert code not in (ErrorCode.FORBIDDEN, ErrorCode.UNAUTHENTICATED), (name, code)
        else:
            assert code == ErrorCode.FORBIDDEN, (name, code)
    # Allowed commands did run: the matrix is not all refusals.
    assert any(code is None for code in outcomes.values()), outcomes


async def test_a_refusal_does_not_tell_whether_the_entity_exists(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    stranger = callers(secured_http, entities)[STRANGER]
    for cart_id in (entities["cart"], new_id()):  # someone's cart, and no cart at all
        assert await stranger.code(READ_CART, id=cart_id) == ErrorCode.FORBIDDEN
        assert await stranger.code(CLEAR, id=cart_id) == ErrorCode.FORBIDDEN
    for account_id in (entities["mine"], new_id()):
        assert await stranger.code(READ_ACCOUNT, id=account_id) == ErrorCode.FORBIDDEN
        assert await stranger.code(CREATE_CART, id=new_id(), account=account_id) == "FORBIDDEN"


async def test_a_service_that_may_not_read_accounts_learns_only_why_codes_a_cart_is_refused(
    secured_http: httpx.AsyncClient,
) -> None:
    """createCart's account checks worded the account's state (closed, its currency, its
    count of open carts) to a service scoped to `cart:createCart` alone."""
    admin = Caller(secured_http, token("admin", "setup"))
    maker = Caller(secured_http, token("service", "carts", scope="cart:createCart"))
    reader = Caller(secured_http, token("service", "carts", scope="cart:createCart read:account"))
    closed = new_id()
    for mutation in (OPEN, VERIFY, CLOSE):
        await admin.data(mutation, id=closed)
    for caller, shown in ((maker, False), (reader, True)):
        body = (await caller.post(CREATE_CART, id=new_id(), account=closed)).json()
        error = body["errors"][0]
        assert error["extensions"]["code"] == ErrorCode.INVALID_TRANSITION, body
        assert ("is closed" in error["message"]) is shown, body
    # Whether it exists is the code's own news, to both.
    assert await maker.code(CREATE_CART, id=new_id(), account=new_id()) == ErrorCode.NOT_FOUND


class _NotYetKnown(Authorizer):
    """Knows not whose the entity `blind` names is while the command that creates it is
    allowed (the mutation asks twice): as in the moment after another client created it and
    before anything could tell whose it was."""

    blind: str | None = None
    asked = 0

    async def _owner_from_state(
        self, entity_type: str, entity_id: str, looked_up: Any = None
    ) -> str | None:
        if entity_id == self.blind:
            self.asked += 1
            if self.asked <= 2:
                return None
        return await super()._owner_from_state(entity_type, entity_id, looked_up)


async def test_a_cart_made_meanwhile_by_another_is_no_one_else_s_to_learn_of(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """A customer creating a cart under an id another's cart has just taken, before anything
    knew whose it was, is allowed as the creator it names and then meets the other cart: it
    is FORBIDDEN, as when the cart was known, not ALREADY_EXISTS, which told that it exists
    (a probe on a live stack met the race 2 runs in 5)."""
    app = create_app(secured, temporal_client=temporal_client)
    transport = httpx.ASGITransport(app=app)
    async with (
        run_worker(secured),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://tenure") as http,
    ):
        admin = Caller(http, token("admin", "setup"))
        entities = await setup(admin)
        customer = callers(http, entities)[CUSTOMER]
        authorizer = _NotYetKnown(app.state.gateway)
        app.state.authorizer = authorizer
        cart_id = new_id()
        await admin.data(CREATE_CART, id=cart_id, account=entities["theirs"])
        authorizer.blind = cart_id
        taken = await customer.code(CREATE_CART, id=cart_id, account=entities["mine"])
        assert authorizer.asked >= 2  # it was not known when the create was allowed
        mine = new_id()  # its own cart made twice: that it may learn
        await customer.data(CREATE_CART, id=mine, account=entities["mine"])
        authorizer.blind, authorizer.asked = mine, 0
        again = await customer.code(CREATE_CART, id=mine, account=entities["mine"])
    assert taken == ErrorCode.FORBIDDEN
    assert again == ErrorCode.ALREADY_EXISTS


async def test_a_customer_names_only_its_own_accounts_even_creating_a_cart_it_has(
    secured: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """createCart of one's own cart naming another's account was answered ALREADY_EXISTS,
    and yet counted that cart against the other account for a minute: a customer with
    three carts kept another's account (bound 3) from making any. And six of them in one
    request told, by the request's live reads, whether the account named exists. Both are
    FORBIDDEN now, alike, before anything is looked up."""
    bounded = secured.model_copy(update={"max_carts_per_account": 3})
    async with run_worker(bounded), api_client(bounded, temporal_client) as http:
        admin = Caller(http, token("admin", "setup"))
        mine, theirs = new_id(), new_id()
        for account in (mine, theirs):
            await admin.data(OPEN, id=account)
            await admin.data(VERIFY, id=account)
        mallory = Caller(http, token("customer", "mallory", [mine]))
        own = [new_id() for _ in range(3)]
        for cart in own:
            await mallory.data(CREATE_CART, id=cart, account=mine)
        for cart in own:
            assert await mallory.code(CREATE_CART, id=cart, account=theirs) == "FORBIDDEN"
        bob = Caller(http, token("customer", "bob", [theirs]))
        await bob.data(CREATE_CART, id=new_id(), account=theirs)

        six = " ".join(
            f"c{i}: createCart(id: $id, accountId: $account, wait: true) {{ cartId }}"
            for i in range(6)
        )
        codes = []
        for account in (theirs, new_id()):  # another's, and none at all
            body = (await mallory.post(f"mutation($id: ID!, $account: ID!) {{ {six} }}",
                                       id=own[0], account=account)).json()  # fmt: skip
            codes.append(sorted({error["extensions"]["code"] for error in body["errors"]}))
        assert codes == [["FORBIDDEN"], ["FORBIDDEN"]]


CREATE_BY_KEY = """mutation($account: ID!, $key: String!) { createCart(accountId: $account,
  idempotencyKey: $key, wait: true) { cartId } }"""


async def test_one_customer_s_idempotency_key_neither_blocks_nor_reveals_another_s_create(
    secured_http: httpx.AsyncClient,
) -> None:
    """A cart created without an id is named after its caller and key: a retry names the
    same cart; another customer's create with the same key makes a cart of its own, where
    it was refused FORBIDDEN (learning that the key was used, and unable to create)."""
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    who = callers(secured_http, entities)
    key = f"order-{new_id()}"
    ada = await who[CUSTOMER].data(CREATE_BY_KEY, account=entities["mine"], key=key)
    again = await who[CUSTOMER].data(CREATE_BY_KEY, account=entities["mine"], key=key)
    bob = await who[STRANGER].data(CREATE_BY_KEY, account=entities["theirs"], key=key)
    assert again["createCart"]["cartId"] == ada["createCart"]["cartId"]
    assert bob["createCart"]["cartId"] != ada["createCart"]["cartId"]
    bobs = await who[STRANGER].data(READ_CART, id=bob["createCart"]["cartId"])
    assert bobs["cart"]["status"] == "OPEN"


async def test_a_customer_s_ten_creates_in_one_request_are_all_made(
    secured_http: httpx.AsyncClient,
) -> None:
    """Each create's look at whose the new cart is finds nothing cached; those looks once
    spent the request's live reads, and the third create on was refused FORBIDDEN."""
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    ten = " ".join(
        f"c{i}: createCart(accountId: $account, wait: true) {{ cartId cart {{ status }} }}"
        for i in range(10)
    )
    made = await callers(secured_http, entities)[CUSTOMER].data(
        f"mutation($account: ID!) {{ {ten} }}", account=entities["mine"]
    )
    assert [made[f"c{i}"]["cart"] for i in range(10)] == [{"status": "OPEN"}] * 10
    assert len({made[f"c{i}"]["cartId"] for i in range(10)}) == 10


async def test_a_refused_command_stores_nothing(secured_http: httpx.AsyncClient) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    await admin.data(DEPOSIT, id=entities["mine"])
    before = (await admin.data(READ_ACCOUNT_LIVE, id=entities["mine"]))["account"]
    stranger = callers(secured_http, entities)[STRANGER]
    assert await stranger.code(WITHDRAW, id=entities["mine"]) == ErrorCode.FORBIDDEN
    assert await stranger.code(CLOSE, id=entities["mine"]) == ErrorCode.FORBIDDEN
    after = (await admin.data(READ_ACCOUNT_LIVE, id=entities["mine"]))["account"]
    assert after == before


async def test_every_command_records_who_sent_it(secured_http: httpx.AsyncClient) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    customer = callers(secured_http, entities)[CUSTOMER]
    body = await customer.data(DEPOSIT, id=entities["mine"])
    command_id = body["depositToAccount"]["commandId"]
    history = """query($id: ID!) { account(id: $id) { history(last: 3) { entries {
        commandId command sentBy { role subject } } } } }"""
    entries = (await admin.data(history, id=entities["mine"]))["account"]["history"]["entries"]
    assert entries == [
        {
            "commandId": command_id,
            "command": "deposit",
            "sentBy": {"role": "customer", "subject": "ada"},
        },
        {"commandId": ANY, "command": "verify", "sentBy": {"role": "admin", "subject": "setup"}},
        {"commandId": ANY, "command": "open", "sentBy": {"role": "admin", "subject": "setup"}},
    ]
    # The customer sees that an admin acted on the account, not which admin.
    seen = (await customer.data(history, id=entities["mine"]))["account"]["history"]["entries"]
    assert [entry["sentBy"] for entry in seen] == [
        {"role": "customer", "subject": "ada"},
        {"role": "admin", "subject": None},
        {"role": "admin", "subject": None},
    ]


async def test_a_customer_reads_stock_but_not_whose_checkouts_hold_or_bought_it(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    theirs, sku = entities["theirs"], entities["sku"]
    cart = new_id()
    await admin.data(CREATE_CART, id=cart, account=theirs)
    await admin.data(ADD, id=cart, sku=sku)
    await admin.data(DEPOSIT, id=theirs)
    await admin.data(CHECKOUT, id=cart)
    done = await eventually(
        lambda: admin.data(READ_CHECKOUT, id=f"{cart}-1"),
        lambda data: data["checkout"] is not None and data["checkout"]["status"] != "RUNNING",
    )
    assert done["checkout"]["status"] == "COMPLETED"  # reserved, then committed
    # A second checkout of theirs, holding a unit under the name the saga gives it.
    held = f"{cart}-2.1700000000000"
    reserve = """mutation($sku: String!, $id: String!) { reserveStock(sku: $sku,
      reservationId: $id, quantity: 1, wait: true) { commandId } }"""
    await admin.data(reserve, sku=sku, id=held)
    item = """query($sku: String!) { inventoryItem(sku: $sku, consistency: LIVE) {
      sold reserved reservations { reservationId } } }"""
    history = """query($sku: String!) { inventoryItem(sku: $sku) { history(last: 5) {
      entries { command commandId } } } }"""

    customer = callers(secured_http, entities)[CUSTOMER]
    seen = (await customer.data(item, sku=sku))["inventoryItem"]
    assert seen == {"sold": 1, "reserved": 1, "reservations": []}  # the counts, no names
    assert await customer.code(history, sku=sku) == ErrorCode.FORBIDDEN
    # Only the history is withheld: the item beside it is still answered.
    both = """query($sku: String!) { inventoryItem(sku: $sku) { sold history(last: 5) {
      hasOlder } } }"""
    body = (await customer.post(both, sku=sku)).json()
    assert body["data"] == {"inventoryItem": {"sold": 1, "history": None}}, body
    assert [e["path"] for e in body["errors"]] == [["inventoryItem", "history"]]

    # Staff see whose they are, as before.
    seen = (await admin.data(item, sku=sku))["inventoryItem"]
    assert seen["reservations"] == [{"reservationId": held}]
    entries = (await admin.data(history, sku=sku))["inventoryItem"]["history"]["entries"]
    commit = next(entry for entry in entries if entry["command"] == "commitReservation")
    assert commit["commandId"].startswith(f"checkout:{cart}-1.")

    # A CACHED read's response, rendered for staff, is never replayed to a customer.
    cached = """query($sku: String!) { inventoryItem(sku: $sku) {
      reserved reservations { reservationId } } }"""
    named = [{"reservationId": held}]
    for caller, shown in ((admin, named), (customer, []), (admin, named)):
        seen = (await caller.data(cached, sku=sku))["inventoryItem"]
        assert seen["reservations"] == shown


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic YTpi"}],
)
async def test_no_valid_token_is_401_with_a_bearer_challenge(
    secured_http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await secured_http.post(
        "/graphql", json={"query": '{ account(id: "x") { revision } }'}, headers=headers
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_production_refuses_to_start_without_a_key_source(
    settings: Settings, temporal_client: Client
) -> None:
    production = settings.model_copy(update={"environment": "production"})
    with pytest.raises(ValueError, match="no key source"):
        async with api_client(production, temporal_client):
            pass


def test_a_command_no_policy_names_is_refused_to_everyone() -> None:
    policy = Policy.of(actions=["read", "deposit"], customer=["read"])
    admin = Principal("ops", Role.ADMIN)
    service = Principal("svc", Role.SERVICE, scopes=frozenset({"account:*"}))
    for principal in (admin, service):
        assert policy.allows(principal, "account", "deposit", owned=True)
        assert not policy.allows(principal, "account", "close", owned=True)
    # Every command of every entity type is named in its table, or no one may send it.
    for entity in catalog.entity_types().values():
        assert entity.policy.actions, entity.name


async def test_the_authorizer_refuses_an_undeclared_command() -> None:
    authorizer = Authorizer(cast(EntityGateway, None))  # an admin's check looks nothing up
    admin = Principal("ops", Role.ADMIN)
    with pytest.raises(Forbidden):
        await authorizer.require(admin, "account", "acct-1", "launderMoney")


async def test_graphiql_opens_without_a_token_and_queries_need_one(
    secured: Settings, temporal_client: Client
) -> None:
    # Production serves no GraphiQL unless asked to.
    with_ide = secured.model_copy(update={"graphiql": True})
    async with api_client(with_ide, temporal_client) as http:
        for url in ("/graphql", '/graphql?headers={"Authorization":"Bearer x"}'):
            page = await http.get(url, headers={"accept": "text/html"})
            assert page.status_code == 200 and "graphiql" in page.text.lower()
        query = await http.get(
            "/graphql", params={"query": "{ __typename }"}, headers={"accept": "text/html"}
        )
        assert query.status_code == 401
        # A query, even an empty one, is no page: it needs a token before anything reads it.
        empty = await http.get("/graphql?query=", headers={"accept": "text/html"})
        assert empty.status_code == 401


async def test_a_command_payload_shows_state_only_to_a_caller_who_may_read_it(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    depositor = Caller(secured_http, token("service", "payments", scope="account:deposit"))
    assert await depositor.code(READ_ACCOUNT, id=entities["mine"]) == ErrorCode.FORBIDDEN
    waited = """mutation($id: ID!) { depositToAccount(id: $id, amount: 5, wait: true) {
        status account { balance email } } }"""
    paid = (await depositor.data(waited, id=entities["mine"]))["depositToAccount"]
    assert paid == {"status": "APPLIED", "account": None}  # applied; the state is not its
    reader = Caller(secured_http, token("service", "billing", scope="account:deposit read:account"))
    shown = (await reader.data(waited, id=entities["mine"]))["depositToAccount"]
    assert shown["status"] == "APPLIED" and shown["account"]["balance"] == 10


async def test_a_refusal_shows_state_only_to_a_caller_who_may_read_it(
    secured_http: httpx.AsyncClient,
) -> None:
    """A service that may withdraw but not read learns that a withdrawal was refused and
    why in a code, not the balance: the refusal's words ("balance 10 is less than ...") read
    any account's balance, a guess at a time. A reader is told as before."""
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    deposit = (
        "mutation($id: ID!) { depositToAccount(id: $id, amount: 4321, wait: true) { status } }"
    )
    await admin.data(deposit, id=entities["mine"])
    too_much = """mutation($id: ID!) { withdrawFromAccount(id: $id, amount: 1000000, wait: true) {
        status } }"""
    payer = Caller(secured_http, token("service", "payouts", scope="account:withdraw"))
    refused = (await payer.post(too_much, id=entities["mine"])).json()["errors"][0]
    assert refused["extensions"]["code"] == ErrorCode.INSUFFICIENT_FUNDS
    balance = (await admin.data(READ_ACCOUNT, id=entities["mine"]))["account"]["balance"]
    assert balance >= 4321 and str(balance) not in refused["message"], refused
    reader = Caller(
        secured_http, token("service", "payouts", scope="account:withdraw read:account")
    )
    told = (await reader.post(too_much, id=entities["mine"])).json()["errors"][0]
    assert told["extensions"]["code"] == ErrorCode.INSUFFICIENT_FUNDS
    assert "less than the 1000000 asked for" in told["message"], told


async def test_a_checkout_refused_for_funds_tells_its_readers_no_balance(
    secured_http: httpx.AsyncClient,
) -> None:
    """A checkout's steps carry its entities' refusals, and the cart its failure: a service
    that may read carts and checkouts but not accounts read an account's balance in
    "withdraw: balance 10 is less than 1000"."""
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    await admin.data(ADD, id=entities["cart"], sku=entities["sku"])
    await admin.data(
        "mutation($id: ID!, $s: String!) { setCartItemQuantity(cartId: $id, sku: $s, "
        "quantity: 5, wait: true) { commandId } }",
        id=entities["cart"],
        s=entities["sku"],
    )
    await admin.data(
        "mutation($id: ID!) { depositToAccount(id: $id, amount: 37, wait: true) { status } }",
        id=entities["mine"],
    )
    checkout_id = (await admin.data(CHECKOUT, id=entities["cart"]))["checkoutCart"]["checkoutId"]
    reader = Caller(secured_http, token("service", "orders", scope="read:cart read:checkout"))
    failed = """query($id: ID!) { checkout(id: $id) {
        status failureCode failureReason steps { message } } }"""

    async def ended() -> dict[str, Any]:
        state: dict[str, Any] = (await reader.data(failed, id=checkout_id))["checkout"]
        return state

    checkout = await eventually(ended, lambda c: c is not None and c["status"] != "RUNNING")
    cart = (
        await reader.data(
            "query($id: ID!) { cart(id: $id, consistency: LIVE) { failureCode failureReason } }",
            id=entities["cart"],
        )
    )["cart"]
    assert checkout["failureCode"] == cart["failureCode"] == ErrorCode.INSUFFICIENT_FUNDS
    told = [checkout["failureReason"], cart["failureReason"]]
    told += [step["message"] for step in checkout["steps"] if step["message"]]
    assert told and not any("37" in words for words in told), told


async def test_a_service_that_may_check_a_cart_out_but_not_read_it_learns_the_checkout(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    await admin.data(ADD, id=entities["cart"], sku=entities["sku"])
    await admin.data(DEPOSIT, id=entities["mine"])
    checkout = "mutation($id: ID!) { checkoutCart(cartId: $id) { checkoutId cart { status } } }"
    checker = Caller(secured_http, token("service", "checkout", scope="cart:checkoutCart"))
    assert await checker.code(READ_CART, id=entities["cart"]) == ErrorCode.FORBIDDEN
    started = (await checker.data(checkout, id=entities["cart"]))["checkoutCart"]
    assert started == {"checkoutId": f"{entities['cart']}-1", "cart": None}
    cart = (await admin.data(READ_CART, id=entities["cart"]))["cart"]
    assert cart["status"] in ("CHECKING_OUT", "CHECKED_OUT")


async def test_ids_with_a_trailing_newline_are_refused(secured_http: httpx.AsyncClient) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    for document, variables in (
        (OPEN, {"id": f"{new_id()}\n"}),
        (RESTOCK, {"sku": f"{new_id()}\n"}),
    ):
        assert await admin.code(document, **variables) == ErrorCode.INVALID_INPUT
    key = f"key-{new_id()}\n"
    keyed = """mutation($id: ID!, $key: String) { depositToAccount(id: $id, amount: 1,
        idempotencyKey: $key) { status } }"""
    assert await admin.code(keyed, id=new_id(), key=key) == ErrorCode.INVALID_INPUT


async def test_spending_the_query_budget_does_not_tell_whether_a_cart_exists(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "setup"))
    entities = await setup(admin)
    stranger = callers(secured_http, entities)[STRANGER]
    for target in (entities["cart"], new_id()):  # someone's cart, and no cart at all
        ids = [new_id() for _ in range(5)] + [target]
        reads = " ".join(f'c{n}: cart(id: "{i}") {{ status }}' for n, i in enumerate(ids))
        body = (await stranger.post("{ " + reads + " }")).json()
        assert {e["extensions"]["code"] for e in body["errors"]} == {"FORBIDDEN"}, body
        assert len(body["errors"]) == 6


async def test_a_cart_id_made_again_for_another_account_does_not_show_the_first_checkout(
    secured_http: httpx.AsyncClient, temporal_client: Client, secured: Settings
) -> None:
    """A checkout pays from its account: once its cart id was made again for another account
    (retention deleted the cart; a FAILED checkout waits days for an operator), the new
    cart's customer read the first customer's order, lines and total, and then learnt from
    FORBIDDEN which checkouts the first customer had."""
    admin = Caller(secured_http, token("admin", "ops"))
    first, second, sku = new_id(), new_id(), new_id()
    for account in (first, second):
        await admin.data(OPEN, id=account)
        await admin.data(VERIFY, id=account)
    await admin.data(RESTOCK, sku=sku)
    await admin.data(DEPOSIT, id=first)
    cart = new_id()
    await admin.data(CREATE_CART, id=cart, account=first)
    await admin.data(ADD, id=cart, sku=sku)
    await admin.data(CHECKOUT, id=cart)
    await eventually(
        lambda: admin.data(READ_CHECKOUT, id=f"{cart}-1"),
        lambda d: d["checkout"] is not None and d["checkout"]["status"] == "COMPLETED",
    )
    await start_over(temporal_client, secured, "cart", cart, "createCart", {"account_id": second})
    bob = Caller(secured_http, token("customer", "bob", [second]))
    await eventually(lambda: bob.code(READ_CART, id=cart), lambda code: code is None, timeout=10)
    # Null, as a checkout that never was: FORBIDDEN told which ones the first holder had.
    for attempt in (1, 9):
        assert (await bob.data(READ_CHECKOUT, id=f"{cart}-{attempt}"))["checkout"] is None
    # Staff still read it, as does a service that reads carts, whether or not it reads
    # accounts: ownership is a customer's question.
    shop = Caller(secured_http, token("service", "shop", scope="read:cart"))
    for caller in (admin, shop):
        read = await caller.data(READ_CHECKOUT, id=f"{cart}-1")
        assert read["checkout"]["status"] == "COMPLETED"
