"""bucketwire replication plugin: copy created objects (and optionally removals) to a second store/bucket.

Configured in `[plugins.replication]` (see docs/plugins.md). Per created object:

1. skip replicas (marker metadata on the event or on the source object): two buckets replicating into each
   other must not ping-pong;
2. read the source's metadata (gone -> nothing to do; its removal event follows) and stat the target (same
   content already there -> done: redeliveries are cheap);
3. same store -> server-side `copy_object` (no bytes through the worker); different stores -> `get_object`
   into `put_object`: objects under `part_size` in one PUT, larger ones streamed in parts of `part_size` with
   one upload thread, so memory stays at about one part whatever the object size;
4. check size (and MD5 when the source ETag is a plain MD5); a mismatch removes the bad replica and raises so
   the runtime retries;
5. publish `object-replicated`.

Requests per streamed object (each ~1 ms on a local server, which is what a small object costs): the source's
metadata comes from the GET response headers (no separate source stat), the target stat runs on a helper
thread while the GET is in flight, object tags are fetched only when `x-amz-tagging-count` says there are
some, and a single-part PUT is verified by its response ETag (the MD5 of what the target stored) rather than
a final stat. That is GET + PUT on the critical path plus one overlapped HEAD, where it used to be six
sequential requests; multipart uploads (whose ETag is not an MD5) still stat the target once.

An unreachable target raises the client's ordinary exception: the runtime retries with backoff, then
dead-letters. Keys that could escape the target prefix on path-normalising servers raise `PermanentError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from minio.commonconfig import REPLACE, ComposeSource, CopySource
from minio.error import S3Error

from bucketwire import (
    ConfigError,
    Context,
    Event,
    PermanentError,
    PluginError,
    hookimpl,
    string_list,
    with_defaults,
)

PLUGIN_NAME = "replication"
META = "x-amz-meta-"
MARKER = "bucketwire-replica-of"
MARKER_ETAG = "bucketwire-replica-etag"
MAX_KEY_BYTES = 1024
MIN_PART = 5 << 20
MAX_COPY = 5 << 30  # S3's single CopyObject limit
NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchVersion", "ResourceNotFound"}
NO_TAGS = {"NotImplemented", "NoSuchTagSet", "NoSuchTagSetError", "MethodNotAllowed"}
PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
KEPT_HEADERS = ("Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language")
"""Object headers a replica keeps besides Content-Type and user metadata: they say how the bytes are to be served
(a gzip-compressed asset without its Content-Encoding is garbage to a browser). The minio client sends these
names as headers, not as `x-amz-meta-*`."""

PARALLEL_PARTS = 2
"""Parts of a large object uploaded to the target at once. With one, the connection sat idle while each part was
read, and a 256 MB object crossed at 0.50-0.70x the speed of a plain get+put (the minio client uploads 3 at once
by default); with two, 0.87-0.94x (bench replicate). The parts are read in order on the handler's thread (the MD5
sees them in order) and held until sent: the worker's peak RSS grew by 32 MiB with 8 MiB parts (16 with one part
at a time, 40 with three; tests/test_replication_rss.py)."""

DEFAULTS: dict[str, Any] = {
    "source_store": None,
    "target_store": None,
    "target_bucket": None,
    "prefix": "",
    "buckets": None,
    "replicate_deletes": False,
    "part_size": 8 << 20,
    "verify_md5": True,
    "trust_tagging_count": True,
    "topic": "object-replicated",
}


@hookimpl
def validate_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """`target_store` and `target_bucket` are required; the rest have defaults (see docs/plugins.md)."""
    s = with_defaults(settings, DEFAULTS)
    for k in ("target_store", "target_bucket"):
        if not isinstance(s[k], str) or not s[k]:
            raise ConfigError(f'{k}: required; e.g. {k} = "{"backup" if k == "target_store" else "photos-replica"}"')
    if s["source_store"] is not None and (not isinstance(s["source_store"], str) or not s["source_store"]):
        raise ConfigError(f"source_store: expected a store name, got {s['source_store']!r}")
    p = s["prefix"]
    if not isinstance(p, str) or "\x00" in p or p.startswith("/") or ".." in p.split("/"):
        raise ConfigError(f'prefix: expected a key prefix such as "replica/" (no leading "/" or ".."), got {p!r}')
    if s["buckets"] is not None:
        s["buckets"] = string_list(s["buckets"], "buckets", "source bucket names")
    for k in ("replicate_deletes", "verify_md5", "trust_tagging_count"):
        if not isinstance(s[k], bool):
            raise ConfigError(f"{k}: expected true or false, got {s[k]!r}")
    ps = s["part_size"]
    if not isinstance(ps, int) or isinstance(ps, bool) or not MIN_PART <= ps <= (5 << 30):
        raise ConfigError(f"part_size: expected bytes between {MIN_PART} (5 MiB) and 5 GiB, got {ps!r}")
    t = s["topic"]
    if t is not None and t is not False and (not isinstance(t, str) or not t):
        raise ConfigError(f"topic: expected a topic name (or false to publish nothing); got {t!r}")
    s["topic"] = t or None
    return s


# -- helpers -------------------------------------------------------------------------------------------------
def meta_get(metadata: Any, name: str) -> str | None:
    """Case-insensitive lookup of user metadata `name` under `x-amz-meta-NAME` or bare `NAME`."""
    if not metadata:
        return None
    want = name.lower()
    for k, v in metadata.items():
        lk = str(k).lower()
        if lk == want or lk == META + want:
            return v if isinstance(v, str) else str(v)
    return None


def user_metadata(headers: Any) -> dict[str, str]:
    """The `x-amz-meta-*` headers of a stat result, without our own markers."""
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        lk = str(k).lower()
        if lk.startswith(META) and lk[len(META):] not in (MARKER, MARKER_ETAG):
            out[lk] = v
    return out


def target_key(prefix: str, key: str) -> str:
    """`prefix + key`, refusing keys that a path-normalising server could resolve outside the prefix."""
    if "\x00" in key:
        raise PermanentError("object key contains a NUL byte; not replicated")
    parts = key.split("/")
    if ".." in parts or "." in parts or key.startswith("/"):
        raise PermanentError(f"object key {key[:200]!r} has '.'/'..' segments or a leading '/'; not replicated")
    out = prefix + key
    if len(out.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise PermanentError(f"target key would be over {MAX_KEY_BYTES} bytes (prefix + key); not replicated")
    return out


def source_ref(bucket: str, key: str) -> str:
    return quote(f"{bucket}/{key}", safe="/")


def _stat(client: Any, bucket: str, key: str, version_id: str | None = None) -> Any | None:
    try:
        return client.stat_object(bucket, key, version_id=version_id)
    except S3Error as e:
        if e.code in NOT_FOUND:
            return None
        raise


def _tags(client: Any, bucket: str, key: str) -> Any | None:
    try:
        return client.get_object_tags(bucket, key)
    except S3Error as e:
        if e.code in NO_TAGS or e.code in NOT_FOUND:
            return None
        raise


class _Counting:
    """A read-only stream that counts (and, with `md5`, MD5-hashes) what passes through, without buffering it."""

    def __init__(self, raw: Any, md5: bool) -> None:
        self.raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        # The stored bytes: urllib3 would un-gzip a `Content-Encoding: gzip` object on the way otherwise.
        b: bytes = self.raw.read(size if size is not None and size >= 0 else None, decode_content=False)
        if self.md5 is not None:
            self.md5.update(b)
        self.n += len(b)
        return b


@dataclass(frozen=True, slots=True)
class _Source:
    """What the plugin needs to know about the source object, from a HEAD (stat) or a GET response's headers."""

    size: int | None
    etag: str
    version_id: str | None
    content_type: str
    headers: Any  # every response header: user metadata is the `x-amz-meta-*` ones
    tag_count: int | None  # `x-amz-tagging-count`; None when the server did not send it

    @classmethod
    def from_headers(cls, headers: Any) -> _Source:
        def num(name: str) -> int | None:
            try:
                return int(headers.get(name))
            except (TypeError, ValueError):
                return None

        return cls(
            size=num("content-length"),
            etag=(headers.get("etag") or "").strip('"'),
            version_id=headers.get("x-amz-version-id") or None,
            content_type=headers.get("content-type") or "application/octet-stream",
            headers=headers,
            tag_count=num("x-amz-tagging-count"),
        )

    @classmethod
    def from_stat(cls, raw: Any) -> _Source:
        """From a `stat_object` result (its `metadata` is the HEAD response's headers)."""
        h = cls.from_headers(raw.metadata or {})
        return cls(raw.size, (raw.etag or "").strip('"'), raw.version_id, raw.content_type or h.content_type,
                   h.headers, h.tag_count)


def _want_tags(s: dict[str, Any], st: _Source, from_get: bool) -> bool:
    """Whether to ask for the source's tags. S3, MinIO and SeaweedFS send `x-amz-tagging-count` on GET when an
    object has tags (SeaweedFS on HEAD too), so on a GET its absence means none; on a HEAD it proves nothing."""
    if st.tag_count is not None:
        return st.tag_count > 0
    return not (from_get and s["trust_tagging_count"])


def _is_current_replica(have: Any, st: _Source, bucket: str, key: str) -> bool:
    return (
        have is not None
        and have.size == st.size
        and meta_get(have.metadata, MARKER_ETAG) == st.etag
        and meta_get(have.metadata, MARKER) == source_ref(bucket, key)
    )


def _replica_metadata(st: _Source, bucket: str, key: str) -> dict[str, str]:
    md = user_metadata(st.headers)
    for name in KEPT_HEADERS:
        v = st.headers.get(name)
        if v:
            md[name] = v
    md[META + MARKER] = source_ref(bucket, key)
    md[META + MARKER_ETAG] = st.etag
    return md


def _executor(ctx: Context) -> ThreadPoolExecutor:
    """This process's helper pool, kept in `ctx.state` (made on first use, stopped by `worker_shutdown`): the
    target stat runs on it while the source GET is in flight. A worker child handles one event at a time, so
    one thread is busy at most; the spare ones only matter to callers that run events concurrently."""
    pool: ThreadPoolExecutor | None = ctx.state.get("pool")
    if pool is None:
        pool = ctx.state.setdefault(
            "pool", ThreadPoolExecutor(max_workers=4, thread_name_prefix="bucketwire-replication"))
    return pool


def _settle(fut: Future[Any]) -> None:
    """Wait for a look-up whose answer is no longer needed, so no request outlives the event; ignore its error."""
    with contextlib.suppress(Exception):
        fut.result()


# -- hooks ---------------------------------------------------------------------------------------------------
@hookimpl
def worker_shutdown(ctx: Context) -> None:
    """Stop the helper thread pool (if this process made one)."""
    pool = ctx.state.pop("pool", None)
    if pool is not None:
        pool.shutdown(wait=True)


TAGGING_EVENTS = ("s3:ObjectCreated:PutTagging", "s3:ObjectCreated:DeleteTagging", "s3:ObjectTagging:")
"""A tag change: MinIO names it as a creation, S3 as `s3:ObjectTagging:Put/Delete`."""

@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    """Replicate one created object (or removal, when enabled); everything else is ignored."""
    s = ctx.settings
    bucket, key = event.bucket, event.key
    tagging = event.type.startswith(TAGGING_EVENTS)
    if not (event.is_object_event or tagging) or not bucket or not key:
        return
    if s["buckets"] is not None and bucket not in s["buckets"]:
        return
    data = event.data if isinstance(event.data, dict) else {}
    if event.is_object_created and meta_get(data.get("user_metadata"), MARKER):
        return  # a replica: never replicated again (two-way replication would loop)
    if event.is_object_removed and (not s["replicate_deletes"] or event.is_lifecycle_expiration):
        return  # expirations stay on the source's side, as S3 replication keeps them
    tkey = target_key(s["prefix"], key)
    src_name = s["source_store"] or event.store
    if bucket == s["target_bucket"] and tkey == key and s["target_store"] == src_name:
        # Its own target (same store, no prefix, the target bucket watched): it was copied onto itself, a rewrite
        # of an object we did not make, marked as a replica of itself.
        ctx.log.debug("replication: %s/%s is in the target bucket; not copied onto itself", bucket, key)
        return
    src = ctx.store(src_name)
    dst = ctx.store(s["target_store"])
    tb = s["target_bucket"]
    if event.is_object_removed:
        _replicate_delete(ctx, event, src, dst, bucket, key, tb, tkey, src_name)
        return
    if tagging and _replicate_tags(ctx, src, dst, bucket, key, tb, tkey):
        return
    if s["target_store"] == src_name or src is dst:
        _copy(ctx, event, src, dst, bucket, key, tb, tkey, src_name)
    else:
        _stream(ctx, event, src, dst, bucket, key, tb, tkey, src_name)


def _copy(ctx: Context, event: Event, src: Any, dst: Any, bucket: str, key: str, tb: str, tkey: str,
          src_name: str | None) -> None:
    """Same store: server-side copy, no bytes through the worker."""
    s = ctx.settings
    raw = _stat(src, bucket, key)
    if raw is None:
        _gone(ctx, bucket, key)
        return
    st = _Source.from_stat(raw)
    if meta_get(st.headers, MARKER):
        return
    if _is_current_replica(_stat(dst, tb, tkey), st, bucket, key):
        _announce(ctx, event, "put", "already", src_name, bucket, key, st, tkey)
        return
    md = {**_replica_metadata(st, bucket, key), "Content-Type": st.content_type}
    tags = _tags(src, bucket, key) if _want_tags(s, st, from_get=False) else None
    try:
        if (st.size or 0) <= MAX_COPY:
            dst.copy_object(
                tb, tkey, CopySource(bucket, key, version_id=st.version_id),
                metadata=md, metadata_directive=REPLACE, tags=tags, tagging_directive=REPLACE if tags else None,
            )
        else:
            dst.compose_object(tb, tkey, [ComposeSource(bucket, key, version_id=st.version_id)], metadata=md,
                               tags=tags)
    except S3Error as e:
        if e.code not in NOT_FOUND:
            raise
        _gone(ctx, bucket, key)  # deleted between the stat and the copy: the copy made nothing
        return
    done = _stat(dst, tb, tkey)
    if done is None or done.size != st.size:
        raise PluginError(f"copy of {bucket}/{key} to {tb}/{tkey} has the wrong size; will retry")
    _announce(ctx, event, "put", "copy", src_name, bucket, key, st, tkey)


def _stream(ctx: Context, event: Event, src: Any, dst: Any, bucket: str, key: str, tb: str, tkey: str,
            src_name: str | None) -> None:
    """Other store: GET -> PUT in parts of `part_size`, one part in memory at a time, verified on the way.

    The GET response's headers stand in for a source stat (one consistent view of the object: metadata and
    bytes come from the same response), and the target stat for the redelivery check runs on the helper pool
    meanwhile. When the target already holds this content the GET is closed unread.
    """
    s = ctx.settings
    have_f = _executor(ctx).submit(_stat, dst, tb, tkey)
    resp = None
    try:
        try:
            resp = src.get_object(bucket, key)
        except S3Error as e:
            if e.code in NOT_FOUND:
                _gone(ctx, bucket, key)
                return
            raise
        st = _Source.from_headers(resp.headers)
        if meta_get(st.headers, MARKER):
            return
        if st.size is None:  # no Content-Length (not seen from S3 servers): take the size from a stat
            raw = _stat(src, bucket, key, st.version_id)
            if raw is None or (raw.etag or "").strip('"') != st.etag:
                raise PluginError(f"{bucket}/{key} changed while being replicated; will retry")
            st = _Source(raw.size, st.etag, st.version_id, st.content_type, st.headers, st.tag_count)
        small = st.size < s["part_size"]
        if small:
            # Read it whole (bounded by part_size, like one part of the streamed path) while the target stat
            # may still be in flight; it goes up in one PUT.
            buf = resp.read(decode_content=False)  # the stored bytes (see _Counting.read)
            if len(buf) != st.size:
                raise PluginError(f"read {len(buf)} bytes of {bucket}/{key}, expected {st.size}; will retry")
        if _is_current_replica(have_f.result(), st, bucket, key):
            _announce(ctx, event, "put", "already", src_name, bucket, key, st, tkey)
            return
        md = _replica_metadata(st, bucket, key)
        tags = _tags(src, bucket, key) if _want_tags(s, st, from_get=True) else None
        opts: dict[str, Any] = {"content_type": st.content_type, "metadata": md, "tags": tags}
        md5_of: Callable[[], str] | None
        if small:
            # Its MD5 is only computed if the target's ETag does not already prove the content (see _verify).
            n = len(buf)
            written = dst.put_object(tb, tkey, io.BytesIO(buf), n, **opts)
            md5_of = lambda: hashlib.md5(buf, usedforsecurity=False).hexdigest()  # noqa: E731
        else:
            # Hashed only when the digest is compared: with the source's plain-MD5 ETag (verify_md5), or with
            # the ETag of a single-part PUT (an object of exactly part_size). A multipart replica of a
            # multipart source is checked by size; hashing it cost a large object a tenth of its speed.
            body = _Counting(resp, md5=st.size <= s["part_size"] or (s["verify_md5"] and _plain_md5(st.etag)))
            written = dst.put_object(tb, tkey, body, st.size, part_size=s["part_size"],
                                     num_parallel_uploads=PARALLEL_PARTS, **opts)
            n = body.n
            md5_of = body.md5.hexdigest if body.md5 is not None else None
    finally:
        if resp is not None:
            resp.close()
            resp.release_conn()
        _settle(have_f)
    bad = _verify(s, dst, tb, tkey, st, n, (getattr(written, "etag", None) or "").strip('"').lower(), md5_of)
    if bad:
        with contextlib.suppress(S3Error):
            dst.remove_object(tb, tkey)
        raise PluginError(f"replica of {bucket}/{key} failed verification ({bad}); removed, will retry")
    _announce(ctx, event, "put", "stream", src_name, bucket, key, st, tkey)


def _plain_md5(etag: str) -> bool:
    """Whether an ETag is a plain MD5 of the object (not a multipart one)."""
    return PLAIN_MD5.fullmatch(etag.lower()) is not None


def _verify(s: dict[str, Any], dst: Any, tb: str, tkey: str, st: _Source, n: int, put_etag: str,
            md5_of: Callable[[], str] | None) -> str | None:
    """What is wrong with the replica just written, or None.

    A single-part PUT answers with the ETag the target computed, the MD5 of what it stored: equal to a plain
    MD5 source ETag, it proves the replica byte for byte with no further request; equal to the MD5 of the
    bytes we sent, it proves the transfer. Otherwise (a multipart upload, whose ETag is not an MD5, or a server
    whose ETags are not MD5s) a stat of the target checks the size, as the plugin always did. `md5_of` is None
    when the bytes were not hashed (nothing to compare the digest with).
    """
    if n != st.size:
        return f"read {n} bytes, expected {st.size}"
    src_md5 = st.etag.lower() if _plain_md5(st.etag) else None
    if src_md5 is not None and put_etag == src_md5:
        return None
    digest = md5_of() if md5_of is not None else None
    if digest is not None and s["verify_md5"] and src_md5 is not None and digest != src_md5:
        return f"MD5 {digest} does not match source ETag {st.etag}"
    if digest is not None and put_etag == digest:
        return None
    done = _stat(dst, tb, tkey)
    if done is None or done.size != st.size:
        return f"target holds {getattr(done, 'size', None)} bytes, expected {st.size}"
    return None


def _replicate_tags(ctx: Context, src: Any, dst: Any, bucket: str, key: str, tb: str, tkey: str) -> bool:
    """A tag change to an object whose replica is current (by its ETag): copy the tags alone; the bytes are
    there. False when the replica is missing or stale: then it is replicated whole, tags with it (a tag change
    is how some operators re-trigger an object whose replication failed)."""
    raw = _stat(src, bucket, key)
    if raw is None:
        return True  # gone since: its removal event follows
    if not _is_current_replica(_stat(dst, tb, tkey), _Source.from_stat(raw), bucket, key):
        return False
    tags = _tags(src, bucket, key)
    if tags:
        dst.set_object_tags(tb, tkey, tags)
    else:
        dst.delete_object_tags(tb, tkey)
    ctx.log.debug("replication: tags of %s/%s copied to %s/%s", bucket, key, tb, tkey)
    return True


def _gone(ctx: Context, bucket: str, key: str) -> None:
    """A source deleted before its create event was handled: no replica is made (one would outlive its source
    until the removal event came), and a retry would find nothing either. Its removal event follows."""
    ctx.log.info("replication: %s/%s skipped: deleted before its event was handled", bucket, key)


def _replicate_delete(ctx: Context, event: Event, src: Any, dst: Any, bucket: str, key: str, tb: str,
                      tkey: str, src_name: str | None) -> None:
    """Remove the replica, but only one we made of this source, and only if the source is really gone.

    A source still there (a version delete that left an older version current, a delete marker removed, a
    re-upload since) is replicated as it now is: no creation event follows those, so the replica kept a deleted
    version's bytes, or stayed deleted while the object was back. Replicating is a no-op when it is current."""
    if _stat(src, bucket, key) is not None:
        if ctx.settings["target_store"] == src_name or src is dst:
            _copy(ctx, event, src, dst, bucket, key, tb, tkey, src_name)
        else:
            _stream(ctx, event, src, dst, bucket, key, tb, tkey, src_name)
        return
    have = _stat(dst, tb, tkey)
    if have is None:
        return  # nothing to do (and no delete call, so no event to bounce back in two-way setups)
    if meta_get(have.metadata, MARKER) != source_ref(bucket, key):
        ctx.log.warning("replication: %s/%s is not a replica of %s/%s; not deleting it", tb, tkey, bucket, key)
        return
    dst.remove_object(tb, tkey)
    _announce(ctx, event, "delete", "delete", src_name, bucket, key, None, tkey)


def _announce(ctx: Context, event: Event, action: str, method: str, src_name: str | None, bucket: str,
              key: str, st: _Source | None, tkey: str) -> None:
    s = ctx.settings
    if not s["topic"]:
        return
    ctx.publish(
        s["topic"],
        {
            "action": action,
            "method": method,
            "source_store": src_name,
            "source_bucket": bucket,
            "source_key": key,
            "version_id": getattr(st, "version_id", None) or "",
            "etag": st.etag if st else "",
            "size": getattr(st, "size", None),
            "store": s["target_store"],
            "bucket": s["target_bucket"],
            "key": tkey,
        },
        type=f"bucketwire.object.replicated.{action}",
        subject=tkey,
    )


__all__ = ["PLUGIN_NAME", "handle_event", "target_key", "validate_settings", "worker_shutdown"]
