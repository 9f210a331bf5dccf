"""Configuration: one TOML file shared by the hub, workers and CLI.

Every error names the file, the key and what to do about it, because a config mistake is the first thing a new
user hits and a traceback teaches them nothing. Secrets may be written `env:NAME` or `file:PATH` so the file
itself can be committed.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

DEFAULT_HTTP = "127.0.0.1:9000"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
DEFAULT_WORK = "tcp://127.0.0.1:5557"


class ConfigError(Exception):
    """A configuration problem, phrased as one line: where, what, and how to fix it."""


# -- value types: the constraint and the words an error uses for it, written once ---------------------------------
PositiveInt = Annotated[int, Meta(ge=1)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonEmpty = Annotated[str, Meta(min_length=1)]
_ENDPOINT_LIKE = 'a ZeroMQ endpoint like "tcp://127.0.0.1:5557" (or "ipc://PATH", a Unix socket)'
Endpoint = Annotated[str, Meta(pattern=r"^(tcp|ipc|inproc)://.", description=_ENDPOINT_LIKE)]
HostPort = Annotated[str, Meta(
    pattern=r"^[^\s]+:(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|\d{1,4})$",
    description='HOST:PORT like "127.0.0.1:9000"',
)]
Secret = Annotated[str, Meta(extra={"secret": True})]
"""`env:NAME` or `file:PATH` is replaced by the variable or the file's content; never echoed in an error."""


class Table(msgspec.Struct, forbid_unknown_fields=True):
    """A TOML table: every key it accepts is a field below, with its type, constraint and default, once."""


DEFAULT_MAX_EVENT_BYTES = 1_000_000
MIN_EVENT_BYTES = 16384
"""The smallest [hub] max_event_bytes: a dead letter with its error and traceback line must always fit."""


class HubConfig(Table):
    id: str = ""
    """Names this hub in dispatch leases and `status`; empty: derived from the host name and `work`."""
    advertise: str = ""
    """The work endpoint clients are sent to when this hub dispatches a group; empty: `work` (0.0.0.0 replaced by
    the host name)."""
    http: HostPort = DEFAULT_HTTP
    publish: Endpoint = DEFAULT_PUBLISH
    work: Endpoint = DEFAULT_WORK
    local: Annotated[str, Meta(pattern=r"^(ipc://.+)?$", description='"" or an ipc:// endpoint')] = ""
    """A second work endpoint, a Unix socket the hub's loop reads and writes itself (bucketwire/zmtp.py): clients
    on this host that connect to it skip ZeroMQ's I/O threads (README "Local socket"). Only this host's user may
    connect; "" serves none."""
    state_dir: Path = Path("./state/hub")
    auth_tokens: Annotated[list[Secret], Meta(description="a string or a list of strings")] = msgspec.field(
        default_factory=list, name="auth_token")
    durability: Literal["os", "fsync"] = "os"
    max_body_bytes: PositiveInt = 1 << 20
    max_event_bytes: Annotated[int, Meta(ge=MIN_EVENT_BYTES)] = DEFAULT_MAX_EVENT_BYTES
    """Largest envelope (JSON, as workers receive it) the hub commits, on every ingress path; below the NATS
    default max_payload of 1 MiB with room for the journal's headers, so one limit fits both backends."""
    max_hops: PositiveInt = 8
    max_descendants: PositiveInt = 100_000
    """Follow-ons committed per upload (an event published from outside), all generations together: `max_hops`
    bounds how deep a chain goes, this how wide (hub/lineage.py). Past it a follow-on is a refused dead letter."""
    heartbeat_interval: PositiveFloat = 1.0
    heartbeat_timeout: PositiveFloat = 5.0
    default_topic: str | None = None
    default_store: str | None = None
    dead_letter: NonEmpty = "dead-letter"
    retention_days: PositiveFloat = 7.0
    retention_mb: PositiveFloat = 10240.0
    dispatch_batch: PositiveInt = 64
    group_buffer_mb: PositiveFloat = 128.0
    """Per consumer group, the envelopes (MiB) it holds in memory, loaded and not yet acked, besides the 10,000
    events; the rest wait in the journal. Small events never reach it (10,000 of 13 KB); a backlog of large ones
    would take gigabytes without it. One event larger than this is still loaded, alone."""
    fanout_buffer_mb: PositiveFloat = 256.0
    """Per subscriber of the fan-out (`publish`), the most it queues (MiB) for one that reads slower than events
    come: with fanout_event_bytes it sets the XPUB's high-water mark (at most 100,000 messages). Past it that
    subscriber misses events, as the fan-out is lossy anyway; `tail` fetches them from the journal."""
    fanout_event_bytes: Annotated[int, Meta(ge=1024)] = 16384
    """The largest envelope the fan-out sends whole; a larger one goes out as its head frame, `[topic, seq, ""]`
    (the heartbeat's shape), and subscribers fetch it from the journal, as they do after any heartbeat that is
    ahead of them. So a queue of fanout_buffer_mb / fanout_event_bytes messages is bounded in bytes too."""
    request_timeout: PositiveFloat = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    http_idle_timeout: PositiveFloat = 30.0
    http_read_timeout: PositiveFloat = 30.0
    http_max_connections: PositiveInt = 1000
    """Open webhook connections at most (also at most a quarter of the hub's descriptor limit): past it the longest
    idle one is closed (hub/http_server.Server.admit)."""
    metrics_public: bool = False
    max_topics: PositiveInt = 1000
    max_groups: PositiveInt = 100
    """Consumer groups the config does not name (made by a `worker --group NAME --topic T`), past which a new one
    is refused: every group costs each turn of the loop (~1 µs idle: 1,000 made every event wait ~1.5 ms more),
    and such a group stays in the journal until `group rm`. Configured groups are never refused."""

    def __post_init__(self) -> None:
        if any(not t.strip() for t in self.auth_tokens):
            # Only an absent auth_token means unauthenticated; an empty one is a mistake, never "open".
            raise ValueError("auth_token: is empty; set a token, or remove the key to run unauthenticated")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout: must be larger than heartbeat_interval (3x or more is sensible)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_key: set both tls_cert and tls_key (PEM files) to serve HTTPS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: client-certificate verification needs tls_cert and tls_key as well")

    @property
    def retention_age(self) -> float:
        return self.retention_days * 86400

    @property
    def retention_bytes(self) -> int:
        return int(self.retention_mb * (1 << 20))


Endpoints = Annotated[list[Endpoint], Meta(min_length=1, description="an endpoint or a list of endpoints")]


class ClientConfig(Table):
    """Where clients (workers, publish, tail) connect; empty means the hub's own bind address.

    Each may be a list: with several hubs a client connects to one, and moves to the hub that dispatches its group
    (or to the next endpoint when one goes silent) by itself.
    """

    publish: Endpoint = ""
    work: Endpoint = ""
    timeout: PositiveFloat = 10.0
    # Each of `work` / `publish` may be written as a list; parse() moves the list here and its first endpoint into
    # the field itself, so code that only knows one hub keeps working. (A str-or-list field would be simpler, but
    # msgspec's union of the two crashes the interpreter's final garbage collection.)
    work_endpoints: Endpoints = msgspec.field(default_factory=list, name="__work_endpoints")
    publish_endpoints: Endpoints = msgspec.field(default_factory=list, name="__publish_endpoints")

    def __post_init__(self) -> None:
        if not self.work_endpoints and self.work:  # built in code with one endpoint each
            self.work_endpoints = [self.work]
        if not self.publish_endpoints and self.publish:
            self.publish_endpoints = [self.publish]


class JournalConfig(Table):
    """Where the hub keeps its journal: `sqlite` in `[hub] state_dir` (one hub), or a NATS JetStream cluster
    (several hubs, failover); see docs/deployment.md."""

    backend: Literal["sqlite", "jetstream"] = "sqlite"
    servers: list[NonEmpty] = []
    replicas: PositiveInt = 3
    prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="1-32 letters, digits, _ or -")] = \
        "bucketwire"
    duplicate_window: PositiveFloat = 600.0
    lease_ttl: PositiveFloat = 5.0
    connect_timeout: PositiveFloat = 5.0
    request_timeout: PositiveFloat = 10.0
    start_timeout: PositiveFloat = 30.0
    user: Secret | None = None
    password: Secret | None = None
    token: Secret | None = None
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.backend == "jetstream" and not self.servers:
            raise ValueError('servers: backend = "jetstream" needs the NATS servers, e.g. ["nats://127.0.0.1:4222"]')
        bad = [s for s in self.servers if not re.match(r"^(nats|tls)://[^\s/]+:\d+$", s)]
        if bad:
            raise ValueError(f"servers: {bad[0]!r} is not like \"nats://HOST:4222\"")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_key: set both tls_cert and tls_key (PEM files) for a client certificate, or neither")
        if (self.user is None) != (self.password is None):
            raise ValueError("password: set both user and password, or neither")


class Route(msgspec.Struct, forbid_unknown_fields=True):
    topic: Annotated[NonEmpty, Meta(examples=["bucket-update"])]
    events: list[NonEmpty] = msgspec.field(default_factory=lambda: ["*"])
    bucket: str | None = None
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        self.events = self.events or ["*"]


class TopicConfig(Table):
    max_attempts: PositiveInt = 5
    dead_letter: NonEmpty | None = None
    backoff_base: PositiveFloat = 0.5
    backoff_max: PositiveFloat = 60.0
    handler_timeout: PositiveFloat | None = None  # None: the group's, else DEFAULT_HANDLER_TIMEOUT


DEFAULT_HANDLER_TIMEOUT = 300.0
"""Seconds a handler may run on one event before its worker child is killed and the event charged an attempt."""


class GroupConfig(Table):
    name: str  # the table's name, [groups.NAME]
    topics: Annotated[list[NonEmpty], Meta(min_length=1, examples=[["bucket-update"]])]
    plugins: list[NonEmpty] | None = None
    start: Literal["latest", "earliest"] = "latest"
    processes: PositiveInt = 2
    credit: PositiveInt = 16
    metrics: HostPort | None = None  # where `worker` serves the pool's Prometheus metrics
    handler_timeout: PositiveFloat | None = None  # default for the group's topics (a topic's own setting wins)


class StoreConfig(Table):
    name: str  # the table's name, [stores.NAME]
    endpoint: Annotated[NonEmpty, Meta(examples=["127.0.0.1:8333"])]
    access_key: Secret = ""
    secret_key: Secret = ""
    secure: bool = False  # an https:// endpoint implies true
    region: str | None = None

    def __post_init__(self) -> None:
        self.secure = self.secure or self.endpoint.startswith("https://")
        self.endpoint = self.endpoint.removeprefix("http://").removeprefix("https://")


class RoleConfig(Table):
    """What one client key (named by its certificate file) may do; lists of fnmatch globs, empty = nothing."""

    name: str  # the table's name, [security.roles.NAME]
    publish: list[NonEmpty] = []
    groups: list[NonEmpty] = []
    subscribe: list[NonEmpty] = []
    admin: bool = False
    """Operator acts (replay, dlq retry/purge) on any group, not only those listed in `groups`."""


class SecurityConfig(Table):
    """CURVE on every ZeroMQ socket. Paths are resolved against the config file's directory; the key files are
    loaded where they are used (`security.check_key_files`), not here."""

    curve: bool = False
    server_secret_key: Path | None = None
    previous_server_secret_key: Path | None = None
    work_previous: Endpoint | None = None
    publish_previous: Endpoint | None = None
    authorized_keys_dir: Path | None = None
    client_secret_key: Path | None = None
    server_public_key: Path | None = None
    zap_domain: str = "bucketwire"
    reload_interval: PositiveFloat = 2.0
    roles: dict[str, RoleConfig] = {}

    def __post_init__(self) -> None:
        self.zap_domain = self.zap_domain or "bucketwire"
        if self.previous_server_secret_key is not None and not (self.work_previous and self.publish_previous):
            raise ValueError("previous_server_secret_key: serving a previous server key needs its own endpoints: "
                             "set work_previous and publish_previous")


class DevConfig(Table):
    """`[dev]`: read by `bucketwire dev` alone, and checked like every table (a typo here left a bucket unmade)."""

    buckets: list[NonEmpty] = []  # made on start if missing, besides route and plugin `*bucket` ones


class ConfigFile(Table):
    """The whole file: its top-level tables."""

    hub: HubConfig = msgspec.field(default_factory=HubConfig)
    client: ClientConfig = msgspec.field(default_factory=ClientConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    routes: list[Route] = []
    topics: dict[str, TopicConfig] = {}
    groups: dict[str, GroupConfig] = {}
    stores: dict[str, StoreConfig] = {}
    plugins: Annotated[dict[str, dict[str, Any]], Meta(extra={"secret": "deep"})] = {}
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    dev: DevConfig = msgspec.field(default_factory=lambda: DevConfig())  # read by `bucketwire dev`


@dataclass(slots=True)
class Config:
    path: Path | None
    hub: HubConfig = field(default_factory=HubConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
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


def resolve_secret(value: str, err: Callable[[str], Exception] | None = None) -> str:
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


# -- parsing ------------------------------------------------------------------------------------------------------
def parse(data: dict[str, Any], file: str = "<config>", path: Path | None = None) -> Config:
    """Validate a TOML document against the schema; errors are one line naming the file, the key and the fix."""
    hub_table = data.get("hub")
    if isinstance(hub_table, dict) and hub_table.get("auth_token") == []:  # given but empty: never means "open"
        raise ConfigError(f"{file}: [hub] auth_token: is an empty list; give at least one token, or remove the key "
                          "to run unauthenticated")
    client_table = data.get("client")
    if isinstance(client_table, dict):  # `work = "tcp://..."` is the one-hub case of `work = [...]`
        ct = dict(client_table)
        for k in ("work", "publish"):
            v = ct.get(k)
            if isinstance(v, list):
                if not v:
                    raise ConfigError(f"{file}: [client] {k}: is an empty list; give one endpoint or more")
                ct[f"__{k}_endpoints"] = v
                ct[k] = v[0]
        data = {**data, "client": ct}
    prepared = _prepare(data, _FILE_INFO, [], file)
    try:
        f = msgspec.convert(prepared, ConfigFile, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        why = _explain(e, prepared, ConfigFile, [])
        why = why.replace("__work_endpoints", "work").replace("__publish_endpoints", "publish")
        raise ConfigError(f"{file}: {why}") from None
    for name, tc in f.topics.items():
        if tc.dead_letter == name:  # the hub never dead-letters a failure into the topic it failed in
            raise ConfigError(f"{file}: [topics.{name}] dead_letter: is the topic itself; its events would be dropped "
                              "instead of dead-lettered after max_attempts; name another topic, or remove the key")
    base = path.parent if path else Path.cwd()
    _resolve_paths(f, base)
    hub = f.hub
    _resolve_ipc(f, base)
    _check_ipc_lengths(f, file)
    f.client.publish = f.client.publish or hub.publish.replace("0.0.0.0", "127.0.0.1")
    f.client.work = f.client.work or hub.work.replace("0.0.0.0", "127.0.0.1")
    f.client.work_endpoints = f.client.work_endpoints or [f.client.work]
    f.client.publish_endpoints = f.client.publish_endpoints or [f.client.publish]
    if not hub.advertise:
        hub.advertise = hub.work.replace("0.0.0.0", socket.gethostname())
    if not hub.id:
        hub.id = f"{socket.gethostname()}:{hub.work.rsplit(':', 1)[-1]}"
    if hub.default_store is None and len(f.stores) == 1:
        hub.default_store = next(iter(f.stores))
    return Config(path=path, hub=hub, client=f.client, journal=f.journal, routes=f.routes, topics=f.topics,
                  groups=f.groups, stores=f.stores, plugins=f.plugins, security=f.security, raw=data)


_FILE_INFO = msgspec.inspect.type_info(ConfigFile)
_Key = str | int


def _dec_hook(typ: type, obj: Any) -> Any:
    """A TypeError here is msgspec's cue to name the key (`[hub] state_dir: expected a path, got 5`); the
    NotImplementedError its docs suggest escaped as a traceback. A NUL byte is no path the OS can open."""
    if typ is Path and isinstance(obj, str) and "\0" not in obj:
        return Path(obj).expanduser()
    raise TypeError("Expected a path")


def _resolve_paths(obj: Any, base: Path) -> None:
    """Every relative path (given or default) is relative to the config file's directory."""
    if isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            v = getattr(obj, name)
            if isinstance(v, Path):
                setattr(obj, name, v if v.is_absolute() else base / v)
            else:
                _resolve_paths(v, base)
    elif isinstance(obj, dict):
        for v in obj.values():
            _resolve_paths(v, base)
    elif isinstance(obj, list):
        for v in obj:
            _resolve_paths(v, base)


def _ipc_path(endpoint: str, base: Path) -> str:
    """A relative `ipc://` path is the config's, as every other relative path is: left to each process's working
    directory, a hub bound its socket wherever it was started and a client started elsewhere found none. Linux's
    abstract names (`ipc://@name`) are no path."""
    rest = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
    if not rest or rest.startswith(("/", "@")):
        return endpoint
    return f"ipc://{base / Path(rest).expanduser()}"


def _resolve_ipc(f: ConfigFile, base: Path) -> None:
    """Every endpoint a process binds or connects to, given as an `ipc://` relative path, made absolute."""
    hub, client, sec = f.hub, f.client, f.security
    hub.local, hub.work, hub.publish, hub.advertise = (
        _ipc_path(e, base) for e in (hub.local, hub.work, hub.publish, hub.advertise))
    client.work, client.publish = _ipc_path(client.work, base), _ipc_path(client.publish, base)
    client.work_endpoints = [_ipc_path(e, base) for e in client.work_endpoints]
    client.publish_endpoints = [_ipc_path(e, base) for e in client.publish_endpoints]
    sec.work_previous = sec.work_previous and _ipc_path(sec.work_previous, base)
    sec.publish_previous = sec.publish_previous and _ipc_path(sec.publish_previous, base)


UNIX_PATH_MAX = 107
"""The longest path a Unix socket takes (Linux's sun_path holds 108 bytes with the closing NUL)."""


def _check_ipc_lengths(f: ConfigFile, file: str) -> None:
    """A socket path too long for a Unix socket is a config error, said by every command at once: it failed only
    at the bind in the hub, and a client tried it again and again until its timeout before saying why, while
    `doctor --offline` found nothing wrong."""
    for key, endpoints in (("[hub] local", [f.hub.local]), ("[hub] work", [f.hub.work]),
                           ("[hub] publish", [f.hub.publish]), ("[client] work", f.client.work_endpoints),
                           ("[client] publish", f.client.publish_endpoints)):
        for e in endpoints:
            path = e[len("ipc://"):] if e.startswith("ipc://") else ""
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                raise ConfigError(f"{file}: {key}: the socket path {path} is {len(os.fsencode(path))} bytes, over "
                                  f"the {UNIX_PATH_MAX} a Unix socket path can have; give a shorter path, e.g. "
                                  '"ipc:///run/bucketwire/hub.sock"')


def _prepare(v: Any, t: mi.Type, keys: list[_Key], file: str) -> Any:
    """What the schema cannot say by itself, done before msgspec validates: a lone string where a list of strings
    is expected becomes a one-item list; Secret values are resolved; a named table's entries get their name."""
    if isinstance(t, mi.Metadata):
        secret = (t.extra or {}).get("secret")
        if secret:
            v = _resolve(v, keys, file, deep=secret == "deep")
        return _prepare(v, t.type, keys, file)
    if isinstance(t, mi.UnionType):
        lists = [x for x in t.types if isinstance(x, mi.ListType)]
        if lists and isinstance(v, str):
            return _prepare(v, lists[0], keys, file)
        secrets = [x for x in t.types if _is_secret(x)]  # `Secret | None`: a given value is still a secret
        return _prepare(v, secrets[0], keys, file) if secrets and v is not None else v
    if isinstance(t, mi.ListType):
        if isinstance(v, str) and isinstance(_bare(t.item_type), mi.StrType):
            return [_prepare(v, t.item_type, keys, file)]  # errors name the key as written, without an index
        return [_prepare(x, t.item_type, [*keys, i], file) for i, x in enumerate(v)] if isinstance(v, list) else v
    if isinstance(t, mi.DictType) and isinstance(v, dict):
        named = isinstance(t.value_type, mi.StructType) and any(f.name == "name" for f in t.value_type.fields)
        out = {}
        for k, x in v.items():
            x = _prepare(x, t.value_type, [*keys, k], file)
            if named and isinstance(x, dict):
                if "name" in x:
                    raise ConfigError(f"{file}: {_where([*keys, k, 'name'])}: unknown key; the table's own name "
                                      f"({k!r}) is its name")
                x = {"name": k, **x}
            out[k] = x
        return out
    if isinstance(t, mi.StructType) and isinstance(v, dict):
        fields = {f.encode_name: f for f in t.fields}
        return {k: _prepare(x, fields[k].type, [*keys, k], file) if k in fields else x for k, x in v.items()}
    return v


def _resolve(v: Any, keys: list[_Key], file: str, *, deep: bool) -> Any:
    def err(msg: str) -> ConfigError:
        return ConfigError(f"{file}: {_where(keys)}: {msg}")

    if isinstance(v, str) and (not deep or v.startswith(("env:", "file:"))):
        return resolve_secret(v, err)
    if isinstance(v, list):
        return [_resolve(x, [*keys, i], file, deep=deep) for i, x in enumerate(v)]
    if deep and isinstance(v, dict):
        return {k: _resolve(x, [*keys, k], file, deep=deep) for k, x in v.items()}
    return v


def _bare(t: mi.Type) -> mi.Type:
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


# -- errors -------------------------------------------------------------------------------------------------------
_MSG = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_SEG = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _explain(e: msgspec.ValidationError, data: Any, cls: type, keys: list[_Key]) -> str:
    """msgspec's `Expected int >= 1 - at $.groups[...].credit` as `[groups.x] credit: expected an integer ≥ 1,
    got "ten"`: the TOML table and key, the constraint in words, and the value that broke it."""
    m = _MSG.match(str(e))
    assert m is not None
    msg, path = m["msg"], m["path"] or ""
    t: mi.Type = mi.type_info(cls)
    v: Any = data
    for seg in _SEG.finditer(path):
        name, index = seg[1], seg[2]
        t = _bare(t)
        if isinstance(t, mi.UnionType):
            t = next((x for x in map(_bare, t.types) if not isinstance(x, mi.NoneType)), t)
        if name is not None:
            assert isinstance(t, mi.StructType)
            t = next(f.type for f in t.fields if f.encode_name == name)
            v = v.get(name) if isinstance(v, dict) else None
            keys = [*keys, name]
        elif index is not None:
            assert isinstance(t, mi.ListType)
            t, v, keys = t.item_type, v[int(index)], [*keys, int(index)]
        else:  # `[...]`: msgspec does not say which entry of a table of tables; find it by validating each
            assert isinstance(t, mi.DictType) and isinstance(t.value_type, mi.StructType) and isinstance(v, dict)
            for k, x in v.items():
                try:
                    msgspec.convert(x, t.value_type.cls, dec_hook=_dec_hook)
                except msgspec.ValidationError as inner:
                    return _explain(inner, x, t.value_type.cls, [*keys, k])
            return f"{_where(keys)}: {msg}"
    field = re.match(r"Object (contains unknown|missing required) field `(.*)`$", msg)
    if field and field[1] == "contains unknown":
        meant = _meant(field[2], t, top=not keys)
        if meant:
            return f"{_where([*keys, field[2]])}: unknown key; did you mean {meant}?"
        return f"{_where([*keys, field[2]])}: unknown key; check the spelling against the configuration reference " \
               "in README.md"
    if field:
        ft = next((f.type for f in _fields(t) if f.encode_name == field[2]), None)
        examples = (ft.extra_json_schema or {}).get("examples") if isinstance(ft, mi.Metadata) else None
        hint = f", e.g. {field[2]} = {_toml(examples[0])}" if examples else ""
        return f"{_where([*keys, field[2]])}: required{hint}"
    if msg.startswith(("Expected", "Invalid enum value")):
        got = _kind(v) if _is_secret(t) else _toml(v)
        return f"{_where(keys)}: expected {_describe(t)}, got {got}"
    own = re.match(r"^(\w+): (.*)$", msg, re.S)  # raised by a __post_init__ as "key: what to do"
    if own:
        return f"{_where([*keys, own[1]])}: {own[2]}"
    return f"{_where(keys)}: {msg}"


def _meant(name: str, t: mi.Type, *, top: bool) -> str | None:
    """The key of this table spelt most like `name` (a typo's likely intent), written as the user would write it:
    a top-level table as `[hub]`, `[[routes]]` or `[groups.NAME]`."""
    fields = {f.encode_name: f for f in _fields(t) if not f.encode_name.startswith("__") and f.encode_name != "name"}
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.7)
    if not close:
        return None
    key = close[0]
    if not top:
        return key
    ft = _bare(fields[key].type)
    if isinstance(ft, mi.ListType) and isinstance(_bare(ft.item_type), mi.StructType):
        return f"[[{key}]]"
    if isinstance(ft, mi.DictType) and isinstance(_bare(ft.value_type), mi.StructType | mi.DictType):
        return f"[{key}.NAME]"
    return f"[{key}]" if isinstance(ft, mi.StructType | mi.DictType) else key


def _fields(t: mi.Type) -> tuple[mi.Field, ...]:
    t = _bare(t)
    return t.fields if isinstance(t, mi.StructType) else ()


def _where(keys: list[_Key]) -> str:
    """["groups", "x", "credit"] -> "[groups.x] credit"; ["routes", 0, "topic"] -> "[routes[0]] topic";
    ["hub", "auth_token", 1] -> "[hub] auth_token[1]"."""
    def join(ks: list[_Key]) -> str:
        out = ""
        for k in ks:
            if isinstance(k, int):
                out += f"[{k}]"
            else:
                out += ("." if out else "") + (k if _BARE_KEY.match(k) else json.dumps(k))
        return out

    last = max((i for i, k in enumerate(keys) if isinstance(k, str)), default=0)
    table, key = join(keys[:last]), join(keys[last:])
    return f"[{table}] {key}" if table else key


def _describe(t: mi.Type) -> str:
    if isinstance(t, mi.Metadata):
        described = (t.extra_json_schema or {}).get("description")
        return str(described) if described else _describe(t.type)
    if isinstance(t, mi.IntType | mi.FloatType):
        what = "an integer" if isinstance(t, mi.IntType) else "a number"
        bounds = [f"{op} {b}" for op, b in (("≥", t.ge), (">", t.gt), ("≤", t.le), ("<", t.lt)) if b is not None]
        return " ".join([what, *bounds])
    if isinstance(t, mi.StrType):
        return "a non-empty string" if t.min_length else "a string"
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(json.dumps(x) for x in t.values)
    if isinstance(t, mi.ListType):
        item = re.sub(r"^an? ", "", _describe(t.item_type)) + "s"
        return f"a non-empty list of {item}" if t.min_length else f"a list of {item}"
    if isinstance(t, mi.DictType | mi.StructType):
        return "a table"
    if isinstance(t, mi.UnionType):
        return " or ".join(_describe(x) for x in t.types if not isinstance(x, mi.NoneType))
    if isinstance(t, mi.CustomType) and t.cls is Path:
        return "a path"
    return "a value"


def _is_secret(t: mi.Type) -> bool:
    while isinstance(t, mi.Metadata):
        if (t.extra or {}).get("secret"):
            return True
        t = t.type
    return isinstance(t, mi.ListType) and _is_secret(t.item_type)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int | float):
        return json.dumps(v)
    if isinstance(v, list) and len(json.dumps(v, default=str)) <= 60:
        return json.dumps(v, default=str)
    return _kind(v)


def _kind(v: Any) -> str:
    kinds = {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    return kinds.get(type(v), type(v).__name__)


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
