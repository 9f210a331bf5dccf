"""Which threads one event wakes, and how long each waits for a CPU: the scheduler's view in docs/performance.md.

    python -m bucketwire.devstack.bench.wakes [bucketwire|nats|both] [RATE] [SECONDS] [busy]

Same setup as `bench bus --against nats` (two worker processes, durability os). Each side is warmed up with 2,000
events, then paced at RATE (default 1,000/s) for SECONDS (default 6), with `busy` beside a process that keeps
one core busy (as `bench bus --busy`); the middle two seconds are recorded with the
kernel's own scheduler tracepoints (`sched_waking`, `sched_switch`, from tracefs). For every activation of a thread
the trace says who woke it, when, and when it got a CPU; so the path of an event is read off the kernel, thread by
thread, with nothing added to either system's code:

* per thread: activations and CPU per event, and how long a wake-up waited for a CPU (p50 / p90);
* wake-ups by where the woken thread ran: on the waker's own CPU, or on the other one (an idle CPU of a virtual
  machine is halted, and its wake-up goes through the hypervisor);
* the path of an event: from the publisher to the thread that runs the handler, each hop's wait for a CPU and
  how long that thread then ran before it woke the next.

Needs root and tracefs (/sys/kernel/tracing), and the `nats` extra for the NATS side. Tracing is global: run
nothing else that traces at the same time. Scheduler tracing adds ~1 µs per context switch, to both sides alike.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import threading
import time
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bucketwire.devstack.bench.common import precise_sleeps, progress, progress_done

TRACEFS = Path(os.environ.get("BUCKETWIRE_TRACEFS", "/sys/kernel/tracing"))
EVENTS = ("sched/sched_switch", "sched/sched_waking")
WARMUP = 2000

_LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\(\s*([-\d]+)\)\s+\[(\d+)\]\s+\S+\s+([\d.]+):\s+(sched_\w+):\s+(.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


class TraceUnavailable(Exception):
    pass


# -- reading a trace -----------------------------------------------------------------------------------------
@dataclass
class Activation:
    """A thread's stretch on a CPU after a wake-up: woken at `woken` by `waker` (the waker's own activation, when
    the trace holds it), on a CPU at `ran`."""

    tid: int
    cpu: int
    woken: float
    ran: float
    waker: Activation | None
    cross: bool  # ran on another CPU than the waker's
    wakes: list[tuple[float, int]] = field(default_factory=list)  # (when, tid) of the threads it woke


@dataclass
class Trace:
    tgid: dict[int, int]
    comm: dict[int, str]
    activations: list[Activation]
    runtime: dict[int, float]  # seconds on a CPU, per thread
    first: float  # the trace's first and last timestamps (CLOCK_MONOTONIC, as Python's time.monotonic)
    last: float

    @property
    def span(self) -> float:
        return self.last - self.first


def parse(lines: Iterable[str]) -> Trace:
    """Activations from `sched_waking` / `sched_switch` lines (ftrace's text, with `record-tgid`). A wake-up is
    paired with the thread's next switch-in; one that finds the thread still on its CPU (it was about to sleep)
    is dropped when the thread switches out."""
    tgid: dict[int, int] = {}
    comm: dict[int, str] = {}
    pending: dict[int, tuple[float, int, Activation | None]] = {}  # woken tid -> (when, waker's CPU, waker's act)
    current: dict[int, Activation] = {}  # tid -> its latest activation
    on_cpu: dict[int, float] = {}
    runtime: dict[int, float] = defaultdict(float)
    acts: list[Activation] = []
    first = last = None
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        name, pid_s, tg, cpu_s, ts_s, event, rest = m.groups()
        pid, cpu, ts = int(pid_s), int(cpu_s), float(ts_s)
        first = ts if first is None else first
        last = ts
        if tg.strip("-"):
            tgid[pid] = int(tg)
            comm.setdefault(pid, name)
        f = dict(_FIELD.findall(rest))
        if event == "sched_waking":
            woken = int(f["pid"])
            comm.setdefault(woken, f.get("comm", "?"))
            if woken not in pending:
                pending[woken] = (ts, cpu, current.get(pid))
            act = current.get(pid)
            if act is not None:
                act.wakes.append((ts, woken))
        elif event == "sched_switch":
            prev, nxt = int(f["prev_pid"]), int(f["next_pid"])
            pending.pop(prev, None)
            if prev in on_cpu:
                runtime[prev] += ts - on_cpu.pop(prev)
            if nxt == 0:
                continue
            on_cpu[nxt] = ts
            comm.setdefault(nxt, f.get("next_comm", "?"))
            if nxt in pending:
                when, wcpu, wact = pending.pop(nxt)
                act = Activation(nxt, cpu, when, ts, wact, wcpu != cpu)
                current[nxt] = act
                acts.append(act)
    if first is not None and last is not None:
        for tid, t0 in on_cpu.items():
            runtime[tid] += last - t0
    return Trace(tgid, comm, acts, dict(runtime), first or 0.0, last or 0.0)


def _p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def thread_table(tr: Trace, role: Callable[[int], str | None], events: int) -> list[dict[str, Any]]:
    """Per role (threads of one kind summed): activations and CPU per event, wait for a CPU after a wake-up."""
    waits: dict[str, list[float]] = defaultdict(list)
    count: Counter[str] = Counter()
    cpu: dict[str, float] = defaultdict(float)
    for a in tr.activations:
        r = role(a.tid)
        if r is not None:
            waits[r].append(a.ran - a.woken)
            count[r] += 1
    for tid, s in tr.runtime.items():
        r = role(tid)
        if r is not None:
            cpu[r] += s
    rows = []
    for r in sorted(set(count) | set(cpu)):
        rows.append({"thread": r, "activations_per_event": round(count[r] / events, 2),
                     "cpu_us_per_event": round(cpu[r] / events * 1e6, 1),
                     "wait_p50_us": round(_p(waits[r], 0.5) * 1e6, 1),
                     "wait_p90_us": round(_p(waits[r], 0.9) * 1e6, 1)})
    return rows


def wake_kinds(tr: Trace, role: Callable[[int], str | None]) -> dict[str, dict[str, float]]:
    """Wake-ups of the systems' threads by where the woken thread ran: the waker's CPU, or the other one."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("same CPU", "other CPU"):
        w = [a.ran - a.woken for a in tr.activations
             if role(a.tid) is not None and a.cross == (kind == "other CPU")]
        out[kind] = {"wake_ups": len(w), "wait_p50_us": round(_p(w, 0.5) * 1e6, 1),
                     "wait_p90_us": round(_p(w, 0.9) * 1e6, 1)}
    return out


def chains(tr: Trace, role: Callable[[int], str | None], end: str, start: str, limit: int = 12
           ) -> list[list[Activation]]:
    """Each activation of an `end` thread followed back through its wakers to a `start` thread (first to last);
    activations whose wakers lead elsewhere (a timer, a thread outside both systems) are left out."""
    out = []
    for a in tr.activations:
        if role(a.tid) != end:
            continue
        chain = [a]
        x = a.waker
        while x is not None and len(chain) < limit:
            chain.append(x)
            if role(x.tid) == start:
                break
            x = x.waker
        if role(chain[-1].tid) == start:
            chain.reverse()
            out.append(chain)
    return out


def paths(found: list[list[Activation]], role: Callable[[int], str | None]) -> list[dict[str, Any]]:
    """The ways an event reached the handler's thread, most common first; for each hop, the wait for a CPU of the
    thread woken and how long the waker had run before it woke it (its own work on the event)."""
    by: dict[tuple[str, ...], list[list[Activation]]] = defaultdict(list)
    for c in found:
        by[tuple(role(a.tid) or "?" for a in c)].append(c)
    out = []
    for names, cs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        hops = []
        for i in range(1, len(names)):
            waited = [c[i].ran - c[i].woken for c in cs]
            ran = [c[i].woken - c[i - 1].ran for c in cs]
            hops.append({"from": names[i - 1], "to": names[i],
                         "waker_ran_us": round(statistics.median(ran) * 1e6, 1) if i > 1 else None,
                         "wait_p50_us": round(statistics.median(waited) * 1e6, 1),
                         "other_cpu": round(sum(c[i].cross for c in cs) / len(cs), 2)})
        total = [c[-1].ran - c[1].woken for c in cs if len(c) > 1]
        out.append({"path": list(names), "events": len(cs), "hops": hops,
                    "p50_us": round(statistics.median(total) * 1e6, 1) if total else 0.0})
    return out


Row = tuple[int, float, float]  # (event index, intended send time, handled at): monotonic, as the trace's clock


def ends(found: list[list[Activation]], rows_by_pid: dict[int, list[Row]], since: float, until: float
         ) -> dict[str, float]:
    """Both ends of the path, from the handlers' own rows (the trace runs on the same monotonic clock): from an
    event's intended send time to the publisher's first wake-up of another thread (the publisher's own work),
    and from the handler's thread getting its CPU to the handler running (the worker's work before the
    handler). p50s in µs, over the events of the window whose path is known."""
    by_tid: dict[int, list[list[Activation]]] = defaultdict(list)
    for c in found:
        by_tid[c[-1].tid].append(c)
    for cs in by_tid.values():
        cs.sort(key=lambda c: c[-1].ran)
    pub, path, worker, total = [], [], [], []
    for pid, rows in rows_by_pid.items():
        cs = by_tid.get(pid, [])
        starts = [c[-1].ran for c in cs]
        for _, intended, handled in rows:
            if not since <= intended <= until:
                continue
            i = bisect_right(starts, handled) - 1
            if i < 0 or len(cs[i]) < 2 or not intended <= cs[i][1].woken <= handled:
                continue
            c = cs[i]
            pub.append(c[1].woken - intended)
            path.append(c[-1].ran - c[1].woken)
            worker.append(handled - c[-1].ran)
            total.append(handled - intended)
    def p50(v: list[float]) -> float:
        return round(statistics.median(v) * 1e6, 1) if v else 0.0
    return {"events": len(total), "publisher_us": p50(pub), "path_us": p50(path), "worker_us": p50(worker),
            "total_us": p50(total)}


# -- recording -----------------------------------------------------------------------------------------------
class Recorder:
    """The scheduler tracepoints into the global ftrace buffer, for a window; the settings it changes are put
    back when it is done."""

    SETTINGS = ("trace_clock", "buffer_size_kb", "options/record-tgid", "tracing_on")

    def __init__(self, root: Path = TRACEFS) -> None:
        self.root = root
        if not (root / "trace").exists():
            raise TraceUnavailable(f"no tracefs at {root}: as root, `mount -t tracefs nodev {root}` (or set "
                                   "BUCKETWIRE_TRACEFS to where it is mounted)")
        if not os.access(root / "tracing_on", os.W_OK):
            raise TraceUnavailable(f"{root} is not writable: run this as root")
        self.saved: dict[str, str] = {}

    def _set(self, name: str, value: str) -> None:
        (self.root / name).write_text(value)

    def __enter__(self) -> Recorder:
        for s in self.SETTINGS:
            raw = (self.root / s).read_text().strip()
            chosen = re.search(r"\[(\w+)\]", raw)  # trace_clock lists every clock, the one in use bracketed
            # buffer_size_kb reads "7 (expanded: 1408)" until the buffer is first sized; only its number is taken back
            self.saved[s] = chosen.group(1) if chosen else raw.split()[0] if raw else raw
        self._set("tracing_on", "0")
        self._set("trace", "")
        self._set("trace_clock", "mono")
        self._set("buffer_size_kb", "32768")
        self._set("options/record-tgid", "1")
        for e in EVENTS:
            self._set(f"events/{e}/enable", "1")
        return self

    def window(self, after: float, seconds: float) -> threading.Thread:
        def run() -> None:
            time.sleep(after)
            self._set("tracing_on", "1")
            time.sleep(seconds)
            self._set("tracing_on", "0")

        t = threading.Thread(target=run, name="trace-window", daemon=True)
        t.start()
        return t

    def read(self) -> list[str]:
        return (self.root / "trace").read_text().splitlines()

    def __exit__(self, *exc: object) -> None:
        self._set("tracing_on", "0")
        for e in EVENTS:
            self._set(f"events/{e}/enable", "0")
        self._set("trace", "")
        for s in reversed(self.SETTINGS):
            self._set(s, self.saved[s])


def _roles(publisher: int, servers: dict[int, str], workers: dict[int, str], comm: dict[int, str],
           tgid: dict[int, int]) -> Callable[[int], str | None]:
    """A thread's role: its process's (publisher, the server, a worker) and, within it, main or I/O thread."""
    def role(tid: int) -> str | None:
        g = tgid.get(tid)
        if g is None:
            return None
        proc = "publisher" if g == publisher else servers.get(g) or workers.get(g)
        if proc is None:
            return None
        name = comm.get(tid, "")
        if name.startswith("ZMQbg/IO"):
            return f"{proc}: libzmq I/O"
        if name.startswith("ZMQbg"):
            return f"{proc}: {name}"
        if proc == "nats-server":
            return "nats-server"  # Go's threads are interchangeable: goroutines move between them
        return f"{proc}: main" if tid == g else f"{proc}: other threads"
    return role


def record(system: str, rate: int, seconds: float, busy: bool = False) -> dict[str, Any]:
    from contextlib import nullcontext

    from bucketwire.devstack.bench.jetstream import JetStreamSide
    from bucketwire.devstack.bench.profile_bus import children
    from bucketwire.devstack.bench.versus import BucketwireSide, Spinner

    window = min(2.0, max(0.5, seconds - 2))
    with Recorder() as rec:
        # made once tracing is up: a side made before the Recorder refused (no tracefs) left its temp dir behind
        side: Any = BucketwireSide(2, "os") if system == "bucketwire" else JetStreamSide(2, "os")
        try:
            side.start()
            side.saturate(WARMUP)
            if system == "bucketwire":
                hub, pool = side.stack.procs[0].pid, side.stack.procs[1].pid
                servers = {hub: "hub"}
                workers = {c: "worker" for c in children(pool)}
                end = "worker: main"
            else:
                servers = {side.server.pid: "nats-server"}
                workers = {w.pid: "worker" for w in side.workers}
                end = "worker: main"
            progress(f"wakes {system}: {int(rate * seconds)} events at {rate}/s{', one core busy' if busy else ''}, "
                     f"{window:.1f} s traced")
            with Spinner() if busy else nullcontext():
                w = rec.window((seconds - window) / 2, window)
                side.at_rate(WARMUP, int(rate * seconds), rate)
                w.join()
        finally:
            side.stop()
            progress_done()
        tr = parse(rec.read())
    role = _roles(os.getpid(), servers, workers, tr.comm, tr.tgid)
    events = max(1, round(tr.span * rate))
    found = chains(tr, role, end, "publisher: main")
    return {"system": system, "rate": rate, "busy": busy, "traced_s": round(tr.span, 3), "events": events,
            "threads": thread_table(tr, role, events), "wake_ups": wake_kinds(tr, role),
            "ends": ends(found, side.rows_by_pid, tr.first, tr.last), "paths": paths(found, role)[:3]}


def render(res: dict[str, Any]) -> str:
    busy = ", one core busy" if res.get("busy") else ""
    out = [f"## {res['system']}: {res['rate']}/s{busy}, {res['traced_s']} s traced (~{res['events']} events)", "",
           "| thread | activations / event | CPU µs / event | wait for a CPU p50 / p90 µs |", "|---|---|---|---|"]
    for r in res["threads"]:
        out.append(f"| {r['thread']} | {r['activations_per_event']} | {r['cpu_us_per_event']} | "
                   f"{r['wait_p50_us']} / {r['wait_p90_us']} |")
    out += ["", "| woken thread ran on | wake-ups | wait p50 / p90 µs |", "|---|---|---|"]
    for k, v in res["wake_ups"].items():
        out.append(f"| {k} | {v['wake_ups']} | {v['wait_p50_us']} / {v['wait_p90_us']} |")
    e = res["ends"]
    out += ["", f"One event, p50 over the {e['events']} of the window whose path is known: intended send time → the "
                f"publisher wakes the first thread {e['publisher_us']} µs; → the handler's thread gets a CPU "
                f"{e['path_us']} µs; → the handler runs {e['worker_us']} µs; end to end {e['total_us']} µs."]
    for p in res["paths"]:
        out += ["", f"Path of {p['events']} events (publisher's wake-up → handler's thread on a CPU: p50 "
                    f"{p['p50_us']} µs):", "",
                "| hop | the waker ran first (µs, p50) | woken thread waited (µs, p50) | on the other CPU |",
                "|---|---|---|---|"]
        for h in p["hops"]:
            ran = "—" if h["waker_ran_us"] is None else h["waker_ran_us"]
            out.append(f"| {h['from']} → {h['to']} | {ran} | {h['wait_p50_us']} | {h['other_cpu']:.0%} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    busy = "busy" in argv
    argv = [a for a in argv if a != "busy"]
    which = argv[0] if argv else "both"
    if which not in ("bucketwire", "nats", "both"):
        print("usage: python -m bucketwire.devstack.bench.wakes [bucketwire|nats|both] [RATE] [SECONDS] [busy]",
              file=sys.stderr)
        return 2
    rate = int(argv[1]) if len(argv) > 1 else 1000
    seconds = float(argv[2]) if len(argv) > 2 else 6.0
    import click

    from bucketwire.devstack.bench.jetstream import require_nats

    precise_sleeps()
    systems = ("bucketwire", "nats") if which == "both" else (which,)
    try:
        if "nats" in systems:
            require_nats()  # before the bucketwire side runs for nothing
        for system in systems:
            print(render(record(system, rate, seconds, busy)), flush=True)
    except TraceUnavailable as e:
        print(f"wakes: {e}", file=sys.stderr)
        return 2
    except click.ClickException as e:
        print(f"wakes: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
