"""Run a plugin's hooks in-process, without a hub: for plugin authors' tests (and ours).

    from bucketwire.testing import PluginHarness
    with PluginHarness(my_plugin, settings={"sizes": [64]}, stores={"primary": store_cfg}) as h:
        follow_ons = h.handle(event)

It is the worker child's own code (`PluginRunner`): the same loading checks (unknown hooks, bad signatures),
`validate_settings`, `topics` filtering, per-plugin `ctx` and `ctx.state`, wrappers and tracing. What passes
here runs the same way in a pool. The pytest fixtures in `bucketwire.pytest_plugin` build these for you.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bucketwire.config import DEFAULT_MAX_EVENT_BYTES, StoreConfig
from bucketwire.context import Context, Stores
from bucketwire.envelope import Event
from bucketwire.worker.plugin_loading import HandlerFailed, PluginRunner, load, plugin_name


class PluginHarness:
    """One or more plugins, loaded as a worker child loads them.

    `settings` is the first plugin's `[plugins.NAME]` section (it may carry `topics`); `sections` gives the
    others' by name. `stores` maps store names to `StoreConfig`s (or is a ready `Stores`).
    """

    def __init__(
        self,
        plugin: Any,
        *more: Any,
        name: str | None = None,
        settings: Mapping[str, Any] | None = None,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        stores: Mapping[str, StoreConfig] | Stores | None = None,
        default_store: str | None = None,
        group: str = "test",
        trace: bool | None = None,
        max_event_bytes: int | None = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.name = name or plugin_name(plugin)
        objects = [(self.name, plugin)] + [(plugin_name(p), p) for p in more]
        loaded = load(entry_points=False, objects=objects)
        all_sections = {n: dict((sections or {}).get(n, {})) for n, _ in objects}
        all_sections[self.name] = dict(settings or {})
        if isinstance(stores, Stores):
            self.stores = stores
        else:
            cfgs = dict(stores or {})
            self.stores = Stores(cfgs, default_store or (next(iter(cfgs)) if len(cfgs) == 1 else None))
        self.runner = PluginRunner(loaded, all_sections, self.stores, group, trace=trace,
                                   max_event_bytes=max_event_bytes)
        self.group = group
        self.settings = self.runner.settings[self.name]
        self.log = logging.getLogger(f"bucketwire.plugin.{self.name}")

    @property
    def state(self) -> dict[str, Any]:
        """The first plugin's `ctx.state` (what its `worker_startup` put there)."""
        return self.runner.state[self.name]

    def context(self, event: Event | None = None, attempt: int = 1) -> Context:
        return self.runner.ctx(self.name, event, attempt)

    def start(self) -> PluginHarness:
        self.runner.startup()
        return self

    def stop(self) -> None:
        self.runner.shutdown()

    def handle(self, event: Event, attempt: int = 1) -> list[Event]:
        """Run `handle_event` as a worker would; return the follow-on events published.

        The plugin's exception propagates as itself (a worker would report it to the hub); a plugin whose
        `topics` do not include `event.topic` is not called.
        """
        try:
            return self.runner.run(event, attempt)
        except HandlerFailed as f:
            raise f.error from None

    def __enter__(self) -> PluginHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
