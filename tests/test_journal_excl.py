"""One hub per journal file. Two hubs on one `[hub] state_dir` both keep topic heads in memory and assign seqs from
them: before the hub held its journal exclusively, the second one started, and every publish through it was
answered "journal unavailable" (its seqs clashed with the first hub's on the UNIQUE (topic, seq) index) while it
accepted workers and connections as if healthy. Now the second hub refuses to start, in one line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bucketwire import config as config_mod
from bucketwire.hub.journal import Journal, JournalError
from tests.fixtures_hub import Stack


def _same_state_dir(a: Stack, b: Stack) -> None:
    """Point `b`'s config (its own ports) at `a`'s state_dir."""
    b.cfg_path.write_text(b.cfg_path.read_text().replace(str(b.dir / "state"), str(a.dir / "state")))
    b.cfg = config_mod.load(b.cfg_path)


def test_a_second_hub_on_the_same_state_dir_refuses_to_start(stack_factory: Any) -> None:
    a: Stack = stack_factory()
    b: Stack = stack_factory()
    _same_state_dir(a, b)
    a.start_hub()
    assert a.hub_proc is not None
    with a.client() as c:
        assert c.publish("t", {"i": 0}, id="a-0")["seq"] == 1
    r = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(b.cfg_path)], env=b.env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    db = a.dir / "state" / "journal.db"
    assert str(db) in lines[0] and f"pid {a.hub_proc.pid}" in lines[0] and "state_dir" in lines[0], lines[0]
    # The first hub is unaffected: it commits and its seqs go on from where they were.
    assert a.healthy()
    with a.client() as c:
        assert [c.publish("t", {"i": i}, id=f"a-{i}")["seq"] for i in (1, 2)] == [2, 3]
    assert a.status()["hub"]["journal_ok"] is True


def test_the_state_dir_may_hold_characters_a_uri_would_read(tmp_path: Path) -> None:
    """The journal is opened through a `file:` URI: a state_dir with '?', '#', '%' or a space still names itself."""
    from bucketwire.hub.journal import Journal

    d = tmp_path / "a b?c#d%20e"
    j = Journal(d / "journal.db")
    try:
        assert j.heads == {}
    finally:
        j.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b?c#d%20e"]
    assert (d / "journal.db").is_file()


def _hub_refuses(s: Stack) -> str:
    """Start `s`'s hub; it must exit non-zero with one line on stderr (returned), no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", "hub", "-c", str(s.cfg_path)], env=s.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError("the hub started instead of refusing:\n" + out + err) from None
    assert p.returncode != 0, "the hub started:\n" + out + err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _committed_three(s: Stack) -> None:
    s.start_hub()
    with s.client() as c:
        assert [c.publish("t", {"i": i}, id=f"e-{i}")["seq"] for i in range(3)] == [1, 2, 3]


def test_a_journal_truncated_to_nothing_is_refused_not_started_afresh(stack_factory: Any) -> None:
    """A journal.db of 0 bytes (`> journal.db`, a copy or restore that failed) is no journal SQLite can tell from
    a new one: the hub started afresh on it, said nothing, and reused seq 1 for the next event. Every event,
    cursor and dedupe record was gone without a word. It is refused now, in one line, and left as it is."""
    s: Stack = stack_factory()
    _committed_three(s)
    s.kill_hub(signal.SIGTERM)
    db = s.dir / "state" / "journal.db"
    db.write_bytes(b"")
    line = _hub_refuses(s)
    assert str(db) in line and "0 bytes" in line and "backup" in line, line
    assert db.stat().st_size == 0, "the refused journal was written to"


def test_a_journal_deleted_beside_its_write_ahead_log_is_refused(stack_factory: Any) -> None:
    """journal.db gone but its journal.db-wal still there (the database file deleted or moved while the hub was
    down after a kill -9): the hub made a new, empty journal beside the stale log. Refused now, in one line."""
    s: Stack = stack_factory()
    _committed_three(s)
    s.kill_hub(signal.SIGKILL)
    db = s.dir / "state" / "journal.db"
    wal = db.with_name("journal.db-wal")
    assert wal.exists() and wal.stat().st_size > 0, "a hub killed -9 leaves its write-ahead log"
    db.unlink()
    line = _hub_refuses(s)
    assert str(db) in line and "journal.db-wal" in line, line
    assert not db.exists(), "a new journal was made beside the stale log"


def test_a_new_journal_is_made_whole_and_said(stack_factory: Any) -> None:
    """A hub on an empty state_dir makes its journal and says so in its log, so a state_dir whose volume was not
    mounted (an empty directory where the journal should be) is at least not silent."""
    s: Stack = stack_factory()
    _committed_three(s)
    s.kill_hub(signal.SIGTERM)
    log = s.dump_logs()
    assert "created a new, empty journal" in log and str(s.dir / "state" / "journal.db") in log, log
    assert sorted(p.name for p in (s.dir / "state").iterdir() if p.name.startswith("journal.db")) == ["journal.db"]
    s.start_hub()  # the journal it made opens again, its events there
    with s.client() as c:
        assert c.publish("t", {"i": 3}, id="e-3")["seq"] == 4
    s.kill_hub(signal.SIGTERM)
    assert s.dump_logs().count("created a new, empty journal") == 1


def test_a_journal_linked_to_a_volume_that_is_not_mounted_is_refused(stack_factory: Any, tmp_path: Path) -> None:
    """journal.db a symlink into a mount point whose volume is not mounted (the directory is there, empty): SQLite
    followed the link and made a new, empty journal on the wrong disk. Refused now, in one line."""
    s: Stack = stack_factory()
    mount = tmp_path / "mnt-journal"
    mount.mkdir()
    state = s.dir / "state"
    state.mkdir()
    (state / "journal.db").symlink_to(mount / "journal.db")
    line = _hub_refuses(s)
    assert str(state / "journal.db") in line and "not mounted" in line, line
    assert list(mount.iterdir()) == [], "a journal was made behind the link"


def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """The journal's directory cannot be made (its path runs through a file): one line naming the journal and what
    to do, not a traceback (this message once said only "cannot create the state directory", and a new journal
    not written whole took the same branch)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError, match=r"journal.db: cannot open the journal \(Not a directory\).*state_dir"):
        Journal(blocker / "state" / "journal.db")
