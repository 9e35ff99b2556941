"""Account: a customer's money account, from opening and KYC to closing, with dormancy."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from entities.errors import ErrorCode, Rejected
    from entities.runtime import CommandContext, EntityRunInput, EntityType, EntityWorkflow
    from entities.runtime.effects import sent_by_saga
    from entities.runtime.entity import (
        MAX_AMOUNT,
        MAX_MONEY,
        PRINTABLE,
        SHOWN_AS_WRITTEN,
        strict_bound,
    )
    from entities.runtime.envelope import Snapshot
    from entities.runtime.policy import READ

_ISO_4217_CODES = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR
FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD
JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT
MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG
QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB
TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF
XPF YER ZAR ZMW ZWG ZWL
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())
"""ISO 4217's currencies in use (its list of 2025, without the funds-only units, precious
metals and testing codes), kept here rather than taken from a library whose next release
would change what a replayed history accepts."""
Currency = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Z]{3}$"),
    strict_bound(lambda code: code in ISO_4217, "an ISO 4217 currency code, such as EUR"),
]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=PRINTABLE),
    SHOWN_AS_WRITTEN,
]
Note = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=500, pattern=PRINTABLE),
    SHOWN_AS_WRITTEN,
]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
    strict_bound(
        lambda email: not any(unicodedata.category(char) in ("Cc", "Cf") for char in email),
        "an email has no control or formatting characters",
        since=2,
    ),
]
Amount = Annotated[
    int, Field(gt=0, le=MAX_AMOUNT, strict=True, description="minor units, e.g. cents")
]


class AccountStatus(StrEnum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    DORMANT = "DORMANT"
    CLOSED = "CLOSED"


class AccountState(BaseModel):
    status: AccountStatus
    owner_name: str
    email: str
    currency: str
    balance: int = 0
    last_activity_at: datetime
    suspension_reason: str | None = None
    kyc_reference: str | None = None
    refundable_until: datetime | None = Field(
        default=None,
        description="Until when a saga that charged the account (a checkout) may still "
        "refund it: the account is not closed before then.",
    )


class AccountOptions(BaseModel):
    dormancy_seconds: float = Field(default=365 * 24 * 3600, gt=0)
    refund_hold_seconds: float = Field(
        default=3600,
        ge=0,
        description="How long after a saga charged the account it is not closed, so that "
        "the saga's refund, should a later step fail, finds it open. A checkout's steps after "
        "its withdrawal give up within minutes (5 attempts of at most 30 s, 30 s apart).",
    )


class OpenAccount(BaseModel, extra="forbid"):
    owner_name: Name
    email: Email
    currency: Currency = "EUR"


class VerifyAccount(BaseModel, extra="forbid"):
    kyc_reference: Annotated[Note, StringConstraints(max_length=200)] | None = None


class Deposit(BaseModel, extra="forbid"):
    amount: Amount


class Withdraw(BaseModel, extra="forbid"):
    amount: Amount


class Refund(BaseModel, extra="forbid"):
    amount: Amount


class ApplyInterest(BaseModel, extra="forbid"):
    rate_basis_points: int = Field(
        gt=0,
        le=10_000,
        strict=True,
        description="Interest in hundredths of a percent of the balance: 150 is 1.5%.",
    )


class Suspend(BaseModel, extra="forbid"):
    reason: Note | None = None


class Reactivate(BaseModel, extra="forbid"):
    pass


class Close(BaseModel, extra="forbid"):
    pass


account: EntityType[AccountState, AccountOptions] = EntityType(
    "account",
    state=AccountState,
    options=AccountOptions,
    is_terminal=lambda s: s.status is AccountStatus.CLOSED,
)

Ctx = CommandContext[AccountOptions]


def _require(state: AccountState, *allowed: AccountStatus, action: str) -> None:
    if state.status not in allowed:
        raise Rejected(
            ErrorCode.INVALID_TRANSITION,
            f"cannot {action} an account that is {state.status.value}",
        )


@account.command(OpenAccount, creates=True, name="open")
def open_account(state: AccountState | None, cmd: OpenAccount, ctx: Ctx) -> AccountState:
    if state is not None:
        raise Rejected(ErrorCode.ALREADY_EXISTS, f"account {ctx.entity_id} is already open")
    return AccountState(
        status=AccountStatus.PENDING,
        owner_name=cmd.owner_name,
        email=cmd.email,
        currency=cmd.currency,
        last_activity_at=ctx.now,
    )


@account.command(VerifyAccount)
def verify(state: AccountState, cmd: VerifyAccount, ctx: Ctx) -> AccountState:
    _require(state, AccountStatus.PENDING, action="verify")
    return state.model_copy(
        update={
            "status": AccountStatus.ACTIVE,
            "kyc_reference": cmd.kyc_reference,
            "last_activity_at": ctx.now,
        }
    )


def _money_movable(state: AccountState, action: str) -> None:
    _require(state, AccountStatus.ACTIVE, AccountStatus.DORMANT, action=action)


def _within_limit(state: AccountState, amount: int) -> None:
    if state.balance + amount > MAX_MONEY:
        raise Rejected(
            ErrorCode.LIMIT_REACHED, f"a balance is at most {MAX_MONEY} (2^53 - 1) minor units"
        )


@account.command(Deposit)
def deposit(state: AccountState, cmd: Deposit, ctx: Ctx) -> AccountState:
    _money_movable(state, "deposit to")
    _within_limit(state, cmd.amount)
    return state.model_copy(
        update={
            "status": AccountStatus.ACTIVE,
            "balance": state.balance + cmd.amount,
            "last_activity_at": ctx.now,
        }
    )


@account.command(ApplyInterest, name="applyInterest")
def apply_interest(state: AccountState, cmd: ApplyInterest, ctx: Ctx) -> AccountState:
    """A period's interest on an active account, rounded down to the minor unit; it is not
    the customer's activity, so it does not keep a dormant account awake."""
    _require(state, AccountStatus.ACTIVE, action="apply interest to")
    interest = state.balance * cmd.rate_basis_points // 10_000
    _within_limit(state, interest)
    return state.model_copy(update={"balance": state.balance + interest})


@account.command(Withdraw)
def withdraw(state: AccountState, cmd: Withdraw, ctx: Ctx) -> AccountState:
    _money_movable(state, "withdraw from")
    if cmd.amount > state.balance:
        # Not the balance itself: the refusal reaches whoever reads the checkout it failed
        # (a service scoped to carts or checkouts alone), where "balance 4321 is less
        # than ..." told it an account's balance.
        raise Rejected(
            ErrorCode.INSUFFICIENT_FUNDS, f"the balance is less than the {cmd.amount} asked for"
        )
    update: dict[str, object] = {
        "status": AccountStatus.ACTIVE,
        "balance": state.balance - cmd.amount,
        "last_activity_at": ctx.now,
    }
    if sent_by_saga(ctx.sent_by):
        # A checkout that charged the account refunds it should a later step fail: it must
        # find the account open (a refund to a closed account is refused, and the customer
        # paid for nothing). Runs replaying a close from before this rule close as they did
        # (`close` asks rules level 4).
        hold = timedelta(seconds=ctx.options.refund_hold_seconds)
        update["refundable_until"] = max(ctx.now + hold, state.refundable_until or ctx.now)
    return state.model_copy(update=update)


@account.command(Refund, internal=True)
def refund(state: AccountState, cmd: Refund, ctx: Ctx) -> AccountState:
    """Money coming back from a purchase taken back: accepted even while SUSPENDED, since
    a suspension must not keep a customer's own money from returning."""
    _require(
        state,
        AccountStatus.ACTIVE,
        AccountStatus.DORMANT,
        AccountStatus.SUSPENDED,
        action="refund to",
    )
    _within_limit(state, cmd.amount)
    status = AccountStatus.ACTIVE if state.status is AccountStatus.DORMANT else state.status
    return state.model_copy(
        update={
            "status": status,
            "balance": state.balance + cmd.amount,
            "last_activity_at": ctx.now,
        }
    )


@account.command(Suspend)
def suspend(state: AccountState, cmd: Suspend, ctx: Ctx) -> AccountState:
    _require(state, AccountStatus.ACTIVE, AccountStatus.DORMANT, action="suspend")
    return state.model_copy(
        update={
            "status": AccountStatus.SUSPENDED,
            "suspension_reason": cmd.reason,
            "last_activity_at": ctx.now,
        }
    )


@account.command(Reactivate)
def reactivate(state: AccountState, cmd: Reactivate, ctx: Ctx) -> AccountState:
    _require(state, AccountStatus.SUSPENDED, action="reactivate")
    return state.model_copy(
        update={
            "status": AccountStatus.ACTIVE,
            "suspension_reason": None,
            "last_activity_at": ctx.now,
        }
    )


@account.command(Close)
def close(state: AccountState, cmd: Close, ctx: Ctx) -> AccountState:
    if state.balance != 0:
        raise Rejected(
            ErrorCode.INVALID_TRANSITION,
            f"cannot close an account holding {state.balance}; withdraw it first",
        )
    held = state.refundable_until
    # Asked only where the rule decides: no other close records its patch marker.
    if held is not None and ctx.now < held and ctx.rules_from(4):
        raise Rejected(
            ErrorCode.INVALID_TRANSITION,
            "cannot close an account a checkout charged while the checkout may still refund "
            f"it; it can be closed from {held.isoformat(timespec='seconds')}",
        )
    return state.model_copy(update={"status": AccountStatus.CLOSED, "last_activity_at": ctx.now})


def _dormant_after(state: AccountState, options: AccountOptions) -> datetime | None:
    if state.status is not AccountStatus.ACTIVE:
        return None
    return state.last_activity_at + timedelta(seconds=options.dormancy_seconds)


@account.timer(_dormant_after)
def become_dormant(state: AccountState, ctx: Ctx) -> AccountState:
    return state.model_copy(update={"status": AccountStatus.DORMANT})


account.permit(
    actions=[
        READ,
        open_account,
        verify,
        deposit,
        withdraw,
        refund,
        apply_interest,
        suspend,
        reactivate,
        close,
    ],
    # A customer reads and moves money on the accounts in its token; opening, KYC,
    # suspension and closing are the operators' and integrations'.
    customer=[READ, deposit, withdraw],
    owner=lambda account_id, _: account_id,
)


account.listing(
    status=lambda s: s.status.value,
    text=lambda s: [s.owner_name, s.email],
    owned_by="id",
)


@workflow.defn(name="Account")
class AccountWorkflow(EntityWorkflow):
    """The Account actor."""

    entity = account

    @workflow.run
    async def run(self, input: EntityRunInput) -> Snapshot:
        return await self.run_entity()
