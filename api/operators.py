"""Who may use the operator tools: the lists that span every entity type and command
(checkouts, bulk commands), and a checkout's retry or resolve."""

from __future__ import annotations

from api.authorization import Forbidden
from api.context import Info
from entities.runtime.policy import Role


def require_operator(info: Info) -> None:
    """Operator tools are for admins alone: no customer, and no service whatever its
    scopes, since they span every entity type and command, and a retry or a resolve
    settles money and stock by hand."""
    if info.context.principal.role is not Role.ADMIN:
        raise Forbidden()
