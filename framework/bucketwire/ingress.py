"""HTTP ingress: webhook endpoints, /metrics and /healthz.

A 2xx means the events are in the journal. Anything wrong with a request gets a 4xx with a one-line reason and
changes nothing; a journal that cannot commit gets 503 so MinIO (with `queue_dir`) keeps the event and retries.
Parsing happens in the request thread, so a hostile body costs that thread, never the hub loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import s3records
from .envelope import EnvelopeError, Event
from .journal import JournalError

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("bucketwire.ingress")

Parser = Callable[[bytes, str | None], list[Event]]


def parse_minio(body: bytes, store: str | None) -> list[Event]:
    return s3records.parse_body(body, store=store)


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

    return seaweedfs_events.parse_body(body, store=store)


ROUTES: dict[str, tuple[str, Parser]] = {
    "/minio/events": ("minio", parse_minio),
    "/seaweedfs/events": ("seaweedfs", parse_seaweedfs),
    "/events": ("cloudevents", parse_cloudevents),
}


class IngressServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], hub: Hub) -> None:
        self.hub = hub
        super().__init__(addr, Handler)


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

    def _reply(self, code: int, obj: Any, *, close: bool = False) -> None:
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

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
