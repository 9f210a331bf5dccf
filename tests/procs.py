"""Which processes are alive, read from /proc (no psutil): for tests that check nothing is left behind."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Proc(NamedTuple):
    ppid: int
    pgrp: int
    session: int


def processes() -> dict[int, Proc]:
    """Every live (non-zombie) process by pid."""
    out: dict[int, Proc] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        if f[0] != "Z":
            out[int(d.name)] = Proc(int(f[1]), int(f[2]), int(f[3]))
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
