"""What the source commands share: config loading as one-line errors, and stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import select
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from bucketwire.config import Config, ConfigError, load
from bucketwire.procutil import on_stop_signals

config_option = click.option(
    "-c", "--config", "config_path", envvar="BUCKETWIRE_CONFIG", type=click.Path(),
    help="TOML config file (or set BUCKETWIRE_CONFIG).",
)


def load_config(path: str | None) -> Config:
    """The config, or a ClickException with the config's own one-line message."""
    try:
        return load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None



def run_source(src: Any, close: Callable[[], None], name: str) -> None:
    """Run a source's `run()` in a thread until it ends or a signal stops it, then close its hub publisher.

    What the source cannot outwait (`SourceFailed`: a batch the hub refuses for good, a state file of another
    filer) ends the command with its reason in one line and exit status 1: a supervisor sees a source that cannot
    work, not one that looks alive and publishes nothing."""
    from bucketwire.sources import SourceFailed

    refused: list[SourceFailed] = []

    def run() -> None:
        try:
            src.run()
        except SourceFailed as e:
            refused.append(e)

    on_stop_signals(src.stop)
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.5)
    finally:
        src.stop()
        close()
    click.echo(f"stopped after publishing {src.published} event(s)", err=True)
    if refused:
        raise click.ClickException(str(refused[0]))


def reader_gone(e: BaseException) -> bool:
    """Whether `e` is our output's pipe closed by its reader (`bucketwire status | head -1` once head has its
    line), which click ends quietly, and not a broken socket to the hub, an error to say. The write end of a pipe
    with no reader polls POLLERR."""
    if not isinstance(e, BrokenPipeError):
        return False
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False
