"""A test plugin: writes each event it handles back out as an envelope (`Event.to_json`), one per line, to the
file settings["path"], so a test can compare what handlers saw with what the hub committed, byte for byte."""

from __future__ import annotations

import os

from bucketwire import Context, Event, hookimpl

PLUGIN_NAME = "envelopes"


@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    fd = os.open(ctx.settings["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, event.to_json() + b"\n")
    finally:
        os.close(fd)
