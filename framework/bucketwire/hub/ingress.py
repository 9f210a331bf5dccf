"""HTTP ingress: webhook endpoints, /metrics and /healthz.

A 2xx means the events are in the journal. Anything wrong with a request gets a 4xx with a one-line reason and
changes nothing; a journal that cannot commit gets 503 so MinIO (with `queue_dir`) keeps the event and retries.
The hub's loop thread serves it (http_server.Server explains why); a body is at most `max_body_bytes`, so parsing
the worst one costs the loop milliseconds.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from bucketwire import exposition
from bucketwire.envelope import (
    DATA_BASE64,
    NESTING_REFUSAL,
    EnvelopeError,
    Event,
    data_base64_problem,
    dumps,
    is_rfc3339,
    shown,
    time_problem,
    valid_unicode,
)
from bucketwire.formats import s3_records
from bucketwire.hub.cert_reload import CertReload
from bucketwire.hub.http_server import Limits, Pending, Request, Response, Server
from bucketwire.procutil import fd_limit
from bucketwire.tlsfiles import RENEW_FIX, CertInfo, cert_info, server_context

if TYPE_CHECKING:
    from bucketwire.config import Config
    from bucketwire.hub.loop import Done, Health, Hub, IngestResult
    from bucketwire.hub.metrics import HubMetrics

    Submit = Callable[[list[Event], str, Done], None]

log = logging.getLogger("bucketwire.ingress")

Parser = Callable[[bytes, str | None], list[Event]]


def _text_only(events: list[Event]) -> list[Event]:
    """Refuse lone surrogates (JSON `\\ud800` escapes) in parsed records: no S3 store emits them, and every
    consumer that encodes them (SQLite, S3 clients, files) fails later, far from the cause."""
    for ev in events:
        if not valid_unicode(ev.data) or not valid_unicode([ev.id, ev.source, ev.type, ev.subject]):
            raise s3_records.RecordError("body contains invalid Unicode (a lone surrogate escape such as \\ud800)")
    return events


def parse_minio(body: bytes, store: str | None) -> list[Event]:
    return _text_only(s3_records.parse_body(body, store=store))


def parse_cloudevents(body: bytes, store: str | None) -> list[Event]:
    """Structured CloudEvent (one object) or a batch (a JSON array of them)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise s3_records.RecordError(f"body is not valid JSON: {e}") from None
    except RecursionError:  # past what the json module reads; no envelope may nest that deep (MAX_NESTING)
        raise s3_records.RecordError(f"body {NESTING_REFUSAL}") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items or len(items) > s3_records.MAX_RECORDS:
        raise s3_records.RecordError(f"expected 1 to {s3_records.MAX_RECORDS} CloudEvents")
    out = []
    for i, d in enumerate(items):
        try:
            ev = Event.from_dict(d)
        except EnvelopeError as e:
            raise s3_records.RecordError(f"event {i}: {e}") from None
        bad = time_problem(d.get("time")) or data_base64_problem(d)
        if bad is not None:
            raise s3_records.RecordError(f"event {i}: {bad}")
        # As binary mode's headers are checked: a name the spec forbids (`trace_id`, one with a newline) was
        # committed from a body while refused from a header. `data_base64` is the JSON format's, not an attribute.
        name = next((k for k in d if not _ATTRIBUTE_NAME.fullmatch(k) and k != DATA_BASE64), None)
        if name is not None:
            raise s3_records.RecordError(f"event {i}: attribute {shown(name)}: {ATTRIBUTE_NAMES}")
        ev.seq = None  # the hub assigns seqs
        out.append(ev)
    return out


_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,20}")
ATTRIBUTE_NAMES = "CloudEvents attribute names are 1 to 20 lowercase letters and digits"
BINARY_INT_ATTRIBUTES = ("hops", "schemaversion", "retries")
"""bucketwire's integer extensions: a header carries every attribute as text, so these are read back as ints."""


def binary_mode(headers: Mapping[str, str]) -> bool:
    """The CloudEvents HTTP binding's binary mode: attributes in `ce-*` headers, the data alone in the body.

    A `Content-Type` of `application/cloudevents...` means structured mode whatever other headers say; a body
    with neither (a plain JSON envelope) is read as structured, as before binary mode was accepted.
    """
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    return not media.startswith("application/cloudevents") and any(h.startswith("ce-") for h in headers)


def parse_cloudevents_binary(headers: Mapping[str, str], body: bytes) -> list[Event]:
    """One binary-mode CloudEvent as the HTTP binding (section 3.1) lays it out, checked like a structured one.

    Header values are percent-decoded; `Content-Type` is `datacontenttype` (absent means JSON, as the SDKs send
    JSON data). The envelope holds JSON, so JSON and text data are taken and anything else is refused rather than
    stored in a form no consumer expects.
    """
    def bad(why: str) -> s3_records.RecordError:
        return s3_records.RecordError(f"binary-mode CloudEvent (ce-* headers): {why}")

    d: dict[str, Any] = {}
    for name, value in headers.items():
        if name.startswith("ce-"):
            if not _ATTRIBUTE_NAME.fullmatch(name[3:]):
                raise bad(f"header {name[:40]}: {ATTRIBUTE_NAMES}")
            try:
                d[name[3:]] = unquote(value, errors="strict")
            except UnicodeDecodeError:
                raise bad(f"header {shown(name)} is not percent-encoded UTF-8") from None
    if "datacontenttype" in d or "data" in d:
        raise bad("send the data's type as Content-Type and the data as the body, not as ce-* headers")
    if "specversion" not in d:
        raise bad("the ce-specversion header is missing (want 1.0)")
    if "time" in d and not is_rfc3339(d["time"]):
        raise bad(f"header ce-time {shown(d['time'], 40)} is not an RFC 3339 timestamp with its zone "
                  "(2024-05-01T10:00:00.123Z)")
    for k in BINARY_INT_ATTRIBUTES:
        if k in d and d[k].isascii() and d[k].isdigit():
            d[k] = int(d[k])
    ctype = headers.get("content-type", "").strip()
    media, _, params = ctype.partition(";")
    media = media.strip().lower()
    if not body:
        d["data"] = None
    elif not media or media in ("application/json", "text/json") or media.endswith("+json"):
        try:
            d["data"] = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"body is not valid JSON ({ctype or 'no Content-Type: JSON assumed'}): {e}") from None
        except RecursionError:  # as in parse_cloudevents
            raise bad(f"body {NESTING_REFUSAL}") from None
    elif media.startswith("text/"):
        charset = next((p.split("=", 1)[1].strip(' "').lower() for p in params.split(";")
                        if p.strip().lower().startswith("charset=")), "utf-8")
        if charset not in ("utf-8", "utf8", "us-ascii"):
            raise bad(f"Content-Type {ctype}: only UTF-8 text is accepted")
        try:
            d["data"] = body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("body is not UTF-8 text") from None
    else:
        raise bad(f"Content-Type {ctype} cannot be carried: the envelope holds JSON or text data; send "
                  "application/json or text/*")
    if ctype:
        d["datacontenttype"] = ctype
    try:
        ev = Event.from_dict(d)
    except EnvelopeError as e:
        raise bad(str(e)) from None
    ev.seq = None  # the hub assigns seqs
    return [ev]


def parse_seaweedfs(body: bytes, store: str | None) -> list[Event]:
    from bucketwire.formats import seaweedfs_events

    return _text_only(seaweedfs_events.parse_body(body, store=store))


ROUTES: dict[str, tuple[str, Parser]] = {
    "/minio/events": ("minio", parse_minio),
    "/seaweedfs/events": ("seaweedfs", parse_seaweedfs),
    "/events": ("cloudevents", parse_cloudevents),
}


def tls_context(hub_cfg: Any) -> ssl.SSLContext | None:
    """[hub] tls_cert/tls_key serve HTTPS; tls_client_ca also requires a client certificate signed by that CA.

    A certificate out of its dates is a warning, not a refusal to start: the hub's ZeroMQ side needs no
    certificate, and MinIO keeps what it cannot deliver (queue_dir) until the certificate is renewed, which the
    running hub picks up (hub/cert_reload.py). OpenSSL loads such a certificate without a word, and every client
    that checks it then refused each handshake while /healthz said 200."""
    if hub_cfg.tls_cert is None:
        return None
    ctx, _, problem = server_context(hub_cfg.tls_cert, hub_cfg.tls_key, hub_cfg.tls_client_ca, strict_dates=False)
    if problem is not None:
        log.warning(f"{problem}; {RENEW_FIX}")
    return ctx


KNOWN_SCHEMES = frozenset({"basic", "digest", "token", "negotiate", "aws4-hmac-sha256", "hoba", "mutual"})
"""Authorization schemes a refusal's log line names; any other first word might be a token sent bare."""

JOURNAL_HIDDEN = "the journal cannot be written (the hub's log, or /healthz with its auth_token, says why)"
REVOCATIONS_HIDDEN = ("the revocation list cannot be read; the last list read is enforced (the hub's log, or /healthz "
                      "with its auth_token, says why)")


class Ingress:
    """The webhook endpoints, /metrics and /healthz, as an `http_server` handler.

    Everything that can be refused from the headers alone (unknown path, wrong token, no Content-Length, too
    large) is refused before the body is read. A POST that parses is handed to the hub loop, and its answer
    waits for the commit as a Pending, so a connection waiting for the journal holds no thread.
    """

    def __init__(self, cfg: Config, metrics: HubMetrics, *, submit: Submit, overloaded: Callable[[], bool],
                 health: Callable[[], Health]) -> None:
        """`submit` queues events for the hub's next commit; `overloaded` says whether too many requests already
        wait for it; `health` is what /healthz reports."""
        self.stores = cfg.stores
        self.cfg = cfg.hub
        self.metrics = metrics
        self.rejected = metrics.rejected
        self.submit = submit
        self.overloaded = overloaded
        self.health = health

    # -- answers --------------------------------------------------------------------------------------------
    @staticmethod
    def reply(code: int, obj: Any, *, close: bool = False) -> Response:
        return Response(code, dumps(obj) + b"\n", close=close)

    def fail(self, code: int, reason: str, metric: str, *, close: bool = False) -> Response:
        self.rejected.labels("http", metric).inc()
        return self.reply(code, {"error": reason}, close=close)

    def not_found(self, path: str) -> Response:
        return self.fail(404, f"no such endpoint {path[:200]}; POST to one of {', '.join(ROUTES)}", "not_found",
                         close=True)

    def timed_out(self, req: Request) -> Response:
        return self.fail(503, "journal unavailable, retry later (timeout)", "unavailable")

    # -- checks ---------------------------------------------------------------------------------------------
    def _local_only(self, peer: str) -> bool:
        """/metrics and /healthz answer only loopback peers unless [hub] metrics_public = true."""
        if self.cfg.metrics_public:
            return False
        try:
            ip = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return True
        mapped = getattr(ip, "ipv4_mapped", None)
        return not (mapped or ip).is_loopback

    def _authorized(self, req: Request) -> bool:
        tokens = self.cfg.auth_tokens
        if not tokens:
            return True
        got = req.headers.get("authorization", "")
        if got[:7].lower() == "bearer ":
            got = got[7:].strip()
        ok = False
        for t in tokens:  # compare against every token so timing says nothing about which one matched
            ok |= hmac.compare_digest(got.encode(), t.encode())
        return ok

    def _auth_problem(self, req: Request) -> str:
        """What was wrong with a refused request's Authorization header, in words that hold none of it but its
        scheme: a log line must not hand a token (a near miss, or another service's) to whoever reads the log."""
        got = req.headers.get("authorization")
        if got is None:
            return "no Authorization header"
        scheme, space, _ = got.strip().partition(" ")
        if not scheme:
            return "an empty Authorization header"
        if space and scheme.lower() != "bearer":
            # Only a known scheme is named: without a space the first word is a token sent bare (taken when right).
            shown = scheme if scheme.lower() in KNOWN_SCHEMES else "an unknown one"
            return f"Authorization scheme {shown}, not Bearer"
        return f"the token matches none of the {len(self.cfg.auth_tokens)} configured token(s)"

    def head(self, req: Request) -> Response | None:
        if req.method in ("GET", "HEAD"):
            # These need no token, so a body they carried was buffered (up to max_body_bytes per connection)
            # for anyone who can reach the port: a few hundred connections each holding a body just short of its
            # end held hundreds of MiB of the hub. None of them takes a body; it is refused, and never kept.
            sent = req.headers.get("content-length", "0")
            if "transfer-encoding" in req.headers or not sent.isdigit() or int(sent) > 0:
                return self.fail(400, f"a {req.method} request takes no body; send it without one", "malformed",
                                 close=True)
            return None
        if req.method != "POST":
            return self.fail(405, f"method {req.method[:16]} not allowed; POST events, GET /healthz or /metrics",
                             "method", close=True)
        path = req.path
        if path not in ROUTES:
            return self.not_found(path)
        if not self._authorized(req):
            # The operator's one clue when a store's token is stale (MinIO then queues every event): one line per
            # PEER_WINDOW (logs.PeerRateLimit, keyed on the ingress), naming the peer and what was wrong, never
            # the token sent nor the ones expected.
            log.warning("webhook refused: missing or wrong bearer token",
                        extra={"ingress": "http", "peer": req.peer, "path": path, "why": self._auth_problem(req)})
            return self.fail(401, "missing or wrong bearer token (Authorization: Bearer <auth_token>)", "auth",
                             close=True)
        if "transfer-encoding" in req.headers:
            return self.fail(411, "chunked bodies are not accepted; send Content-Length", "length", close=True)
        length = req.headers.get("content-length")
        if length is None or not length.isdigit():
            return self.fail(411, "Content-Length is required", "length", close=True)
        n = int(length)
        if n > self.cfg.max_body_bytes:
            return self.fail(413, f"body of {n} bytes exceeds max_body_bytes={self.cfg.max_body_bytes}",
                             "too_large", close=True)
        return None

    # -- requests -------------------------------------------------------------------------------------------
    def handle(self, req: Request) -> Response | Pending:
        if req.method == "POST":
            return self.post(req)
        path = req.path
        # A refusal of a GET (403, 404) closes the connection, as a 401 does: it needs no token, and kept open, one
        # read of pipelined requests from a client that reads nothing had the loop answer thousands of them.
        if path in ("/healthz", "/metrics") and self._local_only(req.peer):
            return self.fail(403, f"{path} answers loopback clients only; set [hub] metrics_public = true",
                             "forbidden", close=True)
        if path == "/healthz":
            return self.healthz(req)
        if path == "/metrics":
            body, content_type = exposition.render(self.metrics.registry, req.headers.get("accept"))
            return Response(200, body, content_type)
        return self.not_found(path)

    def healthz(self, req: Request) -> Response:
        """Status for anyone allowed to ask; the why (the journal's or the revocation list's error) only for a
        token holder when the page is public.

        With `metrics_public` anyone who reaches the port reads it (and behind a reverse proxy on this host every
        stranger is a loopback peer), and those texts hold state_dir paths, OS errors and NATS addresses. A
        stranger gets a short code; `[hub] auth_token` (Authorization: Bearer) gets the text, as a loopback peer
        of a hub without `metrics_public` does."""
        h = self.health()
        alive = time.monotonic() - h.last_tick < max(5.0, 3 * self.cfg.heartbeat_interval)
        writable = h.journal_ok and h.write_error is None
        ok = alive and writable
        told = not self.cfg.metrics_public or (bool(self.cfg.auth_tokens) and self._authorized(req))
        doc: dict[str, Any] = {"ok": ok, "loop": alive, "journal": writable}
        if h.revocations_error:  # still serving, enforcing the last list read: a warning, not a 503
            doc["revocations"] = h.revocations_error if told else REVOCATIONS_HIDDEN
        if not ok:
            doc["code"] = "loop_stalled" if not alive else "journal_unwritable"
            if not alive:
                doc["reason"] = "hub loop is not turning"
            elif told:
                doc["reason"] = h.write_error or "the last journal commit failed (disk full or I/O error?)"
            else:
                doc["reason"] = JOURNAL_HIDDEN
        return self.reply(200 if ok else 503, doc)

    def post(self, req: Request) -> Response | Pending:
        label, parse = ROUTES[req.path]
        named = parse_qs(req.query).get("store") if req.query else None
        store = named[0] if named else self.cfg.default_store
        if named and store not in self.stores:
            # The name is the sender's: shown clipped and escaped (a request line may hold 64 KiB of it, control
            # characters and all), in the answer and in the log line an operator reads to find the bad webhook.
            name = shown(named[0])
            log.warning("webhook refused: unknown store in ?store=",
                        extra={"ingress": "http", "peer": req.peer, "path": req.path, "store": name})
            have = ", ".join(sorted(self.stores)) or "none"
            return self.fail(400, f"unknown store {name} in ?store= (configured: {have}); add a [stores.NAME] "
                             "table for it to the hub's config, or send a configured name", "store")
        try:
            if label == "cloudevents" and binary_mode(req.headers):
                events = parse_cloudevents_binary(req.headers, req.body)
            else:
                events = parse(req.body, store)
        except s3_records.RecordError as e:
            return self.fail(400, str(e), "malformed")
        except Exception as e:  # a parser bug must cost one request, never the server
            log.exception("parser failed")
            return self.fail(400, f"cannot parse body: {type(e).__name__}", "malformed")
        if not events:
            return self.reply(200, {"accepted": 0, "ignored": True})
        if self.overloaded():  # bounded ingress: refuse rather than queue without limit behind a slow journal
            return self.fail(503, "hub overloaded (too many requests waiting for the journal), retry later",
                             "overloaded")
        pending = Pending()
        # The hub loop thread drives this server too, so the commit's callback answers directly.
        self.submit(events, label, lambda results, err: pending.resolve(self._answer(results, err)))
        return pending

    def _answer(self, results: list[IngestResult] | None, err: str | None) -> Response:
        if results is None:
            return self.fail(503, f"journal unavailable, retry later ({err})", "unavailable")
        errors = [r for r in results if r.error]
        if errors:
            big = next((r for r in errors if r.too_large), None)
            if big is not None:
                return self.fail(413, big.error or "too large", "too_large")
            return self.fail(400, errors[0].error or "refused", "refused")
        return self.reply(200, {
            "accepted": sum(1 for r in results if not r.unrouted and not r.duplicate),
            "duplicates": sum(1 for r in results if r.duplicate),
            "unrouted": sum(1 for r in results if r.unrouted),
            "events": [r.as_dict() for r in results],
        })


def serve(hub: Hub, http: str) -> Server:
    """Listen on `http` (HOST:PORT); the hub's loop thread serves the requests once `hub.run()` starts."""
    host, _, port = http.rpartition(":")
    ingress = Ingress(hub.cfg, hub.metrics, submit=hub.submit, overloaded=hub.ops.overloaded, health=hub.health)
    cfg = hub.cfg.hub
    # A quarter of the descriptors for open connections, and at most a quarter more for connections on their way
    # in (accepted, not yet admitted: Server.admit) or out (closed to make room, not yet released): the server
    # never holds more than max_connections + backlog (Server.max_sockets, enforced by its own accept). The
    # other half stays for ZeroMQ peers, the journal and its write probe (about 30 at start).
    quarter = max(16, fd_limit() // 4)
    limits = Limits(read_timeout=cfg.http_read_timeout, idle_timeout=cfg.http_idle_timeout,
                    reply_timeout=cfg.request_timeout, max_body=cfg.max_body_bytes,
                    drain_body=16 * cfg.max_body_bytes,
                    max_connections=min(cfg.http_max_connections, quarter))
    certs = None
    if cfg.tls_cert is not None:
        expiry = hub.metrics.tls_cert_expiry()

        def loaded(info: CertInfo | None) -> None:
            if info is not None:
                expiry.set(info.not_after)

        certs = CertReload(cfg, hub.cfg.security.reload_interval, on_loaded=loaded)
    try:
        srv = Server(ingress, host.strip("[]"), int(port), limits=limits, tls=tls_context(cfg),
                     on_reject=lambda reason: ingress.rejected.labels("http", reason).inc(),
                     backlog=min(512, quarter))
    except OSError as e:
        raise OSError(f"cannot listen on {http} ({e.strerror}); is the port taken? set [hub] http") from None
    if certs is not None:
        assert cfg.tls_cert is not None
        certs.on_loaded(cert_info(cfg.tls_cert))
    hub.attach_http(srv, certs)
    return srv
