"""Unit test with bucketwire.testing.PluginHarness and an in-memory stand-in for the store."""

from __future__ import annotations

import io
import json
from typing import Any

import bucketwire_exif_sidecar as plugin
import pytest
from PIL import Image

from bucketwire import ConfigError, Event, PermanentError, Stores
from bucketwire.testing import PluginHarness


class MemoryStore:
    """Just the minio.Minio calls the plugin makes."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def get_object(self, bucket: str, key: str) -> Any:
        data = self.objects[(bucket, key)]

        class Resp(io.BytesIO):
            def release_conn(self) -> None:
                pass

        return Resp(data)

    def put_object(self, bucket: str, key: str, data: Any, length: int, **kw: Any) -> None:
        self.objects[(bucket, key)] = data.read(length)

    def remove_object(self, bucket: str, key: str) -> None:
        self.objects.pop((bucket, key), None)


class MemoryStores(Stores):
    def __init__(self, store: MemoryStore) -> None:
        super().__init__({})
        self.store = store

    def get(self, name: str | None = None) -> Any:
        return self.store


def jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Acme"
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def event(type_: str, key: str, size: int = 10) -> Event:
    return Event(id="e1", source="test", type=type_, subject=key,
                 data={"bucket": "photos", "key": key, "size": size, "etag": "x", "store": "primary"})


def test_writes_sidecar_and_publishes() -> None:
    mem = MemoryStore()
    mem.objects[("photos", "a.jpg")] = jpeg_with_exif()
    with PluginHarness(plugin, stores=MemoryStores(mem)) as h:
        (fo,) = h.handle(event("s3:ObjectCreated:Put", "a.jpg"))
        side = json.loads(mem.objects[("photos", "a.jpg.exif.json")])
        assert side["exif"]["Make"] == "Acme" and side["orientation"] == 6 and side["width"] == 40
        assert fo.topic == "exif-extracted" and fo.data["key"] == "a.jpg.exif.json"
        assert h.handle(event("s3:ObjectCreated:Put", "a.jpg.exif.json")) == []  # no recursion
        h.handle(event("s3:ObjectRemoved:Delete", "a.jpg"))
        assert ("photos", "a.jpg.exif.json") not in mem.objects


def test_bad_input_and_settings() -> None:
    mem = MemoryStore()
    mem.objects[("photos", "bad.jpg")] = b"not an image"
    with PluginHarness(plugin, stores=MemoryStores(mem)) as h, pytest.raises(PermanentError):
        h.handle(event("s3:ObjectCreated:Put", "bad.jpg"))
    with pytest.raises((ConfigError, ValueError)):
        PluginHarness(plugin, settings={"colour": "blue"})
