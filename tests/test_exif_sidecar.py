"""The example third-party plugin (examples/exif-sidecar) against a real SeaweedFS, imported by path."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from bucketwire import Event
from bucketwire.config import StoreConfig
from bucketwire.devstack.seaweedfs import WeedServer
from bucketwire.testing import PluginHarness

EXAMPLE = Path(__file__).parent.parent / "examples" / "exif-sidecar"


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import bucketwire_exif_sidecar

        yield bucketwire_exif_sidecar
    finally:
        sys.path.remove(str(EXAMPLE))


def test_entry_point_is_declared() -> None:
    import tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["bucketwire"] == {"exif-sidecar": "bucketwire_exif_sidecar"}


def test_uses_only_the_public_api(plugin: ModuleType) -> None:
    from tests.test_public_api import private_imports

    assert private_imports(Path(plugin.__file__)) == []


def test_sidecar_on_real_seaweedfs(plugin: ModuleType, weed: WeedServer, bucket: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0110] = "Phone 9"
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), "blue").save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    c = weed.client()
    c.put_object(bucket, "trip/img 1.jpg", io.BytesIO(data), len(data), content_type="image/jpeg")
    c.make_bucket(bucket + "-meta")
    store = StoreConfig(name="primary", endpoint=weed.s3_endpoint, access_key=weed.access_key,
                        secret_key=weed.secret_key)
    ev = Event(id="x1", source="test", type="s3:ObjectCreated:Put", subject="trip/img 1.jpg",
               data={"bucket": bucket, "key": "trip/img 1.jpg", "size": len(data), "etag": "", "store": "primary"})
    with PluginHarness(plugin, settings={"output_bucket": bucket + "-meta"}, stores={"primary": store}) as h:
        (fo,) = h.handle(ev)
        h.handle(ev)  # redelivery: same sidecar, no error
    resp = c.get_object(bucket + "-meta", "trip/img 1.jpg.exif.json")
    try:
        side = json.loads(resp.read())
    finally:
        resp.close()
        resp.release_conn()
    assert side["exif"]["Model"] == "Phone 9" and side["orientation"] == 6
    assert side["source"] == {"bucket": bucket, "key": "trip/img 1.jpg", "etag": ""}
    assert fo.topic == "exif-extracted" and fo.data["source_key"] == "trip/img 1.jpg"

    gone = Event(id="x2", source="test", type="s3:ObjectRemoved:Delete", subject="trip/img 1.jpg",
                 data={"bucket": bucket, "key": "trip/img 1.jpg", "store": "primary"})
    with PluginHarness(plugin, settings={"output_bucket": bucket + "-meta"}, stores={"primary": store}) as h:
        h.handle(gone)
    assert [o.object_name for o in c.list_objects(bucket + "-meta", recursive=True)] == []


def test_the_examples_own_tests_pass(weed: WeedServer) -> None:
    """The example's tests use bucketwire's pytest fixtures, as a third-party plugin's would; run them as its
    author would, from its directory (`weed` only to skip where there is no SeaweedFS binary)."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=EXAMPLE,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 passed" in r.stdout
