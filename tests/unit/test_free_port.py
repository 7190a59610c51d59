"""Ports for the processes ProxyMQ starts (demo, bench, tests) stay clear of outgoing ones."""

from __future__ import annotations

import socket
from pathlib import Path

from shared.processes import free_port


def test_a_listening_port_is_never_one_the_kernel_gives_outgoing_connections() -> None:
    """A port from the ephemeral range could become some connection's source port before the
    process bound it: an enqueuer then exited with "address already in use"."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(50)]
    assert not [port for port in ports if low <= port <= high]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # and free indeed


def test_a_port_is_handed_out_once() -> None:
    """Free until its process binds it, a port was at times handed out twice in a row: the
    demo's url-fetcher and its dequeuer's admin port got one, and the dequeuer exited."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
