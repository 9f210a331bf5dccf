"""Warnings a peer causes at will are rate-limited per peer, so no admitted key can fill the disk with them."""

from __future__ import annotations

import logging

from bucketwire.logs import INFO_BURSTS, PEER_WINDOW, PeerRateLimit


def _records(flt: PeerRateLimit, n: int, **extra: str) -> list[logging.LogRecord]:
    out = []
    for _ in range(n):
        r = logging.LogRecord("bucketwire.hub", logging.WARNING, "", 0, "publish refused by role", (), None)
        r.__dict__.update(extra)
        if flt.filter(r):
            out.append(r)
    return out


def test_a_peers_repeated_warning_is_one_line_per_window_then_says_how_many_were_left_out() -> None:
    now = [1000.0]
    flt = PeerRateLimit(clock=lambda: now[0])
    assert len(_records(flt, 500, key="limited")) == 1
    assert len(_records(flt, 3, key="other")) == 1, "another key has its own line"
    now[0] += PEER_WINDOW
    [r] = _records(flt, 10, key="limited")
    assert r.suppressed == 499  # type: ignore[attr-defined]
    # what no peer chose (no key, no ingress) and other levels are never held back
    assert len(_records(flt, 5)) == 5
    info = logging.LogRecord("bucketwire.hub", logging.INFO, "", 0, "publish refused by role", (), None)
    info.key = "limited"
    assert flt.filter(info)


def test_joins_and_departures_are_logged_whole_up_to_a_burst_per_group_then_held_back() -> None:
    """A pool starting (a "worker joined" per child) is logged line by line; a READY/BYE loop is not, and the next
    line after the window says how many were left out. Other info lines are never held back."""
    now = [1000.0]
    flt = PeerRateLimit(clock=lambda: now[0])

    def info(msg: str, n: int, **extra: str) -> list[logging.LogRecord]:
        out = []
        for _ in range(n):
            r = logging.LogRecord("bucketwire.hub", logging.INFO, "", 0, msg, (), None)
            r.__dict__.update(extra)
            if flt.filter(r):
                out.append(r)
        return out

    burst = INFO_BURSTS["worker joined"]
    assert len(info("worker joined", burst, group="g")) == burst
    assert info("worker joined", 500, group="g") == []
    assert len(info("worker joined", 3, group="h")) == 3, "another group has its own burst"
    assert len(info("worker left", 5, group="g")) == 5, "each message has its own"
    assert len(info("dispatching group", 500, group="g")) == 500
    now[0] += PEER_WINDOW
    first, *rest = info("worker joined", 2, group="g")
    assert first.suppressed == 500 and len(rest) == 1  # type: ignore[attr-defined]
    assert not hasattr(rest[0], "suppressed")
