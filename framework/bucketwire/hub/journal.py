"""The hub's durable log: SQLite in WAL mode, written by exactly one thread (the hub loop).

Group commit comes from the loop's shape rather than from a timer: the loop drains every request that has
arrived (webhook POSTs, publishes, worker acks) and writes them in one transaction, so under load many events
share one commit and at low load nothing waits. `durability = "os"` (synchronous=NORMAL) survives a kill -9 of
the hub, because a committed WAL frame is in the OS page cache; `"fsync"` (synchronous=FULL) also survives
power loss, at the cost of one fsync per batch.

Checkpoints (copying the WAL back into the database file, with an fsync of each) run on their own thread and
connection, see `_Checkpointer`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import msgspec

from bucketwire.envelope import Unsent, render
from bucketwire.hub.journal_front import ROW, Acks, FrontLog
from bucketwire.hub.journal_mark import MARK_INTERVAL, MARK_SHARE, HighWater, Issued
from bucketwire.hub.key_filter import KeyFilter

log = logging.getLogger("bucketwire.journal")

SCHEMA = 2
"""1: `topics.head` was every topic's head, upserted by every commit. 2: it is a floor, written at a topic's first
event and before retention drops events; a head is the larger of it and the topic's highest seq in `events`.
A schema 1 journal is a valid schema 2 one (its heads are floors); a bucketwire that knows only 1 refuses a 2,
whose `topics` it would take for heads and reuse seqs from."""
CHECKPOINT_INTERVAL = 0.1
"""Seconds between background checkpoints. With durability "os" the WAL is fsynced at them, so this is what a power
loss can take; 0.5 s would save ~0.9 µs of CPU per event at saturation (docs/performance.md, "Closing the gap",
item 11), not worth five times the window."""
AUTOCHECKPOINT_PAGES = 4096
"""WAL pages (16 MiB) after which the writer checkpoints itself; by then the background has done nearly all of it,
and a checkpoint by the writer is what lets the WAL start over instead of growing under sustained load."""
CHUNK = 400
"""Rows per multi-row statement (7 parameters each; SQLite allows 32766 per statement)."""
SINGLE = 32
STEP = 32
RECENT = 32
"""A commit of up to SINGLE events, or of a multiple of STEP below CHUNK, is one INSERT of that many rows; a larger
one is cut into INSERTs of CHUNK rows, a multiple of STEP rows and what is left (under STEP), unless its size
came up lately (one of the last RECENT other sizes): then it is one INSERT too. So at most SINGLE + CHUNK / STEP + 1
+ RECENT statement texts are in use, which sqlite3's statement cache (128) keeps prepared. One text per batch size,
as before, made a hub whose commits vary in size prepare most of its INSERTs anew, a few hundred rows' worth of
parsing and code generation each: in-process, commits of 1-400 events (sizes uniform) cost 7.4 us per event that
way, 5.6 cut so; commits of one size stay one INSERT. Caching every size instead would hold ~67 MB of prepared
statements."""
FRONT_EVENTS = 8
"""Commits of at most this many events go through the front log (hub/journal_front.py): what waits on them is a
publisher's confirmation and a worker's DELIVER, at a modest rate one event each. Larger ones come under load,
where a batch's rows written twice would cost more CPU than the front log saves latency: they go straight into
SQLite."""
SETTLE_EVENTS = 32
"""Staged events (front-log commits) after which `settle` writes them into SQLite whatever the time: one transaction
for many small commits, the B-trees' pages and the COMMIT's WAL frames paid once for all of them (docs/performance.md,
change 27)."""
SETTLE_BYTES = 256 << 10
"""Envelope bytes staged after which `settle` writes them whatever the time or count: the rows are held in memory
until then, and large events gain nothing from sharing a transaction (their pages are most of its cost)."""
SETTLE_AFTER = 0.01
"""Seconds a staged commit may wait for others to be written into SQLite with it (`settle`); the hub's loop settles
by then when traffic stops. At 1,000/s 10 ms costs the journal the CPU 20 ms did (208 and 210 µs per event
in-process) and holds the loop ~0.3 ms per settle instead of ~0.45: a settle under way when the next event comes
delayed 3-11 events in 8 s, against 16-103 at 20 ms (docs/performance.md, change 29)."""
RESTORED_LISTED = 20
"""Topics whose restore gap `status` names (the log line has them all)."""
PROBE_BYTES = 1 << 20
"""Bytes the write probe puts in a scratch file: room for about one full webhook body's commit."""

DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS topics(name TEXT PRIMARY KEY, head INTEGER NOT NULL);  -- head: a floor (SCHEMA)
CREATE TABLE IF NOT EXISTS events(
    rowid INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    objkey TEXT,
    ts REAL NOT NULL,
    body BLOB NOT NULL,
    UNIQUE(topic, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedup ON events(source, id);
CREATE TABLE IF NOT EXISTS cursors(grp TEXT NOT NULL, topic TEXT NOT NULL, acked INTEGER NOT NULL,
                                   above TEXT NOT NULL DEFAULT '', PRIMARY KEY(grp, topic));
CREATE TABLE IF NOT EXISTS group_stats(grp TEXT PRIMARY KEY, dead_lettered INTEGER NOT NULL DEFAULT 0,
                                       retried INTEGER NOT NULL DEFAULT 0, redelivered INTEGER NOT NULL DEFAULT 0);
-- Attempts used by events that failed and wait for a retry (due: unix time), so a restart does not give a failing
-- event max_attempts fresh tries. A row lives from a failure to the event's ack or dead letter. Added without a
-- schema bump: a hub that predates it opens the journal and ignores it.
CREATE TABLE IF NOT EXISTS retries(grp TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
                                   attempts INTEGER NOT NULL, due REAL NOT NULL, PRIMARY KEY(grp, topic, seq))
                                   WITHOUT ROWID;
-- How long each of those retries was scheduled to wait: a hub loading them after the clock stepped back waits no
-- longer than that, whatever `due` now says. A table of its own, not a column of `retries`: a hub that predates
-- it writes `retries` unchanged (its rows are then read without a wait, as before) and ignores this one.
CREATE TABLE IF NOT EXISTS retry_waits(grp TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
                                       wait REAL NOT NULL, PRIMARY KEY(grp, topic, seq)) WITHOUT ROWID;
"""


def insert_sizes(n: int, recent: OrderedDict[int, None]) -> list[int]:
    """The rows of each INSERT a commit of `n` events is written with (see SINGLE). `recent`: the other sizes
    written as one INSERT lately, most recent last (updated here)."""
    if n <= SINGLE or n == CHUNK or (n < CHUNK and n % STEP == 0):
        return [n] if n else []
    if n < CHUNK:
        if n in recent:  # a size that comes back (steady traffic in requests of one size): one INSERT, cached
            recent.move_to_end(n)
            return [n]
        recent[n] = None
        if len(recent) > RECENT:
            recent.popitem(last=False)
    out = [CHUNK] * (n // CHUNK)
    rest = n % CHUNK
    if rest > SINGLE:
        out.append(rest - rest % STEP)
        rest %= STEP
    if rest:
        out.append(rest)
    return out


def _insert_sql(k: int) -> str:
    sql = _INSERTS[k] = ("INSERT INTO events(topic, seq, source, id, objkey, ts, body) VALUES "
                         + ",".join(["(?,?,?,?,?,?,?)"] * k))
    return sql


_INSERTS: dict[int, str] = {}
"""The INSERT's text per row count, built once (at most CHUNK of them): joining ~400 row placeholders for every
commit cost more than the lookup."""


class JournalError(Exception):
    """The journal could not commit (disk full, I/O error); ingress answers 503 so senders retry."""


class RemovalUnfinished(JournalError):
    """`forget_group` stored the group's removal but could not delete all of its keys: the group is removed (no
    hub reads what it left), and `finish_removal` (a `group rm` again) deletes the rest."""


class StaleSchemaError(JournalError):
    """The state directory was written by a newer bucketwire."""


class NewEvent(msgspec.Struct):
    """An event to append. `envelope`: its `pre_render`ed envelope, which `render` finishes once the seq is known.

    NewEvent and Appended (and the dispatcher's `Item`) are made once per event on the hub's path, so they are
    msgspec Structs: built in C, where a dataclass runs a Python `__init__` (~0.3 us each on the bench machine);
    Appended and Item, holding no containers, are not tracked by the garbage collector either (a NewEvent holds its
    envelope's parts, a tuple, or its dict)."""

    topic: str
    source: str
    id: str
    objkey: str | None
    envelope: Unsent


class Appended(msgspec.Struct):
    topic: str
    seq: int
    body: bytes
    objkey: str | None
    duplicate: bool = False


@dataclass
class Batch:
    events: list[NewEvent] = field(default_factory=list)
    cursors: dict[tuple[str, str], int] = field(default_factory=dict)
    above: dict[tuple[str, str], str] = field(default_factory=dict)
    stats: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    attempts: dict[tuple[str, str, int], int] = field(default_factory=dict)
    """(group, topic, seq) -> attempts used, 0 to forget: what a restarted hub (or, with JetStream, the next
    dispatcher) goes on counting from."""
    due: dict[tuple[str, str, int], float] = field(default_factory=dict)
    """(group, topic, seq) -> unix time the next attempt is due, stored beside `attempts`."""
    waits: dict[tuple[str, str, int], float] = field(default_factory=dict)
    """(group, topic, seq) -> the seconds that retry was scheduled to wait, stored beside `due` (see
    `retry_waits`)."""


def acks_of(batch: Batch) -> Acks | None:
    """A staged commit's acks as its front log record holds them (journal_front.Acks); None when it has none."""
    if not (batch.cursors or batch.stats or batch.attempts):
        return None
    above, due, waits = batch.above, batch.due, batch.waits
    return [[[g, t, a, above.get((g, t), "")] for (g, t), a in batch.cursors.items()],
            [[g, *v] for g, v in batch.stats.items()],
            [[g, t, q, n, due.get((g, t, q)), waits.get((g, t, q))] for (g, t, q), n in batch.attempts.items()]]


def batch_of(acks: Acks) -> Batch:
    """The acks of a front log record as the `Batch` that carried them (no events: those are its rows). An entry
    not of the form `acks_of` writes is left out (its record checked out, so only a hub of another version could
    have written it)."""
    b = Batch()
    cursors, stats, attempts = acks
    for c in cursors:
        if len(c) == 4 and type(c[0]) is str and type(c[1]) is str and type(c[2]) is int and type(c[3]) is str:
            b.cursors[(c[0], c[1])] = c[2]
            b.above[(c[0], c[1])] = c[3]
    for v in stats:
        if len(v) == 4 and type(v[0]) is str and all(type(x) is int for x in v[1:]):
            b.stats[v[0]] = (int(v[1]), int(v[2]), int(v[3]))  # type: ignore[call-overload]
    for r in attempts:
        if len(r) == 6 and type(r[0]) is str and type(r[1]) is str and type(r[2]) is int and type(r[3]) is int:
            k = (r[0], r[1], r[2])
            b.attempts[k] = r[3]
            if isinstance(r[4], (int, float)) and type(r[4]) is not bool:
                b.due[k] = float(r[4])
            if isinstance(r[5], (int, float)) and type(r[5]) is not bool:
                b.waits[k] = float(r[5])
    return b


@dataclass(slots=True)
class _Staged:
    """Commits in the front log, not yet in SQLite: written there together, in one transaction (`settle`)."""

    batches: list[Batch]
    """Their cursors, counters and attempts, in commit order (for a replay: the acks its records held)."""
    rows: list[object]
    """Their rows, in commit order (so in seq order within each topic)."""
    heads: dict[str, int]
    """Topic -> its last seq in `rows`."""
    before: dict[str, int]
    """Topic -> its head in SQLite (the seq before its first in `rows`)."""
    due: float = 0.0
    """Monotonic time by which the first of them is to be written (`settle`)."""
    size: int = 0
    """Their envelopes' bytes (see SETTLE_BYTES)."""
    failed: bool = False
    """SQLite refused them: nothing more is staged on top (commits settle first, and are refused meanwhile)."""
    replay: bool = False
    """What a start found in the front log: once it is in SQLite the file starts over."""


class JournalAPI(Protocol):
    """What the hub asks of its journal; `Journal` (SQLite, below) and `JetStreamJournal` (hub/journal_jetstream.py)
    both stand behind it, so the hub's loop, ops and ingress never depend on one backend's storage.

    Everything is called from the hub's loop thread only.
    """

    heads: dict[str, int]
    """Topic -> last committed seq, kept current by `commit`."""
    restored: dict[str, object] | None
    """What this start found lost to a journal restored from an older backup (SQLite only), or None."""

    def lost_to_restore(self, topic: str, first: int, count: int) -> int:
        """How many of the seqs `first`..`first + count - 1` of `topic` are gone with a restore (not retention)."""
        ...

    def commit(self, batch: Batch) -> list[Appended]:
        """Make the batch durable and return its events' seqs. Some of the writing may wait for `settle`."""
        ...
    def settle(self, now: float | None = None) -> float | None:
        """Finish what `commit` left for later. Without `now`, all of it. With `now` (the loop's monotonic clock; the
        loop calls it once a commit's DELIVERs and confirmations are sent) it may wait to write several commits'
        leftovers at once: it returns the monotonic time by which it wants to be called again (None: nothing is
        left). Whatever is left is durable already, and whatever needs it written (a read, retention, a commit that
        cannot wait, `close`) writes it first. JournalError when it cannot be written now: what it holds is durable
        and is written at the next `settle` or `commit`, or at the next start."""
        ...
    def read(self, topic: str, from_seq: int, limit: int) -> list[tuple[int, str | None, bytes]]: ...
    def first_seq(self, topic: str) -> int | None: ...
    def first_seq_since(self, topic: str, since: float) -> int | None: ...
    def cursors(self) -> dict[tuple[str, str], int]: ...
    def cursor_above(self) -> dict[tuple[str, str], str]: ...
    def group_stats(self) -> dict[str, tuple[int, int, int]]: ...
    def attempts_of(self, group: str) -> dict[tuple[str, int], int]:
        """Attempts used by events of `group` that failed and are not yet acked or dead-lettered: (topic, seq) ->
        count."""
        ...
    def retries_due(self, group: str) -> dict[tuple[str, int], float]:
        """When (unix time) the next attempt of each of those events is due."""
        ...
    def retry_waits(self, group: str) -> dict[tuple[str, int], float]:
        """How long each of those retries was scheduled to wait, in seconds, where it is known (a hub that
        predates it stored none): the longest a hub loading it should wait, whatever the clock did since."""
        ...
    def forget_group(self, group: str) -> None:
        """Remove the group's cursors, counters and attempt counts. Raises RemovalUnfinished when the removal is
        stored but some keys are left (a journal whose removal is not one write), JournalError when nothing was
        done."""
        ...
    def finish_removal(self, group: str) -> int | None:
        """For a group this hub does not know: None when the journal holds no removal of it; else the removal's
        leftover keys are deleted, and how many there were is returned (RemovalUnfinished: still some left)."""
        ...
    def stored_cursors(self, group: str) -> dict[str, int]:
        """Topic -> acked seq of every cursor the journal holds of `group`, read now (with several hubs: what the
        cluster holds, whoever wrote it): what `group rm` of a group no hub runs deletes."""
        ...
    def probe(self) -> str | None: ...
    def size_bytes(self) -> int: ...
    def event_room(self) -> int | None:
        """The most bytes one event may take in the backend's message, its envelope and its object key counted
        together (the hub refuses larger events before they reach a commit); None: no limit of the backend's."""
        ...
    def enforce_retention(self, max_age: float, max_bytes: int, chunk: int = 5000) -> int: ...
    def close(self) -> None: ...


class Journal:
    def __init__(self, path: Path, durability: str = "os") -> None:
        cannot = (f"{path}: cannot open the journal ({{}}); check that its disk has free space and the directory is "
                  "writable, or set [hub] state_dir to one that is")
        try:
            self._open(path, durability)
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise JournalError(cannot.format(e)) from None
            pid = _lock_holder(path)
            who = f"another process (pid {pid})" if pid else "another process"
            raise JournalError(f"{who} holds {path} (another hub with this state_dir?); stop it, or give this hub "
                               "its own [hub] state_dir") from None
        except sqlite3.DatabaseError as e:
            if e.sqlite_errorcode not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise JournalError(cannot.format(e)) from None
            raise JournalError(f"{path}: not a readable journal ({e}): truncated, or overwritten? restore it from a "
                               "backup (docs/operations.md, \"Backups\")") from None
        except sqlite3.Error as e:  # a full disk or an unwritable directory: one line, not a traceback
            raise JournalError(cannot.format(e)) from None
        except OSError as e:  # the state directory not made, or a new journal not written whole (`_create`)
            raise JournalError(cannot.format(e.strerror or e)) from None

    def _open(self, path: Path, durability: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        _refuse_lost(path)
        if not path.exists():
            _create(path)
        # Multi-row statements differ in length with the batch: cache enough of them. The first read takes the
        # file's lock for good (`_connect`); a hub still letting go of it gets a second.
        self.db = _connect(path, timeout=1.0, cached_statements=1024)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durability == 'fsync' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        max_pages = os.environ.get("BUCKETWIRE_JOURNAL_MAX_PAGES")
        if max_pages:  # hidden test knob: a tiny "disk" to exercise the journal-full path without root mounts
            self.db.execute(f"PRAGMA max_page_count={int(max_pages)}")
        # The schema is read before anything is written: a newer journal refused after this version had made its
        # own tables and columns in it (a table the newer one dropped came back, empty) was one neither wrote.
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if has_meta else None
        if row is not None and int(row[0]) > SCHEMA:
            raise StaleSchemaError(
                f"{path}: journal schema {row[0]} is newer than this bucketwire understands ({SCHEMA}); "
                "upgrade bucketwire or point state_dir elsewhere"
            )
        self.db.executescript(DDL)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(cursors)")}
        if "above" not in cols:  # journals from before acked-above ranges were persisted
            self.db.execute("ALTER TABLE cursors ADD COLUMN above TEXT NOT NULL DEFAULT ''")
        if row is None or int(row[0]) < SCHEMA:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('schema', ?)", (str(SCHEMA),))
        self._floors: dict[str, int] = dict(self.db.execute("SELECT name, head FROM topics"))
        """What `topics` holds; retention writes the heads that moved past it before it drops events."""
        self._recent: OrderedDict[int, None] = OrderedDict()  # see insert_sizes
        # One seek of the (topic, seq) index per topic, whatever the number of events.
        self.heads: dict[str, int] = dict(self.db.execute(
            "SELECT name, max(head, coalesce((SELECT max(seq) FROM events WHERE topic = name), 0)) FROM topics"))
        jid = self.db.execute("SELECT value FROM meta WHERE key='id'").fetchone()
        if jid is None:  # ties the front log's records to this journal (another journal.db has another)
            jid = (os.urandom(16).hex(),)
            self.db.execute("INSERT INTO meta VALUES('id', ?)", jid)
        self._pending: _Staged | None = None
        """Commits made durable in the front log and not yet written here (`settle`)."""
        self._restore_gaps: dict[str, tuple[int, int]] = {}
        self._new_floor = 0
        """After a restore: the seq a topic new to this journal starts above (one the backup and the mark both
        miss may have had that many handed out before)."""
        self._front = _open_front(self.db, path.with_name(path.name + "-front"), str(jid[0]).encode())
        self._front_on = durability == "os"  # with "fsync" the front log would need a sync of its own per commit
        self._replay_front()
        self._mark = HighWater(path.with_name(path.stem + "-highwater.json"), str(jid[0]))
        self._seqs = Issued(path.with_name(path.stem + "-seqs"), str(jid[0]))
        self.restored: dict[str, object] | None = None
        """Set when this start found journal.db behind the seqs handed out: {"line", "gaps" (topic -> "A-B", the
        first RESTORED_LISTED), "topics"}; `status` shows it."""
        self._lift_to_mark()
        self._issued = sum(self.heads.values())
        """Seqs handed out: the sum of the heads (journal_mark.Issued)."""
        self._seqs.start(self._issued)
        self._moved = True
        """Heads moved since the mark was last written (set by commits, read by the checkpoint thread)."""
        self._marked_at = 0.0
        self._checkpointer = _Checkpointer(path, self._mark_tick)
        self._keys = KeyFilter()
        self._build_keys()

    def _lift_to_mark(self) -> None:
        """Go on after the last seq of each topic handed out, where journal.db is behind it: restored from a backup
        taken before more events were written (hub/journal_mark.py says why). Behind is also a topic whose group
        cursor is past its head: acked seqs the journal no longer holds. Each such head is written to `topics` as
        a floor, as retention does, so the next event of the topic takes the seq after it; the seqs between are
        gone with the restore (groups skip them, counted as lost to the restore). Said in one warning.

        How far: the count of seqs handed out (`Issued`) less the journal's is how many the restore lost; no topic
        lost more, nor more than were handed out after the high-water mark was taken. A journal that holds every
        seq counted (a hub killed or stopped, not restored) is not lifted at all."""
        marked, at = self._mark.read()
        rec = self._seqs.read()
        want = dict(marked)
        held = sum(self.heads.values())
        exact = rec is not None and (rec.clean or not rec.boot or rec.boot == self._seqs.boot)
        known = 0 if rec is None else rec.issued if exact else max(rec.issued, rec.ceiling)
        lost = known - held
        if lost > 0:
            since = known - at if at is not None and at <= known else None
            for t in set(self.heads) | set(want):
                h = self.heads.get(t, 0)
                bound = h + lost if since is None else min(h + lost, marked.get(t, 0) + since)
                want[t] = max(want.get(t, 0), bound)
            self._new_floor = lost if since is None else min(lost, since)
        restored = lost > 0 or any(h > self.heads.get(t, 0) for t, h in marked.items())
        for topic, acked in self.db.execute("SELECT topic, max(acked) FROM cursors GROUP BY topic"):
            want[topic] = max(want.get(topic, 0), int(acked))
        staged = self._pending.heads if self._pending is not None else {}
        behind = {t: h for t, h in want.items() if h > self.heads.get(t, 0) and t not in staged}
        if not behind:
            return
        with self._transaction("write") as db:
            db.executemany("INSERT INTO topics(name, head) VALUES(?, ?) "
                           "ON CONFLICT(name) DO UPDATE SET head=max(head, excluded.head)", list(behind.items()))
        gaps = {t: (self.heads.get(t, 0) + 1, h) for t, h in sorted(behind.items())}
        self.heads.update(behind)
        self._floors.update(behind)
        first = next(iter(gaps))
        span = f"{gaps[first][0]}-{gaps[first][1]}"
        more = f" (and {len(gaps) - 1} other topic(s))" if len(gaps) > 1 else ""
        if not restored:  # group cursors past their heads alone
            log.warning(f"{self.path.name} is behind the seqs its groups acked: {first} seqs {span}{more}; those "
                        "events are not in it, and new events go on after them so no seq names two events",
                        extra={"topics": {t: f"{a}-{b}" for t, (a, b) in gaps.items()}})
            return
        self._restore_gaps = gaps
        why = ("was restored from an older backup" if exact else
               "is behind the seqs this hub handed out (restored from an older backup?)" if rec is None else
               "was restored from an older backup, or the machine went down before its last commits reached the "
               "disk")
        line = (f"{self.path.name} {why}: seqs {span} of {first}{more} are gone with it"
                + (f" ({known - held} seqs of {known} handed out)" if rec is not None else "")
                + "; new events go on after them so no seq names two events, and groups skip them")
        self.restored = {"line": line, "topics": len(gaps),
                         "gaps": {t: f"{a}-{b}" for t, (a, b) in list(gaps.items())[:RESTORED_LISTED]}}
        log.warning(line, extra={"topics": {t: f"{a}-{b}" for t, (a, b) in gaps.items()}})

    def lost_to_restore(self, topic: str, first: int, count: int) -> int:
        """How many of the seqs `first`..`first + count - 1` of `topic` this start found gone with a restore."""
        self._caught_up()  # a new topic's gap is noted when its first commit is written
        a, b = self._restore_gaps.get(topic) or (0, -1)
        return max(0, min(b, first + count - 1) - max(a, first) + 1)

    def _mark_tick(self) -> None:
        """From the checkpoint thread: write the high-water mark when heads moved and MARK_INTERVAL passed."""
        now = time.monotonic()
        if self._moved and now - self._marked_at >= max(MARK_INTERVAL, MARK_SHARE * self._mark.took):
            self._moved = False
            self._marked_at = now
            issued = self._issued  # read first: the loop moves the heads, then the count
            self._mark.write(list(self.heads.items()), issued)  # one C-level copy: the loop's updates do not interleave

    def _build_keys(self) -> None:
        """(Re)build the key filter from what the journal holds, sized for twice as many events."""
        lo, hi = self.db.execute("SELECT min(rowid), max(rowid) FROM events").fetchone()
        rows = 0 if hi is None else hi - lo + 1
        pending = self._pending.rows if self._pending is not None else []
        keys = [(str(pending[i + 2]), str(pending[i + 3])) for i in range(0, len(pending), ROW)]
        path = self.path
        self._keys.build(lambda: _connect(path), hi or 0, 2 * rows, keys)

    def _replay_front(self) -> None:
        """Write into SQLite what the front log holds above each topic's head: commits confirmed and handed out
        by a hub that was killed before it wrote them here. A journal that cannot be written now (a full disk)
        keeps them staged: the hub starts, answers 503, and writes them once it can."""
        flat: list[object] = []
        heads: dict[str, int] = {}
        records, bad = self._front.records()
        if bad:
            self._keep_damaged(len(records), bad)
        above: list[list[object]] = []
        tops: dict[str, int] = {}
        acked: list[Batch] = []
        for rec, acks in records:
            unwritten = False  # a commit's rows and acks go into SQLite in one transaction: all of it, or none
            for i in range(0, len(rec), ROW):
                topic, seq = rec[i], rec[i + 1]
                if not isinstance(topic, str) or not isinstance(seq, int):
                    continue
                unwritten = unwritten or seq > self.heads.get(topic, 0)
                if seq > max(self.heads.get(topic, 0), tops.get(topic, 0)):
                    above.append(rec[i:i + ROW])
                    tops[topic] = seq
            if unwritten and acks is not None:
                acked.append(batch_of(acks))
        for row in self._not_held(above):
            flat += row
            heads[str(row[0])] = int(row[1])  # type: ignore[call-overload]
        if not flat:
            self._front.reset()
            return
        self._pending = _Staged(acked, flat, heads, {t: self.heads.get(t, 0) for t in heads}, replay=True)
        self.heads.update(heads)
        log.warning("journal: writing events the front log held from before a crash",
                    extra={"events": len(flat) // ROW, "topics": sorted(heads), "acks": len(acked)})
        try:
            self.settle()
        except JournalError as e:
            log.error("journal: cannot write the front log's events yet; refusing events until it can",
                      extra={"error": str(e)})

    def _not_held(self, rows: list[list[object]]) -> list[list[object]]:
        """The replay's rows less those whose (source, id) this journal already holds, or a later row holds.

        Only a backup of this journal restored beside its front log has any (the same id, so its records are
        replayed): an event the backup holds, dropped by retention since and published again, is in both, and
        SQLite's dedup index refused the whole replay at every start, the hub refusing every event meanwhile. The
        later row is the one the journal held when its hub stopped."""
        keys = [(str(r[2]), str(r[3])) for r in rows]
        if not keys:
            return rows
        held = self._existing(list(dict.fromkeys(keys)))
        last = {k: n for n, k in enumerate(keys)}
        kept = [r for n, (r, k) in enumerate(zip(rows, keys, strict=True)) if k not in held and last[k] == n]
        if len(kept) < len(rows):
            log.warning("journal: the front log holds events this journal already has (a backup restored beside "
                        "it?); not writing them twice", extra={"events": len(rows) - len(kept)})
        return kept

    def _keep_damaged(self, records: int, bad: int) -> None:
        """Copy a front log holding bytes that do not check out before the replay starts it over: they may be a
        confirmed commit that never reached SQLite (damaged), or another journal's (files mixed up in a copy or
        restore), and only the operator can tell. One warning either way."""
        front = self._front
        kept = front.path.with_name(f"{front.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        extra: dict[str, object] = {"path": str(front.path), "bad_bytes": bad, "records_replayed": records}
        try:
            fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(os.pread(front.fd, front.size, 0))
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            extra["kept"] = str(kept)
        except OSError as e:
            with contextlib.suppress(OSError):
                kept.unlink()
            extra["not_kept"] = f"{kept}: {e.strerror or e}"
        log.warning("journal: the front log holds bytes that do not check out (a write cut off by a crash or a power "
                    "loss, damage, or another journal's records); replaying the records that do"
                    + ("; the file as it was is in " + str(kept) if "kept" in extra else
                       "; could not keep a copy of it"), extra=extra)

    # -- reads ---------------------------------------------------------------------------------------------
    def _caught_up(self) -> None:
        """Reads see staged commits too: they are written first. If that fails (a full disk), reads of events
        take them from memory (`_staged_rows`): a hub started with replayed events SQLite cannot take yet has them
        nowhere else, and a group that found no row below the head took it for a gap retention had made."""
        if self._pending is not None:
            with contextlib.suppress(JournalError):
                self.settle()

    def _staged_rows(self, topic: str) -> list[tuple[int, str | None, float, bytes]]:
        """A commit's rows of `topic` that SQLite could not take yet: (seq, objkey, ts, body), in seq order. All
        above the topic's head in SQLite, so they come after anything a read finds there."""
        p = self._pending
        if p is None or topic not in p.heads:
            return []
        r = p.rows
        return [(cast(int, r[i + 1]), cast("str | None", r[i + 4]), cast(float, r[i + 5]), cast(bytes, r[i + 6]))
                for i in range(0, len(r), ROW) if r[i] == topic]

    def cursors(self) -> dict[tuple[str, str], int]:
        self._caught_up()
        return {(g, t): a for g, t, a in self.db.execute("SELECT grp, topic, acked FROM cursors")}

    def cursor_above(self) -> dict[tuple[str, str], str]:
        """Acked seqs above each cursor's watermark, as ranges ("3-5,9")."""
        self._caught_up()
        return {(g, t): a for g, t, a in self.db.execute("SELECT grp, topic, above FROM cursors WHERE above != ''")}

    def group_stats(self) -> dict[str, tuple[int, int, int]]:
        self._caught_up()
        return {g: (d, r, x) for g, d, r, x in self.db.execute("SELECT * FROM group_stats")}

    def attempts_of(self, group: str) -> dict[tuple[str, int], int]:
        self._caught_up()
        return {(t, q): n for t, q, n in self.db.execute("SELECT topic, seq, attempts FROM retries WHERE grp=?",
                                                          (group,))}

    def retries_due(self, group: str) -> dict[tuple[str, int], float]:
        self._caught_up()
        return {(t, q): d for t, q, d in self.db.execute("SELECT topic, seq, due FROM retries WHERE grp=?", (group,))}

    def retry_waits(self, group: str) -> dict[tuple[str, int], float]:
        self._caught_up()
        return {(t, q): w for t, q, w in self.db.execute(
            "SELECT w.topic, w.seq, w.wait FROM retry_waits w JOIN retries r ON r.grp = w.grp AND r.topic = w.topic "
            "AND r.seq = w.seq WHERE w.grp=?", (group,))}

    def read(self, topic: str, from_seq: int, limit: int) -> list[tuple[int, str | None, bytes]]:
        self._caught_up()
        rows: list[tuple[int, str | None, bytes]] = self.db.execute(
            "SELECT seq, objkey, body FROM events WHERE topic=? AND seq>=? ORDER BY seq LIMIT ?",
            (topic, from_seq, limit),
        ).fetchall()
        if self._pending is not None and len(rows) < limit:
            rows += [(q, k, b) for q, k, _, b in self._staged_rows(topic) if q >= from_seq][:limit - len(rows)]
        return rows

    def first_seq(self, topic: str) -> int | None:
        self._caught_up()
        row = self.db.execute("SELECT min(seq) FROM events WHERE topic=?", (topic,)).fetchone()
        if row and row[0] is not None:
            return int(row[0])
        staged = self._staged_rows(topic)
        return staged[0][0] if staged else None

    def first_seq_since(self, topic: str, since: float) -> int | None:
        """The first seq committed at or after unix time `since` (for `replay --since`), or None."""
        self._caught_up()
        row = self.db.execute("SELECT min(seq) FROM events WHERE topic=? AND ts>=?", (topic, since)).fetchone()
        if row and row[0] is not None:
            return int(row[0])
        return next((q for q, _, ts, _ in self._staged_rows(topic) if ts >= since), None)

    def _existing(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, int, bytes]]:
        """Which (source, id) are already in the journal: one indexed lookup per chunk, not one per event."""
        found: dict[tuple[str, str], tuple[str, int, bytes]] = {}
        for i in range(0, len(keys), CHUNK):
            part = keys[i:i + CHUNK]
            q = ("WITH v(s, i) AS (VALUES " + ",".join(["(?,?)"] * len(part)) + ") "
                 "SELECT e.source, e.id, e.topic, e.seq, e.body FROM v JOIN events e ON e.source = v.s AND e.id = v.i")
            for src, eid, topic, seq, body in self.db.execute(q, [x for k in part for x in k]):
                found[(src, eid)] = (topic, seq, body)
        return found

    def _any_existing(self, keys: list[tuple[str, str]]) -> bool:
        """Whether any of a few (source, id) is in the journal: one seek of the dedup index each."""
        db = self.db
        return any(db.execute("SELECT 1 FROM events WHERE source=? AND id=?", k).fetchone() for k in keys)

    def probe(self) -> str | None:
        """Whether a commit could be written now: None, or why not.

        A hub restarted on a full disk has nothing to commit until the first webhook arrives, so without a probe
        /healthz would report it healthy until then. Two cheap checks: a scratch file of PROBE_BYTES in the
        journal's directory (ENOSPC and read-only filesystems show up at write time; no fsync, so it costs
        the loop well under a millisecond), and a page-spilling row in a transaction that is rolled back (the
        database itself: its file mode, its size limit, its lock).
        """
        if self._pending is not None:  # staged events that could not be written yet come first
            try:
                self.settle()
            except JournalError as e:
                return f"cannot write staged events to {self.path}: {e.__cause__ or e}"
        scratch = self.path.parent / ".write-probe"
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(_ZEROS)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
                os.unlink(scratch)
        except OSError as e:
            return f"cannot write to {self.path.parent}: {e.strerror}"
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES('write-probe', zeroblob(65536))")
            finally:
                self.db.execute("ROLLBACK")
        except sqlite3.Error as e:
            return f"cannot write to {self.path}: {e}"
        return None

    def event_room(self) -> int | None:
        return None  # SQLite's own limit (1 GB a value) is far above anything the hub accepts

    def size_bytes(self) -> int:
        self._caught_up()
        pc = self.db.execute("PRAGMA page_count").fetchone()[0]
        fl = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        ps = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int((pc - fl) * ps)

    # -- the one write path ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; any SQLite error rolls it back and becomes a JournalError (503 at ingress)."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise JournalError(f"journal {what} failed: {e}") from e
        except BaseException:  # anything else (a render that raised): leave no transaction open behind it
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def commit(self, batch: Batch) -> list[Appended]:
        """Append events (deduplicated on (source, id)) and move cursors.

        A commit of a few new events is staged: appended to the front log (durable when that returns) and written
        here by `settle`, after the hub has sent its DELIVERs and confirmations, together with the commits staged
        after it until SETTLE_EVENTS or SETTLE_AFTER. Anything else, and any batch with a duplicate, is one
        transaction here, after what is staged (rows are written here in seq order: a replay relies on it).
        """
        p = self._pending
        if p is not None and p.failed:  # nothing staged on top of what SQLite refused: refused until it takes it
            self.settle()
        keys = self._keys
        keys.poll()
        if keys.due():
            self._build_keys()
        events = batch.events
        if self._issued + len(events) > self._seqs.ceiling:
            try:
                self._seqs.reserve_for(self._issued, len(events))
            except OSError as e:  # nothing handed out: refused like a commit SQLite could not take
                raise JournalError(f"journal commit failed: cannot write {self._seqs.path.name} "
                                   f"({e.strerror or e})") from e
        if self._front_on and 0 < len(events) <= FRONT_EVENTS:
            staged = self._stage(batch)
            if staged is not None:
                return staged
        if self._pending is not None:  # staged rows have the lower seqs: they go into SQLite first
            self.settle()
        return self._commit_now(batch)

    def _stage(self, batch: Batch) -> list[Appended] | None:
        """The front log's half of a commit; None when the batch holds a duplicate (the one transaction sorts
        those out, and they are rare)."""
        events = batch.events
        keys = [(ev.source, ev.id) for ev in events]
        if len(keys) > 1 and len(set(keys)) < len(keys):
            return None
        f = self._keys
        try:
            if any(f.may_hold(k) for k in keys):
                self.settle()  # a staged commit may hold the key: SQLite has to, to be asked
                if self._any_existing(keys):
                    return None
        except sqlite3.Error as e:
            raise JournalError(f"journal commit failed: {e}") from e
        out, rows, heads = self._assign(events, {}, None, time.time())
        try:
            self._front.append(rows, acks_of(batch))
        except OSError as e:
            if self._front.torn:
                self._front_on = False
                log.error("journal: the front log could not be cut back after a failed write; commits go "
                          "straight into journal.db until the hub restarts", extra={"error": str(e)})
            raise JournalError(f"journal commit failed: {e.strerror or e}") from e
        before = {t: self.heads.get(t, 0) for t in heads}
        size = sum(len(a.body) for a in out)
        p = self._pending
        if p is None:
            self._pending = _Staged([batch], rows, heads, before, time.monotonic() + SETTLE_AFTER, size=size)
        else:
            p.size += size
            p.batches.append(batch)
            p.rows += rows
            p.heads.update(heads)
            for t, h in before.items():
                p.before.setdefault(t, h)
        self.heads.update(heads)
        self._issued += sum(heads.values()) - sum(before.values())
        self._seqs.count(self._issued)
        self._moved = True
        f.add(keys)
        return out

    def settle(self, now: float | None = None) -> float | None:
        """See JournalAPI.settle: the staged commits are written in one transaction once SETTLE_EVENTS of their
        events (or SETTLE_BYTES) have gathered or the first has waited SETTLE_AFTER (at 1,000/s one transaction
        per commit was ~64 µs of the loop's CPU per event). Acks wait with them: the front log holds them too."""
        pending = self._pending
        if pending is None:
            return None
        rows = pending.rows
        if now is not None and now < pending.due and len(rows) < SETTLE_EVENTS * ROW and pending.size < SETTLE_BYTES:
            return pending.due
        try:
            with self._transaction("commit") as db:
                self._insert(db, rows, insert_sizes(len(rows) // ROW, self._recent))
                new = self._write_rest(db, pending.batches, pending.heads)
        except JournalError:
            pending.failed = True
            raise
        self._pending = None
        if new:
            self._floors.update(new)
        try:  # every record the front log holds is in SQLite now
            self._front.reset() if pending.replay else self._front.written()
        except OSError as e:  # the rows are in SQLite; a front log that grows on is only a longer replay
            log.warning("journal: could not start the front log over", extra={"error": str(e)})
        return None

    def _commit_now(self, batch: Batch) -> list[Appended]:
        """Append events (deduplicated on (source, id)) and move cursors, all in one transaction.

        The events are inserted on the assumption that none is already in the journal (the common case, and
        looking them up first cost as much as the insert); only when the (source, id) index refuses a row does the
        same transaction look them up and assign the seqs again, so a duplicate never leaves a hole.
        """
        now = time.time()
        events = batch.events
        with self._transaction("commit") as db:
            # Few statements per commit, whatever the batch size: sqlite3 gives up the GIL on every statement
            # step, and under load each step then waits for the HTTP threads to hand it back.
            out, rows, heads = self._assign(events, {}, None, now)
            sizes = insert_sizes(len(rows) // ROW, self._recent)
            many = len(sizes) > 1  # one INSERT fails whole; several need a savepoint to undo the first ones
            try:
                if many:
                    db.execute("SAVEPOINT optimistic")
                self._insert(db, rows, sizes)
                if many:
                    db.execute("RELEASE optimistic")
            except sqlite3.IntegrityError:  # the (source, id) index refused a row: some are duplicates
                if many:
                    db.execute("ROLLBACK TO optimistic")
                    db.execute("RELEASE optimistic")
                existing = self._existing(list(dict.fromkeys((ev.source, ev.id) for ev in events)))
                out, rows, heads = self._assign(events, existing, out, now)
                self._insert(db, rows, insert_sizes(len(rows) // ROW, self._recent))
            new = self._write_rest(db, [batch], heads)
        moved = sum(heads.values()) - sum(self.heads.get(t, 0) for t in heads)
        self.heads.update(heads)
        if moved:
            self._issued += moved
            self._seqs.count(self._issued)
        self._moved = bool(heads) or self._moved
        if new:
            self._floors.update(new)
        self._keys.add([(ev.source, ev.id) for ev, a in zip(events, out, strict=True) if not a.duplicate])
        return out

    def _write_rest(self, db: sqlite3.Connection, batches: list[Batch], heads: dict[str, int],
                    ) -> list[tuple[str, int]]:
        """Everything of some commits but their events' rows: new topics' floors, cursors, counters, attempts, as
        if written one commit after the other (each cursor's last value, counters summed). Returns the topics
        written for the first time."""
        new = [(t, h) for t, h in heads.items() if t not in self._floors]
        if new:  # a topic's first event: its row is where its head survives retention dropping every event
            db.executemany("INSERT OR IGNORE INTO topics(name, head) VALUES(?, ?)", new)
            if self._new_floor:  # it started above the seqs a restore may have lost of it
                for t, _ in new:
                    self._restore_gaps.setdefault(t, (1, self._new_floor))
        cursors: dict[tuple[str, str], tuple[str, str, int, str]] = {}
        stats: dict[str, tuple[int, ...]] = {}
        for batch in batches:
            if batch.cursors:
                above = batch.above
                cursors.update({k: (*k, a, above.get(k, "")) for k, a in batch.cursors.items()})
            for g, v in batch.stats.items():
                s = stats.get(g)
                stats[g] = v if s is None else tuple(x + y for x, y in zip(s, v, strict=True))
        if cursors:
            db.executemany(
                "INSERT INTO cursors(grp, topic, acked, above) VALUES(?,?,?,?) "
                "ON CONFLICT(grp, topic) DO UPDATE SET acked=excluded.acked, above=excluded.above",
                list(cursors.values()),
            )
        if stats:
            db.executemany(
                "INSERT INTO group_stats(grp, dead_lettered, retried, redelivered) VALUES(?,?,?,?) "
                "ON CONFLICT(grp) DO UPDATE SET dead_lettered=dead_lettered+excluded.dead_lettered, "
                "retried=retried+excluded.retried, redelivered=redelivered+excluded.redelivered",
                [(g, *v) for g, v in stats.items()],
            )
        for batch in batches:  # in commit order: a later commit's count (or its forgetting) is the one that holds
            if not batch.attempts:
                continue
            gone = [k for k, n in batch.attempts.items() if n <= 0]
            if gone:
                db.executemany("DELETE FROM retries WHERE grp=? AND topic=? AND seq=?", gone)
                db.executemany("DELETE FROM retry_waits WHERE grp=? AND topic=? AND seq=?", gone)
            kept = [(*k, n, batch.due.get(k, 0.0)) for k, n in batch.attempts.items() if n > 0]
            if kept:
                db.executemany("INSERT OR REPLACE INTO retries VALUES(?,?,?,?,?)", kept)
                waits = [(*k, batch.waits[k]) for k, n in batch.attempts.items() if n > 0 and k in batch.waits]
                if waits:
                    db.executemany("INSERT OR REPLACE INTO retry_waits VALUES(?,?,?,?)", waits)
        return new

    def _assign(self, events: list[NewEvent], existing: dict[tuple[str, str], tuple[str, int, bytes]],
                before: list[Appended] | None, now: float,
                ) -> tuple[list[Appended], list[object], dict[str, int]]:
        """Seqs and rows for `events`, given which of them the journal already holds (`existing`). The rows come
        as one flat list of parameters (`ROW` per event), what the multi-row INSERT binds.

        `before`: the first pass's answer, when this is the second; an event whose seq did not move keeps the body
        rendered then. Once per committed event: the attribute reads and the heads' lookups are locals.
        """
        out: list[Appended] = []
        rows: list[object] = []
        heads: dict[str, int] = {}  # the heads this batch moves; never a copy of all of them (topics are many)
        seen: dict[tuple[str, str], Appended] = {}
        committed = self.heads
        floor = self._new_floor  # a new topic's head (0 but after a restore)
        last: str | None = None  # the topic of the event before: its seq is `seq`, `heads` is written at a change
        seq = 0
        if before is None:
            # The first pass assumes no duplicates at all, within the batch too: the (source, id) index refuses
            # a batch holding one event twice as it refuses one already committed, and the second pass (below)
            # then finds both kinds. A key and a lookup per event less where there are none.
            for ev in events:
                topic = ev.topic
                if topic == last:
                    seq += 1
                else:
                    if last is not None:
                        heads[last] = seq
                    last = topic
                    s_ = heads.get(topic)
                    seq = (committed.get(topic, floor) if s_ is None else s_) + 1
                unsent = ev.envelope
                body = (b'%b"seq":"%d"%b' % (unsent[0], seq, unsent[1]) if type(unsent) is tuple  # `render`
                        else render(unsent, seq))
                objkey = ev.objkey
                out.append(Appended(topic, seq, body, objkey))
                rows += (topic, seq, ev.source, ev.id, objkey, now, body)
            if last is not None:
                heads[last] = seq
            return out, rows, heads
        for n, ev in enumerate(events):
            topic, source, eid, objkey = ev.topic, ev.source, ev.id, ev.objkey
            k = (source, eid)
            prev = seen.get(k)
            if prev is None and existing and k in existing:
                t, s, b = existing[k]
                prev = Appended(t, s, b, objkey, duplicate=True)
            if prev is not None:
                out.append(Appended(prev.topic, prev.seq, prev.body, prev.objkey, duplicate=True))
                continue
            if topic == last:  # a run of one topic (most batches): no lookups of the heads
                seq += 1
            else:
                if last is not None:
                    heads[last] = seq
                last = topic
                s_ = heads.get(topic)
                seq = (committed.get(topic, floor) if s_ is None else s_) + 1
            unsent = ev.envelope
            if before is not None and not before[n].duplicate and before[n].seq == seq:
                body = before[n].body
            elif type(unsent) is tuple:  # `render`, inline
                body = b'%b"seq":"%d"%b' % (unsent[0], seq, unsent[1])
            else:
                body = render(unsent, seq)
            a = Appended(topic, seq, body, objkey)
            seen[k] = a
            out.append(a)
            rows += (topic, seq, source, eid, objkey, now, body)
        if last is not None:
            heads[last] = seq
        return out, rows, heads

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[object], sizes: list[int]) -> None:
        i, n = 0, len(rows) // ROW
        for k in sizes:
            part = rows[i * ROW:(i + k) * ROW] if k < n else rows
            db.execute(_INSERTS.get(k) or _insert_sql(k), part)
            i += k

    def forget_group(self, group: str) -> None:
        """Delete a removed group's cursors and counters, so a new group of that name starts afresh."""
        if self._pending is not None:
            self.settle()
        with self._transaction("write") as db:
            db.execute("DELETE FROM cursors WHERE grp=?", (group,))
            db.execute("DELETE FROM group_stats WHERE grp=?", (group,))
            db.execute("DELETE FROM retries WHERE grp=?", (group,))
            db.execute("DELETE FROM retry_waits WHERE grp=?", (group,))

    def finish_removal(self, group: str) -> int | None:
        """One transaction removes a group whole (`forget_group`): there is never anything left to finish."""
        return None

    def stored_cursors(self, group: str) -> dict[str, int]:
        self._caught_up()
        return dict(self.db.execute("SELECT topic, acked FROM cursors WHERE grp=?", (group,)))

    def enforce_retention(self, max_age: float, max_bytes: int, chunk: int = 5000) -> int:
        """Drop the oldest events past the age or size limit, at most `chunk` of them; returns how many.

        At most `chunk`: this runs on the hub's loop, and nothing else does meanwhile. A minute's worth of events
        at once stalled every topic for as long (60,000 events: 0.5 s, 2 s with random ids); the hub calls again
        soon while a call returns `chunk` (see `Hub._retention`).

        Staged events SQLite cannot take (a full journal) do not stop it: freeing space is how they get written.
        """
        self._caught_up()
        cutoff = time.time() - max_age
        oldest = self.db.execute("SELECT ts FROM events ORDER BY rowid LIMIT 1").fetchone()
        if oldest is None or (oldest[0] >= cutoff and self.size_bytes() <= max_bytes):
            return 0
        self._write_floors()
        dropped = self.db.execute(
            "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events ORDER BY rowid LIMIT ?) AND ts < ?",
            (chunk, cutoff),
        ).rowcount
        while dropped < chunk and (size := self.size_bytes()) > max_bytes:
            # Rows, estimated from the rowid span (they are dropped oldest first): count(*) reads a whole index.
            lo, hi = self.db.execute("SELECT min(rowid), max(rowid) FROM events").fetchone()
            if lo is None:
                break
            rows = hi - lo + 1
            # Drop about as many of the oldest rows as the excess takes up, not a fixed chunk.
            want = max(1, min(chunk - dropped, int((size - max_bytes) * rows / size) + 1))
            n = self.db.execute(
                "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events ORDER BY rowid LIMIT ?)", (want,)
            ).rowcount
            dropped += n
            if n == 0:
                break
        if dropped:
            # The attempt counts of events retention dropped: no hub will load those events again to ack them.
            self.db.execute("DELETE FROM retries WHERE NOT EXISTS "
                            "(SELECT 1 FROM events WHERE events.topic = retries.topic AND events.seq = retries.seq)")
            self.db.execute("DELETE FROM retry_waits WHERE NOT EXISTS (SELECT 1 FROM retries r WHERE "
                            "r.grp = retry_waits.grp AND r.topic = retry_waits.topic AND r.seq = retry_waits.seq)")
            self._caught_up()  # the room just made is where staged rows that SQLite refused go
        return dropped

    def _write_floors(self) -> None:
        """Write to `topics` every head that moved since it was last written, before events are dropped: a topic
        whose every event retention drops keeps its head there (seqs never go back, across restarts too)."""
        heads = self.heads
        if self._pending is not None:  # staged rows are not in SQLite: a floor at their seqs would keep a restart
            heads = {**heads, **self._pending.before}  # from writing them (it writes what lies above a head)
        moved = [(t, h) for t, h in heads.items() if self._floors.get(t, 0) < h]
        if moved:
            with self._transaction("write") as db:
                db.executemany("INSERT INTO topics(name, head) VALUES(?, ?) "
                               "ON CONFLICT(name) DO UPDATE SET head=max(head, excluded.head)", moved)
            self._floors.update(moved)

    def close(self) -> None:
        if self._pending is not None:
            try:
                self.settle()
            except JournalError as e:
                log.warning("journal: staged events stay in the front log for the next start", extra={"error": str(e)})
        self._keys.close()
        # Like SQLite's -wal at a clean close: a state_dir left by a hub that stopped holds journal.db alone.
        if self._pending is None:
            with contextlib.suppress(OSError):
                self._front.path.unlink()
        self._front.close()
        self._checkpointer.close()
        if self._moved:
            self._mark.write(list(self.heads.items()), self._issued)
        self._seqs.close(self._issued)
        try:
            self.db.close()
        except sqlite3.Error:
            pass


_ZEROS = bytes(PROBE_BYTES)


def _open_front(db: sqlite3.Connection, front: Path, journal_id: bytes) -> FrontLog:
    """The journal's front log, or one line that says what is wrong with the file (the journal closed again)."""
    try:
        return FrontLog(front, journal_id)
    except BlockingIOError:
        db.close()
        where = f" ({front} links to {front.resolve()})" if front.is_symlink() else ""
        raise JournalError(f"{front} is in use by another process as its front log{where}: a link to another "
                           f"journal's front log? each journal needs its own: remove the link (the hub makes the file "
                           "beside journal.db)") from None
    except OSError as e:
        db.close()
        raise JournalError(f"{front}: cannot open the journal's front log ({e.strerror or e}); it must be a regular "
                           "file the hub can write, or absent: move aside what is there") from None


def _refuse_lost(path: Path) -> None:
    """Raise JournalError when what is at `path` is what is left of a journal, not a journal or its absence.

    SQLite takes an empty file, or a missing one, for a new database: a journal truncated to nothing (`>
    journal.db`, a copy or restore that failed) or deleted beside its write-ahead log was started afresh in
    silence, every event, cursor and dedupe record gone and seqs reused from 1. A hub never leaves an empty
    journal.db itself (`_create` makes it whole before it bears the name), so both can be told apart and refused.
    """
    if path.is_symlink() and not path.exists():
        raise JournalError(f"{path} links to {os.readlink(path)}, which is not there (its volume not mounted?); "
                           "mount it, or remove the link to start an empty journal")
    wal = path.with_name(path.name + "-wal")
    front = path.with_name(path.name + "-front")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if front.exists() and front.stat().st_size > 0:
            raise JournalError(f"{path} is missing but its front log {front.name} holds events (the journal deleted "
                               "or moved?); restore journal.db from a backup, or delete journal.db-front, "
                               "journal.db-wal and journal.db-shm to start an empty journal") from None
        if wal.exists():
            raise JournalError(f"{path} is missing but its write-ahead log {wal.name} is there (the journal deleted "
                               "or moved?); restore journal.db from a backup, or delete journal.db-wal and "
                               "journal.db-shm to start an empty journal (docs/operations.md, \"Backups\")") from None
        return
    if size == 0:
        raise JournalError(f"{path} is empty (0 bytes): truncated, or a copy or restore that failed? restore it from "
                           "a backup; to start an empty journal instead (every event, cursor and retry count lost), "
                           "delete journal.db and any journal.db-wal / journal.db-shm beside it")


def _create(path: Path) -> None:
    """Make a new journal under another name and give it `path` only once it is whole (schema, tables), so an
    empty journal.db is never one a hub made (`_refuse_lost`). Said in the log: a state_dir whose volume was not
    mounted is an empty directory, and a new journal there should not go unremarked."""
    prefix = f"{path.name}.new-"
    for stale in path.parent.glob(prefix + "*"):  # left by a hub killed while making one
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(prefix + str(os.getpid()))
    try:
        db = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            db.executescript(DDL)
            db.execute("INSERT OR REPLACE INTO meta VALUES('schema', ?)", (str(SCHEMA),))
        finally:
            db.close()
        _fsync(tmp)
        try:
            os.link(tmp, path)  # never replaces: a hub starting beside this one may have made it first
        except FileExistsError:
            return  # opening it finds out which hub holds it
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if path.exists() or path.is_symlink():  # a filesystem without hard links: rename, never over one
                return
            os.rename(tmp, path)
        _fsync(path.parent)
        log.info(f"created a new, empty journal at {path}")
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _connect(path: Path, timeout: float = 5.0, cached_statements: int = 128) -> sqlite3.Connection:
    """A connection through SQLite's `unix-excl` VFS.

    One hub per journal: a second one would assign seqs from its own in-memory heads and clash with the first's.
    `unix-excl` locks the file against every other process from the first read until the last connection of this
    process closes, and shares the lock between this process's connections (the writer and the checkpoint
    thread's). It also spares each commit the six `fcntl` calls of taking and dropping the WAL's locks.
    """
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?vfs=unix-excl"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False,
                           cached_statements=cached_statements)


_SQLITE_LOCKS = 0x40000000, 512
"""The byte range of a database file SQLite locks (pending, reserved and shared bytes)."""


def _lock_holder(path: Path) -> int | None:
    """The pid of a process holding `path`'s SQLite lock, for the error line; None where it cannot tell.

    Only called when this process holds no lock on the file: closing a descriptor would drop this process's
    POSIX locks on it.
    """
    if sys.platform != "linux":  # `struct flock`'s layout below is Linux's
        return None
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        q = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, *_SQLITE_LOCKS, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, q))
    except OSError:
        return None
    finally:
        os.close(fd)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


class _Checkpointer:
    """Checkpoints the WAL from its own thread and connection.

    With SQLite's default the committing connection checkpoints every 1,000 WAL pages, and a checkpoint fsyncs
    the WAL and the database file: under webhook load that was ~90 fsyncs a second inside the hub loop, each
    stalling every request waiting on it. A PASSIVE checkpoint never blocks the writer, and this thread spends
    the fsyncs outside the GIL.
    """

    def __init__(self, path: Path, tick: Callable[[], None] = lambda: None) -> None:
        """`tick`: called after each checkpoint (the journal's high-water mark is written from here)."""
        self.db = _connect(path)
        self.tick = tick
        self.stopping = threading.Event()
        self.failing = False
        self.thread = threading.Thread(target=self._run, name="journal-checkpoint", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(CHECKPOINT_INTERVAL):
            try:
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.failing = False
            except sqlite3.Error as e:  # disk full or I/O error: the writer's commits report it; retry later
                if not self.failing:
                    log.warning("journal checkpoint failed; retrying", extra={"error": str(e)})
                self.failing = True
            self.tick()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        try:
            self.db.close()
        except sqlite3.Error:
            pass
