"""Acks that arrive between publishes wait a few milliseconds for the next event commit to carry their cursor
(hub CURSOR_DELAY). These tests hold the hub to what that must not change: an ack with nothing after it is still
written on its own, and what was acked before a hub crash (the cursor in the journal) is not delivered again."""

from __future__ import annotations

import sqlite3
from typing import Any

from tests.fixtures_hub import Stack, wait_for
from tests.test_delivery import obj_event

GROUP = """
[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
"""


def _stored_cursor(s: Stack) -> int | None:
    """The group's cursor as the journal file holds it (what a restarted hub starts from)."""
    db = sqlite3.connect(f"file:{s.dir / 'state' / 'journal.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT acked FROM cursors WHERE grp='a' AND topic='jobs'").fetchone()
    finally:
        db.close()
    return row[0] if row else None


def test_a_lone_ack_is_written_and_survives_a_hub_crash(stack_factory: Any) -> None:
    s: Stack = stack_factory(GROUP)
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([obj_event(f"k{i}", i) for i in range(3)])
    wait_for(lambda: len(s.handled()) == 3, 20, "three events handled")
    # Nothing is published after these acks: the cursor must reach the journal on its own.
    wait_for(lambda: _stored_cursor(s) == 3, 20, "the cursor of the last ack in the journal")
    s.kill_hub()
    s.start_hub()
    wait_for(lambda: s.status()["groups"].get("a", {}).get("workers", 0) == 1, 30, "the worker back")
    with s.client() as c:
        c.publish_events([obj_event("after", 3)])
    wait_for(lambda: any(r["key"] == "after" for r in s.handled()), 20, "the event published after the restart")
    keys = [r["key"] for r in s.handled()]
    assert sorted(keys) == ["after", "k0", "k1", "k2"], "an event acked before the crash was delivered again"
