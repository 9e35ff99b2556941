"""The operator CLI as an operator runs it: `tenure ...` and `python -m deploy.cli ...` in a
process of their own, answering with their exit status and one line on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from temporalio.client import Client

from api.auth import TokenVerifier
from api.gateway import EntityGateway
from deploy.cli import ProgressBar
from deploy.embedded import free_port
from entities.runtime.policy import Principal, Role
from tests.conftest import new_id
from workers.cache import SnapshotCache
from workers.settings import Settings
from workers.worker import TenureWorker

RUNS = 8
"""Runs of each repair: the process once died at exit in 2 runs of 6."""

CLI_TIMEOUT = 60.0


def tenure_script() -> str:
    beside_python = Path(sys.executable).parent / "tenure"
    found = str(beside_python) if beside_python.exists() else shutil.which("tenure")
    assert found is not None, "the tenure console script is not installed"
    return found


def operator_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any of Tenure's settings, then `env`: a test
    never reaches the stack `make dev` runs, nor CI's REDIS_URL, by accident."""
    ours = ("TEMPORAL_", "REDIS_", "TENURE_", "API_")
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith(ours)},
        **env,
    }


async def tenure(
    *args: str, env: Mapping[str, str], cwd: Path, module: bool = False
) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `tenure args` (`python -m deploy.cli args` when
    `module`), run in `cwd`."""
    command = [sys.executable, "-m", "deploy.cli"] if module else [tenure_script()]
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        env=operator_env(env),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    """The message of a stderr that must be one line and no traceback."""
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


async def test_python_m_deploy_cli_is_the_tenure_script(tmp_path: Path) -> None:
    secret = "a-configured-secret-that-is-long-enough-for-hs256"
    verifier = TokenVerifier.from_settings(Settings(auth_secret=secret))
    assert verifier is not None
    for args, env in [
        (["--help"], {}),
        (["repair", "bogus", "x"], {}),
        (["token", "--role", "admin", "--sub", "me"], {"TENURE_AUTH_SECRET": secret}),
    ]:
        script = await tenure(*args, env=env, cwd=tmp_path)
        module = await tenure(*args, env=env, cwd=tmp_path, module=True)
        if args[0] == "token":  # minted a second apart, the tokens may differ
            assert script[0] == module[0] == 0 and script[2] == module[2] == ""
            for token in (script[1], module[1]):
                assert verifier.verify(f"Bearer {token.strip()}") == Principal("me", Role.ADMIN)
        else:
            assert module == script
    help_code, help_out, _ = await tenure("--help", env={}, cwd=tmp_path, module=True)
    assert help_code == 0 and help_out.startswith("usage: tenure ")


async def test_repair_exits_with_its_own_status_on_every_run(
    temporal_client: Client,
    settings: Settings,
    cache: SnapshotCache,
    worker: TenureWorker,
    tmp_path: Path,
) -> None:
    """Temporal's core threads once raced the interpreter's exit: a repair that succeeded
    or refused exited 134 (PyGILState_Release) or 139 instead."""
    gateway = EntityGateway(temporal_client, cache, settings)
    account_id = new_id()
    await gateway.send(
        "account", account_id, "open", {"owner_name": "Ada", "email": "a@b.cc"}, wait=True
    )
    env = settings.to_env()
    refused = [
        await tenure("repair", "account", account_id, env=env, cwd=tmp_path) for _ in range(RUNS)
    ]
    forced = [
        await tenure("repair", "account", account_id, "--force", env=env, cwd=tmp_path)
        for _ in range(RUNS)
    ]
    assert [code for code, _, _ in refused] == [1] * RUNS, refused
    assert [code for code, _, _ in forced] == [0] * RUNS, forced
    for _, out, err in refused:
        assert out == ""
        assert one_line(err) == (
            f"tenure repair: INVALID_TRANSITION: account:{account_id} is making progress; "
            "nothing to repair"
        )
    for _, out, err in forced:
        assert out.startswith(f"account:{account_id}: reset to the task") and err == ""


async def test_repair_and_reindex_answer_an_operators_mistake_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings.to_env()
    # A reindex of its own prefix, under the session's, so it bumps no other test's epochs.
    reindex_env = {**env, "TENURE_REDIS_PREFIX": f"{settings.redis_prefix}{new_id()}:"}
    no_temporal = {name: v for name, v in env.items() if name != "TEMPORAL_ADDRESS"}
    no_redis = {name: v for name, v in reindex_env.items() if name != "REDIS_URL"}
    unreachable = f"127.0.0.1:{free_port()}"
    nowhere = {**env, "TEMPORAL_ADDRESS": unreachable}
    missing = new_id()
    types = "one of ['account', 'cart', 'inventory']"
    cases = [
        (["repair", "checkout", "x"], env, 2, f"no entity type ['checkout']; {types}"),
        (["repair", "bogus", "x"], env, 2, f"no entity type ['bogus']; {types}"),
        (["reindex", "bogus"], env, 2, f"no entity type ['bogus']; {types}"),
        (["repair", "account", missing], env, 1, f"NOT_FOUND: no account {missing}"),
        (["repair", "account", "x"], no_temporal, 1, "TEMPORAL_ADDRESS is not set"),
        (["reindex"], no_temporal, 1, "TEMPORAL_ADDRESS is not set"),
        (["reindex"], no_redis, 1, "REDIS_URL is not set"),
        (["repair", "account", "x"], nowhere, 1, f"UNAVAILABLE: no Temporal at {unreachable}"),
        (["reindex", "--where", "TaskQueue = "], reindex_env, 1, "INVALID_INPUT: Temporal"),
    ]
    answers = await asyncio.gather(
        *(tenure(*args, env=case_env, cwd=tmp_path) for args, case_env, _, _ in cases)
    )
    for (args, _, code, message), (got_code, out, err) in zip(cases, answers, strict=True):
        assert (got_code, out) == (code, ""), (args, got_code, out, err)
        assert one_line(err).startswith(f"tenure {args[0]}: "), args
        assert message in err, (args, err)


async def test_a_worker_that_cannot_start_says_so_in_one_log_record(tmp_path: Path) -> None:
    """In JSON, a failed start is one record like any other line, not a bare traceback that
    a log pipeline splits into dozens of events."""
    env = {
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",  # nothing listens there
        "TENURE_LOG_FORMAT": "json",
        "TENURE_WORKER_HEALTH_PORT": str(free_port()),
        "TENURE_WORKER_METRICS_PORT": str(free_port()),
    }
    code, _, err = await tenure("worker", env=env, cwd=tmp_path)
    assert code == 1
    records = [json.loads(line) for line in err.splitlines()]  # every line is one record
    failures = [r for r in records if r["level"] == "error"]
    assert len(failures) == 1, records
    assert failures[0]["event"].startswith("the worker stopped: ")
    assert "Traceback" in failures[0]["exception"]


def test_the_progress_bar_ends_its_line_when_some_could_not_be_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`tenure reindex` ended the bar's line only at its total: an entity that could not be
    read left it open, and "could not read ..." went on it."""
    bar = ProgressBar("reindex")
    bar(1, 3)
    bar(2, 3)  # the third could not be read
    bar.close()
    print("  could not read account:x", file=sys.stderr)
    lines = capsys.readouterr().err.split("\n")
    assert lines[-2] == "  could not read account:x"
    assert lines[-3].endswith("] 2/3")
    whole = ProgressBar("reindex")
    whole(1, 1)
    whole.close()  # ended at its total: no empty line
    assert capsys.readouterr().err.count("\n") == 1
