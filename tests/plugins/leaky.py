"""A test plugin that leaks: each event it handles opens a file it never closes (a hurried author's `open()`
without `with`), in a child whose descriptor limit its worker_startup lowers to `headroom` above what the child
has open, so the child runs out within a few dozen events. It records each event it handled, as the recorder
does, and reaches the records file through a descriptor opened once, so only its leak uses up descriptors."""

from __future__ import annotations

import json
import os
import resource

from bucketwire import hookimpl

PLUGIN_NAME = "leaky"


@hookimpl
def worker_startup(ctx):
    ctx.state["out"] = os.open(ctx.settings["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    in_use = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + int(ctx.settings.get("headroom", 30)), hard))


@hookimpl
def handle_event(event, ctx):
    ctx.state.setdefault("leaked", []).append(open(os.devnull))  # noqa: SIM115 - the leak under test
    line = json.dumps({"pid": os.getpid(), "key": event.key, "a": ctx.attempt})
    os.write(ctx.state["out"], (line + "\n").encode())
