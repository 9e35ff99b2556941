"""Tokens for development: a signing secret kept in the data directory, and HS256 tokens
signed with it, so `make dev` and `tenure token` need no identity provider. Only the stack's
start (`deploy/dev.py`) creates the secret; `tenure token` reads it."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

import jwt

from entities.errors import ErrorCode, TenureError
from entities.runtime.policy import Role
from workers.settings import Settings

SECRET_FILE = "auth-secret"


def dev_secret(data_dir: Path) -> str:
    """The HS256 secret in `data_dir/auth-secret`, created (mode 0600) on first use, so
    tokens stay valid across restarts. For the process that starts the stack: minting
    reads the secret with `stored_dev_secret`."""
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    draft = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    try:
        # A link never replaces a file: of two processes starting at once, both end up
        # with the secret of whichever linked first, and never with a half-written one.
        os.link(draft, path)
    except FileExistsError:
        secret = path.read_text().strip()
    finally:
        draft.unlink()
    return secret


def stored_dev_secret(data_dir: Path) -> str:
    """The secret `dev_secret` keeps in `data_dir`, never created here: a secret made by a
    minting run (in the wrong directory, say) signs tokens no running API accepts."""
    path = (data_dir / SECRET_FILE).absolute()
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    except OSError as exc:
        raise TenureError(ErrorCode.UNAVAILABLE, f"cannot read {path}: {exc.strerror}") from exc
    if not secret:
        raise TenureError(
            ErrorCode.NOT_FOUND,
            f"no signing secret at {path}: set TENURE_DATA_DIR to the data directory of the "
            "stack `make dev` started (.data in its checkout), or TENURE_AUTH_SECRET to the "
            "secret its API verifies with",
        )
    return secret


def mint(
    secret: str,
    *,
    role: str,
    sub: str,
    accounts: Iterable[str] = (),
    scopes: Iterable[str] = (),
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
    settings: Settings | None = None,
) -> str:
    """An HS256 token for `sub` in `role`; issuer, audience and claim names come from
    `settings` (the defaults when None) unless given."""
    s = settings or Settings()
    now = int(time.time())
    claims = {
        "iss": issuer or s.auth_issuer,
        "aud": audience or s.auth_audience,
        "sub": sub,
        "iat": now,
        "exp": now + ttl_seconds,
        s.auth_roles_claim: [Role(role).value],
        s.auth_accounts_claim: list(accounts),
        s.auth_scopes_claim: " ".join(scopes),
    }
    return jwt.encode(claims, secret, algorithm="HS256")
