"""The webhook server's descriptors stay within what the hub gives it, however fast connections arrive.

asyncio accepts up to `backlog` sockets per turn of its loop, and a connection is counted (`Server.admit`, which
closes the longest idle one past `max_connections`) two turns later; the one closed gives its descriptor back a
turn after that. A flood therefore held several times `backlog` descriptors at once, on top of the open
connections, and a hub with 256 descriptors logged asyncio's "socket.accept() out of system resource" traceback
(EMFILE) in CI. These tests drive a real `Server` on real loopback sockets one asyncio turn at a time, so the flood
outruns it deterministically, and count the process's descriptors after every turn.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucketwire.hub.http_server import Limits, Server
from tests.fixtures_hub import wait_for
from tests.test_ingress_guarantees import _Ok as Ok

MAX_CONNECTIONS = 24
BACKLOG = 24


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def held_by_server(port: int) -> int:
    """This process's descriptors for connections the server accepted on `port` (not yet closed): counted from
    the kernel's tables, so that a descriptor some other thread of the test process opens meanwhile (a daemon
    left by an earlier test in the same worker, a libzmq reconnect) is not charged to the server."""
    inodes: set[str] = set()
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: LISTEN
                    inodes.add(inode)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            n += link.startswith("socket:[") and link[8:-1] in inodes
    return n


def one_turn(srv: Server) -> None:
    """Exactly one asyncio turn (`Server.step` runs up to MAX_STEP_TURNS of them)."""
    srv.loop.call_soon(srv.loop.stop)
    srv.loop.run_forever()


def nonblocking_connect(port: int) -> socket.socket:
    """A client that does not wait: past a full accept queue its SYN waits for the kernel's retry, and the
    server, stepped by this thread, must not wait on it."""
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.setblocking(False)
    err = c.connect_ex(("127.0.0.1", port))
    assert err in (0, errno.EINPROGRESS), os.strerror(err)
    return c


def get_healthz(srv: Server, client: ssl.SSLContext | None = None) -> bytes:
    """A request on a fresh connection (TLS with `client`), answered by the server running in a thread."""
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as raw:
            c = client.wrap_socket(raw, server_hostname="127.0.0.1") if client is not None else raw
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            got = b""
            while not got.endswith(b"}\n"):
                more = c.recv(65536)
                assert more, got
                got += more
            return got
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        thread.join(10)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    from tests.test_security_ingress import make_pki

    return make_pki(tmp_path / "pki")


@pytest.fixture(params=["plain", "tls"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Server, ssl.SSLContext | None]]:
    """The server, and the context its clients connect with (None: plain HTTP)."""
    tls = client = None
    if request.param == "tls":
        pki = request.getfixturevalue("pki")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(pki["server.pem"], pki["server.key"])
        client = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    srv = Server(Ok(), "127.0.0.1", 0, limits=Limits(read_timeout=30, idle_timeout=30,
                                                    max_connections=MAX_CONNECTIONS),
                 tls=tls, backlog=BACKLOG)
    try:
        yield srv, client
    finally:
        srv.close()


def test_a_connection_flood_holds_no_more_descriptors_than_the_server_is_given(
        server: tuple[Server, ssl.SSLContext | None], caplog: pytest.LogCaptureFixture) -> None:
    """Connections arrive faster than the server turns: a full accept queue before every turn, for twelve turns
    (idle ones: they hold a descriptor and send nothing, the cheapest attack on the port). What the server holds
    -- open connections, accepted ones not yet counted, closed ones not yet released -- stays within
    max_connections + backlog, the half of the hub's descriptors `ingress.serve` gives it."""
    srv, client = server
    budget = MAX_CONNECTIONS + BACKLOG
    clients: list[socket.socket] = []
    peak = 0
    try:
        for _ in range(12):
            clients += [nonblocking_connect(srv.port) for _ in range(BACKLOG)]
            one_turn(srv)
            peak = max(peak, held_by_server(srv.port))
        for _ in range(40):
            one_turn(srv)
            peak = max(peak, held_by_server(srv.port))
        assert peak <= budget, f"the server held {peak} descriptors, more than {budget}"
        assert len(srv.accepted) <= MAX_CONNECTIONS
        assert get_healthz(srv, client).startswith(b"HTTP/1.1 200"), "a newcomer is still served"
    finally:
        for c in clients:
            c.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_out_of_descriptors_pauses_accepting_with_one_warning_then_resumes(
        caplog: pytest.LogCaptureFixture) -> None:
    """Something else in the process used the descriptors (EMFILE on accept): one warning line, no traceback,
    and the listener accepts again once descriptors are free -- never a dead port."""
    srv = Server(Ok(), "127.0.0.1", 0, limits=Limits(read_timeout=30, idle_timeout=30), backlog=BACKLOG)
    waiting = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(5)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds() + 64, hard))
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(20):  # a dead or spinning listener would log (and retry) on every turn
            one_turn(srv)
        for fd in fillers:
            os.close(fd)
        fillers.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert get_healthz(srv).startswith(b"HTTP/1.1 200"), "accepting resumes"

        def taken() -> bool:
            srv.step()
            return len(srv.accepted) >= len(waiting)

        wait_for(taken, 20, "the connections that waited in the queue to be accepted")
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in waiting:
            c.close()
        srv.close()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "descriptors" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_a_tls_client_between_its_handshake_and_its_request_is_not_the_one_closed_at_the_limit(
        pki: dict[str, Path]) -> None:
    """At the connection limit the longest idle keep-alive is closed first. A connection whose TLS handshake had
    just finished counted as idle until its request arrived, while a flood's handshakes that never finish count as
    requests arriving: so each new flood connection closed the one real client (the accept-flood test's newcomer,
    reset now and then in CI). It counts as a request arriving until its first request does."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki["server.pem"], pki["server.key"])
    client = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    srv = Server(Ok(), "127.0.0.1", 0, limits=Limits(read_timeout=30, idle_timeout=30,
                                                    max_connections=MAX_CONNECTIONS), tls=tls, backlog=BACKLOG)
    flood = [nonblocking_connect(srv.port) for _ in range(MAX_CONNECTIONS)]
    shaken, go = threading.Event(), threading.Event()
    answer: list[bytes] = []

    def real_client() -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as raw:
            c = client.wrap_socket(raw, server_hostname="127.0.0.1")
            shaken.set()
            go.wait(20)
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            with contextlib.suppress(OSError):
                answer.append(c.recv(65536))

    thread = threading.Thread(target=real_client, daemon=True)
    try:
        wait_for(lambda: one_turn(srv) or len(srv.accepted) >= MAX_CONNECTIONS, 20, "the flood accepted")
        thread.start()
        wait_for(lambda: one_turn(srv) or (shaken.is_set() and len(srv.conns) == 1), 20,
                 "the real client's handshake done on both sides")
        flood.append(nonblocking_connect(srv.port))  # one more at the limit: some connection is closed for it
        for _ in range(20):
            one_turn(srv)
        assert [c for c in srv.conns if not c.closing], "the real client was the connection closed at the limit"
        go.set()
        wait_for(lambda: one_turn(srv) or bool(answer) or not thread.is_alive(), 20, "the real client's answer")
        assert answer and answer[0].startswith(b"HTTP/1.1 200"), answer
    finally:
        go.set()
        for c in flood:
            c.close()
        thread.join(10)
        srv.close()
