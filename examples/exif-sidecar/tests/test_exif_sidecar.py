"""The plugin against a real S3 server, with bucketwire's pytest fixtures (`bucketwire_store`, `plugin_harness`,
`make_event`): a throwaway SeaweedFS for the session and a fresh bucket per test."""

from __future__ import annotations

import io
import json
from typing import Any

import bucketwire_exif_sidecar as plugin
import pytest
from PIL import Image

from bucketwire import ConfigError, PermanentError


def jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Acme"
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_writes_sidecar_and_publishes(bucketwire_store: Any, plugin_harness: Any, make_event: Any) -> None:
    data = jpeg_with_exif()
    etag = bucketwire_store.put("a b.jpg", data, "image/jpeg")
    h = plugin_harness(plugin)
    (fo,) = h.handle(make_event(bucketwire_store.bucket, "a b.jpg", size=len(data), etag=etag))
    side = json.loads(bucketwire_store.get("a b.jpg.exif.json"))
    assert side["exif"]["Make"] == "Acme" and side["orientation"] == 6 and side["width"] == 40
    assert fo.topic == "exif-extracted" and fo.data["key"] == "a b.jpg.exif.json"
    assert h.handle(make_event(bucketwire_store.bucket, "a b.jpg.exif.json")) == []  # no recursion
    h.handle(make_event(bucketwire_store.bucket, "a b.jpg", kind="ObjectRemoved:Delete"))
    assert bucketwire_store.keys() == ["a b.jpg"]


def test_bad_input_and_settings(bucketwire_store: Any, plugin_harness: Any, make_event: Any) -> None:
    bucketwire_store.put("bad.jpg", b"not an image", "image/jpeg")
    h = plugin_harness(plugin)
    with pytest.raises(PermanentError):
        h.handle(make_event(bucketwire_store.bucket, "bad.jpg", size=12))
    with pytest.raises(ConfigError):
        plugin_harness(plugin, settings={"colour": "blue"})
