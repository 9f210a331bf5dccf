"""Process plumbing shared by the long-running commands (hub, worker pool and children, dev, sources, bench)."""

from __future__ import annotations

import signal
import socket
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
