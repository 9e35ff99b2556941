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


@pytest.mark.parametrize(
    "variable, value",
    [
        ("TENURE_MAX_CACHED_WORKFLOWS", "-5"),
        ("TENURE_MAX_CONCURRENT_WORKFLOW_TASKS", "0"),  # the SDK took 0 for its default
        ("TENURE_WORKER_HEALTH_PORT", "70000"),
        ("API_PORT", "99999"),
        ("TENURE_LOG_LEVEL", "verbose"),
        ("TENURE_LOG_FORMAT", "yaml"),
        ("TENURE_RATE_LIMITS", '{"customer": [0, 40]}'),  # a bucket that never refills
        ("TENURE_RATE_LIMITS", '{"customer": [20, 0]}'),  # one that limits nothing
        ("TENURE_ENTITY_OPTIONS", '{"account": {"dormancy_seconds": -4}}'),
        ("TENURE_ENTITY_OPTIONS", '{"account": {"dormancy_second": 60}}'),
        ("TENURE_ENTITY_OPTIONS", '{"acount": {"dormancy_seconds": 60}}'),
        ("TENURE_ENTITY_OPTIONS", '{"cart": {"checkout": {"step": {"attempts": -1}}}}'),
    ],
)
def test_values_no_process_or_entity_could_run_with_are_refused_at_start(
    variable: str, value: str
) -> None:
    """Each of these started, and failed later or did harm: the worker stopped at its first
    poll, a port out of range raised a traceback, a rate of 0 locked callers out, and an
    account option no account could start with stranded every new account for good, its
    first workflow task failing on every retry."""
    with pytest.raises(SettingsError, match=f"^{variable}"):
        Settings.from_env({variable: value})


def test_names_of_levels_and_formats_may_be_in_capitals() -> None:
    settings = Settings.from_env({"TENURE_LOG_LEVEL": "INFO", "TENURE_LOG_FORMAT": "JSON"})
    assert (settings.log_level, settings.log_format) == ("info", "json")


def test_the_redis_timeout_and_pool_are_read_and_handed_on() -> None:
    env = {"TENURE_REDIS_TIMEOUT": "5", "TENURE_REDIS_MAX_CONNECTIONS": "256"}
    settings = Settings.from_env(env)
    assert (settings.redis_timeout, settings.redis_max_connections) == (5.0, 256)
    assert Settings.from_env(settings.to_env()) == settings
