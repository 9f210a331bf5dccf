"""Replication plugin against real SeaweedFS: within one server (server-side copy) and across two (stream)."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import os
import tracemalloc
from typing import Any

import minio
import pytest
import urllib3
from minio.commonconfig import Tags
from minio.error import S3Error

import bucketwire_replication as repl
from bucketwire import ConfigError, Event, PermanentError, Stores
from bucketwire.config import StoreConfig
from bucketwire.devstack.seaweedfs import WeedServer
from bucketwire.testing import PluginHarness

_ids = itertools.count(1)


def obj_event(kind: str, bucket: str, key: str, *, store: str = "primary", md: dict[str, str] | None = None,
              etag: str = "", size: int = 0) -> Event:
    return Event(
        id=f"r-{next(_ids)}", source="test", type=f"s3:{kind}", subject=key,
        data={"bucket": bucket, "key": key, "size": size, "etag": etag, "content_type": "", "version_id": "",
              "sequencer": "", "user_metadata": md or {}, "store": store, "records": []},
    )


def store_cfg(name: str, w: WeedServer) -> StoreConfig:
    return StoreConfig(name=name, endpoint=w.s3_endpoint, access_key=w.access_key, secret_key=w.secret_key)


class FastFailStores(Stores):
    """Stores whose clients do not retry refused connections (minio's default pool backs off for seconds)."""

    def get(self, name: str | None = None) -> minio.Minio:
        cfg = self._configs.get(name or "")
        if name == "down" and cfg is not None:
            http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False)
            return minio.Minio(cfg.endpoint, access_key="x", secret_key="y", secure=False, region="us-east-1",
                               http_client=http)
        return super().get(name)


def harness(stores: dict[str, StoreConfig], **settings: Any) -> PluginHarness:
    return PluginHarness(repl, settings=settings, stores=FastFailStores(stores))


def put(c: Any, bucket: str, key: str, data: bytes, **kw: Any) -> Event:
    c.put_object(bucket, key, io.BytesIO(data), len(data), **kw)
    st = c.stat_object(bucket, key)
    return obj_event("ObjectCreated:Put", bucket, key, etag=st.etag, size=st.size)


def read(c: Any, bucket: str, key: str) -> bytes:
    r = c.get_object(bucket, key)
    try:
        return r.read()
    finally:
        r.close()
        r.release_conn()


def meta(st: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in st.metadata.items() if k.lower().startswith("x-amz-meta-")}


def new_bucket(c: Any, base: str, suffix: str) -> str:
    name = f"{base}-{suffix}"
    c.make_bucket(name)
    return name


# -- settings and keys --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings,match",
    [
        ({}, "target_store"),
        ({"target_store": "b"}, "target_bucket"),
        ({"target_store": "b", "target_bucket": "x", "part_size": 1024}, "part_size"),
        ({"target_store": "b", "target_bucket": "x", "prefix": "../up/"}, "prefix"),
        ({"target_store": "b", "target_bucket": "x", "replicate_deletes": "yes"}, "replicate_deletes"),
        ({"target_store": "b", "target_bucket": "x", "trust_tagging_count": 1}, "trust_tagging_count"),
        ({"target_store": "b", "target_bucket": "x", "target": "y"}, "target"),
    ],
)
def test_bad_settings(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PluginHarness(repl, settings=settings)


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "a/./b", "/abs", "nul\x00byte", "k" * 1100])
def test_escaping_keys_are_permanent_errors(key: str) -> None:
    with pytest.raises(PermanentError, match="not replicated"):
        repl.target_key("replica/", key)
    assert repl.target_key("replica/", "ok/..dots../x..y") == "replica/ok/..dots../x..y"


# -- one server: server-side copy ----------------------------------------------------------------------------
def test_same_store_copy_preserves_metadata_tags_and_is_idempotent(weed: WeedServer, bucket: str) -> None:
    c = weed.client()
    tb = new_bucket(c, bucket, "copy")
    tags = Tags.new_object_tags()
    tags["team"] = "photo"
    ev = put(c, bucket, "dir/a file.txt", b"hello replica", content_type="text/plain",
             metadata={"x-amz-meta-owner": "alice"}, tags=tags)
    with harness({"primary": store_cfg("primary", weed)}, target_store="primary", target_bucket=tb,
                 prefix="r/") as h:
        (p,) = h.handle(ev)
        assert p.topic == "object-replicated" and p.data["method"] == "copy"
        assert p.data["key"] == "r/dir/a file.txt" and p.data["bucket"] == tb
        st = c.stat_object(tb, "r/dir/a file.txt")
        assert read(c, tb, "r/dir/a file.txt") == b"hello replica"
        assert st.content_type == "text/plain"
        m = meta(st)
        assert m["x-amz-meta-owner"] == "alice"
        assert m["x-amz-meta-bucketwire-replica-of"] == f"{bucket}/dir/a%20file.txt"
        got_tags = c.get_object_tags(tb, "r/dir/a file.txt")
        assert got_tags is not None and dict(got_tags) == {"team": "photo"}
        before = st.last_modified
        (again,) = h.handle(ev)  # redelivery
        assert again.id == p.id and again.data["method"] == "already"
        assert c.stat_object(tb, "r/dir/a file.txt").last_modified == before


def test_two_way_replication_does_not_loop(weed: WeedServer, bucket: str) -> None:
    c = weed.client()
    other = new_bucket(c, bucket, "twin")
    stores = {"primary": store_cfg("primary", weed)}
    a_to_b = harness(stores, target_store="primary", target_bucket=other, buckets=[bucket], replicate_deletes=True)
    b_to_a = harness(stores, target_store="primary", target_bucket=bucket, buckets=[other], replicate_deletes=True)
    ev = put(c, bucket, "ping.txt", b"pong")
    assert len(a_to_b.handle(ev)) == 1
    replica = c.stat_object(other, "ping.txt")
    # The replica's own event, with and without the metadata in the notification: ignored.
    for md in ({"X-Amz-Meta-Bucketwire-Replica-Of": f"{bucket}/ping.txt"}, {}):
        e = obj_event("ObjectCreated:Copy", other, "ping.txt", md=md, etag=replica.etag)
        assert b_to_a.handle(e) == []
        assert a_to_b.handle(e) == []  # (filtered by bucket anyway)
    assert c.stat_object(bucket, "ping.txt").last_modified == c.stat_object(bucket, "ping.txt").last_modified
    # Deletes follow once and stop: the delete of the replica finds nothing to delete on the way back.
    c.remove_object(bucket, "ping.txt")
    (d,) = a_to_b.handle(obj_event("ObjectRemoved:Delete", bucket, "ping.txt"))
    assert d.data["action"] == "delete"
    with pytest.raises(S3Error):
        c.stat_object(other, "ping.txt")
    assert b_to_a.handle(obj_event("ObjectRemoved:Delete", other, "ping.txt")) == []


def test_deletes_only_when_enabled_and_only_our_replicas(weed: WeedServer, bucket: str) -> None:
    c = weed.client()
    tb = new_bucket(c, bucket, "del")
    stores = {"primary": store_cfg("primary", weed)}
    ev = put(c, bucket, "x.bin", b"x" * 100)
    off = harness(stores, target_store="primary", target_bucket=tb)
    off.handle(ev)
    c.remove_object(bucket, "x.bin")
    rm = obj_event("ObjectRemoved:Delete", bucket, "x.bin")
    assert off.handle(rm) == []
    assert c.stat_object(tb, "x.bin").size == 100  # kept: replicate_deletes is off by default
    on = harness(stores, target_store="primary", target_bucket=tb, replicate_deletes=True)
    # Not ours (no marker): never deleted.
    c.put_object(tb, "y.bin", io.BytesIO(b"mine"), 4)
    assert on.handle(obj_event("ObjectRemoved:DeleteMarkerCreated", bucket, "y.bin")) == []
    assert c.stat_object(tb, "y.bin").size == 4
    (p,) = on.handle(rm)
    assert p.data["action"] == "delete"
    with pytest.raises(S3Error):
        c.stat_object(tb, "x.bin")


def test_a_lifecycle_expiration_is_not_replicated(weed: Any, bucket: str) -> None:
    """As S3 replication does: an object the source's lifecycle rule expired keeps its replica, even with
    `replicate_deletes` (the target keeps its own rules; a replica is often the longer-kept copy)."""
    c = weed.client()
    tb = new_bucket(c, bucket, "exp")
    stores = {"primary": store_cfg("primary", weed)}
    on = harness(stores, target_store="primary", target_bucket=tb, replicate_deletes=True)
    on.handle(put(c, bucket, "old.bin", b"x" * 10))
    c.remove_object(bucket, "old.bin")
    assert on.handle(obj_event("LifecycleExpiration:Delete", bucket, "old.bin")) == []
    assert c.stat_object(tb, "old.bin").size == 10


# -- two servers: streamed, multipart, constant memory --------------------------------------------------------
@pytest.mark.parametrize("size", [1000, 12 << 20])
def test_cross_store_stream_small_and_multipart(weed: WeedServer, weed2: WeedServer, bucket: str,
                                                size: int) -> None:
    c1, c2 = weed.client(), weed2.client()
    tb = f"{bucket}-remote"
    c2.make_bucket(tb)
    data = os.urandom(size)
    ev = put(c1, bucket, "blob/😀 data.bin", data, content_type="application/x-test",
             metadata={"x-amz-meta-color": "blue"})
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="backup", target_bucket=tb, part_size=5 << 20) as h:
        (p,) = h.handle(ev)
        assert p.data["method"] == "stream" and p.data["size"] == size
        got = read(c2, tb, "blob/😀 data.bin")
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        st = c2.stat_object(tb, "blob/😀 data.bin")
        assert st.content_type == "application/x-test" and meta(st)["x-amz-meta-color"] == "blue"
        if size > 5 << 20:
            assert "-" in st.etag  # really went up in parts
        (again,) = h.handle(ev)
        assert again.data["method"] == "already"
        assert c2.stat_object(tb, "blob/😀 data.bin").last_modified == st.last_modified


HEADERS = {"Content-Encoding": "gzip", "Cache-Control": "max-age=60", "Content-Language": "de",
           "Content-Disposition": 'attachment; filename="site.js"'}


def raw_read(c: Any, bucket: str, key: str) -> bytes:
    """The stored bytes, not what an HTTP client makes of them (urllib3 un-gzips `Content-Encoding: gzip`)."""
    r = c.get_object(bucket, key)
    try:
        return bytes(r.read(decode_content=False))
    finally:
        r.close()
        r.release_conn()


@pytest.mark.parametrize("how", ["copy", "stream", "multipart"])
def test_content_encoding_and_standard_headers_are_kept(weed: WeedServer, weed2: WeedServer, bucket: str,
                                                        how: str) -> None:
    """A pre-compressed asset (`Content-Encoding: gzip`, as static sites store them) must arrive byte for byte
    with its headers: un-gzipped on the way, its size and MD5 never matched and it was retried until
    dead-lettered; and a replica without `Content-Encoding`, `Cache-Control`, ... is served wrongly."""
    c1 = weed.client()
    tc = c1 if how == "copy" else weed2.client()
    tb = new_bucket(tc, bucket, "enc")
    raw = gzip.compress(os.urandom(100 if how != "multipart" else 6 << 20), compresslevel=1)
    ev = put(c1, bucket, "site.js.gz", raw, content_type="application/javascript", metadata=dict(HEADERS))
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="primary" if how == "copy" else "backup", target_bucket=tb,
                 part_size=5 << 20) as h:
        (p,) = h.handle(ev)
    assert p.data["method"] == ("copy" if how == "copy" else "stream")
    assert raw_read(tc, tb, "site.js.gz") == raw
    got = {k.lower(): v for k, v in tc.stat_object(tb, "site.js.gz").metadata.items()}
    assert {k: got.get(k.lower()) for k in HEADERS} == HEADERS
    assert got["content-type"] == "application/javascript"


@pytest.mark.parametrize("how", ["copy", "stream"])
@pytest.mark.parametrize("kind", ["ObjectCreated:PutTagging", "ObjectTagging:Put"])
def test_a_tag_change_reaches_the_replica(weed: WeedServer, weed2: WeedServer, bucket: str, how: str,
                                          kind: str) -> None:
    """Tags are replicated with the object, so a tag change must reach the replica too: MinIO sends
    s3:ObjectCreated:PutTagging / DeleteTagging (AWS s3:ObjectTagging:Put / Delete) for it, and the replica,
    current by its ETag, kept the old tags (a lifecycle or access rule keyed on them then acted on stale ones)."""
    c1 = weed.client()
    tc = c1 if how == "copy" else weed2.client()
    tb = new_bucket(tc, bucket, "tag")
    tags = Tags.new_object_tags()
    tags["team"] = "photo"
    ev = put(c1, bucket, "t.bin", b"tagged", tags=tags)
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="primary" if how == "copy" else "backup", target_bucket=tb) as h:
        h.handle(ev)
        assert dict(tc.get_object_tags(tb, "t.bin") or {}) == {"team": "photo"}
        retag = Tags.new_object_tags()
        retag["team"] = "video"
        c1.set_object_tags(bucket, "t.bin", retag)
        h.handle(obj_event(kind, bucket, "t.bin", etag=ev.data["etag"], size=ev.data["size"]))
        assert dict(tc.get_object_tags(tb, "t.bin") or {}) == {"team": "video"}
        c1.delete_object_tags(bucket, "t.bin")
        h.handle(obj_event(kind.replace("Put", "Delete"), bucket, "t.bin", etag=ev.data["etag"],
                           size=ev.data["size"]))
        assert dict(tc.get_object_tags(tb, "t.bin") or {}) == {}
        # A tag change to an object with no replica (its replication failed) replicates it, tags and all.
        tc.remove_object(tb, "t.bin")
        c1.set_object_tags(bucket, "t.bin", retag)
        h.handle(obj_event(kind, bucket, "t.bin", etag=ev.data["etag"], size=ev.data["size"]))
        assert dict(tc.get_object_tags(tb, "t.bin") or {}) == {"team": "video"}
    assert read(tc, tb, "t.bin") == b"tagged"

class CountRequests:
    """Counts the S3 requests every minio client makes (method, sub-resource), from any thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        orig = minio.Minio._url_open

        def counting(client: Any, method: str, region: str, *a: Any, **kw: Any) -> Any:
            self.calls.append((method, ",".join(sorted(kw.get("query_params") or {}))))
            return orig(client, method, region, *a, **kw)

        monkeypatch.setattr(minio.Minio, "_url_open", counting)


def test_cross_store_small_object_costs_get_put_and_one_target_stat(
    weed: WeedServer, weed2: WeedServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source metadata from the GET headers, no tag request for an untagged object, no stat after the PUT."""
    c1, c2 = weed.client(), weed2.client()
    tb = f"{bucket}-count"
    c2.make_bucket(tb)
    tags = Tags.new_object_tags()
    tags["team"] = "photo"
    plain = put(c1, bucket, "count/plain.bin", os.urandom(64 << 10), metadata={"x-amz-meta-owner": "bob"})
    tagged = put(c1, bucket, "count/tagged.bin", b"tagged bytes", content_type="text/plain", tags=tags)
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="backup", target_bucket=tb) as h:
        h.handle(obj_event("ObjectCreated:Put", bucket, "count/warm-up"))  # region look-ups, connections
        n = CountRequests(monkeypatch)
        (p,) = h.handle(plain)
        assert p.data["method"] == "stream"
        assert sorted(n.calls) == [("GET", ""), ("HEAD", ""), ("PUT", "")]
        n.calls.clear()
        (p,) = h.handle(tagged)
        assert sorted(n.calls) == [("GET", ""), ("GET", "tagging"), ("HEAD", ""), ("PUT", "")]
        n.calls.clear()
        (again,) = h.handle(plain)  # redelivery: the GET is read (small) but nothing is written
        assert again.data["method"] == "already" and sorted(n.calls) == [("GET", ""), ("HEAD", "")]
    # A server that does not send x-amz-tagging-count: always ask for the tags.
    with harness(stores, target_store="backup", target_bucket=tb, prefix="t/", trust_tagging_count=False) as h:
        h.handle(obj_event("ObjectCreated:Put", bucket, "count/warm-up"))
        n.calls.clear()
        h.handle(plain)
        assert sorted(n.calls) == [("GET", ""), ("GET", "tagging"), ("HEAD", ""), ("PUT", "")]
    monkeypatch.undo()
    st = c2.stat_object(tb, "count/tagged.bin")
    assert st.content_type == "text/plain" and read(c2, tb, "count/tagged.bin") == b"tagged bytes"
    got_tags = c2.get_object_tags(tb, "count/tagged.bin")
    assert got_tags is not None and dict(got_tags) == {"team": "photo"}
    assert meta(c2.stat_object(tb, "count/plain.bin"))["x-amz-meta-owner"] == "bob"


def test_cross_store_loop_guard_and_gone_source(weed: WeedServer, weed2: WeedServer, bucket: str) -> None:
    """A replica read back over the stream path is recognised from the GET headers; a gone source is a no-op."""
    c1, c2 = weed.client(), weed2.client()
    tb = f"{bucket}-guard"
    c2.make_bucket(tb)
    ev = put(c1, bucket, "guard.txt", b"once")
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="backup", target_bucket=tb) as there, \
            harness(stores, target_store="primary", target_bucket=bucket, source_store="backup") as back:
        (p,) = there.handle(ev)
        assert p.data["method"] == "stream"
        before = c1.stat_object(bucket, "guard.txt").last_modified
        # The replica's own event on the target, without the marker in the notification: still never copied back.
        assert back.handle(obj_event("ObjectCreated:Put", tb, "guard.txt", store="backup")) == []
        assert c1.stat_object(bucket, "guard.txt").last_modified == before
        assert there.handle(obj_event("ObjectCreated:Put", bucket, "never-existed.txt")) == []
        with pytest.raises(S3Error):
            c2.stat_object(tb, "never-existed.txt")


class _Written:
    def __init__(self, size: int | None) -> None:
        self.size = size
        self.metadata: dict[str, str] = {}


class _Dst:
    """Stands in for the target client in `_verify`: records stats, answers with a fixed size."""

    def __init__(self, size: int | None) -> None:
        self.size, self.stats = size, 0

    def stat_object(self, bucket: str, key: str, version_id: str | None = None) -> _Written:
        self.stats += 1
        if self.size is None:
            raise S3Error(None, "NoSuchKey", "gone", "", "", "")  # type: ignore[arg-type]
        return _Written(self.size)


def _src(etag: str, size: int = 4) -> Any:
    return repl._Source(size, etag, None, "application/octet-stream", {}, None)


@pytest.mark.parametrize(
    "src_etag,put_etag,stored,verify_md5,stats,problem",
    [
        # single-part PUT whose ETag equals the source MD5: proven, no MD5 computed here, no stat
        (hashlib.md5(b"data").hexdigest(), hashlib.md5(b"data").hexdigest(), 4, True, 0, None),
        # multipart source ETag: the PUT ETag matches the MD5 of what was sent
        ("0123456789abcdef0123456789abcdef-3", hashlib.md5(b"data").hexdigest(), 4, True, 0, None),
        # the bytes do not match the source's MD5
        (hashlib.md5(b"other").hexdigest(), hashlib.md5(b"data").hexdigest(), 4, True, 0, "does not match"),
        # ... which is not checked with verify_md5 off (the PUT ETag still proves the transfer)
        (hashlib.md5(b"other").hexdigest(), hashlib.md5(b"data").hexdigest(), 4, False, 0, None),
        # multipart upload (ETag not an MD5): the size is checked with a stat
        ("0123456789abcdef0123456789abcdef-3", "fedcba9876543210fedcba9876543210-1", 4, True, 1, None),
        ("0123456789abcdef0123456789abcdef-3", "fedcba9876543210fedcba9876543210-1", 3, True, 1, "holds 3"),
        ("0123456789abcdef0123456789abcdef-3", "fedcba9876543210fedcba9876543210-1", None, True, 1, "holds None"),
    ],
)
def test_verify(src_etag: str, put_etag: str, stored: int | None, verify_md5: bool, stats: int,
                problem: str | None) -> None:
    dst = _Dst(stored)
    hashed: list[bool] = []

    def md5_of() -> str:
        hashed.append(True)
        return hashlib.md5(b"data").hexdigest()

    got = repl._verify({"verify_md5": verify_md5}, dst, "tb", "k", _src(src_etag), 4, put_etag, md5_of)
    assert (got is None) if problem is None else (problem in (got or ""))
    assert dst.stats == stats
    if src_etag == put_etag:
        assert not hashed
    assert repl._verify({"verify_md5": True}, dst, "tb", "k", _src(src_etag), 3, put_etag, md5_of) == \
        "read 3 bytes, expected 4"


class _HashSpy:
    """Stands in for the plugin's `hashlib`: counts the bytes MD5-hashed (the one hash the plugin computes)."""

    def __init__(self) -> None:
        self.hashed = 0

    def md5(self, data: bytes = b"", **kw: Any) -> Any:
        spy, h = self, hashlib.md5(data, **kw)
        spy.hashed += len(data)

        class Counted:
            def update(self, b: bytes) -> None:
                spy.hashed += len(b)
                h.update(b)

            def hexdigest(self) -> str:
                return h.hexdigest()

        return Counted()


@pytest.mark.parametrize("source_parts,verify_md5,hashed", [
    (True, True, 0),  # multipart source ETag, multipart replica: no MD5 to compare with, none computed
    (False, True, 12 << 20),  # plain-MD5 source ETag: every byte hashed and checked against it
    (False, False, 0),  # ... unless verify_md5 is off
])
def test_a_streamed_object_is_md5_hashed_only_when_the_md5_is_checked(
    weed: WeedServer, weed2: WeedServer, bucket: str, monkeypatch: pytest.MonkeyPatch, source_parts: bool,
    verify_md5: bool, hashed: int,
) -> None:
    """Hashing 256 MiB on the handler's thread cost the large phase of `bench replicate` about a tenth of its
    speed, for a digest nothing compared when neither the source ETag nor the multipart replica's is an MD5."""
    c1, c2 = weed.client(), weed2.client()
    tb = f"{bucket}-md5"
    c2.make_bucket(tb)
    data = os.urandom(12 << 20)
    ev = put(c1, bucket, "h.bin", data, part_size=(5 if source_parts else 16) << 20)
    assert ("-" in ev.data["etag"]) == source_parts
    spy = _HashSpy()
    monkeypatch.setattr(repl, "hashlib", spy)
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="backup", target_bucket=tb, part_size=5 << 20, verify_md5=verify_md5) as h:
        (p,) = h.handle(ev)
    monkeypatch.undo()
    assert p.data["method"] == "stream" and spy.hashed == hashed
    assert hashlib.sha256(read(c2, tb, "h.bin")).digest() == hashlib.sha256(data).digest()


def test_stream_memory_stays_near_one_part(weed: WeedServer, weed2: WeedServer, bucket: str) -> None:
    """60 MB through the worker with 5 MB parts: Python-side peak stays at a few parts (the one being read, those
    uploading, each with a copy in flight), not the object."""
    c1, c2 = weed.client(), weed2.client()
    tb = f"{bucket}-mem"
    c2.make_bucket(tb)
    chunk = os.urandom(1 << 20)

    class Gen(io.RawIOBase):
        left = 60 << 20

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            n = min(len(b), self.left, len(chunk))
            b[:n] = chunk[:n]
            self.left -= n
            return n

    c1.put_object(bucket, "big.bin", io.BufferedReader(Gen()), 60 << 20, part_size=5 << 20)
    ev = obj_event("ObjectCreated:CompleteMultipartUpload", bucket, "big.bin")
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    with harness(stores, target_store="backup", target_bucket=tb, part_size=5 << 20) as h:
        tracemalloc.start()
        try:
            h.handle(ev)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert c2.stat_object(tb, "big.bin").size == 60 << 20
    limit = (repl.PARALLEL_PARTS + 3) * (5 << 20) + (1 << 20)  # and 1 MiB for what is not a part (one run: +80 KiB)
    assert peak < limit, f"peak Python allocation {peak >> 20} MiB for a 60 MiB object (limit {limit >> 20} MiB)"


def test_target_down_raises_an_ordinary_exception(weed: WeedServer, bucket: str) -> None:
    c = weed.client()
    ev = put(c, bucket, "a.txt", b"a")
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    stores = {"primary": store_cfg("primary", weed),
              "down": StoreConfig(name="down", endpoint=f"127.0.0.1:{port}")}
    with harness(stores, target_store="down", target_bucket="x") as h, pytest.raises(Exception) as ei:
        h.handle(ev)
    assert not isinstance(ei.value, PermanentError)


def test_path_escape_key_in_event_is_rejected(weed: WeedServer, bucket: str) -> None:
    with harness({"primary": store_cfg("primary", weed)}, target_store="primary", target_bucket=bucket,
                 prefix="replica/") as h, pytest.raises(PermanentError, match="segments"):
        h.handle(obj_event("ObjectCreated:Put", bucket, "../../outside"))


@pytest.mark.parametrize("cross", [False, True], ids=["copy", "stream"])
def test_source_deleted_before_handling_makes_no_replica_and_one_info_line(
        weed: WeedServer, weed2: WeedServer, bucket: str, cross: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted before its create event is handled: no replica appears, nothing is retried, one info line.

    Its removal event follows and replicates as a delete when `replicate_deletes` is on; an empty object is
    an ordinary object and is replicated like any other.
    """
    c1 = weed.client()
    tw = weed2 if cross else weed
    tb = f"{bucket}-dst"
    tw.client().make_bucket(tb)
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", tw)}
    ev = put(c1, bucket, "brief.txt", b"here for a moment")
    empty = put(c1, bucket, "empty", b"")
    c1.remove_object(bucket, "brief.txt")
    caplog.set_level(logging.INFO, logger="bucketwire.plugin.replication")
    with harness(stores, target_store="backup" if cross else "primary", target_bucket=tb,
                 replicate_deletes=True) as h:
        assert h.handle(ev) == []
        (line,) = [r.getMessage() for r in caplog.records
                   if r.name == "bucketwire.plugin.replication" and r.levelno == logging.INFO]
        assert "brief.txt" in line and "deleted" in line
        with pytest.raises(S3Error):
            tw.client().stat_object(tb, "brief.txt")
        assert h.handle(obj_event("ObjectRemoved:Delete", bucket, "brief.txt")) == []
        (p,) = h.handle(empty)
        assert p.data["size"] == 0 and tw.client().stat_object(tb, "empty").size == 0


@pytest.mark.parametrize("where", ["same-store", "other-store"])
def test_a_removal_that_leaves_the_object_in_place_replicates_what_is_current(
        weed: WeedServer, weed2: WeedServer, bucket: str, where: str) -> None:
    """With replicate_deletes, on a versioned source: deleting the current version makes the one before it
    current, and removing a delete marker brings the object back; both are removal events and no creation event
    follows. The replica kept the deleted version's bytes, or stayed deleted while the object was there."""
    from minio.versioningconfig import ENABLED, VersioningConfig

    c1, c2 = weed.client(), weed2.client()
    c1.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    tc = c1 if where == "same-store" else c2
    tb = f"{bucket}-cur"
    tc.make_bucket(tb)
    stores = {"primary": store_cfg("primary", weed), "backup": store_cfg("backup", weed2)}
    target = "primary" if where == "same-store" else "backup"
    with harness(stores, target_store=target, target_bucket=tb, replicate_deletes=True) as h:
        h.handle(put(c1, bucket, "v.txt", b"first", content_type="text/plain"))
        h.handle(put(c1, bucket, "v.txt", b"second", content_type="text/plain"))
        assert read(tc, tb, "v.txt") == b"second"
        c1.remove_object(bucket, "v.txt", version_id=c1.stat_object(bucket, "v.txt").version_id)
        (p,) = h.handle(obj_event("ObjectRemoved:Delete", bucket, "v.txt"))
        assert read(tc, tb, "v.txt") == b"first" and p.data["action"] == "put"
        c1.remove_object(bucket, "v.txt")  # a delete marker: the replica goes
        h.handle(obj_event("ObjectRemoved:DeleteMarkerCreated", bucket, "v.txt"))
        with pytest.raises(S3Error):
            tc.stat_object(tb, "v.txt")
        marker = [o for o in c1.list_objects(bucket, prefix="v.txt", include_version=True) if o.is_delete_marker]
        c1.remove_object(bucket, "v.txt", version_id=marker[0].version_id)  # ... removed: the object is back
        h.handle(obj_event("ObjectRemoved:Delete", bucket, "v.txt"))
        assert read(tc, tb, "v.txt") == b"first" and tc.stat_object(tb, "v.txt").content_type == "text/plain"
        # Replicated already: a redelivery changes nothing.
        (again,) = h.handle(obj_event("ObjectRemoved:Delete", bucket, "v.txt"))
        assert again.data["method"] == "already"


def test_an_object_of_the_target_bucket_is_never_copied_onto_itself(weed: WeedServer, bucket: str) -> None:
    """Same store, no prefix, every bucket watched (the defaults): an object put straight into the target bucket
    was its own source and target. It was copied onto itself with the replica marker naming itself (a rewrite
    of an object the plugin did not make, and an object-replicated event for nothing)."""
    c = weed.client()
    tb = new_bucket(c, bucket, "self")
    ev = put(c, tb, "mine.txt", b"my own file", content_type="text/plain", metadata={"x-amz-meta-owner": "eve"})
    before = c.stat_object(tb, "mine.txt")
    with harness({"primary": store_cfg("primary", weed)}, target_store="primary", target_bucket=tb,
                 replicate_deletes=True) as h:
        assert h.handle(ev) == []
        after = c.stat_object(tb, "mine.txt")
        assert meta(after) == {"x-amz-meta-owner": "eve"} and after.last_modified == before.last_modified
        c.remove_object(tb, "mine.txt")
        assert h.handle(obj_event("ObjectRemoved:Delete", tb, "mine.txt")) == []
