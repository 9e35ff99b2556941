"""An idempotency key is its sender's own: another caller sending the same key to the same
entity neither takes the first command's place nor has its own command dropped."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client

from entities import catalog
from entities.runtime.effects import OTHER_RUNNING_SENDER as OTHER
from entities.runtime.envelope import CommandEnvelope, OutcomeStatus
from tests.api.test_access import (
    ADD,
    CREATE_CART,
    OPEN,
    READ_CHECKOUT,
    RESTOCK,
    SECRET,
    VERIFY,
    Caller,
    token,
)
from tests.conftest import new_id
from tests.entities.shop import eventually
from workers.delivery import CommandDelivery
from workers.settings import Settings

DEPOSIT = """mutation($id: ID!, $amount: Long!, $key: String, $wait: Boolean!) {
  depositToAccount(id: $id, amount: $amount, idempotencyKey: $key, wait: $wait)
  { commandId status revision } }"""
WITHDRAW = """mutation($id: ID!, $amount: Long!, $key: String, $wait: Boolean!) {
  withdrawFromAccount(id: $id, amount: $amount, idempotencyKey: $key, wait: $wait)
  { commandId status revision } }"""
ACCOUNT = """query($id: ID!, $last: Int!) { account(id: $id, consistency: LIVE) { balance
  history(last: $last) { entries { commandId command sentBy { role subject } } } } }"""
BEFORE = """query($id: ID!, $before: String!) { account(id: $id, consistency: LIVE) {
  history(last: 1, before: $before) { entries { commandId } } } }"""
LEDGER = 4


@pytest.fixture
def secured(settings: Settings) -> Settings:
    """Production settings verifying tokens, no rate limits, and a ledger of LEDGER commands,
    so that a test can make an entity forget one."""
    runtime = settings.runtime.model_copy(update={"ledger_size": LEDGER})
    return settings.model_copy(
        update={
            "environment": "production",
            "auth_secret": SECRET,
            "rate_limits": {},
            "runtime": runtime,
        }
    )


async def _account(http: httpx.AsyncClient) -> tuple[str, Caller, Caller]:
    """An account billing (a service) opened and funded with 1,000, and its customer."""
    billing = Caller(http, token("service", "billing", scope="account:* read:*"))
    account_id = new_id()
    await billing.data(OPEN, id=account_id)
    await billing.data(VERIFY, id=account_id)
    await billing.data(DEPOSIT, id=account_id, amount=1000, key=None, wait=True)
    return account_id, billing, Caller(http, token("customer", "ada", [account_id]))


async def _balance(caller: Caller, account_id: str) -> int:
    account: dict[str, Any] = (await caller.data(ACCOUNT, id=account_id, last=LEDGER))["account"]
    return int(account["balance"])


async def _fee_taken_once(billing: Caller, account_id: str, key: str) -> None:
    """Billing's fee of 500 under `key`, after the customer's deposit of 1: accepted without
    waiting, and its retry is its repeat, applied once and answered with its revision."""
    fee = await billing.data(WITHDRAW, id=account_id, amount=500, key=key, wait=False)
    assert fee["withdrawFromAccount"]["status"] == "ACCEPTED"
    again = (await billing.data(WITHDRAW, id=account_id, amount=500, key=key, wait=True))[
        "withdrawFromAccount"
    ]
    assert again == {"commandId": key, "status": "APPLIED", "revision": 5}
    assert await _balance(billing, account_id) == 1000 + 1 - 500


async def test_a_customer_cannot_take_the_key_of_a_later_service_command(
    secured_http: httpx.AsyncClient,
) -> None:
    """The customer sent a deposit under the key billing's next fee would come with (last
    month's key, in the account's history, gives it away): the fee was answered ACCEPTED and
    dropped as the deposit's repeat."""
    account_id, billing, ada = await _account(secured_http)
    key = f"fee-2026-11-{account_id}"
    await ada.data(DEPOSIT, id=account_id, amount=1, key=key, wait=True)

    await _fee_taken_once(billing, account_id, key)
    # Listed under the key each sent, the second one's under its sender's; the customer sees
    # billing's role, not its name.
    entries = (await ada.data(ACCOUNT, id=account_id, last=2))["account"]["history"]["entries"]
    assert entries == [
        {
            "commandId": f"service/{key}",
            "command": "withdraw",
            "sentBy": {"role": "service", "subject": None},
        },
        {"commandId": key, "command": "deposit", "sentBy": {"role": "customer", "subject": "ada"}},
    ]
    entries = (await billing.data(ACCOUNT, id=account_id, last=1))["account"]["history"]
    assert entries["entries"][0]["commandId"] == f"service:billing/{key}"
    # A page before the command as the customer saw it listed; asked under the whole id, a
    # page told the customer it had guessed billing's name (a wrong guess was refused).
    assert (await ada.data(BEFORE, id=account_id, before=f"service/{key}"))["account"] == {
        "history": {"entries": [{"commandId": key}]}
    }
    for guess in (f"service:billing/{key}", f"service:someone/{key}"):
        assert await ada.code(BEFORE, id=account_id, before=guess) == "INVALID_INPUT"
    older = await billing.data(BEFORE, id=account_id, before=f"service:billing/{key}")
    assert older["account"] == {"history": {"entries": [{"commandId": key}]}}


async def test_a_key_made_to_look_like_another_sender_s_own_is_refused(
    secured_http: httpx.AsyncClient,
) -> None:
    """`service:billing/<key>` is the id under which the entity records billing's command
    when another sender took its key. A customer who took both that id and the key, with a
    deposit of 1 under each, had billing's next fee dropped as the deposit's repeat. A
    client's key shaped as a sender's own id is refused, and stores nothing."""
    account_id, billing, ada = await _account(secured_http)
    key = f"fee-2026-12-{account_id}"
    for sender in ("service:billing", "customer:ada", "admin:ops", "saga:checkout:c-1", OTHER):
        shaped = f"{sender}/{key}"
        code = await ada.code(DEPOSIT, id=account_id, amount=1, key=shaped, wait=True)
        assert code == "INVALID_INPUT", shaped
    assert await _balance(billing, account_id) == 1000
    await ada.data(DEPOSIT, id=account_id, amount=1, key=key, wait=True)
    await _fee_taken_once(billing, account_id, key)
    # Keys with a slash or a colon of their own are still taken.
    for mine in (f"orders/{key}", f"order:{key}", f"partner:x-{key}"):
        await ada.data(DEPOSIT, id=account_id, amount=1, key=mine, wait=True)
    assert await _balance(billing, account_id) == 1000 + 1 - 500 + 3


async def test_a_customer_pages_past_its_own_command_recorded_under_its_own_id(
    secured_http: httpx.AsyncClient,
) -> None:
    """A customer whose subject holds a slash sees its command, recorded under its own id
    after billing took the key, listed under that whole id, and pages past it."""
    account_id, billing, _ = await _account(secured_http)
    customer = Caller(secured_http, token("customer", "users/7", [account_id]))
    key = f"k-{account_id}"
    await billing.data(DEPOSIT, id=account_id, amount=2, key=key, wait=True)
    await customer.data(DEPOSIT, id=account_id, amount=1, key=key, wait=True)
    [entry] = (await customer.data(ACCOUNT, id=account_id, last=1))["account"]["history"]["entries"]
    assert entry["commandId"] == f"customer:users/7/{key}"
    older = await customer.data(BEFORE, id=account_id, before=entry["commandId"])
    assert older["account"] == {"history": {"entries": [{"commandId": key}]}}  # billing's


async def test_a_history_where_keys_meet_pages_through_every_command_once(
    secured_http: httpx.AsyncClient,
) -> None:
    """Both commands were listed under the same key, and a cursor naming it always found the
    newer: pages of one went k, X, k, X... for ever."""
    account_id, billing, ada = await _account(secured_http)
    key = f"k-{account_id}"
    await ada.data(DEPOSIT, id=account_id, amount=1, key=key, wait=True)
    await billing.data(DEPOSIT, id=account_id, amount=2, key=f"x-{account_id}", wait=True)
    await billing.data(DEPOSIT, id=account_id, amount=3, key=key, wait=True)
    page = """query($id: ID!, $before: String) { account(id: $id, consistency: LIVE) {
      history(last: 1, before: $before) { hasOlder entries { commandId command } } } }"""
    for caller in (ada, billing):
        seen: list[str] = []
        before = None
        for _ in range(LEDGER + 2):
            history = (await caller.data(page, id=account_id, before=before))["account"]
            [entry] = history["history"]["entries"]
            seen.append(entry["commandId"])
            before = entry["commandId"]
            if not history["history"]["hasOlder"]:
                break
        assert len(seen) == len(set(seen)) == LEDGER, seen


async def test_a_service_s_earlier_key_sent_by_a_customer_is_the_customer_s_own_command(
    secured_http: httpx.AsyncClient,
) -> None:
    """It was answered APPLIED with billing's revision, and not applied."""
    account_id, billing, ada = await _account(secured_http)
    key = f"refund-order-77-{account_id}"
    first = await billing.data(DEPOSIT, id=account_id, amount=250, key=key, wait=True)
    mine = await ada.data(DEPOSIT, id=account_id, amount=250, key=key, wait=True)
    assert first["depositToAccount"]["revision"] == 4
    assert mine["depositToAccount"] == {"commandId": key, "status": "APPLIED", "revision": 5}
    assert await _balance(billing, account_id) == 1000 + 250 + 250


async def test_a_sender_s_key_stays_its_own_after_the_entity_forgets_the_first(
    secured_http: httpx.AsyncClient,
) -> None:
    """Once the first sender's command has left the ledger, the second's repeat is still
    known by the sender's own id: not applied again."""
    account_id, billing, ada = await _account(secured_http)
    key = f"shared-{account_id}"
    await ada.data(DEPOSIT, id=account_id, amount=1, key=key, wait=True)
    await billing.data(WITHDRAW, id=account_id, amount=10, key=key, wait=True)
    # Two more commands: the ledger of LEDGER forgets the customer's deposit, the oldest
    # (its other entries: the opening deposit and verify, then the withdrawal).
    for n in range(2):
        await billing.data(DEPOSIT, id=account_id, amount=100, key=f"d{n}-{account_id}", wait=True)
    repeat = await billing.data(WITHDRAW, id=account_id, amount=10, key=key, wait=True)
    assert repeat["withdrawFromAccount"]["revision"] == 5
    assert await _balance(billing, account_id) == 1000 + 1 - 10 + 200


async def test_a_signalled_command_s_outcome_is_found_under_its_sender_s_own_id(
    secured: Settings, temporal_client: Client, secured_http: httpx.AsyncClient
) -> None:
    """A command sent by signal (a waited one whose update was refused goes so) is looked
    up by its sender: the outcome under its key is another sender's."""
    account_id, billing, ada = await _account(secured_http)
    key = f"signalled-{account_id}"
    await ada.data(DEPOSIT, id=account_id, amount=1, key=key, wait=True)
    delivery = CommandDelivery(temporal_client, secured)
    account = catalog.entity_types()["account"]
    envelope = CommandEnvelope(
        command_id=key, name="withdraw", payload={"amount": 7}, sent_by="service:billing"
    )
    handle = await delivery.deliver(account, account_id, envelope)
    result = await delivery.await_outcome(handle, envelope)
    assert result.outcome.status is OutcomeStatus.APPLIED
    assert result.outcome.sent_by == "service:billing"
    assert result.outcome.command == "withdraw"
    assert await _balance(billing, account_id) == 1000 + 1 - 7


async def test_a_checkout_under_a_key_another_sender_took_answers_its_own_checkout(
    secured_http: httpx.AsyncClient,
) -> None:
    """Support checked the cart out under a key (its checkout compensated: too little money);
    the customer's checkout under the same key is its own command, and was answered with
    support's checkout, someone else's failed order, while its own charged it."""
    account_id, billing, ada = await _account(secured_http)
    await billing.data(WITHDRAW, id=account_id, amount=995, key=None, wait=True)
    admin = Caller(secured_http, token("admin", "support"))
    cart, sku, key = new_id(), new_id(), f"co-{account_id}"
    await admin.data(RESTOCK, sku=sku)
    await admin.data(CREATE_CART, id=cart, account=account_id)
    await admin.data(ADD, id=cart, sku=sku)
    send = """mutation($id: ID!, $key: String!) {
      checkoutCart(cartId: $id, idempotencyKey: $key) { checkoutId } }"""
    first = (await admin.data(send, id=cart, key=key))["checkoutCart"]["checkoutId"]
    await eventually(
        lambda: admin.data(READ_CHECKOUT, id=first),
        lambda d: d["checkout"] is not None and d["checkout"]["status"] == "COMPENSATED",
    )
    await billing.data(DEPOSIT, id=account_id, amount=100, key=None, wait=True)
    mine = (await ada.data(send, id=cart, key=key))["checkoutCart"]["checkoutId"]
    assert (first, mine) == (f"{cart}-1", f"{cart}-2")
