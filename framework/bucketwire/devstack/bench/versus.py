"""`bucketwire bench bus --against nats`: bucketwire and NATS JetStream under the same conditions, alternately.

Each round starts a fresh system (server(s) and two worker processes), publishes `events` as fast as one Python
publisher can with durable confirmations outstanding, waits until every event is handled and acked, then offers a
fixed rate for latency (from each event's intended send time, so a publisher that falls behind shows as latency),
and with `busy` once more while a spinning process holds one core. Rounds alternate (bucketwire, nats, ...) so
drift on a shared machine hits both; the medians are compared and every round is kept.

CPU per event is the time on CPU of the servers and workers (and their children) over a phase, from /proc
(`cpu.py`), divided by the events of that phase; the publisher's own CPU is reported apart, as it is the user's
code on both sides.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import click

from bucketwire.devstack.bench.common import precise_sleeps, progress, progress_done
from bucketwire.devstack.bench.cpu import machine_ticks, steal_share, tree_cpu

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def pct_key(p: float) -> str:
    return f"p{p:g}".replace(".", "") + "_ms"  # p50_ms, p90_ms, p99_ms, p999_ms


def latency_percentiles(samples: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds, including p99.9 for the plot."""
    out: dict[str, float] = {pct_key(p): 0.0 for p in PERCENTILES}
    out.update({"max_ms": 0.0, "n": 0})
    if not samples:
        return out
    s = sorted(samples)
    for p in PERCENTILES:
        out[pct_key(p)] = round(s[min(len(s) - 1, max(0, int(round(p / 100 * len(s))) - 1))] * 1000, 3)
    out["max_ms"] = round(s[-1] * 1000, 3)
    out["n"] = len(s)
    return out


Row = tuple[int, float, float]  # event index, intended send time, handled time (time.monotonic, all processes)


def read_rows(directory: Path) -> dict[int, list[Row]]:
    """The rows each worker process wrote (files `latency.PID`), by pid."""
    out: dict[int, list[Row]] = {}
    for f in directory.glob("latency.*"):
        rows = out.setdefault(int(f.suffix[1:]), [])
        for line in f.read_text().splitlines():
            i, t, r = line.split()
            rows.append((int(i), float(t), float(r)))
    return out


class Side(Protocol):
    """One system under test for one round."""

    name: str
    failed: int

    def start(self) -> None: ...
    def roots(self) -> list[int]: ...
    def saturate(self, n: int) -> float: ...
    def at_rate(self, first: int, k: int, rate: float) -> None: ...
    def stop(self) -> list[Row]: ...


class BucketwireSide:
    """A hub and a worker pool (`--processes N`, the bench's no-op plugin), published to over the PUB path."""

    name = "bucketwire"

    def __init__(self, processes: int, durability: str, transport: str = "local") -> None:
        from bucketwire.devstack.bench.common import Stack

        self.processes = processes
        self.stack = Stack(durability, local=transport == "local")
        self.pub: Any = None
        self.failed = 0
        self.rows_by_pid: dict[int, list[Row]] = {}

    def start(self) -> None:
        from bucketwire.devstack.bench.bus import Publisher

        self.stack.spawn("hub")
        self.stack.spawn("worker", "--group", "bench", "-n", str(self.processes),
                         "--plugin", "bucketwire.devstack.bench.noop_plugin")
        self.stack.wait_workers(self.processes)
        self.pub = Publisher(self.stack.config().client.work_endpoints[0])

    def roots(self) -> list[int]:
        return [p.pid for p in self.stack.procs]

    def saturate(self, n: int) -> float:
        from bucketwire.devstack.bench.bus import _wait_handled, payload

        t0 = time.monotonic()
        for i in range(0, n, 100):
            now = time.monotonic()
            self.pub.send([payload(j, now) for j in range(i, min(n, i + 100))])
        self.pub.drain()
        _wait_handled(self.stack, n, "bucketwire")
        return t0

    def at_rate(self, first: int, k: int, rate: float) -> None:
        from bucketwire.devstack.bench.bus import _wait_handled, payload

        start = time.monotonic() + 0.05
        for j in range(k):
            t = start + j / rate
            self.pub.send_at(t, [payload(first + j, t)])
        self.pub.drain()
        _wait_handled(self.stack, first + k, "bucketwire")

    def stop(self) -> list[Row]:
        if self.pub is not None:
            self.failed = self.pub.failed
            self.pub.close()
        self.stack.stop()
        try:
            self.rows_by_pid = read_rows(self.stack.tmp)
        finally:
            self.stack.close()
        return [r for rows in self.rows_by_pid.values() for r in rows]


class Spinner:
    """A process that keeps one core busy, for the `--busy` latency phase."""

    def __enter__(self) -> Spinner:
        self.p = subprocess.Popen([sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
                                  stdout=subprocess.PIPE)
        assert self.p.stdout is not None
        self.p.stdout.readline()
        return self

    def __exit__(self, *exc: object) -> None:
        self.p.kill()
        self.p.wait()


def one_round(side: Side, n: int, rates: list[int], seconds: float, busy: bool) -> dict[str, Any]:
    """Saturation, then each fixed rate, then (busy) each fixed rate again beside a spinning process."""
    phases: list[tuple[str, int, int]] = []
    cpu: dict[str, float] = {}
    steal: dict[str, float] = {}
    pub_cpu = 0.0
    try:
        side.start()  # inside the try: a side that fails half-way is still stopped
        roots = side.roots()
        c0, p0, m0 = tree_cpu(roots), time.process_time(), machine_ticks()
        t0 = side.saturate(n)
        cpu["saturation"] = tree_cpu(roots) - c0
        steal["saturation"] = steal_share(m0, machine_ticks())
        pub_cpu = time.process_time() - p0
        done = n
        for rate in rates:
            k = max(1, int(rate * seconds))
            progress(f"bench bus {side.name}: {k} events at {rate}/s")
            c0, m0 = tree_cpu(roots), machine_ticks()
            side.at_rate(done, k, rate)
            cpu[str(rate)] = tree_cpu(roots) - c0
            steal[str(rate)] = steal_share(m0, machine_ticks())
            phases.append((str(rate), done, done + k))
            done += k
        if busy:
            with Spinner():
                for rate in rates:
                    k = max(1, int(rate * seconds))
                    progress(f"bench bus {side.name}: {k} events at {rate}/s, one core busy")
                    m0 = machine_ticks()
                    side.at_rate(done, k, rate)
                    steal[f"busy {rate}"] = steal_share(m0, machine_ticks())
                    phases.append((f"busy {rate}", done, done + k))
                    done += k
    finally:
        rows = side.stop()
        progress_done()
    if side.failed:
        raise click.ClickException(f"bench bus {side.name}: {side.failed} publishes were refused")
    if len(rows) < done:
        raise click.ClickException(f"bench bus {side.name}: {len(rows)} of {done} events were handled")
    sat = [r for r in rows if r[0] < n]
    out: dict[str, Any] = {
        "events_per_s": round(n / (max(r[2] for r in sat) - t0), 1),
        "handled": len(rows),
        "cpu_us_per_event": round(cpu["saturation"] / n * 1e6, 2),
        "publisher_cpu_us_per_event": round(pub_cpu / n * 1e6, 2),
        "cpu_us_per_event_at_rate": {},
        "latency": {},
        "latency_busy": {},
        "steal": steal,
    }
    for name, lo, hi in phases:
        lat = latency_percentiles([r[2] - r[1] for r in rows if lo <= r[0] < hi])
        if name.startswith("busy "):
            out["latency_busy"][name[5:]] = lat
        else:
            out["latency"][name] = lat
            out["cpu_us_per_event_at_rate"][name] = round(cpu[name] / (hi - lo) * 1e6, 2)
    return out


def _at(r: dict[str, Any], keys: list[str]) -> float:
    """The figure at `keys` (a path of keys) in one round's result."""
    v: Any = r
    for k in keys:
        v = v[k]
    return float(v)


def _median_of(rounds: list[dict[str, Any]], *path: str) -> float:
    return round(statistics.median(_at(r, list(path)) for r in rounds), 3)


def summarise(rounds: list[dict[str, Any]], rates: list[int]) -> dict[str, Any]:
    """Medians over rounds, per figure; the rounds themselves stay in the result."""
    s: dict[str, Any] = {
        "events_per_s": _median_of(rounds, "events_per_s"),
        "cpu_us_per_event": _median_of(rounds, "cpu_us_per_event"),
        "publisher_cpu_us_per_event": _median_of(rounds, "publisher_cpu_us_per_event"),
        "cpu_us_per_event_at_rate": {str(r): _median_of(rounds, "cpu_us_per_event_at_rate", str(r)) for r in rates},
        "latency": {}, "latency_busy": {},
        "steal": {k: _median_of(rounds, "steal", k) for k in rounds[0]["steal"]},
        "rounds": rounds,
    }
    keys = [pct_key(p) for p in PERCENTILES] + ["max_ms"]
    for which in ("latency", "latency_busy"):
        for r in rates:
            if str(r) in rounds[0][which]:
                s[which][str(r)] = {k: _median_of(rounds, which, str(r), k) for k in keys}
    return s


def machine() -> dict[str, Any]:
    import os
    from importlib.metadata import version

    import zmq

    from bucketwire.devstack.bench import jetstream

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "nats_server": jetstream.server_version(),
            "nats_py": version("nats-py")}


STEAL_RETRIES = 3
"""Times a round is run again under `--max-steal` before the last try is kept as it came out (and marked)."""


def round_steal(results: dict[str, dict[str, Any]]) -> float:
    """The largest stolen share of any phase of either system's round: what `--max-steal` holds a round to."""
    return max((v for r in results.values() for v in r["steal"].values()), default=0.0)


def run(n: int, processes: int, durability: str, rates: list[int], seconds: float, rounds: int,
        busy: bool, transport: str = "local", max_steal: float | None = None) -> dict[str, Any]:
    """`max_steal` (a share, 0-1): a round whose `round_steal` is over it is set aside and run again, both systems
    in the same order, so the two are compared on the same kind of host time (a round pair, not one side, is what
    is redone: redoing only the disturbed side would hand it the quieter minute)."""
    from bucketwire.devstack.bench import jetstream

    jetstream.require_nats()
    precise_sleeps()
    per: dict[str, list[dict[str, Any]]] = {"bucketwire": [], "nats": []}
    set_aside: list[dict[str, Any]] = []
    over: list[int] = []
    for k in range(rounds):
        # Alternate which goes first, so neither always runs on a machine warmed (or heated) by the other.
        order = ("bucketwire", "nats") if k % 2 == 0 else ("nats", "bucketwire")
        for attempt in range(STEAL_RETRIES + 1):
            results: dict[str, dict[str, Any]] = {}
            for name in order:
                again = f" (again: {set_aside[-1]['steal']:.0%} stolen)" if attempt else ""
                progress(f"bench bus --against nats: round {k + 1}/{rounds}, {name}{again}")
                side: Side = (BucketwireSide(processes, durability, transport) if name == "bucketwire"
                              else jetstream.JetStreamSide(processes, durability))
                results[name] = one_round(side, n, rates, seconds, busy)
            stolen = round_steal(results)
            if max_steal is None or stolen <= max_steal:
                break
            if attempt == STEAL_RETRIES:
                over.append(k)
                break
            set_aside.append({"round": k + 1, "steal": stolen, "systems": results})
        for name, r in results.items():
            per[name].append(r)
    progress_done()
    bw, nt = summarise(per["bucketwire"], rates), summarise(per["nats"], rates)
    first = str(rates[0])
    # The medians' ratios, per figure of WON: a summary holds each where a round does.
    ratio: dict[str, Any] = {name: round(_at(bw, keys) / max(_at(nt, keys), 1e-6), 3)
                             for name, keys, _ in figures(first, busy)}
    ratio["round_events_per_s"] = [round(a["events_per_s"] / b["events_per_s"], 3)
                                   for a, b in zip(per["bucketwire"], per["nats"], strict=True)]
    ratio["rounds_won"] = rounds_won(per["bucketwire"], per["nats"], first, busy)
    return {
        "benchmark": "bus", "against": "nats", "machine": machine(), "events": n, "rounds": rounds,
        "processes": processes, "durability": durability, "rates": rates, "seconds": seconds, "busy": busy,
        "transport": transport, "setup": setup_text(processes, durability, transport),
        "systems": {"bucketwire": bw, "nats": nt},
        "ratio": ratio,
        "max_steal": max_steal,
        "set_aside": set_aside,
        "rounds_over_max_steal": [k + 1 for k in over],
    }


WON = (("events_per_s", ("events_per_s",), True), ("cpu_per_event", ("cpu_us_per_event",), False),
       ("p50_at_{rate}", ("latency", "{rate}", "p50_ms"), False),
       ("p99_at_{rate}", ("latency", "{rate}", "p99_ms"), False),
       ("p50_at_{rate}_busy", ("latency_busy", "{rate}", "p50_ms"), False),
       ("p99_at_{rate}_busy", ("latency_busy", "{rate}", "p99_ms"), False))
"""The figures the comparison sets side by side (named as in the result's `ratio`), where each is in a round and in
a summary of rounds, whether higher is better."""


def figures(rate: str, busy: bool) -> list[tuple[str, list[str], bool]]:
    """WON at `rate`: (name, path, higher is better); the busy phase's only if it ran."""
    return [(name.format(rate=rate), [p.format(rate=rate) for p in path], higher) for name, path, higher in WON
            if busy or path[0] != "latency_busy"]


def rounds_won(bw: list[dict[str, Any]], nt: list[dict[str, Any]], rate: str, busy: bool) -> dict[str, list[int]]:
    """Per figure, [rounds in which bucketwire did better, rounds]: round k of each side ran back to back, so a pair
    shares the host's minute. A median hides how the rounds split; on a host whose noise is as large as the
    difference, "better in 2 of 3" and "in 3 of 3" read differently, and each side's median may come from a
    different minute (a tie counts for neither)."""
    out: dict[str, list[int]] = {}
    for name, keys, higher in figures(rate, busy):
        pairs = [(_at(a, keys), _at(b, keys)) for a, b in zip(bw, nt, strict=True)]
        out[name] = [sum(1 for a, b in pairs if (a > b if higher else a < b)), len(pairs)]
    return out


def setup_text(processes: int, durability: str, transport: str = "local") -> dict[str, str]:
    from bucketwire.devstack.bench import jetstream as js

    nats_sync = "sync_interval always (fsync per write)" if durability == "fsync" else \
        "default sync_interval (2 min): PubAck after the write reaches the OS, fsync every 2 min"
    bw_sync = "fsync per commit" if durability == "fsync" else "commit reaches the OS (WAL), no fsync per commit"
    return {
        "bucketwire": (f"hub + worker pool --processes {processes} (no-op plugin), durability={durability} "
                       f"({bw_sync}); publisher and workers "
                       + ("on the hub's local socket ([hub] local, a Unix socket)" if transport == "local"
                          else "over TCP on loopback")
                       + "; publisher: one DEALER, 100 events per PUB request, 16 requests outstanding, "
                       "each PUBACK after commit; group credit 512, dispatch_batch 256"),
        "nats": (f"nats-server -js, file stream R1, {nats_sync}; durable pull consumer, explicit ack, "
                 f"max_ack_pending {js.PULL_BATCH * max(2, processes)}; {processes} worker processes (nats-py) each "
                 f"keeping pull requests of {js.PULL_BATCH} open (expires 30 s, topped up at half), orjson parse, "
                 f"msg.ack(); publisher: js.publish_async, {js.PUBLISH_WINDOW} PubAcks outstanding, all awaited; "
                 "clients over TCP on loopback"),
    }


STEAL_NOTE = 0.05
"""A phase whose machine lost more than this share of its CPU time to the hypervisor gets a note under the results:
on the 2-core virtual machine issue 16 was measured on, phases at 1,000/s that lost 10-35% had p99s of 3-16 ms on
both sides, where that morning's first runs had 0.7-1.2 (docs/performance.md, change 28)."""


def _phase_label(key: str) -> str:
    if key == "saturation":
        return key
    return f"@{key[5:]}/s one core busy" if key.startswith("busy ") else f"@{key}/s"


def render(res: dict[str, Any]) -> str:
    first = str(res["rates"][0])
    lines = [f"bench bus --against nats: {res['events']:,} events, {res['rounds']} alternating rounds, "
             f"{res['processes']} worker processes, durability {res['durability']} (medians; rounds in brackets)"]
    for name, s in res["systems"].items():
        eps_rounds = ", ".join(f"{r['events_per_s']:,.0f}" for r in s["rounds"])
        lines.append(f"{name:>10}: {s['events_per_s']:,.0f} events/s [{eps_rounds}]  "
                     f"CPU {s['cpu_us_per_event']} us/event (servers+workers; publisher "
                     f"{s['publisher_cpu_us_per_event']})")
        for which, label in (("latency", ""), ("latency_busy", " one core busy")):
            for rate, v in s[which].items():
                lines.append(f"            @{rate}/s{label}: p50 {v['p50_ms']} ms  p90 {v['p90_ms']}  "
                             f"p99 {v['p99_ms']}  p99.9 {v['p999_ms']}  max {v['max_ms']}")
        lines.append("            stolen by the hypervisor: " + ", ".join(
            f"{_phase_label(k)} {v:.1%}" for k, v in s["steal"].items()))
    worst = max((v for s in res["systems"].values() for rnd in s["rounds"] for v in rnd["steal"].values()),
                default=0.0)
    if res.get("set_aside"):
        lines.append(f"{len(res['set_aside'])} round(s) set aside and run again, over --max-steal "
                     f"{res['max_steal']:.0%}: " + ", ".join(f"round {a['round']} {a['steal']:.0%}"
                                                           for a in res["set_aside"]))
    if res.get("rounds_over_max_steal"):
        lines.append(f"rounds kept over --max-steal after {STEAL_RETRIES} more tries: "
                     + ", ".join(str(k) for k in res["rounds_over_max_steal"]))
    if worst > STEAL_NOTE:
        lines.append(f"note: the hypervisor took up to {worst:.0%} of the machine's CPU in a phase (steal, /proc/stat);"
                     " latency there says more about the host than about either system: compare runs where it is low")
    r = res["ratio"]
    lines.append(f"bucketwire/nats: events/s {r['events_per_s']}x (rounds {r['round_events_per_s']}), "
                 f"p50 @{first}/s {r[f'p50_at_{first}']}x, p99 {r[f'p99_at_{first}']}x, "
                 f"CPU per event {r['cpu_per_event']}x (latency and CPU: lower is better)")
    won = r.get("rounds_won")
    if won:
        def w(key: str) -> str:
            k, n = won[key]
            return f"{k}/{n}"
        text = (f"round pairs in which bucketwire did better: events/s {w('events_per_s')}, CPU per event "
                f"{w('cpu_per_event')}, @{first}/s p50 {w(f'p50_at_{first}')}, p99 {w(f'p99_at_{first}')}")
        if f"p50_at_{first}_busy" in won:
            text += f", one core busy p50 {w(f'p50_at_{first}_busy')}, p99 {w(f'p99_at_{first}_busy')}"
        lines.append(text)
    return "\n".join(lines)
