"""Run a plugin's hooks in-process, without a hub: for plugin authors' unit tests (and ours).

    from bucketwire.testing import PluginHarness
    with PluginHarness(my_plugin, settings={"sizes": [64]}, stores={"primary": store_cfg}) as h:
        follow_ons = h.handle(event)

It goes through the same loading, validation and per-plugin context code as a real worker child.
"""

from __future__ import annotations

import logging
from typing import Any

from bucketwire.config import StoreConfig
from bucketwire.context import Context, Stores
from bucketwire.envelope import Event
from bucketwire.worker.plugin_loading import Loaded, make_manager, validate_settings


class PluginHarness:
    def __init__(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        settings: dict[str, Any] | None = None,
        stores: dict[str, StoreConfig] | Stores | None = None,
        default_store: str | None = None,
        group: str = "test",
    ) -> None:
        self.name = name or getattr(plugin, "PLUGIN_NAME", None) or plugin.__name__.rsplit(".", 1)[-1]
        pm = make_manager()
        pm.register(plugin, name=self.name)
        self.loaded = Loaded(pm, [self.name])
        self.settings = validate_settings(self.loaded, {self.name: settings or {}})[self.name]
        if isinstance(stores, Stores):
            self.stores = stores
        else:
            stores = stores or {}
            self.stores = Stores(stores, default_store or (next(iter(stores)) if len(stores) == 1 else None))
        self.group = group
        self.log = logging.getLogger(f"bucketwire.plugin.{self.name}")

    def context(self, event: Event | None = None, attempt: int = 1) -> Context:
        return Context(self.name, self.group, self.settings, self.stores, self.log, event, attempt)

    def _call(self, hook: str, **kw: Any) -> None:
        for _name, fn in self.loaded.impls(hook):
            fn(**kw)

    def start(self) -> PluginHarness:
        self._call("worker_startup", ctx=self.context())
        return self

    def stop(self) -> None:
        self._call("worker_shutdown", ctx=self.context())

    def handle(self, event: Event, attempt: int = 1) -> list[Event]:
        """Run `handle_event`; return the follow-on events it published. Exceptions propagate."""
        ctx = self.context(event, attempt)
        for _name, fn in self.loaded.impls("handle_event"):
            fn(event=event, ctx=ctx)
        return ctx.published

    def __enter__(self) -> PluginHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
