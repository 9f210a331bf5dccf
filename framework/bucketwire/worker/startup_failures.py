"""A plugin's `worker_startup` that raises: said once, then counted, while the pool retries with backoff.

A startup that fails (a database not up yet) ends its child, and the supervisor starts another. Each child used
to log the whole traceback as it ended: every child of the pool, at every restart, for as long as the database
was down, burying everything else in the pool's log. Each child is a fresh process and cannot know it is the
tenth to fail the same way; its supervisor can. So the child logs nothing at error level: it leaves the plugin's
name, the error and its traceback in its running slot (worker/running.py) and ends with EXIT_STARTUP, and the
supervisor says the first failure whole (one line, then the traceback) and each identical one after as one line
counting it. The backoff grows with a slot's failures in a row, not with its crashes of the last minute: that
count fell back as the delay reached the minute, so a startup that kept failing went back to fast retries.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pluggy

from bucketwire.logs import log_with_traceback
from bucketwire.worker.running import RunningSlot

log = logging.getLogger("bucketwire.worker")

EXIT_STARTUP = 4
"""A child whose plugins' `worker_startup` raised ends with this code, its note left in its running slot."""
LINE_MAX = 1000
TRACEBACK_MAX = 8000
_FRAMEWORK = (str(Path(__file__).resolve().parents[1]) + os.sep, str(Path(pluggy.__file__).resolve().parent) + os.sep)


def line_of(e: BaseException) -> str:
    """`Type: text (file, line N)` of a plugin's exception, where the plugin's own innermost frame raised it (the
    frames of pluggy and of this framework below it say nothing to the plugin's author)."""
    said = traceback.format_exception_only(type(e), e)[-1].strip()
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _framework(f.filename)]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return (said[:LINE_MAX - len(where)] + where) if len(said) + len(where) > LINE_MAX else said + where


def _framework(filename: str) -> bool:
    return filename.startswith(_FRAMEWORK)


def plugin_traceback(e: BaseException) -> str:
    """The traceback of a plugin's exception without the frames of this framework and pluggy that called the
    plugin (a dozen lines through child.py, plugin_loading.py and pluggy's _multicall before the plugin's own)."""
    te = traceback.TracebackException.from_exception(e)
    own = [f for f in te.stack if not _framework(f.filename)]
    if own:
        te.stack = traceback.StackSummary.from_list(own)
    return "".join(te.format())


def leave_note(slot: RunningSlot, plugin: str, e: BaseException) -> None:
    """The child's side: what the supervisor says of this failure (see the module's docstring)."""
    tb = plugin_traceback(e)
    if len(tb) > TRACEBACK_MAX:
        tb = "... [cut]\n" + tb[-TRACEBACK_MAX:]
    slot.set_note(json.dumps({"plugin": plugin, "line": line_of(e), "traceback": tb}).encode())


@dataclass(frozen=True)
class Failure:
    plugin: str
    line: str
    traceback: str


def read_note(slot: RunningSlot) -> Failure | None:
    """The failure a child left in `slot` as it ended, or None (it ended some other way)."""
    raw = slot.note()
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return Failure(str(d["plugin"]), str(d["line"]), str(d.get("traceback", "")))
    except (ValueError, KeyError, TypeError):
        return None


class StartupFailures:
    """The supervisor's side: per slot its failed starts in a row, and the failure said last for the pool."""

    def __init__(self, backoff: tuple[float, float], tell: Callable[[str, str, int, float], None]) -> None:
        """`tell(plugin, line, count, retry_in)` reports the failures to the hub, for `status` (count 0: over)."""
        self.backoff, self.tell = backoff, tell
        self.in_a_row: dict[int, tuple[int, str]] = {}  # slot -> its failed starts in a row, the plugin last
        self.said: tuple[str, str] | None = None  # (plugin, line) of the failure logged whole
        self.count = 0  # its repeats so far, the first included, over every slot

    def failed(self, slot: int, f: Failure) -> float:
        """Log `slot`'s child's failed start; returns the seconds to wait before starting another."""
        n = self.in_a_row.get(slot, (0, ""))[0] + 1
        self.in_a_row[slot] = (n, f.plugin)
        delay = min(self.backoff[1], self.backoff[0] * 2.0 ** (n - 1))
        extra = {"plugin": f.plugin, "slot": slot}
        if self.said == (f.plugin, f.line):
            self.count += 1
            self.tell(f.plugin, f.line, self.count, delay)
            log.warning(f"worker_startup of plugin {f.plugin!r} failed again ({self.count} times): {f.line}; "
                        f"restarting the child in {delay:g} s", extra=extra)
            return delay
        self.said, self.count = (f.plugin, f.line), 1
        self.tell(f.plugin, f.line, 1, delay)
        log_with_traceback(log, logging.ERROR, f"worker_startup of plugin {f.plugin!r} failed: {f.line}; the child "
                           f"is restarted in {delay:g} s, with a longer wait after each failure in a row (up to "
                           f"{self.backoff[1]:g} s), and repeats of this failure are counted in one line each",
                           f.traceback, extra)
        return delay

    def close(self) -> None:
        """The pool stops: what it reported to the hubs is over (`status` would show it for STALE seconds)."""
        if self.said is not None:
            self.tell(self.said[0], "", 0, 0.0)

    def check_started(self, slots: dict[int, RunningSlot]) -> None:
        """A child that failed before has now got past its plugins' `worker_startup` (it has connected)."""
        for slot in [s for s in self.in_a_row if slots[s].ident()]:
            n, plugin = self.in_a_row.pop(slot)
            log.info(f"worker_startup of plugin {plugin!r} succeeded after {n} failed attempt(s) in this slot; the "
                     "child takes events", extra={"slot": slot})
            if not self.in_a_row:
                self.said, self.count = None, 0
                self.tell(plugin, "", 0, 0.0)
