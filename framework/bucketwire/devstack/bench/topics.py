"""What tens of thousands of live topics cost everyone else: the latency of events at a fixed rate on one topic,
with `topics` other topics committed to just before (live: heartbeated and rate-sampled for ten intervals)
against the same hub with none. Optionally a subscriber to every topic in a process of its own, so the hub sends
every heartbeat it owes.

    bucketwire bench topics [--topics N] [--subscriber] [--rate R] [--seconds S] [--rounds N]

Why it exists: the hub's per-topic chores once ran for every live topic in one loop turn per heartbeat interval;
with 60,000 topics the loop stopped for 0.2-0.5 s every second (p90 at 1,000/s 180 ms against 3 ms).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bucketwire.devstack.bench.bus import Publisher, _wait_handled, payload
from bucketwire.devstack.bench.common import Stack, percentiles, precise_sleeps

OTHER = 1_000_000_000
"""Index offset of the events that make the other topics (kept out of the latency rows)."""

SUBSCRIBER = """
import sys, zmq
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(sys.argv[1])
while True:
    s.recv_multipart()
"""


def _one(topics: int, subscriber: bool, rate: int, seconds: float, progress: Callable[[str], None]) -> list[float]:
    stack = Stack("os", "")
    stack.cfg_path.write_text(stack.cfg_path.read_text().replace(
        "dispatch_batch = 256", f"dispatch_batch = 256\nmax_topics = {topics + 100}"))
    sub: subprocess.Popen[bytes] | None = None
    try:
        stack.spawn("hub")
        stack.spawn("worker", "--group", "bench", "-n", "2", "--plugin", "bucketwire.devstack.bench.noop_plugin")
        stack.wait_workers(2)
        cfg = stack.config()
        if subscriber:
            sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, cfg.client.publish_endpoints[0]],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pub = Publisher(cfg.client.work_endpoints[0])
        for lo in range(0, topics, 500):
            evs = []
            for i in range(lo, min(topics, lo + 500)):
                e = payload(OTHER + i, 0.0)
                e["topic"] = f"other-{i}"
                evs.append(e)
            pub.send(evs)
            progress(f"bench topics: {topics:,} topics: made {min(topics, lo + 500):,}")
        pub.drain()
        k = int(rate * seconds)
        start = time.monotonic() + 0.05
        for j in range(k):
            t = start + j / rate
            pub.send_at(t, [payload(j, t)])
        pub.drain()
        _wait_handled(stack, k, f"{topics:,} topics")
        pub.close()
        stack.stop()
        return [r[2] - r[1] for r in stack.read_latencies() if r[0] < OTHER]
    finally:
        if sub is not None:
            sub.kill()
            sub.wait()
        stack.close()


def run(topics: int, subscriber: bool, rate: int, seconds: float, rounds: int,
        progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    precise_sleeps()
    res: dict[str, list[dict[str, float]]] = {"baseline": [], "many": []}
    for r in range(rounds):
        for name in ("many", "baseline") if r % 2 else ("baseline", "many"):
            progress(f"round {r + 1}/{rounds}: {name}")
            res[name].append(percentiles(_one(topics if name == "many" else 0, subscriber, rate, seconds, progress)))

    def med(name: str, p: str) -> float:
        return float(statistics.median(x[f"{p}_ms"] for x in res[name]))

    out: dict[str, Any] = {"topics": topics, "subscriber": subscriber, "rate": rate, "seconds": seconds,
                           "rounds": rounds, "runs": res}
    for p in ("p50", "p90", "p99"):
        out[p] = {"baseline": med("baseline", p), "many": med("many", p), "ratio": med("many", p) / med("baseline", p)}
    return out


def render(res: dict[str, Any]) -> str:
    who = " and a subscriber to every topic" if res["subscriber"] else ""
    lines = [f"bench topics: one topic at {res['rate']}/s for {res['seconds']} s, {res['rounds']} alternating rounds "
             f"(medians), with {res['topics']:,} other live topics{who} against none:"]
    for p in ("p50", "p90", "p99"):
        v = res[p]
        lines.append(f"  {p}: {v['many']:8.3f} ms with them, {v['baseline']:8.3f} ms without "
                     f"({v['ratio']:.2f}x)")
    return "\n".join(lines)
