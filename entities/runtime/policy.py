"""Who may do what to an entity: the callers, and one declarative table per entity type.

Three kinds of caller: `admin` (operators) may do everything declared; `service`
(integrations) what its scopes name (`account:deposit`, `inventory:*`, `read:*`,
`read:account`); `customer` only what the table lets customers do, and only to entities it
owns (the accounts in its token, the carts of those accounts). Reads are the action `read`.
A command the table does not name is refused to everyone: deny by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    ADMIN = "admin"
    SERVICE = "service"
    CUSTOMER = "customer"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who, in which role, owning which accounts, with which
    scopes."""

    subject: str
    role: Role
    accounts: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()

    @property
    def sender(self) -> str:
        """Who it is as a command's sender records it: `role:subject`, `admin:ops-1`."""
        return f"{self.role.value}:{self.subject}"


WEBHOOK_SUBJECTS = "webhook:"
"""How the subject of an inbound webhook's sender begins (`webhook_sender`): no service
token's may, or its commands would be recorded as the provider's events, and its keys
taken for theirs."""


def webhook_sender(source: str) -> str:
    """The sender an inbound webhook's commands from `source` (`stripe`) are recorded as."""
    return Principal(f"{WEBHOOK_SUBJECTS}{source}", Role.SERVICE).sender


READ = "read"

NOBODY = Principal("nobody", Role.SERVICE)
"""A caller with no rights at all: a service without scopes."""


Owner = Callable[[str, Mapping[str, Any] | None], str | None]
"""The account that owns an entity, from its id and its state (or, for a command that
creates it, that command's payload); None when that cannot tell."""


@dataclass(frozen=True)
class Policy:
    """An entity type's table: every action (`read` and each command) that may be done at
    all, those a customer may do, and whose the entity is. Without `owner`, what customers
    may do they may do to every entity of the type (reading inventory)."""

    actions: frozenset[str]
    customer: frozenset[str] = frozenset()
    owner: Owner | None = None

    @classmethod
    def of(
        cls, actions: Iterable[str], customer: Iterable[str] = (), owner: Owner | None = None
    ) -> Policy:
        return cls(frozenset(actions), frozenset(customer), owner)

    def allows(self, principal: Principal, entity_type: str, action: str, owned: bool) -> bool:
        """Whether `principal` may do `action` to an entity of `entity_type`; `owned` says
        whether the entity belongs to the principal (only customers ask it)."""
        if action not in self.actions:
            return False
        if principal.role is Role.ADMIN:
            return True
        if principal.role is Role.SERVICE:
            return _scoped(principal.scopes, entity_type, action)
        return action in self.customer and owned


def _scoped(scopes: Iterable[str], entity_type: str, action: str) -> bool:
    wanted = (
        {"read:*", f"read:{entity_type}", f"{entity_type}:*", f"{entity_type}:read"}
        if action == READ
        else {f"{entity_type}:*", f"{entity_type}:{action}"}
    )
    return not wanted.isdisjoint(scopes)


@dataclass
class PolicyTable:
    """Every entity type's policy, by name; built from the entity declarations."""

    policies: Mapping[str, Policy] = field(default_factory=dict)

    def allows(self, principal: Principal, entity_type: str, action: str, owned: bool) -> bool:
        policy = self.policies.get(entity_type)
        return policy is not None and policy.allows(principal, entity_type, action, owned)
