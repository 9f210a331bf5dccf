"""Warnings a peer causes at will are rate-limited per peer, so no admitted key can fill the disk with them."""

from __future__ import annotations

import logging

from bucketwire.logs import PEER_WINDOW, PeerRateLimit


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
