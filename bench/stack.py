"""The stack under test: Temporal, Redis, Tenure's worker, the raw counter's worker and the
API twice, once letting every caller in and once verifying bearer tokens, each in its own
process on 127.0.0.1, so every worker's memory can be read apart; and a second Tenure worker
on the same task queue, started only for the scale-out scenario's rounds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as redis
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from bench.http import HTTPClient, HTTPError
from deploy.embedded import (
    EmbeddedRedis,
    EmbeddedServer,
    EmbeddedTemporal,
    die_with_parent,
    free_port,
    stop_process,
)
from deploy.tokens import mint
from workers.settings import Settings

LOAD_GENERATOR = "bench client"
SECURED_API = "api, tokens verified"
SECOND_WORKER = "second tenure worker"
TOKEN_TTL_SECONDS = 24 * 3600  # longer than any run


def _proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A Python module run as a child process, whose resident memory can be read and whose
    peak can be reset between scenarios."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"{self.name} exited (code {code}); see {self.log_file}")

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        stop_process(process, timeout)

    def rss_kib(self) -> int:
        return _proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _proc_status_kib(self.pid, "VmHWM")

    def reset_peak(self) -> None:
        """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")


class BenchStack:
    """Everything a scenario talks to: clients for Temporal (Tenure's converter and the
    SDK's default one), Redis and the API over HTTP, and the processes behind them.

    `api` has no key source, so every caller is the development admin; `secured_api` is the
    same API with an HS256 secret, and `secured_http` sends every request with an admin
    token signed by it: an admin, as on `api`, so that verifying the token is the only
    difference (no rate limit applies to admins on either)."""

    def __init__(self, settings: Settings, workdir: Path, concurrency: int) -> None:
        self.settings = settings
        self.workdir = workdir
        env = settings.to_env()
        self.worker = Child("tenure worker", "workers", env, workdir / "worker.log")
        self.counter_worker = Child(
            "counter worker", "bench.counter_worker", env, workdir / "counter-worker.log"
        )
        self.api = Child("api", "api", env, workdir / "api.log")
        self.secured_settings = settings.model_copy(
            update={
                "auth_secret": secrets.token_urlsafe(32),
                "api_port": free_port(settings.api_port + 1),
            }
        )
        secured = self.secured_settings
        assert secured.auth_secret
        # Same Temporal, Redis and task queue; health and metrics on ports of its own.
        self.second_settings = settings.model_copy(
            update=_worker_ports(
                settings.worker_health_port, settings.worker_metrics_port, secured.api_port
            )
        )
        self.second_worker = Child(
            SECOND_WORKER, "workers", self.second_settings.to_env(), workdir / "second-worker.log"
        )
        self.secured_api = Child(SECURED_API, "api", secured.to_env(), workdir / "secured-api.log")
        token = mint(
            secured.auth_secret,
            role="admin",
            sub="bench",
            ttl_seconds=TOKEN_TTL_SECONDS,
            settings=secured,
        )
        self.concurrency = concurrency
        self.servers: dict[str, int] = {}
        self.client: Client
        self.raw_client: Client
        self.http = HTTPClient(settings.api_host, settings.api_port, concurrency)
        self.secured_http = HTTPClient(
            secured.api_host,
            secured.api_port,
            concurrency,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.redis: redis.Redis

    @property
    def children(self) -> tuple[Child, ...]:
        return (self.worker, self.counter_worker, self.api, self.secured_api)

    async def wait_for_api(self, timeout: float = 60.0) -> None:
        """Wait until both APIs answer their health check."""
        deadline = time.monotonic() + timeout
        for child, http in ((self.api, self.http), (self.secured_api, self.secured_http)):
            while True:
                child.check_alive()
                with contextlib.suppress(HTTPError):
                    status, _ = await http.request("GET", "/healthz")
                    if status == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not answer in {timeout:.0f}s")
                await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()
        if self.second_worker.process is not None:
            self.second_worker.check_alive()

    def pids(self) -> dict[str, int]:
        """Every running process whose CPU time a scenario accounts for, by role."""
        second = self.second_worker.process
        return {
            **self.servers,
            "tenure worker": self.worker.pid,
            **({SECOND_WORKER: second.pid} if second is not None else {}),
            "counter worker": self.counter_worker.pid,
            "api": self.api.pid,
            SECURED_API: self.secured_api.pid,
            LOAD_GENERATOR: os.getpid(),
        }

    async def start_second_worker(self, timeout: float = 60.0) -> None:
        """Start a second Tenure worker process on the task queue and wait until it polls
        (its `/readyz` answers 200)."""
        worker, settings = self.second_worker, self.second_settings
        worker.start()
        health = HTTPClient(settings.worker_health_host, settings.worker_health_port, 1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                worker.check_alive()
                with contextlib.suppress(HTTPError, OSError):
                    status, _ = await health.request("GET", "/readyz")
                    if status == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{worker.name} was not ready in {timeout:.0f}s")
                await asyncio.sleep(0.1)
        finally:
            await health.aclose()

    async def stop_second_worker(self) -> None:
        """Stop the second worker, which drains its activities first as on any SIGTERM."""
        timeout = self.settings.worker_shutdown_grace + 15
        await asyncio.to_thread(self.second_worker.stop, timeout)

    def restart_worker(self) -> None:
        """A fresh Tenure worker process, so its memory starts from nothing cached."""
        self.worker.stop()
        self.worker.start()

    def window(self, worker: Child) -> Window:
        """Start measuring `worker`'s peak memory and every process's CPU time."""
        return Window(self, worker)


class Window:
    """A worker's peak resident memory since the window was made, and each process's CPU
    time while inside `with window:` blocks, which may be many (of the processes running
    at each block's start: a second worker counts in the blocks it ran in)."""

    def __init__(self, stack: BenchStack, worker: Child) -> None:
        self.stack = stack
        self.worker = worker
        self.spent = dict.fromkeys(stack.pids(), 0.0)
        self._entered: dict[str, tuple[int, float]] = {}
        worker.reset_peak()

    def __enter__(self) -> Window:
        self._entered = {name: (pid, cpu_seconds(pid)) for name, pid in self.stack.pids().items()}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, (pid, entered) in self._entered.items():
            self.spent[name] = self.spent.get(name, 0.0) + cpu_seconds(pid) - entered

    def peak_rss_kib(self) -> int:
        return self.worker.peak_rss_kib()

    def cpu_ms_per_op(self, ops: int) -> dict[str, float]:
        """CPU milliseconds each process spent per operation inside the window."""
        return {name: round(1000 * spent / max(ops, 1), 3) for name, spent in self.spent.items()}


def _worker_ports(*taken: int) -> dict[str, int]:
    """Health and metrics ports for one more worker process: free now, and none of `taken`
    (ports other processes of the stack will listen on), so that no two workers clash, nor
    a worker with a developer's own on the default ports."""
    ports: list[int] = []
    while len(ports) < 2:
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
    return {"worker_health_port": ports[0], "worker_metrics_port": ports[1]}


@contextlib.asynccontextmanager
async def bench_stack(concurrency: int) -> AsyncIterator[BenchStack]:
    """Start (or reuse, from TEMPORAL_ADDRESS and REDIS_URL) the servers and run the
    processes under test on a task queue and Redis prefix of this run's own."""
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="tenure-bench-"))
    settings = Settings.from_env(
        task_queue=f"bench-{run_id}",
        redis_prefix=f"tenure-bench:{run_id}:",
        api_host="127.0.0.1",
        api_port=free_port(),
        data_dir=workdir,
        # No key source: every request to `api` is the development admin (`secured_api`
        # verifies tokens).
        environment="development",
    )
    # The secured API takes the next port up from the open one's, when free.
    settings = settings.model_copy(update=_worker_ports(settings.api_port, settings.api_port + 1))
    failed = False
    servers: dict[str, EmbeddedServer] = {}
    async with contextlib.AsyncExitStack() as stack:
        try:
            if not settings.temporal_address:
                temporal = EmbeddedTemporal(log_file=workdir / "temporal.log")
                await temporal.start()
                stack.callback(temporal.stop)
                servers["temporal"] = temporal
                settings = settings.model_copy(update={"temporal_address": temporal.address})
            if not settings.redis_url:
                valkey = EmbeddedRedis(log_file=workdir / "redis.log")
                await valkey.start()
                stack.callback(valkey.stop)
                servers["redis"] = valkey
                settings = settings.model_copy(update={"redis_url": valkey.url})
            assert settings.temporal_address and settings.redis_url
            bench = BenchStack(settings, workdir, concurrency)
            for name, server in servers.items():
                assert server.process is not None
                bench.servers[name] = server.process.pid
            for child in bench.children:
                child.start()
                stack.callback(child.stop)
            stack.callback(bench.second_worker.stop)  # if a scenario left it running
            bench.client = await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
            )
            bench.raw_client = await Client.connect(
                settings.temporal_address, namespace=settings.temporal_namespace
            )
            bench.redis = redis.from_url(settings.redis_url)
            stack.push_async_callback(_drop_prefix, bench.redis, settings.redis_prefix)
            stack.push_async_callback(bench.http.aclose)
            stack.push_async_callback(bench.secured_http.aclose)
            await bench.wait_for_api()
            yield bench
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                print(f"logs kept in {workdir}", file=sys.stderr)
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)


async def _drop_prefix(client: redis.Redis, prefix: str) -> None:
    with contextlib.suppress(Exception):
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
    await client.aclose()
