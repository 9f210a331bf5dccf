"""The journal's key filter (hub/key_filter.py): a commit staged in the front log skips SQLite's dedup index when
the filter says a key is certainly not in the journal. The one thing it must never do is say "not there" for a key
the journal holds: then a duplicate would be handed out again under a new seq. Real SQLite tables, a real thread.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import uuid
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bucketwire.hub.journal import Batch, Journal, NewEvent
from bucketwire.hub.key_filter import KeyFilter


def ev(i: int, source: str = "s") -> NewEvent:
    return NewEvent("a", source, f"id-{i}", None, {"b": "x", "seq": None})


def table(path: Path, keys: list[tuple[str, str]]) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events(rowid INTEGER PRIMARY KEY, source TEXT, id TEXT)")
    db.executemany("INSERT INTO events(source, id) VALUES(?, ?)", keys)
    db.commit()
    db.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=200))
def test_every_key_added_is_held(keys):
    f = KeyFilter()
    f.ready = True
    f.add(keys)
    assert all(f.may_hold(k) for k in keys)


def test_until_its_build_is_in_every_key_may_be_there(tmp_path):
    table(tmp_path / "t.db", [("s", "old")])
    f = KeyFilter()
    assert f.may_hold(("s", "anything"))
    f.build(lambda: sqlite3.connect(tmp_path / "t.db"), 1, 1)
    assert f.may_hold(("s", "anything")) or f.ready
    f.join()
    assert f.ready and f.may_hold(("s", "old"))
    assert sum(f.may_hold(("s", f"new-{i}")) for i in range(10_000)) < 10, "mostly certain answers once built"


def test_keys_committed_while_it_builds_are_kept(tmp_path):
    old = [("s", f"old-{i}") for i in range(5000)]
    table(tmp_path / "t.db", old)
    f = KeyFilter()
    f.build(lambda: sqlite3.connect(tmp_path / "t.db"), 5000, 5000, pending=[("s", "staged")])
    f.add([("s", f"during-{i}") for i in range(100)])  # committed after rowid 5000: the build does not read them
    f.join()
    assert all(f.may_hold(k) for k in old)
    assert all(f.may_hold(("s", f"during-{i}")) for i in range(100))
    assert f.may_hold(("s", "staged"))


def test_a_rebuild_forgets_keys_the_journal_no_longer_holds_and_keeps_the_rest(tmp_path):
    path = tmp_path / "t.db"
    table(path, [("s", f"k-{i}") for i in range(1000)])
    f = KeyFilter()
    f.build(lambda: sqlite3.connect(path), 1000, 1000)
    f.join()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM events WHERE rowid <= 900")  # retention
    db.commit()
    db.close()
    f.build(lambda: sqlite3.connect(path), 1000, 1000)
    f.add([("s", "late")])
    assert all(f.may_hold(("s", f"k-{i}")) for i in range(1000)), "the old filter answers until the new one is in"
    f.join()
    assert not any(f.may_hold(("s", f"k-{i}")) for i in range(900))
    assert all(f.may_hold(("s", f"k-{i}")) for i in range(900, 1000)) and f.may_hold(("s", "late"))


def test_a_duplicate_of_an_event_from_before_a_restart_is_found_before_and_after_the_build(tmp_path):
    j = Journal(tmp_path / "j.db")
    first = j.commit(Batch(events=[ev(1), ev(2)]))
    j.close()
    j = Journal(tmp_path / "j.db")
    again = j.commit(Batch(events=[ev(1)]))  # the build may still run: the index answers
    assert again[0].duplicate and again[0].seq == first[0].seq
    j._keys.join()
    assert j._keys.ready and j._keys.may_hold(("s", "id-2"))
    again = j.commit(Batch(events=[ev(2)]))
    assert again[0].duplicate and again[0].seq == first[1].seq
    j.close()


def test_keys_of_a_large_commit_straight_into_sqlite_reach_the_filter(tmp_path):
    j = Journal(tmp_path / "j.db")
    j._keys.join()
    big = j.commit(Batch(events=[ev(i) for i in range(50)]))
    assert j._pending is None
    out = j.commit(Batch(events=[ev(7)]))  # staged only if the filter were sure id-7 is new
    assert out[0].duplicate and out[0].seq == big[7].seq
    j.close()


KEYS = st.tuples(st.text(max_size=12), st.text(max_size=24))


@settings(max_examples=40, deadline=None)
@given(st.lists(KEYS, max_size=60), st.lists(KEYS, max_size=20), st.lists(KEYS, max_size=20),
       st.lists(KEYS, max_size=60), st.lists(KEYS, max_size=60))
def test_never_not_there_for_a_key_the_journal_holds(held, pending, during, after, others):
    """Differential against the set of keys the journal holds: in the journal when the build read it, staged
    (`pending`), committed while it ran and after it was taken in. Whatever else is asked, no key of the set is
    ever "not there" (a "maybe" for a key not in it is allowed)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.db"
        table(path, held)
        f = KeyFilter()
        f.build(lambda: sqlite3.connect(path), len(held), len(held), pending=pending)
        f.add(during)
        f.join()
        f.add(after)
        journal = set(held) | set(pending) | set(during) | set(after)
        assert f.ready
        assert [k for k in [*journal, *others] if k in journal and not f.may_hold(k)] == []


def test_false_maybe_rate_at_capacity_is_at_most_one_in_200():
    """Full to the keys it was sized for, the filter says "maybe" to at most 1 new key in 200 (each one is a
    lookup in SQLite's dedup index, 18-37 µs). Keys shaped as a bus's (one source, uuid ids) and as S3's (a few
    sources, counters)."""
    rng = random.Random(25)
    shapes = {
        "uuid": lambda tag, i: ("bench", str(uuid.UUID(int=rng.getrandbits(128)))),
        "counter": lambda tag, i: (f"s3:minio/bucket-{i % 7}", f"{tag}-{i}"),
    }
    for name, make in shapes.items():
        f = KeyFilter()
        f.ready = True
        held = [make("a", i) for i in range(f.capacity)]
        for b in range(0, len(held), 4096):
            f.add(held[b:b + 4096])
        assert all(map(f.may_hold, held))
        new = [make("b", i) for i in range(200_000)]
        rate = sum(map(f.may_hold, new)) / len(new)
        assert rate <= 1 / 200, (name, rate)
