"""What the source commands share: config loading as one-line errors, and stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import click

from ..config import Config, ConfigError, load

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


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGINT/SIGTERM, so long-running commands end cleanly instead of with a traceback."""

    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
