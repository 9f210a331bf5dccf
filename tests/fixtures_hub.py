"""Real hub and worker processes on loopback, on free ports, torn down after each test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bucketwire import config as config_mod
from bucketwire.client import HubClient
from bucketwire.procutil import free_port
from tests.procs import cmdline, processes

RECORDER = str(Path(__file__).parent / "plugins" / "recorder.py")

# The stacks the running test made: a failing test's report carries their processes' logs (see conftest's
# pytest_runtest_makereport), so a failure seen once in CI can be read afterwards, not only rerun and hoped for.
STACKS: list[Stack] = []


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)  # pacing: the poll interval of a wait with a deadline
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stack:
    """A config file plus the hub and worker processes started from it."""

    def __init__(self, tmp: Path, extra: str = "", token: str = "test-token") -> None:
        self.dir = tmp
        self.http_port, self.pub_port, self.work_port = free_port(), free_port(), free_port()
        self.token = token
        self.record = tmp / "handled.jsonl"
        self.cfg_path = tmp / "bucketwire.toml"
        self.cfg_path.write_text(
            f"""
[hub]
http = "127.0.0.1:{self.http_port}"
publish = "tcp://127.0.0.1:{self.pub_port}"
work = "tcp://127.0.0.1:{self.work_port}"
state_dir = "{tmp / 'state'}"
auth_token = "env:BW_TEST_TOKEN"
heartbeat_interval = 0.25
heartbeat_timeout = 1.5

[plugins.recorder]
path = "{self.record}"
""" + extra
        )
        self.env = {**os.environ, "BW_TEST_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        os.environ["BW_TEST_TOKEN"] = token
        self.cfg = config_mod.load(self.cfg_path)
        self.hub_proc: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        STACKS.append(self)

    def _spawn(self, args: list[str], name: str, cfg_path: Path | None = None) -> subprocess.Popen:
        log = self.dir / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "bucketwire", *args, "-c", str(cfg_path or self.cfg_path)],
            env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_hub(self) -> None:
        self.hub_proc = self._spawn(["hub"], "hub")
        try:
            wait_for(lambda: self.healthy() or self.hub_proc.poll() is not None, 30, "hub /healthz")
        except AssertionError:
            raise AssertionError("hub did not become healthy:\n" + self.dump_logs()) from None
        if self.hub_proc.poll() is not None:
            raise AssertionError(f"hub exited with {self.hub_proc.returncode}:\n" + self.dump_logs())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def kill_hub(self, sig: int = signal.SIGKILL) -> None:
        assert self.hub_proc is not None
        self.hub_proc.send_signal(sig)
        self.hub_proc.wait(10)

    def start_worker(self, group: str, processes: int = 1, *extra: str, wait: bool = True,
                     cfg_path: Path | None = None) -> subprocess.Popen:
        """`cfg_path` runs the pool from another config (e.g. another client key) against this hub."""
        p = self._spawn(["worker", "--group", group, "-n", str(processes), "--plugin", RECORDER, *extra], "worker",
                        cfg_path)
        self.workers.append(p)
        if wait:
            wait_for(lambda: self.status()["groups"].get(group, {}).get("workers", 0) >= processes, 30,
                     f"{processes} workers in {group}")
        return p

    def client(self, timeout: float = 10.0) -> HubClient:
        return HubClient(self.cfg, timeout=timeout)

    def status(self) -> dict[str, Any]:
        with self.client(5) as c:
            return c.status()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the hub's /metrics (0 when absent): counters are the positive signals tests wait on."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/metrics")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=5) as r:
            return sample_of(r.read().decode(), name, labels)

    def post(self, path: str, body: bytes, token: str | None = None, headers: dict | None = None
             ) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST")
        tok = self.token if token is None else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def handled(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        # Only lines a newline ends: a worker may be writing the last one as it is read.
        return [json.loads(line) for line in self.record.read_text().split("\n")[:-1] if line.strip()]

    def child_pids(self, worker: subprocess.Popen) -> list[int]:
        """The pool's worker children (not multiprocessing's resource tracker, also a child)."""
        return [p for p, pr in processes().items() if pr.ppid == worker.pid and b"spawn_main" in cmdline(p)]

    def stop(self) -> None:
        """SIGTERM the pools, then the hub once they are gone, as `bucketwire dev` stops them: a pool's children
        say BYE to a hub that answers. Stopped together, each pool waited out its children's wait for the BYE's
        answer (2 heartbeat intervals: 0.5 s here) and now and then their socket's LINGER (2 s) too: 0.6 s, at
        times 2.6 s, where pools first takes 0.15-0.3 s, in the teardown of every test with a pool."""
        for group in (self.workers, [self.hub_proc]):
            for p in group:
                if p is not None and p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for p in group:
                if p is None:
                    continue
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)

    def dump_logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in self.logs if p.exists())


def sample_of(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of one sample of an exposition-format page, read by prometheus-client's parser (0 if absent)."""
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and smp.labels == labels:
                return float(smp.value)
    return 0.0


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    made: list[Stack] = []

    def make(extra: str = "", **kw: Any) -> Stack:
        s = Stack(_mk(tmp_path / f"stack{len(made)}"), extra, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
