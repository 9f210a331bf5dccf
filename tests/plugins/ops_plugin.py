"""A test plugin for the operations tests: records what it handled (with extensions), and misbehaves per group.

Settings ([plugins.opsplug]): `path` (record file), `slow_groups` + `slow` (seconds to sleep per event in those
groups), `fail_flag` (while this file exists, events whose data has `"flaky": GROUP` fail in that group).
"""

from __future__ import annotations

import json
import os
import time

from bucketwire import hookimpl

PLUGIN_NAME = "opsplug"


@hookimpl
def handle_event(event, ctx):
    s = ctx.settings
    d = event.data if isinstance(event.data, dict) else {}
    if ctx.group in s.get("slow_groups", []):
        time.sleep(float(s.get("slow", 0.2)))  # pacing: simulated handler work
    flag = s.get("fail_flag")
    if d.get("flaky") == ctx.group and flag and os.path.exists(flag):
        raise RuntimeError("flaky: flag file present")
    line = json.dumps({"g": ctx.group, "t": event.topic, "s": event.seq, "id": event.id, "a": ctx.attempt,
                       "ext": event.extensions, "data": d})
    fd = os.open(s["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
