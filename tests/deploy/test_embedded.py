"""Ports as a restarted server sees them."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from deploy.embedded import (
    START_ATTEMPTS,
    EmbeddedRedis,
    EmbeddedServer,
    ServerExited,
    ServerPortTaken,
    free_port,
    port_is_free,
)


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free_again() -> None:
    port = free_port()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    # The server closes first, as an API stopping with connections open does: its side of
    # the connection lingers in TIME_WAIT.
    accepted.close()
    server.close()
    time.sleep(0.1)
    client.close()
    assert port_is_free(port)


def test_a_port_in_use_is_not_free() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        assert not port_is_free(port)


async def test_a_server_started_here_is_out_of_the_terminal_s_reach() -> None:
    """Ctrl-C on `make dev` goes to the terminal's process group: the worker and the API,
    which drain while their servers still answer. A server in that group stopped with them,
    and the draining worker logged connection errors; `make dev` stops the servers after."""
    async with EmbeddedRedis() as server:
        assert server.process is not None
        assert os.getsid(server.process.pid) != os.getsid(0)
        assert os.getpgid(server.process.pid) != os.getpgid(0)


def test_a_port_picked_is_not_picked_again_while_a_server_may_still_take_it() -> None:
    """Linux hands out any free port at random and soon hands it out again, and Temporal's
    dev server picks its inner services' ports that way as it starts: a port just picked
    here for a server could be taken before the server bound it, and the server exited
    (code 2). Picked ports are held back (the old way repeated 460 of 2,000 picks); each
    can still be taken by the server it was picked for."""
    picked = [free_port() for _ in range(1000)]
    assert len(set(picked)) == len(picked)
    for port in picked[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()


class _Answering(EmbeddedServer):
    """A server that is ready when its port takes a connection, whoever takes it."""

    async def is_ready(self) -> bool:
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.close()
        return True


class _Flaky(_Answering):
    """A server that exits saying why the first `failures` times, then listens."""

    name = "flaky server"

    def __init__(self, marker: Path, failures: int) -> None:
        super().__init__()
        self.marker = marker
        self.failures = failures

    def command(self) -> list[str]:
        script = (
            "import pathlib, socket, sys, time\n"
            f"marker = pathlib.Path({str(self.marker)!r})\n"
            "starts = int(marker.read_text()) if marker.exists() else 0\n"
            "marker.write_text(str(starts + 1))\n"
            f"if starts < {self.failures}:\n"
            "    print('inner port taken', flush=True)\n"
            "    sys.exit(2)\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('127.0.0.1', {self.port}))\n"
            "s.listen()\n"
            "time.sleep(60)\n"
        )
        return [sys.executable, "-c", script]


async def test_a_server_that_exits_as_it_starts_is_started_again(tmp_path: Path) -> None:
    server = _Flaky(tmp_path / "starts", failures=START_ATTEMPTS - 1)
    async with server:
        assert server.process is not None and server.process.poll() is None
    assert (tmp_path / "starts").read_text() == str(START_ATTEMPTS)


async def test_a_server_that_keeps_exiting_says_what_it_printed(tmp_path: Path) -> None:
    with pytest.raises(ServerExited, match="exited with code 2; it said: inner port taken"):
        await _Flaky(tmp_path / "starts", failures=START_ATTEMPTS).start()
    assert (tmp_path / "starts").read_text() == str(START_ATTEMPTS)


class _Silent(_Answering):
    """A server that never listens: what answers on its port is someone else."""

    name = "silent server"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


async def test_a_server_whose_port_another_process_answers_on_is_refused() -> None:
    """What answered is not the server started: a test freezing it (SIGSTOP) would have
    frozen nothing, and its requests went to the other."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        server = _Silent(port=other.getsockname()[1])
        with pytest.raises(ServerPortTaken):
            await server.start()
        assert server.process is None  # stopped
