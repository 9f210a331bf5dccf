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


def string_list(value: Any, key: str, what: str, example: str = "photos") -> list[str]:
    """A list of non-empty strings, one string taken as a list of one: the rule the config itself follows
    (`topics = "photos"` is `["photos"]`), so a plugin's settings read like the rest of the file. `what` names
    the items for the error line (`"bucket names"`), `example` one of them::

        s["buckets"] = None if s["buckets"] is None else string_list(s["buckets"], "buckets", "bucket names")
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
        raise ConfigError(f'{key}: expected a list of {what} (one may be given as a string), e.g. {key} = '
                          f'["{example}"] or {key} = "{example}"; got {value!r}')
    return list(items)
