"""`[[routes]]`: which topic an incoming object event belongs to. First match wins.

Unmatched events go to `[hub] default_topic` when set; otherwise they are answered 2xx (MinIO's queue would
stall behind a rejected event) and counted as unrouted, so a missing route shows up in metrics, not as loss
of the whole queue.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from bucketwire.config import Route
from bucketwire.envelope import Event


class Router:
    def __init__(self, routes: list[Route], default_topic: str | None = None) -> None:
        self.routes = routes
        self.default_topic = default_topic

    @staticmethod
    def matches(route: Route, event: Event) -> bool:
        return Router.match(route, event.type, event.data)

    @staticmethod
    def match(route: Route, typ: str, data: object) -> bool:
        """`matches` for an event not read into an `Event` (the hub's PUB path): its type and data."""
        if not any(fnmatchcase(typ, pat) for pat in route.events):
            return False
        bucket, key = (data.get("bucket"), data.get("key")) if isinstance(data, dict) else (None, None)
        if route.bucket is not None and not (bucket is not None and fnmatchcase(bucket, route.bucket)):
            return False
        if route.prefix and not (key is not None and key.startswith(route.prefix)):
            return False
        return not (route.suffix and not (key is not None and key.endswith(route.suffix)))

    def topic_for(self, event: Event) -> str | None:
        return self.topic_of(event.type, event.data)

    def topic_of(self, typ: str, data: object) -> str | None:
        """`topic_for` from an event's type and data."""
        for r in self.routes:
            if self.match(r, typ, data):
                return r.topic
        return self.default_topic
