"""The SQLite journal's front log: a small commit is made durable by one append here, and written into SQLite after
its events have gone out to the workers and its publishers have their confirmations, together with the small commits
that came after it (`Journal.settle`: within SETTLE_AFTER, or once SETTLE_EVENTS events wait; one transaction for
all of them, docs/performance.md change 27). The file starts over only once every record in it is in SQLite.

Why: at a modest rate each commit holds one event, and the SQLite transaction for it (the BEGIN, three B-trees
updated by the INSERT, the COMMIT's WAL frames) runs 50-80 µs on a CPU that has gone cold since the last event,
all of it between the publish and the DELIVER. An append of the same rows to a plain file is one `write` (6-9
µs), as durable as the WAL frame with `durability = "os"`: both are in the OS page cache when the call returns,
so both survive a kill -9 of the hub (docs/performance.md, "Closing the gap", change 16).

The file (`journal.db-front`, beside `journal.db-wal`) holds records of whole commits: a header (magic, length,
CRC-32) and the commit's rows as msgpack; a commit that also carries acks (cursors, counters, attempt counts) has a
second record right after it, of its own kind (`ACKS_MAGIC`), written by the same `write`. So acks that ride on a
staged commit are as durable as its events, and the commit need not be written into SQLite at once for their sake
(docs/performance.md, change 29). A hub from before acks records skips one as bytes that do not check out (a
warning) and still replays the rows record before it.

The CRC covers the journal's own id too, so a front log left beside another journal's `journal.db` is not
replayed into it. A backup of this journal restored beside it has the same id: its records above the backup's
heads are written into it (the newest confirmed events come back). A record is written whole or, when a write
fails part way (a full disk), cut off again; replay skips what does not check out (a tail cut off by a power
loss, a damaged record, another journal's) and reads every record that does, in the order they were written; the
journal keeps a copy of such a file for the operator (`Journal._replay_front`).

Which rows a replay inserts: those above the topic's head in SQLite. Rows are written into SQLite in seq order
and before anything else touches the journal (a read, retention, a floor), so everything at or below a head was
written (and possibly dropped by retention since: it must not come back), and everything above it was not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import zlib
from pathlib import Path

import msgspec

MAGIC = b"BWF1"
ACKS_MAGIC = b"BWA1"
"""A commit's acks, in the record after its rows: their own kind, so that a rows record reads as it always has."""
HEADER = struct.Struct("<4sII")
"""Magic, payload length, CRC-32 of the journal's id followed by the payload."""
TRUNCATE_AT = 1 << 20
"""Bytes after which a front log whose rows are all in SQLite starts over (one `ftruncate` per ~1,000 commits)."""

ROW = 7
"""Values per `events` row: topic, seq, source, id, objkey, ts, body (the journal's INSERT order). A record is the
commit's rows as one flat list, as the journal's multi-row INSERT binds them."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

Acks = list[list[list[object]]]
"""A commit's acks as a record holds them: [cursors, counters, attempts]; a cursor [group, topic, acked, above], a
counter [group, dead_lettered, retried, redelivered] (added to the stored ones), an attempt count [group, topic,
seq, attempts, due, wait] (due and wait None where the commit had none)."""
Record = tuple[list[object], Acks | None]
"""A commit as the file holds it: its rows, and its acks when it carried some."""


class FrontLog:
    """An append-only file of commits not yet (or only just) written into SQLite; the loop thread's alone."""

    def __init__(self, path: Path, journal_id: bytes) -> None:
        """BlockingIOError: another process has the file open as its front log (SQLite's lock keeps two hubs off
        one journal.db, but `journal.db-front` can be a link to another journal's: this one would start that
        file over under its hub, and append its own records to it)."""
        self.path = path
        self._seed = zlib.crc32(journal_id)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):  # a FIFO, a device (through a link)
                raise OSError(errno.EINVAL, "not a regular file")
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel drops it with the process
        except OSError:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size
        self.torn = False
        """A failed write could not be cut off again: nothing is appended after it (the next start replays past it,
        but has to take it for damage: a warning, and a copy of the file)."""

    def records(self) -> tuple[list[Record], int]:
        """Every record from the start of the file that checks out, and how many bytes of the file did not.

        Past a stretch that does not check out (a record cut off by a power loss, a damaged sector, another
        journal's record) the next record that does is still read: records check themselves (magic, length, CRC
        over the journal's id), and only the newest can hold a commit not yet in SQLite. Stopping at the first bad
        byte dropped that commit, confirmed and handed out, whenever an older record was damaged."""
        data = os.pread(self.fd, self.size, 0)
        out: list[Record] = []
        at = good = 0
        while at + HEADER.size <= len(data):
            rows = _record(data, at, self._seed)
            if rows is None:
                at = data.find(MAGIC, at + 1)
                if at < 0:
                    break
                continue
            n = HEADER.size + HEADER.unpack_from(data, at)[1]
            good += n
            at += n
            acks = _acks_record(data, at, self._seed) if at + HEADER.size <= len(data) else None
            if acks is not None:
                m = HEADER.size + HEADER.unpack_from(data, at)[1]
                good += m
                at += m
            out.append((rows, acks))
        return out, len(data) - good

    def append(self, rows: list[object], acks: Acks | None = None) -> None:
        """Append one commit's rows, and its acks when it carries some, in one write; OSError when they could not be
        written whole. Nothing of them is left in the file then, unless cutting it back failed too (`torn`)."""
        body = _encode(rows)
        rec = HEADER.pack(MAGIC, len(body), zlib.crc32(body, self._seed)) + body
        if acks is not None:
            more = _encode(acks)
            rec += HEADER.pack(ACKS_MAGIC, len(more), zlib.crc32(more, self._seed)) + more
        before = self.size
        try:
            n = os.write(self.fd, rec)
        except OSError:
            self._cut(before)
            raise
        if n != len(rec):  # a short write (the disk filled part way): the record must not stay torn
            self._cut(before)
            raise OSError(28, "No space left on device (front log write cut short)")
        self.size = before + n

    def written(self) -> None:
        """Everything appended so far is in SQLite: start over once the file has grown past TRUNCATE_AT."""
        if self.size >= TRUNCATE_AT:
            self.reset()

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        self.size = 0

    def _cut(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
            self.size = size
        except OSError:
            self.torn = True

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _payload(data: bytes, at: int, seed: int, magic: bytes) -> object:
    """The decoded payload of the record of kind `magic` at `at`, or None when there is none that checks out."""
    kind, n, crc = HEADER.unpack_from(data, at)
    body = data[at + HEADER.size: at + HEADER.size + n]
    if kind != magic or len(body) != n or zlib.crc32(body, seed) != crc:
        return None
    try:
        return _decode(body)
    except msgspec.DecodeError:
        return None


def _record(data: bytes, at: int, seed: int) -> list[object] | None:
    """The rows of the record at `at`, or None when it does not check out."""
    rows = _payload(data, at, seed, MAGIC)
    if not isinstance(rows, list) or len(rows) % ROW:
        return None
    return rows


def _acks_record(data: bytes, at: int, seed: int) -> Acks | None:
    """The acks of the record at `at` (the one after a rows record), or None when there is none that checks out:
    then the commit's acks are lost (its events run again), never its rows."""
    acks = _payload(data, at, seed, ACKS_MAGIC)
    if (not isinstance(acks, list) or len(acks) != 3
            or not all(isinstance(part, list) and all(isinstance(x, list) for x in part) for part in acks)):
        return None
    return acks
