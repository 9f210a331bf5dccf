"""Which (source, id) keys the SQLite journal may hold, kept in memory as a Bloom filter.

Why: a commit staged in the front log (hub/journal_front.py) must know that none of its events is a duplicate
before their DELIVER goes out, and asking SQLite's dedup index for one key costs 18-37 µs on a CPU gone cold since
the last event, a third of what the front log saves. A filter answers "certainly not there" in a few hundred
nanoseconds; only a "maybe" (1 new key in 240 with the filter full, 1 in 1,800 at half, or a duplicate) is
asked of SQLite.

It never says "not there" for a key the journal holds: every key the journal commits is added, and the keys
already in the journal at start are read by a thread of its own (`build`), during which the filter says "maybe"
to everything. Keys that retention drops stay in the filter, which only makes "maybe" likelier; after as many
additions as it was sized for, it is built again from what the journal holds then.
"""

from __future__ import annotations

import functools
import logging
import random
import sqlite3
import sys
import threading
from array import array
from collections.abc import Callable, Iterable

log = logging.getLogger("bucketwire.journal")

BITS_PER_KEY = 16
"""2 MiB per million keys. A blocked filter: each key sets PROBES bits of one 64-bit word, so adding it is one
read-modify-write (three bits anywhere in the filter, three of them, took ~1.3 µs a key warm and ~2.2 with the
caches cold; this ~0.7 and ~1.5). At capacity 1 false "maybe" in 240 (measured: 0.41-0.43% of 400,000 new keys against
2^20; three bits anywhere: 0.46-0.49%)."""
PROBES = 5
"""Bits per key in its word: with 64-bit words and 16 bits a key, 3 would give 1 in 140 at capacity, 4 1 in 210,
5 1 in 260, 6 1 in 270 (each key's bits drawn at random)."""
PATTERNS = 1 << 14
"""How many words of PROBES bits a key's hash picks from (128 KiB, in cache: a key's bits are the pattern its
hash's top bits name, in the word its low bits name). Fewer patterns, more keys of a word sharing one: 2^16 gave
1 in 260 at capacity, 2^14 1 in 240, 2^12 1 in 208."""
MIN_CAPACITY = 1 << 20
_SHIFT = sys.hash_info.width - 16  # the hash's top bits pick the pattern, its low bits the word
_PICK = PATTERNS - 1

Key = tuple[str, str]


class KeyFilter:
    """Owned by the hub's loop thread; `build` reads the journal from a thread of its own and `poll`, on the loop
    thread, takes the result in."""

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self.capacity = max(MIN_CAPACITY, capacity)
        self.bits = _words(_size(self.capacity))
        self.mask = len(self.bits) - 1
        self.patterns = _pattern_table()
        self.added = 0
        self.ready = False
        """False until the keys the journal held at start are in: every key "may" be there meanwhile."""
        self._since: array[int] | None = None  # keys added while a build runs
        self._built: array[int] | None = None
        self._failed: str | None = None
        self._thread: threading.Thread | None = None
        self._next_capacity = self.capacity
        self._stop = threading.Event()

    def may_hold(self, key: Key) -> bool:
        if not self.ready:
            return True
        h = hash(key)
        p = self.patterns[(h >> _SHIFT) & _PICK]
        return self.bits[h & self.mask] & p == p

    def add(self, keys: list[Key]) -> None:
        _set(self.bits, keys)
        if self._since is not None:
            _set(self._since, keys)
        self.added += len(keys)

    def due(self) -> bool:
        """Sized for fewer keys than were added since the last build: time to build it again."""
        return self._thread is None and self.added > self.capacity

    def build(self, connect: Callable[[], sqlite3.Connection], upto: int, capacity: int,
              pending: Iterable[Key] = ()) -> None:
        """Read every key up to rowid `upto` into a fresh filter sized for `capacity`, on a thread. Keys committed
        after `upto` (and `pending`: staged, not yet in SQLite) reach it through `add` meanwhile."""
        capacity = max(MIN_CAPACITY, capacity)
        size = _size(capacity)
        self._since = _words(size)
        _set(self._since, list(pending))
        self._built = None
        self._failed = None

        def run() -> None:
            fresh = _words(size)
            try:
                db = connect()
                try:
                    cur = db.execute("SELECT source, id FROM events WHERE rowid <= ?", (upto,))
                    while (rows := cur.fetchmany(4096)) and not self._stop.is_set():
                        _set(fresh, rows)
                finally:
                    db.close()
            except sqlite3.Error as e:
                self._failed = str(e)
                return
            if not self._stop.is_set():
                self._built = fresh

        self._next_capacity = capacity
        self._thread = threading.Thread(target=run, name="journal-keys", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """On the loop thread: take in a finished build."""
        t = self._thread
        if t is None or t.is_alive():
            return
        self._thread = None
        since, self._since = self._since, None
        built, self._built = self._built, None
        if built is None or since is None:
            log.warning("journal: could not read the journal's keys; every commit asks SQLite for duplicates",
                        extra={"error": self._failed})
            return
        n = len(built) * built.itemsize
        self.bits = array("Q", (int.from_bytes(built, "little") | int.from_bytes(since, "little"))
                          .to_bytes(n, "little"))
        self.mask = len(self.bits) - 1
        self.capacity = self._next_capacity
        self.added = 0
        self.ready = True

    def close(self) -> None:
        """Stop a running build (its connection holds the journal's file lock until it closes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def join(self, timeout: float | None = None) -> None:
        """Wait for a running build and take it in (start-up in tests and tools; the hub polls)."""
        if self._thread is not None:
            self._thread.join(timeout)
        self.poll()


def _size(capacity: int) -> int:
    """Bits: a power of two, at least BITS_PER_KEY per key."""
    return 1 << (capacity * BITS_PER_KEY - 1).bit_length()


def _words(bits: int) -> array[int]:
    return array("Q", bytes(bits >> 3))


@functools.cache
def _pattern_table() -> array[int]:
    """PATTERNS words of PROBES distinct bits each, uniform among such words (the first PROBES distinct of uniform
    draws), made once per process (~15 ms)."""
    rng = random.Random(25)
    out = []
    for _ in range(PATTERNS):
        w = 0
        while w.bit_count() < PROBES:
            w |= 1 << rng.getrandbits(6)
        out.append(w)
    return array("Q", out)


def _set(words: array[int], keys: Iterable[Key]) -> None:
    m, patterns = len(words) - 1, _pattern_table()
    for h in map(hash, keys):
        words[h & m] |= patterns[(h >> _SHIFT) & _PICK]
