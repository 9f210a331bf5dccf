"""The hub's record of pools whose children cannot start (hub/startfail.py): what `status` shows of them."""

from __future__ import annotations

from bucketwire import protocol as P
from bucketwire.hub.startfail import MAX_REPORTS, STALE, FailingStarts


def sf(group: str = "g", pid: int = 1, count: int = 3) -> P.StartFail:
    return P.StartFail(g=group, host="h", pid=pid, plugin="db", line="ConnectionError: down", count=count,
                       retry_in=6.0)


def test_a_report_is_shown_until_the_pool_starts_or_stops_reporting() -> None:
    fs = FailingStarts()
    fs.report(sf(), now=100.0)
    assert fs.status(now=102.0) == {"g": [{"host": "h", "pid": 1, "plugin": "db", "line": "ConnectionError: down",
                                           "count": 3, "retry_in": 4.0, "age": 2.0}]}
    fs.report(sf(count=0), now=103.0)  # the pool's children started
    assert fs.status(now=103.0) == {}
    fs.report(sf(), now=200.0)
    assert fs.status(now=200.0 + STALE - 1)
    assert fs.status(now=200.0 + STALE + 1) == {}  # the pool stopped reporting (stopped, or its host is gone)


def test_reports_are_bounded_the_oldest_dropped_first() -> None:
    """Each report is a peer's claim: a key of the group sending them under ever new pids must not grow the hub."""
    fs = FailingStarts()
    for pid in range(MAX_REPORTS + 10):
        fs.report(sf(pid=pid), now=1.0)
    shown = fs.status(now=2.0)["g"]
    assert len(shown) == MAX_REPORTS and shown[0]["pid"] == 10
