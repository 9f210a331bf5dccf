"""bucketwire: object-storage events into work.

The public API for plugin authors is what this module exports; bundled plugins use nothing else.
"""

from bucketwire.config import ConfigError, StoreConfig
from bucketwire.context import Context, FollowOnTooLarge, PermanentError, PluginError, Retry, Stores
from bucketwire.envelope import SCHEMA_VERSION, EnvelopeError, Event, SchemaVersionError
from bucketwire.hookspecs import hookimpl
from bucketwire.plugin_settings import string_list, with_defaults

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "Context",
    "EnvelopeError",
    "Event",
    "FollowOnTooLarge",
    "PermanentError",
    "PluginError",
    "Retry",
    "SchemaVersionError",
    "StoreConfig",
    "Stores",
    "__version__",
    "hookimpl",
    "string_list",
    "with_defaults",
]
