"""A test plugin with a misspelled hook: the worker must refuse it at start, not silently never call it."""

from __future__ import annotations

from bucketwire import Event, hookimpl

PLUGIN_NAME = "typo"


@hookimpl
def handle_events(event: Event) -> None:
    raise AssertionError("never called")
