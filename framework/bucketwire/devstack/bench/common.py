"""Shared bench plumbing: percentiles, progress, a throwaway hub + worker stack on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bucketwire.config import UNIX_PATH_MAX
from bucketwire.procutil import OWNER_LOCK, free_port, owned_tempdir, parent_death_signal, remove_abandoned_tempdirs

__all__ = ["Stack", "free_port", "percentiles", "progress", "progress_done"]


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (nearest-rank)."""
    if not samples:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "n": 0}
    s = sorted(samples)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s))) - 1))] * 1000

    return {"p50_ms": round(rank(50), 3), "p90_ms": round(rank(90), 3), "p99_ms": round(rank(99), 3),
            "max_ms": round(s[-1] * 1000, 3), "n": len(s)}


def progress(msg: str) -> None:
    click.echo(f"\r\033[K{msg}", nl=False, err=True)


def progress_done() -> None:
    click.echo("\r\033[K", nl=False, err=True)


PREFIX = "bucketwire-bench-stack-"


class Stack:
    """A hub and worker pools in a temporary directory, for benchmarks.

    The directory (the hub's journal, the logs, the latency rows) goes with close(): every `bench bus` round once
    left its own behind, 14 GB of them on one machine. It stays only when an error's message names it (`keep`).
    A bench killed -9 cannot close(): its hub and pools get SIGTERM from the kernel (they would run on otherwise),
    and the next Stack removes the directories of benches that are gone."""

    def __init__(self, durability: str = "os", extra: str = "", local: bool = False) -> None:
        """`local`: the hub serves [hub] local and every client of the stack ([client] work) connects to it."""
        remove_abandoned_tempdirs(PREFIX)
        tmp, self._lock = owned_tempdir(PREFIX)
        self.tmp = Path(tmp)
        self.http, self.pub, self.work = free_port(), free_port(), free_port()
        self.cfg_path = self.tmp / "bench.toml"
        self.out = self.tmp / "latency"
        sock = self.tmp / "state" / "local.sock"
        if local and len(os.fsencode(sock)) > UNIX_PATH_MAX:
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.close(self._lock)
            progress_done()
            raise click.ClickException(
                f"bench: the local socket would be {sock}, longer than a Unix socket path may be ({UNIX_PATH_MAX} "
                "bytes): $TMPDIR is too long; run with a shorter TMPDIR (TMPDIR=/tmp) or with --transport tcp")
        local_toml = f'local = "ipc://{sock}"\n[client]\nwork = "ipc://{sock}"\n' if local else ""
        self.cfg_path.write_text(f"""
[hub]
http = "127.0.0.1:{self.http}"
publish = "tcp://127.0.0.1:{self.pub}"
work = "tcp://127.0.0.1:{self.work}"
state_dir = "{self.tmp / 'state'}"
durability = "{durability}"
dispatch_batch = 256
{local_toml}
[groups.bench]
topics = ["bench"]
plugins = []
credit = 512

[plugins.bench-noop]
out = "{self.out}"
""" + extra)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.keep = False
        """Set with an error whose message sends the user to the logs in `tmp`: close() leaves them then."""

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", "bucketwire", "-q", *args, "-c", str(self.cfg_path)],
                             stdout=subprocess.DEVNULL, stderr=(self.tmp / f"p{len(self.procs)}.log").open("wb"),
                             start_new_session=True, preexec_fn=parent_death_signal())
        self.procs.append(p)
        return p

    def config(self) -> Any:
        from bucketwire import config

        return config.load(self.cfg_path)

    def wait_workers(self, n: int, timeout: float = 60) -> None:
        from bucketwire.client import HubClient

        deadline = time.monotonic() + timeout
        with HubClient(self.config(), timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    if c.status()["groups"].get("bench", {}).get("workers", 0) >= n:
                        return
                except Exception:
                    pass
                time.sleep(0.1)
        self.keep = True
        raise click.ClickException(f"bench: workers did not connect within {timeout}s (logs in {self.tmp})")

    def stop(self) -> None:
        """SIGTERM the pools (`worker` processes), wait for them, then the rest (the hub), as `bucketwire dev`
        does: a pool's children say BYE to a hub that must still answer. Stopped together, a pool waited for the
        BYE's answer from a hub already gone and at times its socket's 2 s LINGER: 4.3 s to exit, the hub 0.1 s."""
        pools = [p for p in self.procs if isinstance(p.args, list | tuple) and "worker" in p.args]
        for group in (pools, [p for p in self.procs if p not in pools]):
            for p in group:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGTERM)
            for p in group:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        self.procs.clear()

    def close(self) -> None:
        """stop(), then remove the directory unless `keep`; safe to call twice."""
        self.stop()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self._lock >= 0:  # a lock-less dir is never taken for an abandoned one: it stays for the user
            (self.tmp / OWNER_LOCK).unlink(missing_ok=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def read_latencies(self) -> list[tuple[int, float, float]]:
        rows = []
        for f in self.tmp.glob("latency.*"):
            for line in f.read_text().splitlines():
                i, t, r = line.split()
                rows.append((int(i), float(t), float(r)))
            f.unlink()
        return rows


# -- pacing a fixed-rate publisher ---------------------------------------------------------------------------
SPIN = 0.0002
"""The last 200 µs before a send are spun; the rest of the wait is slept. A sleep on this machine wakes 20-60 µs
late even with a 1 µs timer slack, so spinning the tail keeps sends on time (p50 lateness ~1 µs), while the
publisher takes ~18% of a core at 1,000/s. Spinning the whole wait, as the bench did first, took a whole core:
on a 2-core machine the systems under test then shared one core, and with `--busy`'s spinner none."""

_PR_SET_TIMERSLACK = 29


def precise_sleeps() -> None:
    """Ask Linux to end this thread's sleeps within 1 µs of when asked (the default slack is 50 µs)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: sleeps are just coarser, and SPIN covers most of it
            pass


def pace_until(t: float, turn: Callable[[], object] | None = None) -> None:
    """Return at monotonic time `t`: sleep until SPIN before it, then spin. Both sides' publishers pace this way.
    `turn` runs once when the spin begins: the publisher's housekeeping (reading the confirmations that arrived
    during the sleep), done before the send's clock starts, as the asyncio publisher's spin (`apace_until`) turns
    its loop and reads its PubAcks then."""
    left = t - time.monotonic()
    if left > SPIN:
        time.sleep(left - SPIN)
    if turn is not None:
        turn()
    while time.monotonic() < t:
        pass


async def apace_until(t: float) -> None:
    """`pace_until` for an asyncio publisher: the sleep blocks the loop (nothing of the publisher's is due before
    `t`; PubAcks wait in the socket), and the spin turns the loop, so replies that arrived meanwhile are read."""
    left = t - time.monotonic()
    if left > SPIN:
        time.sleep(left - SPIN)
    while time.monotonic() < t:
        await asyncio.sleep(0)
