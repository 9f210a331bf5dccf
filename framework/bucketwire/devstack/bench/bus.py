"""`bucketwire bench bus`: publish -> hub commit -> worker no-op handler -> ack, against raw pyzmq.

Baseline: the same envelope bytes over a raw PUSH/PULL pair with the same `json.loads` on receipt, measured in
the same run on the same machine. Latency is coordinated-omission safe: every event carries its *intended*
send time, so a publisher that falls behind shows up as latency instead of hiding it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import zmq

from bucketwire import protocol as P
from bucketwire.devstack.bench.common import (
    Stack,
    free_port,
    pace_until,
    percentiles,
    precise_sleeps,
    progress,
    progress_done,
)
from bucketwire.envelope import Event


def payload(i: int, t: float) -> dict[str, Any]:
    """An S3 ObjectCreated envelope as the webhook ingress builds it (~700 bytes of JSON), plus index and time."""
    key = f"photos/2026/11/obj-{i:08d}.jpg"
    return Event(id=f"bench-{i:012d}", source="minio..bench", type="s3:ObjectCreated:Put", subject=key, topic="bench",
                 data={"bucket": "bench", "key": key, "size": 1_843_200, "etag": "d41d8cd98f00b204e9800998ecf8427e",
                       "content_type": "image/jpeg", "version_id": "", "sequencer": f"{0x187A2B3C4D5E6F70 + i:X}",
                       "user_metadata": {"content-type": "image/jpeg"}, "store": "minio",
                       "principal": "bench-uploader", "source_ip": "127.0.0.1",
                       "user_agent": "MinIO (linux; amd64) minio-go/v7.0.70", "request_id": f"{i:016X}",
                       "i": i, "t": t}).to_dict()


# -- baseline: raw PUSH/PULL --------------------------------------------------------------------------------
def _pull(port: int, n: int, q: Any) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 0)
    s.bind(f"tcp://127.0.0.1:{port}")
    q.put("ready")
    lat = []
    last = 0.0
    for _ in range(n):
        d = json.loads(s.recv())
        last = time.monotonic()
        lat.append(last - d["data"]["t"])
    q.put((last, lat))
    s.close()
    ctx.term()


def raw_run(n: int, rate: float | None) -> tuple[float, list[float]]:
    """Send n messages (as fast as possible, or at `rate`/s); returns (events/s, latencies)."""
    port = free_port()
    mctx = mp.get_context("spawn")
    q = mctx.Queue()
    p = mctx.Process(target=_pull, args=(port, n, q))
    p.start()
    q.get(timeout=30)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.2)
    t0 = time.monotonic()
    for i in range(n):
        t = t0 + i / rate if rate else time.monotonic()
        if rate:
            pace_until(t)
        s.send(json.dumps(payload(i, t)).encode())
    last, lat = q.get(timeout=600)
    p.join()
    s.close()
    ctx.term()
    return n / (last - t0), lat


# -- subject: through the hub -------------------------------------------------------------------------------
class Publisher:
    """Publishes without waiting for each reply (a window of outstanding requests), like a busy source."""

    def __init__(self, endpoint: str, window: int = 16) -> None:
        from bucketwire import zmtp

        self.ctx = zmq.Context()
        local = zmtp.dealer(endpoint)
        if local is not None:
            self.s: Any = local
        else:
            self.s = self.ctx.socket(zmq.DEALER)
            self.s.setsockopt(zmq.LINGER, 0)
            self.s.connect(endpoint)
        self.window = window
        self.outstanding = 0
        self.req = 0
        self.failed = 0

    def _reply(self, block: bool) -> bool:
        try:
            frames = self.s.recv_multipart(0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return False
        if frames[0] == P.PUBNACK:
            self.failed += 1
        self.outstanding -= 1
        return True

    def collect(self) -> None:
        """Read the replies that have come, without waiting."""
        while self.outstanding and self._reply(False):
            pass

    def send(self, events: list[dict[str, Any]]) -> None:
        while self.outstanding >= self.window:
            self._reply(True)
        self.collect()
        self.req += 1
        self.s.send_multipart([P.PUB, P.enc({"req": self.req, "events": events})])
        self.outstanding += 1

    def drain(self) -> None:
        while self.outstanding:
            if not self.s.poll(30_000):
                raise RuntimeError("hub stopped answering publishes")
            self._reply(True)

    def close(self) -> None:
        self.s.close()
        self.ctx.term()

    def send_at(self, t: float, events: list[dict[str, Any]]) -> None:
        """Send at monotonic time `t` (a fixed-rate phase), the replies that came meanwhile read before it, as the
        NATS publisher reads its PubAcks while it paces: read after `t` (by `send`), they were counted in this
        event's latency, a system call and a reply's parsing that NATS's side did not pay."""
        pace_until(t, self.collect)
        self.send(events)


def _wait_handled(stack: Stack, total: int, label: str, timeout: float = 600) -> None:
    from bucketwire.client import HubClient

    deadline = time.monotonic() + timeout
    with HubClient(stack.config(), timeout=10) as c:
        while time.monotonic() < deadline:
            g = c.status()["groups"]["bench"]["topics"].get("bench", {})
            progress(f"bench bus {label}: {g.get('cursor', 0)}/{total} acked")
            if g.get("cursor", 0) >= total:
                return
            time.sleep(0.05)
    stack.keep = True
    raise click.ClickException(f"bench bus {label}: not all events were acked within {timeout}s (logs in {stack.tmp})")


def _jetstream_table(urls: list[str]) -> str:
    servers = ", ".join(f'"{u}"' for u in urls)
    return f'\n[journal]\nbackend = "jetstream"\nservers = [{servers}]\nreplicas = 3\n'


def hub_run(durability: str, processes: int, n: int, rates: dict[int, float],
            backend: str = "sqlite") -> dict[str, Any]:
    """One stack: saturation throughput, then fixed-rate latency phases (rate -> seconds).

    With `backend = "jetstream"` the hub journals to a fresh 3-node NatsCluster on loopback with replicas 3 --
    the HA setup someone would run -- so its figures are what failover costs against the embedded SQLite file.
    """
    cluster = None
    if backend == "jetstream":
        from bucketwire.devstack.nats import NatsCluster

        nats_dir = Path(tempfile.mkdtemp(prefix="bucketwire-bench-nats-"))
        progress("bench bus: starting a 3-node NATS JetStream cluster")
        try:
            cluster = NatsCluster(nats_dir, size=3).start()
        except BaseException:
            shutil.rmtree(nats_dir, ignore_errors=True)
            raise
        stack = Stack(durability, _jetstream_table(cluster.urls))
    else:
        stack = Stack(durability)
    try:
        stack.spawn("hub")
        stack.spawn("worker", "--group", "bench", "-n", str(processes),
                    "--plugin", "bucketwire.devstack.bench.noop_plugin")
        stack.wait_workers(processes)
        pub = Publisher(stack.config().client.work_endpoints[0])
        label = f"durability={durability} processes={processes}"
        t0 = time.monotonic()
        for i in range(0, n, 100):
            now = time.monotonic()
            pub.send([payload(j, now) for j in range(i, min(n, i + 100))])
            if i % 5000 == 0:
                progress(f"bench bus {label}: published {i}/{n}")
        pub.drain()
        _wait_handled(stack, n, label)
        done = n
        phases = []
        for rate, secs in rates.items():
            k = int(rate * secs)
            start = time.monotonic() + 0.05
            for j in range(k):
                t = start + j / rate
                pub.send_at(t, [payload(done + j, t)])
                if j % 1000 == 0:
                    progress(f"bench bus {label}: {rate}/s {j}/{k}")
            pub.drain()
            _wait_handled(stack, done + k, label)
            phases.append((rate, done, done + k))
            done += k
        pub.close()
        stack.stop()
        rows = stack.read_latencies()
    finally:
        stack.close()
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.base_dir, ignore_errors=True)
        progress_done()
    sat = [r for r in rows if r[0] < n]
    out: dict[str, Any] = {
        "backend": backend,
        "durability": durability if backend == "sqlite" else "replicas=3",
        "processes": processes,
        "events": n,
        "throughput_eps": round(n / (max(r[2] for r in sat) - t0), 1),
        "handled": len(rows),
        "latency": {},
    }
    for rate, lo, hi in phases:
        out["latency"][str(rate)] = percentiles([r[2] - r[1] for r in rows if lo <= r[0] < hi])
    out["latency"]["saturation"] = percentiles([r[2] - r[1] for r in sat])
    return out


def run(n: int, processes: list[int], durabilities: list[str], rates: dict[int, float],
        backends: tuple[str, ...] = ("sqlite",)) -> dict[str, Any]:
    precise_sleeps()
    progress("bench bus: baseline (raw pyzmq PUSH/PULL)")
    raw_eps, raw_lat = raw_run(n, None)
    base: dict[str, Any] = {"name": "raw pyzmq PUSH/PULL + json.loads", "events": n,
                            "throughput_eps": round(raw_eps, 1),
                            "latency": {"saturation": percentiles(raw_lat)}}
    for rate, secs in rates.items():
        progress(f"bench bus: baseline at {rate}/s")
        _, lat = raw_run(int(rate * secs), rate)
        base["latency"][str(rate)] = percentiles(lat)
    runs = []
    for backend in backends:
        # durability is the SQLite file's knob; JetStream's is replicas=3, so it runs once per process count
        for d in durabilities if backend == "sqlite" else durabilities[:1]:
            for p in processes:
                r = hub_run(d, p, n, rates, backend)
                r["ratio"] = round(r["throughput_eps"] / raw_eps, 3)
                runs.append(r)
    progress_done()
    out: dict[str, Any] = {"benchmark": "bus", "machine": machine(), "baseline": base, "runs": runs}
    if set(backends) == {"sqlite", "jetstream"}:
        out["comparison"] = compare(runs, durabilities[0])
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def compare(runs: list[dict[str, Any]], durability: str) -> list[dict[str, Any]]:
    """jetstream / sqlite per process count (sqlite at `durability`): events/s and p50/p99 at each rate."""
    out = []
    sq = {r["processes"]: r for r in runs if r["backend"] == "sqlite" and r["durability"] == durability}
    for js in (r for r in runs if r["backend"] == "jetstream"):
        s = sq.get(js["processes"])
        if s is None:
            continue
        row: dict[str, Any] = {"processes": js["processes"], "sqlite_durability": durability,
                               "sqlite_eps": s["throughput_eps"], "jetstream_eps": js["throughput_eps"],
                               "eps_ratio": _ratio(js["throughput_eps"], s["throughput_eps"]), "latency": {}}
        for k in js["latency"]:
            a, b = js["latency"][k], s["latency"].get(k)
            if b is None:
                continue
            row["latency"][k] = {"sqlite_p50_ms": b["p50_ms"], "jetstream_p50_ms": a["p50_ms"],
                                 "p50_ratio": _ratio(a["p50_ms"], b["p50_ms"]),
                                 "sqlite_p99_ms": b["p99_ms"], "jetstream_p99_ms": a["p99_ms"],
                                 "p99_ratio": _ratio(a["p99_ms"], b["p99_ms"])}
        out.append(row)
    return out


def machine() -> dict[str, Any]:
    import os

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def render(res: dict[str, Any]) -> str:
    b = res["baseline"]
    lines = [f"baseline {b['name']}: {b['throughput_eps']:,.0f} events/s"]
    for k, v in b["latency"].items():
        lines.append(f"  latency @{k}: p50 {v['p50_ms']} ms  p90 {v['p90_ms']}  p99 {v['p99_ms']}  max {v['max_ms']}")
    for r in res["runs"]:
        lines.append(f"bucketwire backend={r['backend']} durability={r['durability']} processes={r['processes']}: "
                     f"{r['throughput_eps']:,.0f} events/s  ratio {r['ratio']}x of raw")
        for k, v in r["latency"].items():
            lines.append(f"  latency @{k}: p50 {v['p50_ms']} ms  p90 {v['p90_ms']}  p99 {v['p99_ms']}  "
                         f"max {v['max_ms']}")
    for c in res.get("comparison", []):
        lines.append(f"jetstream vs sqlite (durability={c['sqlite_durability']}) processes={c['processes']}: "
                     f"{c['jetstream_eps']:,.0f} vs {c['sqlite_eps']:,.0f} events/s = {c['eps_ratio']}x")
        for k, v in c["latency"].items():
            lines.append(f"  @{k}: p50 {v['jetstream_p50_ms']} vs {v['sqlite_p50_ms']} ms = {v['p50_ratio']}x  "
                         f"p99 {v['jetstream_p99_ms']} vs {v['sqlite_p99_ms']} ms = {v['p99_ratio']}x")
    return "\n".join(lines)
