"""Which processes are alive, read from /proc (no psutil): for tests that check nothing is left behind."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Proc(NamedTuple):
    ppid: int
    pgrp: int
    session: int


def _stats() -> dict[int, list[str]]:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, session, ...) of every process."""
    out: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        out[int(d.name)] = stat[stat.rindex(")") + 2:].split()
    return out


def processes() -> dict[int, Proc]:
    """Every live (non-zombie) process by pid."""
    return {pid: Proc(int(f[1]), int(f[2]), int(f[3])) for pid, f in _stats().items() if f[0] != "Z"}


def zombies_of(ppid: int) -> list[int]:
    """Children of `ppid` that exited and were not reaped."""
    return [pid for pid, f in _stats().items() if f[0] == "Z" and int(f[1]) == ppid]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
