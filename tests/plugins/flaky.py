"""A test plugin that fails the ways real plugins do, steered by the event's data:

{"retry": S, "times": N}  raise Retry(delay=S) on the first N attempts (N defaults to every attempt), noting
                          each attempt's time in the file named by settings["path"];
{"get": KEY}              GET a missing key from the default store: minio raises S3Error (NoSuchKey);
{"frozen": true}          raise an exception type that refuses attribute assignment.
"""

from __future__ import annotations

import time
from typing import Any

from bucketwire import Context, Event, Retry, hookimpl

PLUGIN_NAME = "flaky"


class FrozenError(Exception):
    """Like minio's S3Error: setting an attribute on it raises."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")


@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    d = event.data if isinstance(event.data, dict) else {}
    if "retry" in d:
        with open(ctx.settings["path"], "a") as f:
            f.write(f"{event.seq} {ctx.attempt} {time.monotonic()}\n")
        if ctx.attempt <= d.get("times", 1 << 30):
            raise Retry(delay=d["retry"], reason="asked to wait")
    if "get" in d:
        resp = ctx.store().get_object(d["bucket"], d["get"])
        try:
            resp.read()
        finally:
            resp.close()
            resp.release_conn()
    if d.get("frozen"):
        raise FrozenError("frozen failure")
