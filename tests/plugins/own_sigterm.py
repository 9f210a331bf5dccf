"""A test plugin that installs its own SIGTERM handler, the way a hurried author (or a library it calls) does to
"flush on shutdown". `sigterm` in its section: "flag" only notes that the signal came, "exit" calls sys.exit(0)
from the handler, "ignore" ignores the signal, "block" blocks it (pthread_sigmask); set in worker_startup. With
$OWN_SIGTERM_AT_IMPORT set to one of those, the module sets it as it is imported instead. It handles nothing."""

from __future__ import annotations

import os
import signal
import sys

from bucketwire import hookimpl

PLUGIN_NAME = "own_sigterm"
mode = "flag"


def on_term(signum, frame):
    if mode == "exit":
        sys.exit(0)


def install(how: str) -> None:
    global mode
    mode = how
    if how == "block":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN if how == "ignore" else on_term)


if os.environ.get("OWN_SIGTERM_AT_IMPORT"):
    install(os.environ["OWN_SIGTERM_AT_IMPORT"])


@hookimpl
def worker_startup(ctx):
    if ctx.settings.get("sigterm"):
        install(ctx.settings["sigterm"])


@hookimpl
def handle_event(event, ctx):
    pass
