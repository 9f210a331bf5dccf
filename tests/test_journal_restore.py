"""A journal.db restored from a backup taken before more events were written: the hub must not hand out again the
seqs it handed out after the backup, which workers, subscribers and downstream stores already hold for other
events (a (topic, seq) names one event, for good)."""

from __future__ import annotations

import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

from bucketwire.hub.journal import Batch, Journal, NewEvent
from tests.fixtures_hub import Stack, wait_for
from tests.test_groups import GROUPS  # group a on topic jobs, from the earliest event
from tests.test_ops import publish


def _cursor(s: Stack) -> int:
    return int(s.status()["groups"]["a"]["topics"]["jobs"]["cursor"])


def _by_seq(s: Stack) -> dict[int, set[str]]:
    """seq -> the ids of the events group a handled under it."""
    out: dict[int, set[str]] = {}
    for r in s.handled():
        if r["g"] == "a":
            out.setdefault(int(r["s"]), set()).add(str(r["id"]))
    return out


def test_a_restored_journal_never_hands_out_a_seq_again(stack_factory: Any) -> None:
    """Events 1-3, a backup, events 4-6 handled and acked, the backup restored: the next events were seqs 4 and
    5 again, each now naming two events (a consumer that keeps what it handled by seq skips the new ones as seen).
    Now the hub reads the high-water mark it keeps beside the journal, and goes on after seq 6."""
    s = stack_factory(GROUPS)
    s.start_hub()
    w = s.start_worker("a", 1)
    publish(s, 3)
    wait_for(lambda: _cursor(s) == 3, 30, "group a acked 1-3")
    s.kill_hub(signal.SIGTERM)
    journal = s.dir / "state" / "journal.db"
    backup = s.dir / "journal-backup.db"
    shutil.copy(journal, backup)  # the hub stopped: journal.db alone is the whole journal (docs: Backups)

    s.start_hub()
    publish(s, 3)
    wait_for(lambda: _cursor(s) == 6, 30, "group a acked 4-6")
    s.kill_hub(signal.SIGTERM)
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0

    shutil.copy(backup, journal)  # the restore
    db = sqlite3.connect(journal)
    try:
        assert db.execute("SELECT max(seq) FROM events").fetchone() == (3,)
    finally:
        db.close()
    s.start_hub()
    new = publish(s, 2)
    assert [r["seq"] for r in new] == [7, 8], new
    assert s.status()["topics"]["jobs"]["head"] == 8
    s.start_worker("a", 1)
    wait_for(lambda: _cursor(s) == 8, 30, "group a acked the new events")
    seen = _by_seq(s)
    assert all(len(ids) == 1 for ids in seen.values()), seen
    assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7, 8], seen
    hub_log = s.logs[-2].read_text()
    assert "journal.db is behind the seqs this hub handed out" in hub_log, hub_log


def _ev(i: int) -> NewEvent:
    return NewEvent("t", "s", f"id-{i}", None, {"n": i, "seq": None})


def test_a_new_empty_journal_is_not_lifted_by_an_old_mark(tmp_path: Path) -> None:
    """The mark names its journal: journal.db deleted on purpose (to start empty) starts at seq 1, as before."""
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[_ev(i) for i in range(5)]))
    j.close()
    assert (tmp_path / "j-highwater.json").exists()
    (tmp_path / "j.db").unlink()
    j = Journal(tmp_path / "j.db")
    assert j.commit(Batch(events=[_ev(9)]))[0].seq == 1
    j.close()


def test_a_group_cursor_past_the_head_lifts_it(tmp_path: Path) -> None:
    """A cursor past its topic's head (acked seqs the journal does not hold, the mark gone too): the next event
    takes the seq after the cursor, not one the group acked and so would never be given."""
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[_ev(i) for i in range(2)], cursors={("g", "t"): 2}))
    j.settle()  # a small commit waits in the front log until then
    j.db.execute("UPDATE cursors SET acked = 7")
    j.close()
    (tmp_path / "j-highwater.json").unlink()
    j = Journal(tmp_path / "j.db")
    assert j.heads["t"] == 7
    assert j.commit(Batch(events=[_ev(9)]))[0].seq == 8
    j.close()
