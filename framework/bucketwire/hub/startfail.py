"""Pools whose children cannot start, as their supervisors report them (STARTFAIL): shown by `status`.

A plugin's `worker_startup` that raises (a database not up yet) ends its child before the child ever joins the
hub, and the pool restarts it with backoff. To the hub such a group looked like one nobody runs: `status` said
"no workers: start `bucketwire worker ...`" while a pool was running and failing, and only that pool's log said
why. Its supervisor now reports each failure, and the start that ends them, to every hub it knows; a report not
renewed within STALE seconds (the pool stopped, or its host went away) is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bucketwire import protocol as P

STALE = 90.0
"""Seconds a report is shown without a new one: past the longest restart wait (30 s) twice, with room."""
MAX_REPORTS = 256
"""Reports held at most: each is a peer's claim, so memory for them is bounded (the oldest goes first)."""


@dataclass
class Report:
    plugin: str
    line: str
    count: int
    retry_in: float
    at: float  # time.monotonic() of the last report


class FailingStarts:
    def __init__(self) -> None:
        self.reports: dict[tuple[str, str, int], Report] = {}

    def report(self, sf: P.StartFail, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = (sf.g, sf.host, sf.pid)
        if sf.count == 0:
            self.reports.pop(key, None)
            return
        self.reports.pop(key, None)  # re-inserted last: the oldest report is the first to go when full
        if len(self.reports) >= MAX_REPORTS:
            del self.reports[next(iter(self.reports))]
        self.reports[key] = Report(sf.plugin, sf.line, sf.count, sf.retry_in, now)

    def status(self, now: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """Per group, its pools that cannot start their children (none: {})."""
        now = time.monotonic() if now is None else now
        for key in [k for k, r in self.reports.items() if now - r.at > STALE]:
            del self.reports[key]
        out: dict[str, list[dict[str, Any]]] = {}
        for (group, host, pid), r in self.reports.items():
            out.setdefault(group, []).append({
                "host": host, "pid": pid, "plugin": r.plugin, "line": r.line, "count": r.count,
                "retry_in": round(max(0.0, r.retry_in - (now - r.at)), 1), "age": round(now - r.at, 1)})
        return out
