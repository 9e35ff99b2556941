"""Bearer tokens made Principals: HS256, PEM (RS256, ES256) and a JWKS that rotates, and
every way a token can be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api.auth import DEVELOPMENT_PRINCIPAL, TokenVerifier, Unauthenticated
from entities.errors import ErrorCode
from entities.runtime.policy import Principal, Role
from workers.settings import Settings

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
SETTINGS = Settings(auth_secret=SECRET)  # leeway, issuer and audience as by default


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": "tenure",
        "aud": "tenure-api",
        "sub": "ada",
        "iat": now,
        "exp": now + 300,
        "roles": ["customer"],
        "accounts": ["ada", "ada-savings"],
        "scope": "read:account",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**changes: Any) -> str:
    return "Bearer " + jwt.encode(claims(**changes), SECRET, algorithm="HS256")


def verifier(settings: Settings = SETTINGS) -> TokenVerifier:
    built = TokenVerifier.from_settings(settings)
    assert built is not None
    return built


def refused(verify: TokenVerifier, authorization: str | None) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verify.verify(authorization)
    assert caught.value.code is ErrorCode.UNAUTHENTICATED
    return caught.value.message


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: bytes | None = None) -> str:
    """A token built without PyJWT, which refuses to build the forged ones."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if sign is None else hmac.digest(sign, signing_input.encode(), hashlib.sha256)
    return f"Bearer {signing_input}.{b64(signature)}"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# Valid tokens


def test_an_hs256_token_names_the_customer_its_accounts_and_scopes() -> None:
    assert verifier().verify(hs256(scope="read:account account:deposit")) == Principal(
        "ada",
        Role.CUSTOMER,
        frozenset({"ada", "ada-savings"}),
        frozenset({"read:account", "account:deposit"}),
    )


def test_the_claims_are_read_under_the_names_configured_nested_or_not() -> None:
    keycloak_like = SETTINGS.model_copy(
        update={
            "auth_roles_claim": "realm_access.roles",
            "auth_accounts_claim": "https://tenure.example/accounts",
            "auth_scopes_claim": "scp",
        }
    )
    token = hs256(
        roles=None,
        accounts=None,
        scope=None,
        realm_access={"roles": ["customer"]},
        scp="read:account",
        **{"https://tenure.example/accounts": ["ada"]},
    )
    assert verifier(keycloak_like).verify(token) == Principal(
        "ada", Role.CUSTOMER, frozenset({"ada"}), frozenset({"read:account"})
    )
    # Under the default names that token has no role: refused.
    assert "role" in refused(verifier(), token)


def test_scopes_and_roles_may_be_lists_or_strings() -> None:
    principal = verifier().verify(
        hs256(sub="billing", roles="service", scope=["account:deposit", "read:*"])
    )
    assert principal == Principal(
        "billing", Role.SERVICE, frozenset(), frozenset({"account:deposit", "read:*"})
    )


def test_the_most_privileged_known_role_wins_and_only_customers_own_accounts() -> None:
    principal = verifier().verify(hs256(roles=["viewer", "customer", "admin", "service"]))
    assert principal.role is Role.ADMIN
    assert principal.accounts == frozenset()


def test_the_scheme_is_case_insensitive() -> None:
    token = hs256().removeprefix("Bearer ")
    assert verifier().verify(f"bearer {token}").subject == "ada"


def test_leeway_forgives_a_clock_a_little_behind_or_ahead() -> None:
    now = int(time.time())
    assert verifier().verify(hs256(exp=now - 10)).subject == "ada"
    assert verifier().verify(hs256(nbf=now + 10, iat=now + 10)).subject == "ada"


async def test_authenticate_is_verify_for_the_event_loop() -> None:
    assert (await verifier().authenticate(hs256())).role is Role.CUSTOMER


# Refused tokens


def test_an_expired_token_is_refused() -> None:
    assert refused(verifier(), hs256(exp=int(time.time()) - 60)) == "token expired"


def test_a_header_of_megabytes_is_refused_before_it_is_read() -> None:
    assert refused(verifier(), "Bearer " + "a" * 8_000_000).startswith("token too long")
    assert verifier().verify(hs256(sub="s" * 128)).subject == "s" * 128  # a long real one


def test_an_exp_that_is_not_a_number_is_refused() -> None:
    """RFC 7519 asks for a NumericDate; PyJWT alone takes a string of digits."""
    later = str(int(time.time()) + 600)
    assert refused(verifier(), hs256(exp=later)) == "token exp claim is not a number"


def test_a_token_not_yet_valid_is_refused() -> None:
    later = int(time.time()) + 120
    assert refused(verifier(), hs256(nbf=later)) == "token not yet valid"


def test_another_issuer_or_audience_is_refused() -> None:
    assert refused(verifier(), hs256(iss="someone-else")) == "token issuer not accepted"
    assert refused(verifier(), hs256(aud="another-api")) == "token audience not accepted"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
def test_each_required_claim_is_required(claim: str) -> None:
    assert refused(verifier(), hs256(**{claim: None})) == f"token has no {claim} claim"


def test_an_empty_or_overlong_subject_is_refused() -> None:
    assert refused(verifier(), hs256(sub="")) == "token has no valid sub claim"
    assert refused(verifier(), hs256(sub="s" * 129)) == "token has no valid sub claim"


@pytest.mark.parametrize("sub", ["ada\x00", "ada\nadmin", "\u202eada", "a\u200bda"])
def test_a_subject_with_control_or_direction_characters_is_refused(sub: str) -> None:
    """It is recorded with every command and shown in histories as who sent it."""
    assert refused(verifier(), hs256(sub=sub)) == "token has no valid sub claim"
    assert verifier().verify(hs256(sub="auth0|Zoë-Ñ.42")).subject == "auth0|Zoë-Ñ.42"


def test_a_service_cannot_take_an_inbound_webhook_s_name() -> None:
    """Stripe's events are recorded as sent by `service:webhook:stripe`, under the event's
    id: a service token whose sub was `webhook:stripe` sent as the same sender, so its
    commands read as Stripe's in histories and its keys could take Stripe's events' places
    (dropped as repeats). A customer of that name is another sender, and a service of
    another name is taken."""
    service = {"roles": ["service"], "accounts": None}
    assert refused(verifier(), hs256(sub="webhook:stripe", **service)).startswith(
        "token sub webhook:... is reserved"
    )
    assert verifier().verify(hs256(sub="webhook:stripe")).sender == "customer:webhook:stripe"
    assert verifier().verify(hs256(sub="billing-webhook:1", **service)).role is Role.SERVICE


def test_an_exp_past_a_float_s_range_is_refused_not_a_server_error() -> None:
    """A 401-digit integer passed PyJWT and overflowed in the API: HTTP 500."""
    assert refused(verifier(), hs256(exp=10**400)) == "token exp claim is out of range"


def test_a_bad_signature_is_refused() -> None:
    forged = "Bearer " + jwt.encode(claims(roles="admin"), SECRET + "x", algorithm="HS256")
    assert refused(verifier(), forged) == "invalid token"


def test_alg_none_is_refused() -> None:
    unsigned = handmade({"alg": "none", "typ": "JWT"}, claims(roles="admin"))
    assert unsigned.endswith(".")  # really an empty signature
    assert refused(verifier(), unsigned) == "invalid token"


def test_an_hs256_token_signed_with_the_public_key_is_refused(tmp_path: Path) -> None:
    # Key confusion: a verifier that let the token pick HS256 would check this signature
    # with the PEM it holds as the HMAC secret, and accept it.
    public_pem = pem(rsa_key())
    (tmp_path / "key.pem").write_bytes(public_pem)
    rsa_verifier = verifier(Settings(auth_public_key_file=tmp_path / "key.pem"))
    confused = handmade({"alg": "HS256", "typ": "JWT"}, claims(roles="admin"), sign=public_pem)
    assert refused(rsa_verifier, confused) == "invalid token"


def test_an_rs256_token_is_refused_by_an_hs256_verifier() -> None:
    token = jwt.encode(claims(), rsa_key(), algorithm="RS256")
    assert refused(verifier(), f"Bearer {token}") == "invalid token"


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("Bearer", "missing bearer token"),
        ("Bearer   ", "missing bearer token"),
        ("Basic YWRhOnNlY3JldA==", "expected a bearer token"),
        ("Token abc.def.ghi", "expected a bearer token"),
        ("Bearer not-a-jwt", "invalid token"),
        ("Bearer a.b.c", "invalid token"),
        ("Bearer one two", "invalid token"),
    ],
)
def test_a_missing_or_malformed_header_is_refused(authorization: str | None, message: str) -> None:
    assert refused(verifier(), authorization) == message


@pytest.mark.parametrize("roles", [None, "owner", ["viewer"], [], [1], {"admin": True}])
def test_a_token_without_a_known_role_is_refused(roles: Any) -> None:
    assert refused(verifier(), hs256(roles=roles)) == "token has no valid role"


@pytest.mark.parametrize(("claim", "value"), [("accounts", "ada"), ("scope", [1, 2])])
def test_accounts_and_scopes_of_the_wrong_shape_are_refused(claim: str, value: Any) -> None:
    assert refused(verifier(), hs256(**{claim: value})).startswith("token has invalid")


def test_messages_never_carry_the_token() -> None:
    token = hs256(exp=int(time.time()) - 60)
    message = refused(verifier(), token)
    assert token.split()[1] not in message
    assert SECRET not in message


# Configuration


def test_no_key_source_means_no_verifier() -> None:
    assert TokenVerifier.from_settings(Settings()) is None
    assert Principal("development", Role.ADMIN) == DEVELOPMENT_PRINCIPAL


def test_a_short_secret_or_two_key_sources_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier.from_settings(Settings(auth_secret="short"))
    (tmp_path / "key.pem").write_bytes(pem(rsa_key()))
    with pytest.raises(ValueError, match="only one of"):
        TokenVerifier.from_settings(
            Settings(auth_secret=SECRET, auth_public_key_file=tmp_path / "key.pem")
        )
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier.from_settings(Settings(auth_public_key_file=tmp_path / "junk.pem"))


# PEM public keys


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [(rsa_key(), "RS256"), (ec.generate_private_key(ec.SECP256R1()), "ES256")],
    ids=["RS256", "ES256"],
)
def test_a_pem_key_verifies_its_own_algorithm_only(
    tmp_path: Path, private: Any, algorithm: str
) -> None:
    (tmp_path / "key.pem").write_bytes(pem(private))
    pem_verifier = verifier(Settings(auth_public_key_file=tmp_path / "key.pem"))
    token = jwt.encode(claims(roles="admin"), private, algorithm=algorithm)
    assert pem_verifier.verify(f"Bearer {token}").role is Role.ADMIN
    other = "ES256" if algorithm == "RS256" else "RS256"
    stranger = rsa_key() if other == "RS256" else ec.generate_private_key(ec.SECP256R1())
    wrong = jwt.encode(claims(), stranger, algorithm=other)
    assert refused(pem_verifier, f"Bearer {wrong}") == "invalid token"


# JWKS


class JwksServer:
    """A provider's JWKS endpoint on 127.0.0.1 whose keys a test changes; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"

    def publish(self, kid: str, private: rsa.RSAPrivateKey) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        self.keys = [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]


@contextmanager
def jwks_server() -> Iterator[JwksServer]:
    served = JwksServer()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()
        thread.join()


class Clock:
    """A monotonic clock the test moves, so 'a minute later' takes no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def signed(private: rsa.RSAPrivateKey, kid: str, **changes: Any) -> str:
    return "Bearer " + jwt.encode(
        claims(**changes), private, algorithm="RS256", headers={"kid": kid}
    )


async def test_a_rotated_jwks_key_is_fetched_and_unknown_kids_at_most_once_a_minute() -> None:
    key_a, key_b, key_c = rsa_key(), rsa_key(), rsa_key()
    clock = Clock()
    with jwks_server() as provider:
        provider.publish("key-a", key_a)
        jwks = TokenVerifier.from_settings(Settings(auth_jwks_url=provider.url), clock=clock)
        assert jwks is not None

        assert (await jwks.authenticate(signed(key_a, "key-a"))).subject == "ada"
        assert (await jwks.authenticate(signed(key_a, "key-a", sub="bob"))).subject == "bob"
        assert provider.fetches == 1  # the keys are cached

        provider.publish("key-b", key_b)  # the provider rotates: only B now
        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await jwks.authenticate(signed(key_b, "key-b"))  # within a minute of the fetch
        assert provider.fetches == 1

        clock.now += 61
        assert (await jwks.authenticate(signed(key_b, "key-b"))).subject == "ada"
        assert provider.fetches == 2

        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await jwks.authenticate(signed(key_c, "key-c"))
        assert provider.fetches == 2  # refused without asking the provider again

        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await jwks.authenticate(signed(key_a, "key-a"))  # withdrawn by the rotation
        with pytest.raises(Unauthenticated, match="invalid token"):
            await jwks.authenticate(signed(key_c, "key-b"))  # a known kid, the wrong key
        assert provider.fetches == 2


def test_a_jwks_is_fetched_again_when_old_and_kept_when_the_provider_is_down() -> None:
    key_a = rsa_key()
    clock = Clock()
    with jwks_server() as provider:
        provider.publish("key-a", key_a)
        jwks = TokenVerifier.from_settings(Settings(auth_jwks_url=provider.url), clock=clock)
        assert jwks is not None
        assert jwks.verify(signed(key_a, "key-a")).subject == "ada"
        clock.now += 601
        assert jwks.verify(signed(key_a, "key-a")).subject == "ada"
        assert provider.fetches == 2
    clock.now += 601  # the provider is gone: the keys already fetched still verify
    assert jwks.verify(signed(key_a, "key-a")).subject == "ada"


def test_jwks_keys_of_other_kinds_are_ignored() -> None:
    clock = Clock()
    with jwks_server() as provider:
        # A symmetric key in a public JWKS would let anyone sign: it must never verify.
        provider.keys = [{"kty": "oct", "kid": "shared", "k": b64(SECRET.encode())}]
        jwks = TokenVerifier.from_settings(Settings(auth_jwks_url=provider.url), clock=clock)
        assert jwks is not None
        token = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "shared"})
        assert refused(jwks, f"Bearer {token}") == "unknown signing key"


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    verify = verifier(SETTINGS.model_copy(update={"auth_leeway": 0}))
    token = hs256(exp=int(time.time()) + 2)
    assert verify.verify(token).subject == "ada"
    assert verify.verify(token).subject == "ada"  # remembered: the same answer
    time.sleep(2.1)
    assert refused(verify, token) == "token expired"
    # The same claims signed with another key are another token, checked in full.
    forged = "Bearer " + jwt.encode(claims(), "another-secret-" + "x" * 32, algorithm="HS256")
    assert verify.verify(hs256()).subject == "ada"
    assert refused(verify, forged) == "invalid token"
