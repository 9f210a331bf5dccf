"""The SQLite journal's front log (hub/journal_front.py): a commit of a few events is durable once appended there,
and written into journal.db only after the hub has sent its DELIVERs and confirmations (`settle`).

What must hold: a journal process SIGKILLed between the two still has every staged event after a restart, with its
seq, and reuses none of them; a torn tail or a front log that belongs to another journal is never replayed;
events retention dropped never come back from it; a front-log write that fails (a file size limit, as a full disk
would) leaves no trace and no hole; SQLite refusing the write after the append (its own size limit) keeps the
events for the next start, and refuses further commits meanwhile. Real processes, real files, real signals.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bucketwire.hub.journal import FRONT_EVENTS, Batch, Journal, JournalError, NewEvent
from bucketwire.hub.journal_front import HEADER


def ev(topic: str, i: int, source: str = "s", body: str = "x" * 100) -> NewEvent:
    return NewEvent(topic, source, f"id-{i}", f"k{i}", {"b": body, "seq": None})


def front(path: Path) -> Path:
    return path.with_name(path.name + "-front")


def rows_in_sqlite(path: Path, topic: str) -> list[int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT seq FROM events WHERE topic=? ORDER BY seq", (topic,))]
    finally:
        db.close()


def commit_then_kill(path: Path, script: str) -> dict[str, object]:
    """Run `script` in a fresh process holding a Journal `j` on `path`; it prints a JSON line, then the process
    SIGKILLs itself: no settle, no close, nothing flushed by Python."""
    code = textwrap.dedent(f"""
        import json, os, signal, sys
        from pathlib import Path
        from bucketwire.hub.journal import Batch, Journal, NewEvent
        def ev(topic, i, source="s"):
            return NewEvent(topic, source, f"id-{{i}}", f"k{{i}}", {{"b": "x" * 100, "seq": None}})
        j = Journal(Path({str(path)!r}))
    """) + textwrap.dedent(script) + "\nsys.stdout.flush()\nos.kill(os.getpid(), signal.SIGKILL)\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def staged_then_kill(path: Path) -> None:
    """A journal process that stages one event ("a", id-1) in the front log and dies before writing it to SQLite."""
    commit_then_kill(path, """
        j.commit(Batch(events=[ev("a", 1)]))
        print("{}")
    """)


def test_a_journal_killed_before_it_wrote_a_staged_commit_into_sqlite_has_it_after_a_restart(tmp_path):
    path = tmp_path / "j.db"
    out = commit_then_kill(path, """
        j.commit(Batch(events=[ev("a", i) for i in range(20)]))   # straight into SQLite (over FRONT_EVENTS)
        staged = j.commit(Batch(events=[ev("a", 100), ev("b", 101)], cursors={("g", "a"): 5}))
        print(json.dumps({"staged": [(a.topic, a.seq) for a in staged]}))
    """)
    assert out["staged"] == [["a", 21], ["b", 1]]
    assert rows_in_sqlite(path, "a") == list(range(1, 21)), "the staged commit was not in journal.db at the kill"
    assert front(path).stat().st_size > 0
    j = Journal(path)
    assert [(s, k) for s, k, _ in j.read("a", 1, 100)][-1] == (21, "k100")
    assert [s for s, _, _ in j.read("b", 1, 10)] == [1]
    assert j.heads == {"a": 21, "b": 1}
    assert front(path).stat().st_size == 0, "replayed, then started over"
    nxt = j.commit(Batch(events=[ev("a", 102), ev("b", 103)]))
    assert [(a.topic, a.seq) for a in nxt] == [("a", 22), ("b", 2)], "no seq handed out twice"
    again = j.commit(Batch(events=[ev("a", 100)]))
    assert again[0].duplicate and again[0].seq == 21, "a replayed event still deduplicates"
    j.close()
    j = Journal(path)
    assert j.heads == {"a": 22, "b": 2}
    assert j.cursors() == {("g", "a"): 5}, "the staged commit's cursor came back with its events (change 29)"
    j.close()


def test_a_torn_tail_and_a_front_log_from_another_journal_are_not_replayed(tmp_path):
    path = tmp_path / "j.db"
    commit_then_kill(path, """
        j.commit(Batch(events=[ev("a", 1)]))
        j.settle()
        j.commit(Batch(events=[ev("a", 2)]))
        print("{}")
    """)
    whole = front(path).read_bytes()
    with front(path).open("ab") as f:  # what a power loss could leave: half of a third record
        f.write(whole[: len(whole) // 2])
    saved = tmp_path / "saved-front"
    shutil.copy(front(path), saved)
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2]
    j.close()

    other = tmp_path / "other" / "j.db"
    Journal(other).close()
    shutil.copy(saved, front(other))
    j = Journal(other)
    assert j.heads == {} and j.read("a", 1, 10) == [], "another journal's front log is never replayed"
    j.close()


def test_events_dropped_by_retention_do_not_come_back_from_the_front_log(tmp_path):
    path = tmp_path / "j.db"
    commit_then_kill(path, """
        for i in range(5):
            j.commit(Batch(events=[ev("a", i)]))
        j.settle()
        assert j.enforce_retention(max_age=-1.0, max_bytes=1 << 40) == 5
        print("{}")
    """)
    assert front(path).stat().st_size > 0, "the front log still holds the five (it starts over at 1 MiB)"
    j = Journal(path)
    assert j.read("a", 1, 10) == [] and j.heads == {"a": 5}
    assert j.commit(Batch(events=[ev("a", 9)]))[0].seq == 6
    j.close()


def test_a_front_log_write_cut_short_leaves_no_trace_and_no_hole(tmp_path):
    path = tmp_path / "j.db"
    code = textwrap.dedent(f"""
        import json, os, resource, signal
        from pathlib import Path
        from bucketwire.hub.journal import Batch, Journal, JournalError, NewEvent
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        def ev(i):
            return NewEvent("a", "s", f"id-{{i}}", None, {{"b": "x" * 3000, "seq": None}})
        j = Journal(Path({str(path)!r}))
        j.commit(Batch(events=[ev(1)]))
        j.settle()
        front = Path({str(front(path))!r})
        size = front.stat().st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # room for 100 bytes of the next record
        try:
            j.commit(Batch(events=[ev(2)]))
            failed = None
        except JournalError as e:
            failed = str(e)
        after = front.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        seq = j.commit(Batch(events=[ev(3)]))[0].seq
        j.close()
        print(json.dumps({{"failed": failed, "size": size, "after": after, "seq": seq}}))
    """)
    if resource.getrlimit(resource.RLIMIT_FSIZE)[1] != resource.RLIM_INFINITY:
        pytest.skip("needs an unlimited hard RLIMIT_FSIZE to lower and raise again")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["failed"] and "journal commit failed" in out["failed"]
    assert out["after"] == out["size"], "the part written was cut off again"
    assert out["seq"] == 2, "the failed commit took no seq"
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2]
    j.close()


def test_sqlite_refusing_a_staged_commit_keeps_it_for_the_next_start_and_refuses_more(tmp_path):
    path = tmp_path / "j.db"
    j = Journal(path)
    j.commit(Batch(events=[ev("a", 1)]))
    j.settle()
    pages = j.db.execute("PRAGMA page_count").fetchone()[0]
    j.db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's file may not grow: a full disk, for SQLite alone
    staged = j.commit(Batch(events=[ev("a", 2, body="y" * 20_000)]))
    assert staged[0].seq == 2
    with pytest.raises(JournalError):
        j.settle()
    with pytest.raises(JournalError):
        j.commit(Batch(events=[ev("a", 3)]))
    assert rows_in_sqlite(path, "a") == [1]
    # Reads take the confirmed commit from memory meanwhile: a group reading past SQLite's last row found nothing
    # below the head and took it for a gap retention had made (tests/test_front_log_full.py).
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2] and [s for s, _, _ in j.read("a", 2, 1)] == [2]
    assert j.read("a", 1, 1) == j.read("a", 1, 10)[:1] and j.read("a", 3, 10) == [] and j.read("b", 1, 10) == []
    assert j.first_seq("a") == 1 and j.first_seq_since("a", time.time() - 60) == 1
    j.close()  # cannot write it either: it stays in the front log
    assert rows_in_sqlite(path, "a") == [1]
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2]
    assert j.commit(Batch(events=[ev("a", 3)]))[0].seq == 3
    j.close()


def test_only_small_commits_without_duplicates_are_staged_and_fsync_durability_stages_none(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("a", i) for i in range(FRONT_EVENTS)]))
    assert j._pending is not None
    j.settle()
    j.commit(Batch(events=[ev("a", i) for i in range(100, 101 + FRONT_EVENTS)]))
    assert j._pending is None, "a large batch goes straight into SQLite"
    out = j.commit(Batch(events=[ev("a", 0), ev("a", 500)]))
    assert j._pending is None and [(a.seq, a.duplicate) for a in out] == [(1, True), (2 * FRONT_EVENTS + 2, False)]
    j.close()
    j = Journal(tmp_path / "f.db", "fsync")
    j.commit(Batch(events=[ev("a", 1)]))
    assert j._pending is None, "with durability fsync every commit is one synced transaction"
    j.close()


def test_a_staged_commit_is_settled_before_anything_reads_or_drops_events(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("a", 1)]))
    assert j.db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1]
    j.commit(Batch(events=[ev("a", 2)]))
    assert j.enforce_retention(max_age=-1.0, max_bytes=1 << 40) == 2, "retention saw the staged event too"
    j.close()


def test_a_journal_deleted_beside_a_front_log_that_holds_events_is_refused_in_one_line(tmp_path):
    path = tmp_path / "j.db"
    staged_then_kill(path)
    for p in tmp_path.glob("j.db*"):
        if p != front(path):
            p.unlink()
    with pytest.raises(JournalError) as e:
        Journal(path)
    assert "front log j.db-front holds events" in str(e.value) and "\n" not in str(e.value)
    assert not path.exists(), "no new journal was made beside it"


def test_a_hub_journal_closed_cleanly_leaves_no_front_log(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("a", 1)]))
    assert front(tmp_path / "j.db").exists()
    j.close()
    assert not front(tmp_path / "j.db").exists()


def test_the_write_probe_reports_staged_events_it_cannot_write_and_passes_once_they_are(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("a", 1)]))
    j.settle()
    pages = j.db.execute("PRAGMA page_count").fetchone()[0]
    j.db.execute(f"PRAGMA max_page_count={pages}")
    j.commit(Batch(events=[ev("a", 2, body="y" * 20_000)]))
    with pytest.raises(JournalError):
        j.settle()
    err = j.probe()
    assert err is not None and "full" in err, err
    j.db.execute(f"PRAGMA max_page_count={pages * 100}")  # space is back
    assert j.probe() is None
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2]
    j.close()


def test_retention_frees_a_full_journal_while_staged_rows_wait_and_never_floors_over_them(tmp_path):
    """SQLite full with a staged commit waiting: retention must still run (freeing space is how the staged rows get
    written), and the floors it writes first must stay below the staged seqs, or a restart would skip them."""
    path = tmp_path / "j.db"
    out = commit_then_kill(path, """
        from bucketwire.hub.journal import JournalError
        big = lambda t, i, n=20_000: NewEvent(t, "s", f"id-{i}", None, {"b": "y" * n, "seq": None})
        j.commit(Batch(events=[big("a", i) for i in range(20)]))
        pages = j.db.execute("PRAGMA page_count").fetchone()[0]
        j.db.execute(f"PRAGMA max_page_count={pages}")
        staged = j.commit(Batch(events=[big("b", 100, 400_000)]))  # more than the 10 events dropped below free
        try:
            j.settle()
            settled = True
        except JournalError:
            settled = False
        dropped = j.enforce_retention(max_age=-1.0, max_bytes=1 << 40, chunk=10)
        floors = dict(j.db.execute("SELECT name, head FROM topics"))
        print(json.dumps({"settled": settled, "dropped": dropped, "floors": floors, "still": j._pending is not None,
                          "b": [(a.topic, a.seq) for a in staged]}))
    """)
    assert out["settled"] is False and out["dropped"] == 10 and out["still"], out
    assert out["b"] == [["b", 1]] and out["floors"].get("b", 0) == 0, out
    j = Journal(path)
    assert [s for s, _, _ in j.read("b", 1, 10)] == [1], "the staged event came back at the restart"
    j.close()


def test_once_retention_has_freed_space_the_staged_rows_are_written(tmp_path):
    j = Journal(tmp_path / "j.db")
    big = lambda t, i: NewEvent(t, "s", f"id-{i}", None, {"b": "y" * 20_000, "seq": None})  # noqa: E731
    j.commit(Batch(events=[big("a", i) for i in range(20)]))
    pages = j.db.execute("PRAGMA page_count").fetchone()[0]
    j.db.execute(f"PRAGMA max_page_count={pages}")
    j.commit(Batch(events=[big("b", 100)]))
    with pytest.raises(JournalError):
        j.settle()
    assert j.enforce_retention(max_age=-1.0, max_bytes=1 << 40) == 20
    assert j._pending is None, "written once retention made room"
    assert [s for s, _, _ in j.read("b", 1, 10)] == [1]
    j.close()


def test_a_front_log_left_by_a_hub_with_durability_os_is_replayed_by_one_started_with_fsync(tmp_path):
    path = tmp_path / "j.db"
    staged_then_kill(path)
    j = Journal(path, "fsync")
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1], "an operator switching to fsync keeps what was confirmed"
    assert j.commit(Batch(events=[ev("a", 2)]))[0].seq == 2 and j._pending is None
    j.close()


def three_commits_the_last_unsettled(path: Path) -> list[tuple[int, int]]:
    """A journal process that commits ("a", id-1) and ("a", id-2) through the front log and into SQLite, stages
    ("a", id-3) (confirmed: the hub would have sent its PUBACK and DELIVER) and dies before writing it into SQLite.
    Returns each record's (offset, length) in the front log it left."""
    commit_then_kill(path, """
        for i in (1, 2):
            j.commit(Batch(events=[ev("a", i)]))
            j.settle()
        j.commit(Batch(events=[ev("a", 3)]))
        print("{}")
    """)
    data = front(path).read_bytes()
    spans, at = [], 0
    while at < len(data):
        n = HEADER.unpack_from(data, at)[1]
        spans.append((at, HEADER.size + n))
        at += HEADER.size + n
    assert len(spans) == 3 and rows_in_sqlite(path, "a") == [1, 2]
    return spans


@pytest.mark.parametrize("where", ["body", "length"])
def test_a_front_log_damaged_in_the_middle_still_gives_back_the_commit_confirmed_after_the_damage(tmp_path, where,
                                                                                                   caplog):
    """A flipped byte in a record already written into SQLite (a bad sector, a stray write) used to end the replay
    there: the last record, confirmed and never written into SQLite, was dropped with it in silence and the file
    started over. Records are self-checking (magic, length, CRC over the journal's id and the rows), so the replay
    looks for the next one that checks out, and keeps the damaged file aside with one warning."""
    path = tmp_path / "j.db"
    spans = three_commits_the_last_unsettled(path)
    at, n = spans[1]
    data = bytearray(front(path).read_bytes())
    if where == "body":
        data[at + n - 5] ^= 0xFF
    else:  # the length field: the record seems to run past the end of the file
        data[at + 4: at + 8] = (1 << 30).to_bytes(4, "little")
    front(path).write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="bucketwire.journal"):
        j = Journal(path)
    assert [(s, k) for s, k, _ in j.read("a", 1, 10)] == [(1, "k1"), (2, "k2"), (3, "k3")]
    assert j.commit(Batch(events=[ev("a", 4)]))[0].seq == 4, "no seq handed out twice"
    j.close()
    kept = list(tmp_path.glob("j.db-front.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(data), "the damaged front log is kept as it was"
    lines = [r.getMessage() for r in caplog.records if "front log" in r.getMessage() and "check out" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_a_front_log_of_another_journal_is_kept_aside_not_truncated(tmp_path, caplog):
    """Another journal's front log (a state_dir's files mixed up in a copy or restore) holds that journal's
    confirmed events, maybe some not yet in its journal.db: this journal must not replay them, and must not
    destroy them either."""
    path = tmp_path / "j.db"
    three_commits_the_last_unsettled(path)
    theirs = front(path).read_bytes()
    other = tmp_path / "other" / "j.db"
    Journal(other).close()
    front(other).write_bytes(theirs)
    with caplog.at_level("WARNING", logger="bucketwire.journal"):
        j = Journal(other)
    assert j.heads == {} and j.read("a", 1, 10) == []
    j.close()
    kept = list(other.parent.glob("j.db-front.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == theirs
    assert any("check out" in r.getMessage() for r in caplog.records)
    j = Journal(path)  # the records are still good for the journal they belong to
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2, 3]
    j.close()


def test_a_front_log_that_links_to_a_running_journals_is_refused_and_left_alone(tmp_path):
    """`journal.db-front` a link to another state_dir's (a copied tree of symlinks, a provisioning template): the
    second journal took the first one's records for another journal's, started the file over under it (the first
    one's confirmed commit, not yet in its SQLite, gone) and appended its own records there. SQLite's lock keeps two
    hubs off one journal.db; the front log needs a lock of its own."""
    first, second = tmp_path / "a" / "j.db", tmp_path / "b" / "j.db"
    Journal(second).close()
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from bucketwire.hub.journal import Batch, Journal, NewEvent
        j = Journal(Path({str(first)!r}))
        j.commit(Batch(events=[NewEvent("a", "s", "id-1", "k1", {{"b": "x", "seq": None}})]))  # staged, not settled
        print("staged", flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "staged"
        theirs = front(first).read_bytes()
        front(second).symlink_to(front(first))
        with pytest.raises(JournalError) as e:
            Journal(second)
        msg = str(e.value)
        assert "j.db-front" in msg and "another" in msg and "\n" not in msg, msg
        assert front(first).read_bytes() == theirs, "the running journal's front log is untouched"
    finally:
        p.kill()
        p.wait(10)
    j = Journal(first)
    assert [(s, k) for s, k, _ in j.read("a", 1, 10)] == [(1, "k1")], "its confirmed commit came back"
    j.close()
    front(second).unlink()
    j = Journal(second)  # the link gone, the second journal opens as before
    assert j.heads == {}
    j.close()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_front_log_that_is_not_a_file_is_refused_in_one_line_that_names_it(tmp_path, kind):
    """Both used to stop the start in a line about journal.db and its disk's free space ("Illegal seek" for the
    FIFO, read before anything was appended to it)."""
    path = tmp_path / "j.db"
    Journal(path).close()
    if kind == "directory":
        front(path).mkdir()
    else:
        os.mkfifo(front(path))
    with pytest.raises(JournalError) as e:
        Journal(path)
    msg = str(e.value)
    assert "j.db-front" in msg and ("Is a directory" if kind == "directory" else "not a regular file") in msg, msg
    assert "\n" not in msg


def test_a_backup_of_the_same_journal_restored_beside_its_front_log_gets_the_newest_events_back(tmp_path):
    """docs/operations.md, "Backups": a restored backup has the journal's own id, so the front log a crashed hub left
    is replayed above the backup's heads (the docs used to call a restored journal.db another journal's)."""
    path = tmp_path / "j.db"
    commit_then_kill(path, f"""
        import sqlite3
        for i in range(1, 6):
            j.commit(Batch(events=[ev("a", i)]))
            j.settle()
        b = sqlite3.connect({str(tmp_path / "backup.db")!r})
        j.db.backup(b)
        b.close()
        for i in range(6, 11):
            j.commit(Batch(events=[ev("a", i)]))
            j.settle()
        j.commit(Batch(events=[ev("a", 11)]))
        print("{{}}")
    """)
    for p in tmp_path.glob("j.db*"):
        if p != front(path):
            p.unlink()
    (tmp_path / "backup.db").rename(path)
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 100)] == list(range(1, 12))
    assert j.commit(Batch(events=[ev("a", 12)]))[0].seq == 12
    j.close()


def test_a_topic_whose_only_event_waits_in_memory_reads_it_and_its_first_seq(tmp_path):
    """The first event of a topic, confirmed from the front log while SQLite is full: SQLite holds no row of the
    topic at all, so a group took the event for one retention had dropped, marked it acked and never handed it out
    (its first_seq said None: the gap ran to the head)."""
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("a", 1)]))
    j.settle()
    pages = j.db.execute("PRAGMA page_count").fetchone()[0]
    j.db.execute(f"PRAGMA max_page_count={pages}")
    assert j.commit(Batch(events=[ev("b", 2, body="y" * 20_000)]))[0].seq == 1
    with pytest.raises(JournalError):
        j.settle()
    assert [(s, k) for s, k, _ in j.read("b", 1, 10)] == [(1, "k2")]
    assert j.first_seq("b") == 1 and j.first_seq_since("b", time.time() + 60) is None
    j.close()


def test_a_restored_backup_holding_a_replayed_events_id_opens_and_commits(tmp_path, caplog):
    """A backup restored beside its journal's front log (same id: replayed), where an event the backup holds was
    dropped by retention since and published again: SQLite's dedup index refused the replay at every start, and the
    hub refused every event meanwhile, its probe blaming the journal's disk."""
    path = tmp_path / "j.db"
    commit_then_kill(path, f"""
        import sqlite3
        j.commit(Batch(events=[ev("a", 1)]))
        j.settle()
        j.commit(Batch(events=[ev("a", 2)]))
        j.settle()
        b = sqlite3.connect({str(tmp_path / "backup.db")!r})
        j.db.backup(b)
        b.close()
        j.enforce_retention(max_age=-1.0, max_bytes=1 << 40)
        j.commit(Batch(events=[ev("a", 1)]))  # id-1 again: new to the journal now, staged at seq 3
        j.commit(Batch(events=[ev("a", 4)]))  # seq 4, staged
        print("{{}}")
    """)
    for p in tmp_path.glob("j.db*"):
        if p != front(path):
            p.unlink()
    (tmp_path / "backup.db").rename(path)
    with caplog.at_level("WARNING", logger="bucketwire.journal"):
        j = Journal(path)
    assert j._pending is None and j.probe() is None
    assert [(s, k) for s, k, _ in j.read("a", 1, 10)] == [(1, "k1"), (2, "k2"), (4, "k4")]
    assert j.commit(Batch(events=[ev("a", 5)]))[0].seq == 5
    assert j.commit(Batch(events=[ev("a", 1)]))[0].duplicate
    j.close()
    assert any("already has" in r.getMessage() for r in caplog.records)


# -- several staged commits, written into SQLite together (docs/performance.md, change 27) ----------------------


def opened(path: Path) -> Journal:
    """A journal whose key filter is built: until then every key is a "maybe", and a commit asking SQLite about it
    writes what is staged first (so nothing would wait)."""
    j = Journal(path)
    j._keys.join()
    return j


def test_several_staged_commits_not_yet_in_sqlite_are_all_there_after_a_kill(tmp_path):
    """Commits staged one after the other while `settle` waits for more (it is given the loop's clock): none of them
    is in journal.db at the kill, all of them are after the restart, at their seqs; no seq is handed out again and
    each still deduplicates."""
    path = tmp_path / "j.db"
    out = commit_then_kill(path, """
        import time
        j._keys.join()  # until its key filter is built every commit asks SQLite, and writes what is staged first
        j.commit(Batch(events=[ev("a", i) for i in range(20)]))   # straight into SQLite (over FRONT_EVENTS)
        seqs = []
        for i in range(100, 106):
            got = j.commit(Batch(events=[ev("a" if i % 3 else "b", i)]))  # no acks: a commit with some is written
            seqs += [(a.topic, a.seq) for a in got]
            assert j.settle(time.monotonic()) is not None, "nothing waits"
        print(json.dumps({"staged": seqs, "batches": len(j._pending.batches)}))
    """)
    assert out["batches"] == 6, out
    assert out["staged"] == [["a", 21], ["a", 22], ["b", 1], ["a", 23], ["a", 24], ["b", 2]], out
    assert rows_in_sqlite(path, "a") == list(range(1, 21)) and rows_in_sqlite(path, "b") == [], "none was settled"
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 100)] == list(range(1, 25))
    assert [(s, k) for s, k, _ in j.read("b", 1, 10)] == [(1, "k102"), (2, "k105")]
    nxt = j.commit(Batch(events=[ev("a", 200), ev("b", 201)]))
    assert [(a.topic, a.seq) for a in nxt] == [("a", 25), ("b", 3)], "no seq handed out twice"
    again = j.commit(Batch(events=[ev("a", 103)]))
    assert again[0].duplicate and (again[0].topic, again[0].seq) == ("a", 23)
    j.close()


def test_staged_commits_wait_for_each_other_and_are_written_by_count_or_deadline(tmp_path, monkeypatch):
    """`settle(now)` writes nothing before SETTLE_EVENTS events or SETTLE_AFTER, then all of them in one
    transaction; a staged commit carrying acks (cursors, counters) waits like any other: the front log holds its
    acks too (change 29; before it such a commit was written at once, a kill -9 in the wait losing acks above a
    cursor gap), and the last cursor each commit carried is the one stored, counters added up."""
    from bucketwire.hub import journal as J
    monkeypatch.setattr(J, "SETTLE_EVENTS", 4)
    path = tmp_path / "j.db"
    j = opened(path)
    now = time.monotonic()
    due = None
    for i in range(3):
        j.commit(Batch(events=[ev("a", i)]))
        due = j.settle(now)
        assert due is not None and due <= now + J.SETTLE_AFTER + 1
    assert rows_in_sqlite(path, "a") == []
    j.commit(Batch(events=[ev("a", 3)]))
    assert j.settle(now) is None, "the fourth event: written"
    assert rows_in_sqlite(path, "a") == [1, 2, 3, 4]
    j.commit(Batch(events=[ev("a", 4)]))
    due = j.settle(now)
    assert due is not None and rows_in_sqlite(path, "a") == [1, 2, 3, 4]
    assert j.settle(due) is None, "its deadline: written"
    assert rows_in_sqlite(path, "a") == [1, 2, 3, 4, 5]
    j.commit(Batch(events=[ev("a", 5)], cursors={("g", "a"): 2}, stats={"g": (1, 0, 1)}))
    assert j.settle(now) is not None, "acks: it waits all the same"
    j.commit(Batch(events=[ev("a", 6)], cursors={("g", "a"): 3}, above={("g", "a"): "5"}, stats={"g": (1, 0, 1)}))
    assert j.settle(now) is not None
    assert rows_in_sqlite(path, "a") == [1, 2, 3, 4, 5]
    j.commit(Batch(events=[ev("a", 7)]))
    j.commit(Batch(events=[ev("a", 8)]))
    assert j.settle(now) is None, "four events: written"
    assert rows_in_sqlite(path, "a") == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert j.cursors() == {("g", "a"): 3} and j.cursor_above() == {("g", "a"): "5"}
    assert j.group_stats() == {"g": (2, 0, 2)}
    j.close()


def test_staged_commits_of_large_events_are_written_once_their_bytes_reach_the_bound(tmp_path):
    """Staged rows are held in memory until they are written: commits of large events wait for no count or
    deadline once SETTLE_BYTES of envelopes are staged (a backlog of 1 MB events held 32 of them, 32 MB more)."""
    from bucketwire.hub import journal as J
    path = tmp_path / "j.db"
    j = opened(path)
    now = time.monotonic()
    big = "x" * (J.SETTLE_BYTES // 3)
    j.commit(Batch(events=[ev("a", 0, body=big)]))
    assert j.settle(now) is not None and rows_in_sqlite(path, "a") == [], "a third of the bound: it waits"
    j.commit(Batch(events=[ev("a", 1, body=big)]))
    assert j.settle(now) is not None and rows_in_sqlite(path, "a") == []
    j.commit(Batch(events=[ev("a", 2, body=big)]))
    assert j.settle(now) is None, "past the bound: written"
    assert rows_in_sqlite(path, "a") == [1, 2, 3]
    j.close()

def test_a_key_held_only_by_a_staged_commit_is_a_duplicate(tmp_path):
    """The dedup index cannot see a staged commit: a publish of the same (source, id) again while the first waits
    in the front log must get the first's seq, not a new one (nor break the settle on the index)."""
    j = opened(tmp_path / "j.db")
    now = time.monotonic()
    first = j.commit(Batch(events=[ev("a", 1)]))
    j.settle(now)
    j.commit(Batch(events=[ev("a", 2)]))
    j.settle(now)
    again = j.commit(Batch(events=[ev("a", 1)]))
    j.settle(now)
    assert again[0].duplicate and again[0].seq == first[0].seq == 1
    assert j.commit(Batch(events=[ev("a", 3)]))[0].seq == 3
    j.settle()
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2, 3]
    j.close()


def test_everything_that_reads_the_journal_sees_staged_commits_and_a_clean_close_writes_them(tmp_path):
    path = tmp_path / "j.db"
    j = opened(path)
    now = time.monotonic()
    for i in range(3):
        j.commit(Batch(events=[ev("a", i)]))
        j.settle(now)
    assert rows_in_sqlite(path, "a") == []
    assert j.stored_cursors("g") == {}, "what `group rm` of a group would delete"
    assert rows_in_sqlite(path, "a") == [1, 2, 3], "stored_cursors wrote the staged commits first"
    j.commit(Batch(events=[], cursors={("g", "a"): 3}, attempts={("g", "a", 3): 2},
                   due={("g", "a", 3): 1e9}, waits={("g", "a", 3): 5.0}))
    assert j.stored_cursors("g") == {"a": 3}
    j.commit(Batch(events=[ev("a", 3)], attempts={("g", "a", 3): 0}))
    j.commit(Batch(events=[ev("b", 4)]))
    j.settle(now)
    assert j.attempts_of("g") == {} and j.retries_due("g") == {} and j.retry_waits("g") == {}, "the later forgets"
    j.commit(Batch(events=[ev("a", 5)]))
    j.settle(now)
    assert j.first_seq("b") == 1 and [s for s, _, _ in j.read("a", 4, 10)] == [4, 5]
    j.commit(Batch(events=[ev("b", 6)]))
    j.settle(now)
    assert j.size_bytes() > 0 and rows_in_sqlite(path, "b") == [1, 2], "status (journal_bytes) writes them first"
    j.commit(Batch(events=[ev("b", 7)]))
    j.settle(now)
    j.close()
    assert not front(path).exists(), "a clean stop wrote them: no front log left"
    assert rows_in_sqlite(path, "b") == [1, 2, 3]


def test_sqlite_refusing_several_staged_commits_keeps_them_all_and_writes_them_once_it_can(tmp_path):
    """The hidden disk-full knob: SQLite may not grow past its pages. The settle of three staged commits fails;
    they stay durable in the front log, later commits are refused (not staged on top), reads see them, and a start
    with room writes them all."""
    path = tmp_path / "j.db"
    j = opened(path)
    j.commit(Batch(events=[ev("a", 1)]))
    j.settle()
    pages = j.db.execute("PRAGMA page_count").fetchone()[0]
    j.db.execute(f"PRAGMA max_page_count={pages}")
    now = time.monotonic()
    for i in range(2, 5):
        assert j.commit(Batch(events=[ev("a", i, body="y" * 20_000)]))[0].seq == i
        j.settle(now)
    with pytest.raises(JournalError):
        j.settle()
    with pytest.raises(JournalError):
        j.commit(Batch(events=[ev("a", 5)]))
    assert rows_in_sqlite(path, "a") == [1]
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2, 3, 4]
    j.close()
    assert rows_in_sqlite(path, "a") == [1]
    j = Journal(path)
    assert rows_in_sqlite(path, "a") == [1, 2, 3, 4] and not j._pending
    assert j.commit(Batch(events=[ev("a", 5)]))[0].seq == 5
    j.close()


def test_a_commit_that_goes_straight_into_sqlite_writes_the_staged_ones_first(tmp_path):
    """Rows go into SQLite in seq order: a restart replays only what lies above a topic's head there. A small batch
    holding one id twice is not staged (the one transaction sorts it out): written before the staged commit below
    it, a kill then lost the staged event, confirmed at seq 1, for good."""
    path = tmp_path / "j.db"
    out = commit_then_kill(path, """
        import time
        j._keys.join()
        j.commit(Batch(events=[ev("a", 1)]))
        j.settle(time.monotonic())
        twice = j.commit(Batch(events=[ev("a", 2), ev("a", 2)]))
        print(json.dumps({"twice": [(a.seq, a.duplicate) for a in twice]}))
    """)
    assert out["twice"] == [[2, False], [2, True]]
    j = Journal(path)
    assert [s for s, _, _ in j.read("a", 1, 10)] == [1, 2]
    assert j.commit(Batch(events=[ev("a", 3)]))[0].seq == 3
    j.close()


# -- acks in the front log (docs/performance.md, change 29) ---------------------------------------------------------


def test_acks_staged_with_their_events_come_back_after_a_kill_and_are_not_counted_twice(tmp_path):
    """Cursors, ranges above them, counters and attempt counts carried by staged commits are in the front log with
    their rows: after a kill -9 before they reached SQLite they are all there, as if written one commit after the
    other. A commit already written into SQLite before the kill (its record still in the file) is not applied
    again: its counters would count twice and its cursor move back."""
    path = tmp_path / "j.db"
    out = commit_then_kill(path, """
        import time
        j._keys.join()
        j.commit(Batch(events=[ev("a", i) for i in range(20)], cursors={("g", "a"): 1}, stats={"g": (1, 0, 0)}))
        j.commit(Batch(events=[ev("a", 100)], cursors={("g", "a"): 10}, above={("g", "a"): "12-13"},
                       stats={"g": (0, 1, 0)}, attempts={("g", "a", 15): 2, ("g", "a", 16): 1},
                       due={("g", "a", 15): 1234.5, ("g", "a", 16): 99.0}, waits={("g", "a", 15): 3.0}))
        assert j.settle(time.monotonic()) is not None, "it waits"
        j.settle()  # written into SQLite; its record stays in the file (which starts over only past TRUNCATE_AT)
        j.commit(Batch(events=[ev("a", 101)], cursors={("g", "a"): 11}, above={("g", "a"): "13"},
                       stats={"g": (0, 1, 0)}))
        j.commit(Batch(events=[ev("b", 102)], cursors={("h", "b"): 1}, stats={"h": (0, 0, 1)},
                       attempts={("g", "a", 15): 0, ("g", "a", 17): 4}, due={("g", "a", 17): 77.0},
                       waits={("g", "a", 17): 5.0}))
        assert j.settle(time.monotonic()) is not None, "they wait"
        print(json.dumps({"staged": len(j._pending.batches)}))
    """)
    assert out["staged"] == 2
    assert rows_in_sqlite(path, "a") == list(range(1, 22)) and rows_in_sqlite(path, "b") == []
    j = Journal(path)
    assert rows_in_sqlite(path, "a") == list(range(1, 23)) and rows_in_sqlite(path, "b") == [1]
    assert j.cursors() == {("g", "a"): 11, ("h", "b"): 1}
    assert j.cursor_above() == {("g", "a"): "13"}, "the range above the last cursor move, not the settled one's"
    assert j.group_stats() == {"g": (1, 2, 0), "h": (0, 0, 1)}, "each commit's counters once"
    assert j.attempts_of("g") == {("a", 16): 1, ("a", 17): 4}, "15 forgotten by the last commit"
    assert j.retries_due("g") == {("a", 16): 99.0, ("a", 17): 77.0}
    assert j.retry_waits("g") == {("a", 17): 5.0}
    assert front(path).stat().st_size == 0, "replayed, then started over"
    j.close()
    j = Journal(path)
    assert j.group_stats() == {"g": (1, 2, 0), "h": (0, 0, 1)}, "a second start applies nothing again"
    j.close()


def test_an_acks_record_follows_its_rows_record_which_reads_as_before(tmp_path):
    """A commit's acks are a record of their own kind after its rows record, in the same write: the rows record's
    bytes are those of a commit without acks, so a hub from before acks records replays the rows and skips the
    acks as bytes that do not check out. A damaged acks record loses that commit's acks (its events run again),
    never its rows."""
    from bucketwire.hub.journal_front import ACKS_MAGIC, MAGIC, FrontLog

    rows: list[object] = ["a", 1, "s", "id-1", "k1", 1.0, b"{}"]
    acks: list[list[list[object]]] = [[["g", "a", 1, ""]], [["g", 0, 1, 0]], [["g", "a", 1, 2, 5.0, None]]]
    plain = FrontLog(tmp_path / "plain", b"jid")
    plain.append(rows)
    both = FrontLog(tmp_path / "both", b"jid")
    both.append(rows, acks)
    both.append(rows, acks)
    one = (tmp_path / "plain").read_bytes()
    data = (tmp_path / "both").read_bytes()
    assert data.startswith(one) and data[len(one):len(one) + 4] == ACKS_MAGIC and data.count(MAGIC) == 2
    assert both.records() == ([(rows, acks), (rows, acks)], 0)
    both.close()
    second_acks = data.rindex(ACKS_MAGIC)
    damaged = bytearray(data)
    damaged[second_acks + HEADER.size + 2] ^= 0xFF
    (tmp_path / "both").write_bytes(bytes(damaged))
    reread = FrontLog(tmp_path / "both", b"jid")
    records, bad = reread.records()
    assert records == [(rows, acks), (rows, None)] and bad == len(data) - second_acks
    plain.close()
    reread.close()
