"""A test plugin that only wraps: a new-style (`wrapper=True`) and an old-style (`hookwrapper=True`) wrapper
around every `handle_event` of its group. Each writes `<style> <plugin> <seq> <outcome>` to the file named by the
event's `trace` data field (a wrapper sees the wrapped plugin's ctx, not its own settings)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from bucketwire import Context, Event, hookimpl

PLUGIN_NAME = "wrappers"


def _note(event: Event, line: str) -> None:
    d = event.data if isinstance(event.data, dict) else {}
    if d.get("trace"):
        with open(d["trace"], "a") as f:
            f.write(line + "\n")


@hookimpl(wrapper=True, specname="handle_event")
def new_style(event: Event, ctx: Context) -> Generator[None, Any, Any]:
    try:
        res = yield
    except Exception as e:
        _note(event, f"new {ctx.plugin} {event.seq} {type(e).__name__}")
        raise
    _note(event, f"new {ctx.plugin} {event.seq} ok")
    return res


@hookimpl(hookwrapper=True, specname="handle_event")
def old_style(event: Event, ctx: Context) -> Generator[None, Any, None]:
    outcome = yield
    _note(event, f"old {ctx.plugin} {event.seq} {'ok' if outcome.exception is None else 'error'}")
