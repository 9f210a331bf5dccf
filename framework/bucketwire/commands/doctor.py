"""`bucketwire doctor -c CONFIG`: check a config and the running system, one line per finding with its fix.

The checks are the mistakes that cost an operator an hour at 3 a.m.: an endpoint that is down or is the wrong
kind of socket ([client] work pointing at the PUB port looks "connected" to ZeroMQ and then silently never
answers), hub and worker disagreeing about the envelope schema, a store that is unreachable or a bucket a plugin
writes to that does not exist, a plugin named in the config but not installed, CURVE keys that do not belong
together, routes that can never match, and topics that events are routed to but nobody consumes.

Every check reports `error` (exit code 1), `warn` (worth a look, exit 0) or `ok`. The socket type is read from the
ZMTP greeting the peer sends (its READY command carries `Socket-Type`), so no message is ever sent to the hub.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import click

from bucketwire.config import Config, ConfigError, Route
from bucketwire.envelope import SCHEMA_VERSION
from bucketwire.zmtp import ZmtpError, endpoint_path, parse_properties

# S3 / MinIO event names (AWS S3 + MinIO extensions); a route glob starting with "s3:" must match one of them.
S3_EVENTS = [
    "s3:ObjectCreated:Put", "s3:ObjectCreated:Post", "s3:ObjectCreated:Copy",
    "s3:ObjectCreated:CompleteMultipartUpload", "s3:ObjectCreated:PutRetention", "s3:ObjectCreated:PutLegalHold",
    "s3:ObjectCreated:PutTagging", "s3:ObjectCreated:DeleteTagging",
    "s3:ObjectRemoved:Delete", "s3:ObjectRemoved:DeleteMarkerCreated", "s3:ObjectRemoved:NoOP",
    "s3:ObjectRemoved:DeleteAllVersions",
    "s3:ObjectAccessed:Get", "s3:ObjectAccessed:Head", "s3:ObjectAccessed:GetRetention",
    "s3:ObjectAccessed:GetLegalHold", "s3:ObjectAccessed:Attributes",
    "s3:ObjectRestore:Post", "s3:ObjectRestore:Completed", "s3:ObjectRestore:Delete",
    "s3:ObjectTagging:Put", "s3:ObjectTagging:Delete", "s3:ObjectAcl:Put",
    "s3:ObjectTransition:Failed", "s3:ObjectTransition:Complete", "s3:LifecycleTransition",
    "s3:LifecycleExpiration:Delete", "s3:LifecycleExpiration:DeleteMarkerCreated",
    "s3:LifecycleDelMarkerExpiration:Delete",
    "s3:IntelligentTiering", "s3:Replication:OperationFailedReplication",
    "s3:Replication:OperationMissedThreshold", "s3:Replication:OperationReplicatedAfterThreshold",
    "s3:Replication:OperationNotTracked", "s3:Replication:OperationCompletedReplication", "s3:Scanner:ManyVersions",
    "s3:Scanner:BigPrefix", "s3:ReducedRedundancyLostObject", "s3:BucketCreated", "s3:BucketRemoved",
]

WANT_TYPE = {"work": "ROUTER", "publish": "XPUB"}
ALSO_FINE = {"publish": ("PUB",)}  # the fan-out of a hub from before it counted subscriptions (an XPUB now)


@dataclass(slots=True)
class Finding:
    level: str  # "error" | "warn" | "ok"
    what: str
    fix: str = ""

    def line(self) -> str:
        tag = {"error": "ERROR", "warn": "WARN ", "ok": "ok   "}[self.level]
        return f"{tag} {self.what}" + (f" -- fix: {self.fix}" if self.fix else "")


# -- ZeroMQ endpoints ------------------------------------------------------------------------------------------
def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return buf


def zmtp_probe(endpoint: str, timeout: float = 1.5) -> dict[str, Any]:
    """Connect with a raw TCP socket and read the peer's ZMTP greeting: {"mechanism", "socket_type"} or "error".

    With the NULL mechanism the peer's READY command names its socket type; with CURVE only the mechanism is
    visible before the handshake, which is still enough to tell a security mismatch.
    """
    path = endpoint_path(endpoint)
    if path is None and not endpoint.startswith("tcp://"):
        return {"skipped": f"{endpoint} is not tcp:// or ipc://"}
    try:
        if path is not None:  # the hub's local socket ([hub] local): the same greeting over a Unix socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
            except OSError:
                s.close()
                raise
        else:
            host, _, port = endpoint[6:].rpartition(":")
            host = host.strip("[]")
            if host in ("*", "0.0.0.0", ""):
                host = "127.0.0.1"
            s = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError) as e:
        return {"error": f"cannot connect ({getattr(e, 'strerror', None) or e})"}
    try:
        s.settimeout(timeout)
        # The signature and major version first, the rest once the peer's whole greeting is read: a CURVE peer
        # given a NULL mechanism closes the connection before its own greeting has gone out.
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3]))
        g = _recv_exact(s, 64)
        if g[0] != 0xFF or not g[9] & 1:
            return {"error": "the peer does not speak ZeroMQ (ZMTP)"}
        mech = g[12:32].rstrip(b"\0").decode("ascii", "replace")
        out: dict[str, Any] = {"mechanism": mech, "version": f"{g[10]}.{g[11]}"}
        if mech != "NULL":
            return out
        s.sendall(bytes([0]) + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31)
        flags = _recv_exact(s, 1)[0]
        size = struct.unpack(">Q", _recv_exact(s, 8))[0] if flags & 2 else _recv_exact(s, 1)[0]
        body = _recv_exact(s, size)
        i = 1 + body[0]
        if body[1:i] != b"READY":
            return out
        kind = parse_properties(body[i:]).get(b"socket-type")
        if kind is not None:
            out["socket_type"] = kind.decode("ascii", "replace")
        return out
    except ZmtpError as e:
        return {"error": f"a broken ZeroMQ greeting ({e})"}
    except (OSError, ConnectionError) as e:
        return {"error": f"no ZeroMQ greeting ({e})"}
    finally:
        s.close()


def check_endpoints(cfg: Config) -> list[Finding]:
    out: list[Finding] = []
    sec = getattr(cfg, "security", None)
    curve = bool(getattr(sec, "curve", False))
    eps = [("work", e) for e in cfg.client.work_endpoints] + [("publish", e) for e in cfg.client.publish_endpoints]
    for key, ep in eps:
        want = WANT_TYPE[key]
        r = zmtp_probe(ep)
        where = f"[client] {key} = {ep}"
        if "skipped" in r:
            out.append(Finding("warn", f"{where}: not probed ({r['skipped']})"))
        elif "error" in r:
            out.append(Finding("error", f"{where}: {r['error']}",
                               f"start `bucketwire hub` with [hub] local = \"{ep}\", or point [client] {key} at "
                               "the hub's [hub] local" if ep.startswith("ipc://") else
                               f"start `bucketwire hub`, or point [client] {key} at the hub's [hub] {key}"))
        elif r["mechanism"] == "CURVE" and not curve:
            out.append(Finding("error", f"{where}: the hub requires CURVE but [security] curve is off here",
                               "set [security] curve = true with client_secret_key and server_public_key"))
        elif r["mechanism"] == "NULL" and curve and not ep.startswith("ipc://"):  # the local socket has no CURVE
            out.append(Finding("error", f"{where}: the peer does not use CURVE but [security] curve = true",
                               "enable [security] on the hub too, or check that this is the right hub"))
        elif r.get("socket_type") and r["socket_type"] != want and r["socket_type"] not in ALSO_FINE.get(key, ()):
            other = {"PUB": "publish", "XPUB": "publish", "ROUTER": "work"}.get(r["socket_type"], "some other")
            out.append(Finding("error", f"{where}: that is a {r['socket_type']} socket (the hub's {other} port?), "
                                        f"{key} needs the hub's {want}",
                               f"set [client] {key} to the hub's [hub] {key} endpoint"))
        else:
            out.append(Finding("ok", f"{where}: {r.get('socket_type') or r['mechanism']} socket answers"))
    return out


# -- the running hub ------------------------------------------------------------------------------------------
def check_http(cfg: Config) -> list[Finding]:
    host, _, port = cfg.hub.http.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "*", "") else host.strip("[]")
    scheme = "https" if getattr(cfg.hub, "tls_cert", None) else "http"
    url = f"{scheme}://{host}:{port}/healthz"
    # With metrics_public, /healthz says why (a path, an OS error) only to a holder of the hub's auth_token.
    auth = {"Authorization": f"Bearer {cfg.hub.auth_tokens[0]}"} if cfg.hub.auth_tokens else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=2) as r:
            doc = json.loads(r.read() or b"{}")
        out = [Finding("ok", f"[hub] http {cfg.hub.http}: healthy")]
        if isinstance(doc, dict) and doc.get("revocations"):
            out.append(Finding("warn", f"[hub] http {cfg.hub.http}: {doc['revocations']}; the hub refuses the keys "
                                       "revoked as of its last reading, not ones revoked since",
                               "bring a majority of the NATS cluster back" if cfg.journal.backend == "jetstream"
                               else "restore the list named above"))
        return out
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"{}")
        except ValueError:
            body = {}
        if e.code == 503 and body.get("journal") is False:
            return [Finding("error", f"[hub] http {cfg.hub.http}: the journal cannot commit (webhooks get 503)",
                            f"free disk space under {cfg.hub.state_dir}; the hub recovers by itself")]
        return [Finding("error", f"[hub] http {cfg.hub.http}: /healthz answered {e.code}",
                        "see the hub's log")]
    except (OSError, ValueError) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) else e  # not `<urlopen error [Errno 111] ...>`
        if isinstance(why, ssl.SSLCertVerificationError):
            return [Finding("warn", f"[hub] https {cfg.hub.http}: this host does not trust the certificate it serves "
                                    f"({why.verify_message})",
                            "fine if the stores that post to it trust its CA; else see [hub] tls_cert")]
        text = getattr(why, "strerror", None) or str(why)
        return [Finding("warn", f"[hub] http {cfg.hub.http}: not reachable from here ({text})",
                        "start the hub, or run doctor where [hub] http is reachable")]


def check_versions(st: dict[str, Any]) -> list[Finding]:
    """The hub's schema/version against this installation (the worker hosts run doctor too)."""
    from bucketwire import __version__

    h = st.get("hub", {})
    schema = h.get("schema")
    if schema is None:
        return [Finding("warn", "the hub does not report its schema version (older bucketwire)",
                        "upgrade the hub to this bucketwire version")]
    if schema != SCHEMA_VERSION:
        return [Finding("error", f"the hub speaks envelope schema {schema}, this host {SCHEMA_VERSION}: workers here "
                                 "will be refused", "install the same bucketwire version on the hub and worker hosts")]
    if h.get("version") and h["version"] != __version__:
        return [Finding("warn", f"hub runs bucketwire {h['version']}, this host {__version__} (same schema)",
                        "upgrade both to the same version when convenient")]
    return [Finding("ok", f"hub and this host agree: schema {schema}, bucketwire {__version__}")]


def check_status(cfg: Config, st: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    for g, gs in sorted(st.get("groups", {}).items()):
        if gs.get("lag") and not gs.get("workers"):
            out.append(Finding("warn", f"group {g}: {gs['lag']} events waiting and no worker connected",
                               f"start `bucketwire worker -c CONFIG --group {g}`"))
        if gs.get("state") == "saturated":
            out.append(Finding("warn", f"group {g}: every worker's credit is in use and work waits",
                               "add processes/workers or raise [groups] credit"))
        if gs.get("dead_lettered"):
            out.append(Finding("warn", f"group {g}: {gs['dead_lettered']} event(s) dead-lettered so far",
                               f"`bucketwire dlq list --group {g}`, then `dlq retry` or `dlq purge`"))
    if not st.get("hub", {}).get("journal_ok", True):
        out.append(Finding("error", "the hub's journal cannot commit", f"free disk space under {cfg.hub.state_dir}"))
    for g in cfg.groups:
        if g not in st.get("groups", {}):
            out.append(Finding("warn", f"group {g}: configured here but unknown to the running hub",
                               "restart the hub with this config, or start a worker for it"))
    return out


def check_hub(cfg: Config) -> list[Finding]:
    from bucketwire.client import HubClient, HubRefused, HubUnavailable

    try:
        with HubClient(cfg, timeout=2) as c:
            st = c.status(timeout=2)
    except (HubUnavailable, HubRefused, ConfigError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "CURVE" in msg:
            # The endpoint probes above carry no key, so they answer `ok` for a hub that refuses this config's
            # key; every command run with it fails, which makes it an error, and its fix must be read whole.
            what, _, fix = msg.partition("; ")
            return [Finding("error", what, fix)]
        return [Finding("warn", f"hub status not available ({msg[:300]})", "the endpoint findings above say why")]
    return check_versions(st) + check_status(cfg, st)


# -- config only -----------------------------------------------------------------------------------------------
def _glob_covers(a: str, b: str) -> bool:
    """Does glob `a` match everything glob `b` matches? Conservative: only answers True when sure."""
    if a == b or a == "*":
        return True
    if "*" not in b and "?" not in b and "[" not in b:
        return fnmatchcase(b, a)
    if a.endswith("*") and not any(c in a[:-1] for c in "*?["):
        return b.startswith(a[:-1])
    return False


def route_covers(a: Route, b: Route) -> bool:
    """Route `a` matches every event route `b` matches, so `b` after `a` is dead."""
    return (
        all(any(_glob_covers(pa, pb) for pa in a.events) for pb in b.events)
        and (a.bucket is None or (b.bucket is not None and _glob_covers(a.bucket, b.bucket)))
        and b.prefix.startswith(a.prefix)
        and b.suffix.endswith(a.suffix)
    )


def check_routes(cfg: Config) -> list[Finding]:
    out: list[Finding] = []
    for i, r in enumerate(cfg.routes):
        for j in range(i):
            if route_covers(cfg.routes[j], r):
                out.append(Finding("error", f"routes[{i}] (topic {r.topic}) can never match: routes[{j}] "
                                            f"(topic {cfg.routes[j].topic}) before it matches everything it does",
                                   f"move routes[{i}] above routes[{j}] or narrow routes[{j}]"))
                break
        for pat in r.events:
            if pat.startswith("s3:") and not any(fnmatchcase(e, pat) for e in S3_EVENTS):
                out.append(Finding("error", f"routes[{i}] events {pat!r} matches no S3 event name",
                                   "check the spelling, e.g. 's3:ObjectCreated:*' or 's3:ObjectRemoved:Delete'"))
    return out


def check_topics(cfg: Config) -> list[Finding]:
    out: list[Finding] = []
    consumed = {t for g in cfg.groups.values() for t in g.topics}
    routed = {r.topic for r in cfg.routes} | ({cfg.hub.default_topic} if cfg.hub.default_topic else set())
    for t in sorted(routed - consumed):
        out.append(Finding("error", f"topic {t!r} gets routed events but no group consumes it",
                           f"add {t!r} to some [groups.NAME] topics (or fix the route's topic)"))
    dls = {cfg.dead_letter_for(t) for t in consumed | set(cfg.topics)}
    for t in sorted(cfg.topics):
        if t not in consumed and t not in routed and t not in dls:
            out.append(Finding("warn", f"[topics.{t}] is configured but no group consumes it and no route feeds it",
                               "remove the section or add the topic to a group"))
    for dl in sorted(dls & consumed):
        out.append(Finding("ok", f"dead-letter topic {dl!r} is consumed by a group (alerting?)"))
    if not cfg.groups:
        out.append(Finding("warn", "no [groups.*]: nothing will handle events", "add a [groups.NAME] section"))
    return out


def check_plugins(cfg: Config, local: Sequence[str] = ()) -> list[Finding]:
    """`local`: modules or files a worker is started with (`--plugin`), checked as the worker would load them."""
    from bucketwire.worker import plugin_loading as loader

    try:
        installed = set(loader.load(None, []).names)
    except ConfigError as e:
        return [Finding("error", f"installed plugins cannot be loaded: {e}", "reinstall the failing plugin")]
    try:
        local_names = set(loader.load(None, list(local), entry_points=False).names) if local else set()
    except ConfigError as e:
        return [Finding("error", str(e), "fix the module given with --plugin")]
    out: list[Finding] = []
    for g, gc in sorted(cfg.groups.items()):
        for p in gc.plugins or []:
            if p not in installed:
                out.append(Finding("error", f"[groups.{g}] plugins names {p!r}, which is not installed "
                                            f"(installed: {', '.join(sorted(installed)) or 'none'})",
                                   f"pip install the plugin that provides {p!r}, or fix the name"))
    allowed = {p for gc in cfg.groups.values() for p in (gc.plugins or [])}
    for p in sorted(cfg.plugins):
        if p not in installed and p not in allowed and p not in local_names:
            out.append(Finding("warn", f"[plugins.{p}] configures a plugin that is not installed",
                               "install it, or load it with `worker --plugin MODULE` (then ignore this)"))
    return out + check_plugin_settings(cfg, installed, local)


def check_plugin_settings(cfg: Config, installed: set[str], local: Sequence[str] = ()) -> list[Finding]:
    """Each installed plugin a group runs, its section through its own `validate_settings`, as a worker does at
    start: a bad value passed doctor, and the pool stopped with the line doctor could have printed. `local`: the
    `--plugin` modules a worker would load too (they run in whatever group the worker joins, so their settings
    are checked, not their topics against a group's)."""
    from bucketwire.worker import plugin_loading as loader

    out: list[Finding] = []
    for spec in local:
        try:
            one = loader.load(None, [spec], entry_points=False)
            plain, _ = loader.split_topics({n: cfg.plugins.get(n, {}) for n in one.names})
            loader.validate_settings(one, plain)
        except ConfigError as e:
            out.append(Finding("error", str(e), f"a worker started with --plugin {spec} stops at start with this "
                                                "line; correct its [plugins.NAME] section"))

    runs: dict[str, list[str]] = {}  # plugin -> the groups that run it
    for g, gc in sorted(cfg.groups.items()):
        for p in installed if gc.plugins is None else set(gc.plugins) & installed:
            runs.setdefault(p, []).append(g)
    for p, groups in sorted(runs.items()):
        fix = f"a worker running the plugin stops at start with this line; correct the [plugins.{p}] section"
        try:
            plain, want = loader.split_topics({p: cfg.plugins.get(p, {})})
            loader.validate_settings(loader.load([p], []), plain)
        except ConfigError as e:
            out.append(Finding("error", str(e), fix))
            continue
        for g in groups:
            missed = loader.topics_missed(p, want[p], g, cfg.groups[g].topics)
            if missed is not None:
                out.append(Finding("error", missed, fix))
    return out


def check_ingress(cfg: Config) -> list[Finding]:
    """The hub warns at start when its webhook takes events from anyone; say it where the config is checked too."""
    if cfg.hub.auth_tokens:
        return []
    return [Finding("warn", f"[hub] auth_token is not set: the webhook ingress at {cfg.hub.http} accepts "
                            "unauthenticated events from anyone who reaches it",
                    'set [hub] auth_token = "env:BUCKETWIRE_TOKEN" and give the store the same bearer token')]


def check_security(cfg: Config) -> list[Finding]:
    sec = getattr(cfg, "security", None)
    if sec is None or not getattr(sec, "curve", False):
        raw = cfg.raw.get("security") or {}
        if raw and not raw.get("curve"):
            return [Finding("warn", "[security] is present but curve = false: ZeroMQ traffic is unencrypted")]
        return [Finding("warn", "CURVE is off: anyone who reaches the ZeroMQ ports can read and inject events",
                        "see docs/security.md: [security] curve = true")]
    import zmq.auth

    out: list[Finding] = []

    def pub_of(p: Path | None) -> bytes | None:
        if p is None:
            return None
        try:
            return zmq.auth.load_certificate(p)[0]
        except (OSError, ValueError) as e:
            out.append(Finding("error", f"[security] key file {p} cannot be read ({e})",
                               "bucketwire keys generate NAME --dir DIR"))
            return None

    srv_secret = pub_of(getattr(sec, "server_secret_key", None))
    srv_public = pub_of(getattr(sec, "server_public_key", None))
    if srv_secret and srv_public and srv_secret != srv_public:
        out.append(Finding("error", "[security] server_public_key does not belong to server_secret_key: clients "
                                    "using it cannot connect to this hub",
                           "copy the hub's public .key file (next to its .key_secret) to server_public_key"))
    client = pub_of(getattr(sec, "client_secret_key", None))
    d = getattr(sec, "authorized_keys_dir", None)
    if d is not None and Path(d).is_dir():
        from bucketwire.security import scan_key_dir

        names, bad = scan_key_dir(Path(d))
        for b in bad:  # the hub skips these (and counts them in bucketwire_authorized_keys_invalid)
            out.append(Finding("warn", f"[security] {b.path} in authorized_keys_dir admits nobody: {b.error}",
                               "remove it, or replace it with a client's public .key file "
                               "(`bucketwire keys generate NAME`)"))
        if client and client not in names:
            out.append(Finding("error", "[security] this client's public key is not in authorized_keys_dir: the "
                                        "hub will refuse it", f"copy the client's public .key file into {d}"))
    if not out:
        out.append(Finding("ok", "[security] CURVE keys load and belong together"))
    return out


def _plugin_buckets(cfg: Config) -> list[tuple[str, str, str]]:
    """(where, store, bucket) for bucket names that plugin sections and routes refer to."""
    out: list[tuple[str, str, str]] = []
    default = cfg.hub.default_store
    for name, sec in cfg.plugins.items():
        if not isinstance(sec, dict):
            continue
        for k, v in sec.items():
            if k.endswith("bucket") and isinstance(v, str) and v:
                prefix = k[: -len("bucket")]
                store = sec.get(prefix + "store") or sec.get("store") or default
                if isinstance(store, str):
                    out.append((f"[plugins.{name}] {k}", store, v))
            elif k == "buckets" and isinstance(v, list):
                store = sec.get("source_store") or sec.get("store") or default
                for b in v:
                    if isinstance(b, str) and isinstance(store, str):
                        out.append((f"[plugins.{name}] buckets", store, b))
    for i, r in enumerate(cfg.routes):
        if r.bucket and not any(c in r.bucket for c in "*?[") and default:
            out.append((f"routes[{i}] bucket", default, r.bucket))
    return out


def store_problem(e: Exception, where: str, access_key: str) -> tuple[str, str]:
    """What a failed ListBuckets says about the store's settings, and the fix: the S3 error code or the cause of a
    failed connection (urllib3 wraps it twice, and its own text was cut off before the cause)."""
    import urllib3.exceptions as u3
    from minio.error import InvalidResponseError, S3Error

    if isinstance(e, S3Error):
        code = e.code or "error"
        if code == "InvalidAccessKeyId":
            return (f"the store has no access key {access_key!r} (InvalidAccessKeyId)",
                    f"set {where} access_key to a key the store has")
        if code == "SignatureDoesNotMatch":
            return (f"the store refused secret_key for access key {access_key!r} (SignatureDoesNotMatch)",
                    f"set {where} secret_key to that key's secret")
        if code == "AccessDenied":
            return (f"access key {access_key!r} may not list buckets (AccessDenied)",
                    "allow it s3:ListAllMyBuckets, or check its buckets by hand")
        return f"the store refused the request ({code}: {(e.message or '')[:120]})", "see the store's log"
    if isinstance(e, InvalidResponseError):
        return ("answered, but not as an S3 store does (an HTTPS port with secure = false, or not the S3 port?)",
                f"set {where} endpoint to the store's S3 port and secure to how it serves")
    cause: BaseException = e.reason if isinstance(e, u3.MaxRetryError) and e.reason is not None else e
    if isinstance(cause, u3.SSLError):
        return (f"the TLS handshake failed ({str(cause)[-80:]}); a plain-HTTP store with secure = true?",
                f"set {where} secure = false for http://, or check the store's certificate")
    if isinstance(cause, u3.NameResolutionError):
        return "cannot resolve the host name", f"fix the host in {where} endpoint"
    if isinstance(cause, (u3.NewConnectionError, u3.ConnectTimeoutError, OSError)):
        inner = cause.__context__ or cause.__cause__
        why = getattr(inner, "strerror", None) or ("timed out" if isinstance(cause, u3.ConnectTimeoutError)
                                                   else "connection failed")
        return f"cannot connect ({why})", f"start the store, or fix the host:port in {where} endpoint"
    msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return f"unreachable or refused ({msg})", "check endpoint, secure, access_key/secret_key and that the store is up"


def check_stores(cfg: Config) -> list[Finding]:
    out: list[Finding] = []
    listed: dict[str, set[str] | None] = {}
    for name, sc in sorted(cfg.stores.items()):
        try:
            import minio
            import urllib3

            http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=3), retries=urllib3.Retry(total=0))
            client = minio.Minio(sc.endpoint, access_key=sc.access_key or None, secret_key=sc.secret_key or None,
                                 secure=sc.secure, region=sc.region or "us-east-1", http_client=http)
            names = {b.name for b in client.list_buckets()}
            listed[name] = names
            out.append(Finding("ok", f"[stores.{name}] {sc.endpoint}: reachable, {len(names)} bucket(s)"))
        except Exception as e:  # any failure here is a finding, not a crash
            listed[name] = None
            what, fix = store_problem(e, f"[stores.{name}]", sc.access_key)
            out.append(Finding("error", f"[stores.{name}] {sc.endpoint}: {what}", fix))
    for where, store, bucket in _plugin_buckets(cfg):
        if store not in cfg.stores:
            out.append(Finding("error", f"{where} uses store {store!r}, which is not configured",
                               f"add [stores.{store}] or fix the store name"))
            continue
        have = listed.get(store)
        if have is not None and bucket not in have:
            out.append(Finding("error", f"{where}: bucket {bucket!r} does not exist in store {store!r}",
                               f"create it (e.g. `mc mb {store}/{bucket}`) or fix the name"))
    return out


def run_checks(cfg: Config, *, live: bool = True, local: Sequence[str] = ()) -> list[Finding]:
    from bucketwire.commands.doctor_tls import check_tls

    findings = (check_routes(cfg) + check_topics(cfg) + check_plugins(cfg, local) + check_ingress(cfg)
                + check_security(cfg) + check_tls(cfg))
    if live:
        from bucketwire.commands.doctor_cluster import check_cluster

        findings += check_stores(cfg) + check_endpoints(cfg) + check_http(cfg) + check_hub(cfg) + check_cluster(cfg)
    return findings


@click.command(name="doctor")
@click.option("-c", "--config", "config_path", envvar="BUCKETWIRE_CONFIG", type=click.Path(),
              help="TOML config file (or set BUCKETWIRE_CONFIG).")
@click.option("--offline", is_flag=True, help="Check the config only; do not contact the hub or stores.")
@click.option("--quiet", "-q", "only_problems", is_flag=True, help="Print only errors and warnings.")
@click.option("--plugin", "-p", "local_plugins", multiple=True,
              help="Also check this module or .py file, as `worker --plugin` loads it (its [plugins.NAME] settings).")
def doctor(config_path: str | None, offline: bool, only_problems: bool, local_plugins: tuple[str, ...]) -> None:
    """Check a config and the running system; one line per finding with the fix. Exit 1 on any error."""
    from bucketwire import config as config_mod
    from bucketwire.security import check_key_files

    try:
        cfg = config_mod.load(config_path)
        check_key_files(cfg.security)
    except ConfigError as e:
        click.echo(Finding("error", f"config: {e}", "fix the config file").line())
        raise SystemExit(1) from None
    findings = run_checks(cfg, live=not offline, local=local_plugins)
    for f in findings:
        if not (only_problems and f.level == "ok"):
            click.echo(f.line())
    errors = sum(f.level == "error" for f in findings)
    warns = sum(f.level == "warn" for f in findings)
    click.echo(f"\n{errors} error(s), {warns} warning(s)", err=True)
    if errors:
        raise SystemExit(1)
