"""The hooks a bucketwire plugin can implement.

A plugin is a module (or object) with functions decorated by `bucketwire.hookimpl`, registered under the
`bucketwire` entry-point group or loaded with `bucketwire worker --plugin MODULE`. Every hook below is called
per plugin, with a `ctx` whose `settings` is that plugin's own `[plugins.NAME]` section, so a plugin never sees
another plugin's configuration.

Hooks are called by pluggy's rules (argument subsets, `wrapper=True`/`hookwrapper=True`, tryfirst/trylast), once
per plugin, so a wrapper wraps each plugin's call. docs/plugins.md documents each hook under a heading with its
exact signature; `tests/test_hookspecs.py` fails when one is missing or when no test plugin implements a hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from bucketwire.context import Context
    from bucketwire.envelope import Event

PROJECT = "bucketwire"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def validate_settings(settings: dict[str, Any]) -> dict[str, Any] | None:
    """Check this plugin's `[plugins.NAME]` section when a worker starts, before any event is taken.

    Raise `bucketwire.ConfigError` (or `ValueError`) naming the bad key; the worker stops with that one line.
    Return a dict to replace the settings with normalised values (defaults filled in), or None to keep them::

        @hookimpl
        def validate_settings(settings):
            sizes = settings.get("sizes", [256])
            if not all(isinstance(s, int) and s > 0 for s in sizes):
                raise ConfigError("sizes: expected a list of positive integers, e.g. sizes = [256, 1024]")
            return {**settings, "sizes": sizes}
    """


@hookspec
def worker_startup(ctx: Context) -> None:
    """Called once in each worker child process after settings are validated and before the first event.

    Open long-lived resources here and keep them in `ctx.state` (this plugin's own dict in this process, the
    same one every later hook call sees); `ctx.event` is None. Raising stops this worker child::

        @hookimpl
        def worker_startup(ctx):
            ctx.state["log"] = open(ctx.settings["path"], "a")
    """


@hookspec
def worker_shutdown(ctx: Context) -> None:
    """Called once in each worker child as it stops (drain on SIGTERM), after the last event.

    Flush and close what `worker_startup` opened::

        @hookimpl
        def worker_shutdown(ctx):
            ctx.state.pop("log").close()
    """


@hookspec
def handle_event(event: Event, ctx: Context) -> None:
    """Do the work for one event. Called for every event of the topics this plugin's group consumes.

    Return normally to acknowledge; raise to fail (the hub retries with backoff, then dead-letters with the
    error); raise `bucketwire.Retry(delay=SECONDS)` to be retried no sooner than that; raise
    `bucketwire.PermanentError` to dead-letter at once. Events may be delivered more than once, so make the
    work idempotent. Publish follow-on events with `ctx.publish`; they are committed together with this
    event's acknowledgement and never twice::

        @hookimpl
        def handle_event(event, ctx):
            if event.is_object_created and event.key.endswith(".csv"):
                resp = ctx.store().get_object(event.bucket, event.key)
                try:
                    rows = resp.read().count(b"\\n")
                finally:
                    resp.close()
                    resp.release_conn()
                ctx.publish("csv-counted", {"bucket": event.bucket, "key": event.key, "rows": rows})
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the `bucketwire` CLI (the same pattern as llm and datasette)::

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello")
    """


HOOKS = ("validate_settings", "worker_startup", "worker_shutdown", "handle_event", "register_commands")
"""Every hook, in the order a worker meets them (register_commands belongs to the CLI)."""
