"""Structured logging: one line per state change, nothing per event unless -v.

`text` is for people at a terminal, `json` for log shippers; both carry the same fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time

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
        return json.dumps(d, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED)
        t = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{t} {record.levelname.lower():5} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "text", verbosity: int = 0) -> None:
    level = logging.DEBUG if verbosity >= 1 else logging.INFO if verbosity >= 0 else logging.WARNING
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("bucketwire")
    root.handlers[:] = [h]
    root.setLevel(level)
    root.propagate = False
    # -v: debug detail of state changes; -vv: also one line per handled event (logger bucketwire.events)
    logging.getLogger("bucketwire.events").setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
