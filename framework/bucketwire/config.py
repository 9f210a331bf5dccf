"""Configuration: one TOML file shared by the hub, workers and CLI.

Every error names the file, the key and what to do about it, because a config mistake is the first thing a new
user hits and a traceback teaches them nothing. Secrets may be written `env:NAME` or `file:PATH` so the file
itself can be committed.
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HTTP = "127.0.0.1:9000"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
DEFAULT_WORK = "tcp://127.0.0.1:5557"


class ConfigError(Exception):
    """A configuration problem, phrased as one line: where, what, and how to fix it."""


@dataclass(slots=True)
class HubConfig:
    http: str = DEFAULT_HTTP
    publish: str = DEFAULT_PUBLISH
    work: str = DEFAULT_WORK
    state_dir: Path = Path("./state/hub")
    auth_tokens: list[str] = field(default_factory=list)
    durability: str = "os"
    max_body_bytes: int = 1 << 20
    max_hops: int = 8
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    default_topic: str | None = None
    default_store: str | None = None
    dead_letter: str = "dead-letter"
    retention_age: float = 7 * 86400.0
    retention_bytes: int = 10 << 30
    dispatch_batch: int = 64
    request_timeout: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    http_idle_timeout: float = 30.0
    http_read_timeout: float = 30.0
    metrics_public: bool = False
    max_topics: int = 1000


@dataclass(slots=True)
class RoleConfig:
    """What one client key (named by its certificate file) may do; lists of fnmatch globs, empty = nothing."""

    name: str
    publish: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    admin: bool = False
    """Operator acts (replay, dlq retry/purge) on any group, not only those listed in `groups`."""


@dataclass(slots=True)
class SecurityConfig:
    """CURVE on every ZeroMQ socket. Paths are resolved against the config file's directory."""

    curve: bool = False
    server_secret_key: Path | None = None
    previous_server_secret_key: Path | None = None
    work_previous: str | None = None
    publish_previous: str | None = None
    authorized_keys_dir: Path | None = None
    client_secret_key: Path | None = None
    server_public_key: Path | None = None
    zap_domain: str = "bucketwire"
    reload_interval: float = 2.0
    roles: dict[str, RoleConfig] = field(default_factory=dict)


@dataclass(slots=True)
class ClientConfig:
    """Where clients (workers, publish, tail) connect; defaults to the hub's own bind addresses."""

    publish: str = DEFAULT_PUBLISH
    work: str = DEFAULT_WORK
    timeout: float = 10.0


@dataclass(slots=True)
class Route:
    topic: str
    events: list[str] = field(default_factory=lambda: ["*"])
    bucket: str | None = None
    prefix: str = ""
    suffix: str = ""


@dataclass(slots=True)
class TopicConfig:
    max_attempts: int = 5
    dead_letter: str | None = None
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    handler_timeout: float | None = None  # None: the group's, else DEFAULT_HANDLER_TIMEOUT


DEFAULT_HANDLER_TIMEOUT = 300.0
"""Seconds a handler may run on one event before its worker child is killed and the event charged an attempt."""


@dataclass(slots=True)
class GroupConfig:
    name: str
    topics: list[str]
    plugins: list[str] | None = None
    start: str = "latest"
    processes: int = 2
    credit: int = 16
    metrics: str | None = None  # HOST:PORT where `worker` serves the pool's Prometheus metrics
    handler_timeout: float | None = None  # default for the group's topics (a topic's own setting wins)


@dataclass(slots=True)
class StoreConfig:
    name: str
    endpoint: str
    access_key: str = ""
    secret_key: str = ""
    secure: bool = False
    region: str | None = None


@dataclass(slots=True)
class Config:
    path: Path | None
    hub: HubConfig = field(default_factory=HubConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    routes: list[Route] = field(default_factory=list)
    topics: dict[str, TopicConfig] = field(default_factory=dict)
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    stores: dict[str, StoreConfig] = field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    raw: dict[str, Any] = field(default_factory=dict)

    def topic(self, name: str) -> TopicConfig:
        return self.topics.get(name) or TopicConfig()

    def handler_timeout(self, group: str, topic: str) -> float:
        """The topic knows how long its events may take; a group's setting covers the topics that do not say."""
        t = self.topics.get(topic)
        if t is not None and t.handler_timeout is not None:
            return t.handler_timeout
        g = self.groups.get(group)
        if g is not None and g.handler_timeout is not None:
            return g.handler_timeout
        return DEFAULT_HANDLER_TIMEOUT

    def dead_letter_for(self, topic: str) -> str:
        return self.topic(topic).dead_letter or self.hub.dead_letter


class _Reader:
    """Walks a TOML table, remembering the dotted path so errors can name the key."""

    def __init__(self, file: str, data: dict[str, Any], path: str) -> None:
        self.file, self.data, self.path = file, data, path
        self.used: set[str] = set()

    def err(self, key: str, msg: str) -> ConfigError:
        where = f"{self.path}.{key}" if self.path else key
        return ConfigError(f"{self.file}: {where}: {msg}")

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None, *, secret: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        v = self.data[key]
        if secret and isinstance(v, str):
            v = resolve_secret(v, lambda m: self.err(key, m))
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float)):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.err(key, f"expected {names}, got {type(v).__name__} {v!r}")
        return v

    def str_list(self, key: str, default: list[str] | None = None) -> list[str] | None:
        v = self.get(key, (list, str), default)
        if isinstance(v, str):
            v = [v]
        if v is not None and not all(isinstance(x, str) and x for x in v):
            raise self.err(key, "expected a list of non-empty strings")
        return v

    def sub(self, key: str) -> _Reader:
        v = self.get(key, dict, {})
        return _Reader(self.file, v, f"{self.path}.{key}" if self.path else key)

    def check_unknown(self, allowed: set[str] | None = None) -> None:
        extra = set(self.data) - (allowed if allowed is not None else self.used)
        if extra:
            k = sorted(extra)[0]
            raise self.err(k, "unknown key; check the spelling against the configuration reference in README.md")


def resolve_secret(value: str, err: Any = None) -> str:
    """`env:NAME` reads an environment variable, `file:PATH` a file; anything else is taken literally.

    A reference that resolves to nothing (a variable set to "", an empty file) is an error, never an empty
    secret: a deployment that forgot to fill one in would otherwise run with no secret at all, and for
    `auth_token` that means open to anyone.
    """
    def fail(msg: str) -> Exception:
        return err(msg) if err else ConfigError(msg)

    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise fail(f"environment variable {name} is not set; export it or write the value in the file")
        if not os.environ[name].strip():
            raise fail(f"environment variable {name} is empty; set it to the secret (an empty secret is refused)")
        return os.environ[name]
    if value.startswith("file:"):
        p = Path(value[5:]).expanduser()
        try:
            text = p.read_text().strip()
        except OSError as e:
            raise fail(f"cannot read secret file {p}: {e.strerror}") from None
        if not text:
            raise fail(f"secret file {p} is empty; write the secret into it (an empty secret is refused)")
        return text
    return value


def _endpoint(r: _Reader, key: str, default: str) -> str:
    v = r.get(key, str, default)
    if not v.startswith(("tcp://", "ipc://", "inproc://")):
        raise r.err(key, f"{v!r} is not a ZeroMQ endpoint; write it like 'tcp://127.0.0.1:5557'")
    return v


def _hostport(r: _Reader, key: str, default: str) -> str:
    v = r.get(key, str, default)
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise r.err(key, f"{v!r} is not HOST:PORT; write it like '127.0.0.1:9000'")
    return v


def _positive(r: _Reader, key: str, typ: type, default: Any) -> Any:
    v = r.get(key, typ, default)
    if v <= 0:
        raise r.err(key, f"must be greater than 0, got {v!r}")
    return v


def parse(data: dict[str, Any], file: str = "<config>", path: Path | None = None) -> Config:
    root = _Reader(file, data, "")
    base = path.parent if path else Path.cwd()
    cfg = Config(path=path, raw=data)

    h = root.sub("hub")
    hub = cfg.hub
    hub.http = _hostport(h, "http", DEFAULT_HTTP)
    hub.publish = _endpoint(h, "publish", DEFAULT_PUBLISH)
    hub.work = _endpoint(h, "work", DEFAULT_WORK)
    sd = Path(h.get("state_dir", str, "./state/hub")).expanduser()
    hub.state_dir = sd if sd.is_absolute() else (base / sd)
    tok = h.get("auth_token", (str, list), None, secret=True)
    toks = [tok] if isinstance(tok, str) else list(tok or [])
    if tok is not None and not toks:
        raise h.err("auth_token", "is an empty list; give at least one token, or remove the key to run "
                                  "unauthenticated")
    hub.auth_tokens = []
    for t in toks:
        if not isinstance(t, str):
            raise h.err("auth_token", "expected a string or a list of strings")
        t = resolve_secret(t, lambda m: h.err("auth_token", m))
        if not t.strip():
            # Only an absent auth_token means unauthenticated; an empty one is a mistake, never "open".
            raise h.err("auth_token", "is empty; set a token, or remove the key to run unauthenticated")
        hub.auth_tokens.append(t)
    hub.durability = h.get("durability", str, "os")
    if hub.durability not in ("os", "fsync"):
        raise h.err("durability", f"must be 'os' or 'fsync', got {hub.durability!r}")
    hub.max_body_bytes = _positive(h, "max_body_bytes", int, hub.max_body_bytes)
    hub.max_hops = _positive(h, "max_hops", int, hub.max_hops)
    hub.heartbeat_interval = _positive(h, "heartbeat_interval", float, hub.heartbeat_interval)
    hub.heartbeat_timeout = _positive(h, "heartbeat_timeout", float, hub.heartbeat_timeout)
    if hub.heartbeat_timeout <= hub.heartbeat_interval:
        raise h.err("heartbeat_timeout", "must be larger than heartbeat_interval (3x or more is sensible)")
    hub.default_topic = h.get("default_topic", str, None)
    hub.default_store = h.get("default_store", str, None)
    hub.dead_letter = h.get("dead_letter", str, hub.dead_letter)
    hub.retention_age = _positive(h, "retention_days", float, hub.retention_age / 86400) * 86400
    hub.retention_bytes = int(_positive(h, "retention_mb", float, hub.retention_bytes / (1 << 20)) * (1 << 20))
    hub.dispatch_batch = _positive(h, "dispatch_batch", int, hub.dispatch_batch)
    hub.request_timeout = _positive(h, "request_timeout", float, hub.request_timeout)
    for k in ("tls_cert", "tls_key", "tls_client_ca"):
        v = h.get(k, str, None)
        setattr(hub, k, _path(base, v) if v else None)
    if (hub.tls_cert is None) != (hub.tls_key is None):
        raise h.err("tls_key", "set both tls_cert and tls_key (PEM files) to serve HTTPS, or neither")
    if hub.tls_client_ca is not None and hub.tls_cert is None:
        raise h.err("tls_client_ca", "client-certificate verification needs tls_cert and tls_key as well")
    hub.http_idle_timeout = _positive(h, "http_idle_timeout", float, hub.http_idle_timeout)
    hub.http_read_timeout = _positive(h, "http_read_timeout", float, hub.http_read_timeout)
    hub.metrics_public = h.get("metrics_public", bool, False)
    hub.max_topics = _positive(h, "max_topics", int, hub.max_topics)
    h.check_unknown()

    c = root.sub("client")
    cfg.client.publish = _endpoint(c, "publish", hub.publish.replace("0.0.0.0", "127.0.0.1"))
    cfg.client.work = _endpoint(c, "work", hub.work.replace("0.0.0.0", "127.0.0.1"))
    cfg.client.timeout = _positive(c, "timeout", float, cfg.client.timeout)
    c.check_unknown()

    routes = root.get("routes", list, [])
    for i, rt in enumerate(routes):
        if not isinstance(rt, dict):
            raise root.err(f"routes[{i}]", "each [[routes]] entry must be a table")
        r = _Reader(file, rt, f"routes[{i}]")
        topic = r.get("topic", str, None)
        if not topic:
            raise r.err("topic", "every route needs a topic, e.g. topic = \"bucket-update\"")
        cfg.routes.append(
            Route(
                topic=topic,
                events=r.str_list("events", ["*"]) or ["*"],
                bucket=r.get("bucket", str, None),
                prefix=r.get("prefix", str, ""),
                suffix=r.get("suffix", str, ""),
            )
        )
        r.check_unknown()

    t = root.sub("topics")
    for name in t.data:
        tr = t.sub(name)
        tc = TopicConfig(
            max_attempts=_positive(tr, "max_attempts", int, 5),
            dead_letter=tr.get("dead_letter", str, None),
            backoff_base=_positive(tr, "backoff_base", float, 0.5),
            backoff_max=_positive(tr, "backoff_max", float, 60.0),
            handler_timeout=_positive(tr, "handler_timeout", float, None) if "handler_timeout" in tr.data else None,
        )
        tr.check_unknown()
        cfg.topics[name] = tc

    g = root.sub("groups")
    for name in g.data:
        gr = g.sub(name)
        topics = gr.str_list("topics")
        if not topics:
            raise gr.err("topics", "a group needs at least one topic, e.g. topics = [\"bucket-update\"]")
        start = gr.get("start", str, "latest")
        if start not in ("latest", "earliest"):
            raise gr.err("start", f"must be 'latest' or 'earliest', got {start!r}")
        cfg.groups[name] = GroupConfig(
            name=name,
            topics=topics,
            plugins=gr.str_list("plugins"),
            start=start,
            processes=_positive(gr, "processes", int, 2),
            credit=_positive(gr, "credit", int, 16),
            metrics=_hostport(gr, "metrics", "") if "metrics" in gr.data else None,
            handler_timeout=_positive(gr, "handler_timeout", float, None) if "handler_timeout" in gr.data else None,
        )
        gr.check_unknown()

    s = root.sub("stores")
    for name in s.data:
        sr = s.sub(name)
        ep = sr.get("endpoint", str, None)
        if not ep:
            raise sr.err("endpoint", "a store needs an endpoint, e.g. endpoint = \"127.0.0.1:8333\"")
        cfg.stores[name] = StoreConfig(
            name=name,
            endpoint=ep.removeprefix("http://").removeprefix("https://"),
            access_key=sr.get("access_key", str, "", secret=True),
            secret_key=sr.get("secret_key", str, "", secret=True),
            secure=sr.get("secure", bool, ep.startswith("https://")),
            region=sr.get("region", str, None),
        )
        sr.check_unknown()
    if hub.default_store is None and len(cfg.stores) == 1:
        hub.default_store = next(iter(cfg.stores))

    p = root.sub("plugins")
    for name in p.data:
        cfg.plugins[name] = _resolve_secrets_deep(p.sub(name).data, f"{file}: plugins.{name}")

    cfg.security = _parse_security(root.sub("security"), base)
    root.check_unknown({"hub", "client", "routes", "topics", "groups", "stores", "plugins", "security", "dev"})
    return cfg


def _parse_security(r: _Reader, base: Path) -> SecurityConfig:
    """Parse `[security]`. Key files are loaded and checked where they are used (`security.check_key_files`)."""
    sec = SecurityConfig()
    sec.curve = r.get("curve", bool, False)

    def path(key: str) -> Path | None:
        v = r.get(key, str, None)
        return _path(base, v) if v else None

    sec.server_secret_key = path("server_secret_key")
    sec.previous_server_secret_key = path("previous_server_secret_key")
    sec.authorized_keys_dir = path("authorized_keys_dir")
    sec.client_secret_key = path("client_secret_key")
    sec.server_public_key = path("server_public_key")
    if "work_previous" in r.data:
        sec.work_previous = _endpoint(r, "work_previous", "")
    if "publish_previous" in r.data:
        sec.publish_previous = _endpoint(r, "publish_previous", "")
    sec.zap_domain = r.get("zap_domain", str, sec.zap_domain) or sec.zap_domain
    sec.reload_interval = _positive(r, "reload_interval", float, sec.reload_interval)
    roles = r.sub("roles")
    for name in roles.data:
        rr = roles.sub(name)
        sec.roles[name] = RoleConfig(
            name=name,
            publish=rr.str_list("publish", []) or [],
            groups=rr.str_list("groups", []) or [],
            subscribe=rr.str_list("subscribe", []) or [],
            admin=rr.get("admin", bool, False),
        )
        rr.check_unknown()
    r.check_unknown()
    if sec.previous_server_secret_key is not None and not (sec.work_previous and sec.publish_previous):
        raise r.err("previous_server_secret_key",
                    "serving a previous server key needs its own endpoints: set work_previous and publish_previous")
    return sec


def _path(base: Path, v: str) -> Path:
    p = Path(v).expanduser()
    return p if p.is_absolute() else base / p


def _resolve_secrets_deep(v: Any, where: str) -> Any:
    if isinstance(v, str) and v.startswith(("env:", "file:")):
        return resolve_secret(v, lambda m: ConfigError(f"{where}: {m}"))
    if isinstance(v, dict):
        return {k: _resolve_secrets_deep(x, f"{where}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [_resolve_secrets_deep(x, where) for x in v]
    return v


def load(path: str | os.PathLike[str] | None, *, warn: bool = True) -> Config:
    """Load and validate a config file; `None` falls back to $BUCKETWIRE_CONFIG."""
    if path is None:
        path = os.environ.get("BUCKETWIRE_CONFIG")
        if not path:
            raise ConfigError("no config file given; pass -c CONFIG or set BUCKETWIRE_CONFIG")
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found; pass the path of an existing TOML config with -c") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    if warn and _has_literal_secret(data):
        try:
            mode = p.stat().st_mode
            if mode & stat.S_IROTH:
                logging.getLogger("bucketwire.config").warning(
                    f"{p} holds secrets and is world-readable; chmod o-r it or use env:NAME / file:PATH"
                )
        except OSError:
            pass
    return parse(data, str(p), p.resolve())


def _has_literal_secret(data: dict[str, Any]) -> bool:
    def walk(v: Any, key: str = "") -> bool:
        if isinstance(v, dict):
            return any(walk(x, k) for k, x in v.items())
        if isinstance(v, list):
            return any(walk(x, key) for x in v)
        return (
            isinstance(v, str)
            and key in ("auth_token", "secret_key", "access_key", "password", "token")
            and bool(v)
            and not v.startswith(("env:", "file:"))
        )

    return walk(data)
