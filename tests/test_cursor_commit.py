"""Acks that arrive between publishes wait a few milliseconds for the next event commit to carry their cursor
(hub CURSOR_DELAY). These tests hold the hub to what that must not change: an ack with nothing after it is still
written on its own, and what was acked before a hub crash (the cursor in the journal) is not delivered again."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

from tests.fixtures_hub import Stack, wait_for
from tests.test_delivery import obj_event

GROUP = """
[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
"""


def _stored_cursor(s: Stack, scratch: Path) -> int | None:
    """The group's cursor as the journal file holds it (what a restarted hub starts from).

    The running hub holds journal.db against every other process's SQLite, so this reads a copy of its bytes (the
    WAL first, then the database file). A copy taken mid-write may read as an older state or not at all (None:
    the caller polls again), never as a cursor the file did not hold."""
    scratch.mkdir(exist_ok=True)
    for name in ("journal.db-wal", "journal.db"):
        src = s.dir / "state" / name
        if src.exists():
            shutil.copyfile(src, scratch / name)
    db = sqlite3.connect(scratch / "journal.db", timeout=5)
    try:
        row = db.execute("SELECT acked FROM cursors WHERE grp='a' AND topic='jobs'").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        db.close()
        for f in scratch.iterdir():
            f.unlink()
    return row[0] if row else None


def test_a_lone_ack_is_written_and_survives_a_hub_crash(stack_factory: Any, tmp_path: Path) -> None:
    s: Stack = stack_factory(GROUP)
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([obj_event(f"k{i}", i) for i in range(3)])
    wait_for(lambda: len(s.handled()) == 3, 20, "three events handled")
    # Nothing is published after these acks: the cursor must reach the journal on its own.
    wait_for(lambda: _stored_cursor(s, tmp_path / "copy") == 3, 20, "the cursor of the last ack in the journal")
    s.kill_hub()
    s.start_hub()
    wait_for(lambda: s.status()["groups"].get("a", {}).get("workers", 0) == 1, 30, "the worker back")
    with s.client() as c:
        c.publish_events([obj_event("after", 3)])
    wait_for(lambda: any(r["key"] == "after" for r in s.handled()), 20, "the event published after the restart")
    keys = [r["key"] for r in s.handled()]
    assert sorted(keys) == ["after", "k0", "k1", "k2"], "an event acked before the crash was delivered again"
