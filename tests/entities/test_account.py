"""Account's rules, as pure transitions: no Temporal, no Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from entities.account import (
    AccountOptions,
    AccountState,
    AccountStatus,
    Deposit,
    account,
    deposit,
    open_account,
)
from entities.errors import ErrorCode, Rejected
from entities.runtime import CommandContext, EntityType

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OPTIONS = AccountOptions(dormancy_seconds=3600)


def ctx(at: datetime = T0) -> CommandContext[AccountOptions]:
    return CommandContext("acc-1", at, OPTIONS, "cmd")


def apply(state: AccountState | None, name: str, at: datetime = T0, **payload: Any) -> AccountState:
    return account.apply(state, name, payload, ctx(at))


def rejected(state: AccountState | None, name: str, **payload: Any) -> ErrorCode:
    with pytest.raises(Rejected) as info:
        apply(state, name, **payload)
    return info.value.code


def opened() -> AccountState:
    return apply(None, "open", owner_name="Ada", email="ada@example.com", currency="GBP")


def active(balance: int = 0) -> AccountState:
    state = apply(opened(), "verify")
    return apply(state, "deposit", amount=balance) if balance else state


def test_open_starts_pending_with_zero_balance() -> None:
    state = opened()
    assert (state.status, state.balance, state.currency) == (AccountStatus.PENDING, 0, "GBP")
    assert state.owner_name == "Ada"
    assert state.last_activity_at == T0


def test_open_twice_is_already_exists() -> None:
    assert rejected(opened(), "open", owner_name="B", email="b@example.com") == "ALREADY_EXISTS"


@pytest.mark.parametrize(
    "payload",
    [
        {"owner_name": "", "email": "a@example.com"},
        {"owner_name": "A", "email": "not-an-email"},
        {"owner_name": "A", "email": "a@example.com", "currency": "euro"},
        {"owner_name": "A", "email": "a@example.com", "colour": "red"},
    ],
)
def test_open_with_bad_input_is_invalid_input(payload: dict[str, Any]) -> None:
    assert rejected(None, "open", **payload) == "INVALID_INPUT"


def test_commands_on_a_missing_account_are_not_found() -> None:
    assert rejected(None, "deposit", amount=5) == "NOT_FOUND"
    assert rejected(None, "verify") == "NOT_FOUND"


def test_unknown_command_is_invalid_input() -> None:
    assert rejected(opened(), "teleport") == "INVALID_INPUT"


def test_verify_activates_only_a_pending_account() -> None:
    assert apply(opened(), "verify", kyc_reference="kyc-9").status is AccountStatus.ACTIVE
    assert rejected(active(), "verify") == "INVALID_TRANSITION"


def test_money_commands_need_an_active_account() -> None:
    pending = opened()
    assert rejected(pending, "deposit", amount=5) == "INVALID_TRANSITION"
    suspended = apply(active(10), "suspend", reason="check")
    assert rejected(suspended, "deposit", amount=5) == "INVALID_TRANSITION"
    assert rejected(suspended, "withdraw", amount=5) == "INVALID_TRANSITION"


def test_deposit_and_withdraw_move_the_balance() -> None:
    state = apply(active(100), "withdraw", amount=30)
    assert state.balance == 70
    assert apply(state, "deposit", amount=5).balance == 75


@pytest.mark.parametrize("amount", [0, -1, 1.5, "10", 10**16])
def test_amounts_must_be_positive_whole_numbers(amount: object) -> None:
    assert rejected(active(100), "deposit", amount=amount) == "INVALID_INPUT"
    assert rejected(active(100), "withdraw", amount=amount) == "INVALID_INPUT"


def test_withdraw_beyond_the_balance_is_insufficient_funds() -> None:
    assert rejected(active(100), "withdraw", amount=101) == "INSUFFICIENT_FUNDS"
    assert apply(active(100), "withdraw", amount=100).balance == 0


def test_suspend_and_reactivate() -> None:
    suspended = apply(active(), "suspend", reason="fraud check")
    assert (suspended.status, suspended.suspension_reason) == (
        AccountStatus.SUSPENDED,
        "fraud check",
    )
    assert rejected(suspended, "suspend") == "INVALID_TRANSITION"
    back = apply(suspended, "reactivate")
    assert (back.status, back.suspension_reason) == (AccountStatus.ACTIVE, None)
    assert rejected(back, "reactivate") == "INVALID_TRANSITION"
    assert rejected(opened(), "suspend") == "INVALID_TRANSITION"


def test_close_needs_a_zero_balance_and_is_terminal() -> None:
    assert rejected(active(5), "close") == "INVALID_TRANSITION"
    closed = apply(active(), "close")
    assert closed.status is AccountStatus.CLOSED
    assert account.is_terminal(closed)
    for name, payload in [("deposit", {"amount": 1}), ("reactivate", {}), ("close", {})]:
        assert rejected(closed, name, **payload) == "INVALID_TRANSITION"


def test_pending_and_suspended_accounts_can_be_closed() -> None:
    assert apply(opened(), "close").status is AccountStatus.CLOSED
    assert apply(apply(active(), "suspend"), "close").status is AccountStatus.CLOSED


def sent(
    state: AccountState, name: str, at: datetime, sent_by: str | None, old_rules: bool = False
) -> AccountState:
    """`name` applied at `at` as sent by `sent_by`; under the rules before level 4 if
    `old_rules` (a run replaying its history as it was made)."""
    context = CommandContext(
        "acc-1",
        at,
        OPTIONS,
        "cmd",
        sent_by=sent_by,
        rules_from=(lambda level: level < 4) if old_rules else (lambda level: True),
    )
    return account.apply(state, name, {} if name == "close" else {"amount": 700}, context)


def test_an_account_a_checkout_charged_is_not_closed_while_the_checkout_may_refund_it() -> None:
    """A checkout withdrew the whole balance and its customer closed the account; then a
    commit failed and the checkout's refund was refused: the customer paid for nothing, and
    the checkout waited FAILED for an operator. The account now stays open for the hold."""
    charged = sent(active(700), "withdraw", T0, "saga:checkout:cart-1-1")
    assert charged.balance == 0
    hold = timedelta(seconds=OPTIONS.refund_hold_seconds)
    assert charged.refundable_until == T0 + hold
    soon = T0 + hold - timedelta(seconds=1)
    with pytest.raises(Rejected) as refused:
        sent(charged, "close", soon, "admin:ops-1")
    assert refused.value.code == "INVALID_TRANSITION"
    assert "can be closed from" in refused.value.message
    # The refund still finds it open, and once the hold is over it closes.
    refunded = sent(charged, "refund", soon, "saga:checkout:cart-1-1")
    assert (refunded.status, refunded.balance) == (AccountStatus.ACTIVE, 700)
    assert sent(charged, "close", T0 + hold, "admin:ops-1").status is AccountStatus.CLOSED


def test_a_customers_own_withdrawal_leaves_the_account_closable() -> None:
    emptied = sent(active(700), "withdraw", T0, "customer:acc-1")
    assert emptied.refundable_until is None
    assert sent(emptied, "close", T0, "admin:ops-1").status is AccountStatus.CLOSED


def test_a_run_from_before_the_hold_closes_as_it_did() -> None:
    charged = sent(active(700), "withdraw", T0, "saga:checkout:cart-1-1")
    closed = sent(charged, "close", T0, "admin:ops-1", old_rules=True)
    assert closed.status is AccountStatus.CLOSED


def test_dormancy_deadline_follows_the_last_command() -> None:
    state = active()
    assert account.deadline(state, OPTIONS) == T0 + timedelta(hours=1)
    later = apply(state, "deposit", at=T0 + timedelta(minutes=30), amount=1)
    assert account.deadline(later, OPTIONS) == T0 + timedelta(minutes=90)
    assert account.deadline(opened(), OPTIONS) is None
    assert account.deadline(apply(state, "suspend"), OPTIONS) is None


def test_dormant_account_is_reactivated_by_money_commands() -> None:
    dormant = account.fire_deadline(active(50), ctx(T0 + timedelta(hours=2)))
    assert dormant.status is AccountStatus.DORMANT
    assert account.deadline(dormant, OPTIONS) is None
    assert apply(dormant, "deposit", amount=1).status is AccountStatus.ACTIVE
    assert apply(dormant, "withdraw", amount=1).status is AccountStatus.ACTIVE
    assert rejected(dormant, "withdraw", amount=51) == "INSUFFICIENT_FUNDS"


def test_transitions_never_mutate_the_state_they_are_given() -> None:
    state = active(100)
    before = state.model_dump()
    apply(state, "withdraw", amount=40)
    apply(state, "suspend")
    assert state.model_dump() == before


def test_interest_is_added_to_an_active_balance_rounded_down() -> None:
    earned = apply(active(balance=10_001), "applyInterest", rate_basis_points=150)
    assert earned.balance == 10_001 + 150  # 1.5% of 10,001 is 150.015
    assert earned.last_activity_at == active().last_activity_at  # not the customer's doing
    suspended = apply(active(balance=100), "suspend", reason="review")
    assert (
        rejected(suspended, "applyInterest", rate_basis_points=150) is ErrorCode.INVALID_TRANSITION
    )
    for rate in (0, 10_001, "150"):
        assert (
            rejected(active(100), "applyInterest", rate_basis_points=rate)
            is ErrorCode.INVALID_INPUT
        )


def test_a_command_is_named_by_its_handle_and_calling_it_runs_its_transition() -> None:
    assert (deposit.entity_type, deposit.name, deposit.model) == ("account", "deposit", Deposit)
    assert account.spec("deposit") is deposit
    assert account.spec("open") is open_account
    assert deposit(active(10), Deposit(amount=5), ctx()).balance == 15


def test_a_policy_refuses_a_command_of_another_entity_type() -> None:
    ledger = EntityType("ledger", state=AccountState, options=AccountOptions)
    with pytest.raises(ValueError, match="'deposit' is a command of account"):
        ledger.permit(actions=[deposit])
