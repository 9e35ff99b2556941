"""GraphQL binding of the Account entity."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from api.common import (
    CommandPayload,
    Consistency,
    EntityState,
    IdempotencyKey,
    Long,
    ReadConsistency,
    Wait,
    new_entity_id,
    read_entity,
    read_fields,
    receipt_fields,
    send_command,
)
from api.context import Info
from api.gateway import EntityRead, Receipt
from api.read_plans import entity_read_field
from entities import account as domain
from entities.account import AccountState, AccountStatus
from entities.runtime.entity import Command

ENTITY = domain.account.name

strawberry.enum(AccountStatus, description="Where an account is in its lifecycle.")


@strawberry.type(description="A customer's money account.")
class Account(EntityState):
    status: AccountStatus
    owner_name: str
    email: str
    currency: str
    balance: Long = strawberry.field(description="In minor units of `currency`.")
    last_activity_at: datetime
    suspension_reason: str | None
    kyc_reference: str | None

    @classmethod
    def from_read(cls, read: EntityRead) -> Account:
        state = AccountState.model_validate(read.snapshot.state)
        return cls(
            **read_fields(read),
            status=state.status,
            owner_name=state.owner_name,
            email=state.email,
            currency=state.currency,
            balance=Long(state.balance),
            last_activity_at=state.last_activity_at,
            suspension_reason=state.suspension_reason,
            kyc_reference=state.kyc_reference,
        )


@strawberry.type(description="A command sent to an account; `account` is set when waited for.")
class AccountCommandPayload(CommandPayload):
    account_id: strawberry.ID
    account: Account | None

    @classmethod
    def from_receipt(cls, receipt: Receipt) -> AccountCommandPayload:
        return cls(
            account_id=strawberry.ID(receipt.entity_id),
            **receipt_fields(receipt),
            account=Account.from_read(receipt.read) if receipt.read else None,
        )


async def _command(
    info: Info,
    account_id: str,
    command: Command[Any, Any, Any],
    idempotency_key: str | None,
    wait: bool,
    **payload: object,
) -> AccountCommandPayload:
    receipt = await send_command(info, command, account_id, payload, idempotency_key, wait)
    return AccountCommandPayload.from_receipt(receipt)


@strawberry.type
class AccountQuery:
    @strawberry.field(description="An account, or null when it never existed.")
    async def account(
        self, info: Info, id: strawberry.ID, consistency: ReadConsistency = Consistency.CACHED
    ) -> Account | None:
        read = await read_entity(info, ENTITY, id, consistency)
        return Account.from_read(read) if read else None


entity_read_field("account", ENTITY)


@strawberry.type
class AccountMutation:
    @strawberry.mutation(description="Open an account (PENDING until verified).")
    async def open_account(
        self,
        info: Info,
        owner_name: str,
        email: str,
        currency: str = "EUR",
        id: strawberry.ID | None = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        account_id = id if id is not None else new_entity_id(info, idempotency_key)
        return await _command(
            info,
            account_id,
            domain.open_account,
            idempotency_key,
            wait,
            owner_name=owner_name,
            email=email,
            currency=currency,
        )

    @strawberry.mutation(description="Mark KYC as passed: PENDING -> ACTIVE.")
    async def verify_account(
        self,
        info: Info,
        id: strawberry.ID,
        kyc_reference: str | None = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        return await _command(
            info, id, domain.verify, idempotency_key, wait, kyc_reference=kyc_reference
        )

    @strawberry.mutation(description="Add money; reactivates a DORMANT account.")
    async def deposit_to_account(
        self,
        info: Info,
        id: strawberry.ID,
        amount: Long,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        return await _command(info, id, domain.deposit, idempotency_key, wait, amount=amount)

    @strawberry.mutation(description="Take money out; never beyond the balance.")
    async def withdraw_from_account(
        self,
        info: Info,
        id: strawberry.ID,
        amount: Long,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        return await _command(info, id, domain.withdraw, idempotency_key, wait, amount=amount)

    @strawberry.mutation(description="Freeze an account: money commands are refused.")
    async def suspend_account(
        self,
        info: Info,
        id: strawberry.ID,
        reason: str | None = None,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        return await _command(info, id, domain.suspend, idempotency_key, wait, reason=reason)

    @strawberry.mutation(description="Lift a suspension: SUSPENDED -> ACTIVE.")
    async def reactivate_account(
        self,
        info: Info,
        id: strawberry.ID,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        return await _command(info, id, domain.reactivate, idempotency_key, wait)

    @strawberry.mutation(description="Close an account for good; its balance must be zero.")
    async def close_account(
        self,
        info: Info,
        id: strawberry.ID,
        idempotency_key: IdempotencyKey = None,
        wait: Wait = False,
    ) -> AccountCommandPayload | None:
        return await _command(info, id, domain.close, idempotency_key, wait)
