"""A test plugin whose handle_event is a coroutine function: pluggy calls hooks synchronously, so it would return
an un-awaited coroutine and every event would be acked without its work. The worker must refuse it at start."""

from __future__ import annotations

from bucketwire import Event, hookimpl

PLUGIN_NAME = "asyncy"


@hookimpl
async def handle_event(event: Event) -> None:
    raise AssertionError("never awaited")
