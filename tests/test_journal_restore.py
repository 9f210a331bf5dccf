"""A journal.db restored from a backup taken before more events were written: the hub must not hand out again the
seqs it handed out after the backup, which workers, subscribers and downstream stores already hold for other
events (a (topic, seq) names one event, for good)."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

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
    # Group a's cursor came back from the backup at 3: it skipped 4-6, which were reported as "dropped by
    # retention" (raise retention_days...). They were lost to the restore, and that is what is said.
    assert "journal.db was restored from an older backup: seqs 4-6 of jobs are gone with it" in hub_log, hub_log
    assert "lost when journal.db was restored" in hub_log and "retention dropped" not in hub_log, hub_log
    st = s.status()
    ga = st["groups"]["a"]
    assert (ga["skipped_by_restore"], ga["skipped_by_retention"]) == (3, 0), ga
    assert ga["topics"]["jobs"]["skipped_by_restore"] == 3 and "skipped_by_retention" not in ga["topics"]["jobs"]
    assert st["hub"]["restored"]["gaps"] == {"jobs": "4-6"}, st["hub"]
    shown = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(s.cfg_path)], env=s.env,
                           capture_output=True, text=True, timeout=60)
    said = [line for line in (shown.stdout + shown.stderr).splitlines() if "restored from an older backup" in line]
    assert any("seqs 4-6 of jobs are gone with it" in line for line in said), shown.stdout + shown.stderr
    assert "dropped by retention" not in shown.stdout + shown.stderr


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


def _restore(tmp_path: Path, backup: Path, mark_then: bytes | None = None) -> None:
    """journal.db replaced by `backup` (its -wal, -shm and front log removed: the backup exactly); `mark_then`: the
    high-water mark as it was on disk when the hub stopped (it lags the journal by up to a second)."""
    for p in tmp_path.glob("j.db*"):
        p.unlink()
    backup.rename(tmp_path / "j.db")
    if mark_then is not None:
        (tmp_path / "j-highwater.json").write_bytes(mark_then)


@pytest.mark.parametrize("machine_crashed", [False, True], ids=["killed", "machine-crashed"])
def test_a_backup_taken_inside_the_marks_window_reissues_no_seq(tmp_path: Path, machine_crashed: bool) -> None:
    """The mark is written about once a second: a backup taken after it, of a hub killed before it was written
    again, was not told from the journal the hub left. Seqs 1-3 marked, 4-5 in the backup, 6-7 handed out after
    it: the restored journal handed out 6 and 7 again. Now the hub keeps the count of seqs it handed out beside
    the journal (at every commit, and fsync'd as a ceiling reserved ahead): the restored journal goes on at 8.
    `machine_crashed`: the count was written without fsync, so after a machine crash (another boot) it may have
    lost its last writes (here it says 3): the fsync'd ceiling is what the hub goes on above."""
    from tests.test_journal_front import commit_then_kill

    path = tmp_path / "j.db"
    mark = tmp_path / "j-highwater.json"
    commit_then_kill(path, f"""
        import sqlite3
        for i in range(1, 8):
            if i == 4:  # the last mark before the crash: seqs 1-3
                j._moved, j._marked_at = True, 0.0
                j._mark_tick()
                saved = open({str(mark)!r}, "rb").read()
            elif i == 6:  # the backup: seqs 1-5
                j.db.backup(sqlite3.connect({str(tmp_path / "backup.db")!r}))
            j.commit(Batch(events=[ev("a", i)]))
            j.settle()
        open({str(tmp_path / "mark-then")!r}, "wb").write(saved)
        print("{{}}")
    """)
    _restore(tmp_path, tmp_path / "backup.db", (tmp_path / "mark-then").read_bytes())
    if machine_crashed:
        seqs = tmp_path / "j-seqs"
        f = seqs.read_text().split()
        assert f[4] == "open" and int(f[6]) == 7, f  # killed: not clean, the count exact
        seqs.write_text(" ".join(f[:3] + ["another-boot", "open", f[5], "3"]) + "\n")
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 100)] == [1, 2, 3, 4, 5]
    seq = j.commit(Batch(events=[NewEvent("a", "s", "id-new", None, {"n": 0, "seq": None})]))[0].seq
    if machine_crashed:  # above everything the ceiling allowed: seqs skipped, none reused
        assert seq > 8 and j.restored is not None and "the machine went down" in str(j.restored["line"]), j.restored
        j.close()
        return
    assert seq == 8
    assert j.restored is not None and j.restored["gaps"] == {"a": "6-7"}, j.restored
    assert j.lost_to_restore("a", 6, 2) == 2 and j.lost_to_restore("a", 1, 5) == 0
    # A topic new to the restored journal may have had seqs handed out after the backup too (as many as were
    # lost): it starts above them.
    assert j.commit(Batch(events=[NewEvent("t", "s", "id-t", None, {"seq": None})]))[0].seq == 3
    assert j.lost_to_restore("t", 1, 2) == 2
    j.close()


def test_a_hub_killed_or_stopped_goes_on_at_the_next_seq(tmp_path: Path) -> None:
    """The ceiling reserved ahead is not where a journal that was not restored goes on: killed (-9) with commits
    in the front log and in SQLite, then stopped cleanly, it hands out the very next seq each time."""
    from tests.test_journal_front import commit_then_kill

    path = tmp_path / "j.db"
    commit_then_kill(path, """
        for i in range(1, 6):
            j.commit(Batch(events=[ev("a", i)]))
        j.settle()
        j.commit(Batch(events=[ev("a", 6), ev("b", 60)]))  # staged in the front log only
        print("{}")
    """)
    j = Journal(path)
    assert j.restored is None
    got = j.commit(Batch(events=[NewEvent("t", "s", "t1", None, {"seq": None}),
                                 NewEvent("a", "s", "x", None, {"seq": None})]))
    assert [(a.topic, a.seq) for a in got] == [("t", 1), ("a", 7)]
    j.close()
    j = Journal(path)
    assert j.restored is None
    assert j.commit(Batch(events=[NewEvent("a", "s", "y", None, {"seq": None})]))[0].seq == 8
    assert j.commit(Batch(events=[NewEvent("b", "s", "z", None, {"seq": None})]))[0].seq == 2
    j.close()


def test_the_seq_count_is_on_disk_after_every_commit_even_when_the_start_could_not_write_it(tmp_path: Path) -> None:
    """The count of seqs handed out is in `journal-seqs` (the page cache: what a kill -9 keeps) as each commit
    returns, front-log commits and SQLite ones alike, read through a file of its own while the hub runs; also when
    the start could not write the file at all (a full disk: it stays empty until the first reservation writes
    it), and a kill -9 then leaves the exact count."""
    from tests.test_journal_front import commit_then_kill

    path = tmp_path / "j.db"
    seqs = tmp_path / "j-seqs"
    out = commit_then_kill(path, f"""
        import errno
        import bucketwire.hub.journal_mark as M
        j.commit(Batch(events=[ev("a", 0)]))
        j.close()
        os.unlink({str(seqs)!r})
        real = M.os.pwrite
        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")
        M.os.pwrite = full
        j = Journal(Path({str(path)!r}))  # the start's write fails: an empty file
        M.os.pwrite = real
        assert os.path.getsize({str(seqs)!r}) == 0
        seen, n = [], 1
        for i in range(1, 30):
            k = 1 if i % 3 else 20  # the front log's commits, and SQLite's
            j.commit(Batch(events=[ev("a" if i % 2 else "b", 1000 * i + e) for e in range(k)]))
            n += k
            seen.append((int(open({str(seqs)!r}).read().split()[6]), n))
        print(json.dumps({{"seen": seen, "heads": j.heads}}))
    """)
    seen = [tuple(x) for x in cast("list[list[int]]", out["seen"])]
    assert all(on_disk == handed_out for on_disk, handed_out in seen), seen
    total = seen[-1][1]
    f = seqs.read_text().split()
    assert f[4] == "open" and int(f[6]) == total and int(f[5]) >= total, f
    heads = cast("dict[str, int]", out["heads"])
    assert sum(heads.values()) == total
    j = Journal(path)
    assert j.restored is None and j.heads == heads
    assert j.commit(Batch(events=[NewEvent("b", "s", "next", None, {"seq": None})]))[0].seq == heads["b"] + 1
    j.close()
