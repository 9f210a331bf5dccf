"""The ingress's HTTP/1.1 server on real loopback sockets: pipelining order, deadlines, early answers, limits.

The server runs in a thread of the test process with handlers written for each test; the hub-level behaviour
(tokens, TLS, slow clients against a real hub) is in test_security_ingress.py and test_ingress_minio.py.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from bucketwire.hub.http_server import Limits, Pending, Request, Response, Server

BIG = 256 * 1024


class Echo:
    """Answers `POST /delay/<ms>` after that many milliseconds (a Pending), anything else at once."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.seen: list[str] = []

    def head(self, req: Request) -> Response | None:
        if req.path == "/refuse":
            return Response(413, b'{"error": "too large"}\n', close=True)
        return None

    def handle(self, req: Request) -> Response | Pending:
        self.seen.append(req.target)
        body = f'{{"path": "{req.path}", "n": {len(req.body)}}}\n'.encode()
        if req.path == "/big":
            return Response(200, b"x" * BIG)
        if req.path.startswith("/delay/"):
            assert self.loop is not None
            pending = Pending()
            self.loop.call_later(int(req.path.rsplit("/", 1)[1]) / 1000, pending.resolve, Response(200, body))
            return pending
        return Response(200, body)

    def timed_out(self, req: Request) -> Response:
        return Response(503, b'{"error": "timeout"}\n')


class Running:
    def __init__(self, limits: Limits, tls: ssl.SSLContext | None = None) -> None:
        self.handler = Echo()
        self.rejects: list[str] = []
        self.srv = Server(self.handler, "127.0.0.1", 0, limits=limits, tls=tls, on_reject=self.rejects.append)
        self.handler.loop = self.srv.loop
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.srv.port), timeout=10)

    def stop(self) -> None:
        self.srv.loop.call_soon_threadsafe(self.srv.loop.stop)
        self.thread.join(5)
        self.srv.close()


@pytest.fixture
def server() -> Iterator[Running]:
    r = Running(Limits(read_timeout=1.0, idle_timeout=0.5, reply_timeout=1.0, max_body=1000, drain_body=4000))
    yield r
    r.stop()


def read_responses(s: socket.socket, n: int) -> list[tuple[int, bytes, bytes]]:
    """Read n responses (status, head, body) off a socket, by Content-Length."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return out
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100"):
            continue
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        while len(buf) < length:
            buf += s.recv(65536)
        out.append((int(head.split()[1]), head, buf[:length]))
        buf = buf[length:]
    return out


def closed(s: socket.socket, within: float = 5.0) -> bool:
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def post(path: str, body: bytes = b"x", extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n".encode() + extra + b"\r\n"
            + body)


def test_pipelined_requests_are_answered_in_order_even_when_they_finish_out_of_order(server: Running) -> None:
    with server.connect() as s:
        s.sendall(post("/delay/300") + post("/delay/10") + post("/now") + post("/delay/50", b"abc"))
        got = read_responses(s, 4)
    assert [r[0] for r in got] == [200] * 4
    assert [r[2] for r in got] == [b'{"path": "/delay/300", "n": 1}\n', b'{"path": "/delay/10", "n": 1}\n',
                                   b'{"path": "/now", "n": 1}\n', b'{"path": "/delay/50", "n": 3}\n']
    assert all(b"Connection: close" not in r[1] for r in got), "keep-alive throughout"


def test_idle_keep_alive_connection_is_closed_quietly(server: Running) -> None:
    with server.connect() as s:
        s.sendall(post("/now"))
        assert read_responses(s, 1)[0][0] == 200
        t0 = time.monotonic()
        assert closed(s)
        assert 0.3 < time.monotonic() - t0 < 3
    assert server.rejects == [], "an idle client is not a slow client"


def test_a_request_that_trickles_in_is_cut_at_the_read_deadline(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"POST /now HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
        t0 = time.monotonic()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(40):  # a byte every 0.2 s would finish in 8 s; the deadline is 1 s
                s.sendall(b"x")
                time.sleep(0.2)  # pacing: the trickle of a slow client
            s.recv(100)
        assert time.monotonic() - t0 < 4
    assert server.rejects == ["slow"]


def test_waiting_for_the_answer_does_not_count_against_the_client(server: Running) -> None:
    with server.connect() as s:  # 0.8 s of work: longer than idle_timeout, shorter than reply_timeout
        s.sendall(post("/delay/800"))
        assert read_responses(s, 1)[0][0] == 200
    assert server.rejects == []


def test_an_answer_that_never_comes_gets_the_timeout_response(server: Running) -> None:
    with server.connect() as s:
        s.sendall(post("/delay/60000") + post("/now"))
        got = read_responses(s, 2)
    assert [r[0] for r in got] == [503, 200], "the timed-out request answers 503, the next one still runs"


def test_early_answer_drains_a_moderate_body_so_the_client_reads_it(server: Running) -> None:
    with server.connect() as s:
        s.sendall(post("/refuse", b"y" * 3000))
        (status, head, body), = read_responses(s, 1)
        assert status == 413 and b"Connection: close" in head and b"too large" in body
        assert closed(s)
    assert server.handler.seen == [], "the handler never saw the refused request"


def test_early_answer_to_a_huge_body_closes_without_reading_it(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"POST /refuse HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n")
        assert read_responses(s, 1)[0][0] == 413
        assert closed(s)


def test_body_over_the_limit_is_refused_when_the_handler_lets_it_through(server: Running) -> None:
    with server.connect() as s:
        s.sendall(post("/now", b"z" * 1500))
        (status, _, body), = read_responses(s, 1)
    assert status == 413 and b"exceeds 1000 bytes" in body
    assert server.handler.seen == []


@pytest.mark.parametrize("raw,status", [
    (b"NOT-HTTP\r\n\r\n", 400),
    (b"POST /now HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400),
    (b"GET /now HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /now HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
])
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(server: Running, raw: bytes, status: int) -> None:
    with server.connect() as s:
        s.sendall(raw)
        got = read_responses(s, 1)
        assert got and got[0][0] == status, got
        assert closed(s)
    assert server.handler.seen == []
    with server.connect() as s:
        s.sendall(post("/now"))
        assert read_responses(s, 1)[0][0] == 200


def test_expect_100_continue(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"POST /now HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"body")
        assert read_responses(s, 1)[0][2] == b'{"path": "/now", "n": 4}\n'


def read_until(s: socket.socket, marker: bytes) -> bytes:
    """Bytes off the socket up to and including the first `marker` (everything read so far if it closes)."""
    buf = b""
    while marker not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    return buf


def test_100_continue_comes_in_its_requests_turn_on_a_pipelined_connection(server: Running) -> None:
    """The interim answer belongs to the request that asked for it: behind the answer to the request before it,
    never in the middle of (or ahead of) that answer, and the body then sent is read as the second request's."""
    with server.connect() as s:
        s.sendall(post("/delay/300", b"first") + b"POST /now HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        got = read_until(s, b"HTTP/1.1 100 Continue\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got
        assert b'{"path": "/delay/300", "n": 5}\n' in got, "the first request's answer comes first"
        assert got.endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"second")
        status, _, body = read_responses(s, 1)[0]
    assert status == 200 and body == b'{"path": "/now", "n": 6}\n'


def test_client_that_closes_while_waiting_costs_nothing() -> None:
    """Each client sends a request and closes its side; the answer goes out and the connection is closed then,
    not after the (here 30 s) idle timeout."""
    r = Running(Limits(read_timeout=30, idle_timeout=30, reply_timeout=30))
    try:
        socks = [r.connect() for _ in range(10)]
        for s in socks:
            s.sendall(post("/delay/100"))
            s.shutdown(socket.SHUT_WR)  # half-close: "that was my last request"
        for s in socks:
            assert read_responses(s, 1)[0][0] == 200, "the answer still comes"
            assert closed(s, within=5), "and then the server closes"
            s.close()
        for _ in range(20):  # clients that vanish entirely while waiting leave nothing behind either
            with r.connect() as s:
                s.sendall(post("/delay/100"))
        deadline = time.monotonic() + 10
        while (r.srv.conns or len(r.handler.seen) < 30) and time.monotonic() < deadline:
            time.sleep(0.05)  # pacing: the poll interval of a wait with a deadline
        assert len(r.handler.seen) == 30 and not r.srv.conns
    finally:
        r.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_handshake_failures_are_counted(tmp_path) -> None:
    from tests.test_security_ingress import make_pki

    pki = make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    r = Running(Limits(read_timeout=1.0), tls=ctx)
    try:
        with r.connect() as s:  # plain HTTP on the TLS port
            s.sendall(post("/now"))
            assert closed(s)
        client = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with client.wrap_socket(r.connect(), server_hostname="127.0.0.1") as s:
            s.sendall(post("/now"))
            assert read_responses(s, 1)[0][0] == 200
        with r.connect() as s:  # connects and never says hello: cut at the handshake deadline
            assert closed(s)
    finally:
        r.stop()
    assert r.rejects == ["tls", "tls"]


def test_head_gets_the_headers_of_get_without_the_body(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"HEAD /now HTTP/1.1\r\nHost: t\r\n\r\n" + post("/now"))
        buf = b""
        while buf.count(b"\r\n\r\n") < 2 or not buf.endswith(b"}\n"):
            buf += s.recv(65536)
    first, _, rest = buf.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"Content-Length: 25" in first
    assert rest.startswith(b"HTTP/1.1 200"), "no body after the HEAD answer: the next answer follows at once"
    assert rest.endswith(b'{"path": "/now", "n": 1}\n')


def test_upgrade_requests_are_answered_then_closed(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\x00\x01binary")
        assert read_responses(s, 1)[0][0] == 200
        assert closed(s)
    assert server.handler.seen == ["/now"] and server.rejects == []


def test_a_client_that_reads_nothing_gets_no_more_answers_made(server: Running) -> None:
    """Pipelined requests are answered only while the client reads the answers: once the connection's write
    buffer is full, the server stops making answers (and parsing requests) until it drains. It used to answer
    everything one read held -- from loopback, or anyone with metrics_public, 300 pipelined GETs of /metrics
    were 300 renders on the hub's loop and their bytes held in memory for a client that read none of them."""
    n = 300
    with server.connect() as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * n)
        wait_for_paused = time.monotonic() + 10
        while not any(c.paused for c in list(server.srv.conns)) and time.monotonic() < wait_for_paused:
            time.sleep(0.05)  # pacing: the poll interval of a wait with a deadline
        assert any(c.paused for c in list(server.srv.conns)), "the server stops reading"
        made = len(server.handler.seen)
        assert made < n // 3, f"{made} of {n} answers made for a client that read none"
        got = read_responses(s, n)  # and once it reads, every answer comes, in order
    assert len(got) == n and all(r[0] == 200 and len(r[2]) == BIG for r in got)
    assert len(server.handler.seen) == n


def test_requests_held_back_are_still_answered_after_the_client_half_closes(server: Running) -> None:
    """More pipelined requests than MAX_PIPELINED, then the client's FIN: those not parsed yet when the FIN came
    are parsed and answered all the same, in order, and then the connection closes."""
    n = 100
    with server.connect() as s:
        s.sendall(b"".join(post("/delay/1", str(i).encode()) for i in range(n)))
        s.shutdown(socket.SHUT_WR)
        got = read_responses(s, n)
        assert closed(s)
    assert len(got) == n and all(r[0] == 200 for r in got)
    assert server.handler.seen == ["/delay/1"] * n


def test_a_connection_stalled_by_its_own_client_gives_way_at_the_limit() -> None:
    """A client that pipelines requests and reads none of the answers holds requests queued: that used to spare
    its connection at the connection limit (only one waiting for its commit should be), so a few such clients
    kept everyone else out. Now it is the one closed."""
    r = Running(Limits(read_timeout=30, idle_timeout=30, reply_timeout=30, max_connections=1))
    try:
        with r.connect() as stalled:
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * 100)
            deadline = time.monotonic() + 10
            while not any(c.paused and c.queue for c in list(r.srv.conns)) and time.monotonic() < deadline:
                time.sleep(0.05)  # pacing: the poll interval of a wait with a deadline
            assert any(c.paused and c.queue for c in list(r.srv.conns)), "the stalled client holds queued requests"
            with r.connect() as s:
                s.sendall(post("/now"))
                got = read_responses(s, 1)
            assert got and got[0][0] == 200, "the newcomer is served"
            assert r.rejects == ["connections"]
    finally:
        r.stop()


def test_bodies_waiting_to_be_answered_are_bounded_per_connection(server: Running) -> None:
    """Requests read ahead while an earlier one waits (for its commit, or for its client to read the answers)
    keep their bodies: 32 of them of max_body_bytes each were 32 MiB per connection, and a token holder holds
    them as long as it reads no answer. Now reading stops once the bodies waiting reach max_body_bytes (here 1000),
    and goes on as they are answered."""
    with server.connect() as s:
        s.sendall(post("/delay/300", b"a" * 900) + b"".join(post("/now", b"b" * 900) for _ in range(20)))
        deadline = time.monotonic() + 10
        while not any(c.paused for c in list(server.srv.conns)) and time.monotonic() < deadline:
            time.sleep(0.01)  # pacing: the poll interval of a wait with a deadline
        queued = [c.queued_bytes for c in list(server.srv.conns)]
        assert any(c.paused for c in list(server.srv.conns)), f"reading never stopped ({queued} bytes queued)"
        assert max(queued) <= 2 * 1000, queued
        got = read_responses(s, 21)
    assert [r[0] for r in got] == [200] * 21, "all answered, in order, once the first is"
    assert got[0][2] == b'{"path": "/delay/300", "n": 900}\n'
