"""Where a bus event's time goes, on bucketwire and on NATS JetStream: the numbers behind docs/performance.md.

    python -m bucketwire.devstack.bench.profile_bus [EVENTS] [RATE] [SECONDS] > profile.json

Same setup as `bench bus --against nats` (two worker processes, durability os). Three separate runs per system,
because each probe disturbs what the others measure:

1. clean: CPU per event of every thread of the servers and workers (/proc/PID/task), and the hub's own metrics
   (commits, dispatch batches, acks per event);
2. probed (bucketwire only): the hub runs under `hubprobe` -- SQLite statements per event, Python function calls
   per event (cProfile of the loop thread) and mallocs per event (PYTHONMALLOC=malloc and a preloaded counter,
   if a C compiler is there);
3. strace: `strace -c -f` on every thread of the server and of the worker processes, syscalls per event.

Each run has a saturation phase (EVENTS as fast as the publisher goes) and a fixed-rate phase (RATE for SECONDS).
Needs `strace` (apt-get install strace) for run 3 and the `nats` extra for the NATS side.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bucketwire.devstack.bench.common import progress, progress_done
from bucketwire.devstack.bench.cpu import task_seconds
from bucketwire.devstack.bench.hubprobe import MALLOC_COUNTER_C
from bucketwire.devstack.bench.jetstream import JetStreamSide
from bucketwire.devstack.bench.versus import BucketwireSide


def children(pid: int) -> list[int]:
    """Child processes of `pid`, without multiprocessing's resource tracker (not a worker)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2:].split()[1]) != pid:
                continue
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                out.append(int(entry.name))
    return out


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed: libzmq's, Go's)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1: raw.rindex(")")]
        if tid == str(pid):
            name = "main thread"
        elif name.startswith("python"):  # Python 3.11 leaves its threads the program's name
            name = "other Python threads"  # the hub's checkpoint thread; a worker child's I/O thread
        out[name] = out.get(name, 0.0) + task_seconds(pid, int(tid))
    return out


def per_event(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / n * 1e6, 1) for k in after
            if after.get(k, 0.0) - before.get(k, 0.0) > 0}


def hub_metrics(port: int) -> dict[str, float]:
    """Counters from the hub's /metrics that say how work is batched."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = {"bucketwire_journal_commits_total": "commits", "bucketwire_dispatched_total": "dispatched",
            "bucketwire_dispatch_batches_total": "dispatch_batches", "bucketwire_acked_total": "acked"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)(\{[^}]*\})? ([0-9.e+]+)$", line)
        if m and m.group(1) in want:
            out[want[m.group(1)]] = out.get(want[m.group(1)], 0.0) + float(m.group(3))
    return out


class Strace:
    """`strace -c -f` attached to every thread of some processes, until stopped; the summary is parsed."""

    def __init__(self, pids: list[int], out: Path) -> None:
        self.out = out
        tids = [int(t) for p in pids for t in os.listdir(f"/proc/{p}/task")]
        args = [a for t in tids for a in ("-p", str(t))]
        self.p = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *args], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # attached when every thread shows a tracer
            if all(self._traced(t) for t in tids):
                return
            time.sleep(0.02)
        raise RuntimeError("strace did not attach")

    @staticmethod
    def _traced(tid: int) -> bool:
        try:
            for line in Path(f"/proc/{tid}/status").read_text().splitlines():
                if line.startswith("TracerPid:"):
                    return int(line.split()[1]) != 0
        except OSError:
            return True  # gone: nothing to wait for
        return False

    def stop(self) -> dict[str, int]:
        self.p.send_signal(signal.SIGINT)
        self.p.wait(30)
        calls: dict[str, int] = {}
        for line in self.out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
        return calls


def _syscalls(calls: dict[str, int], n: int) -> dict[str, Any]:
    total = sum(calls.values())
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
    return {"per_event": round(total / n, 2), "top_per_event": {k: round(v / n, 3) for k, v in top}}


def _phases(side: Any, n: int, rate: int, seconds: float, measure: Any) -> dict[str, Any]:
    """Run saturation then the fixed rate, calling measure(name, lo, hi, start|stop) around each."""
    out = {}
    k = int(rate * seconds)
    for name, lo, hi in (("saturation", 0, n), (f"{rate}/s", n, n + k)):
        measure(name, lo, hi, "start")
        if name == "saturation":
            side.saturate(n)
        else:
            side.at_rate(lo, k, rate)
        out[name] = measure(name, lo, hi, "stop")
    return out


def bucketwire_clean(n: int, rate: int, seconds: float) -> dict[str, Any]:
    side = BucketwireSide(2, "os")
    side.start()
    hub, pool = side.stack.procs[0].pid, side.stack.procs[1].pid
    kids = children(pool)
    snap: dict[str, Any] = {}

    def measure(name: str, lo: int, hi: int, when: str) -> Any:
        now = {"hub": threads_cpu(hub), "pool": threads_cpu(pool), "metrics": hub_metrics(side.stack.http),
               **{f"child{i}": threads_cpu(c) for i, c in enumerate(kids)}}
        if when == "start":
            snap[name] = now
            return None
        b, ev = snap[name], hi - lo
        res: dict[str, Any] = {"events": ev, "cpu_us_per_event": {
            "hub": per_event(b["hub"], now["hub"], ev), "pool supervisor": per_event(b["pool"], now["pool"], ev),
            "worker children (both)": {}}}
        for i in range(len(kids)):
            for t, v in per_event(b[f"child{i}"], now[f"child{i}"], ev).items():
                d = res["cpu_us_per_event"]["worker children (both)"]
                d[t] = round(d.get(t, 0.0) + v, 1)
        res["per_event"] = {k: round((now["metrics"].get(k, 0) - b["metrics"].get(k, 0)) / ev, 4)
                            for k in now["metrics"]}
        return res

    try:
        return _phases(side, n, rate, seconds, measure)
    finally:
        side.stop()


def whole_lines(path: Path) -> list[str]:
    """The lines of `path` that have their newline. The hub probe's report of several KB reaches the file in more
    than one write, and a line read before its end failed to parse now and then (in CI)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []


def bucketwire_probed(n: int, rate: int, seconds: float, so: Path | None) -> dict[str, Any]:
    side = BucketwireSide(2, "os")
    probe_out = side.stack.tmp / "probe.jsonl"
    env = dict(os.environ, BUCKETWIRE_PROBE_OUT=str(probe_out))
    if so is not None:
        env.update(LD_PRELOAD=str(so), PYTHONMALLOC="malloc")
    st = side.stack
    hub = subprocess.Popen([sys.executable, "-m", "bucketwire.devstack.bench.hubprobe", "-q", "hub", "-c",
                            str(st.cfg_path)], stdout=subprocess.DEVNULL, stderr=(st.tmp / "hub.log").open("wb"),
                           start_new_session=True, env=env)
    st.procs.append(hub)
    st.spawn("worker", "--group", "bench", "-n", "2", "--plugin", "bucketwire.devstack.bench.noop_plugin")
    try:
        st.wait_workers(2)
    except BaseException:
        st.close()
        raise
    from bucketwire.devstack.bench.bus import Publisher

    side.pub = Publisher(st.config().client.work_endpoints[0])
    lines_seen = 0

    def measure(name: str, lo: int, hi: int, when: str) -> Any:
        nonlocal lines_seen
        hub.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the probe answers each toggle with a line
            lines = whole_lines(probe_out)
            if len(lines) > lines_seen:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the hub probe did not answer")
        d = json.loads(lines[lines_seen])
        lines_seen += 1
        if when == "start":
            return None
        ev = hi - lo
        calls = d["by_name"]

        def ncalls(suffix: str) -> float:
            """Calls of the hub loop's own method `suffix` ("(tick)"): HubOps and the listeners have a `tick` too."""
            return round(sum(int(v) for k, v in calls.items() if k.startswith("loop.py:") and k.endswith(suffix))
                         / ev, 4)

        return {
            "events": ev,
            "sql_statements_per_event": {k: round(v / ev, 3) for k, v in sorted(d["sql"].items())},
            "python_calls_per_event_loop_thread": round(d["calls"] / ev, 1),
            "mallocs_per_event_hub_process": round(d["mallocs"] / ev, 1) if d["mallocs"] >= 0 else None,
            # A loop turn calls `_commit` whether or not it writes; a transaction is a BEGIN on the loop thread.
            "per_event": {"ticks": ncalls("(tick)"), "commits": round(d["sql"].get("MainThread: BEGIN", 0) / ev, 4),
                          "PUB requests": ncalls("(_on_pub)"), "ACK frames": ncalls("(_on_ack)"),
                          "STATUS requests": ncalls("(status)")},
            # zmq's poll is where the loop waits for work: wall time, not CPU, so it is left out.
            "top_functions_us_per_event": [
                {"func": f["func"], "us": round(f["tottime"] / ev * 1e6, 2), "calls": round(f["calls"] / ev, 2)}
                for f in d["functions"] if not f["func"].startswith("poll.py")][:15],
        }

    try:
        return _phases(side, n, rate, seconds, measure)
    finally:
        side.stop()


def strace_run(side: Any, server: int, workers: list[int], n: int, rate: int, seconds: float,
               tmp: Path) -> dict[str, Any]:
    """Syscalls of the server (all threads) and of the worker processes (all of them: at a modest rate
    bucketwire's warm worker takes every event, and which one that is is not known in advance), per event."""
    traces: dict[str, Strace] = {}
    windows: dict[str, tuple[int, int]] = {}

    def measure(name: str, lo: int, hi: int, when: str) -> Any:
        if when == "start":
            traces["server"] = Strace([server], tmp / f"server-{lo}.strace")
            traces["worker"] = Strace(workers, tmp / f"worker-{lo}.strace")
            return None
        windows[name] = (lo, hi)
        return {"events": hi - lo, "server": _syscalls(traces["server"].stop(), hi - lo),
                "worker": traces["worker"].stop()}

    try:
        res = _phases(side, n, rate, seconds, measure)
    finally:
        side.stop()
    for name, v in res.items():
        lo, hi = windows[name]
        mine = sum(1 for w in workers for r in side.rows_by_pid.get(w, []) if lo <= r[0] < hi)
        v["worker"] = {"events_handled": mine, **_syscalls(v["worker"], max(1, mine))}
    return res


def bucketwire_strace(n: int, rate: int, seconds: float, tmp: Path) -> dict[str, Any]:
    side = BucketwireSide(2, "os")
    side.start()
    return strace_run(side, side.stack.procs[0].pid, children(side.stack.procs[1].pid), n, rate, seconds, tmp)


def nats_clean(n: int, rate: int, seconds: float) -> dict[str, Any]:
    side = JetStreamSide(2, "os")
    side.start()
    srv, workers = side.server.pid, [w.pid for w in side.workers]
    snap: dict[str, Any] = {}

    def measure(name: str, lo: int, hi: int, when: str) -> Any:
        now: dict[str, Any] = {"server": sum(threads_cpu(srv).values()),
                               **{f"w{i}": threads_cpu(w) for i, w in enumerate(workers)}}
        if when == "start":
            snap[name] = now
            return None
        b, ev = snap[name], hi - lo
        wk: dict[str, float] = {}
        for i in range(len(workers)):
            for t, v in per_event(b[f"w{i}"], now[f"w{i}"], ev).items():
                wk[t] = round(wk.get(t, 0.0) + v, 1)
        return {"events": ev, "cpu_us_per_event": {
            "nats-server (all threads)": round((now["server"] - b["server"]) / ev * 1e6, 1),
            "worker processes (both)": wk}}

    try:
        return _phases(side, n, rate, seconds, measure)
    finally:
        side.stop()


def nats_strace(n: int, rate: int, seconds: float, tmp: Path) -> dict[str, Any]:
    side = JetStreamSide(2, "os")
    side.start()
    return strace_run(side, side.server.pid, [w.pid for w in side.workers], n, rate, seconds, tmp)


def compile_malloc_counter(tmp: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, so = tmp / "malloc_count.c", tmp / "malloc_count.so"
    src.write_text(MALLOC_COUNTER_C)
    r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(src), "-ldl"], capture_output=True)
    return so if r.returncode == 0 else None


def run(n: int, rate: int, seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bucketwire-profile-"))
    so = compile_malloc_counter(tmp)
    out: dict[str, Any] = {"events": n, "rate": rate, "seconds": seconds}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("bucketwire clean", lambda: bucketwire_clean(n, rate, seconds)),
        ("nats clean", lambda: nats_clean(n, rate, seconds)),
        ("bucketwire probed", lambda: bucketwire_probed(n, rate, seconds, so))]
    if shutil.which("strace"):
        steps += [("bucketwire strace", lambda: bucketwire_strace(n, rate, seconds, tmp)),
                  ("nats strace", lambda: nats_strace(n, rate, seconds, tmp))]
    try:
        for name, fn in steps:
            progress(f"profile: {name}")
            out[name] = fn()
    finally:
        progress_done()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _top(d: dict[str, Any], k: int = 4) -> str:
    return ", ".join(f"{name} {v:g}" for name, v in list(d["top_per_event"].items())[:k])


def markdown(res: dict[str, Any]) -> str:
    """The README's tables, from `run`'s result."""
    rate = f"{res['rate']}/s"
    bc, nc = res["bucketwire clean"], res["nats clean"]
    lines = [f"| CPU µs per event | saturation | {rate} |", "|---|---|---|"]

    def cpu_rows(side: dict[str, Any], label: str, key: str, names: dict[str, str]) -> None:
        for thread, pretty in names.items():
            v = [side[ph]["cpu_us_per_event"][key].get(thread, 0.0) for ph in ("saturation", rate)]
            lines.append(f"| {label}: {pretty} | {v[0]:g} | {v[1]:g} |")

    cpu_rows(bc, "hub", "hub", {"main thread": "loop thread", "ZMQbg/IO/0": "libzmq I/O thread",
                                "other Python threads": "checkpoint thread"})
    cpu_rows(bc, "worker children (2)", "worker children (both)",
             {"main thread": "main thread (handlers)", "other Python threads": "Python I/O thread",
              "ZMQbg/IO/0": "libzmq I/O thread"})
    bw_tot = [round(sum(sum(v.values()) for v in bc[ph]["cpu_us_per_event"].values()), 1)
              for ph in ("saturation", rate)]
    lines.append(f"| **bucketwire, all** | **{bw_tot[0]:g}** | **{bw_tot[1]:g}** |")
    srv = [nc[ph]["cpu_us_per_event"]["nats-server (all threads)"] for ph in ("saturation", rate)]
    wk = [round(sum(nc[ph]["cpu_us_per_event"]["worker processes (both)"].values()), 1)
          for ph in ("saturation", rate)]
    lines.append(f"| nats-server (all threads) | {srv[0]:g} | {srv[1]:g} |")
    lines.append(f"| NATS workers (2, one thread each) | {wk[0]:g} | {wk[1]:g} |")
    lines.append(f"| **NATS, all** | **{round(srv[0] + wk[0], 1):g}** | **{round(srv[1] + wk[1], 1):g}** |")
    if "bucketwire strace" in res:
        bs, ns = res["bucketwire strace"], res["nats strace"]
        lines += ["", f"| syscalls per event | saturation | {rate} | most frequent at {rate} |", "|---|---|---|---|"]
        for label, side, who in (("hub (all threads)", bs, "server"), ("bucketwire worker children (2)", bs, "worker"),
                                 ("nats-server (all threads)", ns, "server"), ("NATS workers (2)", ns, "worker")):
            lines.append(f"| {label} | {side['saturation'][who]['per_event']:g} | {side[rate][who]['per_event']:g} "
                         f"| {_top(side[rate][who])} |")
    bp = res["bucketwire probed"]
    lines += ["", f"| hub, per event | saturation | {rate} |", "|---|---|---|"]
    for k, label in (("ticks", "loop turns"), ("commits", "journal transactions"), ("PUB requests", "PUB requests"),
                     ("ACK frames", "ACK frames from workers")):
        lines.append(f"| {label} | {bp['saturation']['per_event'][k]:g} | {bp[rate]['per_event'][k]:g} |")
    m = [bc[ph]["per_event"].get("dispatch_batches", 0.0) for ph in ("saturation", rate)]
    lines.append(f"| DELIVER batches | {m[0]:g} | {m[1]:g} |")
    kinds = sorted(set(bp["saturation"]["sql_statements_per_event"]) | set(bp[rate]["sql_statements_per_event"]))
    for k in kinds:
        v = [bp[ph]["sql_statements_per_event"].get(k, 0.0) for ph in ("saturation", rate)]
        thread, word = k.split(": ", 1)
        lines.append(f"| SQLite `{word}` ({'loop thread' if thread == 'MainThread' else thread}) | {v[0]:g} "
                     f"| {v[1]:g} |")
    for k, label in (("python_calls_per_event_loop_thread", "Python function calls, loop thread"),
                     ("mallocs_per_event_hub_process", "mallocs, whole hub process")):
        lines.append(f"| {label} | {bp['saturation'][k]} | {bp[rate][k]} |")
    lines += ["", "Loop thread self time at saturation under cProfile (µs per event, inflated by the profiler; "
              "for ranking):", ""]
    lines.append("; ".join(f"`{f['func']}` {f['us']:g}" for f in bp["saturation"]["top_functions_us_per_event"][:12]))
    return "\n".join(lines)


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if not x.startswith("--")]
    if "--markdown" in sys.argv:  # tables from a saved result: profile_bus --markdown < profile.json
        print(markdown(json.load(sys.stdin)))
    else:
        print(json.dumps(run(int(a[0]) if a else 20_000, int(a[1]) if len(a) > 1 else 1000,
                             float(a[2]) if len(a) > 2 else 3.0), indent=2))
