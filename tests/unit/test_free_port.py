"""free_port never hands out a port of the kernel's ephemeral range (where outgoing connections
take their source ports, so a server started on it a moment later could find it taken)."""

from __future__ import annotations

import socket

from deploy.launch import free_port
from deploy.launch.processes import _ephemeral_range


def test_free_ports_lie_below_the_ephemeral_range_and_bind() -> None:
    low, _ = _ephemeral_range()
    for _ in range(50):
        port = free_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when handed out
