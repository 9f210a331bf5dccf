"""`bucketwire dev`: the whole stack on one machine, wired together, in one command.

Why: the first thing a new user wants is to drop a photo into a bucket and watch work happen, without
installing MinIO, writing webhook config or picking ports. So this starts a loopback SeaweedFS (free ports,
data under the state dir) whose filer webhook points at the hub's `/seaweedfs/events` with a generated token,
writes the *effective* config (the given one with hub addresses, store endpoints, credentials and relative
paths filled in), creates the buckets it needs, and runs `bucketwire hub` and one `bucketwire worker` per
group as child processes. Every child gets its own process group and log file; SIGINT/SIGTERM stops them all
(SIGKILL after a grace period), so no weed or worker outlives `dev`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bucketwire.devstack.seaweedfs import WeedError, WeedServer, find_weed, port_is_free
from bucketwire.procutil import STOP_WITH_ENV, free_port, on_stop_signals, parent_death_signal

if TYPE_CHECKING:
    from bucketwire.config import Config

DEFAULT_CONFIG = """\
# The embedded dev stack (see examples/dev.toml for the commented version).
[hub]
state_dir = "hub"

[dev]
buckets = ["photos", "thumbnails", "photos-replica"]

[[routes]]
events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
bucket = "photos"
topic = "photos"

[topics.photos]
max_attempts = 5
dead_letter = "dead-letter"

[groups.thumbnails]
topics = ["photos"]
plugins = ["thumbnail"]
processes = 1

[groups.audit]
topics = ["photos", "thumbnail-ready", "object-replicated"]
plugins = ["audit"]
processes = 1

[groups.replication]
topics = ["photos"]
plugins = ["replication"]
processes = 1

[stores.primary]
endpoint = "127.0.0.1:8333"

[plugins.thumbnail]
store = "primary"
sizes = [128, 512]
output_bucket = "thumbnails"

[plugins.audit]
path = "audit/audit.log"

[plugins.replication]
target_store = "primary"
target_bucket = "photos-replica"
"""

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class DevError(click.ClickException):
    """A problem starting the dev stack, one line."""


class Interrupted(Exception):
    """Ctrl+C or SIGTERM arrived while the stack was still starting: stop what is up, never say "running"."""


LOCK_NAME = "dev.lock"


def claim_state_dir(root: Path) -> int:
    """Create the state dir and hold an exclusive lock on it for as long as this process lives (the descriptor
    is never closed; children do not inherit it).

    Why: a second `dev` on the same state dir would start a second SeaweedFS on the first one's data, which
    fails deep inside weed (a Go stack line about a leveldb lock) after rewriting the shared files; and a state
    dir that cannot be created or written failed with a traceback.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DevError(f"cannot use {root} as the state dir ({e.strerror}); pass --state-dir with a directory "
                       "you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DevError(f"cannot lock {root / LOCK_NAME} ({e.strerror})") from None
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DevError(f"another `bucketwire dev` (pid {holder}) is running with the state dir {root}; stop it "
                       "first, or give this one its own --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


DEV_MARK_ENV = "BUCKETWIRE_DEV_STATE_DIR"
"""Set by `dev` in its own environment before it starts anything, so every process it starts (weed, NATS, the hub,
the pools) carries it from its exec on, in /proc/PID/environ: what `_leftovers` knows them by."""


def mark_environment(root: Path) -> None:
    os.environ[DEV_MARK_ENV] = str(root)


def _leftovers(root: Path) -> dict[int, str]:
    """Session leaders of this user started by a `dev` on this state dir (weed, NATS, hubs, pools each lead their
    own session): their environment has DEV_MARK_ENV=root. It used to be any session leader whose command line
    named a path under the state dir, and `--state-dir /tmp` (or ~) stopped every server of anyone's with a path
    there. A shell's `tail -f <state-dir>/logs/hub.log` or a `bucketwire tail -c <state-dir>/bucketwire.toml`
    is not a session leader, nor marked, and is left alone."""
    mark, me, uid = os.fsencode(f"{DEV_MARK_ENV}={root}"), os.getpid(), os.getuid()
    found: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        pid = int(d.name)
        try:
            if d.stat().st_uid != uid or os.getsid(pid) != pid:
                continue
            if mark not in (d / "environ").read_bytes().split(b"\0"):
                continue
            args = (d / "cmdline").read_bytes().split(b"\0")
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, not yet reaped
        except (OSError, IndexError):
            continue
        words = [a.decode(errors="replace") for a in args if a] or ["?"]
        prog = words[1:] if os.path.basename(words[0]).startswith("python") and len(words) > 1 else words
        found[pid] = " ".join([os.path.basename(prog[0]), *[w for w in prog[1:2] if not w.startswith("-")]])
    return found


def stop_leftovers(root: Path, grace: float = 20.0) -> list[str]:
    """Stop the processes a previous `dev` on this state dir left running, before starting anything on it.

    Why: a `dev` killed with SIGKILL cannot stop its children. They get SIGTERM from the kernel as it dies (see
    procutil.parent_death_signal), but a `dev` started again at once found the lock free while they were still
    stopping (or, started before that was in place, still running), started a second weed on the first one's data
    and stopped with a line of a Go stack trace, the old stack still running. Each leftover's group gets SIGTERM
    (a pool drains, the hub stops cleanly), SIGKILL after `grace`. Returns "name (pid N)" for each."""
    found = _leftovers(root)
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while found.keys() & _leftovers(root).keys() and time.monotonic() < deadline:
        time.sleep(0.1)  # not our children: nothing to wait() on
    for pid in found.keys() & _leftovers(root).keys():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return [f"{name} (pid {pid})" for pid, name in sorted(found.items())]


# -- a minimal TOML writer (tomllib reads only) -------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Tables, arrays of tables and inline values: enough for a bucketwire config."""
    lines: list[str] = []
    scalars = {k: v for k, v in doc.items() if not _is_table(v) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in doc.items():
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        if _is_table(v):
            out += f"\n[{name}]\n" + to_toml(v, name)
        elif _is_table_array(v):
            for item in v:
                out += f"\n[[{name}]]\n" + to_toml(item, name)
    return out


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


# -- the stack ---------------------------------------------------------------------------------------------
def needed_buckets(doc: dict[str, Any]) -> list[str]:
    """Buckets the config names: [dev] buckets, route buckets, and plugin settings ending in `bucket`."""
    wanted = doc.get("dev", {}).get("buckets", [])
    names: list[str] = [wanted] if isinstance(wanted, str) else list(wanted)  # one string is a list of one
    names += [r["bucket"] for r in doc.get("routes", []) if isinstance(r.get("bucket"), str)]
    for settings in doc.get("plugins", {}).values():
        if isinstance(settings, dict):
            names += [v for k, v in settings.items() if k.endswith("bucket") and isinstance(v, str)]
    out: list[str] = []
    for n in names:
        if n not in out:
            if not BUCKET_RE.match(n):
                raise DevError(f"bucket name {n!r} in the config is not a valid S3 bucket name")
            out.append(n)
    return out


def effective_config(base: dict[str, Any], state_dir: Path, weed: WeedServer, token: str,
                     ports: dict[str, int]) -> dict[str, Any]:
    """The given config with everything machine-specific filled in for the embedded stack."""
    doc: dict[str, Any] = json.loads(json.dumps(base))  # deep copy
    hub = doc.setdefault("hub", {})
    hub["http"] = f"127.0.0.1:{ports['http']}"
    hub["publish"] = f"tcp://127.0.0.1:{ports['publish']}"
    hub["work"] = f"tcp://127.0.0.1:{ports['work']}"
    hub["state_dir"] = str(state_dir / str(hub.get("state_dir", "hub")))
    hub["auth_token"] = token
    doc.pop("client", None)  # clients connect where the hub binds
    stores = doc.setdefault("stores", {"primary": {}})
    for s in stores.values():
        s.update(endpoint=weed.s3_endpoint, access_key=weed.access_key, secret_key=weed.secret_key, secure=False)
    for settings in doc.get("plugins", {}).values():
        for k in ("path", "dir"):
            v = settings.get(k)
            if isinstance(v, str) and not os.path.isabs(v):
                settings[k] = str(state_dir / v)
    return doc


def local_socket(doc: dict[str, Any]) -> str | None:
    """The one-host stack's pools and commands reach the hub on its local socket ([hub] local): what a pool on the
    hub's host should use (README "On the wire"), so the first stack a user runs is that path. Left on TCP when
    the state directory's path is too long for a Unix socket's (108 bytes): then the line that says so."""
    sock = Path(doc["hub"]["state_dir"]) / "hub.sock"
    if len(str(sock)) < 100:
        doc["hub"]["local"] = f"ipc://{sock}"
        doc["client"] = {"work": f"ipc://{sock}"}
        return None
    return (f"note: pools and commands reach the hub over TCP: {sock} is too long for a Unix socket "
            f"({len(str(sock))} bytes); a shorter --state-dir puts them on the hub's local socket")


class Children:
    """Child processes, each in its own session, with logs in one directory; stop() leaves nothing behind."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.workers: set[str] = set()
        self._log_start: dict[str, int] = {}
        """name -> the size of its log when it was started: the logs are appended to at every start."""

    def spawn(self, name: str, argv: list[str], env: dict[str, str], *, worker: bool = False
              ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self._log_start[name] = log.tell()
            # Both ways of stopping with `dev`: the kernel's death signal, and the child's own watch of its
            # parent (procutil.stop_when_orphaned), for when that signal is not seen.
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**env, STOP_WITH_ENV: str(os.getpid())}, start_new_session=True,
                                 preexec_fn=parent_death_signal())
        self.procs.append((name, p))
        if worker:
            self.workers.add(name)
        return p

    def dead(self) -> list[tuple[str, str]]:
        """Each child that has exited: its name and `(exit N, see LOG)`, then its own `Error:` line when it
        printed one (a plugin setting, a plugin not installed): the reason, without opening the log."""
        out = []
        for n, p in self.procs:
            if p.poll() is None:
                continue
            log = self.log_dir / f"{n}.log"
            why = self._error_line(n, log)
            out.append((n, f"(exit {p.returncode}, see {log})" + (f": {why}" if why else "")))
        return out

    def _error_line(self, name: str, log: Path) -> str:
        try:
            with open(log, "rb") as f:
                f.seek(self._log_start.get(name, 0))
                text = f.read()[-65536:].decode(errors="replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.startswith("Error: ")]
        return lines[-1].removeprefix("Error: ")[:500] if lines else ""

    def stop(self, grace: float = 15.0) -> None:
        """Workers first, all at once, and wait until they have drained; then the rest (the hub).

        A draining worker finishes the event in hand, acks it and gives back the others with BYE: that only
        lands if the hub is still there. Stopped together, the hub would lose those acks and deliver the
        events again on the next start.
        """
        workers = [(n, p) for n, p in self.procs if n in self.workers]
        others = [(n, p) for n, p in self.procs if n not in self.workers]
        for wave in (workers, others):
            for _, p in wave:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for _, p in wave:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
            for _, p in wave:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)  # stragglers in the group, even if the leader exited
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)


def write_config(path: Path, doc: dict[str, Any], command: str) -> Config:
    """Write a generated config owner-only (it holds the token and the S3 keys) and load it back, so a bad
    `[dev]` base file fails here in one line rather than in a child process's log."""
    from bucketwire.config import ConfigError, load

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# written by `{command}`; regenerated on every start\n" + to_toml(doc))
    try:
        return load(path)
    except ConfigError as e:
        raise DevError(str(e)) from None


def _check_base(base: dict[str, Any], config_path: str | None) -> None:
    """Check the base config against the schema before anything starts, so a mistake is named in the file the
    user wrote (the effective config is written later, and its own check would name that generated file)."""
    from bucketwire.config import ConfigError, parse

    doc: dict[str, Any] = json.loads(json.dumps(base))  # what dev replaces is not the user's to get right
    if isinstance(doc.get("hub"), dict):
        doc["hub"].pop("auth_token", None)
    doc.pop("client", None)
    for store in (doc.get("stores") or {}).values():
        if isinstance(store, dict):
            for k in ("access_key", "secret_key"):
                store.pop(k, None)
    try:
        parse(doc, file=config_path or "the built-in dev config", path=Path(config_path) if config_path else None)
    except ConfigError as e:
        raise DevError(str(e)) from None


def make_buckets(weed: WeedServer, buckets: list[str]) -> None:
    """Create the buckets the config names (kept across restarts: only the missing ones)."""
    s3 = weed.client()
    for b in buckets:
        if not s3.bucket_exists(b):
            s3.make_bucket(b)


def bucketwire_argv() -> list[str]:
    """How to run this very bucketwire: the `bucketwire` script beside this Python, by absolute path, so the
    commands in the banner work pasted into a shell where the venv is not active (after `make dev`)."""
    exe = Path(sys.executable).absolute().parent / "bucketwire"
    if os.access(exe, os.X_OK):
        return [str(exe)]
    return [str(Path(sys.executable).absolute()), "-m", "bucketwire"]


def banner(weed: WeedServer, buckets: list[str], cfg_doc: dict[str, Any], cfg_path: Path, log_dir: Path,
           argv0: list[str]) -> str:
    """What a newcomer needs to use the stack from another terminal; every command in it runs as printed."""
    def cmd(*args: str) -> str:
        return shlex.join([*argv0, *args])

    hub = cfg_doc["hub"]
    return (
        f"bucketwire dev is running (Ctrl+C stops everything)\n"
        f"  S3 endpoint   http://{weed.s3_endpoint}\n"
        f"  access key    {weed.access_key}\n"
        f"  secret key    {weed.secret_key}\n"
        f"  buckets       {', '.join(buckets)}\n"
        f"  webhook       http://{hub['http']} (token in the config)\n"
        f"  fan-out       {hub['publish']}\n"
        f"  work          {hub['work']}" + (f" (pools and commands: {hub['local']})" if hub.get("local") else "") + "\n"
        f"  config        {cfg_path}\n"
        f"  logs          {log_dir}/\n"
        f"  follow        {cmd('tail', '-c', str(cfg_path))}\n"
        f"  status        {cmd('status', '-c', str(cfg_path))}"
    )


def wait_pools(cfg: Any, children: Children, stopping: threading.Event, timeout: float = 90.0) -> None:
    """Until every group has a connected worker: only then is the stack ready for uploads (and the hub has no
    group without workers to warn about)."""
    from bucketwire.client import HubClient, HubUnavailable

    deadline = time.monotonic() + timeout
    with HubClient(cfg, timeout=5) as c:
        while not stopping.is_set():
            dead = children.dead()
            if dead:
                raise DevError("{} exited during startup {}".format(*dead[0]))
            try:
                groups = c.status()["groups"]
            except HubUnavailable:
                groups = {}
            missing = [g for g in cfg.groups if groups.get(g, {}).get("workers", 0) < 1]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise DevError(f"worker pool(s) {', '.join(missing)} did not connect within {timeout:.0f}s; "
                               f"see {children.log_dir}/worker-{missing[0]}.log")
            stopping.wait(0.2)


def wait_healthy(url: str, children: Children, stopping: threading.Event | None = None,
                 timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stopping is not None and stopping.is_set()):
        dead = children.dead()
        if dead:
            raise DevError("{} exited during startup {}".format(*dead[0]))
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    if stopping is not None and stopping.is_set():
        return
    raise DevError(f"the hub did not become healthy at {url} within {timeout:.0f}s")


def sample_images(stamp: str) -> list[tuple[str, bytes]]:
    """A few generated JPEGs; one carries EXIF orientation 6 (rotate 90° CW to display) like a phone photo.

    `stamp` (the time of this run) is drawn on each: the same bytes as an earlier run's uploads would find their
    thumbnails made already (the plugin announces nothing for those), and a second `dev --demo` would show no
    thumbnail-ready at all."""
    from PIL import Image, ImageDraw

    out: list[tuple[str, bytes]] = []
    colours = [("sunset", (230, 120, 40)), ("forest", (40, 140, 60)), ("ocean", (30, 90, 200))]
    for name, rgb in colours:
        img = Image.new("RGB", (1200, 800), rgb)
        d = ImageDraw.Draw(img)
        for i in range(0, 1200, 100):
            d.line([(i, 0), (1200 - i, 800)], fill=(255, 255, 255), width=6)
        d.text((40, 40), f"{name} {stamp}", fill=(0, 0, 0))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append((f"demo/{name}.jpg", buf.getvalue()))
    img = Image.new("RGB", (1200, 800), (200, 200, 40))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, 300, 200], fill=(200, 0, 0))  # red corner marks "top-left" as stored
    d.text((340, 40), stamp, fill=(0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    exif[0x010F] = "bucketwire"  # Make
    exif[0x0110] = "demo phone"  # Model
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, exif=exif)
    out.append(("demo/phone-portrait.jpg", buf.getvalue()))
    return out


def describe(body: bytes) -> str:
    """One human line for a follow-on event."""
    try:
        ev = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    d = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    what = f"{d.get('bucket', '')}/{d.get('key', '')}" if d.get("key") else ev.get("subject") or ""
    src = f" <- {d['source_bucket']}/{d['source_key']}" if d.get("source_key") else ""
    return f"[{ev.get('topic')} #{ev.get('seq')}] {ev.get('type')} {what}{src}"


@click.command(name="dev")
@click.option("--state-dir", type=click.Path(file_okay=False), default=".bucketwire-dev", show_default=True,
              help="Where SeaweedFS data, the hub journal, logs and the effective config live.")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
              help="Base config (routes, groups, plugins); default: the built-in one, like examples/dev.toml.")
@click.option("--demo", is_flag=True, help="Upload sample images and print the events that follow.")
@click.option("--s3-port", type=int, help="Fixed S3 port (default: a free one).")
@click.option("--ha", is_flag=True, help="3 NATS JetStream nodes and 2 hubs instead of one hub, to watch a "
                                         "takeover ('nats' extra).")
def dev(state_dir: str, config_path: str | None, demo: bool, s3_port: int | None, ha: bool) -> None:
    """Run SeaweedFS + hub + one worker pool per group on loopback, wired together."""
    root = Path(state_dir).absolute()
    try:
        text = Path(config_path).read_text() if config_path else DEFAULT_CONFIG
        base = tomllib.loads(text)
    except OSError as e:
        raise DevError(f"cannot read {config_path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise DevError(f"{config_path}: invalid TOML: {e}") from None
    _check_base(base, config_path)
    buckets = needed_buckets(base)
    try:
        find_weed()
    except WeedError as e:
        raise DevError(str(e)) from None

    claim_state_dir(root)
    left = stop_leftovers(root)
    mark_environment(root)
    if left:
        click.echo(f"stopped what a killed `bucketwire dev` left running on {root}: {', '.join(left)}", err=True)
    if s3_port and not port_is_free(s3_port):
        # Before anything starts (and after the leftovers, which may have held it): the error alone, not after a
        # `stopping...` as if something had been started.
        raise DevError(f"--s3-port {s3_port}: 127.0.0.1:{s3_port} is already in use; pick another with --s3-port "
                       "PORT, or leave it out for a free one")
    if ha:
        from bucketwire.commands.dev_ha import run_ha

        run_ha(root, base, buckets, demo, s3_port)
        return
    ports = {"http": free_port(), "publish": free_port(), "work": free_port()}
    token = secrets.token_urlsafe(24)
    weed = WeedServer(root / "seaweedfs", webhook_url=f"http://127.0.0.1:{ports['http']}/seaweedfs/events",
                      webhook_token=token, ports={"s3": s3_port} if s3_port else None, die_with_parent=True)
    children = Children(root / "logs")
    stopping = threading.Event()

    on_stop_signals(stopping.set)

    def check_stop() -> None:
        if stopping.is_set():
            raise Interrupted

    try:
        try:
            weed.start(timeout=60)
        except WeedError as e:
            raise DevError(str(e)) from None
        check_stop()
        cfg_doc = effective_config(base, root, weed, token, ports)
        note = local_socket(cfg_doc)
        if note:
            click.echo(note, err=True)
        cfg_path = root / "bucketwire.toml"
        cfg = write_config(cfg_path, cfg_doc, "bucketwire dev")
        make_buckets(weed, buckets)
        argv0 = bucketwire_argv()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        children.spawn("hub", [*argv0, "hub", "-c", str(cfg_path)], env)
        wait_healthy(f"http://{cfg_doc['hub']['http']}/healthz", children, stopping)
        check_stop()
        for group in cfg.groups:
            children.spawn(f"worker-{group}", [*argv0, "worker", "-c", str(cfg_path), "--group", group], env,
                           worker=True)
        wait_pools(cfg, children, stopping)
        check_stop()
        click.echo(banner(weed, buckets, cfg_doc, cfg_path, children.log_dir, argv0))
        if demo:
            _demo(cfg, weed, stopping, children)
        while not stopping.wait(0.5):
            dead = children.dead()
            if dead:
                raise DevError("{} stopped unexpectedly {}".format(*dead[0]))
    except Interrupted:
        pass  # stopped during startup: the finally below stops what was started, as for a stop once running
    finally:
        click.echo("stopping...", err=True)
        children.stop()
        weed.stop()
    click.echo("stopped", err=True)


def _demo(cfg: Any, weed: WeedServer, stopping: threading.Event, children: Children) -> None:
    """Upload sample images, then print every event on the hub as it arrives until stopped."""
    from bucketwire.client import follow

    s3 = weed.client()
    bucket = next((r.bucket for r in cfg.routes if r.bucket), "photos")
    printed = threading.Event()

    def upload() -> None:
        time.sleep(1.0)  # let `follow` subscribe first so the demo shows everything
        for key, data in sample_images(time.strftime("%Y-%m-%d %H:%M:%S")):
            s3.put_object(bucket, key, io.BytesIO(data), len(data), content_type="image/jpeg")
            click.echo(f"uploaded {bucket}/{key} ({len(data)} bytes)")
        printed.set()

    threading.Thread(target=upload, daemon=True, name="demo-upload").start()
    try:
        # A child that died ends the stream (the main loop names it); follow alone would wait for a hub restart.
        for _topic, _seq, body in follow(cfg, None, None, stop=lambda: stopping.is_set() or bool(children.dead())):
            click.echo(describe(body))
    except Exception as e:  # the hub went away: the main loop reports which child died
        if not stopping.is_set():
            click.echo(f"event stream ended: {e}", err=True)
