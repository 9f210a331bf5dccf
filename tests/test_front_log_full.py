"""A real hub whose journal filled while a commit confirmed from the front log (hub/journal_front.py) waited to be
written into SQLite, killed, and started again on the still-full journal: the replayed events wait in memory
until SQLite takes them (docs/operations.md, "Disk full"). What must hold meanwhile and after: the group reads
them like any other event. It read SQLite alone, found no row at its read position below the head, took that for
a gap retention had made, and went back to the topic's first event: the same events loaded into its buffer again
and again (10,000 of 47), handed out twice once space returned, and a negative count of skipped events.

The full journal is SQLite's own page limit (`BUCKETWIRE_JOURNAL_MAX_PAGES`, as tests/test_ops.py); space returns
the way a running hub frees it, by its retention (`retention_mb` under the limit)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from typing import Any

from tests.fixtures_hub import wait_for

CFG = '\n[groups.g]\ntopics = ["big"]\nplugins = []\nstart = "earliest"\n'


def test_events_replayed_into_a_full_journal_are_read_once_and_handled_once_when_space_returns(
        stack_factory: Any) -> None:
    s = stack_factory(CFG)
    s.env["BUCKETWIRE_JOURNAL_MAX_PAGES"] = "60"  # a "disk" of 60 pages (240 KiB)
    s.start_hub()
    confirmed: list[str] = []
    for i in range(200):
        ev = {"specversion": "1.0", "id": f"e{i}", "source": "urn:full", "type": "t", "topic": "big",
              "data": {"blob": "x" * 3000}}
        code, _ = s.post("/events", json.dumps(ev).encode())
        if code != 200:
            break
        confirmed.append(f"e{i}")
    assert code == 503 and len(confirmed) > 10
    s.kill_hub()
    db = sqlite3.connect(f"file:{s.dir / 'state' / 'journal.db'}?mode=ro", uri=True)
    try:
        in_sqlite = db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()
    assert in_sqlite < len(confirmed), "the last confirmed event was in the front log only"

    s.cfg_path.write_text(s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                                         "heartbeat_timeout = 1.5\nretention_mb = 0.1\n"))
    s.hub_proc = s._spawn(["hub"], "hub")  # not start_hub: /healthz answers 503 until retention has made room
    wait_for(lambda: s.hub_proc.poll() is not None or s.status()["groups"]["g"]["topics"], 30, "the hub's status")

    def group() -> dict[str, Any]:
        g: dict[str, Any] = s.status()["groups"]["g"]
        return g

    g = group()
    assert g["loaded"] <= len(confirmed) and g["skipped_by_retention"] >= 0, g
    wait_for(s.healthy, 30, "/healthz 200 once retention made room and the replayed events were written")
    s.start_worker("g", 1)
    wait_for(lambda: group()["lag"] == 0, 30, "the group to catch up")
    g = group()
    handled = Counter(r["id"] for r in s.handled())
    assert max(handled.values()) == 1, [k for k, n in handled.items() if n > 1]
    assert handled[confirmed[-1]] == 1, "the event replayed from the front log handled once"
    skipped = g["topics"]["big"].get("skipped_by_retention", 0)
    assert g["skipped_by_retention"] == skipped >= 0, g
    assert len(handled) + skipped == len(confirmed), (len(handled), skipped, len(confirmed))
    assert set(handled) <= set(confirmed)
