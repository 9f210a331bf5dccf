"""A consumer group's backlog of large events is held in the hub's memory up to `[hub] group_buffer_mb`, not up to
10,000 events: measured on a real hub process (its RSS), with every event still handled exactly once."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable

from bucketwire import config as config_mod
from tests.fixtures_hub import Stack, wait_for

EVENTS = int(os.environ.get("BUCKETWIRE_BUFFER_TEST_EVENTS", "300"))
PAD = 700_000

GROUP = """
[groups.big]
topics = ["big"]
plugins = []
start = "earliest"
"""


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_backlog_of_large_events_is_bounded_in_bytes_and_handled_exactly_once(
        stack_factory: Callable[..., Stack]) -> None:
    """300 events of 700 KB for a group whose workers are not running yet, with a 4 MiB budget. Before the budget
    the hub loaded all 300 (+207 MB RSS); now it holds about five, reads the rest from the journal as they are
    acked, and peaks within a few tens of MB. Every event is handled once."""
    s = stack_factory(GROUP)
    text = s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n", "heartbeat_timeout = 1.5\ngroup_buffer_mb = 4\n")
    s.cfg_path.write_text(text)
    s.cfg = config_mod.load(s.cfg_path)
    assert s.cfg.hub.group_buffer_mb == 4
    s.start_hub()
    assert s.hub_proc is not None
    pid = s.hub_proc.pid
    pad = "x" * PAD
    with s.client(30) as c:
        c.publish("big", {"n": -1})  # warm up the publish path before the baseline
        base_rss = _status_kb(pid, "VmRSS")
        for n in range(EVENTS):
            c.publish("big", {"n": n, "pad": pad})
    backlog_mb = (_status_kb(pid, "VmRSS") - base_rss) // 1024
    g = s.status()["groups"]["big"]  # what status says the group holds: a few events, within the budget
    assert 0 < g["loaded_bytes"] <= 4 << 20 and 1 < g["loaded"] < 10, g
    s.start_worker("big", 2)
    wait_for(lambda: s.metric("bucketwire_acked_total", group="big") >= EVENTS + 1, 120, "every event acked")
    peak_mb = (_status_kb(pid, "VmHWM") - base_rss) // 1024
    print(f"hub RSS with the backlog: +{backlog_mb} MB; peak while draining: +{peak_mb} MB")
    handled = Counter((r["t"], r["s"]) for r in s.handled())
    assert len(handled) == EVENTS + 1 and set(handled.values()) == {1}, "every event handled exactly once"
    assert sorted(json.loads(json.dumps([r["data"]["n"] for r in s.handled()]))) == list(range(-1, EVENTS))
    assert backlog_mb < 60, f"the hub's RSS grew by {backlog_mb} MB holding a backlog of {EVENTS} large events"
    assert peak_mb < 80, f"the hub's peak RSS grew by {peak_mb} MB draining {EVENTS} large events"
