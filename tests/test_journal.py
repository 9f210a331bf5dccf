"""The journal on its own: dedup, seqs, retention, durability modes, schema guard."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketwire.hub.journal import CHUNK, DDL, RECENT, SCHEMA, SINGLE, STEP, Batch, Journal, NewEvent, StaleSchemaError


def ev(topic: str, i: int, source: str = "s", body: bytes = b"x" * 100) -> NewEvent:
    return NewEvent(topic, source, f"id-{i}", None, {"b": body.decode(), "seq": None})


def test_seqs_per_topic_and_dedup_on_source_and_id(tmp_path):
    j = Journal(tmp_path / "j.db")
    out = j.commit(Batch(events=[ev("a", 1), ev("b", 2), ev("a", 3), ev("a", 1)]))
    assert [(a.topic, a.seq, a.duplicate) for a in out] == [("a", 1, False), ("b", 1, False), ("a", 2, False),
                                                            ("a", 1, True)]
    out = j.commit(Batch(events=[ev("a", 3), ev("a", 3, source="other")]))
    assert [(a.seq, a.duplicate) for a in out] == [(2, True), (3, False)], "dedup is on (source, id)"
    j.close()
    j = Journal(tmp_path / "j.db")
    assert j.heads == {"a": 3, "b": 1}
    assert [r[0] for r in j.read("a", 1, 10)] == [1, 2, 3]


def test_retention_by_age_and_size_keeps_heads(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("t", i, body=b"y" * 4000) for i in range(500)]))
    assert j.enforce_retention(max_age=3600, max_bytes=10 << 30) == 0
    dropped = j.enforce_retention(max_age=3600, max_bytes=600_000)
    assert dropped > 0 and j.size_bytes() <= 600_000
    assert j.first_seq("t") == dropped + 1, "the oldest go first"
    time.sleep(0.01)  # pacing: let the 1 ms max_age below elapse
    assert j.enforce_retention(max_age=0.001, max_bytes=10 << 30) == 500 - dropped
    assert j.heads["t"] == 500 and j.first_seq("t") is None
    assert j.commit(Batch(events=[ev("t", 1000)]))[0].seq == 501, "seqs never go back after retention"


@pytest.mark.parametrize("durability,level", [("os", 1), ("fsync", 2)])
def test_durability_modes(tmp_path, durability, level):
    j = Journal(tmp_path / "j.db", durability)
    assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.db.execute("PRAGMA synchronous").fetchone()[0] == level


def test_newer_journal_schema_is_refused(tmp_path):
    Journal(tmp_path / "j.db").close()
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(StaleSchemaError, match="newer than this bucketwire understands"):
        Journal(tmp_path / "j.db")


def test_a_newer_journal_is_refused_without_being_changed(tmp_path):
    """An older bucketwire started by mistake on a newer journal (a rollback, a host not yet upgraded) refused it,
    but only after it had made its own tables and columns in it: a table the newer schema no longer has came back
    (empty), a column it dropped was added again, so the newer hub found a journal neither version wrote.
    Refusing must leave the file as it was."""
    Journal(tmp_path / "j.db").close()
    db = sqlite3.connect(tmp_path / "j.db")
    # a schema 99 as a later version might shape it: group_stats gone, cursors without `above`
    db.executescript("""
        UPDATE meta SET value='99' WHERE key='schema';
        DROP TABLE group_stats;
        DROP TABLE cursors;
        CREATE TABLE cursors(grp TEXT NOT NULL, topic TEXT NOT NULL, acked INTEGER NOT NULL, PRIMARY KEY(grp, topic));
    """)
    db.commit()
    shape = sorted(db.execute("SELECT type, name, sql FROM sqlite_master"))
    db.close()
    with pytest.raises(StaleSchemaError, match="newer than this bucketwire understands"):
        Journal(tmp_path / "j.db")
    db = sqlite3.connect(tmp_path / "j.db")
    assert sorted(db.execute("SELECT type, name, sql FROM sqlite_master")) == shape, "the refused journal changed"
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("99",)
    db.close()


def test_wal_stays_bounded_under_sustained_commits_and_nothing_is_lost(tmp_path):
    """Checkpoints run on their own thread; the writer's own checkpoint at AUTOCHECKPOINT_PAGES is what lets the
    WAL start over, so one commit after another never grows it much past that."""
    from bucketwire.hub.journal import AUTOCHECKPOINT_PAGES

    j = Journal(tmp_path / "j.db")
    page = j.db.execute("PRAGMA page_size").fetchone()[0]
    wal = tmp_path / "j.db-wal"
    biggest = 0
    for i in range(12_000):
        j.commit(Batch(events=[ev("t", i, body=b"z" * 1500)]))
        if i % 250 == 0:
            biggest = max(biggest, wal.stat().st_size)
    # a writer checkpoint that meets the background one mid-copy is skipped and retried on the next commit
    assert biggest <= 2 * AUTOCHECKPOINT_PAGES * (page + 24), biggest
    j.close()
    db = sqlite3.connect(tmp_path / "j.db")
    assert db.execute("SELECT count(*), min(seq), max(seq) FROM events").fetchone() == (12_000, 1, 12_000)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_checkpoints_run_in_the_background(tmp_path):
    """Below the writer's own checkpoint threshold, only the checkpoint thread copies the WAL into the database
    file: the file grows to hold the committed events without another commit."""
    j = Journal(tmp_path / "j.db")
    before = (tmp_path / "j.db").stat().st_size
    j.commit(Batch(events=[ev("t", i, body=b"w" * 1500) for i in range(300)]))  # ~150 pages, far below 4096
    deadline = time.monotonic() + 10
    while (tmp_path / "j.db").stat().st_size < before + 300 * 1500 and time.monotonic() < deadline:
        time.sleep(0.05)  # pacing: the poll interval of a wait with a deadline
    assert (tmp_path / "j.db").stat().st_size >= before + 300 * 1500
    j.close()


def test_heads_survive_a_restart_after_retention_dropped_every_event(tmp_path):
    """Heads come back at start-up from the events and the `topics` floors: a topic retention emptied must not
    start over at seq 1 (subscribers and cursors hold its old seqs), one it thinned keeps its last seq."""
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("gone", i) for i in range(5)] + [ev("kept", 100 + i) for i in range(3)]))
    j.commit(Batch(events=[ev("gone", 10 + i) for i in range(4)]))  # heads that moved after the topics' first
    time.sleep(0.01)  # pacing: let the 1 ms max_age below elapse
    assert j.enforce_retention(max_age=0.001, max_bytes=10 << 30) == 12
    j.commit(Batch(events=[ev("kept", 200)]))
    j.close()
    j = Journal(tmp_path / "j.db")
    assert j.heads == {"gone": 9, "kept": 4}
    out = j.commit(Batch(events=[ev("gone", 300), ev("kept", 301)]))
    assert [(a.topic, a.seq) for a in out] == [("gone", 10), ("kept", 5)]
    j.close()


def test_heads_after_a_kill_9(tmp_path):
    """A hub killed right after its commits: heads at the next start are the last committed seqs."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from tests.test_journal import ev\n"
        "from bucketwire.hub.journal import Batch, Journal\n"
        "j = Journal(Path(sys.argv[1]))\n"
        "for n in range(20):\n"
        "    j.commit(Batch(events=[ev('a', n), ev('b' if n % 2 else 'a', 1000 + n)]))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "j.db")], timeout=60)
    assert r.returncode == -signal.SIGKILL
    j = Journal(tmp_path / "j.db")
    assert j.heads == {"a": 30, "b": 10}
    assert j.commit(Batch(events=[ev("b", 5000)]))[0].seq == 11
    j.close()


def test_a_schema_1_journal_opens_with_its_heads(tmp_path):
    """A journal written before heads were derived at start-up (its `topics` held every head, retention had
    emptied a topic) opens with the same heads and continues its seqs."""
    db = sqlite3.connect(tmp_path / "j.db")
    db.executescript(DDL)
    db.execute("INSERT INTO meta VALUES('schema', '1')")
    db.executemany("INSERT INTO topics VALUES(?, ?)", [("a", 7), ("emptied", 40)])
    db.executemany("INSERT INTO events(topic, seq, source, id, objkey, ts, body) VALUES(?,?,?,?,?,?,?)",
                   [("a", s, "s", f"id-{s}", None, time.time(), b"x") for s in (6, 7)])
    db.commit()
    db.close()
    j = Journal(tmp_path / "j.db")
    assert j.heads == {"a": 7, "emptied": 40}
    assert [(a.topic, a.seq) for a in j.commit(Batch(events=[ev("emptied", 99), ev("a", 98)]))] == [
        ("emptied", 41), ("a", 8)]
    assert j.commit(Batch(events=[ev("a", 6)]))[0].duplicate, "dedup still sees the old rows"
    assert j.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(SCHEMA)
    j.close()


@pytest.mark.parametrize("size,at", [(3, 1), (40, 38), (CHUNK + 5, CHUNK + 2)])
def test_a_batch_with_a_duplicate_of_a_committed_event_leaves_no_hole(tmp_path, size, at):
    """New events and duplicates of ones already committed, in one batch (one INSERT, and several with the
    duplicate in the second: 43 rows go as INSERTs of 32 and 11, CHUNK + 8 as CHUNK and 8): each duplicate
    answers with its original seq and body, the new ones take the next seqs with no gap, and each new body is
    rendered with its final seq."""
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("t", i) for i in range(3)]))
    batch = [ev("t", 100 + i) for i in range(size)]
    batch.insert(at, ev("t", 1))
    batch.append(ev("u", 2))  # a duplicate whose topic differs from its original's
    batch.append(ev("t", 100))  # a duplicate within the batch
    out = j.commit(Batch(events=batch))
    assert (out[at].seq, out[at].duplicate, out[at].body) == (2, True, b'{"b":"' + b"x" * 100 + b'","seq":"2"}')
    assert (out[-2].topic, out[-2].seq, out[-2].duplicate) == ("t", 3, True)
    assert (out[-1].seq, out[-1].duplicate) == (4, True)
    assert [a.seq for a in out if not a.duplicate] == list(range(4, 4 + size))
    assert all(json.loads(a.body)["seq"] == str(a.seq) for a in out)
    assert j.heads == {"t": 3 + size}
    j.close()
    j = Journal(tmp_path / "j.db")
    assert [r[0] for r in j.read("t", 1, 1000)] == list(range(1, 4 + size)), "no hole, nothing twice"
    assert j.heads == {"t": 3 + size}
    j.close()


def test_commits_of_every_size_reuse_a_bounded_set_of_insert_statements(tmp_path):
    """A hub whose commits come in every size from 1 to CHUNK + 40 writes them with a bounded set of INSERT texts
    (sqlite3 keeps 128 prepared; one text per size made most commits prepare theirs anew), a size that comes back
    is one INSERT, and every event lands at its seq with its body, none twice."""
    j = Journal(tmp_path / "j.db")
    texts: list[str] = []
    j.db.set_trace_callback(lambda sql: texts.append(sql) if sql.startswith("INSERT INTO events") else None)
    sizes = list(range(1, CHUNK + 41))
    sizes = sizes[::2] + sizes[1::2]  # no two neighbours of one size
    n = 0
    for k in sizes:
        out = j.commit(Batch(events=[ev("t", n + i) for i in range(k)]))
        assert [a.seq for a in out] == list(range(n + 1, n + k + 1))
        n += k
    distinct = {t.split(" VALUES ")[1].count("(") for t in texts}
    assert len(distinct) <= SINGLE + CHUNK // STEP + 1 + RECENT, sorted(distinct)
    assert max(distinct) == CHUNK
    per_commit = []
    for _ in range(3):  # a size not seen lately is cut (96 + 4); once it comes back, it is one INSERT
        texts.clear()
        j.commit(Batch(events=[ev("t", n + i) for i in range(100)]))
        per_commit.append(len(texts))
        n += 100
    assert per_commit == [2, 1, 1]
    rows = j.read("t", 1, n + 10)
    assert [r[0] for r in rows] == list(range(1, n + 1))
    assert all(json.loads(r[2])["seq"] == str(r[0]) for r in rows)
    j.close()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batches=st.lists(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 12)), max_size=30),
                        min_size=1, max_size=3))
def test_seqs_follow_each_topic_through_interleaved_batches(tmp_path_factory, batches):
    """Whatever the order of topics in a batch (runs of one topic, or interleaved) and wherever a duplicate
    falls, each new event takes its topic's next seq, a duplicate answers with its original's topic and seq, and
    the heads are each topic's last seq, in memory and after a reopen."""
    path = tmp_path_factory.mktemp("seqs") / "j.db"
    j = Journal(path)
    heads: dict[str, int] = {}
    first: dict[int, tuple[str, int]] = {}
    for batch in batches:
        want = []
        for topic, i in batch:
            if i not in first:
                heads[topic] = heads.get(topic, 0) + 1
                first[i] = (topic, heads[topic])
                want.append((topic, heads[topic], False))
            else:
                want.append((*first[i], True))
        out = j.commit(Batch(events=[ev(topic, i) for topic, i in batch]))
        assert [(a.topic, a.seq, a.duplicate) for a in out] == want
        assert all(json.loads(a.body)["seq"] == str(a.seq) for a in out)
        assert j.heads == heads
    j.close()
    j = Journal(path)
    assert j.heads == heads
    j.close()


def test_retry_attempts_are_stored_replaced_deleted_and_survive_a_reopen(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(attempts={("g", "t", 1): 1, ("g", "t", 2): 2, ("h", "t", 1): 1},
                   due={("g", "t", 1): 1000.5, ("g", "t", 2): 2000.0}, waits={("g", "t", 1): 0.5, ("g", "t", 2): 4.0,
                                                                            ("h", "t", 1): 9.0}))
    j.commit(Batch(attempts={("g", "t", 1): 2, ("g", "t", 2): 0}, due={("g", "t", 1): 3000.0},  # 0: acked
                   waits={("g", "t", 1): 60.0}))
    j.close()
    j = Journal(tmp_path / "j.db")
    assert j.attempts_of("g") == {("t", 1): 2} and j.retries_due("g") == {("t", 1): 3000.0}
    assert j.retry_waits("g") == {("t", 1): 60.0}  # replaced with its retry; gone with the acked one
    assert j.retry_waits("h") == {("t", 1): 9.0}
    j.forget_group("h")  # `group rm`: a later group of that name starts every event at its first attempt
    assert j.attempts_of("h") == {} and j.attempts_of("g") == {("t", 1): 2} and j.retry_waits("h") == {}
    assert j.db.execute("SELECT count(*) FROM retry_waits WHERE grp='h'").fetchone()[0] == 0
    # retention drops the events: their counts go too (nothing would load those events again to ack them)
    j.commit(Batch(events=[ev("t", i) for i in range(3)], attempts={("g", "t", 3): 1}))
    assert j.attempts_of("g") == {("t", 1): 2, ("t", 3): 1}
    j.db.execute("UPDATE events SET ts = 0 WHERE seq <= 2")
    assert j.enforce_retention(max_age=3600, max_bytes=10 << 30) == 2
    assert j.attempts_of("g") == {("t", 3): 1}
    assert j.db.execute("SELECT count(*) FROM retry_waits").fetchone()[0] == 0  # seq 1's went with its row


def _unsent_forms() -> list[dict]:
    """Envelopes whose `pre_render` takes each of its forms: the plain one; the slot's text also in `data`, after
    the seq (the seq's own place is the first); an extension holding an object in front of the seq, and a value
    orjson refuses (both rendered whole at the commit); `data_base64` (committed without `"data": null`)."""
    from bucketwire.devstack.bench.bus import payload
    from bucketwire.envelope import UNSET_SEQ, Event, unsent_of
    slot = {"seq": UNSET_SEQ}
    ds = [payload(1, 0.0), {**payload(2, 0.0), "data": {**payload(2, 0.0)["data"], "x": slot}},
          {**payload(3, 0.0), "myext": slot}, {**payload(4, 0.0), "data": {"big": 2**70}},
          {**payload(5, 0.0), "data_base64": "AAEC", "data": None}]
    return [unsent_of(Event.from_dict(d), "t") for d in ds]


@pytest.mark.parametrize("second_pass", [False, True])
def test_every_pre_rendered_form_is_committed_with_its_seq_in_its_place(tmp_path, second_pass):
    """What the journal commits from each `pre_render` form (and from bytes made elsewhere) is the envelope written
    whole with its seq, byte for byte; `second_pass`: with a duplicate in the batch, so `_assign` runs twice."""
    from bucketwire.envelope import DATA_BASE64, SEQ_SLOT, pre_render
    envs = _unsent_forms()
    forms = {type(pre_render(dict(e))) for e in envs}
    assert dict in forms and len(forms) == 2, forms  # the fast form and the whole one both tried
    j = Journal(tmp_path / "j.db")
    j.commit(Batch(events=[ev("t", 0), ev("t", 1)]))  # seqs 1, 2: the new ones start at 3
    batch = [NewEvent("t", e["source"], e["id"], None, pre_render(dict(e))) for e in envs]
    batch.append(NewEvent("t", "s", "raw", None, b'{"a":1,' + SEQ_SLOT + b',"b":"' + SEQ_SLOT + b'"}'))
    if second_pass:
        batch.insert(2, ev("t", 1))
    out = [a for a in j.commit(Batch(events=batch)) if not a.duplicate]
    assert [a.seq for a in out] == list(range(3, 3 + len(envs) + 1))
    for a, e in zip(out, envs, strict=False):
        whole = {k: str(a.seq) if k == "seq" else v for k, v in e.items()
                 if k != "data" or v is not None or DATA_BASE64 not in e}
        assert a.body == json.dumps(whole, separators=(",", ":"), ensure_ascii=False).encode()
    assert out[-1].body == b'{"a":1,"seq":"%d","b":"%b"}' % (out[-1].seq, SEQ_SLOT)
    assert [r[2] for r in j.read("t", 3, 100)] == [a.body for a in out]
    j.close()
