"""With retention on, the journal's files stop growing: the pages retention frees are reused by the events that
come after, and the WAL is checkpointed back to its bound. What an operator needs to size a disk: the state dir
holds about `retention_mb`, not everything ever ingested. Measured on the files themselves (journal.db and its
-wal), over many fill-and-trim cycles (BUCKETWIRE_RETENTION_CYCLES for more)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bucketwire.hub.journal import Batch, Journal, NewEvent

CYCLES = int(os.environ.get("BUCKETWIRE_RETENTION_CYCLES", "24"))
BODY = b'{"specversion":"1.0","seq":"","data":{"pad":"' + b"x" * 8000 + b'"}}'
LIMIT = 4 << 20  # retention_mb = 4


def _on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def test_the_journal_stays_near_its_retention_size_however_much_passes_through(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = Journal(path)
    sizes = []
    n = 0
    try:
        for _ in range(CYCLES):
            for _ in range(5):  # ~2 MB a cycle: over the cycles ~12x the limit passes through
                j.commit(Batch(events=[NewEvent(f"t{n % 3}", "src", f"id-{n + i:09d}", f"k{n + i}", BODY)
                                       for i in range(50)]))
                n += 50
            while j.enforce_retention(float("inf"), LIMIT, 1000):
                pass
            # What the hub's checkpoint thread does; busy while the journal's own checkpointer is at it: again.
            while j.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                time.sleep(0.01)  # pacing a retry of a checkpoint another connection held
            sizes.append(_on_disk(path))
        assert j.size_bytes() <= LIMIT, "retention keeps the live pages under the limit"
    finally:
        j.close()
    through = n * len(BODY)
    half = sizes[len(sizes) // 2]
    print(f"\n{through / 1e6:.0f} MB passed through a {LIMIT >> 20} MiB journal; on disk per cycle (MB): "
          f"{[round(s / 1e6, 1) for s in sizes]}")
    assert sizes[-1] <= half * 1.1 + (256 << 10), f"the journal kept growing: {sizes}"
    assert sizes[-1] < 3 * LIMIT, f"{sizes[-1]} bytes on disk for a {LIMIT}-byte retention"
