"""A consumer group behind retention: the README says it skips what retention dropped, counted. The operator must
be told, in the places they look: the hub's log, `bucketwire status` and /metrics. It was one number in the status
JSON (in memory, gone at the next restart), with no log line, nothing in `status`'s text and no metric: a group
could lose events to retention with nobody seeing it.

A real hub process. Retention itself runs every minute; its outcome for this test (the oldest events of a topic
gone from the journal while a group's cursor is still before them) is made with the hub stopped, by deleting those
rows as retention does.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from typing import Any

from tests.fixtures_hub import wait_for


def five_events_the_first_three_dropped(s: Any) -> None:
    """Topic x with seqs 1-5 committed, 1-3 then dropped as retention drops them, the hub running again."""
    s.start_hub()
    with s.client() as c:
        for i in range(5):
            c.publish("x", {"i": i})
    s.kill_hub(15)  # SIGTERM: a clean stop
    db = sqlite3.connect(s.dir / "state" / "journal.db")
    with db:
        assert db.execute("DELETE FROM events WHERE topic = 'x' AND seq <= 3").rowcount == 3
    db.close()
    s.start_hub()


def test_a_group_behind_retention_is_told_in_the_log_status_and_metrics(stack_factory: Any) -> None:
    s = stack_factory('[groups.late]\ntopics = ["x"]\nplugins = []\n')
    five_events_the_first_three_dropped(s)

    line = wait_for(lambda: next((ln for ln in s.logs[-1].read_text().splitlines() if "retention" in ln), None),
                    20, "a log line about the events group late lost to retention")
    assert "late" in line and "x" in line and "3" in line, line
    assert s.metric("bucketwire_group_skipped_by_retention_total", group="late", topic="x") == 3
    out = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(s.cfg_path)], env=s.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    hint = next((ln for ln in out.stdout.splitlines() if "dropped by retention" in ln), None)
    assert hint is not None and "late" in hint and "3" in hint, out.stdout


def test_tail_from_a_seq_retention_dropped_says_what_it_cannot_print(stack_factory: Any) -> None:
    """`tail --from-seq 1` promises every envelope from seq 1 with no gap; it went on from the oldest one left
    without a word, so a reader of its output could not tell a gap from a topic that never had those events."""
    s = stack_factory()
    five_events_the_first_three_dropped(s)
    err = s.dir / "tail.err"
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", "tail", "-c", str(s.cfg_path), "--from-seq", "1", "x"],
                         env=s.env, stdout=subprocess.PIPE, stderr=err.open("wb"), text=True)
    try:
        assert p.stdout is not None
        seqs = [json.loads(p.stdout.readline())["seq"] for _ in range(2)]
        assert seqs == ["4", "5"] or seqs == [4, 5], seqs
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(20)
    text = err.read_text()
    line = next((ln for ln in text.splitlines() if "retention" in ln), None)
    assert line is not None and "x" in line and "1-3" in line, text


def test_a_replay_from_below_retention_says_what_it_delivers_and_raises_no_retention_alarm(stack_factory: Any) -> None:
    """`replay --from-seq 1` on a topic whose seqs 1-3 retention dropped said `5 event(s) to deliver again` and
    delivered 2; the group then skipped 1-3 as events lost to retention, so the hub logged a warning and `status`
    told the operator that group had lost 3 events it had in fact handled. The replay starts at the oldest event
    the journal holds and says which seqs retention took."""
    s = stack_factory('[groups.g]\ntopics = ["x"]\nplugins = []\nstart = "earliest"\n')
    s.start_hub()
    w = s.start_worker("g", 1)
    with s.client() as c:
        for i in range(5):
            c.publish("x", {"i": i})
    wait_for(lambda: s.status()["groups"]["g"]["topics"]["x"]["cursor"] == 5, 30, "group g acked seqs 1-5")
    s.kill_hub(15)  # SIGTERM: a clean stop; the pool waits for the hub and reconnects
    db = sqlite3.connect(s.dir / "state" / "journal.db")
    with db:
        assert db.execute("DELETE FROM events WHERE topic = 'x' AND seq <= 3").rowcount == 3
    db.close()
    s.start_hub()
    wait_for(lambda: s.status()["groups"]["g"]["workers"] == 1, 30, "the pool back")
    out = subprocess.run([sys.executable, "-m", "bucketwire", "replay", "-c", str(s.cfg_path), "--group", "g",
                          "--from-seq", "1", "--timeout", "30"], env=s.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cursor 5 -> 3, 2 event(s) to deliver again" in out.stderr and "1-3" in out.stderr, out.stderr
    wait_for(lambda: [r["s"] for r in s.handled() if r["g"] == "g"][5:] == [4, 5], 30, "seqs 4 and 5 again")
    wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0, 30, "group g caught up")
    st = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(s.cfg_path)], env=s.env,
                        capture_output=True, text=True, timeout=30)
    assert "retention" not in st.stdout, st.stdout
    assert "retention" not in s.logs[-1].read_text().split("replay requested")[-1], s.logs[-1].read_text()
    w.send_signal(signal.SIGTERM)
