"""A test plugin whose `handle_event` takes only `event` (pluggy lets an implementation take a subset of the
spec's arguments). It appends the event's seq to the file named by the event's `subset` data field."""

from __future__ import annotations

from bucketwire import Event, hookimpl

PLUGIN_NAME = "subset"


@hookimpl
def handle_event(event: Event) -> None:
    d = event.data if isinstance(event.data, dict) else {}
    if d.get("subset"):
        with open(d["subset"], "a") as f:
            f.write(f"{event.seq}\n")
