"""Finding, loading and calling plugins.

Hooks are called per plugin rather than through one pluggy broadcast, because each plugin gets its own
settings in `ctx` and its own failure accounting: one plugin raising must name that plugin in the error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from bucketwire import hookspecs
from bucketwire.config import ConfigError

ENTRY_POINT_GROUP = "bucketwire"


def make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _import_local(spec: str) -> Any:
    """`--plugin` accepts a module name (`my_plugin`, `pkg.mod`) or a path to a .py file."""
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise ConfigError(f"--plugin {spec}: no such file")
        name = f"bucketwire_local_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError(f"--plugin {spec}: cannot load as a Python module")
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = mod
        mod_spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise ConfigError(f"--plugin {spec}: cannot import ({e}); is it installed or on PYTHONPATH?") from None


def local_name(spec: str, mod: Any) -> str:
    name = getattr(mod, "PLUGIN_NAME", None)
    if isinstance(name, str) and name:
        return name
    return Path(spec).stem if spec.endswith(".py") else spec.rsplit(".", 1)[-1]


def discover() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plugins by entry-point name (bundled ones are registered the same way)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


@dataclass
class Loaded:
    pm: pluggy.PluginManager
    names: list[str]

    def impls(self, hook: str) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin name, function) in the order pluggy itself would call them."""
        caller = getattr(self.pm.hook, hook)
        return [(i.plugin_name, i.function) for i in reversed(caller.get_hookimpls())]


def load(allow: Iterable[str] | None = None, local: Iterable[str] = (), *, entry_points: bool = True) -> Loaded:
    """Register installed plugins (filtered by `allow`, when given) and local `--plugin` modules."""
    pm = make_manager()
    allowed = None if allow is None else list(allow)
    found = discover() if entry_points else {}
    if allowed is not None:
        missing = [n for n in allowed if n not in found]
        if missing:
            have = ", ".join(sorted(found)) or "none"
            raise ConfigError(
                f"plugin {missing[0]!r} is named in the config but not installed (installed: {have}); "
                "pip install it or load it with --plugin MODULE"
            )
    names: list[str] = []
    for name, ep in sorted(found.items()):
        if allowed is not None and name not in allowed:
            continue
        try:
            mod = ep.load()
        except Exception as e:  # a broken third-party plugin must not take the worker down silently
            raise ConfigError(f"plugin {name!r} ({ep.value}) failed to import: {e}") from None
        pm.register(mod, name=name)
        names.append(name)
    for spec in local:
        mod = _import_local(spec)
        name = local_name(spec, mod)
        if pm.get_plugin(name) is not None:
            raise ConfigError(f"--plugin {spec}: a plugin named {name!r} is already loaded")
        pm.register(mod, name=name)
        names.append(name)
    return Loaded(pm, names)


def validate_settings(loaded: Loaded, sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each plugin's settings after its own `validate_settings` hook; errors name the plugin and key."""
    out = {name: dict(sections.get(name, {})) for name in loaded.names}
    for name, fn in loaded.impls("validate_settings"):
        try:
            res = fn(settings=out[name])
        except ConfigError as e:
            raise ConfigError(f"[plugins.{name}] {e}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"[plugins.{name}] {e}") from None
        if res is not None:
            if not isinstance(res, dict):
                raise ConfigError(f"plugin {name!r}: validate_settings must return a dict or None")
            out[name] = res
    return out
