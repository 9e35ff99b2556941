"""The one settings object: read from the environment, handed to child processes intact."""

from __future__ import annotations

import pytest

from workers.settings import Settings, SettingsError


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.temporal_address is None and settings.redis_url is None
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert settings.runtime.max_commands_per_run == 4000
    assert settings.sticky_timeout == 10  # Temporal's own default


def test_the_environment_sets_servers_runtime_and_entity_options() -> None:
    settings = Settings.from_env(
        {
            "TEMPORAL_ADDRESS": "temporal:7233",
            "REDIS_URL": "redis://cache:6379/2",
            "API_PORT": "9000",
            "TENURE_MAX_COMMANDS_PER_RUN": "50",
            "TENURE_ENTITY_OPTIONS": '{"account": {"dormancy_seconds": 60}}',
            "TENURE_STICKY_TIMEOUT": "30",
        }
    )
    assert settings.temporal_address == "temporal:7233"
    assert settings.redis_url == "redis://cache:6379/2"
    assert settings.api_port == 9000
    assert settings.runtime.max_commands_per_run == 50
    assert settings.entity_options == {"account": {"dormancy_seconds": 60}}
    assert settings.sticky_timeout == 30


def test_to_env_round_trips() -> None:
    settings = Settings.from_env(
        {
            "TEMPORAL_ADDRESS": "t:1",
            "REDIS_URL": "redis://r:2/0",
            "TENURE_LEDGER_SIZE": "77",
            "TENURE_MAX_COMMANDS_PER_TASK": "9",
        }
    )
    assert settings.runtime.max_commands_per_task == 9
    assert Settings.from_env(settings.to_env()) == settings


def test_bad_values_are_refused_at_start_naming_their_variable() -> None:
    with pytest.raises(SettingsError, match=r"^API_PORT: Input should be a valid integer"):
        Settings.from_env({"API_PORT": "eighty"})
    with pytest.raises(SettingsError, match=r"^TENURE_MAX_COMMANDS_PER_RUN: Input should be"):
        Settings.from_env({"TENURE_MAX_COMMANDS_PER_RUN": "0"})
    with pytest.raises(SettingsError, match=r"^TENURE_RATE_LIMITS: not JSON"):
        Settings.from_env({"TENURE_RATE_LIMITS": "{nope"})
    # Never the value: it may be a secret.
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"TENURE_AUTH_LEEWAY": "TOPSECRET"})
    assert "TOPSECRET" not in str(refused.value)
