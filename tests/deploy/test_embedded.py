"""Ports as a restarted server sees them."""

from __future__ import annotations

import socket
import time

from deploy.embedded import free_port, port_is_free


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
