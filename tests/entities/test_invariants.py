"""Invariants of every entity's pure transitions, over random sequences of commands.

Each test drives an entity the way its workflow does (`entities/runtime/workflow.py`), with
no server: commands at a deterministic clock, the durable timer fired once its deadline has
passed, the revision raised by one per applied command or fired timer, a refused command
leaving the state as it was. Payloads include invalid ones, and the clock moves at random,
so timers fire between commands and commands arrive after a deadline the timer has not
yet acted on. After every step the test checks what must hold whatever the order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pydantic import BaseModel

from entities.account import AccountOptions, AccountState, AccountStatus, account
from entities.cart import MAX_QUANTITY, CartOptions, CartState, CartStatus, cart
from entities.checkout_input import CheckoutInput
from entities.errors import ErrorCode, Rejected
from entities.inventory import InventoryOptions, InventoryState, Settlement, inventory
from entities.runtime import CommandContext, EntityType
from entities.runtime.effects import StartWorkflow

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EXAMPLES = settings(max_examples=150, deadline=None, database=None)


# -- the runtime's bookkeeping, without Temporal -----------------------------------------


@dataclass
class Command:
    name: str
    payload: dict[str, Any]


@dataclass
class Wait:
    seconds: float


@dataclass
class Timer:
    """Sleep until the entity's deadline, if it has one, and fire its timer."""


Step = Command | Wait | Timer


@dataclass
class Runtime:
    """What the entity workflow keeps around a transition: state, clock and revision."""

    entity: EntityType[Any, Any]
    options: BaseModel
    entity_id: str
    state: Any = None
    now: datetime = T0
    revision: int = 0

    def send(self, name: str, payload: dict[str, Any]) -> tuple[Rejected | None, list[Any]]:
        """Apply one command; returns why it was refused, or the effects it asked for."""
        before = self.state
        pristine = None if before is None else before.model_copy(deep=True)
        ctx = CommandContext(self.entity_id, self.now, self.options, f"cmd-{self.revision}")
        try:
            after = self.entity.apply(before, name, payload, ctx)
        except Rejected as rejection:
            assert ctx.effects == [], "a refused command asked for effects"
            assert before == pristine, "a refused command changed the state"
            return rejection, []
        assert before == pristine, "a transition mutated the state it was given"
        self._commit(after)
        return None, list(ctx.effects)

    def wait(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def fire(self) -> bool:
        """Sleep until the deadline and fire the timer, as the workflow's loop does."""
        deadline = self.entity.deadline(self.state, self.options)
        if deadline is None:
            return False
        self.now = max(self.now, deadline)
        before = self.state
        pristine = before.model_copy(deep=True)
        ctx = CommandContext(self.entity_id, self.now, self.options, "timer")
        after = self.entity.fire_deadline(before, ctx)
        assert before == pristine, "the timer mutated the state it was given"
        assert ctx.effects == []
        again = self.entity.deadline(after, self.options)
        # otherwise the workflow would re-arm an expired timer and fire it forever
        assert again is None or again > self.now, f"deadline {again} still due at {self.now}"
        self._commit(after)
        return True

    def _commit(self, state: BaseModel) -> None:
        self.state = state
        self.revision += 1


@dataclass
class Run:
    """One sequence driven through a Runtime, counting what the revision must count."""

    runtime: Runtime
    applied: int = 0
    fired: int = 0

    def step(self, step: Step) -> tuple[Rejected | None, list[Any]]:
        if isinstance(step, Wait):
            self.runtime.wait(step.seconds)
            return None, []
        if isinstance(step, Timer):
            self.fired += self.runtime.fire()
            return None, []
        rejection, effects = self.runtime.send(step.name, step.payload)
        if rejection is None:
            self.applied += 1
        assert self.runtime.revision == self.applied + self.fired
        return rejection, effects


def steps(commands: st.SearchStrategy[Command], longest_wait: float) -> st.SearchStrategy[Step]:
    waits = st.builds(Wait, st.floats(0, longest_wait, allow_nan=False))
    return st.one_of(commands, commands, waits, st.just(Timer()))


def cause(step: Step) -> str:
    return step.name if isinstance(step, Command) else "timer"


def mostly(valid: st.SearchStrategy[Any], *invalid: Any) -> st.SearchStrategy[Any]:
    """Values from `valid`, and one time in eight one of the `invalid` ones."""
    return st.sampled_from([valid] * 7 + [st.sampled_from(invalid)]).flatmap(lambda s: s)


def command(name: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Command]:
    return st.builds(Command, st.just(name), st.fixed_dictionaries(fields))


def weighted(*choices: tuple[int, st.SearchStrategy[Command]]) -> st.SearchStrategy[Command]:
    """One of the commands, each as often as its weight says."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


# -- Account -------------------------------------------------------------------------------

ACCOUNT_OPTIONS = AccountOptions(dormancy_seconds=3600)

AMOUNTS = mostly(st.integers(1, 100), 0, -1, 10**15 + 1, 10**40, 1.5, "10", None, True)
MALFORMED = st.fixed_dictionaries({"amount": st.just(5), "colour": st.just("red")})

ACCOUNT_COMMANDS = weighted(
    (
        1,
        command(
            "open",
            owner_name=mostly(st.just("Ada"), "", "   ", "x" * 201),
            email=mostly(st.just("ada@example.com"), "not-an-email"),
            currency=mostly(st.sampled_from(["EUR", "GBP"]), "euro"),
        ),
    ),
    (2, command("verify", kyc_reference=st.sampled_from(["kyc-1", None]))),
    (4, command("deposit", amount=AMOUNTS)),
    (3, command("withdraw", amount=AMOUNTS)),
    (2, command("refund", amount=AMOUNTS)),
    (2, command("suspend", reason=st.sampled_from(["fraud check", None]))),
    (2, command("reactivate")),
    (1, command("close")),
    (1, st.builds(Command, st.sampled_from(["deposit", "teleport"]), MALFORMED)),
)

OPEN_ACCOUNT = Command("open", {"owner_name": "Ada", "email": "ada@example.com"})

A = AccountStatus
ACCOUNT_EDGES: dict[tuple[AccountStatus | None, AccountStatus], set[str]] = {
    (None, A.PENDING): {"open"},
    (A.PENDING, A.ACTIVE): {"verify"},
    (A.PENDING, A.CLOSED): {"close"},
    (A.ACTIVE, A.ACTIVE): {"deposit", "withdraw", "refund"},
    (A.ACTIVE, A.DORMANT): {"timer"},
    (A.ACTIVE, A.SUSPENDED): {"suspend"},
    (A.ACTIVE, A.CLOSED): {"close"},
    (A.DORMANT, A.ACTIVE): {"deposit", "withdraw", "refund"},
    (A.DORMANT, A.SUSPENDED): {"suspend"},
    (A.DORMANT, A.CLOSED): {"close"},
    (A.SUSPENDED, A.SUSPENDED): {"refund"},
    (A.SUSPENDED, A.ACTIVE): {"reactivate"},
    (A.SUSPENDED, A.CLOSED): {"close"},
}
"""Every status change an account may make, and the commands (or timer) that make it."""

MONEY_SIGN = {"deposit": 1, "refund": 1, "withdraw": -1}


@EXAMPLES
@given(
    before=st.lists(steps(ACCOUNT_COMMANDS, 5400), max_size=3),
    after=st.lists(steps(ACCOUNT_COMMANDS, 5400), min_size=10, max_size=60),
)
def test_account_invariants(before: list[Step], after: list[Step]) -> None:
    run = Run(Runtime(account, ACCOUNT_OPTIONS, "acc-1"))
    balance = 0
    for step in [*before, OPEN_ACCOUNT, *after]:
        previous: AccountState | None = run.runtime.state
        rejection, _ = run.step(step)
        state: AccountState | None = run.runtime.state

        if previous is not None and previous.status is A.CLOSED and isinstance(step, Command):
            assert rejection is not None, "a closed account accepted a command"
            assert rejection.code in {ErrorCode.INVALID_TRANSITION, ErrorCode.INVALID_INPUT}
        if state is None:
            assert isinstance(step, Wait | Timer) or rejection is not None
            continue
        changed = state is not previous
        if changed:
            edge = (None if previous is None else previous.status, state.status)
            assert cause(step) in ACCOUNT_EDGES.get(edge, set()), f"{cause(step)} made {edge}"
        if changed and isinstance(step, Command):
            balance += MONEY_SIGN.get(step.name, 0) * step.payload.get("amount", 0)
            assert state.last_activity_at == run.runtime.now

        assert state.balance >= 0
        assert state.balance == balance
        assert state.last_activity_at <= run.runtime.now
        if state.status is A.CLOSED:
            assert state.balance == 0, "an account was closed holding money"
        if state.suspension_reason is not None:
            assert state.status in {A.SUSPENDED, A.CLOSED}
        if state.status is not A.ACTIVE:
            assert account.deadline(state, ACCOUNT_OPTIONS) is None
    assert run.runtime.revision == run.applied + run.fired


# -- Cart ----------------------------------------------------------------------------------

CART_OPTIONS = CartOptions(abandon_after_seconds=3600, max_lines=3)

SKUS = mostly(st.sampled_from(["s1", "s2", "s3", "s4", "s5"]), "has space", "")
CART_QUANTITIES = mostly(
    st.sampled_from([1, 2, 3, 5, 8, 13, MAX_QUANTITY]),
    0,
    -1,
    MAX_QUANTITY + 1,
    10**12,
    2.5,
    "3",
    True,
)
NEW_QUANTITIES = mostly(st.sampled_from([0, 1, 2, 5, MAX_QUANTITY]), -1, MAX_QUANTITY + 1, "3")
UNIT_PRICES = mostly(st.integers(0, 1000), -1, 10**12 + 1, 9.99)
CHECKOUT_IDS = mostly(st.sampled_from(["c1-1", "c1-2", "c1-3"]), "other", "")

CART_COMMANDS = weighted(
    (1, command("createCart", account_id=st.just("a1"))),
    (5, command("addCartItem", sku=SKUS, quantity=CART_QUANTITIES, unit_price=UNIT_PRICES)),
    (2, command("removeCartItem", sku=SKUS)),
    (2, command("setCartItemQuantity", sku=SKUS, quantity=NEW_QUANTITIES)),
    (1, command("clearCart")),
    (3, command("checkoutCart")),
    (2, command("completeCheckout", checkout_id=CHECKOUT_IDS, order_id=st.just("o-1"))),
    (2, command("failCheckout", checkout_id=CHECKOUT_IDS, code=st.just("PAYMENT_DECLINED"))),
)

CREATE_CART = Command("createCart", {"account_id": "a1"})
LINE_COMMANDS = {"addCartItem", "removeCartItem", "setCartItemQuantity", "clearCart"}

C = CartStatus
CART_EDGES: dict[tuple[CartStatus | None, CartStatus], set[str]] = {
    (None, C.OPEN): {"createCart"},
    (C.OPEN, C.OPEN): LINE_COMMANDS,
    (C.OPEN, C.CHECKING_OUT): {"checkoutCart"},
    (C.OPEN, C.ABANDONED): {"timer"},
    (C.ABANDONED, C.OPEN): LINE_COMMANDS,
    (C.ABANDONED, C.CHECKING_OUT): {"checkoutCart"},
    (C.CHECKING_OUT, C.CHECKED_OUT): {"completeCheckout"},
    (C.CHECKING_OUT, C.OPEN): {"failCheckout"},
}
"""Every status change a cart may make, and the commands (or timer) that make it."""


def expected_lines(lines: dict[str, tuple[int, int]], command: Command) -> None:
    """What an applied line command does to the cart's lines, kept in `lines`, in order."""
    sku = command.payload.get("sku", "")
    if command.name == "addCartItem":
        had = lines.get(sku, (0, 0))[0]
        lines[sku] = (had + command.payload["quantity"], command.payload["unit_price"])
    elif command.name == "removeCartItem" or (
        command.name == "setCartItemQuantity" and command.payload["quantity"] == 0
    ):
        lines.pop(sku, None)
    elif command.name == "setCartItemQuantity":
        lines[sku] = (command.payload["quantity"], lines[sku][1])
    elif command.name == "clearCart":
        lines.clear()


@EXAMPLES
@given(
    before=st.lists(steps(CART_COMMANDS, 5400), max_size=3),
    after=st.lists(steps(CART_COMMANDS, 5400), min_size=10, max_size=60),
)
def test_cart_invariants(before: list[Step], after: list[Step]) -> None:
    run = Run(Runtime(cart, CART_OPTIONS, "c1"))
    lines: dict[str, tuple[int, int]] = {}
    checkouts = 0
    for step in [*before, CREATE_CART, *after]:
        previous: CartState | None = run.runtime.state
        rejection, effects = run.step(step)
        state: CartState | None = run.runtime.state

        if previous is not None and previous.status is C.CHECKED_OUT and isinstance(step, Command):
            assert rejection is not None, "a checked-out cart accepted a command"
        if state is None:
            assert isinstance(step, Wait | Timer) or rejection is not None
            continue
        changed = state is not previous
        if changed:
            edge = (None if previous is None else previous.status, state.status)
            assert cause(step) in CART_EDGES.get(edge, set()), f"{cause(step)} made {edge}"
        if changed and isinstance(step, Command):
            expected_lines(lines, step)
            assert state.last_activity_at == run.runtime.now
        if changed and cause(step) == "checkoutCart":
            checkouts += 1
            [start] = effects
            assert isinstance(start, StartWorkflow)
            assert start.workflow_id == f"checkout:c1-{checkouts}"
            started = CheckoutInput.model_validate(start.input)
            assert [(x.sku, x.quantity, x.unit_price) for x in started.lines] == [
                (x.sku, x.quantity, x.unit_price) for x in state.lines
            ]
        else:
            assert effects == []

        assert [(x.sku, x.quantity, x.unit_price) for x in state.lines] == [
            (sku, quantity, price) for sku, (quantity, price) in lines.items()
        ]
        assert state.total == sum(quantity * price for quantity, price in lines.values())
        assert all(0 < x.quantity <= MAX_QUANTITY and x.unit_price >= 0 for x in state.lines)
        assert len(state.lines) <= CART_OPTIONS.max_lines
        assert state.checkout_attempts == checkouts
        assert state.checkout_id == (f"c1-{checkouts}" if checkouts else None)
        assert (state.status is C.ABANDONED) == (state.abandoned_at is not None)
        assert (state.status is C.CHECKED_OUT) == (state.order_id is not None)
        if state.status is C.CHECKING_OUT:
            assert state.lines, "an empty cart is checking out"
        if state.status is not C.OPEN:
            assert cart.deadline(state, CART_OPTIONS) is None
    assert run.runtime.revision == run.applied + run.fired


# -- InventoryItem -------------------------------------------------------------------------

INVENTORY_OPTIONS = InventoryOptions(
    default_ttl_seconds=60, max_ttl_seconds=600, settled_memory=3, adjustment_memory=2
)

STOCK_QUANTITIES = mostly(st.integers(1, 8), 0, -1, 10**9 + 1, 2.5, "3", True)
DELTAS = mostly(st.integers(-8, 8), -(10**9) - 1, 10**9 + 1, 1.5, "2")
RESERVATION_IDS = mostly(st.sampled_from([f"r{n}" for n in range(1, 9)]), "", "a b", "x" * 201)
TTLS = mostly(
    st.none() | st.floats(1, 1000) | st.sampled_from([1e-9, float("inf"), "30"]),
    0,
    -5,
    float("nan"),
    10**400,
)


class InventoryMachine(RuleBasedStateMachine):
    """An InventoryItem beside a model of what it must hold: units received, reservations
    held, sales made and not returned, the latest adjustments."""

    def __init__(self) -> None:
        super().__init__()
        self.run = Run(Runtime(inventory, INVENTORY_OPTIONS, "sku-1"))
        self.received = 0
        self.held: dict[str, int] = {}
        self.sales: dict[str, list[int]] = {}
        self.adjustments: list[tuple[int, str]] = []

    @property
    def state(self) -> InventoryState | None:
        state: InventoryState | None = self.run.runtime.state
        return state

    def send(self, name: str, payload: dict[str, Any]) -> Rejected | None:
        before = self.state
        rejection, _ = self.run.step(Command(name, payload))
        if before is not None and self.state is not None and name != "returnReservation":
            assert self.state.sold >= before.sold, f"{name} took back a sale"
        return rejection

    @initialize(units=st.integers(0, 20))
    def stock(self, units: int) -> None:
        """Most items start with stock; some are never restocked and must refuse everything."""
        if units:
            self.restock(units, None)

    @rule(quantity=STOCK_QUANTITIES, name=mostly(st.sampled_from([None, "Teapot"]), " "))
    def restock(self, quantity: Any, name: str | None) -> None:
        payload = {"quantity": quantity} if name is None else {"quantity": quantity, "name": name}
        if self.send("restock", payload) is None:
            self.received += quantity

    @rule(delta=DELTAS, reason=mostly(st.just("stocktake"), "", "  "))
    def adjust(self, delta: Any, reason: str) -> None:
        if self.send("adjustStock", {"delta": delta, "reason": reason}) is None:
            self.received += delta
            self.adjustments.append((delta, reason))

    @rule(reservation_id=RESERVATION_IDS, quantity=STOCK_QUANTITIES, ttl=TTLS)
    def reserve(self, reservation_id: str, quantity: Any, ttl: Any) -> None:
        before = self.state
        payload = {"reservation_id": reservation_id, "quantity": quantity}
        if ttl is not None:
            payload["ttl_seconds"] = ttl
        rejection = self.send("reserveStock", payload)
        if rejection is not None:
            if rejection.code is ErrorCode.INSUFFICIENT_STOCK:
                assert before is not None and quantity > before.available
            return
        assert self.state is not None
        if reservation_id in self.held:
            assert self.state == before, "a repeated reservation changed the item"
            return
        self.held[reservation_id] = quantity
        made = self.state.reservation(reservation_id)
        assert made is not None
        now = self.run.runtime.now
        assert now <= made.expires_at <= now + timedelta(seconds=600)

    def pick(self, data: st.DataObject, known: Iterable[str], other: str) -> str:
        """Often one of the `known` ids, so that held reservations and sales get settled."""
        return data.draw(st.sampled_from([*sorted(known), other]))

    @rule(data=st.data(), reservation_id=RESERVATION_IDS)
    def release(self, data: st.DataObject, reservation_id: str) -> None:
        reservation_id = self.pick(data, self.held, reservation_id)
        if self.send("releaseReservation", {"reservation_id": reservation_id}) is None:
            self.held.pop(reservation_id, None)

    @rule(data=st.data(), reservation_id=RESERVATION_IDS)
    def commit(self, data: st.DataObject, reservation_id: str) -> None:
        reservation_id = self.pick(data, self.held, reservation_id)
        before = self.state
        rejection = self.send("commitReservation", {"reservation_id": reservation_id})
        if rejection is not None:
            assert reservation_id not in self.held, "a held reservation could not be committed"
        elif reservation_id in self.held:
            self.sales.setdefault(reservation_id, []).append(self.held.pop(reservation_id))
        else:
            assert self.state == before, "committing a settled reservation changed the item"

    @rule(data=st.data(), reservation_id=RESERVATION_IDS)
    def give_back(self, data: st.DataObject, reservation_id: str) -> None:
        reservation_id = self.pick(data, self.sales, reservation_id)
        before = self.state
        if self.send("returnReservation", {"reservation_id": reservation_id}) is not None:
            return
        assert before is not None and self.state is not None
        if self.state.sold != before.sold:
            assert self.sales.get(reservation_id), f"{reservation_id} was not sold, or came back"
            returned = self.sales[reservation_id].pop()
            assert before.sold - self.state.sold == returned
            assert self.state.settled[reservation_id].settlement is Settlement.RETURNED

    @rule(name=st.sampled_from(["teleport", "reserveStock"]))
    def malformed(self, name: str) -> None:
        rejection = self.send(name, {"reservation_id": "r1", "colour": "red"})
        assert rejection is not None and rejection.code is ErrorCode.INVALID_INPUT

    @rule(seconds=st.floats(0, 700, allow_nan=False))
    def wait(self, seconds: float) -> None:
        self.run.step(Wait(seconds))

    @rule()
    def timer(self) -> None:
        before = self.state
        fired = self.run.fired
        self.run.step(Timer())
        if self.run.fired == fired:
            assert not self.held, "reservations are held with no expiry armed"
            return
        assert before is not None and self.state is not None
        now = self.run.runtime.now
        expired = {r.reservation_id for r in before.reservations if r.expires_at <= now}
        assert expired, "the timer fired with nothing to expire"
        assert (self.state.on_hand, self.state.sold) == (before.on_hand, before.sold)
        for reservation_id in expired:
            del self.held[reservation_id]
            record = self.state.settled.get(reservation_id)
            if record is None:
                assert len(self.state.settled) == INVENTORY_OPTIONS.settled_memory
            else:
                assert record.settlement is Settlement.EXPIRED

    @invariant()
    def never_oversold(self) -> None:
        if self.state is not None:
            assert self.state.available >= 0
            assert 0 <= self.state.reserved <= self.state.on_hand

    @invariant()
    def units_are_conserved(self) -> None:
        on_hand, sold = (0, 0) if self.state is None else (self.state.on_hand, self.state.sold)
        assert on_hand + sold == self.received

    @invariant()
    def reservations_are_the_ones_held(self) -> None:
        reservations = [] if self.state is None else self.state.reservations
        assert {r.reservation_id: r.quantity for r in reservations} == self.held
        assert len(reservations) == len(self.held), "a reservation id is held twice"
        assert all(r.quantity > 0 for r in reservations)

    @invariant()
    def sold_is_committed_less_returned(self) -> None:
        sold = 0 if self.state is None else self.state.sold
        assert sold == sum(sum(quantities) for quantities in self.sales.values())

    @invariant()
    def held_reservations_are_not_settled(self) -> None:
        if self.state is not None:
            assert not set(self.held) & set(self.state.settled)

    @invariant()
    def memories_stay_within_their_bounds(self) -> None:
        if self.state is not None:
            assert len(self.state.settled) <= INVENTORY_OPTIONS.settled_memory
            assert len(self.state.adjustments) <= INVENTORY_OPTIONS.adjustment_memory
            kept = [(a.delta, a.reason) for a in self.state.adjustments]
            assert kept == self.adjustments[-INVENTORY_OPTIONS.adjustment_memory :]

    @invariant()
    def revision_counts_every_change(self) -> None:
        assert self.run.runtime.revision == self.run.applied + self.run.fired


TestInventoryInvariants = InventoryMachine.TestCase
TestInventoryInvariants.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, database=None
)
