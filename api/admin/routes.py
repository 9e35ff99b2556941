"""The admin console's routes: one server-rendered page and its script and style.

The page holds no data. Its script asks `/graphql` with the token pasted into its sign-in
form, so what an operator may see and do is what the API allows that token, and nothing
here needs to authenticate anyone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from entities.account import AccountStatus
from entities.bulk import BulkStatus
from entities.cart import CartStatus
from workers.settings import Settings

_HERE = Path(__file__).parent

# Scripts and styles from the console's own static files only: no inline script, no CDN
# (operators run it offline), and requests only to this origin's /graphql.
ADMIN_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def admin_console(settings: Settings, *, auth_required: bool) -> Mount:
    """The console, to mount at /admin. Without `auth_required` (development with no key
    source) every caller is the development admin, and the page lets one in without a
    token."""
    templates = Jinja2Templates(directory=_HERE / "templates")
    context = {
        "auth_required": auth_required,
        "roles_claim": settings.auth_roles_claim,
        "account_statuses": [status.value for status in AccountStatus],
        "cart_statuses": [status.value for status in CartStatus],
        "bulk_statuses": [status.value for status in BulkStatus],
    }

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(
            request,
            "console.html",
            context,
            headers={"content-security-policy": ADMIN_POLICY, "cache-control": "no-cache"},
        )

    return Mount(
        "/admin",
        routes=[
            Route("/", page, methods=["GET"]),
            Mount("/static", _Revalidated(directory=_HERE / "static"), name="static"),
        ],
        name="admin",
    )


class _Revalidated(StaticFiles):
    """The console's script and style, asked again (and answered 304 by their ETag) on every
    load, as the page is: cached by a browser's own guess, a deploy's new page ran the old
    script."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        return response
