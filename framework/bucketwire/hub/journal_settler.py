"""Staged commits written into SQLite from a thread and connection of their own, off the hub's loop.

A settle (hub/journal.py: the front log's staged commits written into journal.db in one transaction) took the loop
~0.3 ms every ~11 events at 1,000/s; an event that came meanwhile waited for it, and the turns that held one were
the loop's longest (docs/performance.md, change 33). Nothing waits on that write: the commits are durable in the
front log already, and their DELIVERs and confirmations are out. So the loop hands it here and goes on; the
journal takes the outcome in at its next call (`Journal._reap`), and waits for it only where SQLite must hold
everything (a read, a commit that goes straight in, a close).

One write at a time: the journal hands over the next only once it has taken the last one's outcome in, so rows
reach SQLite in seq order whatever the thread does. sqlite3 gives up the GIL while SQLite works, which is most of a
settle; its own Python (the row list is built by the loop before the hand-over) is a few dozen µs.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class Settler(Generic[T, R]):
    """Runs `write(db, job)` for one job at a time on its own thread; `write` raises what the journal reports."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], write: Callable[[sqlite3.Connection, T], R]) -> None:
        """`connect`: the thread's connection, set up like the loop's (durability, limits). Made for the first job
        (again for the next if it failed), so a journal that never stages (durability "fsync") starts no thread."""
        self._connect = connect
        self._write = write
        self._jobs: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._done.set()
        self._outcome: tuple[R, None] | tuple[None, BaseException] | None = None
        self._thread: threading.Thread | None = None

    def start(self, job: T) -> None:
        """Hand `job` over; the one before must have been taken in (`outcome`)."""
        if not self._done.is_set() or self._outcome is not None:
            raise RuntimeError("the last settle's outcome was not taken in")
        self._done.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="journal-settle", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def done(self) -> bool:
        """Whether the job handed over last is finished (`outcome` then returns at once)."""
        return self._done.is_set()

    def wait(self) -> None:
        """Until the job handed over last is finished."""
        self._done.wait()

    def outcome(self) -> R:
        """The finished job's result, or the exception `write` raised, raised here (waits for it first)."""
        self._done.wait()
        got, self._outcome = self._outcome, None
        if got is None:
            raise RuntimeError("no settle was handed over")
        result, error = got
        if error is not None:
            raise error
        return cast(R, result)

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        while (job := self._jobs.get()) is not None:
            try:
                if db is None:
                    db = self._connect()
                self._outcome = (self._write(db, job), None)
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it where it takes it in
                self._outcome = (None, e)
            finally:
                self._done.set()
        if db is not None:
            db.close()

    def close(self) -> None:
        """Stop the thread (after its job: take that in with `outcome` first to see how it went)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(10)
            self._thread = None
