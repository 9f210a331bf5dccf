"""bucketwire thumbnail plugin: one thumbnail per configured size for every image object that is created.

Configured in `[plugins.thumbnail]` (see docs/plugins.md). The work per event:

* created object -> skip our own output (marker metadata, output key pattern, hop limit) -> if every
  thumbnail already exists for this source ETag, do nothing but re-announce them (a redelivery) -> read the
  object through `ctx.store()` (bounded by `max_bytes`) -> decode once, render all sizes (`imaging.render`)
  -> put each with metadata naming its source -> publish `thumbnail-ready` per thumbnail.
* removed object -> delete the thumbnails we made of it (unless the source exists again).
* created object that makes no thumbnail (not an image, empty, broken, too large) -> delete the thumbnails we
  made of its earlier bytes: an overwrite sends no removal event.

Corrupt, truncated and oversized images raise `bucketwire.PermanentError`: retrying cannot fix them, so they
go straight to the dead-letter topic with the reason, and the worker carries on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote

from minio.error import S3Error
from PIL import Image

from bucketwire import ConfigError, Context, Event, PermanentError, hookimpl, string_list, with_defaults

from .imaging import (
    FORMATS,
    INPUT_FORMATS,
    Thumb,
    ThumbnailError,
    content_type,
    extension,
    looks_like_image,
    render,
)

PLUGIN_NAME = "thumbnail"
MARKER = "bucketwire-generated"
MARKER_VALUE = "thumbnail"
META = "x-amz-meta-"
MAX_KEY_BYTES = 1024
NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchVersion", "ResourceNotFound"}
OCTET = {"", "application/octet-stream", "binary/octet-stream"}

DEFAULTS: dict[str, Any] = {
    "store": None,
    "output_store": None,
    "sizes": [256],
    "output_bucket": None,
    "key_template": "{size}/{key}.{ext}",  # named by what it is: 512/demo/sunset.jpg.webp
    "format": "webp",
    "quality": 80,
    "buckets": None,
    "delete_with_source": True,
    "max_pixels": 100_000_000,
    "max_bytes": 64 << 20,
    "max_hops": 3,
    "topic": "thumbnail-ready",
    "background": "#ffffff",
    "input_formats": [f.lower() for f in INPUT_FORMATS],
}
PLACEHOLDERS = {"size", "key", "stem", "ext", "bucket"}


# -- settings ------------------------------------------------------------------------------------------------
def _opt_str(s: dict[str, Any], key: str) -> None:
    v = s[key]
    if v is not None and (not isinstance(v, str) or not v):
        raise ConfigError(f'{key}: expected a non-empty string, got {v!r}; e.g. {key} = "primary"')


def _pos_int(s: dict[str, Any], key: str, hi: int | None = None) -> None:
    v = s[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or (hi is not None and v > hi):
        rng = f"1..{hi}" if hi else "> 0"
        raise ConfigError(f"{key}: expected an integer in {rng}, got {v!r}")


def _parse_colour(v: Any) -> tuple[int, int, int]:
    if isinstance(v, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", v):
        return int(v[1:3], 16), int(v[3:5], 16), int(v[5:7], 16)
    raise ConfigError(f'background: expected a colour like "#ffffff", got {v!r}')


@hookimpl
def validate_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Fill in defaults and reject bad values with one line naming the key, before any event is taken."""
    s = with_defaults(settings, DEFAULTS)
    for k in ("store", "output_store", "output_bucket"):
        _opt_str(s, k)
    sizes = s["sizes"]
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        sizes = [sizes]
    if (
        not isinstance(sizes, list)
        or not sizes
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 16384 for x in sizes)
    ):
        raise ConfigError(
            f"sizes: expected a list of integers 1..16384 (longest edge), e.g. [256, 1024]; got {sizes!r}"
        )
    s["sizes"] = sorted(set(sizes), reverse=True)
    fmt = s["format"]
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(sorted(FORMATS))}; got {fmt!r}")
    s["format"] = fmt.lower()
    _pos_int(s, "quality", 100)
    _pos_int(s, "max_pixels")
    _pos_int(s, "max_bytes")
    v = s["max_hops"]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"max_hops: expected an integer >= 0, got {v!r}")
    if not isinstance(s["delete_with_source"], bool):
        raise ConfigError(f"delete_with_source: expected true or false, got {s['delete_with_source']!r}")
    if s["buckets"] is not None:
        s["buckets"] = string_list(s["buckets"], "buckets", "bucket names")
    t = s["topic"]
    if t is not None and t is not False and (not isinstance(t, str) or not t):
        raise ConfigError(f'topic: expected a topic name (or false to publish nothing); got {t!r}')
    s["topic"] = t or None
    s["background_rgb"] = list(_parse_colour(s["background"]))
    s["input_formats"] = _input_formats(s["input_formats"])
    tpl = s["key_template"]
    if not isinstance(tpl, str) or not tpl:
        raise ConfigError('key_template: expected a string such as "{size}/{key}.{ext}"')
    names = set(re.findall(r"{(\w*)}", tpl))
    bad = names - PLACEHOLDERS
    if bad or "{}" in tpl:
        first = sorted(bad or {""})[0]
        raise ConfigError(f"key_template: unknown placeholder {{{first}}}; use {sorted(PLACEHOLDERS)}")
    if not names & {"key", "stem"}:
        raise ConfigError(
            "key_template: must contain {key} or {stem}, or every source would overwrite one thumbnail"
        )
    if len(s["sizes"]) > 1 and "size" not in names:
        raise ConfigError("key_template: must contain {size} when several sizes are configured")
    if tpl.startswith("/") or ".." in tpl.split("/"):
        raise ConfigError("key_template: must not start with '/' or contain '..' segments")
    if tpl in ("{key}", "{stem}") and s["output_bucket"] is None and s["output_store"] in (None, s["store"]):
        raise ConfigError(
            f'key_template: "{tpl}" with no output_bucket writes each thumbnail over its source (the picture itself '
            'replaced); set output_bucket, or keep thumbnails apart with e.g. "thumbs/{key}.{ext}"'
        )
    # Our own check (header dimensions before decoding) is the limit; keep Pillow's global guard from
    # rejecting images that the configured max_pixels allows. Only ever raised, never lowered.
    if Image.MAX_IMAGE_PIXELS is not None and s["max_pixels"] > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = s["max_pixels"]
    return s


def _input_formats(v: Any) -> list[str]:
    Image.init()
    v = string_list(v, "input_formats", "image formats", "png")
    unknown = [x for x in v if x.upper() not in Image.OPEN]
    if unknown:
        raise ConfigError(
            f"input_formats: {unknown[0]!r} is not a format Pillow can read; use some of "
            f"{', '.join(sorted(f.lower() for f in Image.OPEN))}"
        )
    return sorted({x.upper() for x in v})


@functools.lru_cache(maxsize=64)
def _template_regex(tpl: str, sizes: tuple[int, ...], ext: str) -> re.Pattern[str]:
    """A regex matching every key the template can produce: the 'output prefix' recursion guard."""
    out, pos = [], 0
    for m in re.finditer(r"{(\w+)}", tpl):
        out.append(re.escape(tpl[pos : m.start()]))
        name = m.group(1)
        if name == "size":
            out.append("(?:" + "|".join(str(x) for x in sizes) + ")")
        elif name == "ext":
            out.append(re.escape(ext))
        else:
            out.append(".+" if name in ("key", "stem") else "[^/]+")
        pos = m.end()
    out.append(re.escape(tpl[pos:]))
    return re.compile("".join(out), re.DOTALL)


# -- helpers -------------------------------------------------------------------------------------------------
def meta_get(metadata: Any, name: str) -> str | None:
    """Case-insensitive user-metadata lookup that accepts `x-amz-meta-NAME` or bare `NAME` keys.

    Event records (MinIO: `X-Amz-Meta-Foo`), stat results (`x-amz-meta-foo`) and hand-made events differ.
    """
    if not metadata:
        return None
    want = name.lower()
    for k, v in metadata.items():
        lk = str(k).lower()
        if lk == want or lk == META + want:
            return v if isinstance(v, str) else str(v)
    return None


def is_generated(metadata: Any) -> bool:
    return meta_get(metadata, MARKER) == MARKER_VALUE


def output_key(tpl: str, size: int, bucket: str, key: str, ext: str) -> str:
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return tpl.format(size=size, key=key, stem=stem, ext=ext, bucket=bucket)


def check_key(key: str) -> None:
    """Reject keys that S3 servers normalising paths (filer-backed ones do) could resolve elsewhere."""
    if "\x00" in key:
        raise PermanentError("object key contains a NUL byte; refusing to derive a thumbnail key from it")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise PermanentError(
            f"thumbnail key would be longer than {MAX_KEY_BYTES} bytes; shorten the source key"
        )
    parts = key.split("/")
    if key.startswith("/") or ".." in parts or "." in parts:
        raise PermanentError(
            f"object key {key[:200]!r} has '.'/'..' segments or a leading '/'; not thumbnailed"
        )


def _is_not_found(e: S3Error) -> bool:
    return e.code in NOT_FOUND


def _stat(client: Any, bucket: str, key: str) -> Any | None:
    try:
        return client.stat_object(bucket, key)
    except S3Error as e:
        if _is_not_found(e):
            return None
        raise


def _ready_data(s: dict[str, Any], ev: Event, out_bucket: str, key: str, size: int, w: int, h: int,
                nbytes: int, etag: str) -> dict[str, Any]:
    return {
        "source_store": s["store"] or ev.store,
        "source_bucket": ev.bucket,
        "source_key": ev.key,
        "source_etag": etag,
        "store": s["output_store"] or s["store"] or ev.store,
        "bucket": out_bucket,
        "key": key,
        "size": size,
        "width": w,
        "height": h,
        "bytes": nbytes,
        "format": s["format"],
        "content_type": content_type(s["format"]),
    }


def _stats(client: Any, out_bucket: str, keys: dict[int, str]) -> dict[int, Any | None]:
    """The stat of each output key (None: no object there): one HEAD per size, read by every check before a put."""
    return {size: _stat(client, out_bucket, k) for size, k in keys.items()}


def _existing(stats: dict[int, Any | None], bucket: str, key: str, etag: str, ctype: str) -> dict[int, Any] | None:
    """Stat results of all outputs when every one was made from this exact source ETag, else None."""
    found: dict[int, Any] = {}
    for size, st in stats.items():
        md = st.metadata if st is not None else None
        if (
            st is None
            or not _made_from(md, bucket, key)
            or meta_get(md, "bucketwire-source-etag") != etag
            or (st.content_type or "").split(";")[0] != ctype
        ):
            return None
        found[size] = st
    return found


# -- hooks ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Job:
    """An object event this plugin acts on, with the names each step needs."""

    bucket: str
    key: str
    out_bucket: str
    keys: dict[int, str]  # thumbnail size -> output key
    data: dict[str, Any]


@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    """Make (or delete) thumbnails for one object event; other events are ignored."""
    s = ctx.settings
    job = _job(event, ctx)
    if job is None:
        return
    src = ctx.store(s["store"])
    dst = ctx.store(s["output_store"] or s["store"])
    if event.is_object_removed:
        now = _stat(src, job.bucket, job.key)
        if now is not None:
            # Still there: a version delete left an older version current, a delete marker was removed, or it was
            # uploaded again. No creation event follows the first two, so the thumbnails kept showing the
            # deleted version, or stayed gone. Made current from what the object holds now (a no-op if they are).
            current = {"etag": now.etag or "", "size": now.size or 0, "content_type": now.content_type or ""}
            _make(event, ctx, replace(job, data={**job.data, **current}), src, dst)
        elif s["delete_with_source"]:
            _delete_thumbnails(ctx, dst, job.bucket, job.key, job.out_bucket, job.keys)
        return
    _make(event, ctx, job, src, dst)


def _job(event: Event, ctx: Context) -> _Job | None:
    """Whether this event is ours: an object event in a watched bucket, within the hop limit, and not one of
    our own outputs (which would otherwise be thumbnailed again, forever)."""
    s = ctx.settings
    bucket, key = event.bucket, event.key
    if not event.is_object_event or not bucket or not key:
        return None
    if s["buckets"] is not None and bucket not in s["buckets"]:
        return None
    if event.hops > s["max_hops"]:
        ctx.log.warning("thumbnail: %s/%s skipped: hop limit %d exceeded", bucket, key, s["max_hops"])
        return None
    data = event.data if isinstance(event.data, dict) else {}
    out_bucket: str = s["output_bucket"] or bucket
    ext = extension(s["format"])
    if out_bucket == bucket and _template_regex(s["key_template"], tuple(s["sizes"]), ext).fullmatch(key):
        ctx.log.debug("thumbnail: %s/%s is in the output key space (our own output); skipped", bucket, key)
        return None
    if is_generated(data.get("user_metadata")):
        return None
    keys = {size: output_key(s["key_template"], size, bucket, key, ext) for size in s["sizes"]}
    return _Job(bucket, key, out_bucket, keys, data)


def _make(event: Event, ctx: Context, job: _Job, src: Any, dst: Any) -> None:
    """Thumbnails for a created object: skipped when they exist for its ETag already (a redelivery), refused
    permanently when the object is too large or not an image."""
    s = ctx.settings
    bucket, key, out_bucket, keys, data = job.bucket, job.key, job.out_bucket, job.keys, job.data
    for k in keys.values():
        check_key(k)
    ctype = (data.get("content_type") or "").split(";")[0].strip().lower()
    if ctype not in OCTET and not ctype.startswith("image/"):
        _drop_stale(ctx, src, dst, job, None)
        return
    size = data.get("size") or 0
    if isinstance(size, int) and size > s["max_bytes"]:
        _drop_stale(ctx, src, dst, job, None)
        raise PermanentError(
            f"{bucket}/{key} is {size} bytes, over max_bytes={s['max_bytes']}; not thumbnailed"
        )

    etag = str(data.get("etag") or "").strip('"')
    out_ctype = content_type(s["format"])
    stats = _stats(dst, out_bucket, keys)
    if etag:
        done = _existing(stats, bucket, key, etag, out_ctype)
        if done is not None:
            ctx.log.debug("thumbnail: %s/%s already has thumbnails for etag %s", bucket, key, etag)
            if {meta_get(st.metadata, "bucketwire-event") for st in done.values()} - {_made_by(event)} - {None}:
                # Made by another event for the same bytes (MinIO's s3:ObjectCreated:PutTagging/PutRetention/
                # PutLegalHold, an identical re-upload): announced then. Again, it would be new ids, so every
                # consumer of thumbnail-ready did its work once more per tag change.
                return
            # A redelivery: the work is done. Re-announce (same deterministic ids, so the hub drops repeats).
            _announce(ctx, event, out_bucket, keys, etag, {
                sz: (int(meta_get(st.metadata, "bucketwire-width") or 0),
                     int(meta_get(st.metadata, "bucketwire-height") or 0), st.size or 0)
                for sz, st in done.items()
            })
            return

    _check_owner(stats, out_bucket != bucket and "{bucket}" not in s["key_template"], out_bucket, keys, bucket,
                 key)  # before the source is read and decoded for nothing
    try:
        got = _source(ctx, src, bucket, key, ctype, s["max_bytes"])
    except PermanentError:
        _drop_stale(ctx, src, dst, job, None, stats)
        raise
    if isinstance(got, _NoImage):
        _drop_stale(ctx, src, dst, job, got.etag, stats)
        return
    if got is None:
        return
    blob, headers = got
    real_etag = (headers.get("etag") or etag).strip('"')
    if real_etag != etag and real_etag:
        # The object changed after this event; make thumbnails of what is there now, unless done already.
        done = _existing(_stats(dst, out_bucket, keys), bucket, key, real_etag, out_ctype)
        if done is not None:
            return
    try:
        thumbs = render(
            blob, s["sizes"], format=s["format"], quality=s["quality"], max_pixels=s["max_pixels"],
            background=tuple(s["background_rgb"]), input_formats=s["input_formats"],
        )
    except ThumbnailError as e:
        _drop_stale(ctx, src, dst, job, real_etag or None, stats)
        raise PermanentError(f"{bucket}/{key}: {e}") from None
    info: dict[int, tuple[int, int, int]] = {}
    for t in thumbs:
        _put(dst, out_bucket, keys[t.size], t, bucket, key, real_etag, out_ctype, _made_by(event))
        info[t.size] = (t.width, t.height, len(t.data))
    _announce(ctx, event, out_bucket, keys, real_etag, info)


def _check_owner(stats: dict[int, Any | None], shared: bool, out_bucket: str, keys: dict[int, str], bucket: str,
                 key: str) -> None:
    """Refuse to replace an object that is not a thumbnail: a thumbnail key must never land on someone's own
    object (`{stem}.{ext}` in the source bucket made photo.png's JPEG thumbnail photo.jpg, over the user's
    photo.jpg). With `shared` (an output_bucket other than the source's, a key_template without {bucket}), not on
    the thumbnail another source bucket owns either: one bucket's picture was served as the other's. (In the
    source's own bucket a thumbnail of another bucket's object is a copy, e.g. a replica of the bucket: replaced.)"""
    for size, st in stats.items():
        if st is None:
            continue
        k = keys[size]
        if not is_generated(st.metadata):
            raise PermanentError(
                f"{bucket}/{key}: {out_bucket}/{k} exists and is not a thumbnail (no {MARKER} metadata), so it is "
                "not replaced; choose a key_template or output_bucket where thumbnails do not land on other objects"
            )
        owner = meta_get(st.metadata, "bucketwire-source-bucket")
        if shared and owner and owner != quote(bucket, safe=""):
            raise PermanentError(
                f"{bucket}/{key}: {out_bucket}/{k} is the thumbnail of {unquote(owner)}/{key}; source buckets "
                'share output_bucket, so put {bucket} in key_template (e.g. "{size}/{bucket}/{key}.{ext}")'
            )


@dataclass(frozen=True, slots=True)
class _NoImage:
    """The source holds no image to thumbnail (not one by its first bytes, or empty): its ETag, from the GET."""

    etag: str


def _source(ctx: Context, src: Any, bucket: str, key: str, ctype: str,
            max_bytes: int) -> tuple[bytes, Mapping[str, str]] | _NoImage | None:
    """The source object's bytes and headers; `_NoImage` when the object is not an image after all (an
    octet-stream whose first bytes say so) or is empty; None when there is nothing to do: it is gone, or it is
    our own output."""
    if ctype in OCTET:
        head = _read(src, bucket, key, max_bytes, length=16)
        if head is None:
            _gone(ctx, bucket, key)
            return None
        if not looks_like_image(head[0]):
            return _NoImage(_etag(head[1]))
    got = _read(src, bucket, key, max_bytes)
    if got is None:
        _gone(ctx, bucket, key)
        return None
    blob, headers = got
    if is_generated(headers):
        return None
    if not blob:
        # A `touch`, a folder marker, an upload without a body: nothing to decode, and nothing a retry changes.
        ctx.log.debug("thumbnail: %s/%s is empty; skipped", bucket, key)
        return _NoImage(_etag(headers))
    return blob, headers


def _etag(headers: Any) -> str:
    return str((headers or {}).get("etag") or "").strip('"')


def _drop_stale(ctx: Context, src: Any, dst: Any, job: _Job, etag: str | None,
                stats: dict[int, Any | None] | None = None) -> None:
    """Remove this source's thumbnails made from other bytes than it now holds (`etag`; None: stat it), when
    an event for it makes none: a photo overwritten by a document, an empty object, a broken image or one over
    max_bytes. No removal event comes for an overwrite, so they showed the old picture under the key for good.
    Thumbnails of the current bytes stay (a late redelivery of an older event must not remove them), and so do
    other sources' (the same key in another bucket sharing output_bucket). Follows `delete_with_source`.
    `stats`: the output keys' stats `_make` already read for this event (None: read them here)."""
    if not ctx.settings["delete_with_source"]:
        return
    bucket, key = job.bucket, job.key
    if stats is None:
        stats = _stats(dst, job.out_bucket, job.keys)
    stale: list[tuple[str, str | None]] = []
    for size, st in stats.items():
        if st is not None and _made_from(st.metadata, bucket, key):
            stale.append((job.keys[size], meta_get(st.metadata, "bucketwire-source-etag")))
    if not stale:
        return  # the usual case for a non-image upload: one stat per size, nothing else
    if etag is None:
        now = _stat(src, bucket, key)
        if now is None:
            return  # gone: its removal event deletes them
        etag = str(now.etag or "").strip('"')
    for k, made_from in stale:
        if made_from != etag:
            dst.remove_object(job.out_bucket, k)
            ctx.log.info("thumbnail: removed %s/%s: %s/%s no longer holds the image it was made from",
                         job.out_bucket, k, bucket, key)


def _made_from(metadata: Any, bucket: str, key: str) -> bool:
    """Whether an object is a thumbnail we generated of source bucket/key."""
    return (
        is_generated(metadata)
        and meta_get(metadata, "bucketwire-source-key") == quote(key, safe="/")
        and meta_get(metadata, "bucketwire-source-bucket") == quote(bucket, safe="")
    )


def _announce(ctx: Context, event: Event, out_bucket: str, keys: dict[int, str], etag: str,
              info: dict[int, tuple[int, int, int]]) -> None:
    s = ctx.settings
    if not s["topic"]:
        return
    for size in s["sizes"]:
        w, h, n = info[size]
        ctx.publish(
            s["topic"], _ready_data(s, event, out_bucket, keys[size], size, w, h, n, etag),
            type="bucketwire.thumbnail.ready", subject=keys[size],
        )


def _gone(ctx: Context, bucket: str, key: str) -> None:
    """An object deleted before its event was handled: nothing to make, and a retry would find nothing either.

    Its removal event follows (and deletes any thumbnails), so this is worth one line, not an error.
    """
    ctx.log.info("thumbnail: %s/%s skipped: deleted before its event was handled", bucket, key)


def _read(client: Any, bucket: str, key: str, max_bytes: int,
          length: int = 0) -> tuple[bytes, Any] | None:
    """GET the object (or its first `length` bytes), refusing more than `max_bytes`; None if it is gone.

    A ranged GET of an empty object is answered 416 (`InvalidRange`): that is an empty read, not a failure.
    """
    try:
        resp = client.get_object(bucket, key, length=length) if length else client.get_object(bucket, key)
    except S3Error as e:
        if _is_not_found(e):
            return None
        if length and e.code == "InvalidRange":
            return b"", {}
        raise
    try:
        declared = resp.headers.get("content-length")
        if not length and declared and declared.isdigit() and int(declared) > max_bytes:
            raise PermanentError(
                f"{bucket}/{key} is {declared} bytes, over max_bytes={max_bytes}; not thumbnailed"
            )
        blob = resp.read(max_bytes + 1) if not length else resp.read()
        if len(blob) > max_bytes:
            raise PermanentError(f"{bucket}/{key} is over max_bytes={max_bytes}; not thumbnailed")
        return blob, resp.headers
    finally:
        resp.close()
        resp.release_conn()


def _made_by(event: Event) -> str:
    """The event a thumbnail was made by, as kept on it: a hash, since ids are the publisher's (any length)."""
    return hashlib.sha256(event.id.encode()).hexdigest()[:32]


def _put(client: Any, out_bucket: str, out_key: str, t: Thumb, bucket: str, key: str, etag: str,
         ctype: str, made_by: str) -> None:
    metadata = {
        META + "bucketwire-event": made_by,
        META + MARKER: MARKER_VALUE,
        META + "bucketwire-source-bucket": quote(bucket, safe=""),
        META + "bucketwire-source-key": quote(key, safe="/"),
        META + "bucketwire-source-etag": etag,
        META + "bucketwire-width": str(t.width),
        META + "bucketwire-height": str(t.height),
        META + "bucketwire-size": str(t.size),
    }
    client.put_object(
        out_bucket, out_key, io.BytesIO(t.data), len(t.data), content_type=ctype, metadata=metadata
    )


def _delete_thumbnails(ctx: Context, dst: Any, bucket: str, key: str, out_bucket: str,
                       keys: dict[int, str]) -> None:
    """Remove the thumbnails of a removed source (gone: checked by the caller), but only ones we generated from
    that source."""
    for k in keys.values():
        try:
            check_key(k)
        except PermanentError:
            return
        st = _stat(dst, out_bucket, k)
        if st is None or not _made_from(st.metadata, bucket, key):
            continue  # not ours, or made from another source (the same key in another bucket sharing output_bucket)
        dst.remove_object(out_bucket, k)
        ctx.log.debug("thumbnail: removed %s/%s (source %s/%s deleted)", out_bucket, k, bucket, key)


__all__ = ["PLUGIN_NAME", "Thumb", "ThumbnailError", "handle_event", "render", "validate_settings"]
