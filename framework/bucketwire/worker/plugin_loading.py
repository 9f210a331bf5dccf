"""Finding, loading and calling plugins, by pluggy's rules.

Each plugin gets its own `ctx` (its own settings and state) and its own failure accounting, so a hook is not
one pluggy broadcast: for every plugin with an implementation we call a pluggy hook caller that holds that
implementation plus every wrapper of the hook (`PluginManager.subset_hook_caller`). pluggy does the rest as it
does for pytest: argument subsets, `wrapper=True`/`hookwrapper=True` around each call, tryfirst/trylast
ordering, and call monitoring for tracing. The worker child and `bucketwire.testing.PluginHarness` both go
through `PluginRunner`, so a plugin that passes its harness tests runs the same way in a pool.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from bucketwire import hookspecs
from bucketwire.config import ConfigError
from bucketwire.context import (
    FOLLOW_ONS_MAX,
    PUBLISHING,
    Context,
    FollowOnTooLarge,
    PermanentError,
    PublishOutsideHandler,
    Retry,
    Stores,
    changed_follow_on,
    measured_again,
    too_many_follow_ons,
)
from bucketwire.envelope import Event

ENTRY_POINT_GROUP = "bucketwire"
TRACE_ENV = "BUCKETWIRE_TRACE_PLUGINS"
PER_PLUGIN_HOOKS = ("validate_settings", "worker_startup", "worker_shutdown", "handle_event", "register_commands")

trace_log = logging.getLogger("bucketwire.trace")


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
        try:
            mod_spec.loader.exec_module(mod)
        except PLUGIN_FAILURES as e:
            sys.modules.pop(name, None)
            raise ConfigError(f"--plugin {spec}: importing it failed: {_import_failure(e, str(path))}") from None
        return mod
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name is not None and spec != e.name and not spec.startswith(e.name + "."):
            raise ConfigError(f"--plugin {spec}: importing it failed: {_import_failure(e, None)}") from None
        installed = discover().get(spec)
        if installed is not None:  # the name `bucketwire plugins` lists, not a module: say which module it is
            raise ConfigError(
                f"--plugin {spec}: that is the name of an installed plugin, and --plugin takes a module or a .py "
                f"file; a group runs it with plugins = [\"{spec}\"] in its [groups.NAME] section, and a group "
                f"not in the config with --plugin {installed.module}") from None
        here = Path(spec.replace(".", "/") + ".py")
        hint = (f"{here} is in the current directory, which is not on the module path: pass --plugin {here}"
                if here.is_file() else "is it installed or on PYTHONPATH?")
        raise ConfigError(f"--plugin {spec}: cannot import ({e}); {hint}") from None
    except PLUGIN_FAILURES as e:
        raise ConfigError(f"--plugin {spec}: importing it failed: {_import_failure(e, None)}") from None


PLUGIN_FAILURES = (Exception, SystemExit, GeneratorExit)
"""What plugin code raises outside a handler (importing it, `validate_settings`, `worker_shutdown`) that is its
failure: a module or hook calling sys.exit() ended the command silently (exit code 0 for sys.exit(0)), or skipped
the other plugins' worker_shutdown. Not KeyboardInterrupt: that is the user's Ctrl-C (in a command, or a test
using the harness), and stays one."""


_forks = [0]
"""How many os.fork()s made this process from the one that imported this module: each forked copy counts one more
(subprocess's children never run Python again, and do not count). A hook call that starts at one count and
returns at another returned in a copy its plugin forked."""
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


def end_if_forked(plugin: str, hook: str, forks: int) -> None:
    """End a copy of this process that plugin code forked and that has come back out of the plugin (an os.fork()
    for background work whose os._exit() was forgotten); `forks`: the count (`_forks`) as the hook was called.
    Going on, it ran the framework's loop in two processes: the rest of a worker child's batch was handled a
    second time, and the copy lived on for good, outliving its pool (it never hears the pool's stop). A process
    forked before the call (multiprocessing's fork start method running a harness) is not one: it runs its own
    hooks. One list read when nothing forked."""
    if _forks[0] == forks:
        return
    logging.getLogger("bucketwire.worker").error(
        f"plugin {plugin!r}: a process its {hook} forked (os.fork(), pid {os.getpid()}) returned from the hook and "
        "would go on as a second copy of this one; it ends here. End a forked process with os._exit() when its "
        "work is done, or use subprocess or multiprocessing")
    logging.shutdown()
    os._exit(0)


def _import_failure(e: BaseException, path: str | None) -> str:
    """What a plugin's module raised while it was imported, and where: one line, since the frames above it
    (importlib's, click's, ours) say nothing to its author. `path` narrows the line to the plugin's own file."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "importlib" not in f.filename]
    if path is not None:
        frames = [f for f in frames if f.filename == path] or frames
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def local_name(spec: str, mod: Any) -> str:
    name = getattr(mod, "PLUGIN_NAME", None)
    if isinstance(name, str) and name:
        return name
    return Path(spec).stem if spec.endswith(".py") else spec.rsplit(".", 1)[-1]


def plugin_name(plugin: Any) -> str:
    """The name a plugin object is registered under when none is given: `PLUGIN_NAME`, else its module's last part."""
    name = getattr(plugin, "PLUGIN_NAME", None)
    if isinstance(name, str) and name:
        return name
    return str(getattr(plugin, "__name__", type(plugin).__name__)).rsplit(".", 1)[-1]


def discover() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plugins by entry-point name (bundled ones are registered the same way)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _is_wrapper(impl: pluggy.HookImpl) -> bool:
    return bool(impl.wrapper or impl.hookwrapper)


HookCall = tuple[pluggy.HookCaller, Callable[..., Any], str, list[pluggy.HookImpl]]
"""A plugin's `handle_event` caller, and what calling it by keyword hands pluggy's hook execution, worked out
once (`handle_event_call`): pluggy's `_hookexec`, the hook's name, and the implementations the caller holds."""


def handle_event_call(caller: pluggy.HookCaller) -> HookCall:
    """`caller(event=..., ctx=...)` without the part of it that is the same on every call, for the worker's hot
    path: what `HookCaller.__call__` works out before it hands the call to pluggy's hook execution (no historic
    hook, no argument defaults, both arguments given, not `firstresult`: the hookspec's facts), and, for the
    subset caller each plugin has (`Loaded.callers`), the list of its implementations, filtered anew on each
    call. Then every call is pluggy's own `_multicall` (and its tracing, `enable_tracing`) over the same
    implementations with the same arguments: the same wrappers, order and results; ~1 us per event less.

    The implementations are taken once: every plugin is registered by `load`, before a runner exists. With a
    pluggy whose callers lack what this reads, or a hookspec for which the shortcut would not be the same call,
    the caller itself is called."""
    spec = caller.spec
    try:
        direct = (spec is not None and not caller.is_historic() and not spec.kwargdefaults
                  and not spec.opts.get("firstresult") and sorted(spec.argnames) == ["ctx", "event"])
        if direct:
            return caller, caller._hookexec, caller.name, list(caller._hookimpls)
    except AttributeError:
        pass
    return caller, lambda _name, _impls, kwargs, _first: caller(**kwargs), caller.name, []


@dataclass
class Loaded:
    pm: pluggy.PluginManager
    names: list[str]
    _callers: dict[str, list[tuple[str, pluggy.HookCaller]]] = field(default_factory=dict)

    def callers(self, hook: str) -> list[tuple[str, pluggy.HookCaller]]:
        """(plugin name, hook caller) for each plugin that implements `hook`, in pluggy's call order.

        Each caller holds that plugin's implementations and every wrapper of the hook, so a wrapper runs around
        each plugin's call, and the caller is called with that plugin's own arguments (its `ctx`). One per plugin,
        however many implementations it has (pluggy takes several, `specname`): a caller per implementation,
        each holding all of them, ran each implementation once per implementation, so a plugin with two
        `handle_event`s did every event's work twice and its `worker_startup`s opened everything twice.
        """
        got = self._callers.get(hook)
        if got is None:
            caller: pluggy.HookCaller = getattr(self.pm.hook, hook)
            plain = dict.fromkeys(i.plugin_name for i in reversed(caller.get_hookimpls()) if not _is_wrapper(i))
            got = [(name, self.caller_without(hook, name, ())) for name in plain]
            self._callers[hook] = got
        return got

    def caller_without(self, hook: str, name: str, wrappers: Sequence[str]) -> pluggy.HookCaller:
        """Plugin `name`'s caller of `hook` (see `callers`) without the named wrappers: those whose own `topics`
        leave out the event at hand (`PluginRunner.run`)."""
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook)
        drop = [i.plugin for i in caller.get_hookimpls()
                if (i.plugin_name != name and not _is_wrapper(i)) or i.plugin_name in wrappers]
        return self.pm.subset_hook_caller(hook, drop)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, what: str, by: dict[str, str]) -> None:
    """Register with one-line errors: pluggy's own exceptions carry a repr of the module and a traceback.

    `by` maps each name registered so far to what loaded it (`installed: MODULE`, `--plugin SPEC`, `harness`), so
    a clash names the other side: two `--plugin` files with one PLUGIN_NAME were refused as 'already loaded
    (installed)', which sent their author looking for an installed plugin that was not there."""
    holder = pm.get_name(plugin) if pm.is_registered(plugin) else None
    if holder is not None:
        if by.get(holder) == what:
            raise ConfigError(f"{what} is given twice; give it once")
        if by.get(holder) == "harness":
            raise ConfigError(f"{what}: this plugin is given to the harness twice; give it once")
        raise ConfigError(
            f"{what}: this module is already loaded as the installed plugin {holder!r}; drop {what} "
            f"(installed plugins load by themselves), or list the plugins a group runs with "
            f"[groups.NAME] plugins = [...]"
        )
    other = by.get(name)
    if other is not None or pm.get_plugin(name) is not None:
        if other == what:  # a .py file given twice is imported twice, as two modules
            raise ConfigError(f"{what} is given twice; give it once")
        if other == "harness":
            raise ConfigError(f"{what}: two plugins given to the harness are named {name!r}; give one another "
                              "PLUGIN_NAME")
        if other is not None and other.startswith("--plugin "):
            raise ConfigError(f"{what}: its plugin name {name!r} is taken by {other}; give one of them another "
                              "PLUGIN_NAME")
        raise ConfigError(
            f"{what}: a plugin named {name!r} is already loaded ({other or 'installed'}); drop {what}, or give the "
            f"module another PLUGIN_NAME, or leave {name!r} out of [groups.NAME] plugins"
        )
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:
        why = _argument_mismatch(pm, plugin) or _wrapper_not_generator(pm, plugin) or _validation_line(e)
        raise ConfigError(f"plugin {name!r}: {why}") from None
    except ValueError as e:  # pluggy's duplicate checks, should a path above miss one
        raise ConfigError(f"{what}: {e}; load each plugin once") from None
    by[name] = what
    _check_marked(pm, plugin, name)


def _check_marked(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Refuse a function named like a hook that pluggy did not take as one: without `@hookimpl` (or with another
    project's marker) pluggy skips it without a word, and a worker running the plugin acked every event with
    nothing done. A plugin with no hook at all is the same mistake."""
    implemented = {c.name for c in pm.get_hookcallers(plugin) or []}
    for hook in hookspecs.HOOKS:
        if hook not in implemented and callable(getattr(plugin, hook, None)):
            raise ConfigError(f"plugin {name!r}: {hook} is not marked @hookimpl, so it would never be called; "
                              "put @hookimpl above it (from bucketwire import hookimpl)")
    if not implemented:
        raise ConfigError(f"plugin {name!r} implements no bucketwire hook; mark its hook functions with @hookimpl "
                          f"(from bucketwire import hookimpl); the hooks: {', '.join(hookspecs.HOOKS)}")


def _argument_mismatch(pm: pluggy.PluginManager, plugin: Any) -> str | None:
    """The implementation taking an argument its hook does not pass, said with the hook's own arguments (pluggy
    says only that the names "can not be found in the hookspec"); None when that is not what is wrong."""
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            continue
        fn = getattr(plugin, attr, None)
        hook = opts.get("specname") or attr
        spec = getattr(hookspecs, hook, None)
        if not callable(fn) or hook not in hookspecs.HOOKS or spec is None:
            continue
        try:
            have = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        takes = list(inspect.signature(spec).parameters)
        wrong = [a for a in have if a not in takes]
        if wrong:
            return (f"{attr}({', '.join(have)}): the hook has no argument {wrong[0]!r}; its arguments are "
                    f"{hook}({', '.join(takes)}), and an implementation takes any of them by name")
    return None


def _wrapper_not_generator(pm: pluggy.PluginManager, plugin: Any) -> str | None:
    """A wrapper that does not yield, said with how one is written (pluggy's text named the plugin twice and
    said only that the function is not a generator function); None when that is not what is wrong."""
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None or not (opts.get("wrapper") or opts.get("hookwrapper")) or (opts.get("wrapper")
                                                                                   and opts.get("hookwrapper")):
            continue
        fn = getattr(plugin, attr, None)
        option = "wrapper=True" if opts.get("wrapper") else "hookwrapper=True"
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            # an async generator does yield: "does not yield" sent its author looking for a missing yield
            return (f"{attr} is marked {option} but is an async def; pluggy runs a wrapper as a plain generator "
                    "(def, not async def) that yields once where the wrapped call runs (result = yield; return "
                    "result): run async code inside it with asyncio.run()")
        if not inspect.isgeneratorfunction(fn):
            return (f"{attr} is marked {option} but does not yield; a wrapper is a generator that yields once where "
                    "the wrapped call runs (result = yield; return result), see 'Wrappers' in docs/plugins.md")
    return None


_PLUGGY_DEF = re.compile(r"^Plugin .+ for hook '(?P<hook>[^']+)'\nhookimpl definition: (?P<name>\w+)\((?P<sig>.*)"
                        r"\)[^\n]*\n(?P<why>.+)$", re.S)


def _validation_line(e: pluggy.PluginValidationError) -> str:
    msg = str(e)
    # "Plugin 'x' for hook 'h'\nhookimpl definition: h(event: 'Event') -> None\n<why>": after our own "plugin 'x':"
    # prefix that named the plugin twice; keep the function, its argument names and what is wrong
    m = _PLUGGY_DEF.match(msg)
    if m is not None:
        args = re.findall(r"(?:^|,\s*)(\*{0,2}\w+)\s*(?=[:=,]|$)", m["sig"])  # names, not annotations
        msg = f"{m['name']}({', '.join(args)}): {m['why']}"
    if "\n" in msg:
        msg = " ".join(part.strip() for part in msg.splitlines() if part.strip())
    return msg


def check_hooks(loaded: Loaded) -> None:
    """Refuse implementations of hooks bucketwire does not have (a typo would otherwise never run), and
    per-plugin hooks that a plugin both implements and wraps (its wrapper could then wrap only itself)."""
    pm = loaded.pm
    known = sorted(n for n in vars(pm.hook) if not n.startswith("_"))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as pending:
        _refuse_unknown(loaded, known)
        raise ConfigError(_validation_line(pending)) from None
    # pluggy passes an unknown hook marked optionalhook=True, for a hookspec a later plugin may add; no plugin
    # adds bucketwire hooks, so it would never be called (a misspelt name loaded without a word).
    _refuse_unknown(loaded, known, optional=True)
    for hook in hookspecs.HOOKS:
        for i in getattr(pm.hook, hook).get_hookimpls():
            if not _is_wrapper(i):
                _check_runs(i, hook)
    for hook in PER_PLUGIN_HOOKS:
        impls = getattr(pm.hook, hook).get_hookimpls()
        wrapping = {i.plugin_name for i in impls if _is_wrapper(i)}
        for i in impls:
            if not _is_wrapper(i) and i.plugin_name in wrapping:
                raise ConfigError(f"plugin {i.plugin_name!r} both implements and wraps {hook!r}; move the wrapper "
                                  "into a plugin of its own")


def _refuse_unknown(loaded: Loaded, known: list[str], optional: bool = False) -> None:
    """One line for the first implementation of a name that is no bucketwire hook, with the closest hook."""
    pm = loaded.pm
    for name in loaded.names:
        for caller in pm.get_hookcallers(pm.get_plugin(name)) or []:
            if caller.has_spec() or optional != all(i.optionalhook for i in caller.get_hookimpls()):
                continue
            close = difflib.get_close_matches(caller.name, [k for k in known if getattr(pm.hook, k).has_spec()], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known hooks: " + ", ".join(hookspecs.HOOKS)
            if optional:
                hint += " (optionalhook=True does not change that: no plugin adds bucketwire hooks)"
            raise ConfigError(f"plugin {name!r} implements {caller.name!r}, which is not a bucketwire hook; "
                              f"{hint}") from None


def _check_runs(impl: pluggy.HookImpl, hook: str) -> None:
    """Refuse an implementation whose call returns without running its body: pluggy calls hooks and keeps what
    they return, so an `async def` handle_event would hand back an un-awaited coroutine and every event would be
    acked with its work never done (a generator's body, likewise, never runs)."""
    fn = impl.function
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(f"plugin {impl.plugin_name!r}: {hook} is a coroutine function (async def); bucketwire "
                          "calls hooks synchronously and would never run it; make it a plain def (call "
                          "asyncio.run() inside for async code)")
    if inspect.isgeneratorfunction(fn):
        raise ConfigError(f"plugin {impl.plugin_name!r}: {hook} is a generator function (it yields); bucketwire "
                          "calls hooks and does not iterate what they return, so it would never run; return "
                          "instead of yielding, or mark a wrapper @hookimpl(wrapper=True)")


def load(
    allow: Iterable[str] | None = None,
    local: Iterable[str] = (),
    *,
    entry_points: bool = True,
    objects: Sequence[tuple[str, Any]] = (),
    slow_after: float | None = None,
) -> Loaded:
    """Register installed plugins (filtered by `allow`, when given), local `--plugin` modules and `objects`
    (name, plugin) pairs; then check that every implementation is of a known hook. `slow_after`: an import still
    running after this many seconds is logged, and again each time as long again passes (a module that asks a
    server for something as it is imported, and waits: the pool said nothing at all, not even that it started)."""
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
    by: dict[str, str] = {}  # what loaded each name, for `_register`'s lines
    for name, ep in sorted(found.items()):
        if allowed is not None and name not in allowed:
            continue
        try:
            with _watch(f"plugin {name!r} ({ep.value})", slow_after):
                mod = ep.load()
        except PLUGIN_FAILURES as e:  # a broken third-party plugin must not take the worker down silently
            raise ConfigError(f"plugin {name!r} ({ep.value}) failed to import: {e}") from None
        _register(pm, mod, name, f"plugin {name!r}", by)
        by[name] = f"installed: {ep.value}"
        names.append(name)
    for spec in local:
        with _watch(f"--plugin {spec}", slow_after):
            mod = _import_local(spec)
        name = local_name(spec, mod)
        _register(pm, mod, name, f"--plugin {spec}", by)
        names.append(name)
    for name, obj in objects:
        _register(pm, obj, name, f"plugin {name!r}", by)
        by[name] = "harness"
        names.append(name)
    loaded = Loaded(pm, names)
    check_hooks(loaded)
    return loaded


def _missing_setting(name: str, e: KeyError, settings: Mapping[str, Any]) -> ConfigError | None:
    """The line for a KeyError that is a setting the section lacks (None for any other KeyError)."""
    key = e.args[0] if e.args else None
    if not isinstance(key, str) or key in settings:
        return None
    return ConfigError(f"[plugins.{name}] {key}: required, and missing; add {key} = ... to the [plugins.{name}] "
                       "section of the config")


def validate_settings(loaded: Loaded, sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each plugin's settings after its own `validate_settings` hook; errors name the plugin and key."""
    out = {name: dict(sections.get(name, {})) for name in loaded.names}
    for name, caller in loaded.callers("validate_settings"):
        try:
            results = caller(settings=out[name])
        except KeyError as e:  # `settings["path"]` on a section without it: str(e) would be just "'path'"
            raise _missing_setting(name, e, out[name]) or ConfigError(f"[plugins.{name}] {e}") from None
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"[plugins.{name}] {one_line(str(e))}") from None
        except PLUGIN_FAILURES as e:
            # An `assert` or any other exception: still the settings the operator must fix (the hook's only
            # input), so one line naming what was raised, not a traceback through pluggy at every start. A
            # sys.exit() ended the worker silently, with exit code 0 when it was sys.exit(0).
            raise ConfigError(f"[plugins.{name}] validate_settings raised {one_line(said_of(e))}; fix the "
                              f"[plugins.{name}] section") from None
        try:
            results = wrapped_result(results, caller, "validate_settings")
        except WrapperResult as e:
            raise ConfigError(str(e)) from None
        res = results[0] if results else None
        if res is not None:
            if not isinstance(res, dict):
                raise ConfigError(f"plugin {name!r}: validate_settings must return a dict (the settings, defaults "
                                  f"filled in) or None (to keep them); it returned {_a(type(res).__name__)}")
            out[name] = res
    return out


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def one_line(text: str) -> str:
    """A message of several lines as one, its lines joined with '; ': a settings class's error (pydantic's
    ValidationError: a header, then per field its name and what is wrong, each on a line of its own) was the
    worker's one-line error, four lines long."""
    if "\n" not in text:
        return text
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def said_of(e: BaseException) -> str:
    """`Type: text` of an exception, whose str() may itself fail (the type alone then)."""
    try:
        text = str(e)
    except Exception:
        text = ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def split_topics(sections: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]],
                                                                      dict[str, set[str] | None]]:
    """Take the framework's own `topics` key out of each plugin section: which topics a plugin sees."""
    rest: dict[str, dict[str, Any]] = {}
    topics: dict[str, set[str] | None] = {}
    for n, sec in sections.items():
        d = dict(sec)
        t = d.pop("topics", None)
        if t is not None and not isinstance(t, str) and not (isinstance(t, list) and all(isinstance(x, str)
                                                                                          for x in t)):
            # Read as no `topics` at all, `topics = 5` ran the plugin on every topic of its group, unsaid.
            raise ConfigError(f'[plugins.{n}] topics: expected a list of topic names, e.g. topics = ["photos"]; '
                              f"got {t!r}")
        topics[n] = set(t) if isinstance(t, list) else {t} if isinstance(t, str) else None
        rest[n] = d
    return rest, topics


def topics_missed(name: str, want: set[str] | None, group: str, topics: Sequence[str]) -> str | None:
    """The line for a plugin whose `topics` name none of its group's topics (it would never be called there)."""
    if want is None or want & set(topics):
        return None
    return (f"[plugins.{name}] topics = {sorted(want)}: none is a topic of group {group!r} ({', '.join(topics)}), "
            f"so the plugin would never be called there; correct the topic names, or take {name!r} out of the "
            "group's plugins")


_WRAPFAIL = re.compile(r"^wrap_controller at '[^']*' (.*):(\d+) (?:has second yield|did not yield)$")


def culprit(name: str, caller: pluggy.HookCaller, error: BaseException) -> str:
    """Who raised `error` out of plugin `name`'s call: a wrapper of the call that raised its own error (before or
    after its yield, or instead of the plugin's), or yielded twice, is named, not the plugin it wrapped, whose
    dead letter and failure count would otherwise carry the wrapper's bug. The innermost frame of a hook
    implementation in the traceback is who raised; pluggy's own "second yield" error names the wrapper's code."""
    if isinstance(error, WrapperResult):
        return error.wrapper
    impls = caller.get_hookimpls()
    if len(impls) < 2:
        return name
    codes = {getattr(i.function, "__code__", None): i.plugin_name for i in impls}
    found = None
    tb = error.__traceback__
    while tb is not None:
        who = codes.get(tb.tb_frame.f_code)
        if who is not None:
            found = who
        tb = tb.tb_next
    if found is not None:
        return found
    m = _WRAPFAIL.match(str(error)) if isinstance(error, RuntimeError) else None
    if m is not None:
        for code, who in codes.items():
            if code is not None and code.co_filename == m[1] and code.co_firstlineno == int(m[2]):
                return who
    return name


class HandlerFailed(Exception):
    """A plugin's `handle_event` raised `error`. The plugin is recorded here, never on the exception itself:
    some exception types (minio's `S3Error`) refuse new attributes."""

    def __init__(self, plugin: str, error: BaseException) -> None:
        super().__init__(plugin, error)
        self.plugin = plugin
        self.error = error

    @property
    def permanent(self) -> bool:
        return isinstance(self.error, PermanentError)

    @property
    def delay(self) -> float | None:
        return self.error.delay if isinstance(self.error, Retry) else None


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, Retry):
        return "retry"
    if isinstance(exc, PermanentError):
        return "permanent"
    return "error"


def enable_tracing(pm: pluggy.PluginManager) -> Callable[[], None]:
    """Log every hook call as one line, through pluggy's call monitoring. Returns the undo function."""
    started: list[float] = []

    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        started.append(time.perf_counter())

    def after(outcome: pluggy.Result[Any], hook_name: str, impls: Sequence[pluggy.HookImpl],
              kwargs: Mapping[str, Any]) -> None:
        dt = time.perf_counter() - started.pop()
        exc = outcome.exception
        event = kwargs.get("event")
        extra: dict[str, Any] = {
            "plugin": ",".join(dict.fromkeys(i.plugin_name for i in impls if not _is_wrapper(i))) or "-",
            "hook": hook_name,
            "event_id": event.id if isinstance(event, Event) else None,
            "duration_ms": round(dt * 1000, 3),
            "outcome": _outcome(exc),
        }
        wrappers = [i.plugin_name for i in impls if _is_wrapper(i)]
        if wrappers:
            extra["wrappers"] = ",".join(wrappers)
        if exc is not None:
            # traceback's formatting survives an exception whose str() fails; an f-string raised out of this
            # monitor, and the plugin's exception was replaced by that error
            extra["error"] = traceback.format_exception_only(type(exc), exc)[-1].strip()[:200]
        trace_log.info("hook call", extra=extra)

    return pm.add_hookcall_monitoring(before, after)


def tracing_requested() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class PluginRunner:
    """Loaded plugins with validated settings and per-plugin state: what a worker child runs events through.

    `on_handled(plugin, seconds, ok)` reports each plugin's call (the worker's per-plugin metrics).
    """

    def __init__(
        self,
        loaded: Loaded,
        sections: Mapping[str, Mapping[str, Any]],
        stores: Stores,
        group: str,
        *,
        on_handled: Callable[[str, float, bool], None] | None = None,
        trace: bool | None = None,
        max_event_bytes: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.max_event_bytes = max_event_bytes
        self.group = group
        self.stores = stores
        plain, self.topics = split_topics(sections)
        if trace if trace is not None else tracing_requested():
            enable_tracing(loaded.pm)
        self.settings = validate_settings(loaded, plain)
        # Taken now, of the settings as validated: a plugin may keep objects in `ctx.settings` once it runs (a lock,
        # a client), whose reprs differ per process, and the children of one pool then told the hub they were
        # configured differently.
        self._digest = _digest(self.settings)
        self.state: dict[str, dict[str, Any]] = {n: {} for n in loaded.names}
        self.loggers = {n: logging.getLogger(f"bucketwire.plugin.{n}") for n in loaded.names}
        self.handlers = loaded.callers("handle_event")
        # Per plugin, what its handle_event call needs, looked up once: the hot path builds a `ctx` and calls.
        self._handle = [(name, handle_event_call(caller), self.topics.get(name), self.settings[name],
                         self.loggers[name], self.state[name]) for name, caller in self.handlers]
        # A wrapper's own `topics` limit the calls it wraps: (plugin, topic) -> a caller without the wrappers that
        # leave that topic out. Empty (no such wrapper, the usual case), the hot path does not look.
        self._wrap_topics = {i.plugin_name: want for i in loaded.pm.hook.handle_event.get_hookimpls()
                             if _is_wrapper(i) and (want := self.topics.get(i.plugin_name)) is not None}
        self._topic_callers: dict[tuple[str, str | None], HookCall] = {}
        self.on_handled = on_handled
        self.failed_startup: str | None = None  # the plugin whose worker_startup raised (`startup`)

    def setup_digest(self) -> str:
        """A digest of every plugin's validated settings (never the settings themselves: they may hold secrets),
        so the hub can tell pools of one group that run the same plugins configured differently."""
        return self._digest

    def ctx(self, name: str, event: Event | None = None, attempt: int = 1) -> Context:
        return Context(name, self.group, self.settings[name], self.stores, self.loggers[name], event, attempt,
                       state=self.state[name], max_event_bytes=self.max_event_bytes)

    def startup(self, slow_after: float | None = None) -> None:
        """`worker_startup` for each plugin; the first failure stops this child (it could not do its work).

        A `ConfigError` is a mistake the user must fix (the pool stops with its line); anything else is raised
        as it is, its plugin named in `failed_startup`, so the supervisor says it and restarts the child with
        backoff. `slow_after`: a
        plugin's `worker_startup` still running after this many seconds is logged, and again each time as long
        again passes: the child takes no event until it returns, and nothing else would say why.

        When one fails, the plugins whose `worker_startup` already ran get their `worker_shutdown`, in reverse
        order, before this raises: what they opened (connections, files, threads) leaked at every restart.
        """
        started: list[str] = []
        try:
            self._startup(slow_after, started)
        except BaseException:
            self.shutdown(list(reversed(started)))
            raise

    def _startup(self, slow_after: float | None, started: list[str]) -> None:
        """`startup`'s loop; `started` gets each plugin whose `worker_startup` returned."""
        for name, caller in self.loaded.callers("worker_startup"):
            done = threading.Event()
            if slow_after:
                threading.Thread(target=_report_slow_startup, args=(name, slow_after, done),
                                 name="startup-watch", daemon=True).start()
            forks = _forks[0]
            try:
                returned = caller(ctx=self.ctx(name))
            except ConfigError as e:
                raise ConfigError(f"[plugins.{name}] {e}") from None
            except PublishOutsideHandler:
                # It raises at every start: restarting the child with backoff would loop for good.
                raise ConfigError(f"[plugins.{name}] worker_startup called ctx.publish(), which works only inside "
                                  "handle_event (a follow-on is committed with the ack of the event that caused "
                                  "it); publish from handle_event, or send other events with "
                                  "bucketwire.client.HubClient") from None
            except BaseException as e:
                # `ctx.settings["path"]` on a section without it is the user's config to fix, not a crash to
                # restart with backoff forever. A sys.exit() or KeyboardInterrupt is a failed startup like any
                # other: it left the child as its exit code (sys.exit(2) stopped the whole pool as a
                # configuration error, naming nothing).
                missing = _missing_setting(name, e, self.settings[name]) if isinstance(e, KeyError) else None
                if missing is not None:
                    raise missing from None
                # Said by the worker's supervisor, once for the pool (worker/startup_failures.py), or by the
                # harness raising it.
                self.failed_startup = name
                raise
            finally:
                done.set()
                end_if_forked(name, "worker_startup", forks)
            started.append(name)  # it ran: even one that returned an awaitable may have opened something
            try:
                no_awaitable(wrapped_result(returned, caller, "worker_startup"), "worker_startup")
            except WrapperResult as e:  # the wrapper's to fix, at every start: one line naming it
                raise ConfigError(str(e)) from None
            except TypeError as e:
                # What it should have opened is not open, and every event would meet that; the plugin's to fix.
                raise ConfigError(f"plugin {name!r}: {e}") from None

    def shutdown(self, only: list[str] | None = None) -> None:
        """`worker_shutdown` for each plugin; one failing does not keep the others from closing their resources.
        `only`: just these plugins, in this order (those a failed `startup` had started)."""
        callers = dict(self.loaded.callers("worker_shutdown"))
        names = list(callers) if only is None else [n for n in only if n in callers]
        for name in names:
            caller = callers[name]
            try:
                no_awaitable(wrapped_result(caller(ctx=self.ctx(name)), caller, "worker_shutdown"),
                             "worker_shutdown")
            except WrapperResult as e:  # the shutdown itself ran; a traceback through pluggy says nothing more
                logging.getLogger("bucketwire.worker").error(str(e), extra={"plugin": e.wrapper})
            except PLUGIN_FAILURES:  # a sys.exit() in one plugin's cleanup skipped every plugin's after it
                logging.getLogger("bucketwire.worker").exception("worker_shutdown failed", extra={"plugin": name})

    def wants(self, name: str, event: Event) -> bool:
        want = self.topics.get(name)
        return want is None or event.topic in want

    def _topic_caller(self, name: str, topic: str | None) -> HookCall:
        got = self._topic_callers.get((name, topic))
        if got is None:
            if len(self._topic_callers) >= 4096:  # topics are a group's few; a harness may send any
                self._topic_callers.clear()
            out = [w for w, want in self._wrap_topics.items() if topic not in want]
            got = self._topic_callers[(name, topic)] = handle_event_call(
                self.loaded.caller_without("handle_event", name, out))
        return got

    def run(self, event: Event, attempt: int) -> list[Event]:
        """Each plugin's `handle_event` in turn; their follow-ons, or `HandlerFailed` naming the failing plugin."""
        out: list[Event] = []
        size = 0
        report = self.on_handled
        group, stores, limit, topic = self.group, self.stores, self.max_event_bytes, event.topic
        forks, wrapped = _forks[0], bool(self._wrap_topics)
        for name, call, want, settings, logger, state in self._handle:
            if want is not None and topic not in want:
                continue
            caller, hookexec, hook, impls = self._topic_caller(name, topic) if wrapped else call
            # Positional: the hot path's one allocation per plugin, a third cheaper than by keyword.
            ctx = Context(name, group, settings, stores, logger, event, attempt, state, limit)
            # BaseException: a handler's sys.exit(), KeyboardInterrupt or GeneratorExit is its event's failure,
            # like any exception. Left to end the child, it cost the child's other events a redelivery, and a
            # sys.exit(2) read as the exit code of a configuration error stopped the whole pool. (A stop signal
            # raises nothing here: the child turns SIGTERM/SIGINT into a flag.)
            if report is None:
                try:
                    returned = hookexec(hook, impls, {"event": event, "ctx": ctx}, False)  # `caller(...)`
                    if returned:  # pluggy's list of what the calls returned: empty when they return None
                        no_awaitable(returned if type(returned) is list
                                     else wrapped_result(returned, caller, "handle_event"))
                except BaseException as e:
                    ctx.done = True
                    end_if_forked(name, "handle_event", forks)
                    raise HandlerFailed(culprit(name, caller, e), e) from e
            else:
                t0 = time.perf_counter()
                try:
                    returned = hookexec(hook, impls, {"event": event, "ctx": ctx}, False)  # `caller(...)`
                    if returned:
                        no_awaitable(returned if type(returned) is list
                                     else wrapped_result(returned, caller, "handle_event"))
                except BaseException as e:
                    ctx.done = True
                    end_if_forked(name, "handle_event", forks)
                    blamed = culprit(name, caller, e)
                    report(blamed, time.perf_counter() - t0, False)
                    raise HandlerFailed(blamed, e) from e
                report(name, time.perf_counter() - t0, True)
            ctx.done = True  # a publish from now on (a thread the handler left running) raises, not vanishes
            if PUBLISHING.locked():
                # A thread of the handler's may be inside ctx.publish, past its check of `done`: what it adds is
                # read below once it is out. Read before, it was added where nobody read it again, and lost while
                # ctx.publish said it was queued.
                with PUBLISHING:
                    pass
            if _forks[0] != forks:
                end_if_forked(name, "handle_event", forks)
            follow = ctx._follow
            if follow:
                for fo, fid in follow:
                    fo.id = fid  # exactly-once rests on it (see Context._follow)
                    changed = changed_follow_on(fo)
                    if changed is not None:
                        raise HandlerFailed(name, ValueError(changed))
                    try:
                        # what it takes now, not what ctx.publish measured: its data may have grown since
                        size += measured_again(fo, limit)
                    except ValueError as e:  # FollowOnTooLarge is one
                        raise HandlerFailed(name, e) from None
                out.extend(fo for fo, _ in follow)  # every plugin's follow-ons go in the one ACK result of this event
                if size > FOLLOW_ONS_MAX:
                    raise HandlerFailed(name, FollowOnTooLarge(too_many_follow_ons(len(out), size)))
        return out


def _digest(settings: Mapping[str, Mapping[str, Any]]) -> str:
    text = json.dumps({n: settings[n] for n in sorted(settings)}, sort_keys=True, default=_same_in_every_process)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same_in_every_process(o: object) -> str:
    """str() of a value JSON does not have, without the memory address a default repr holds (`<Client object at
    0x7f...>`): a validate_settings that returns an object must not make two processes' digests differ."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(o))


def no_awaitable(returned: list[Any], hook: str = "handle_event") -> None:
    """Raise for a hook that returned a coroutine (or another awaitable), a generator or an async generator: it
    called code that runs only when awaited or iterated and handed it back instead of running it, so acking the
    event (or going on after `worker_startup`) would take for done work that never ran (`async def` and yielding
    hooks are refused at start; this is the same mistake one call away). What else a hook returns is ignored."""
    for r in returned:
        if inspect.isawaitable(r) or inspect.isgenerator(r) or inspect.isasyncgen(r):
            close = getattr(r, "close", None)
            if (inspect.iscoroutine(r) or inspect.isgenerator(r)) and close is not None:
                close()  # no "coroutine was never awaited" warning on top of this failure
            kind = "generator" if inspect.isgenerator(r) or inspect.isasyncgen(r) else type(r).__name__
            fix = ("iterate it inside the hook (for _ in ...: pass, or list(...))" if inspect.isgenerator(r)
                   else "await it inside the hook (asyncio.run(...))")
            raise TypeError(f"{hook} returned {kind} {getattr(r, '__qualname__', '')!s}: the work it stands for "
                            f"never ran; {fix} and return None")


class WrapperResult(TypeError):
    """A wrapper of a hook made the result of the call it wrapped something else than that result (a list);
    `wrapper` names its plugin, who is to blame (`culprit`)."""

    def __init__(self, line: str, wrapper: str) -> None:
        super().__init__(line)
        self.wrapper = wrapper


def wrapped_result(returned: Any, caller: pluggy.HookCaller, hook: str) -> list[Any]:
    """`returned`, the result of a plugin's call of `hook`, checked to be what pluggy makes of the plugin's own
    implementations (a list of what they returned). A `wrapper=True` implementation returns the result of the
    call it wraps, and one that only yields (`yield` where `return (yield)` belongs, the commonest slip) made it
    None: around validate_settings the plugin's normalised settings were dropped without a word, around
    worker_startup the pool stopped with "plugin 'x': 'NoneType' object is not iterable", naming the plugin it
    wrapped for the wrapper's mistake. Raises `WrapperResult` naming the wrapper and the fix."""
    if type(returned) is list:
        return returned
    wrappers = [i for i in caller.get_hookimpls() if _is_wrapper(i)]
    if not wrappers:  # pluggy's own result is always a list; nothing to blame
        return list(returned) if isinstance(returned, list | tuple) else [returned]
    names = " or ".join(repr(n) for n in dict.fromkeys(i.plugin_name for i in wrappers))
    got = "None" if returned is None else _a(type(returned).__name__)
    if all(i.hookwrapper for i in wrappers):
        said = (f"plugin {names}: its hookwrapper of {hook} set the result of the call it wraps to {got} "
                "(outcome.force_result) instead of a list of what the implementations returned; leave the result "
                "as it is, or force a list")
    else:
        said = (f"plugin {names}: its wrapper=True implementation of {hook} returned {got} instead of the result "
                "of the call it wraps (a list of what the implementations returned); end it with "
                "`return (yield)`, or return the result its yield gave it")
    raise WrapperResult(said, wrappers[-1].plugin_name)


@contextlib.contextmanager
def _watch(what: str, every: float | None) -> Iterator[None]:
    """Log, every `every` seconds, that the import of `what` is still running (nothing when `every` is None)."""
    if not every:
        yield
        return
    done = threading.Event()
    threading.Thread(target=_report_slow_import, args=(what, every, done), name="import-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _report_slow_import(what: str, every: float, done: threading.Event) -> None:
    t0 = time.monotonic()
    while not done.wait(every):
        logging.getLogger("bucketwire.worker").warning(
            f"still importing {what}; this worker takes no events until the import returns (a module that asks a "
            "server for something as it is imported waits for it here: do that in worker_startup)",
            extra={"seconds": round(time.monotonic() - t0, 1)})


def _report_slow_startup(name: str, every: float, done: threading.Event) -> None:
    t0 = time.monotonic()
    while not done.wait(every):
        logging.getLogger("bucketwire.worker").warning(
            "worker_startup is still running; this worker child takes no events until it returns",
            extra={"plugin": name, "seconds": round(time.monotonic() - t0, 1)})
