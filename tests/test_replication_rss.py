"""Constant memory, measured the way an operator sees it: the worker process's peak RSS (VmHWM) while a large
object is replicated across two SeaweedFS servers. 128 MB by default; BUCKETWIRE_RSS_OBJECT_MB=500 for the
size the issue names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from bucketwire.devstack.seaweedfs import WeedServer

MB = int(os.environ.get("BUCKETWIRE_RSS_OBJECT_MB", "128"))

CHILD = textwrap.dedent("""
    import io, json, os, sys
    import bucketwire_replication as plugin
    from bucketwire import Event, StoreConfig
    from bucketwire.testing import PluginHarness

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    a = json.loads(sys.argv[1])
    stores = {n: StoreConfig(name=n, endpoint=e, access_key=a["ak"], secret_key=a["sk"])
              for n, e in a["stores"].items()}
    ev = Event(id="rss-1", source="urn:test", type="s3:ObjectCreated:CompleteMultipartUpload", subject="big.bin",
               data={"bucket": a["bucket"], "key": "big.bin", "size": a["size"], "etag": "", "store": "primary",
                     "user_metadata": {}})
    with PluginHarness(plugin, name="replication", stores=stores,
                       settings={"target_store": "backup", "target_bucket": a["target"]}) as h:
        before = hwm()
        h.handle(ev)
        after = hwm()
    print(json.dumps({"before": before, "after": after}))
""")


def test_large_object_replicates_in_constant_rss(weed: WeedServer, weed2: WeedServer, bucket: str) -> None:
    import io

    size = MB << 20
    chunk = os.urandom(1 << 20)

    class Gen(io.RawIOBase):
        left = size

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            n = min(len(b), self.left, len(chunk))
            b[:n] = chunk[:n]
            self.left -= n
            return n

    weed.client().put_object(bucket, "big.bin", io.BufferedReader(Gen(), 1 << 20), size, part_size=16 << 20)
    target = f"{bucket}-rss"
    weed2.client().make_bucket(target)
    args = {"ak": weed.access_key, "sk": weed.secret_key, "bucket": bucket, "target": target, "size": size,
            "stores": {"primary": weed.s3_endpoint, "backup": weed2.s3_endpoint}}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = (m["after"] - m["before"]) >> 20
    print(f"replicated {MB} MiB; peak RSS grew by {grew} MiB")
    assert weed2.client().stat_object(target, "big.bin").size == size
    assert grew < 48, f"peak RSS grew by {grew} MiB while replicating a {MB} MiB object"
