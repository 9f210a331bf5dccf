"""HTTP ingress: webhook endpoints, /metrics and /healthz.

A 2xx means the events are in the journal. Anything wrong with a request gets a 4xx with a one-line reason and
changes nothing; a journal that cannot commit gets 503 so MinIO (with `queue_dir`) keeps the event and retries.
Parsing happens in the request thread, so a hostile body costs that thread, never the hub loop.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import s3records
from .config import ConfigError
from .envelope import EnvelopeError, Event, valid_unicode
from .journal import JournalError

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("bucketwire.ingress")

Parser = Callable[[bytes, str | None], list[Event]]


def _text_only(events: list[Event]) -> list[Event]:
    """Refuse lone surrogates (JSON `\\ud800` escapes) in parsed records: no S3 store emits them, and every
    consumer that encodes them (SQLite, S3 clients, files) fails later, far from the cause."""
    for ev in events:
        if not valid_unicode(ev.data) or not valid_unicode([ev.id, ev.source, ev.type, ev.subject]):
            raise s3records.RecordError("body contains invalid Unicode (a lone surrogate escape such as \\ud800)")
    return events


def parse_minio(body: bytes, store: str | None) -> list[Event]:
    return _text_only(s3records.parse_body(body, store=store))


def parse_cloudevents(body: bytes, store: str | None) -> list[Event]:
    """Structured CloudEvent (one object) or a batch (a JSON array of them)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise s3records.RecordError(f"body is not valid JSON: {e}") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items or len(items) > s3records.MAX_RECORDS:
        raise s3records.RecordError(f"expected 1 to {s3records.MAX_RECORDS} CloudEvents")
    out = []
    for i, d in enumerate(items):
        try:
            ev = Event.from_dict(d)
        except EnvelopeError as e:
            raise s3records.RecordError(f"event {i}: {e}") from None
        ev.seq = None  # the hub assigns seqs
        out.append(ev)
    return out


def parse_seaweedfs(body: bytes, store: str | None) -> list[Event]:
    from . import seaweedfs_events

    return _text_only(seaweedfs_events.parse_body(body, store=store))


ROUTES: dict[str, tuple[str, Parser]] = {
    "/minio/events": ("minio", parse_minio),
    "/seaweedfs/events": ("seaweedfs", parse_seaweedfs),
    "/events": ("cloudevents", parse_cloudevents),
}


class _Watchdog:
    """Cuts connections that have not delivered a whole request (line, headers, body) within their deadline.

    A per-read socket timeout alone lets a slowloris client hold a thread forever by sending one byte just
    before each timeout; one thread checking absolute deadlines bounds every request however it trickles in.
    """

    def __init__(self, on_cut: Callable[[], None]) -> None:
        self.deadlines: dict[socket.socket, float] = {}
        self.lock = threading.Lock()
        self.on_cut = on_cut
        threading.Thread(target=self._run, name="ingress-watchdog", daemon=True).start()

    def arm(self, conn: socket.socket, seconds: float) -> None:
        with self.lock:
            self.deadlines[conn] = time.monotonic() + seconds

    def disarm(self, conn: socket.socket) -> None:
        with self.lock:
            self.deadlines.pop(conn, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self.lock:
                late = [c for c, t in self.deadlines.items() if t <= now]
                for c in late:
                    del self.deadlines[c]
            for c in late:
                self.on_cut()
                try:  # the plain socket's shutdown, also under TLS: the blocked read returns at once
                    socket.socket.shutdown(c, socket.SHUT_RDWR)
                except OSError:
                    pass


def tls_context(hub_cfg: Any) -> ssl.SSLContext | None:
    """[hub] tls_cert/tls_key serve HTTPS; tls_client_ca also requires a client certificate signed by that CA."""
    if hub_cfg.tls_cert is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(hub_cfg.tls_cert, hub_cfg.tls_key)
        if hub_cfg.tls_client_ca is not None:
            ctx.load_verify_locations(cafile=hub_cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[hub] tls_cert/tls_key/tls_client_ca: cannot load ({e}); give PEM files the hub "
                          "can read") from None
    return ctx


class IngressServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], hub: Hub) -> None:
        self.hub = hub
        super().__init__(addr, Handler)
        self.watchdog = _Watchdog(lambda: hub.metrics.rejected.labels("http", "slow").inc())
        ctx = tls_context(hub.cfg.hub)
        if ctx is not None:
            # The handshake runs in the request thread under the watchdog, never in the accept loop.
            self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that breaks its connection (cut by the watchdog, bad TLS) is not a server error."""
        log.debug("connection error", extra={"peer": str(client_address[0]) if client_address else None},
                  exc_info=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: IngressServer
    timeout = 30  # a slow client cannot pin a thread for longer than this per read
    server_version = "bucketwire"
    sys_version = ""
    # Headers and body leave in two writes; with Nagle on, the body waits for the client's delayed ACK
    # (40 ms on Linux), which capped every keep-alive connection at ~25 requests/s (bench webhook).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http " + format, *args)

    def setup(self) -> None:
        self.timeout = self.server.hub.cfg.hub.http_idle_timeout  # per read: set before the stream is made
        super().setup()
        self._tls_failed = False
        if isinstance(self.connection, ssl.SSLSocket):
            self.server.watchdog.arm(self.connection, self.server.hub.cfg.hub.http_read_timeout)
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError) as e:
                self._tls_failed = True
                self.server.hub.metrics.rejected.labels("http", "tls").inc()
                log.info("TLS handshake failed", extra={"peer": self.client_address[0], "error": str(e)[:200]})
            finally:
                self.server.watchdog.disarm(self.connection)

    def handle(self) -> None:
        if not self._tls_failed:
            super().handle()

    def handle_one_request(self) -> None:
        # The deadline covers waiting for, and reading, the whole request; do_POST disarms it once the body
        # is in, so the time spent waiting for the journal does not count.
        wd = self.server.watchdog
        wd.arm(self.connection, self.server.hub.cfg.hub.http_read_timeout)
        try:
            super().handle_one_request()
        finally:
            wd.disarm(self.connection)

    def _local_only(self) -> bool:
        """/metrics and /healthz answer only loopback peers unless [hub] metrics_public = true."""
        if self.server.hub.cfg.hub.metrics_public:
            return False
        try:
            ip = ipaddress.ip_address(str(self.client_address[0]).split("%")[0])
        except ValueError:
            return True
        mapped = getattr(ip, "ipv4_mapped", None)
        return not (mapped or ip).is_loopback

    def _reply(self, code: int, obj: Any, *, close: bool = False) -> None:
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        # Headers and body in one send: one syscall and one segment instead of two (end_headers + write).
        self._headers_buffer.append(b"\r\n" + body)
        self.flush_headers()

    def _fail(self, code: int, reason: str, metric: str, *, close: bool = False) -> None:
        self.server.hub.metrics.rejected.labels("http", metric).inc()
        self._reply(code, {"error": reason}, close=close)

    def _authorized(self) -> bool:
        tokens = self.server.hub.cfg.hub.auth_tokens
        if not tokens:
            return True
        got = self.headers.get("Authorization", "")
        if got[:7].lower() == "bearer ":
            got = got[7:].strip()
        ok = False
        for t in tokens:  # compare against every token so timing says nothing about which one matched
            ok |= hmac.compare_digest(got.encode(), t.encode())
        return ok

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        hub = self.server.hub
        if path in ("/healthz", "/metrics") and self._local_only():
            self._fail(403, f"{path} answers loopback clients only; set [hub] metrics_public = true", "forbidden")
            return
        if path == "/healthz":
            alive = time.monotonic() - hub.last_tick < max(5.0, 3 * hub.cfg.hub.heartbeat_interval)
            ok = alive and hub.journal_ok
            self._reply(200 if ok else 503, {"ok": ok, "loop": alive, "journal": hub.journal_ok})
        elif path == "/metrics":
            body = generate_latest(hub.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._fail(404, f"no such endpoint {path}; POST to one of {', '.join(ROUTES)}", "not_found")

    def _discard(self, n: int) -> None:
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    return
                n -= len(chunk)
        except OSError:
            pass

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        route = ROUTES.get(url.path)
        hub = self.server.hub
        if route is None:
            self._fail(404, f"no such endpoint {url.path}; POST to one of {', '.join(ROUTES)}", "not_found",
                       close=True)
            return
        label, parse = route
        if not self._authorized():
            self._fail(401, "missing or wrong bearer token (Authorization: Bearer <auth_token>)", "auth", close=True)
            return
        if self.headers.get("Transfer-Encoding"):
            self._fail(411, "chunked bodies are not accepted; send Content-Length", "length", close=True)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._fail(411, "Content-Length is required", "length", close=True)
            return
        n = int(length)
        if n > hub.cfg.hub.max_body_bytes:
            if n <= 16 * hub.cfg.hub.max_body_bytes:
                # Read and drop a moderately oversized body so the client sees the 413 instead of a reset.
                self._discard(n)
            self._fail(413, f"body of {n} bytes exceeds max_body_bytes={hub.cfg.hub.max_body_bytes}", "too_large",
                       close=True)
            return
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            self._fail(408, "timed out reading the body", "timeout", close=True)
            return
        if len(body) != n:
            self._fail(400, "body shorter than Content-Length", "truncated", close=True)
            return
        self.server.watchdog.disarm(self.connection)
        named = parse_qs(url.query).get("store")
        store = named[0] if named else hub.cfg.hub.default_store
        if named and store not in hub.cfg.stores:
            have = ", ".join(sorted(hub.cfg.stores)) or "none"
            self._fail(400, f"unknown store {store!r} in ?store= (configured: {have}); add [stores.{store}]", "store")
            return
        try:
            events = parse(body, store)
        except s3records.RecordError as e:
            self._fail(400, str(e), "malformed")
            return
        except Exception as e:  # a parser bug must cost one request, never the server
            log.exception("parser failed")
            self._fail(400, f"cannot parse body: {type(e).__name__}", "malformed")
            return
        if not events:
            self._reply(200, {"accepted": 0, "ignored": True})
            return
        if hub.ops.overloaded():  # bounded ingress: refuse rather than queue without limit behind a slow journal
            self._fail(503, "hub overloaded (too many requests waiting for the journal), retry later", "overloaded")
            return
        try:
            results = hub.submit(events, label).result(timeout=hub.cfg.hub.request_timeout)
        except (JournalError, FutureTimeout) as e:
            self._fail(503, f"journal unavailable, retry later ({e or 'timeout'})", "unavailable")
            return
        errors = [r for r in results if r.error]
        if errors:
            self._fail(400, errors[0].error or "refused", "refused")
            return
        self._reply(200, {
            "accepted": sum(1 for r in results if not r.unrouted and not r.duplicate),
            "duplicates": sum(1 for r in results if r.duplicate),
            "unrouted": sum(1 for r in results if r.unrouted),
            "events": [r.as_dict() for r in results],
        })


def serve(hub: Hub, http: str) -> IngressServer:
    host, _, port = http.rpartition(":")
    try:
        srv = IngressServer((host.strip("[]"), int(port)), hub)
    except OSError as e:
        raise OSError(f"cannot listen on {http} ({e.strerror}); is the port taken? set [hub] http") from None
    threading.Thread(target=srv.serve_forever, name="ingress", daemon=True).start()
    return srv
