"""Ports for servers started on loopback (`dev`, bench, tests): outside the range the kernel hands to outgoing
connections, so none of those can take a port between the pick and the server's bind, and never the same one twice
from one process."""

from __future__ import annotations

import random
import socket

import pytest

from bucketwire import procutil


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    random.seed(0)  # what a test runner does before each test: the picks must not repeat across such reseeds
    first = [procutil.free_port() for _ in range(50)]
    random.seed(0)
    ports = first + [procutil.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports), "a port was handed out twice"
    assert all(10_000 <= p < procutil._EPHEMERAL_LOW for p in ports), sorted(ports)[-5:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_test_process_keeps_to_its_share_of_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """BUCKETWIRE_PORT_SHARE (set by conftest per xdist process): a port one process hands out is never one
    another process of the same run can hand out, so a hub restarted on its port finds it still free."""
    monkeypatch.setenv("BUCKETWIRE_PORT_SHARE", "1/3")
    ports = [procutil.free_port() for _ in range(30)]
    assert {(p // 1000) % 3 for p in ports} == {1}, sorted(ports)
    monkeypatch.setenv("BUCKETWIRE_PORT_SHARE", "nonsense")
    assert procutil._port_share() == (0, 1)
