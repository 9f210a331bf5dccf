"""Structured logging: one line per state change, nothing per event unless -v.

`text` is for people at a terminal, `json` for log shippers; both carry the same fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        d.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # a traceback another process formatted (`log_with_traceback`)
            d["exc"] = record.exc_text
        return json.dumps(d, default=str)


_CONTROLS = ({c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
             | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})
"""C0, DEL and C1 characters and the Unicode line separators, and how a text log line shows them."""


class TextFormatter(logging.Formatter):
    """One line per record. Its fields hold what senders sent (event ids, keys, store names, errors quoting them),
    so control characters are written escaped: a newline in an event id wrote a line of its own, which looked like
    the hub's, and an escape sequence reached the terminal of whoever read the log."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED)
        t = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{t} {record.levelname.lower():5} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if not line.isprintable():
            line = line.translate(_CONTROLS)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


def log_with_traceback(logger: logging.Logger, level: int, msg: str, tb: str, extra: dict[str, object]) -> None:
    """Log `msg` with traceback `tb` as text, formatted where the exception was raised: in a worker child, whose
    supervisor says it (worker/startup_failures.py). Printed as an exception's traceback is (json: `exc`)."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, (), None, extra=extra)
    record.exc_text = tb.rstrip("\n") or None
    logger.handle(record)


PEER_WINDOW = 10.0
"""Seconds in which one warning a peer causes is logged once (see PeerRateLimit)."""


REPEAT_FIELDS = ("key", "ingress", "plugin", "group")
"""What a warning that can come once per request or per event names, the first of these a record has: a key's
refused publishes, a webhook client's refused events, a plugin's failed handlers (`handler failed`, in the pool), a
group's dead letters (`event dead-lettered`, in the hub)."""


INFO_BURSTS = {"worker joined": 64, "worker left": 64, "worker died": 64, "worker lost (no heartbeat)": 64}
"""Info lines a peer can also repeat at will (READY then BYE in a loop: two lines per cycle, without end), and how
many of each are logged line by line per `PEER_WINDOW` and group before they are held back like the warnings. A
pool starting or stopping (a line per child) stays whole in the log; a loop does not fill it."""


class PeerRateLimit(logging.Filter):
    """One line per `PEER_WINDOW` for each warning a peer or a plugin can repeat at will (records naming one of
    REPEAT_FIELDS), the next one carrying how many were left out (`suppressed`). One per request let any admitted
    key, sending what its role forbids in a loop, fill the disk and bury everything else; one per event did the same
    for a plugin failing every event (10,000 lines/s at 10,000 events/s). The refusals still go to the peer, every
    failure to the dead-letter topic, and the metrics count them all. The info lines of INFO_BURSTS get their burst
    per window first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        # (message, peer) -> (window start, lines logged in it, lines left out)
        self.seen: dict[tuple[str, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            burst = 1
        elif record.levelno == logging.INFO and type(record.msg) is str and record.msg in INFO_BURSTS:
            burst = INFO_BURSTS[record.msg]
        else:
            return True
        peer = next((v for v in map(record.__dict__.get, REPEAT_FIELDS) if v is not None), None)
        if peer is None:
            return True
        k, now = (str(record.msg), str(peer)), self.clock()
        start, logged, dropped = self.seen.get(k, (float("-inf"), 0, 0))
        if now - start < PEER_WINDOW:
            if logged < burst:
                self.seen[k] = (start, logged + 1, dropped)
                return True
            self.seen[k] = (start, logged, dropped + 1)
            return False
        if len(self.seen) > 10_000:  # peers and messages are bounded in practice; this memory is anyway
            self.seen.clear()
        self.seen[k] = (now, 1, 0)
        if dropped:
            record.suppressed = dropped
        return True


def setup(fmt: str = "text", verbosity: int = 0) -> None:
    level = logging.DEBUG if verbosity >= 1 else logging.INFO if verbosity >= 0 else logging.WARNING
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    h.addFilter(PeerRateLimit())
    root = logging.getLogger("bucketwire")
    root.handlers[:] = [h]
    root.setLevel(level)
    root.propagate = False
    # -v: debug detail of state changes; -vv: also one line per handled event (logger bucketwire.events)
    logging.getLogger("bucketwire.events").setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
