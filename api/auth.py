"""Who is calling: a bearer JWT from the Authorization header, verified, made a `Principal`.

One key source is configured: an HS256 secret, a PEM public key (RS256 or ES256), or an
identity provider's JWKS URL. Only the algorithm of that key verifies, so `alg: none` and
key confusion (an HS256 token signed with a public key) are refused. Every failure is
`Unauthenticated` with a short message that never carries the token or a key.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from entities.errors import ErrorCode, TenureError
from entities.runtime.policy import WEBHOOK_SUBJECTS, Principal, Role
from workers.settings import MIN_SECRET_BYTES, Settings

log = logging.getLogger("tenure.auth")

DEVELOPMENT_PRINCIPAL = Principal("development", Role.ADMIN)
"""Every caller, in development when no key source is configured."""

MAX_SUBJECT = 128
_UNSHOWN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Character categories a subject may not hold: control, format (direction marks, zero
width), surrogate, private and unassigned characters, and line breaks."""
MAX_TIME = 2**53
"""The largest `exp` taken, in seconds: past a float's exact integers (year 285 million)."""
JWKS_REFRESH_INTERVAL = 60.0  # so random `kid`s cannot make us hammer the provider
JWKS_MAX_AGE = 600.0  # so a key the provider withdrew stops verifying
JWKS_FETCH_TIMEOUT = 2.0

# Most privileged first: a token naming several roles gets the first it names.
_ROLE_ORDER = (Role.ADMIN, Role.SERVICE, Role.CUSTOMER)


class Unauthenticated(TenureError):
    """No credentials, or credentials that do not prove who the caller is."""

    def __init__(self, message: str = "invalid token") -> None:
        super().__init__(ErrorCode.UNAUTHENTICATED, message)


@dataclass(frozen=True)
class _Key:
    key: Any  # a secret string or a `cryptography` public key
    algorithm: str


MAX_AUTHORIZATION = 16 * 1024
"""The longest Authorization header read: identity providers' tokens are a few KiB; one of
megabytes would cost its decoding and its digest before it is refused."""
VERIFIED_TOKENS = 10_000
"""Verified Authorization headers remembered, one per active client: some megabytes."""


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    expires: float  # the token's exp with the leeway, in epoch seconds
    key: _Key
    kid: str | None


def _algorithm_for(key: Any) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    return None


class _Jwks:
    """An identity provider's signing keys by `kid`, fetched when a token names a key not
    seen yet (or the set is old), at most once a minute."""

    def __init__(self, url: str, clock: Callable[[], float]) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=JWKS_FETCH_TIMEOUT)
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = threading.Lock()

    def find(self, kid: str) -> _Key | None:
        return self._keys.get(kid)

    def due(self, kid: str) -> bool:
        now = self._clock()
        fresh = self._fetched_at is not None and now - self._fetched_at < JWKS_MAX_AGE
        if kid in self._keys and fresh:
            return False
        return self._attempted_at is None or now - self._attempted_at >= JWKS_REFRESH_INTERVAL

    def refresh(self, kid: str) -> None:
        """Fetch the set if still due; blocking, so the API calls it in a thread."""
        with self._lock:
            # Callers that queued behind a fetch find it done and do not fetch again.
            if not self.due(kid):
                return
            self._attempted_at = self._clock()
            try:
                data = self._client.fetch_data()
                keys = _parse_jwks(data)
            except (jwt.PyJWTError, ValueError, OSError) as exc:
                # Keep the keys we have: a provider outage should not log everyone out.
                log.warning("could not fetch the JWKS: %s", type(exc).__name__)
                return
            self._keys = keys
            self._fetched_at = self._attempted_at


def _parse_jwks(data: Any) -> dict[str, _Key]:
    entries = data.get("keys") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWK set")
    keys: dict[str, _Key] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            public = jwt.PyJWK(dict(entry)).key
        except jwt.PyJWTError:
            continue  # a key type we cannot use, e.g. one for encryption
        algorithm = _algorithm_for(public)
        # Symmetric ("oct") keys are skipped here: a JWKS is public.
        if algorithm is None or entry.get("alg", algorithm) != algorithm:
            continue
        keys[entry["kid"]] = _Key(public, algorithm)
    return keys


class TokenVerifier:
    """Turns an Authorization header into a `Principal`, or raises `Unauthenticated`."""

    def __init__(
        self,
        settings: Settings,
        *,
        key: _Key | None = None,
        jwks: _Jwks | None = None,
    ) -> None:
        if (key is None) == (jwks is None):
            raise ValueError("a TokenVerifier needs exactly one key source")
        self._settings = settings
        self._key = key
        self._jwks = jwks
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> TokenVerifier | None:
        """The verifier for the configured key source, or None when there is none; raises
        ValueError when the configuration cannot be used safely."""
        sources = [
            name
            for name, value in (
                ("TENURE_AUTH_SECRET", settings.auth_secret),
                ("TENURE_AUTH_PUBLIC_KEY_FILE", settings.auth_public_key_file),
                ("TENURE_AUTH_JWKS_URL", settings.auth_jwks_url),
            )
            if value
        ]
        if not sources:
            return None
        if len(sources) > 1:
            # Two kinds of key would let a token pick the weaker one.
            raise ValueError(f"set only one of {', '.join(sources)}")
        if settings.auth_secret:
            if len(settings.auth_secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"TENURE_AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes")
            return cls(settings, key=_Key(settings.auth_secret, "HS256"))
        if settings.auth_public_key_file:
            try:
                public = load_pem_public_key(settings.auth_public_key_file.read_bytes())
            except (OSError, ValueError) as exc:
                raise ValueError("TENURE_AUTH_PUBLIC_KEY_FILE is not a PEM public key") from exc
            algorithm = _algorithm_for(public)
            if algorithm is None:
                raise ValueError("TENURE_AUTH_PUBLIC_KEY_FILE must be an RSA or P-256 key")
            return cls(settings, key=_Key(public, algorithm))
        assert settings.auth_jwks_url
        try:
            jwks = _Jwks(settings.auth_jwks_url, clock)
        except jwt.PyJWTError as exc:
            raise ValueError("TENURE_AUTH_JWKS_URL must be an http(s) URL") from exc
        return cls(settings, jwks=jwks)

    def verify(self, authorization: str | None) -> Principal:
        """The caller named by an Authorization header; a JWKS fetch, when one is due,
        blocks the calling thread."""
        _bounded(authorization)
        known = self._known(authorization)
        if known is not None:
            return known
        token, kid = _read(authorization)
        if self._jwks is not None and kid is not None and self._jwks.due(kid):
            self._jwks.refresh(kid)
        return self._principal(authorization, token, kid)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an Authorization header; the API's entry point, which never
        blocks the event loop on a JWKS fetch."""
        _bounded(authorization)
        known = self._known(authorization)
        if known is not None:
            return known
        token, kid = _read(authorization)
        if self._jwks is not None and kid is not None and self._jwks.due(kid):
            await asyncio.to_thread(self._jwks.refresh, kid)
        return self._principal(authorization, token, kid)

    @property
    def keys_withdrawable(self) -> bool:
        """Whether a key this verifier accepts can be withdrawn while the API runs: a JWKS's
        can, a configured secret or PEM key cannot."""
        return self._jwks is not None

    def expires(self, authorization: str | None) -> float | None:
        """When a header just verified stops being accepted: its token's `exp` with the
        leeway, in epoch seconds."""
        verified = self._verified.get(authorization) if authorization else None
        return verified.expires if verified is not None else None

    def _known(self, authorization: str | None) -> Principal | None:
        """The caller of a header verified before, while its token is unexpired and the key
        that signed it still stands: the same bytes check the same way, so a client's every
        request after its first costs a dictionary lookup, not a signature."""
        verified = self._verified.get(authorization) if authorization else None
        if verified is None:
            return None
        key_stands = self._jwks is None or (
            verified.kid is not None
            and self._jwks.find(verified.kid) is verified.key
            and not self._jwks.due(verified.kid)  # an old set is fetched again first
        )
        if time.time() >= verified.expires or not key_stands:
            del self._verified[authorization]  # type: ignore[arg-type]
            return None
        self._verified.move_to_end(authorization)  # type: ignore[arg-type]
        return verified.principal

    def _principal(self, authorization: str | None, token: str, kid: str | None) -> Principal:
        key = self._key
        if self._jwks is not None:
            key = self._jwks.find(kid) if kid is not None else None
            if key is None:
                raise Unauthenticated("unknown signing key")
        assert key is not None
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                issuer=s.auth_issuer,
                audience=s.auth_audience,
                leeway=s.auth_leeway,
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("token not yet valid") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("token issuer not accepted") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated("token audience not accepted") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token has no {exc.claim} claim") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("invalid token") from exc
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            # PyJWT takes a string of digits; RFC 7519 asks for a number.
            raise Unauthenticated("token exp claim is not a number")
        if not -MAX_TIME <= exp <= MAX_TIME:
            # An integer past a float's range passed PyJWT, then overflowed here: HTTP 500.
            raise Unauthenticated("token exp claim is out of range")
        principal = self._from_claims(claims)
        if authorization:
            expires = exp + s.auth_leeway
            self._verified[authorization] = _Verified(principal, expires, key, kid)
            if len(self._verified) > VERIFIED_TOKENS:
                self._verified.popitem(last=False)
        return principal

    def _from_claims(self, claims: Mapping[str, Any]) -> Principal:
        s = self._settings
        subject = claims["sub"]
        if (
            not isinstance(subject, str)
            or not subject
            or len(subject) > MAX_SUBJECT
            or any(unicodedata.category(c) in _UNSHOWN for c in subject)
        ):
            # It is recorded with every command the caller sends, and shown in histories: a
            # name, not a payload, without control or direction characters.
            raise Unauthenticated("token has no valid sub claim")
        role = _role(claim(claims, s.auth_roles_claim))
        if role is Role.SERVICE and subject.startswith(WEBHOOK_SUBJECTS):
            raise Unauthenticated(
                f"token sub {WEBHOOK_SUBJECTS}... is reserved: inbound webhooks send as it"
            )
        scopes = _strings(claim(claims, s.auth_scopes_claim), "scopes", split=True)
        # Only a customer's accounts mean anything: they are what it owns.
        accounts = _strings(claim(claims, s.auth_accounts_claim), "accounts", split=False)
        if role is not Role.CUSTOMER:
            accounts = frozenset()
        return Principal(subject, role, accounts, scopes)


def claim(claims: Mapping[str, Any], name: str) -> Any:
    """The claim called `name`; failing that, a dotted name is a path into nested claims, as
    identity providers nest them (Keycloak's `realm_access.roles`). A name with dots of its
    own (Auth0's `https://example.com/roles`) is found as it is first."""
    if name in claims or "." not in name:
        return claims.get(name)
    found: Any = claims
    for part in name.split("."):
        if not isinstance(found, Mapping) or part not in found:
            return None
        found = found[part]
    return found


def _bounded(authorization: str | None) -> None:
    if authorization is not None and len(authorization) > MAX_AUTHORIZATION:
        raise Unauthenticated(f"token too long (at most {MAX_AUTHORIZATION} characters)")


def _read(authorization: str | None) -> tuple[str, str | None]:
    if not authorization or not authorization.strip():
        raise Unauthenticated("missing bearer token")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        raise Unauthenticated("expected a bearer token")
    if not token or " " in token:
        raise Unauthenticated("missing bearer token" if not token else "invalid token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated("invalid token") from exc
    kid = header.get("kid")
    return token, kid if isinstance(kid, str) else None


def _role(value: Any) -> Role:
    named = {value} if isinstance(value, str) else value
    if not isinstance(named, list | set) or not all(isinstance(r, str) for r in named):
        raise Unauthenticated("token has no valid role")
    for role in _ROLE_ORDER:
        if role.value in named:
            return role
    raise Unauthenticated("token has no valid role")


def _strings(value: Any, what: str, *, split: bool) -> frozenset[str]:
    if value is None:
        return frozenset()
    if split and isinstance(value, str):
        return frozenset(value.split())  # OAuth's space-separated `scope`
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise Unauthenticated(f"token has invalid {what}")
