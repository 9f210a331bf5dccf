"""A test plugin that implements every hook, writing what happened to a file."""

from __future__ import annotations

import os
import time

import click

from bucketwire import ConfigError, hookimpl

PLUGIN_NAME = "lifecycle"


def _log(ctx_or_settings, line: str) -> None:
    settings = getattr(ctx_or_settings, "settings", ctx_or_settings)
    with open(settings["path"], "a") as f:
        f.write(f"{os.getpid()} {line}\n")


@hookimpl
def validate_settings(settings):
    if not isinstance(settings.get("path"), str):
        raise ConfigError("path: required, a file to write lifecycle lines to")
    if settings.get("mode", "ok") not in ("ok", "loud"):
        raise ConfigError(f"mode: must be 'ok' or 'loud', got {settings['mode']!r}")
    return {**settings, "mode": settings.get("mode", "ok")}


@hookimpl
def worker_startup(ctx):
    _log(ctx, f"startup mode={ctx.settings['mode']}")
    hold = ctx.settings.get("hold")  # a file the test creates to let the startup finish (at most 60 s)
    end = time.monotonic() + 60
    while hold and not os.path.exists(hold) and time.monotonic() < end:
        time.sleep(0.02)  # pacing: polling for the test's release file, with a deadline


@hookimpl
def worker_shutdown(ctx):
    _log(ctx, "shutdown")


@hookimpl
def handle_event(event, ctx):
    _log(ctx, f"event {event.topic} {event.seq}")


@hookimpl
def register_commands(cli):
    @cli.command(name="lifecycle-hello")
    def hello():
        """Say hello from a plugin command."""
        click.echo("hello from a plugin")
