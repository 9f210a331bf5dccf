"""CPU time of process trees from /proc, so a benchmark can charge each system for its servers and workers.

Time on CPU comes from /proc/PID/task/TID/schedstat (nanoseconds, the scheduler's own accounting) where the kernel
has it, else from utime+stime in /proc/PID/stat (clock ticks, 10 ms: too coarse for a short run). `psutil` would
do this too; /proc is enough on Linux, where the benchmarks run, and adds no dependency. Descendants are found by
parent pid at each reading, so the worker children of a pool count while they live.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _parent(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return int(raw[raw.rindex(")") + 2:].split()[1])


def task_seconds(pid: int, tid: int) -> float:
    """Seconds on CPU of one thread (0.0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return 0.0
    f = raw[raw.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / _TICK


def process_seconds(pid: int) -> float:
    """Seconds on CPU of all live threads of one process."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0.0
    return sum(task_seconds(pid, t) for t in tids)


def tree_cpu(roots: list[int]) -> float:
    """Seconds of CPU used so far by `roots` and every live descendant of them."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ppid = _parent(int(entry.name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    total = 0.0
    todo = list(roots)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += process_seconds(pid)
        todo.extend(children.get(pid, []))
    return total


def machine_ticks(stat: str | None = None) -> tuple[int, int]:
    """(all, stolen) clock ticks of the machine's CPUs so far, from the `cpu` line of /proc/stat (`stat`: its text,
    read now if None). Stolen: time the hypervisor ran something else while this guest had work, which neither
    system's CPU figure shows but which every latency figure does: on a shared virtual machine it is most of
    what makes one run differ from the next. All: user, nice, system, idle, iowait, irq, softirq and steal
    (guest time is counted within user already)."""
    text = Path("/proc/stat").read_text() if stat is None else stat
    for line in text.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            ticks = [int(x) for x in f[1:9]]
            ticks += [0] * (8 - len(ticks))  # kernels before 2.6.11 have no steal field
            return sum(ticks), ticks[7]
    return 0, 0


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time stolen between two `machine_ticks` readings (0.0 when no tick passed)."""
    total = after[0] - before[0]
    return round((after[1] - before[1]) / total, 4) if total > 0 else 0.0
