"""HTTP/1.1 server for the webhook ingress: asyncio plus httptools (llhttp, the parser behind uvicorn).

Why not `http.server`: it parses headers in Python (`email.parser`), spends a thread per connection and about
200 µs of Python per request, and that Python shares the hub's GIL with the loop that commits the journal; this
server spends about 25 µs. Why not uvicorn or aiohttp: the ingress needs three things they do not offer together
-- a decision at the end of the headers (401/404/411/413 before one byte of body is read), a deadline for a whole
request however slowly it trickles in (slowloris), and a TLS handshake failure it can count.

The handler sees complete requests. It answers with a `Response`, or with a `Pending` when the answer waits on
something else (the journal commit); the connection answers pipelined requests in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol
from urllib.parse import urlsplit

import httptools

log = logging.getLogger("bucketwire.http")

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_PIPELINED = 32
"""Requests read ahead on one connection before it stops reading until the earlier ones are answered."""
FEED_SLICE = 16 * 1024
"""Bytes parsed at a time (at most max_body): between slices a connection stops parsing while it is held (`_held`),
so it holds at most about twice max_body of request bodies."""
SWEEP_INTERVAL = 0.1
MAX_STEP_TURNS = 16
"""asyncio turns one `step()` may run while callbacks are ready. Accepting a connection takes about four (accept,
the task that builds the transport, connection_made, add_reader), none of which makes the selector readable;
the bound keeps a callback that reschedules itself from starving the hub loop, which then polls with a zero
timeout (`has_ready`) instead."""
ACCEPT_REST = 0.5
"""Seconds the listener rests after `accept` found no descriptor free (EMFILE and its kin): something else in the
process holds them, and retrying at once would fail again on every turn."""
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ONE_CONNECTION = frozenset(getattr(errno, name) for name in (
    "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP",
    "ENETUNREACH", "EPERM") if hasattr(errno, name))
"""What `accept` can report about the connection it was taking (Linux passes a new socket's pending network error,
and a firewall's refusal, to accept(2)): that connection is gone, the next one is taken."""


@dataclass(slots=True)
class Request:
    method: str
    target: str
    peer: str
    headers: dict[str, str] = field(default_factory=dict)
    """Lower-cased names; a repeated header's values are joined with ", " (RFC 9110 section 5.3)."""
    body: bytes = b""
    path: str = ""
    query: str = ""

    def split_target(self) -> None:
        if self.target.startswith("/"):
            path, _, query = self.target.partition("?")
            self.path, self.query = path, query.partition("#")[0]
        else:
            u = urlsplit(self.target)  # absolute-form (a proxy's request line)
            self.path, self.query = u.path or "/", u.query


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()


class Pending:
    """An answer still to come. `handle` returns one; whoever has the answer calls `resolve` from the thread
    that drives the server, and the response is written there and then -- no hop through the event loop, which
    an asyncio future would cost on every webhook."""

    __slots__ = ("response", "_then")

    def __init__(self) -> None:
        self.response: Response | None = None
        self._then: Callable[[Response], None] | None = None

    def resolve(self, response: Response) -> None:
        if self.response is not None:
            return
        self.response = response
        then, self._then = self._then, None
        if then is not None:
            try:
                then(response)
            except Exception:  # the resolver (the hub loop) must never pay for a connection's trouble
                log.exception("writing an HTTP answer failed")

    def _cancel(self) -> None:
        self._then = None


class Handler(Protocol):
    def head(self, req: Request) -> Response | None:
        """Called when the headers are in; a Response answers at once and the body is never kept."""

    def handle(self, req: Request) -> Response | Pending:
        """Called with the whole request; must not block (hand slow work elsewhere and return a Pending)."""

    def timed_out(self, req: Request) -> Response:
        """The answer when a Pending from `handle` is not resolved within `reply_timeout`."""


@dataclass(slots=True)
class Limits:
    read_timeout: float = 30.0
    """From a request's first byte to its last, however it trickles in."""
    idle_timeout: float = 30.0
    """A keep-alive connection with no request in progress is closed after this."""
    reply_timeout: float = 30.0
    max_body: int = 1 << 20
    """A body larger than this is cut off if the handler's `head` let it through."""
    drain_body: int = 16 << 20
    """After an early answer (413), a body up to this size is read and dropped so the client sees the answer."""
    max_connections: int = 1000
    """Open connections at most: one more closes the one that has waited longest without a request in progress
    (else the one whose request has trickled in longest), see Server.admit."""


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_INTERNAL = Response(500, b'{"error": "internal error"}\n', close=True)


class _Clock:
    """The Date header, formatted once per second instead of once per response."""

    def __init__(self) -> None:
        self.sec = 0
        self.header = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.sec:
            self.sec = now
            self.header = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.header


_clock = _Clock()


def encode(resp: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    """Status line, headers and body in one buffer: one send, one segment. A HEAD answer keeps the length of the
    body it leaves out."""
    head = [b"HTTP/1.1 %d %s\r\n" % (resp.status, _REASONS.get(resp.status, "Unknown").encode()),
            b"Server: bucketwire\r\n", _clock.date(),
            b"Content-Type: %s\r\nContent-Length: %d\r\n" % (resp.content_type.encode(), len(resp.body))]
    for k, v in resp.headers:
        head.append(f"{k}: {v}\r\n".encode("latin-1"))
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(resp.body)
    return b"".join(head)


class _Conn(asyncio.Protocol):
    """One client connection: parse, queue complete requests, answer them in order."""

    def __init__(self, server: Server) -> None:
        self.srv = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.queue: deque[tuple[Request, Response | None, bool]] = deque()
        self.queued_bytes = 0  # the bodies of the requests in `queue`
        self.waiting: Pending | None = None
        self.closing = False
        self.eof = False  # nothing more will be read: answer what is queued, then close
        self.paused = False
        self.write_paused = False
        self.unparsed = b""  # received, not yet parsed (see `_feed`)
        self.feeding = False
        self.half_closed = False  # the client sent its last byte while `unparsed` still held requests
        # the request being parsed
        self.req: Request | None = None
        self.url: list[bytes] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_len = 0
        self.early: Response | None = None
        self.continue_due = False  # it asked for `100 Continue`, owed once the requests before it are answered
        # deadlines, checked by the server's sweep (monotonic seconds; 0 = none)
        self.read_kind = "idle"  # "idle": between requests; "read": a request is arriving
        self.read_by = 0.0
        self.reply_by = 0.0
        self.since = time.monotonic()  # when read_kind last changed (which connection to close at the limit)
        self.raw: asyncio.Transport | None = None  # as accepted (before TLS): what closing it at the limit aborts

    # -- transport callbacks --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if self.raw is None:  # not a TLS connection, admitted when accepted
            self.raw = transport
            self.srv.admit(self)
        self.srv.conns.add(self)
        self._arm("idle", self.srv.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.srv.conns.discard(self)
        self.srv.accepted.discard(self)
        self.closing = True
        if self.waiting is not None:
            self.waiting._cancel()
            self.waiting = None
        self.srv.released()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.eof:
            return
        self.unparsed = self.unparsed + data if self.unparsed else data
        self._feed()

    def _feed(self) -> None:
        """Parse what has arrived, FEED_SLICE bytes at a time, while the connection may take more requests.

        One read can hold thousands of pipelined requests; parsed in one go they were all answered, whether or not
        the client read a byte of the answers. Between slices the parsing stops while the connection is held
        (`_held`: answers waiting to be written, or requests or bodies waiting to be answered), and resumes when it
        is not (`_flow`)."""
        if self.feeding:
            return  # called back from inside the parser: the loop below goes on
        self.feeding = True
        try:
            size = min(FEED_SLICE, self.srv.limits.max_body)  # the bodies held wait for a slice's end
            while self.unparsed and not (self.closing or self.eof or self._held()):
                chunk, self.unparsed = self.unparsed[:size], self.unparsed[size:]
                self._parse(chunk)
        finally:
            self.feeding = False
        if self.closing or self.eof:
            self.unparsed = b""
        if self.half_closed and not self.unparsed:
            self.half_closed = False
            if not self._peer_done():
                self._close()
        self._flow()

    def _parse(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch is offered: answer the request that asked for one, read nothing more, close.
            self.eof = True
            if not self.queue and self.waiting is None:
                self._close()
        except httptools.HttpParserError as e:
            if self.eof:
                # Past the connection's last request (no keep-alive, or an early answer whose body is not read):
                # what follows is not read as a request. llhttp calls it `Data after Connection: close`, and its
                # 400 used to go out as the answer to the committed request before it.
                return
            # httptools wraps what a callback raises; a limit we enforce says so in its own words
            cause = e.__context__ if isinstance(e.__context__, _TooLarge) else None
            if cause is not None:
                self._protocol_error(cause.status, str(cause))
            else:
                self._protocol_error(400, f"malformed HTTP request ({e})")

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()  # the answers held back while the buffer was full, then parsing what is left (`_flow`)

    def eof_received(self) -> bool | None:
        if self.unparsed:
            self.half_closed = True  # the requests still unparsed are answered first (`_feed`)
            return True
        return True if self._peer_done() else None

    def _peer_done(self) -> bool:
        """The client has sent its last byte: True to answer what it asked, then close; False when it asked
        nothing (or a request that can no longer complete), to close now."""
        if self.queue or self.waiting is not None:
            self.eof = True
            return True
        return False

    # -- parser callbacks -----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = Request("", "", self.peer)
        self.url.clear()
        self.header_bytes = 0
        self.body.clear()
        self.body_len = 0
        self.early = None
        self.continue_due = False
        self._arm("read", self.srv.limits.read_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_header(len(url))
        self.url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value))
        assert self.req is not None
        h = self.req.headers
        if len(h) >= MAX_HEADERS:
            raise _TooLarge(431, f"more than {MAX_HEADERS} header fields")
        k = name.decode("latin-1").lower()
        v = value.decode("latin-1")
        h[k] = f"{h[k]}, {v}" if k in h else v

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.method = self.parser.get_method().decode("latin-1")
        req.target = b"".join(self.url).decode("latin-1")
        req.split_target()
        early = self.srv.handler.head(req)
        expects = req.headers.get("expect", "").lower() == "100-continue"
        if early is not None:
            self.queue.append((req, early, False))
            length = req.headers.get("content-length", "")
            if expects or not length.isdigit() or int(length) > self.srv.limits.drain_body:
                # The body is not read: a client that asked whether to send it is told no (it has its final
                # answer, which says the connection closes), and one this large or unbounded is not worth
                # reading. Nothing after these headers is parsed; the connection closes once the answers to the
                # requests before it, then this one, are written.
                self._last()
                self._pump()
                raise _Stop
            self.early = early
            self._pump()
        elif expects:
            # An interim answer is still an answer: it goes out in this request's turn, after the answers to
            # the pipelined requests before it (`_pump` sends it once they are all written).
            self.continue_due = True
            self._pump()

    def on_body(self, chunk: bytes) -> None:
        self.body_len += len(chunk)
        if self.early is not None:
            if self.body_len > self.srv.limits.drain_body:
                self._close()
            return
        if self.body_len > self.srv.limits.max_body:
            raise _TooLarge(413, f"body exceeds {self.srv.limits.max_body} bytes")
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        keep = self.parser.should_keep_alive()
        if self.early is not None:
            self.early = None
            self._last()  # an early answer closes the connection: no request after it is read, nor committed
            if not self.queue and self.waiting is None:
                self._close()  # the early answer has gone; the body it refused is drained
            return
        req.body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.continue_due = False  # the client sent the body without waiting: no interim answer is needed
        self.queue.append((req, None, keep))
        self.queued_bytes += len(req.body)
        if not keep:
            self._last()  # HTTP/1.0 or `Connection: close`: what comes after it is not a request of ours
        self.read_by = 0.0  # waiting for the answer does not count against the client
        self._flow()
        self._pump()

    # -- answering ------------------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Answer queued requests in order until one has to wait."""
        while self.queue and self.waiting is None and not self.closing and not self.write_paused:
            req, resp, keep = self.queue[0]
            if resp is None:
                got = self._call(req)
                if isinstance(got, Pending):
                    if got.response is None:
                        self.waiting = got
                        self.reply_by = time.monotonic() + self.srv.limits.reply_timeout
                        got._then = self._answered
                        return
                    got = got.response
                resp = got
            self.queue.popleft()
            self.queued_bytes -= len(req.body)
            self._write(resp, keep and not resp.close, req.method == "HEAD")
        if self.continue_due and not self.queue and self.waiting is None and not self.closing:
            self.continue_due = False
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._flow()

    def _call(self, req: Request) -> Response | Pending:
        try:
            return self.srv.handler.handle(req)
        except Exception:
            log.exception("HTTP handler failed")
            return _INTERNAL

    def _answered(self, resp: Response) -> None:
        self.waiting = None
        self.reply_by = 0.0
        req, _, keep = self.queue.popleft()
        self.queued_bytes -= len(req.body)
        self._write(resp, keep and not resp.close, req.method == "HEAD")
        self._pump()

    def _write(self, resp: Response, keep: bool, head_only: bool = False) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        t.write(encode(resp, keep, head_only))
        if not keep:
            if self.early is not None and self.req is not None:
                return  # an early answer: on_message_complete closes once the refused body is drained
            t.close()
            self.closing = True
        elif not self.queue:
            if self.eof:
                self._close()
            elif self.req is None:
                self._arm("idle", self.srv.limits.idle_timeout)

    def _held(self) -> bool:
        """No more requests now: the answers wait to be written, or enough requests (or bodies: a connection holds
        at most about twice max_body, not MAX_PIPELINED of them) wait to be answered."""
        return (self.write_paused or len(self.queue) >= MAX_PIPELINED
                or self.queued_bytes >= self.srv.limits.max_body)

    def _flow(self) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        want_pause = self._held()
        if want_pause and not self.paused:
            t.pause_reading()
            self.paused = True
        elif not want_pause:
            if self.paused:
                t.resume_reading()
                self.paused = False
            if self.unparsed and not self.feeding:
                self._feed()

    # -- limits ---------------------------------------------------------------------------------------------
    def _count_header(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")

    def _protocol_error(self, status: int, reason: str) -> None:
        """Answer a request that cannot be parsed (or is over a limit) in its turn, then close.

        The complete requests before it are still answered first, in order: they may already be committed, and
        clearing them made their client read this 4xx as the answer to a request whose events were in the
        journal. Nothing after it is read."""
        self.srv.on_reject("malformed" if status == 400 else "too_large")
        self.early = None
        self._last()
        body = json.dumps({"error": reason}).encode() + b"\n"
        self.queue.append((Request("", "", self.peer), Response(status, body, close=True), False))
        self._pump()

    def _last(self) -> None:
        """Read nothing more: the requests queued are the connection's last (see `data_received`)."""
        self.eof = True
        self.req = None
        self.continue_due = False
        self.read_by = 0.0  # what is left is answering, which the reply deadline covers

    def _close(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.close()
        self.closing = True

    def _arm(self, kind: str, seconds: float) -> None:
        if kind != self.read_kind:
            self.since = time.monotonic()
        self.read_kind = kind
        self.read_by = time.monotonic() + seconds

    def expire(self, now: float) -> None:
        """Called by the sweep when a deadline may have passed."""
        t = self.transport
        if t is None or self.closing:
            return
        if self.reply_by and now >= self.reply_by and self.waiting is not None:
            late, self.waiting, self.reply_by = self.waiting, None, 0.0
            late._cancel()
            req, _, keep = self.queue.popleft()
            self.queued_bytes -= len(req.body)
            self._write(self.srv.handler.timed_out(req), keep, req.method == "HEAD")
            self._pump()
        if self.read_by and now >= self.read_by and not self.closing:
            self.read_by = 0.0
            if self.read_kind == "read":
                self.srv.on_reject("slow")
                t.abort()
            else:
                t.close()
            self.closing = True


class _Stop(Exception):
    """Raised in a parser callback to stop parsing this connection's input (after `_last`)."""


class _TooLarge(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _TLSConn(_Conn):
    """Plain TCP first, then `start_tls` under the read deadline, so a failed handshake can be counted."""

    before_upgrade: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.before_upgrade = []
        transport.pause_reading()  # nothing reaches the HTTP parser before the handshake is done
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.raw = transport
        self.read_kind = "read"  # a handshake under way counts as a request arriving
        self.srv.admit(self)
        task = asyncio.get_running_loop().create_task(self._upgrade(transport))
        self.srv.tasks.add(task)
        task.add_done_callback(self.srv.tasks.discard)

    async def _upgrade(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        assert self.srv.tls is not None
        try:
            tls = await loop.start_tls(raw, self, self.srv.tls, server_side=True,
                                       ssl_handshake_timeout=self.srv.limits.read_timeout)
        except OSError as e:  # ssl.SSLError, the handshake timeout and resets are all OSErrors
            self.srv.accepted.discard(self)
            self.srv.on_reject("tls")
            # A warning names the ingress, so it is logged once per 10 s (logs.PeerRateLimit) with how many were
            # left out: anyone who can reach the port can fail a handshake, and one line each filled the disk.
            log.warning("TLS handshake failed", extra={"ingress": "http", "peer": self.peer, "error": str(e)[:200]})
            raw.abort()
            self.srv.released()
            return
        if tls is None:
            self.srv.accepted.discard(self)
            raw.abort()
            self.srv.released()
            return
        super().connection_made(tls)
        # Still a request arriving until its first one does, not an idle keep-alive: at the connection limit an idle
        # one is closed first, and a flood of handshakes that never finish left this one, its handshake done and its
        # request a moment away, the only idle connection, so each new flood connection closed the real client.
        self._arm("read", self.srv.limits.read_timeout)
        early, self.before_upgrade = self.before_upgrade, None
        for data in early or ():
            super().data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.before_upgrade is not None:
            # The request can arrive with the end of the handshake, before start_tls has returned our transport;
            # parsing it now could answer into no transport.
            self.before_upgrade.append(data)
        else:
            super().data_received(data)


class Server:
    """The listening socket and its connections, on an asyncio loop that its owner drives.

    The hub steps the loop from its own loop thread (`fileno()` goes into the hub's poller, `step()` runs what is
    ready), so a webhook request is parsed, committed and answered without crossing a thread: no GIL hand-offs,
    no wake-up pipes, and SQLite's statement steps never wait for an HTTP thread to give the GIL back. Anything
    else can call `serve_forever()`.
    """

    def __init__(self, handler: Handler, host: str, port: int, *, limits: Limits | None = None,
                 tls: ssl.SSLContext | None = None, on_reject: Callable[[str], None] = lambda reason: None,
                 backlog: int = 512) -> None:
        """`backlog`: the listen queue, and how many descriptors past `max_connections` the server may hold for
        connections on their way in or out (see `max_sockets`)."""
        self.handler = handler
        self.limits = limits or Limits()
        self.tls = tls
        self.on_reject = on_reject
        self.conns: set[_Conn] = set()
        self.accepted: set[_Conn] = set()  # every open connection, TLS ones from before their handshake
        self.tasks: set[asyncio.Task[None]] = set()
        self.backlog = max(1, backlog)
        self.max_sockets = self.limits.max_connections + self.backlog
        """Descriptors the server holds at most: open connections, ones accepted and not yet admitted, and ones
        closed to make room whose descriptor is not yet released. `_accept` enforces it, not asyncio's own
        accept loop, which takes up to `backlog` sockets on every turn while `admit` runs two turns later: a
        flood held several times `backlog` descriptors and the hub ran out of them (EMFILE)."""
        self.socks: list[socket.socket] = []
        """Every socket accepted and not closed yet, and some closed ones (`fileno() == -1`) until `_room` prunes
        them: whoever closes a socket (a transport, TLS, a failed handshake) need not tell the server."""
        self.paused = False  # not reading the listening sockets: no room (see `released`) or `resting`
        self.resting = False  # out of descriptors: the listener rests ACCEPT_REST seconds
        self.selector = selectors.DefaultSelector()
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self._factory: Callable[[], _Conn] = (lambda: _TLSConn(self)) if tls is not None else (lambda: _Conn(self))
        try:
            self.listeners = _listen(host, port, self.backlog)
        except BaseException:
            self.loop.close()
            raise
        for ls in self.listeners:
            self.loop.add_reader(ls.fileno(), self._accept, ls)
        self.port: int = self.listeners[0].getsockname()[1]
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- accepting ------------------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        """Accept what the queue holds, at most the room left under `max_sockets`; with none left, stop reading
        the listener (level-triggered, it would wake every turn) until a connection is released."""
        room = min(self._room(), self.backlog)
        if room <= 0:
            self._pause()
            return
        for _ in range(room):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in ONE_CONNECTION:
                    continue  # the client gave up while it waited in the queue, or its network did
                self._rest(e)
                return
            self.socks.append(sock)
            task = self.loop.create_task(self._connect(sock))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self._factory, sock)
        except Exception as e:  # a client that reset at once: its socket is closed, nothing else to do
            sock.close()
            log.debug("webhook connection failed before it was made", extra={"ingress": "http", "error": str(e)})

    def _room(self) -> int:
        """How many more sockets may be accepted now. The closed ones are dropped from the count only when it
        reaches the limit: in the common case this costs nothing per connection."""
        if len(self.socks) >= self.max_sockets:
            self.socks = [s for s in self.socks if s.fileno() != -1]
        return self.max_sockets - len(self.socks)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            for ls in self.listeners:
                self.loop.remove_reader(ls.fileno())

    def _rest(self, e: OSError) -> None:
        """`accept` failed for want of a descriptor (another part of the process holds them) or for a reason of
        the kernel's: one line (rate limited, it names the ingress), then a pause; never a traceback, and never a
        listener that stays closed."""
        if e.errno in OUT_OF_DESCRIPTORS:
            msg = ("webhook port out of file descriptors; not accepting for a moment (raise the hub's limit, "
                   "e.g. LimitNOFILE= in its systemd unit)")
        else:
            msg = "webhook port could not accept; not accepting for a moment"
        log.warning(msg, extra={"ingress": "http", "error": e.strerror or str(e), "retry_in": ACCEPT_REST})
        self._pause()
        self.resting = True
        self.loop.call_later(ACCEPT_REST, self._wake)

    def _wake(self) -> None:
        self.resting = False
        self._resume()

    def released(self) -> None:
        """A connection is giving its descriptor back (or may be: the sweep calls this too). If the listener was
        paused for want of room it is looked at again on the next turn, once the transport has closed the socket
        (asyncio closes it right after `connection_lost`, or a turn after `abort`)."""
        if self.paused and not self.resting and not self.loop.is_closed():
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self.paused and not self.resting and self.listeners[0].fileno() != -1 and self._room() > 0:
            self.paused = False
            for ls in self.listeners:
                self.loop.add_reader(ls.fileno(), self._accept, ls)

    def fileno(self) -> int:
        """Readable whenever a connection or the listening socket has something to do."""
        return self.selector.fileno()

    def step(self) -> None:
        """Run whatever is ready (I/O, callbacks, due timers) without blocking, until no callback is left ready.

        One asyncio turn is not enough: a callback run in it often schedules the next one (a new connection is
        four of them in a row), and that work makes no file descriptor readable, so a driver that polls
        `fileno()` would sleep on it until its own timer fired -- a 200 ms stall on every fresh connection.
        """
        for _ in range(MAX_STEP_TURNS):
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()
            if not self.has_ready():
                return

    def due(self) -> bool:
        """Whether `step` has anything to do that does not make `fileno()` readable: callbacks ready to run, or a
        timer due. The hub's loop steps the server only then or when `fileno()` is readable: a step is an asyncio
        turn with its own `epoll_wait`, and at a low event rate the loop turns twice per event."""
        if self.has_ready():
            return True
        timers: list[asyncio.TimerHandle] | None = getattr(self.loop, "_scheduled", None)  # no public view either
        return timers is not None and len(timers) > 0 and timers[0].when() <= self.loop.time()

    def has_ready(self) -> bool:
        """Callbacks are waiting to run: the driver must step again without waiting for `fileno()`."""
        ready: deque[asyncio.Handle] | None = getattr(self.loop, "_ready", None)  # asyncio keeps no public view
        return bool(ready) and any(not h.cancelled() for h in ready or ())

    def serve_forever(self) -> None:
        self.loop.run_forever()

    def admit(self, conn: _Conn) -> None:
        """Count a connection just accepted; past `max_connections`, close one to make room for it.

        Why: each connection holds one of the hub's file descriptors before any token is checked. Unbounded,
        idle or trickling connections (slowloris) from anyone who can reach the port used them all up: then
        ZeroMQ could accept no worker or publisher and the journal's write probe failed, so the hub refused
        every publish. The one closed is the longest idle keep-alive, else the request that has been arriving
        longest: a real webhook sends its request at once and is answered in milliseconds, so new connections
        keep being served while the ones holding descriptors for nothing give way. A connection waiting for
        its commit is never closed here."""
        self.accepted.add(conn)
        if len(self.accepted) <= self.limits.max_connections:
            return
        victim = min((c for c in self.accepted if c is not conn and c.waiting is None),
                     key=lambda c: (c.read_kind != "idle", c.since), default=None)
        if victim is None:
            victim = conn
        self.on_reject("connections")
        log.warning("webhook connections at the limit; closed the longest idle",
                    extra={"ingress": "http", "limit": self.limits.max_connections, "peer": victim.peer})
        self.accepted.discard(victim)
        victim.closing = True
        if victim.raw is not None:
            victim.raw.abort()
        self.released()  # a TLS handshake cut short tells no connection_lost

    def _sweep(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.conns if (c.read_by and c.read_by <= now) or (c.reply_by and c.reply_by <= now)]:
            c.expire(now)
        self.released()  # a socket closed where no connection_lost tells the server (a failed TLS handshake)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self) -> None:
        """Stop listening and drop every connection; call from the thread that drives the loop, or after it."""
        if self.loop.is_closed():
            return
        for ls in self.listeners:
            self.loop.remove_reader(ls.fileno())
            ls.close()
        self.paused = True
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()
        for t in self.tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.sleep(0))
        for sock in self.socks:  # accepted, and never handed to a transport that closes it
            sock.close()
        self.socks = []
        self.loop.close()


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets as `loop.create_server` makes them (every address `host` resolves to, "" for all), for
    `Server._accept` to serve instead of asyncio's accept loop."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the v4 address gets its own
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out
