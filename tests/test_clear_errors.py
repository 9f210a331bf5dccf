"""Mistakes an operator makes on day two, each answered with one line that says what is wrong and how to fix it:
real hub and worker processes, real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures_hub import Stack

GROUPS = '\n[groups.g]\ntopics = ["x"]\nplugins = []\n'


def run(s: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(s.cfg_path)], env=s.env,
                          capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The error a command stopped with: it must be its only line on stderr (no traceback, no log noise)."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_worker_metrics_port_taken_names_the_flag(stack_factory: Callable[..., Stack]) -> None:
    """The line said `is the port taken?` and no more: not which setting gave the address, so an operator with
    `[groups.g] metrics` in the config looked for a flag they never passed, and one with two pools on a host did
    not learn how to give the second its own port."""
    s = stack_factory(GROUPS)
    with taken_port() as t:
        port = t.getsockname()[1]
        line = one_line(run(s, "worker", "--group", "g", "--metrics", f"127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in line and "already in use" in line, line
    assert "--metrics HOST:PORT" in line, line


def test_worker_metrics_port_taken_from_the_config_names_the_setting(stack_factory: Callable[..., Stack],
                                                                      tmp_path: Path) -> None:
    with taken_port() as t:
        port = t.getsockname()[1]
        s = stack_factory(f'\n[groups.g]\ntopics = ["x"]\nplugins = []\nmetrics = "127.0.0.1:{port}"\n')
        line = one_line(run(s, "worker", "--group", "g"))
    assert f"127.0.0.1:{port}" in line and "[groups.g] metrics" in line and "--metrics" in line, line
