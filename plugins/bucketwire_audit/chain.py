"""The tamper-evident audit log: a hash-chained JSON-lines file, its writer and its verifier.

Record format (one line, canonical JSON: sorted keys, no spaces, ASCII only, so a line has one exact byte form):

    {"bucket":..,"event_id":..,"h":"<sha256>","n":17,"prev":"<h of record 16>",...}

`h` is the SHA-256 of the canonical JSON of the record *without* `h`; `prev` is the `h` of the record before
(64 zeros for record 1); `n` counts records from 1 across rotated files. So:

* an edited line no longer matches its own `h`             -> reported at that line;
* an edited line whose `h` was recomputed breaks the next `prev` -> reported at the edited line;
* a deleted line or a missing rotated file leaves a gap in `n`   -> reported where the gap is;
* swapped lines put `n` out of order                             -> reported at the first swapped line;
* a cut-off last line has no newline                             -> reported at that line;
* the last record cut off or missing while the index holds it whole and it continues the chain -> `Incomplete`
  (what an append interrupted after its index commit leaves; the next append writes it again), not tampering;
* whole lines cut from the end are caught by comparing with the head kept in the index beside the log;
  the index is found beside the active log a rotated file was rotated from too, so deleting the active
  log (and the newest rotated files) is reported as the truncation it is;
* a line the index does not know (past its head), or knows differently (each line is kept there for
  `index_days`), was not written by the writer: one appended by hand with a correct-looking chain, or an edit
  whose chain was recomputed to the end, is reported at that line.

Several worker *processes* append at once, so every append runs under an exclusive `fcntl.flock` on
`PATH.lock`: the chain head is read, the index updated and then the line written with one `write()` on an
O_APPEND descriptor, all while holding the lock. Lines never interleave and the chain never forks.

The index (`PATH.index.sqlite`, WAL) holds the ids of written events (a redelivery is not logged twice; O(log n)
per event instead of scanning the log), the line each produced (to re-upload its object copy, to repair the log,
and for `verify` to compare with), and the head (n, h, day, first n of the active file). It is committed before
the line is written, so the log never legitimately runs ahead of it: on each append, lines the index has and the
log lacks (a crash between the two, a torn last line cut off) are written from the index, and lines the log has
beyond the index head are not adopted (with fsync = "always"; after a power loss with "interval"/"never" they
may be the index's loss, and are adopted with a warning). A deleted index is rebuilt by scanning the logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

GENESIS = "0" * 64
LOCK_SUFFIX = ".lock"
INDEX_SUFFIX = ".index.sqlite"
NOT_LOGS = (LOCK_SUFFIX, INDEX_SUFFIX, INDEX_SUFFIX + "-wal", INDEX_SUFFIX + "-shm", INDEX_SUFFIX + "-journal")
TAIL_CHUNK = 1 << 16
ROTATED = re.compile(r"(.+)\.(?:\d{4}-\d{2}-\d{2}|undated)\.\d{12}(?:-\d+)?")
"""A rotated file's name, `NAME.<YYYY-MM-DD or undated>.<first n, 12 digits>[-i]` (`AuditLog._rotate`)."""

log = logging.getLogger("bucketwire.plugin.audit")


def dedup_key(source: str, event_id: str) -> str:
    """What makes an event one event: its (source, id), as the hub's journal is unique on. CloudEvents ids are
    unique per source only; keyed on the id alone, an event whose id another source had used was taken for a
    redelivery and never logged. Lines written before this key was used are found by their id (`legacy=`)."""
    return json.dumps([source, event_id], ensure_ascii=True, separators=(",", ":"))


def _key_of(rec: dict[str, Any]) -> str:
    """The de-duplication key of a logged record (rebuilding or adopting index rows)."""
    src, eid = rec.get("source"), rec.get("event_id")
    return dedup_key(src, eid) if isinstance(src, str) and isinstance(eid, str) else str(eid or "")


def canonical(record: dict[str, Any]) -> bytes:
    """The one byte form of a record; hashing and verification both depend on it being unique."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def seal(record: dict[str, Any], n: int, prev: str) -> tuple[bytes, str]:
    """Give `record` its place in the chain; returns (line without newline, its hash)."""
    rec = {k: v for k, v in record.items() if k != "h"}
    rec["n"] = n
    rec["prev"] = prev
    h = hashlib.sha256(canonical(rec)).hexdigest()
    rec["h"] = h
    return canonical(rec), h


@dataclass(slots=True)
class Head:
    n: int = 0
    h: str = GENESIS
    day: str = ""
    first_n: int = 1


class AuditLog:
    """Appends records to `path` with rotation, fsync policy, cross-process locking and de-duplication."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 100 << 20,
        rotate_daily: bool = True,
        fsync: str = "always",
        fsync_interval: float = 1.0,
        index_days: float = 30.0,
    ) -> None:
        if fsync not in ("always", "never", "interval"):
            raise ValueError(f"fsync must be 'always', 'never' or 'interval', not {fsync!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.rotate_daily = rotate_daily
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.index_days = index_days
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(str(self.path) + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd: int | None = None
        self._last_sync = 0.0
        self._dirty = False
        self._db = self._open_index()

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _open_index(self) -> sqlite3.Connection:
        ipath = str(self.path) + INDEX_SUFFIX
        with self._locked():
            fresh = not os.path.exists(ipath)
            db = sqlite3.connect(ipath, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync == 'always' else 'NORMAL'}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS written (event_id TEXT PRIMARY KEY, n INTEGER NOT NULL,"
                " line BLOB NOT NULL, at REAL NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS written_at ON written(at)")
            db.execute("CREATE INDEX IF NOT EXISTS written_n ON written(n)")
            db.execute("CREATE TABLE IF NOT EXISTS head (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            if fresh:
                head = self._rebuild(db)
                if head is not None:
                    # Lines cut from the end before now are beyond telling: the head is what the log says it is.
                    log.warning("audit: %s was missing; rebuilt from the log files (head n=%d): lines cut from the "
                                "end before now cannot be detected", ipath, head.n)
        return db

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _active_fd(self) -> int:
        """The descriptor of the current active file, reopened if another process rotated it away."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fd is not None and (st is None or os.fstat(self._fd).st_ino != st.st_ino):
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if st is None and self.fsync == "always":
                _fsync_dir(self.path.parent)
        return self._fd

    def _get_head(self, db: sqlite3.Connection) -> Head | None:
        rows = dict(db.execute("SELECT k, v FROM head").fetchall())
        if "n" not in rows:
            return None
        return Head(int(rows["n"]), rows["h"], rows.get("day", ""), int(rows.get("first_n", "1")))

    def _set_head(self, db: sqlite3.Connection, head: Head) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO head (k, v) VALUES (?, ?)",
            [("n", str(head.n)), ("h", head.h), ("day", head.day), ("first_n", str(head.first_n))],
        )

    def _rebuild(self, db: sqlite3.Connection) -> Head | None:
        """A new or lost index: re-read every log file so de-duplication and the head survive. The head found, or
        None when there are no records (a new log)."""
        head: Head | None = None
        active_first: dict[str, Any] | None = None
        db.execute("BEGIN IMMEDIATE")
        for f in sorted_logs(log_files_beside(self.path)):
            first_in_file = True
            with open(f, "rb") as fh:
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(rec, dict) or not isinstance(rec.get("n"), int):
                        continue
                    db.execute(
                        "INSERT OR IGNORE INTO written VALUES (?, ?, ?, ?)",
                        (_key_of(rec), rec["n"], raw.rstrip(b"\n"), time.time()),
                    )
                    if f == self.path and first_in_file:
                        active_first = rec
                    first_in_file = False
                    if head is None or rec["n"] > head.n:
                        head = Head(rec["n"], str(rec.get("h")))
        if head is not None:
            if active_first is not None:
                head.day, head.first_n = str(active_first.get("logged", ""))[:10], active_first["n"]
            else:
                head.first_n = head.n + 1
        if head is not None:
            self._set_head(db, head)
        db.execute("COMMIT")
        return head

    def _catch_up(self, db: sqlite3.Connection) -> Head:
        """Make the log agree with the index head, which is committed before each line is written.

        A crash between the two leaves the index one line ahead (a torn last line is cut off first): the line is
        written from the index, where it is kept. The log ahead of the index is not the writer's doing with
        fsync = "always" (hand-appended lines): they are left for `verify` to report and never adopted into the
        chain. With "interval"/"never" a power loss can lose index commits the log kept, so they are adopted,
        with a warning either way."""
        head = self._get_head(db) or Head()
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            size = 0
        rec: Any = None
        last: bytes | None = None
        if size:
            last, end = _last_line(self.path, size)
            if end < size:
                log.warning("audit: %s ends in a torn line (crash mid-write); cutting %d bytes",
                            self.path, size - end)
                os.truncate(self.path, end)
                size = end
        if size:
            with contextlib.suppress(ValueError):
                rec = json.loads(last or b"")
            if not (isinstance(rec, dict) and isinstance(rec.get("n"), int) and isinstance(rec.get("h"), str)):
                return head  # a last line that is no record: `verify` names it
        else:
            # A new (or emptied) active file: the chain's last line is in the newest rotated one. Only here, and
            # rarely: a rotation is followed by a write in the same append.
            rec = _last_record(self.path)
        log_n = rec["n"] if rec is not None else 0
        if log_n < head.n:
            missing = [bytes(r[0]) for r in db.execute(
                "SELECT line FROM written WHERE n > ? AND n <= ? ORDER BY n", (log_n, head.n)).fetchall()]
            prev = rec["h"] if rec is not None else GENESIS
            if len(missing) == head.n - log_n and _prev_of(missing[0]) == prev:
                data = b"".join(line + b"\n" for line in missing)
                log.warning("audit: %s is missing its last %d line(s) (crash before they were written); "
                            "writing them from the index", self.path, len(missing))
                fd = self._active_fd()
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {self.path}; disk full?")
                self._sync(fd)
            else:
                log.warning("audit: %s ends at record n=%d, the index at n=%d, and the lines between cannot be "
                            "restored from it; `audit verify` reports the gap", self.path, log_n, head.n)
        elif log_n > head.n:
            if self.fsync == "always" or last is None:
                log.warning("audit: %s has lines after record n=%d that this writer did not write (added by "
                            "hand?); not adopting them, `audit verify` reports them", self.path, head.n)
            else:
                log.warning("audit: %s has lines after record n=%d that the index lost (power loss with "
                            "fsync=%s?); adopting them", self.path, head.n, self.fsync)
                db.execute(
                    "INSERT OR IGNORE INTO written VALUES (?, ?, ?, ?)",
                    (_key_of(rec), rec["n"], last, time.time()),
                )
                if not head.day:
                    head.day = str(rec.get("logged", ""))[:10]
                head.n, head.h = rec["n"], str(rec["h"])
                self._set_head(db, head)
        return head

    def _rotate(self, head: Head) -> None:
        target = self.path.with_name(f"{self.path.name}.{head.day or 'undated'}.{head.first_n:012d}")
        i = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{head.day or 'undated'}.{head.first_n:012d}-{i}")
            i += 1
        os.rename(self.path, target)
        if self.fsync != "never":
            _fsync_dir(self.path.parent)
        if self._fd is not None:
            if self.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    # -- the API ----------------------------------------------------------------------------------------------
    def append(self, event_id: str, record: dict[str, Any], *,
               legacy: tuple[str, str] | None = None) -> tuple[bool, int, bytes]:
        """Log `record` once per `event_id` (the plugin passes `dedup_key(source, id)`). Returns (newly written?,
        its n, its line). `legacy=(source, id)`: a line logged under the bare id before the key included the
        source counts too, when its record names that source."""
        with self._locked():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                head = self._catch_up(db)
                row = db.execute("SELECT n, line FROM written WHERE event_id = ?", (event_id,)).fetchone()
                if row is None and legacy is not None:
                    old = db.execute("SELECT n, line FROM written WHERE event_id = ?", (legacy[1],)).fetchone()
                    if old is not None and _field(bytes(old[1]), "source") == legacy[0]:
                        row = old
                if row is not None:
                    db.execute("COMMIT")
                    return False, int(row[0]), bytes(row[1])
                now = datetime.now(UTC)
                day = now.strftime("%Y-%m-%d")
                line, h = seal({**record, "logged": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}, head.n + 1, head.h)
                try:
                    size = os.path.getsize(self.path)
                except FileNotFoundError:
                    size = 0
                if size > 0 and (
                    size + len(line) + 1 > self.max_bytes or (self.rotate_daily and head.day and head.day != day)
                ):
                    self._rotate(head)
                    size = 0
                if size == 0:
                    head.day, head.first_n = day, head.n + 1
                # The index first: a line in the log is then always one the index knows (so `verify` can tell
                # hand-appended lines), and a crash before the write is repaired from the index (_catch_up).
                head.n, head.h = head.n + 1, h
                db.execute("INSERT INTO written VALUES (?, ?, ?, ?)", (event_id, head.n, line, time.time()))
                self._set_head(db, head)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            fd = self._active_fd()
            data = line + b"\n"
            written = os.write(fd, data)
            if written != len(data):  # regular files do not short-write unless the disk is full
                # Committed but not (wholly) written: the next append cuts the torn line and writes it again.
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes); disk full?")
            self._sync(fd)
            return True, head.n, line

    def _sync(self, fd: int) -> None:
        if self.fsync == "always":
            os.fsync(fd)
        elif self.fsync == "interval":
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval:
                os.fsync(fd)
                self._last_sync = now
                self._dirty = False
            else:
                self._dirty = True

    def prune_index(self) -> int:
        """Forget de-duplication entries older than `index_days` (the head is kept)."""
        cutoff = time.time() - self.index_days * 86400
        with self._locked():
            cur = self._db.execute("DELETE FROM written WHERE at < ?", (cutoff,))
            return cur.rowcount

    def head(self) -> Head:
        with self._locked():
            return self._get_head(self._db) or Head()

    def close(self) -> None:
        if self._fd is not None:
            if self._dirty or self.fsync != "never":
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._db.close()
        os.close(self._lock_fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_line(path: Path, size: int) -> tuple[bytes | None, int]:
    """(last complete line without newline, offset just past its newline) read from the end of the file."""
    with open(path, "rb") as f:
        pos, buf = size, b""
        while pos > 0:
            step = min(TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            nl = buf.rfind(b"\n")
            if nl == -1:
                continue
            end = pos + nl + 1
            prev_nl = buf.rfind(b"\n", 0, nl)
            while prev_nl == -1 and pos > 0:
                step = min(TAIL_CHUNK, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step)
                buf = chunk + buf
                nl += len(chunk)
                prev_nl = buf.rfind(b"\n", 0, nl)
            return buf[prev_nl + 1 : nl], end
    return None, 0


@contextlib.contextmanager
def _shared_lock(path: Path | None) -> Iterator[None]:
    """A shared flock on the writers' lock file, if it can be opened (verify may run without write access)."""
    fd = None
    if path is not None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _prev_of(line: bytes) -> str | None:
    prev = _field(line, "prev")
    return prev if isinstance(prev, str) else None


def _field(line: bytes, name: str) -> Any:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get(name) if isinstance(rec, dict) else None


def _last_record(active: Path) -> dict[str, Any] | None:
    """The last complete record of the newest non-empty rotated file beside `active`, or None."""
    for f in reversed(sorted_logs(p for p in log_files_beside(active) if p != active)):
        size = f.stat().st_size
        if not size:
            continue
        last, _end = _last_line(f, size)
        try:
            rec = json.loads(last or b"")
        except ValueError:
            return None
        ok = isinstance(rec, dict) and isinstance(rec.get("n"), int) and isinstance(rec.get("h"), str)
        return rec if ok else None
    return None


# -- verification -------------------------------------------------------------------------------------------
class ChainError(Exception):
    """The first place the chain is broken, as `file:line: what is wrong`."""


class Incomplete(ChainError):
    """The chain is intact but its last record, which the index holds whole, is cut off or missing in the log: an
    append interrupted between the index commit and the end of its write (a crash, a power loss, a full disk).
    The next append writes it again from the index. Not evidence of tampering, though a cut of that one last
    line looks the same (and is undone by the same repair)."""


@dataclass(slots=True)
class VerifyResult:
    files: int
    records: int
    head_n: int
    head_h: str
    index: Path | None = None
    """The index the end of the chain is checked against (`NAME.index.sqlite` of the newest file's log)."""
    anchored: bool = True
    """False when that index was not there: then nothing told a log whose last lines were cut (or one rewritten
    whole) from an intact one."""


def log_files_beside(path: Path) -> list[Path]:
    """The active log and its rotated siblings (`NAME`, `NAME.<day>.<first n>`)."""
    out = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            named = p.name == path.name or p.name.startswith(path.name + ".")
            if named and not p.name.endswith(NOT_LOGS) and p.is_file():
                out.append(p)
    return out


def _first_n(p: Path) -> float:
    try:
        with open(p, "rb") as f:
            rec = json.loads(f.readline())
        return float(rec["n"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("inf")


def sorted_logs(paths: Iterable[Path]) -> list[Path]:
    """Files in chain order (by the `n` of their first record), whatever order they were named in."""
    return sorted(set(paths), key=lambda p: (_first_n(p), p.name))


def expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, directories as the audit logs inside them."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out += [q for q in sorted(p.iterdir()) if q.is_file() and not q.name.endswith(NOT_LOGS)]
        elif p.exists():
            if not p.name.endswith(NOT_LOGS):  # `verify audit.log*` in a shell also matches the lock and index
                out.append(p)
        else:
            raise ChainError(f"{p}: no such file")
    return sorted_logs(out)


def verify(paths: Iterable[str | os.PathLike[str]], *, partial: bool = False) -> VerifyResult:
    """Check the chain across `paths`; raise ChainError naming the first bad line.

    `partial=True` accepts a chain that starts after record 1, or one that ends before the index head while the
    active log is still in place but not among `paths` (only some rotated files at hand).
    """
    given = list(paths)
    files = expand(given)
    if not files:
        raise ChainError("no audit log files given")
    with _Written.beside(files) as written, contextlib.ExitStack() as held:
        if written.db is not None:
            # The head and the files as one view: listed under the writers' lock, and the active log opened there,
            # so a rotation renaming it while it is read (or before) does not take the lines up to the head out
            # of sight. Rotated files are never renamed again: they are opened when their turn comes.
            with _shared_lock(written.lock):
                written.head = written.read_head()
                written.first_n = written.read_first_n()
                files = expand(given)
                active = written.active
                if active is not None and any(f.absolute() == active.absolute() for f in files):
                    written.active_fh = held.enter_context(open(active, "rb"))
            if not files:
                raise ChainError("no audit log files given")
        return _verify(files, partial, written)


def active_log(f: Path) -> Path:
    """The active log a file belongs to: itself, or for a rotated file the name it was rotated from."""
    m = ROTATED.fullmatch(f.name)
    return f.with_name(m.group(1)) if m else f


def _verify(files: list[Path], partial: bool, written: _Written) -> VerifyResult:
    expect_n: int | None = None
    prev_h = GENESIS
    records = 0
    last_where = ""
    incomplete = ""
    for f in files:
        mine = written.active_fh is not None and written.active is not None and \
            f.absolute() == written.active.absolute()
        with contextlib.nullcontext(written.active_fh) if mine else open(f, "rb") as fh:
            assert fh is not None
            for lineno, raw in enumerate(fh, 1):
                where = f"{f}:{lineno}"
                if not raw.endswith(b"\n"):
                    head_n = written.head[0] if written.head is not None else None
                    if f == files[-1] and head_n is not None and (expect_n or 1) - 1 >= head_n:
                        break  # past every line the index had when verify began: one being written right now
                    kept = written.line(head_n) if f == files[-1] and head_n == (expect_n or 1) else None
                    if kept is not None and kept.startswith(raw) and _prev_of(kept) == prev_h:
                        incomplete = (
                            f"{where}: record n={head_n} was cut off mid-write ({len(raw)} of {len(kept) + 1} "
                            "bytes, as the index holds them): an append interrupted by a crash or a full disk; "
                            "the next append writes it again from the index"
                        )
                        break
                    raise ChainError(f"{where}: truncated line (no newline at the end; cut off or torn write)")
                body = raw[:-1]
                try:
                    rec = json.loads(body)
                except ValueError:
                    raise ChainError(f"{where}: not a valid audit record (edited or corrupted)") from None
                if not isinstance(rec, dict) or not {"n", "prev", "h"} <= rec.keys() or \
                        not isinstance(rec["n"], int):
                    raise ChainError(f"{where}: not an audit record (missing n/prev/h)")
                h = rec.pop("h")
                if hashlib.sha256(canonical(rec)).hexdigest() != h or canonical({**rec, "h": h}) != body:
                    raise ChainError(f"{where}: line was edited (its content does not match its hash)")
                n = rec["n"]
                kept = written.line(n)
                if kept is not None and kept != body:
                    raise ChainError(f"{where}: line differs from record n={n} as written (kept in the index)")
                if kept is None and written.head is not None and n > written.head[0] and n > written.now_n():
                    raise ChainError(
                        f"{where}: record n={n} is past the last one the writer logged (n={written.now_n()}, "
                        "kept in the index): added by hand"
                    )
                if expect_n is None:
                    if n != 1 and not partial:
                        raise ChainError(
                            f"{where}: chain starts at record n={n}, not 1: earlier lines or rotated files are "
                            "missing (pass them all, or --partial to check from here)"
                        )
                    if n == 1 and rec["prev"] != GENESIS:
                        raise ChainError(f"{where}: record 1 does not start from the genesis hash (edited)")
                else:
                    if n > expect_n:
                        raise ChainError(
                            f"{where}: expected record n={expect_n}, found n={n}: lines deleted or reordered, "
                            "or a rotated file is missing"
                        )
                    if n < expect_n:
                        raise ChainError(
                            f"{where}: expected record n={expect_n}, found n={n}: lines reordered or duplicated"
                        )
                    if rec["prev"] != prev_h:
                        raise ChainError(
                            f"{last_where}: line was altered (the next record's prev hash does not match it)"
                        )
                expect_n, prev_h, last_where = n + 1, h, where
                records += 1
    last_n = (expect_n or 1) - 1
    # Lines cut from the very end leave a valid chain; the index beside the active log knows the true head.
    head = written.head
    if incomplete:
        raise Incomplete(incomplete)
    if head is not None and head[0] > last_n:
        active = written.active
        given = active is not None and any(f.absolute() == active.absolute() for f in files)
        missing = active is not None and not active.exists()
        kept = written.line(head[0]) if head[0] == last_n + 1 else None
        # The active log holds the record, or is to (its first: a crash right after a rotation made it).
        theirs = given or (missing and written.first_n == head[0])
        if kept is not None and theirs and _prev_of(kept) == prev_h:
            if missing:
                raise Incomplete(
                    f"{active} is missing, and record n={head[0]}, its first, is in the index only: an append "
                    "interrupted right after a rotation, before the new file's first line was written (a crash, a "
                    "power loss, a full disk), or the file was deleted; the next append writes it again from the index"
                )
            raise Incomplete(
                f"{last_where or files[-1]}: record n={head[0]} is in the index but not in the log after this line: "
                "an append interrupted between the index commit and the write (a crash, a power loss, a full "
                "disk), or the line was cut from the end; the next append writes it again from the index"
            )
        if partial and not given and not missing:
            return _result(files, records, last_n, prev_h, written)  # a subset of the files at hand
        why = ""
        if missing:
            why = f"; {active} is missing (deleted or renamed)"
        elif not given:
            why = f"; {active} is not among the files given (add it, or --partial to check only these)"
        raise ChainError(
            f"{last_where or files[-1]}: log truncated: the index records {head[0]} entries but the log ends at "
            f"n={last_n}{why}"
        )
    if head is not None and head[0] == last_n and head[1] != prev_h:
        raise ChainError(f"{last_where}: last line does not match the head recorded in the index")
    return _result(files, records, last_n, prev_h, written)


def _result(files: list[Path], records: int, last_n: int, prev_h: str, written: _Written) -> VerifyResult:
    index = Path(f"{written.active or active_log(files[-1])}{INDEX_SUFFIX}")
    return VerifyResult(len(files), records, last_n, prev_h, index, written.db is not None)


class _Written:
    """The writer's index beside the active log, read-only: its head, and each recent line as written (the
    `written` table keeps them for `index_days`). Lines the index does not know, or knows differently, were not
    written by bucketwire. Without an index (rotated files checked elsewhere) only the chain is checked.

    The index is found beside the active log a file belongs to (`NAME.index.sqlite` for `NAME` and its rotated
    `NAME.<day>.<n>`): looked for only beside the files given, a deleted `NAME` took the head, and with it every
    check of the chain's end, out of verify's sight.

    `verify` reads the head under a shared lock on `NAME.lock`: writers hold it exclusively from the index commit
    until their line is written, so the log then holds every line up to the head, and a log verified while workers
    append to it is neither 'truncated' (the index moved on while the log was read) nor 'added by hand' (a line
    written after the head was read: the index has it, committed before the line)."""

    def __init__(self, db: sqlite3.Connection | None, active: Path | None = None) -> None:
        self.db = db
        self.active = active
        self.lock = Path(str(active) + LOCK_SUFFIX) if active is not None else None
        self.head: tuple[int, str] | None = None
        self.first_n: int | None = None  # the first record of the active log, by the index
        self.active_fh: BinaryIO | None = None  # the active log, opened with the head read (see `verify`)
        self.by_n = False
        if db is not None:
            # Indexes written before lines were looked up by n have no index on it: a scan per line is too slow.
            self.by_n = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'written_n'").fetchone() is not None

    def read_head(self) -> tuple[int, str] | None:
        assert self.db is not None
        rows = dict(self.db.execute("SELECT k, v FROM head").fetchall())
        return (int(rows["n"]), rows["h"]) if "n" in rows else None

    def read_first_n(self) -> int | None:
        assert self.db is not None
        row = self.db.execute("SELECT v FROM head WHERE k = 'first_n'").fetchone()
        return int(row[0]) if row is not None else None

    def now_n(self) -> int:
        """The head now (a line past the snapshot may have been written since; an old index cannot say)."""
        head = self.read_head() if self.db is not None else None
        return head[0] if head is not None else 0

    @classmethod
    def beside(cls, files: list[Path]) -> _Written:
        for active in dict.fromkeys(active_log(f) for f in files):
            idx = Path(str(active) + INDEX_SUFFIX)
            if idx.exists():
                try:
                    return cls(sqlite3.connect(f"file:{idx}?mode=ro", uri=True, timeout=5), active)
                except sqlite3.Error:
                    continue
        return cls(None)

    def line(self, n: int) -> bytes | None:
        if self.db is None or not self.by_n:
            return None
        row = self.db.execute("SELECT line FROM written WHERE n = ?", (n,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def __enter__(self) -> _Written:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.db is not None:
            self.db.close()
