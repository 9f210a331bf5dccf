"""The bench's handler: does nothing but note when each event arrived, against its intended send time."""

from __future__ import annotations

import os
import time

from bucketwire import Context, Event, hookimpl

PLUGIN_NAME = "bench-noop"
_rows: list[str] = []


def _flush(path: str) -> None:
    if _rows:
        with open(path, "a") as f:
            f.write("".join(_rows))
        _rows.clear()


@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    now = time.monotonic()
    d = event.data
    _rows.append(f"{d['i']} {d['t']:.9f} {now:.9f}\n")
    if len(_rows) >= 2000:
        _flush(f"{ctx.settings['out']}.{os.getpid()}")


@hookimpl
def worker_shutdown(ctx: Context) -> None:
    _flush(f"{ctx.settings['out']}.{os.getpid()}")
