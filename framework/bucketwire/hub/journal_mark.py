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

    def read(self) -> dict[str, int]:
        """Topic -> last seq handed out, as recorded for this journal; empty when there is no mark, it is
        another journal's, or it cannot be read (then a warning: the check is off for this start)."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning(f"{self.path}: cannot read the journal's high-water mark ({e}); a journal.db restored from "
                        "an older backup would not be noticed at this start")
            return {}
        if not isinstance(doc, dict) or doc.get("journal") != self.journal_id or not isinstance(doc.get("heads"), dict):
            return {}
        return {str(t): h for t, h in doc["heads"].items() if isinstance(h, int) and not isinstance(h, bool)}

    def write(self, heads: list[tuple[str, int]]) -> None:
        """Replace the mark with `heads` (whole, or not at all: a temporary file renamed over it)."""
        start = time.monotonic()
        parts = (json.dumps(dict(heads[i:i + SLICE]), separators=(",", ":"))[1:-1]
                 for i in range(0, len(heads), SLICE))
        data = f'{{"journal":{json.dumps(self.journal_id)},"heads":{{{",".join(parts)}}}}}'.encode()
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
