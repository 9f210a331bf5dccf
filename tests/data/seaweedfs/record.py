"""Record what SeaweedFS's filer webhook really POSTs, as fixtures for the normaliser tests.

Run with `python tests/data/seaweedfs/record.py [--versioned]` (needs `weed`).  It starts a WeedServer whose
notification.toml points at a tiny local HTTP server, performs put / overwrite / metadata / copy / delete /
multipart through the minio client, and writes every body (with its Authorization header) to
`recorded.json` next to this file.  With `--versioned` it does put / put again / delete / delete one version in
a bucket with versioning on and writes `recorded_versioned.json` and `meta_tail_versioned.txt`.
Re-run when upgrading SeaweedFS to see whether the shape changed.
"""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from minio.commonconfig import CopySource

from bucketwire.devstack.seaweedfs import WeedServer, find_weed

HERE = Path(__file__).parent
received: list[dict[str, object]] = []


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server API
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        received.append({"auth": self.headers.get("Authorization"), "path": self.path,
                         "body": json.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


Mark = Callable[[str], None]


def record(bucket: str, script: Callable[[Any, WeedServer, Mark], None], json_name: str, tail_name: str) -> None:
    """Run `script(client, server, mark)` against a weed whose webhook posts here, then read filer.meta.tail's view
    of the same history; write both next to this file."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/seaweedfs/events"
    with tempfile.TemporaryDirectory() as d, WeedServer(Path(d), webhook_url=url, webhook_token="s3cret") as w:
        steps: list[tuple[str, int]] = []

        def mark(label: str) -> None:
            time.sleep(1.5)  # pacing: a recording script, not a test
            steps.append((label, len(received)))

        c = w.client()
        c.make_bucket(bucket)
        script(c, w, mark)
        # The durable source's view of the same history: filer.meta.tail's JSON lines.
        tail = subprocess.Popen(
            [find_weed(), "filer.meta.tail", f"-filer={w.filer_address}", f"-pathPrefix=/buckets/{bucket}",
             "-timeAgo=1h"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        time.sleep(4)  # pacing: a recording script, not a test
        tail.terminate()
        lines = tail.communicate(timeout=10)[0].decode().splitlines()
    httpd.shutdown()
    out = {"weed_steps": steps, "requests": received}
    (HERE / json_name).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    (HERE / tail_name).write_text("".join(ln + "\n" for ln in lines if ln.strip()))
    print(f"recorded {len(received)} requests, {len(lines)} meta.tail lines; steps {steps}")


def plain(c: Any, w: WeedServer, mark: Mark) -> None:
    mark("make_bucket")
    c.put_object("photos", "a/cat 1.jpg", io.BytesIO(b"x" * 100), 100, content_type="image/jpeg",
                 metadata={"X-Amz-Meta-Camera": "Nikon", "x-amz-meta-Note": "hello world"})
    mark("put")
    c.put_object("photos", "a/cat 1.jpg", io.BytesIO(b"y" * 50), 50, content_type="image/jpeg")
    mark("overwrite")
    c.copy_object("photos", "b/copy.jpg", CopySource("photos", "a/cat 1.jpg"))
    mark("copy")
    c.remove_object("photos", "a/cat 1.jpg")
    mark("delete")
    big = b"z" * (11 * 1024 * 1024)
    c.put_object("photos", "big/multi.bin", io.BytesIO(big), len(big), part_size=5 * 1024 * 1024)
    mark("multipart")
    c.put_object("photos", "empty/", io.BytesIO(b""), 0)
    mark("dir_marker")
    # S3 has no rename; the filer does (fs.mv, or the HTTP API's mv.from), and S3 readers see it.
    req = urllib.request.Request(
        f"http://{w.filer_address}/buckets/photos/b/renamed.jpg?mv.from=/buckets/photos/b/copy.jpg",
        method="POST",
    )
    urllib.request.urlopen(req, timeout=10).read()
    mark("rename")
    c.remove_object("photos", "b/renamed.jpg")
    c.remove_object("photos", "big/multi.bin")
    mark("delete_rest")


def versioned(c: Any, w: WeedServer, mark: Mark) -> None:
    from minio.versioningconfig import ENABLED, VersioningConfig

    c.set_bucket_versioning("vers", VersioningConfig(ENABLED))
    mark("make_bucket")
    c.put_object("vers", "a/photo.jpg", io.BytesIO(b"x" * 100), 100, content_type="image/jpeg")
    mark("put")
    c.put_object("vers", "a/photo.jpg", io.BytesIO(b"y" * 200), 200, content_type="image/jpeg")
    mark("put_again")
    c.remove_object("vers", "a/photo.jpg")
    mark("delete_marker")
    first = [o for o in c.list_objects("vers", prefix="a/", include_version=True)
             if not o.is_delete_marker and o.size == 200][0]
    c.remove_object("vers", "a/photo.jpg", version_id=first.version_id)
    mark("delete_version")


if __name__ == "__main__":
    import sys

    if "--versioned" in sys.argv[1:]:
        record("vers", versioned, "recorded_versioned.json", "meta_tail_versioned.txt")
    else:
        record("photos", plain, "recorded.json", "meta_tail.txt")
