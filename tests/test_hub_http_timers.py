"""The hub's loop steps its HTTP server only when the server has something to do (a readable descriptor, a ready
callback, a due timer). A deadline is a timer with no I/O behind it: a client that stops sending half-way through
its request must still be cut off at `http_read_timeout`, with nothing else happening on the hub."""

from __future__ import annotations

import socket
from typing import Any

from tests.fixtures_hub import Stack
from tests.test_security_ingress import hub_opts


def test_a_stalled_request_is_cut_at_the_read_deadline_on_an_idle_hub(stack_factory: Any) -> None:
    s: Stack = stack_factory()
    hub_opts(s, "http_read_timeout = 0.5")
    s.start_hub()
    with socket.create_connection(("127.0.0.1", s.http_port), timeout=20) as c:
        c.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        got = b""
        try:
            while chunk := c.recv(4096):  # until the hub closes the connection (or 20 s pass: socket.timeout)
                got += chunk
        except TimeoutError:
            raise AssertionError("the stalled request was never cut off") from None
    assert not got or got.startswith(b"HTTP/1.1 408"), got[:200]
