"""Request framing against a real hub, on raw sockets: every answer in order, no request read with another's
body, and no event committed from a request whose answer was an error (or that got no answer at all).

One hub serves the whole module (each test uses its own event ids and checks the journal's head of its own topic).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_hub import Stack, wait_for

TOKEN = "test-token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A long read deadline: an answer that comes at all in these tests comes from the request, not from a timer.
    s = Stack(tmp_path_factory.mktemp("framing"))
    text = s.cfg_path.read_text().replace("[hub]\n", "[hub]\nhttp_read_timeout = 120\nhttp_idle_timeout = 120\n", 1)
    s.cfg_path.write_text(text)
    s.start_hub()
    yield s
    s.stop()


def ce(eid: str, topic: str) -> bytes:
    return json.dumps({"specversion": "1.0", "id": eid, "source": "framing", "type": "t", "topic": topic,
                       "data": {}}).encode()


def post(body: bytes, *, token: str = TOKEN, version: str = "1.1", extra: bytes = b"") -> bytes:
    return (f"POST /events HTTP/{version}\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body)


def connect(s: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", s.http_port), timeout=30)


def answers(c: socket.socket) -> list[tuple[int, bytes, bytes]]:
    """Every response until the hub closes the connection: (status, head, body), interim ones included."""
    buf = b""
    while True:
        try:
            chunk = c.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    out = []
    while buf:
        head, sep, buf = buf.partition(b"\r\n\r\n")
        assert sep, f"a truncated response: {head!r}"
        status = int(head.split()[1])
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                       if h.lower().startswith(b"content-length:")), 0)
        out.append((status, head, buf[:length]))
        buf = buf[length:]
    return out


def committed(s: Stack, topic: str) -> int:
    return int(s.status()["topics"].get(topic, {}).get("head", 0))


def settled(s: Stack, topic: str, want: int) -> None:
    """The topic's head once every event sent has had its turn: a sentinel request on a fresh connection is
    committed after them (one loop, commits in order), then the head is read and must be `want` + 1."""
    with connect(s) as c:
        c.sendall(post(ce(f"{topic}-sentinel", topic), extra=b"Connection: close\r\n"))
        got = answers(c)
    assert [a[0] for a in got] == [200], got
    assert committed(s, topic) == want + 1, f"{topic}: {committed(s, topic) - 1} events committed, want {want}"


BAD_REQUESTS = {
    "garbage": b"GARBAGE\r\n\r\n",
    "te-and-cl": b"POST /events HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST /events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    "cl-plus": b"POST /events HTTP/1.1\r\nContent-Length: +2\r\n\r\nxx",
    "obs-fold": b"POST /events HTTP/1.1\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nxx",
    "bare-lf": b"POST /events HTTP/1.1\nContent-Length: 2\n\nxx",
    "huge-chunk": b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\n",
}


@pytest.mark.parametrize("bad", list(BAD_REQUESTS))
def test_a_malformed_request_after_a_good_one_is_answered_after_it(hub: Stack, bad: str) -> None:
    """The good request before it is committed and answered 200, then the malformed one gets its 400, then the
    connection closes; the good request pipelined after it is neither answered nor committed. The malformed
    request used to clear the queue: the client read the 400 as the first request's answer although its event was
    in the journal (a sender retrying on a 400 gives up; one that does not may count it lost)."""
    topic = f"fr-{bad}"
    with connect(hub) as c:
        c.sendall(post(ce(f"{topic}-1", topic)) + BAD_REQUESTS[bad] + post(ce(f"{topic}-2", topic)))
        got = answers(c)
    assert [a[0] for a in got] == [200, 400], got
    assert json.loads(got[0][2])["events"][0]["id"] == f"{topic}-1"
    assert b"Connection: close" in got[1][1]
    settled(hub, topic, 1)


@pytest.mark.parametrize("how", ["http/1.0", "connection-close"])
def test_the_last_request_of_a_connection_is_answered_and_what_follows_ignored(hub: Stack, how: str) -> None:
    """An HTTP/1.0 request (no keep-alive) or one saying `Connection: close` is the connection's last: it is
    answered 200 and nothing sent after it is read. llhttp's `Data after Connection: close` error used to turn
    into a 400 that replaced the answer to the committed request."""
    topic = f"last-{how}"
    first = (post(ce(f"{topic}-1", topic), version="1.0") if how == "http/1.0"
             else post(ce(f"{topic}-1", topic), extra=b"Connection: close\r\n"))
    with connect(hub) as c:
        c.sendall(first + post(ce(f"{topic}-2", topic)))
        got = answers(c)
    assert [a[0] for a in got] == [200], got
    assert json.loads(got[0][2])["accepted"] == 1
    settled(hub, topic, 1)


def test_a_refused_request_in_the_middle_ends_the_connection_after_its_answer(hub: Stack) -> None:
    """good, wrong token, good: 200 then 401, and the third is neither answered nor committed (its sender sees
    the connection closed without its answer and sends it again)."""
    topic = "mid-401"
    with connect(hub) as c:
        c.sendall(post(ce(f"{topic}-1", topic)) + post(ce(f"{topic}-x", topic), token="wrong")
                  + post(ce(f"{topic}-2", topic)))
        got = answers(c)
    assert [a[0] for a in got] == [200, 401], got
    settled(hub, topic, 1)


def test_expect_100_continue_with_a_wrong_token_is_refused_before_the_body(hub: Stack) -> None:
    with connect(hub) as c:
        c.sendall(b"POST /events HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer wrong\r\nContent-Length: 100\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        got = answers(c)  # no body sent: the answer comes (and the connection closes) without it
    assert [a[0] for a in got] == [401], got


def one_answer(c: socket.socket) -> tuple[int, bytes, bytes]:
    """The first response on the connection (the connection may stay open)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = c.recv(65536)
        assert chunk, f"closed before an answer: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += c.recv(65536)
    return int(head.split()[1]), head, body[:length]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_get_with_a_body_is_answered_from_its_headers(hub: Stack, framing: str) -> None:
    """GET and HEAD need no token, so a body they carry is refused from the headers (400), not buffered: the
    answer comes although the body is never sent."""
    te = (b"Content-Length: 1000000\r\n" if framing == "content-length" else b"Transfer-Encoding: chunked\r\n")
    with connect(hub) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n" + te + b"\r\n")
        status, head, body = one_answer(c)
    assert status == 400 and b"Connection: close" in head and b"takes no body" in body, (status, head, body)
    with connect(hub) as c:  # without a body (or with an empty one) a GET is served as before
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert [a[0] for a in answers(c)] == [200]


def _rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS:"))) * 1024


def _unread_by_hub(port: int) -> int:
    """Bytes in the receive queues of the hub's accepted connections on `port` (loopback, from /proc/net/tcp)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "01":  # local port, ESTABLISHED
            total += int(f[4].split(":")[1], 16)
    return total


def test_strangers_bodies_do_not_fill_the_hubs_memory(hub: Stack) -> None:
    """64 connections without a token each send a GET with a 1 MB body all but its last byte. The hub used to
    keep every byte until the body was complete (64 MB here; a few hundred MiB at the connection limit); now
    it reads and drops them. Measured once the hub has read everything sent (its receive queues are empty)."""
    assert hub.hub_proc is not None
    before = _rss(hub.hub_proc.pid)
    socks = []
    try:
        for _ in range(64):
            c = connect(hub)
            socks.append(c)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: hub\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 999_999)
        wait_for(lambda: _unread_by_hub(hub.http_port) == 0, 30, "the hub to read what was sent")
        grown = _rss(hub.hub_proc.pid) - before
    finally:
        for c in socks:
            c.close()
    assert grown < 16_000_000, f"the hub grew by {grown / 1e6:.0f} MB holding strangers' bodies"


def test_the_hub_still_serves_after_all_of_it(hub: Stack) -> None:
    wait_for(hub.healthy, 10, "hub healthy")
    assert hub.post("/events", ce("after", "after"))[0] == 200


def test_a_strangers_pipelined_errors_cost_one_answer_per_connection(hub: Stack) -> None:
    """A GET to no endpoint needs no token, and its 404 kept the connection open: 256 KiB of pipelined
    `GET / HTTP/1.1` from a client that reads nothing made the hub answer some 14,000 of them (about 3 MB of
    answers, each a metric update and a JSON body on the hub's loop) from one read. Like a 401, such an answer
    now closes the connection: a stranger pays a connection per answer."""
    before = hub.metric("bucketwire_ingress_rejected_total", ingress="http", reason="not_found")
    with connect(hub) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n" * 2000)
        got = answers(c)
    assert [a[0] for a in got] == [404], [a[0] for a in got][:5]
    assert b"Connection: close" in got[0][1]
    assert hub.metric("bucketwire_ingress_rejected_total", ingress="http", reason="not_found") == before + 1
