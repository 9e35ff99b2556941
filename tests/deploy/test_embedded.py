"""Ports as a restarted server sees them."""

from __future__ import annotations

import os
import socket
import time

from deploy.embedded import EmbeddedRedis, free_port, port_is_free


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
