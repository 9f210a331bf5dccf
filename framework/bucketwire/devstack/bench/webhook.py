"""`bucketwire bench webhook`: MinIO-format webhook POSTs into the hub's HTTP ingress, each answered after commit.

Baseline: the same clients against a server on the hub's own HTTP stack (bucketwire.hub.http_server: asyncio +
httptools, HTTP/1.1 keep-alive) whose handler answers 200 without any work, in its own process, measured in the
same run on the same machine. Whatever the clients themselves cost (http.client, threads, the GIL) is paid by
both sides, so the ratio says how much the hub's parse -> route -> journal commit -> reply adds on top of the
HTTP plumbing it shares with the baseline. A no-work stdlib ThreadingHTTPServer is measured too, for reference
(`--no-reference` skips it).

Clients are processes (the GIL would otherwise serialise them) with a few persistent connections each, one
thread per connection, every request waiting for its answer like MinIO's webhook target does. Saturation phase:
every connection sends back to back. Fixed-rate phases: every request has an *intended* send time on a fixed
schedule and its latency is measured from that time, so a server that stalls the clients shows up as latency
instead of hiding it (coordinated omission).

`--new-connections` opens a fresh TCP connection for every request instead (what Go's HTTP client, and so MinIO,
does whenever its idle pool is empty), on both sides, so the ratio then also covers accepting connections.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click

from bucketwire.devstack.bench.common import Stack, free_port, percentiles, progress, progress_done
from bucketwire.hub.http_server import Request, Response, Server

PATH = "/minio/events"
ROUTE = '\n[[routes]]\ntopic = "webhook"\n'
_REQ = "R" * 24  # placeholder replaced by a unique x-amz-request-id per request, so no two are duplicates
_TIME = "T" * 24  # ... and by the time the request is sent, as MinIO's eventTime is (ms, `...T10:00:00.123Z`)


def body_template() -> bytes:
    """One MinIO webhook body (ObjectCreated:Put, one record), shaped field for field like MinIO sends it."""
    key = "photos/2024/IMG_0001.jpg"
    rec = {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": _TIME,
        "eventName": "s3:ObjectCreated:Put", "userIdentity": {"principalId": "minioadmin"},
        "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "192.0.2.10"},
        "responseElements": {
            "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
            "x-amz-request-id": _REQ,
            "x-minio-deployment-id": "8ae1c1e5-4ef1-4b0e-a7fa-5d2b0b5d0f4c",
            "x-minio-origin-endpoint": "http://10.0.0.1:9000",
        },
        "s3": {
            "s3SchemaVersion": "1.0", "configurationId": "Config",
            "bucket": {"name": "bench", "ownerIdentity": {"principalId": "minioadmin"}, "arn": "arn:aws:s3:::bench"},
            "object": {"key": "photos%2F2024%2FIMG_0001.jpg", "size": 3145728,
                       "eTag": "d41d8cd98f00b204e9800998ecf8427e", "contentType": "image/jpeg",
                       "userMetadata": {"content-type": "image/jpeg"}, "sequencer": "17C5D1A3B6D4E8F2"},
        },
        "source": {"host": "192.0.2.10", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"},
    }
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"bench/{key}", "Records": [rec]}).encode()


# -- baseline servers ---------------------------------------------------------------------------------------
class _NoWork:
    """An `http_server` handler that answers 200 without work: the floor the hub's ingress stands on."""

    reply = Response(200, b'{"accepted": 1}\n')

    def head(self, req: Request) -> Response | None:
        return None

    def handle(self, req: Request) -> Response:
        return self.reply

    def timed_out(self, req: Request) -> Response:
        return self.reply


def _serve_baseline(port: int, ready: Any) -> None:
    srv = Server(_NoWork(), "127.0.0.1", port)
    ready.set()
    srv.serve_forever()


class _StdlibNoWork(BaseHTTPRequestHandler):
    """The same no-work answer from the standard library's server, for reference: what the ingress was built on
    before hub/http_server.py."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY the second waits for the client's delayed
    # ACK (40 ms on Linux) and every server would look like 25 requests/s per connection.
    disable_nagle_algorithm = True
    _reply = b'{"accepted": 1}\n'

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self._reply)))
        self.end_headers()
        self.wfile.write(self._reply)


class _StdlibServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def _serve_stdlib(port: int, ready: Any) -> None:
    srv = _StdlibServer(("127.0.0.1", port), _StdlibNoWork)
    ready.set()
    srv.serve_forever()


BASELINES = {
    "baseline": (_serve_baseline, "bucketwire.hub.http_server (asyncio + httptools, the hub's own HTTP stack), "
                 "HTTP/1.1 keep-alive, reads the body, answers 200"),
    "stdlib": (_serve_stdlib, "stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive, reads the body, answers 200"),
}


# -- clients ------------------------------------------------------------------------------------------------
def _client(port: int, conns: int, n: int, rate: float | None, go: Any, offset: int, stride: int,
            prefix: str, q: Any, fresh: bool = False) -> None:
    """One client process: `conns` keep-alive connections, each sending every `stride`-th of n requests (with
    `fresh`, each request on a new connection, closed after its answer).

    `go` is (ready, start, event): the process says it is ready once its interpreter has imported, then every
    client begins at the common `start` the parent sets when all are ready (a fixed head start would have to
    cover the slowest spawn on a loaded machine, and cost that much on every run).

    With `rate` (requests/s over all clients) request i is due at start + i/rate and its latency counts from
    then; without, requests go back to back and latency is the request's own round trip.
    """
    tmpl = body_template()
    ready, start_at, started = go
    ready.release()
    started.wait()
    start = float(start_at.value)
    headers = {"Content-Type": "application/json", "User-Agent": "MinIO (linux; amd64) minio-go/v7.0.70"}
    out: list[tuple[int, int, float, float, list[float]]] = []
    lock = threading.Lock()

    def conn_loop(c: int) -> None:
        hc = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        ok = bad = 0
        lat: list[float] = []
        last = start
        for i in range(offset + c, n, stride):
            now = datetime.now(UTC)
            body = tmpl.replace(_REQ.encode(), f"{prefix}{i:012X}".encode()).replace(
                _TIME.encode(), f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z".encode())
            if rate:
                due = start + i / rate
                left = due - time.monotonic()
                if left > 0:
                    time.sleep(left)
                t0 = due
            else:
                t0 = time.monotonic()
            try:
                if fresh:
                    hc.close()
                    hc = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                hc.request("POST", PATH, body, headers)
                r = hc.getresponse()
                r.read()
                status = r.status
                if fresh:
                    hc.close()
            except (OSError, http.client.HTTPException):
                hc.close()
                hc = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status = 0
            last = time.monotonic()
            if status == 200:
                ok += 1
            else:
                bad += 1
            lat.append(last - t0)
        hc.close()
        with lock:
            out.append((ok, bad, start, last, lat))

    # Process p, connection c takes indices p*conns + c + k*stride (stride = processes*conns): each index once.
    wait = start - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    threads = [threading.Thread(target=conn_loop, args=(c,)) for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(out)


def drive(port: int, n: int, processes: int, conns: int, rate: float | None, label: str, fresh: bool = False
          ) -> dict[str, Any]:
    """Send n requests from `processes` x `conns` connections; return throughput, counts and latency."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stride = processes * conns
    prefix = uuid.uuid4().hex[:12].upper()
    go = (ctx.Semaphore(0), ctx.Value("d", 0.0), ctx.Event())
    ps = [ctx.Process(target=_client, args=(port, conns, n, rate, go, p * conns, stride, prefix, q, fresh))
          for p in range(processes)]
    for p in ps:
        p.start()
    start = _start_together(ps, go)
    results: list[tuple[int, int, float, float, list[float]]] = []
    deadline = time.monotonic() + 600
    shown = ""
    while len(results) < processes * conns:
        msg = f"bench webhook {label}: {n} requests, {len(results) // conns}/{processes} client processes done"
        if msg != shown:
            progress(msg)
            shown = msg
        try:
            results.extend(q.get(timeout=0.5))
        except Exception:
            if time.monotonic() > deadline or not any(p.is_alive() for p in ps) and q.empty():
                break
    for p in ps:
        p.join(10)
    if len(results) < processes * conns:
        raise click.ClickException(f"bench webhook {label}: {processes * conns - len(results)} client connections "
                                   "never reported (a client process died; see its traceback above)")
    ok = sum(r[0] for r in results)
    bad = sum(r[1] for r in results)
    end = max((r[3] for r in results), default=start)
    lat = [x for r in results for x in r[4]]
    return {"requests": ok + bad, "ok": ok, "failed": bad, "seconds": round(end - start, 3),
            "throughput_rps": round((ok + bad) / max(end - start, 1e-9), 1), "latency": percentiles(lat)}


def _start_together(ps: list[Any], go: Any) -> float:
    """Wait until every client process is ready, then release them all at one start time (returned): a short
    margin ahead, so the last one released has woken before the first request is due."""
    ready, start_at, started = go
    deadline = time.monotonic() + 120
    waiting = len(ps)
    while waiting:
        if ready.acquire(timeout=0.5):
            waiting -= 1
        elif time.monotonic() > deadline or not all(p.is_alive() for p in ps):
            break  # the results loop reports the processes that never answered
    start = time.monotonic() + 0.05
    start_at.value = start
    started.set()
    return start


def _wait_http(port: int, timeout: float = 30, proc: Any = None, log: str = "") -> None:
    """Wait until something answers HTTP on the port; fail at once (with the log's last line) if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = (Path(log).read_text(errors="replace").strip().splitlines() or [""])[-1]
            raise click.ClickException(
                f"the hub exited with status {proc.returncode} during startup: {tail} (log: {log})")
        try:
            hc = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            hc.request("GET", "/healthz")
            r = hc.getresponse()
            r.read()
            hc.close()
            if r.status in (200, 404, 501):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise click.ClickException(f"nothing answered HTTP on 127.0.0.1:{port} within {timeout}s")


def _saturation(ports: dict[str, int], n: int, processes: int, conns: int, rounds: int, fresh: bool = False
                ) -> dict[str, Any]:
    """Saturation rounds, alternating the servers (A B, B A, A B, ...) so drift on a shared machine hits both
    alike; each side reports its median round, and every round's figure is kept."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ports}
    names = list(ports)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            runs[k].append(drive(ports[k], n, processes, conns, None, f"{k} saturation {r + 1}/{rounds}", fresh))
    out = {}
    for k, rs in runs.items():
        med = dict(sorted(rs, key=lambda x: x["throughput_rps"])[len(rs) // 2])
        med["latency"] = {"saturation": med["latency"]}
        med["rounds_rps"] = [x["throughput_rps"] for x in rs]
        out[k] = med
    return out


def _rates(out: dict[str, Any], port: int, processes: int, conns: int, rates: dict[int, float], label: str,
           fresh: bool = False) -> None:
    out["rates"] = {}
    for rate, secs in rates.items():
        r = drive(port, max(1, int(rate * secs)), processes, conns, float(rate), f"{label} {rate}/s", fresh)
        out["rates"][str(rate)] = {k: r[k] for k in ("requests", "ok", "failed", "throughput_rps")}
        out["latency"][str(rate)] = r["latency"]


@contextlib.contextmanager
def _no_work_server(kind: str) -> Iterator[int]:
    target, _ = BASELINES[kind]
    ctx = mp.get_context("spawn")
    port = free_port()
    ready = ctx.Event()
    srv = ctx.Process(target=target, args=(port, ready), daemon=True)
    srv.start()
    try:
        progress(f"bench webhook: starting the no-work {kind} server")
        ready.wait(30)
        _wait_http(port)
        yield port
    finally:
        srv.terminate()
        srv.join(10)


def run(n: int, processes: int, conns: int, durability: str, rates: dict[int, float],
        reference: bool = True, rounds: int = 3, fresh: bool = False, warmup: int = 200) -> dict[str, Any]:
    """`warmup` requests (at most n) go to each server, unmeasured, before its first round; 0 sends none."""
    from bucketwire.devstack.bench.bus import machine

    warmup = min(warmup, n)

    stack = Stack(durability, extra=ROUTE)
    try:
        with _no_work_server("baseline") as base_port:
            progress("bench webhook: starting the hub")
            hub_proc = stack.spawn("hub")
            try:
                _wait_http(stack.http, proc=hub_proc, log=str(stack.tmp / "p0.log"))
            except click.ClickException:
                stack.keep = True  # the message names the hub's log, in the stack's directory
                raise
            ports = {"baseline": base_port, "hub": stack.http}
            for k, port in ports.items():
                if warmup:
                    drive(port, warmup, processes, conns, None, f"{k} warm-up", fresh)
            res = _saturation(ports, n, processes, conns, rounds, fresh)
            for k, port in ports.items():
                _rates(res[k], port, processes, conns, rates, k, fresh)
    finally:
        stack.close()
    base, hub = res["baseline"], res["hub"]
    base["name"] = BASELINES["baseline"][1]
    ref = None
    if reference:
        with _no_work_server("stdlib") as port:
            if warmup:
                drive(port, warmup, processes, conns, None, "stdlib warm-up", fresh)
            ref = _saturation({"stdlib": port}, n, processes, conns, 1, fresh)["stdlib"]
        ref["name"] = BASELINES["stdlib"][1]
    progress_done()
    hub["durability"] = durability
    hub["ratio"] = round(hub["throughput_rps"] / max(base["throughput_rps"], 1e-9), 3)
    res = {"benchmark": "webhook", "machine": machine(), "clients": {"processes": processes,
           "connections_per_process": conns, "new_connections": fresh, "path": PATH,
           "body_bytes": len(body_template())},
           "rounds": rounds, "warmup": warmup, "baseline": base, "hub": hub, "ratio": hub["ratio"],
           "round_ratios": [round(h / max(b, 1e-9), 3) for h, b in zip(hub["rounds_rps"], base["rounds_rps"],
                                                                       strict=True)],
           "bar": 0.5}
    if ref is not None:
        ref["ratio"] = round(hub["throughput_rps"] / max(ref["throughput_rps"], 1e-9), 3)
        res["reference"] = ref
    return res


def render(res: dict[str, Any]) -> str:
    c = res["clients"]
    kind = "clients opening a new connection per request" if c.get("new_connections") else "keep-alive connections"
    lines = [f"clients: {c['processes']} processes x {c['connections_per_process']} {kind}, "
             f"POST {c['path']} ({c['body_bytes']} bytes, one MinIO record)"]
    rows = [("baseline " + res["baseline"]["name"], res["baseline"]),
            (f"bucketwire hub ingress (durability={res['hub']['durability']}, 200 after commit)", res["hub"])]
    if "reference" in res:
        rows.append(("reference " + res["reference"]["name"], res["reference"]))
    for name, r in rows:
        lines.append(f"{name}: {r['throughput_rps']:,.0f} requests/s ({r['ok']} ok, {r['failed']} failed)"
                     + (f"; rounds {', '.join(f'{x:,.0f}' for x in r['rounds_rps'])}" if len(r["rounds_rps"]) > 1
                        else ""))
        for k, v in r["latency"].items():
            lines.append(f"  latency @{k}: p50 {v['p50_ms']} ms  p90 {v['p90_ms']}  p99 {v['p99_ms']}  "
                         f"max {v['max_ms']}")
    lines.append(f"ratio: {res['ratio']}x of the no-work baseline on the same HTTP stack (bar {res['bar']}x); "
                 f"medians of {res['rounds']} alternating rounds, each round: "
                 + " ".join(f"{r}x" for r in res["round_ratios"]))
    if "reference" in res:
        lines.append(f"       {res['reference']['ratio']}x of the no-work stdlib server")
    return "\n".join(lines)
