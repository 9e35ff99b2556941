"""`make dev`'s stack as a user runs it: one process tree, persistent, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.embedded import free_port

OPEN = """mutation { openAccount(id: "dev-1", ownerName: "Ada", email: "ada@example.com",
  wait: true) { account { status revision } } }"""
READ = '{ account(id: "dev-1", consistency: LIVE) { status revision source } }'


def start_stack(data_dir: Path, api_port: int) -> subprocess.Popen[bytes]:
    """Run `python -m deploy.dev` (what `make dev` runs), its output in data_dir/dev.out."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TEMPORAL_ADDRESS", "REDIS_URL", "TENURE_REDIS_PREFIX")
    }
    env.update({"API_PORT": str(api_port), "TENURE_DATA_DIR": str(data_dir)})
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "dev.out", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "deploy.dev"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def printed_admin_token(data_dir: Path, wait: float = 60) -> str:
    """The admin token the stack printed at start."""
    deadline = time.monotonic() + wait
    while True:
        lines = (data_dir / "dev.out").read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip().startswith("Admin token"):
                return lines[i + 1].strip()
        if time.monotonic() > deadline:
            raise AssertionError("no admin token printed:\n" + "\n".join(lines))
        time.sleep(0.2)


def graphql(api_port: int, query: str, token: str, wait: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + wait
    while True:
        try:
            response = httpx.post(
                f"http://127.0.0.1:{api_port}/graphql",
                json={"query": query},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            body: dict[str, object] = response.json()
            return body
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def interrupt(process: subprocess.Popen[bytes]) -> int:
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    return process.wait(30)


def descendants_alive(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(pid)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_the_dev_stack_serves_graphql_persists_and_stops_cleanly(tmp_path: Path) -> None:
    api_port = free_port()
    stack = start_stack(tmp_path, api_port)
    try:
        token = printed_admin_token(tmp_path)
        banner = (tmp_path / "dev.out").read_text()
        # Where the stack's servers are, for the CLI commands the README runs beside it.
        exported = next(line for line in banner.splitlines() if "export TEMPORAL_ADDRESS=" in line)
        assert "REDIS_URL=redis://127.0.0.1:" in exported
        assert "Temporal UI at http://127.0.0.1:" in banner
        assert graphql(api_port, OPEN, token) == {
            "data": {"openAccount": {"account": {"status": "PENDING", "revision": 1}}}
        }
        # No identity provider needed, and no token, no entry.
        assert graphql(api_port, OPEN, "not-a-token")["errors"][0]["extensions"] == {  # type: ignore[index]
            "code": "UNAUTHENTICATED"
        }
    finally:
        code = interrupt(stack)
    assert code == 0
    assert descendants_alive(stack.pid) == []

    again = start_stack(tmp_path, api_port)
    try:
        # Both the workflow (Temporal's SQLite file) and the cache (Valkey's AOF) survived.
        # The signing key was kept in the data directory: the first start's token still works.
        for _ in range(100):
            body = graphql(api_port, READ, token)
            if body["data"]["account"]["source"] == "LIVE":  # type: ignore[index]
                break
            time.sleep(0.2)  # the new worker is still starting: served from the cache
        assert body == {"data": {"account": {"status": "PENDING", "revision": 1, "source": "LIVE"}}}
        cached = graphql(api_port, READ.replace("LIVE", "CACHED"), token)
        assert cached["data"]["account"]["source"] == "CACHE"  # type: ignore[index]
    finally:
        assert interrupt(again) == 0


def test_a_busy_api_port_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = start_stack(tmp_path, port)
        assert stack.wait(60) == 1
    lines = (tmp_path / "dev.out").read_text().strip().splitlines()
    assert lines == [f"error: port {port} is already in use (set API_PORT to use another)"]


def test_a_setting_the_stack_cannot_start_with_is_a_line_naming_it(tmp_path: Path) -> None:
    """A webhook source with a bad secret (the README's example exported as printed) gave a
    twenty-line traceback."""
    api_port = free_port()
    sources = '{"payments": {"secret": "whsec_not-base64", "scheme": "standard"}}'
    os.environ["TENURE_WEBHOOK_SOURCES"] = sources
    try:
        stack = start_stack(tmp_path, api_port)
    finally:
        del os.environ["TENURE_WEBHOOK_SOURCES"]
    assert stack.wait(60) == 2
    lines = (tmp_path / "dev.out").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TENURE_WEBHOOK_SOURCES: payments"), lines
    assert "not-base64" not in lines[0]  # the secret is not said
    assert "Traceback" not in lines[0]


@pytest.mark.parametrize("module", ["workers", "api"])
def test_worker_and_api_refuse_to_start_without_servers(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TEMPORAL_ADDRESS", "REDIS_URL")}
    env.update({"API_PORT": str(free_port()), "TENURE_ENV": "development"})
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    # One line naming what is missing, whichever the process needs first.
    assert "TEMPORAL_ADDRESS is not set" in done.stderr or "REDIS_URL is not set" in done.stderr


@pytest.mark.parametrize("module", ["workers", "api", "deploy.cli"])
def test_a_bad_setting_stops_each_process_in_a_line_naming_its_variable(module: str) -> None:
    env = {**os.environ, "TENURE_ENTITY_OPTIONS": "{not json", "TENURE_AUTH_LEEWAY": "x"}
    args = ["token", "--role", "admin", "--sub", "ops"] if module == "deploy.cli" else []
    done = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (1, 2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "TENURE_ENTITY_OPTIONS: not JSON" in lines[0], done.stderr


def test_the_api_refuses_to_start_in_production_without_a_key_source() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENURE_AUTH", "TENURE_ENV"))}
    env["API_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "api"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "no key source" in done.stderr and "Traceback" not in done.stderr
