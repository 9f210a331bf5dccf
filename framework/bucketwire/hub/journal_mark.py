"""The SQLite journal's high-water mark: each topic's last seq handed out, kept in a file beside journal.db.

Why a file of its own: a (topic, seq) names one event for good, and workers, `tail` subscribers and whatever
plugins stored downstream hold it. A journal.db restored from a backup taken before more events were written knows
nothing of the seqs handed out after it (its cursors and heads are the backup's too), and the hub gave the next
events those seqs again: two events under one seq, and a consumer that keeps what it handled by seq skipped the new
one as seen. The mark is written outside journal.db, so a restore of journal.db alone leaves it, and a hub that
finds its journal behind it goes on after the mark (`Journal._lift_to_mark`).

It is written from the checkpoint thread, at most every MARK_INTERVAL while events come, and at a clean close: it
may lag the journal by that much (a backup taken in the last second before a crash is not told apart), never lead
what was handed out. It names the journal it belongs to (`meta.id`), so a new, empty journal made on purpose
(journal.db deleted) starts from 1 as before; a backup restored is the same journal, with the same id. Named
`journal-highwater.json`, not `journal.db-...`: a restore that copies `journal.db*` back leaves it be, and a
stopped hub's state_dir still holds `journal.db` alone of those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bucketwire.journal")

MARK_INTERVAL = 1.0
"""Seconds between writes of the mark while heads move: one small write and fsync a second, off the hub's loop."""
MARK_SHARE = 50
"""A write of the mark waits at least this many times as long as the last one took: with tens of thousands of
topics encoding them all takes tens of ms, all of it holding the GIL the hub's loop needs (60,000 topics: ~2 MB,
~90 ms on a loaded test machine), so such a hub writes it every few seconds instead."""
SLICE = 2000
"""Heads encoded per `json.dumps` call: between calls the hub's loop thread can take the GIL."""


class HighWater:
    def __init__(self, path: Path, journal_id: str) -> None:
        self.path = path
        self.journal_id = journal_id
        self._lock = threading.Lock()  # the checkpoint thread and `close` both write it
        self._failing = False
        self.took = 0.0
        """Seconds the last `write` took (see MARK_SHARE)."""

    def read(self) -> tuple[dict[str, int], int | None]:
        """Topic -> last seq handed out, as recorded for this journal, and the count of seqs handed out (`Issued`)
        when the heads were taken (None from a mark written before it was kept); empty when there is no mark, it
        is another journal's, or it cannot be read (then a warning: the check is off for this start)."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError) as e:
            log.warning(f"{self.path}: cannot read the journal's high-water mark ({e}); a journal.db restored from "
                        "an older backup would not be noticed at this start")
            return {}, None
        if not isinstance(doc, dict) or doc.get("journal") != self.journal_id or not isinstance(doc.get("heads"), dict):
            return {}, None
        n = doc.get("issued")
        return ({str(t): h for t, h in doc["heads"].items() if isinstance(h, int) and not isinstance(h, bool)},
                n if isinstance(n, int) and not isinstance(n, bool) else None)

    def write(self, heads: list[tuple[str, int]], issued: int) -> None:
        """Replace the mark with `heads` (whole, or not at all: a temporary file renamed over it). `issued`: the
        count of seqs handed out, read before `heads` was copied (so every seq it counts is in them)."""
        start = time.monotonic()
        parts = (json.dumps(dict(heads[i:i + SLICE]), separators=(",", ":"))[1:-1]
                 for i in range(0, len(heads), SLICE))
        data = (f'{{"journal":{json.dumps(self.journal_id)},"issued":{issued},'
                f'"heads":{{{",".join(parts)}}}}}').encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._lock:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                self._failing = False
                self.took = time.monotonic() - start
            except OSError as e:  # a full disk: the journal's own writes say so; this retries at the next interval
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if not self._failing:
                    log.warning("cannot write the journal's high-water mark; retrying",
                                extra={"path": str(self.path), "error": e.strerror or str(e)})
                self._failing = True


RESERVE_MIN = 1024
"""Seqs the ceiling is first reserved ahead of the count handed out; it doubles while reservations come less than
RESERVE_FAST seconds apart (up to RESERVE_MAX), halves when they come more than ten times that apart: under load about
one fsync'd write a second, idle one now and then."""
RESERVE_MAX = 1 << 20
RESERVE_FAST = 1.0
_ISSUED_AT = 115
"""Offset of the count in the record (after the header fields, fixed width): each commit rewrites those 20 bytes."""


def boot_id() -> str:
    """This boot of the machine (Linux); "" where unknown. A record from another boot may have lost its last
    writes (they were not fsync'd): then only the fsync'd ceiling is trusted."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:36]
    except OSError:
        return ""


@dataclass(slots=True)
class IssuedRecord:
    journal: str
    boot: str
    clean: bool
    ceiling: int
    issued: int


class Issued:
    """How many seqs the SQLite journal has handed out, beside it in `journal-seqs`: what tells a journal.db
    restored from a backup (behind the count) from the journal a killed or stopped hub left (not behind).

    Seqs handed out means the sum of every topic's head (a topic's seqs run 1..head): a commit adds its events, and
    the count is rewritten in place at each commit (20 bytes, no fsync: a killed hub's page cache keeps it). The
    ceiling is fsync'd, and reserved ahead: no commit takes the count past it before a larger ceiling is on disk,
    so after a machine crash or power loss, where the count may have lost its last writes, the ceiling still holds
    what may have been handed out. `clean`: written at a clean close (the count exact whatever the boot).
    """

    def __init__(self, path: Path, journal_id: str) -> None:
        self.path = path
        self.journal_id = journal_id
        self.boot = boot_id()
        self.ceiling = 0
        self.reserve = RESERVE_MIN
        self._reserved_at = 0.0
        self._fd: int | None = None
        self._failing = False

    def read(self) -> IssuedRecord | None:
        """The record as the last hub left it; None when there is none, it is another journal's, or it cannot be
        read (then a warning)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning(f"{self.path}: cannot read the journal's seq count ({e.strerror or e}); a journal.db restored "
                        "from an older backup would be noticed by the high-water mark alone at this start")
            return None
        parts = raw.decode("ascii", "replace").split()
        try:
            if parts[0] != "bucketwire-seqs" or len(parts) != 7:
                raise ValueError("not a seq count")
            rec = IssuedRecord(parts[2], parts[3].strip("-"), parts[4] == "clean", int(parts[5]), int(parts[6]))
        except (ValueError, IndexError) as e:
            log.warning(f"{self.path}: the journal's seq count does not read ({e}); a journal.db restored from an "
                        "older backup would be noticed by the high-water mark alone at this start")
            return None
        return rec if rec.journal == self.journal_id else None

    def _line(self, issued: int, clean: bool) -> bytes:
        head = (f"bucketwire-seqs 1 {self.journal_id:<32} {self.boot or '-':<36} {'clean' if clean else 'open '} "
                f"{self.ceiling:020d} ")
        assert len(head) == _ISSUED_AT, len(head)
        return f"{head}{issued:020d}\n".encode()

    def start(self, issued: int) -> None:
        """At open: the count as the journal holds it (lifted), no reservation yet, not clean. Written and fsync'd
        before any seq is handed out."""
        self.ceiling = issued
        try:
            self._put(self._line(issued, False), sync=True)
        except OSError as e:  # a full disk: the first commit tries again, and is refused if it cannot either
            log.warning("cannot write the journal's seq count", extra={"path": str(self.path),
                                                                        "error": e.strerror or str(e)})

    def _put(self, data: bytes, sync: bool) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.pwrite(self._fd, data, 0)
        if sync:
            os.fsync(self._fd)

    def reserve_for(self, issued: int, more: int) -> None:
        """A ceiling of at least `issued + more` on disk (fsync'd) before those seqs are handed out. OSError to
        the caller (the commit is refused: nothing was handed out)."""
        now = time.monotonic()
        if self._reserved_at and now - self._reserved_at < RESERVE_FAST:
            self.reserve = min(RESERVE_MAX, self.reserve * 2)
        elif self._reserved_at and now - self._reserved_at > 10 * RESERVE_FAST:
            self.reserve = max(RESERVE_MIN, self.reserve // 2)
        self._reserved_at = now
        old = self.ceiling
        self.ceiling = issued + more + self.reserve
        try:
            self._put(self._line(issued, False), sync=True)
        except OSError:
            self.ceiling = old
            raise

    def count(self, issued: int) -> None:
        """After a commit: the count, in place (no fsync)."""
        if self._fd is None:
            return
        try:
            os.pwrite(self._fd, b"%020d" % issued, _ISSUED_AT)
            self._failing = False
        except OSError as e:
            if not self._failing:
                log.warning("cannot write the journal's seq count; a journal.db restored from a backup taken "
                            "meanwhile may not be noticed", extra={"path": str(self.path), "error": e.strerror or e})
            self._failing = True

    def close(self, issued: int) -> None:
        """At a clean close: the exact count, marked clean."""
        if self._fd is None:
            return
        try:
            self._put(self._line(issued, True), sync=True)
        except OSError as e:
            log.warning("cannot write the journal's seq count at close", extra={"path": str(self.path),
                                                                                 "error": e.strerror or e})
        finally:
            os.close(self._fd)
            self._fd = None
