"""Helpers for plugins' `validate_settings`: the checks every plugin would otherwise write again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bucketwire.config import ConfigError


def with_defaults(settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` over `defaults`; a key the plugin does not know is an error naming it and the known ones.

    Rejecting unknown keys turns a typo (`output_buket`) into a one-line error at worker start instead of a
    setting silently left at its default::

        @hookimpl
        def validate_settings(settings):
            s = with_defaults(settings, {"sizes": [256], "output_bucket": None})
    """
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown setting; known: {', '.join(sorted(defaults))}")
    return {**defaults, **settings}
