"""The admin console at /admin: a server-rendered page whose script speaks to /graphql."""

from api.admin.routes import ADMIN_POLICY, admin_console

__all__ = ["ADMIN_POLICY", "admin_console"]
