"""Shared bench plumbing: percentiles, progress, a throwaway hub + worker stack on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from bucketwire.procutil import free_port

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


class Stack:
    """A hub and worker pools in a temporary directory, for benchmarks."""

    def __init__(self, durability: str = "os", extra: str = "") -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bucketwire-bench-"))
        self.http, self.pub, self.work = free_port(), free_port(), free_port()
        self.cfg_path = self.tmp / "bench.toml"
        self.out = self.tmp / "latency"
        self.cfg_path.write_text(f"""
[hub]
http = "127.0.0.1:{self.http}"
publish = "tcp://127.0.0.1:{self.pub}"
work = "tcp://127.0.0.1:{self.work}"
state_dir = "{self.tmp / 'state'}"
durability = "{durability}"
dispatch_batch = 256

[groups.bench]
topics = ["bench"]
plugins = []
credit = 512

[plugins.bench-noop]
out = "{self.out}"
""" + extra)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", "bucketwire", "-q", *args, "-c", str(self.cfg_path)],
                             stdout=subprocess.DEVNULL, stderr=(self.tmp / f"p{len(self.procs)}.log").open("wb"),
                             start_new_session=True)
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
        raise click.ClickException(f"bench: workers did not connect within {timeout}s (logs in {self.tmp})")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()

    def read_latencies(self) -> list[tuple[int, float, float]]:
        rows = []
        for f in self.tmp.glob("latency.*"):
            for line in f.read_text().splitlines():
                i, t, r = line.split()
                rows.append((int(i), float(t), float(r)))
            f.unlink()
        return rows
