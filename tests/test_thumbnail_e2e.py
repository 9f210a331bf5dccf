"""End to end: MinIO-style webhook -> hub -> worker process running the thumbnail and audit plugins -> SeaweedFS."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from bucketwire_audit.chain import verify
from tests import minio_payloads as mp
from tests.fixtures_hub import wait_for


def test_upload_event_through_hub_and_worker(stack_factory: Any, weed: Any, bucket: str, tmp_path: Path) -> None:
    c = weed.client()
    audit_dir = tmp_path / "audit"
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (0, 128, 255)).save(buf, "JPEG")
    data = buf.getvalue()
    c.put_object(bucket, "cam/one.jpg", io.BytesIO(data), len(data), content_type="image/jpeg")
    etag = c.stat_object(bucket, "cam/one.jpg").etag
    stack = stack_factory(f"""
[stores.primary]
endpoint = "{weed.s3_endpoint}"
access_key = "{weed.access_key}"
secret_key = "{weed.secret_key}"

[[routes]]
events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
topic = "bucket-update"

[groups.media]
topics = ["bucket-update"]
plugins = ["thumbnail", "audit"]

[plugins.thumbnail]
sizes = [128]

[plugins.audit]
dir = "{audit_dir}"
""")
    stack.start_hub()
    stack.start_worker("media", 1)
    rec = mp.record("s3:ObjectCreated:Put", bucket, "cam/one.jpg", size=len(data), etag=etag,
                    content_type="image/jpeg")
    code, _ = stack.post("/minio/events", mp.body(rec))
    assert code == 200

    def thumb() -> Any:
        try:
            return c.stat_object(bucket, "128/cam/one.jpg.webp")
        except Exception:
            return None

    st = wait_for(thumb, 30, "thumbnail in the bucket")
    assert st.content_type == "image/webp"
    log = audit_dir / "audit.log"
    wait_for(lambda: log.exists() and log.read_bytes().count(b"\n") >= 1, 20, "audit line")
    line = json.loads(log.read_bytes().splitlines()[0])
    assert (line["bucket"], line["key"], line["etag"]) == (bucket, "cam/one.jpg", etag)
    assert verify([audit_dir]).records >= 1
