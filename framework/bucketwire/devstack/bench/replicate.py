"""`bucketwire bench replicate`: MB/s of the replication plugin between two SeaweedFS servers vs a plain loop.

Two real `weed mini` servers on loopback (`bucketwire.devstack.seaweedfs.WeedServer`), source and target. Subject: the
replication plugin's `handle_event`, run through `bucketwire.testing.PluginHarness` (the same loading,
settings validation and per-event context as a worker child), one event per object, in order: that is
exactly the work a worker does per event, minus the hub. Different stores, so it takes the streamed path
(GET -> multipart PUT with MD5 and size verification). Baseline: what one would write by hand with the same
minio client: `get_object` then `put_object` of each object into the target, nothing else. Same objects, same
servers, same process, measured in the same run, each side into its own fresh target keys.

Two phases: many small objects (per-request overhead dominates) and one large one (bytes dominate).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bucketwire.devstack.bench.common import percentiles, progress, progress_done

MB = 1 << 20


class _Pattern(io.RawIOBase):
    """`length` bytes of incompressible data without holding them in memory: a random MiB, varied per MiB."""

    def __init__(self, length: int, seed: bytes) -> None:
        self.left = length
        self.block = bytearray(os.urandom(MB))
        self.seed = seed
        self.n = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        out = bytearray()
        while len(out) < size:
            off = (self.n % MB)
            if off == 0:  # a different MiB each time: no two parts of the object are the same
                self.block[:16] = self.n.to_bytes(8, "big") + self.seed[:8]
            take = min(size - len(out), MB - off)
            out += self.block[off: off + take]
            self.n += take
        self.left -= size
        return bytes(out)


def _start_both(tmp: str) -> tuple[Any, Any]:
    from bucketwire.devstack.seaweedfs import WeedServer

    servers = [WeedServer(Path(tmp) / "source"), WeedServer(Path(tmp) / "target")]
    errors: list[BaseException] = []

    def start(w: Any) -> None:
        try:
            w.start(timeout=90)
        except BaseException as e:  # noqa: BLE001 - reported below, after both threads finished
            errors.append(e)

    threads = [threading.Thread(target=start, args=(w,)) for w in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for w in servers:
            w.stop()
        raise errors[0]
    return servers[0], servers[1]


def _event(i: int, bucket: str, key: str, size: int, etag: str) -> Any:
    from bucketwire.envelope import Event

    return Event(id=f"bench-repl-{i}", source="urn:bench", type="s3:ObjectCreated:Put", subject=key,
                 data={"bucket": bucket, "key": key, "size": size, "etag": etag, "content_type": "",
                       "version_id": "", "sequencer": "", "user_metadata": {}, "store": "source", "records": []})


def _plain(src: Any, dst: Any, bucket: str, key: str, tb: str, tkey: str) -> int:
    """The baseline: GET the object and PUT it to the target with the client's defaults."""
    resp = src.get_object(bucket, key)
    try:
        n = int(resp.headers.get("content-length"))
        dst.put_object(tb, tkey, resp, n)
    finally:
        resp.close()
        resp.release_conn()
    return n


def side_order(r: int) -> tuple[str, str]:
    """Round `r`'s order: baseline first in even rounds, the subject first in odd ones (as `bench bus` does)."""
    return ("baseline", "subject") if r % 2 == 0 else ("subject", "baseline")


def _phase(name: str, objs: list[tuple[str, int, str]], src_bucket: str, harness: Any, plain_src: Any,
           plain_dst: Any, rounds: int) -> dict[str, Any]:
    """Baseline and subject `rounds` times over the same objects, each into fresh target keys, in turn first
    (`side_order`): the side that runs second meets the stores with the first one's writes still being flushed."""
    total = sum(size for _, size, _ in objs)
    res: dict[str, dict[str, Any]] = {}
    for side in ("baseline", "subject"):
        res[side] = {"objects": 0, "bytes": 0, "seconds": 0.0, "lat": []}
    i = 0
    for r in range(rounds):
        for side in side_order(r):
            acc = res[side]
            for k, (key, size, etag) in enumerate(objs):
                if k % 25 == 0 or size >= 16 * MB:
                    progress(f"bench replicate {name}: round {r + 1}/{rounds} {side} {k}/{len(objs)} objects")
                i += 1
                t0 = time.perf_counter()
                if side == "baseline":
                    n = _plain(plain_src, plain_dst, src_bucket, key, "bench-plain", f"r{r}/{key}")
                else:
                    harness.settings["prefix"] = f"r{r}/"
                    ev = _event(i, src_bucket, key, size, etag)
                    (done,) = harness.handle(ev)  # the plugin's follow-on: proof it replicated
                    if done.data["method"] != "stream":
                        raise RuntimeError(f"expected a streamed replica, got {done.data['method']!r}")
                    n = size
                dt = time.perf_counter() - t0
                acc["objects"] += 1
                acc["bytes"] += n
                acc["seconds"] += dt
                acc["lat"].append(dt)
    out: dict[str, Any] = {"objects": len(objs), "object_bytes": objs[0][1] if objs else 0, "bytes": total,
                           "rounds": rounds}
    for side, acc in res.items():
        out[side] = {"objects": acc["objects"], "bytes": acc["bytes"], "seconds": round(acc["seconds"], 3),
                     "mb_per_s": round(acc["bytes"] / MB / max(acc["seconds"], 1e-9), 2),
                     "objects_per_s": round(acc["objects"] / max(acc["seconds"], 1e-9), 1),
                     "latency": percentiles(acc["lat"])}
    out["subject"]["name"] = "bucketwire_replication.handle_event (stream: GET -> multipart PUT, verified)"
    out["baseline"]["name"] = "minio get_object + put_object"
    out["ratio"] = round(out["subject"]["mb_per_s"] / max(out["baseline"]["mb_per_s"], 1e-9), 3)
    return out


def run(small_count: int, small_kb: int, large_mb: int, rounds: int) -> dict[str, Any]:
    import bucketwire_replication as repl
    from bucketwire.config import StoreConfig
    from bucketwire.devstack.bench.bus import machine
    from bucketwire.testing import PluginHarness

    tmp = tempfile.mkdtemp(prefix="bucketwire-bench-repl-")
    try:
        progress("bench replicate: starting two SeaweedFS servers")
        src_w, dst_w = _start_both(tmp)
        try:
            stores = {n: StoreConfig(name=n, endpoint=w.s3_endpoint, access_key=w.access_key,
                                     secret_key=w.secret_key) for n, w in (("source", src_w), ("target", dst_w))}
            up = src_w.client()
            up.make_bucket("bench-src")
            dst_w.client().make_bucket("bench-dst")
            dst_w.client().make_bucket("bench-plain")
            small: list[tuple[str, int, str]] = []
            seed = os.urandom(8)
            for k in range(small_count):
                if k % 50 == 0:
                    progress(f"bench replicate: uploading small objects {k}/{small_count}")
                key = f"small/obj-{k:05d}.bin"
                data = _Pattern(small_kb * 1024, seed + k.to_bytes(8, "big")).read()
                w = up.put_object("bench-src", key, io.BytesIO(data), len(data))
                small.append((key, len(data), w.etag))
            large: list[tuple[str, int, str]] = []
            if large_mb:
                progress(f"bench replicate: uploading a {large_mb} MB object")
                key = "large/obj.bin"
                w = up.put_object("bench-src", key, _Pattern(large_mb * MB, seed), large_mb * MB, part_size=16 * MB)
                large.append((key, large_mb * MB, w.etag))
            harness = PluginHarness(repl, settings={"target_store": "target", "target_bucket": "bench-dst",
                                                    "source_store": "source"},
                                    stores=stores, default_store="source")
            # The baseline gets its own clients (connection pools) so neither side warms the other's.
            plain_src, plain_dst = src_w.client(), dst_w.client()
            phases: dict[str, Any] = {}
            if small:
                phases["small"] = _phase("small", small, "bench-src", harness, plain_src, plain_dst, rounds)
            if large:
                phases["large"] = _phase("large", large, "bench-src", harness, plain_src, plain_dst, rounds)
        finally:
            progress("bench replicate: stopping SeaweedFS")
            src_w.stop()
            dst_w.stop()
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        progress_done()
    return {"benchmark": "replicate", "machine": machine(), "servers": "two SeaweedFS `weed mini` on loopback",
            "part_size": harness.settings["part_size"], "phases": phases,
            "ratio": {k: v["ratio"] for k, v in phases.items()}, "bar": 0.8}


def render(res: dict[str, Any]) -> str:
    lines = [f"{res['servers']}; plugin part_size {res['part_size'] // MB} MiB"]
    for name, p in res["phases"].items():
        lines.append(f"{name}: {p['objects']} x {p['object_bytes'] / 1024:,.0f} KiB, {p['rounds']} round(s)")
        for label, x in (("bucketwire replication:", p["subject"]), ("plain get+put:", p["baseline"])):
            lat = x["latency"]
            lines.append(f"  {label:24} {x['mb_per_s']:8.2f} MB/s  {x['objects_per_s']:8.1f} objects/s  "
                         f"p50 {lat['p50_ms']} ms  p90 {lat['p90_ms']}  max {lat['max_ms']}")
        lines.append(f"  ratio {p['ratio']}x of the plain loop (bar {res['bar']}x)")
    return "\n".join(lines)
