"""bucketwire replication plugin: copy created objects (and optionally removals) to a second store/bucket.

Configured in `[plugins.replication]` (see docs/plugins.md). Per created object:

1. skip replicas (marker metadata on the event or on the source object): two buckets replicating into each
   other must not ping-pong;
2. stat the source (gone -> nothing to do; its removal event follows) and the target (same content already
   there -> done: redeliveries are cheap);
3. same store -> server-side `copy_object` (no bytes through the worker); different stores -> stream
   `get_object` into `put_object` with a fixed part size and one upload thread, so memory stays at about one
   part whatever the object size; the bytes are counted and MD5-hashed on the way through;
4. check size (and MD5 when the source ETag is a plain MD5); a mismatch removes the bad replica and raises so
   the runtime retries;
5. publish `object-replicated`.

An unreachable target raises the client's ordinary exception: the runtime retries with backoff, then
dead-letters. Keys that could escape the target prefix on path-normalising servers raise `PermanentError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any
from urllib.parse import quote

from minio.commonconfig import REPLACE, ComposeSource, CopySource
from minio.error import S3Error

from bucketwire import ConfigError, Context, Event, PermanentError, PluginError, hookimpl

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

DEFAULTS: dict[str, Any] = {
    "source_store": None,
    "target_store": None,
    "target_bucket": None,
    "prefix": "",
    "buckets": None,
    "replicate_deletes": False,
    "part_size": 8 << 20,
    "verify_md5": True,
    "topic": "object-replicated",
}


@hookimpl
def validate_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """`target_store` and `target_bucket` are required; the rest have defaults (see docs/plugins.md)."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f"{k}: unknown setting; known: {', '.join(sorted(DEFAULTS))}")
    s = {**DEFAULTS, **settings}
    for k in ("target_store", "target_bucket"):
        if not isinstance(s[k], str) or not s[k]:
            raise ConfigError(f'{k}: required; e.g. {k} = "{"backup" if k == "target_store" else "photos-replica"}"')
    if s["source_store"] is not None and (not isinstance(s["source_store"], str) or not s["source_store"]):
        raise ConfigError(f"source_store: expected a store name, got {s['source_store']!r}")
    p = s["prefix"]
    if not isinstance(p, str) or "\x00" in p or p.startswith("/") or ".." in p.split("/"):
        raise ConfigError(f'prefix: expected a key prefix such as "replica/" (no leading "/" or ".."), got {p!r}')
    b = s["buckets"]
    if b is not None and (not isinstance(b, list) or not all(isinstance(x, str) and x for x in b)):
        raise ConfigError(f'buckets: expected a list of source bucket names, e.g. ["photos"]; got {b!r}')
    for k in ("replicate_deletes", "verify_md5"):
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
    """A read-only stream that counts and MD5-hashes what passes through, without buffering it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        b = self.raw.read(size if size is not None and size >= 0 else None)
        self.md5.update(b)
        self.n += len(b)
        return b


# -- hooks ---------------------------------------------------------------------------------------------------
@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    """Replicate one created object (or removal, when enabled); everything else is ignored."""
    s = ctx.settings
    if not (event.is_object_created or event.is_object_removed):
        return
    bucket, key = event.bucket, event.key
    if not bucket or not key:
        return
    if s["buckets"] is not None and bucket not in s["buckets"]:
        return
    data = event.data if isinstance(event.data, dict) else {}
    if event.is_object_created and meta_get(data.get("user_metadata"), MARKER):
        return  # a replica: never replicated again (two-way replication would loop)
    if event.is_object_removed and not s["replicate_deletes"]:
        return
    tkey = target_key(s["prefix"], key)
    src_name = s["source_store"] or event.store
    src = ctx.store(src_name)
    dst = ctx.store(s["target_store"])
    tb = s["target_bucket"]
    if event.is_object_removed:
        _replicate_delete(ctx, event, src, dst, bucket, key, tb, tkey, src_name)
        return

    st = _stat(src, bucket, key)
    if st is None:
        return  # deleted since the event; the removal event follows
    if meta_get(st.metadata, MARKER):
        return
    etag = (st.etag or "").strip('"')
    have = _stat(dst, tb, tkey)
    if (
        have is not None
        and have.size == st.size
        and meta_get(have.metadata, MARKER_ETAG) == etag
        and meta_get(have.metadata, MARKER) == source_ref(bucket, key)
    ):
        _announce(ctx, event, "put", "already", src_name, bucket, key, etag, st, tkey)
        return

    md = user_metadata(st.metadata)
    md[META + MARKER] = source_ref(bucket, key)
    md[META + MARKER_ETAG] = etag
    ctype = st.content_type or "application/octet-stream"
    tags = _tags(src, bucket, key)
    same_store = (s["target_store"] == src_name) or (src is dst)
    if same_store:
        method = "copy"
        if (st.size or 0) <= MAX_COPY:
            dst.copy_object(
                tb, tkey, CopySource(bucket, key, version_id=st.version_id),
                metadata={**md, "Content-Type": ctype}, metadata_directive=REPLACE,
                tags=tags, tagging_directive=REPLACE if tags else None,
            )
        else:
            dst.compose_object(
                tb, tkey, [ComposeSource(bucket, key, version_id=st.version_id)],
                metadata={**md, "Content-Type": ctype}, tags=tags,
            )
        done = _stat(dst, tb, tkey)
        if done is None or done.size != st.size:
            raise PluginError(f"copy of {bucket}/{key} to {tb}/{tkey} has the wrong size; will retry")
    else:
        method = "stream"
        _stream(s, src, dst, bucket, key, st, etag, tb, tkey, ctype, md, tags)
    _announce(ctx, event, "put", method, src_name, bucket, key, etag, st, tkey)


def _stream(s: dict[str, Any], src: Any, dst: Any, bucket: str, key: str, st: Any, etag: str, tb: str,
            tkey: str, ctype: str, md: dict[str, str], tags: Any) -> None:
    """GET -> PUT in parts of `part_size`, one part in memory at a time, verified on the way through."""
    resp = src.get_object(bucket, key, version_id=st.version_id)
    try:
        got = (resp.headers.get("etag") or "").strip('"')
        if got and etag and got != etag:
            raise PluginError(f"{bucket}/{key} changed while being replicated; will retry")
        body = _Counting(resp)
        dst.put_object(
            tb, tkey, body, st.size, content_type=ctype, metadata=md, tags=tags,
            part_size=s["part_size"], num_parallel_uploads=1,
        )
    finally:
        resp.close()
        resp.release_conn()
    bad = None
    if body.n != st.size:
        bad = f"read {body.n} bytes, expected {st.size}"
    elif s["verify_md5"] and PLAIN_MD5.fullmatch(etag) and body.md5.hexdigest() != etag:
        bad = f"MD5 {body.md5.hexdigest()} does not match source ETag {etag}"
    if bad is None:
        done = _stat(dst, tb, tkey)
        if done is None or done.size != st.size:
            bad = f"target holds {getattr(done, 'size', None)} bytes, expected {st.size}"
    if bad:
        with contextlib.suppress(S3Error):
            dst.remove_object(tb, tkey)
        raise PluginError(f"replica of {bucket}/{key} failed verification ({bad}); removed, will retry")


def _replicate_delete(ctx: Context, event: Event, src: Any, dst: Any, bucket: str, key: str, tb: str,
                      tkey: str, src_name: str | None) -> None:
    """Remove the replica, but only one we made of this source, and only if the source is really gone."""
    if _stat(src, bucket, key) is not None:
        return  # a version delete, or re-created since: the object still exists
    have = _stat(dst, tb, tkey)
    if have is None:
        return  # nothing to do (and no delete call, so no event to bounce back in two-way setups)
    if meta_get(have.metadata, MARKER) != source_ref(bucket, key):
        ctx.log.warning("replication: %s/%s is not a replica of %s/%s; not deleting it", tb, tkey, bucket, key)
        return
    dst.remove_object(tb, tkey)
    _announce(ctx, event, "delete", "delete", src_name, bucket, key, "", None, tkey)


def _announce(ctx: Context, event: Event, action: str, method: str, src_name: str | None, bucket: str,
              key: str, etag: str, st: Any, tkey: str) -> None:
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
            "etag": etag,
            "size": getattr(st, "size", None),
            "store": s["target_store"],
            "bucket": s["target_bucket"],
            "key": tkey,
        },
        type=f"bucketwire.object.replicated.{action}",
        subject=tkey,
    )


__all__ = ["PLUGIN_NAME", "handle_event", "target_key", "validate_settings"]
