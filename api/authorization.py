"""Enforcing each entity type's policy (`EntityType.permit`) for the caller of a request.

Every read and every command of the API passes here before it costs anything else. A
refusal is FORBIDDEN with the same message whether or not the entity exists, so that a
customer cannot probe for other customers' accounts or carts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from api.errors import TooManyQueries
from api.gateway import CacheLookup, Consistency, EntityGateway, EntityRead, unbudgeted
from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.policy import READ, Principal, Role


class Forbidden(TenureError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.FORBIDDEN, "not allowed for this caller")


def sees_command_ids(principal: Principal, entity_type: str) -> bool:
    """Whether `principal` may see the command ids of an entity of this type: all but a
    customer on a type without owners, which customers read in full (an inventory item) and
    whose command ids name other customers' carts and checkouts."""
    return (
        principal.role is not Role.CUSTOMER
        or catalog.entity_types()[entity_type].policy.owner is not None
    )


class Authorizer:
    """Decides, per request, whether its principal may do an action to an entity."""

    def __init__(self, gateway: EntityGateway) -> None:
        self._gateway = gateway
        self._types = catalog.entity_types()

    def decided_without_state(self, principal: Principal, entity_type: str, entity_id: str) -> bool:
        """Whether `principal` may read the entity, when that needs no look at its state;
        False also when it would (the caller then goes the long way, through `require`)."""
        policy = self._types[entity_type].policy
        if principal.role is not Role.CUSTOMER or policy.owner is None:
            return policy.allows(principal, entity_type, READ, owned=True)
        owner = policy.owner(entity_id, None)
        return owner is not None and policy.allows(
            principal, entity_type, READ, owned=owner in principal.accounts
        )

    async def require(
        self,
        principal: Principal,
        entity_type: str,
        entity_id: str,
        action: str,
        payload: Mapping[str, Any] | None = None,
        *,
        looked_up: CacheLookup | None = None,
        known: EntityRead | None = None,
    ) -> None:
        """Raise Forbidden unless `principal` may do `action` (`read` or a command with
        `payload`) to the entity; `looked_up` is its cache entry, when the request has read
        it already, and `known` the entity itself, when the request has it (a waited
        command's answer)."""
        entity = self._types[entity_type]
        policy = entity.policy
        if principal.role is not Role.CUSTOMER or policy.owner is None:
            if not policy.allows(principal, entity_type, action, owned=True):
                raise Forbidden()
            return
        if not policy.allows(principal, entity_type, action, owned=True):
            raise Forbidden()  # not a customer's action at all: no need to look
        creates = action != READ and entity.commands[action].creates
        named = policy.owner(entity_id, payload) if creates else None
        if named is not None and named not in principal.accounts:
            # A create names its owner: only one of the caller's, whether the entity exists
            # or not. Refused before anything is looked up (a createCart of one's own cart
            # naming another's account counted against that account's carts, and told
            # whether it exists).
            raise Forbidden()
        owner = policy.owner(entity_id, None)
        if owner is None and known is not None:
            owner = policy.owner(entity_id, known.snapshot.state)
        elif owner is None:
            # A create's look is most often at an entity not made yet, which no cache holds:
            # one the request's live reads need not pay for (each mutation makes one at most).
            with unbudgeted() if creates else contextlib.nullcontext():
                owner = await self._owner_from_state(entity_type, entity_id, looked_up)
            if creates and owner is None:
                # A command that makes the entity names its owner; one that exists already
                # keeps its own.
                owner = policy.owner(entity_id, payload)
        if owner is None or owner not in principal.accounts:
            raise Forbidden()

    async def require_history(self, principal: Principal, entity_type: str, entity_id: str) -> None:
        """Raise Forbidden unless `principal` may read the entity's command history: whoever
        may read the entity and see its command ids (`sees_command_ids`)."""
        if not sees_command_ids(principal, entity_type):
            raise Forbidden()
        await self.require(principal, entity_type, entity_id, READ)

    async def allows(
        self,
        principal: Principal,
        entity_type: str,
        entity_id: str,
        action: str,
        *,
        known: EntityRead | None = None,
    ) -> bool:
        """Whether `principal` may do `action` to the entity; `require` without raising."""
        try:
            await self.require(principal, entity_type, entity_id, action, known=known)
        except Forbidden:
            return False
        return True

    async def _owner_from_state(
        self, entity_type: str, entity_id: str, looked_up: CacheLookup | None = None
    ) -> str | None:
        policy = self._types[entity_type].policy
        assert policy.owner is not None
        try:
            read = await self._gateway.read(
                entity_type, entity_id, Consistency.CACHED, looked_up=looked_up
            )
        except TooManyQueries:
            # Said as TOO_MANY_LIVE_READS, it would tell an entity the cache holds (no query
            # needed) from one that does not exist: refused alike.
            raise Forbidden() from None
        if read is None or read.snapshot.state is None:
            return None
        return policy.owner(entity_id, read.snapshot.state)
