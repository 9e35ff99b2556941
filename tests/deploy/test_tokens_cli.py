"""Development tokens: the secret kept in the data directory and `tenure token`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from api.auth import TokenVerifier
from deploy.cli import main
from deploy.tokens import dev_secret, mint
from entities.runtime.policy import Principal, Role
from workers.settings import Settings

AUTH_VARIABLES = ("TENURE_AUTH_SECRET", "TENURE_AUTH_PUBLIC_KEY_FILE", "TENURE_AUTH_JWKS_URL")


def verify(secret: str, token: str) -> Principal:
    verifier = TokenVerifier.from_settings(Settings(auth_secret=secret))
    assert verifier is not None
    return verifier.verify(f"Bearer {token}")


def tenure_token(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["token", *args])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TENURE_DATA_DIR", str(tmp_path))
    return monkeypatch


def test_the_dev_secret_is_private_and_kept_across_restarts(tmp_path: Path) -> None:
    secret = dev_secret(tmp_path / "data")
    assert len(secret) >= 32
    assert stat.S_IMODE((tmp_path / "data" / "auth-secret").stat().st_mode) == 0o600
    assert dev_secret(tmp_path / "data") == secret
    assert dev_secret(tmp_path / "elsewhere") != secret
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["auth-secret"]


def test_a_minted_token_verifies_as_what_it_names(tmp_path: Path) -> None:
    secret = dev_secret(tmp_path)
    token = mint(secret, role="customer", sub="ada", accounts=["ada"], scopes=["read:account"])
    assert verify(secret, token) == Principal(
        "ada", Role.CUSTOMER, frozenset({"ada"}), frozenset({"read:account"})
    )
    with pytest.raises(ValueError):
        mint(secret, role="owner", sub="ada")


def test_tenure_token_prints_a_token_signed_with_the_dev_secret(
    environment: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = dev_secret(tmp_path)  # as `make dev` keeps it
    code, out, err = tenure_token(
        ["--role", "service", "--sub", "billing", "--scopes", "account:deposit read:*"], capsys
    )
    assert (code, err) == (0, "")
    assert out.count("\n") == 1  # the token alone, ready for $(tenure token ...)
    assert verify(secret, out.strip()) == Principal(
        "billing", Role.SERVICE, frozenset(), frozenset({"account:deposit", "read:*"})
    )


def test_tenure_token_prefers_the_configured_secret(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "a-configured-secret-that-is-long-enough-for-hs256"
    environment.setenv("TENURE_AUTH_SECRET", secret)
    code, out, _ = tenure_token(
        ["--role", "customer", "--sub", "ada", "--accounts", "ada, ada-savings"], capsys
    )
    assert code == 0
    assert verify(secret, out.strip()).accounts == frozenset({"ada", "ada-savings"})


def test_tenure_token_refuses_a_secret_the_api_would_refuse(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("TENURE_AUTH_SECRET", "short")
    code, out, err = tenure_token(["--role", "admin", "--sub", "me"], capsys)
    assert (code, out) == (1, "")
    assert err == "tenure token: TENURE_AUTH_SECRET must be at least 32 bytes\n"


def test_tenure_token_refuses_when_an_identity_provider_signs(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("TENURE_AUTH_JWKS_URL", "https://id.example.com/jwks.json")
    code, out, err = tenure_token(["--role", "admin", "--sub", "me"], capsys)
    assert (code, out) == (1, "")
    assert "identity provider" in err


def test_tenure_token_refuses_a_service_named_as_an_inbound_webhook(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The API would refuse every request with it (401)."""
    code, out, err = tenure_token(["--role", "service", "--sub", "webhook:stripe"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("tenure token: a service's --sub may not begin webhook:")


def test_tenure_token_takes_only_known_roles(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = tenure_token(["--role", "owner", "--sub", "me"], capsys)
    assert (code, out) == (2, "")
    assert "invalid choice" in err


def test_tenure_token_never_creates_the_secret(
    environment: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret made by `tenure token` would sign tokens no running API accepts."""
    code, out, err = tenure_token(["--role", "admin", "--sub", "me"], capsys)
    assert (code, out) == (1, "")
    assert f"no signing secret at {tmp_path / 'auth-secret'}" in err
    assert "TENURE_DATA_DIR" in err and "TENURE_AUTH_SECRET" in err
    assert list(tmp_path.iterdir()) == []


def test_tenure_token_run_outside_the_checkout_says_where_it_looked(
    environment: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.delenv("TENURE_DATA_DIR")
    environment.chdir(tmp_path)
    code, out, err = tenure_token(["--role", "admin", "--sub", "me"], capsys)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert f"no signing secret at {tmp_path / '.data' / 'auth-secret'}:" in err
    assert not (tmp_path / ".data").exists()


@pytest.mark.parametrize("ttl", ["0", "-60", "soon"])
def test_tenure_token_refuses_a_ttl_that_is_not_above_zero(
    environment: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    dev_secret(tmp_path)
    code, out, err = tenure_token(["--role", "admin", "--sub", "me", "--ttl", ttl], capsys)
    assert (code, out) == (2, "")
    assert f"argument --ttl: {ttl!r} is not a whole number of seconds above 0" in err
