"""SeaweedFS filer events into the same envelopes MinIO events become.

SeaweedFS does not send S3 event records. Its filer reports file-system changes, in two shapes that carry the
same `filer_pb.EventNotification`:

* the filer webhook (`[notification.webhook]` in notification.toml) POSTs one change per request as
  `{"key": "/buckets/b/k", "event_type": "create|update|delete|rename", "message": {...}}`, where `message`
  is the protobuf struct marshalled with Go's encoding/json: snake_case names, int64 as JSON numbers, bytes
  base64, empty fields omitted, and no timestamp at all;
* `weed filer.meta.tail` prints protojson: `{"directory", "eventNotification": {...}, "tsNs": "..."}` with
  camelCase names and int64 as strings.

Both are read here through one accessor that accepts either spelling, so the webhook and the durable
meta-tail source (bucketwire.sources.seaweed_meta) produce the *same* event id for the same change and the
hub's (source, id) de-duplication makes running both harmless. Because the webhook body has no timestamp, the
id is built from the entry itself (inode, size, md5/ETag, mtime and the newest chunk's write time) plus the
path and the kind of change: an overwrite writes new chunks, so it gets a new id; a redelivery does not.

Only objects matter: SeaweedFS keeps S3 buckets under `/buckets/<bucket>/`, and also writes directories,
bucket entries, `.system` bookkeeping and multipart part files under `.uploads/` there. Those yield no events.
A completed multipart upload appears as one new entry carrying `X-Seaweedfs-Upload-Id` and a `-N` ETag. In a
versioned bucket each version is a file under `<key>.versions/`: reported as the object's own events (see
`_version_of`), since S3 readers never see those paths.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bucketwire.envelope import NESTING_REFUSAL, Event, now_iso, ordered_id, shown, shown_value
from bucketwire.formats.s3_records import RecordError

BUCKETS_ROOT = "/buckets/"
MAX_EVENTS_PER_BODY = 1000
INTERNAL_TOP_DIRS = frozenset({".uploads"})
"""Top-level directories inside a bucket that SeaweedFS's S3 gateway uses for itself."""

PUT = "s3:ObjectCreated:Put"
MULTIPART = "s3:ObjectCreated:CompleteMultipartUpload"
DELETE = "s3:ObjectRemoved:Delete"
DELETE_MARKER = "s3:ObjectRemoved:DeleteMarkerCreated"

VERSIONS_SUFFIX = ".versions"
"""In a versioned bucket SeaweedFS keeps each version of `k` as a file `k.versions/v_<id>` (a delete marker is one
more such file, with `Seaweed-X-Amz-Delete-Marker`), and the directory's attributes say which is the latest."""

EVENT_TYPES = frozenset({"create", "update", "delete", "rename"})


def _get(d: Mapping[str, Any], snake: str) -> Any:
    """Field `snake` in either encoding/json (snake_case) or protojson (camelCase) spelling."""
    if snake in d:
        return d[snake]
    head, *rest = snake.split("_")
    camel = head + "".join(p[:1].upper() + p[1:] for p in rest)
    return d.get(camel)


def _int(v: Any, where: str) -> int:
    """protojson writes int64 as strings, encoding/json as numbers; accept both, refuse anything else."""
    if v is None or v == "":
        return 0
    if isinstance(v, bool):
        raise RecordError(f"{where} must be an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            pass
    raise RecordError(f"{where} must be an integer")


def _entry(msg: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    e = _get(msg, name)
    if e is None:
        return None
    if not isinstance(e, dict):
        raise RecordError(f"message.{name} must be an object")
    n = e.get("name")
    if not isinstance(n, str) or not n or "/" in n or "\x00" in n:
        raise RecordError(f"message.{name}.name must be a non-empty file name")
    for k in ("attributes", "extended"):
        if e.get(k) is not None and not isinstance(e[k], dict):
            raise RecordError(f"message.{name}.{k} must be an object")
    if e.get("chunks") is not None and not isinstance(e["chunks"], list):
        raise RecordError(f"message.{name}.chunks must be an array")
    return e


def _attrs(e: Mapping[str, Any]) -> dict[str, Any]:
    return e.get("attributes") or {}


def _extended(e: Mapping[str, Any], where: str) -> dict[str, bytes]:
    """Extended attributes; bytes values are base64 in both JSON encodings."""
    out: dict[str, bytes] = {}
    for k, v in (e.get("extended") or {}).items():
        if not isinstance(v, str):
            raise RecordError(f"{where}.extended[{shown(k)}] must be a base64 string")
        try:
            out[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(f"{where}.extended[{shown(k)}] is not valid base64") from None
    return out


def _text(b: bytes | None) -> str:
    return b.decode("utf-8", "replace") if b else ""


def _b64hex(v: Any) -> str:
    if not isinstance(v, str) or not v:
        return ""
    try:
        return base64.b64decode(v, validate=True).hex()
    except (binascii.Error, ValueError):
        return ""


def _chunks(e: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in (e.get("chunks") or []) if isinstance(c, dict)]


def etag_of(e: Mapping[str, Any], ext: Mapping[str, bytes]) -> str:
    """The S3 ETag SeaweedFS would return: its stored one, else the content MD5, else a single chunk's."""
    stored = _text(ext.get("Seaweed-X-Amz-ETag")).strip('"')
    if stored:
        return stored
    md5 = _b64hex(_attrs(e).get("md5"))
    if md5:
        return md5
    chunks = _chunks(e)
    if len(chunks) == 1:
        return _b64hex(_get(chunks[0], "e_tag"))
    return ""


def _mtime_ns(e: Mapping[str, Any], where: str) -> int:
    a = _attrs(e)
    return _int(a.get("mtime"), where + ".attributes.mtime") * 1_000_000_000 + _int(
        _get(a, "mtime_ns"), where + ".attributes.mtime_ns"
    )


def _fingerprint(e: Mapping[str, Any], ext: Mapping[str, bytes], where: str) -> tuple[object, ...]:
    """What identifies one version of an entry, identical in both JSON encodings."""
    a = _attrs(e)
    newest_chunk = max(
        (_int(_get(c, "modified_ts_ns"), where + ".chunks[].modified_ts_ns") for c in _chunks(e)), default=0
    )
    content = e.get("content") or ""
    return (
        _int(a.get("inode"), where + ".attributes.inode"),
        _int(_get(a, "file_size"), where + ".attributes.file_size"),
        etag_of(e, ext),
        _mtime_ns(e, where),
        newest_chunk,
        len(_chunks(e)),
        content if isinstance(content, str) else "",
    )


def _content(e: Mapping[str, Any], where: str) -> tuple[object, ...]:
    """The part of the fingerprint that changes only when the object's bytes change."""
    inode, size, etag, _mtime, newest, n, content = _fingerprint(e, _extended(e, where), where)
    return size, etag, newest, n, content


def split_path(path: str) -> tuple[str, str] | None:
    """`/buckets/b/k/ey` -> (`b`, `k/ey`); None for anything that is not an object inside a bucket."""
    if not path.startswith(BUCKETS_ROOT):
        return None
    rest = path[len(BUCKETS_ROOT):]
    bucket, sep, key = rest.partition("/")
    if not sep or not bucket or not key or bucket.startswith("."):
        return None
    if key.split("/", 1)[0] in INTERNAL_TOP_DIRS:
        return None
    return bucket, key


def _version_of(key: str, ext: Mapping[str, bytes]) -> str | None:
    """The object's key when `key` is one of its versions' files (`k.versions/v_<id>` carrying the version id
    SeaweedFS's S3 gateway sets), else None: an object a user named like that in a bucket without versioning has
    no version id, and stays what it is."""
    parent, _, name = key.rpartition("/")
    if not parent.endswith(VERSIONS_SUFFIX) or not name.startswith("v_") or "Seaweed-X-Amz-Version-Id" not in ext:
        return None
    return parent[: -len(VERSIONS_SUFFIX)] or None


def _iso(ns: int) -> str:
    """RFC 3339 of unix nanoseconds; the time now for one no calendar holds (an mtime a client wrote in
    milliseconds is the year 55,839), which must cost the event its time, not the event."""
    try:
        return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (ValueError, OverflowError, OSError):
        return now_iso()


def _object_event(
    kind: str,
    path: str,
    entry: Mapping[str, Any],
    *,
    where: str,
    store: str | None,
    original: Any,
    ts_ns: int | None,
    change: str,
) -> Event | None:
    """One envelope for one object path, or None if the path/entry is not an S3 object."""
    if entry.get("is_directory") or entry.get("isDirectory"):
        return None
    parts = split_path(path)
    if parts is None:
        return None
    bucket, key = parts
    ext = _extended(entry, where)
    a = _attrs(entry)
    etag = etag_of(entry, ext)
    typ = kind
    version = _version_of(key, ext)
    if version is not None:  # one version of an object in a versioned bucket: the event is the object's
        key = version
        if kind == PUT and _text(ext.get("Seaweed-X-Amz-Delete-Marker")) == "true":
            typ = kind = DELETE_MARKER
    if kind == PUT and ("X-Seaweedfs-Upload-Id" in ext or "X-Seaweedfs-Multipart-Parts-Count" in ext):
        typ = MULTIPART
    user_md = {
        k: _text(v) for k, v in ext.items() if k.lower().startswith("x-amz-meta-")
    }
    mtime_ns = _mtime_ns(entry, where)
    sequencer = f"{(ts_ns or mtime_ns):016X}"
    removal = kind in (DELETE, DELETE_MARKER)
    if kind == DELETE:
        when = _iso(ts_ns) if ts_ns else now_iso()
    else:
        when = _iso(ts_ns or mtime_ns) if (ts_ns or mtime_ns) else now_iso()
    mime = a.get("mime")
    data = {
        "bucket": bucket,
        "key": key,
        "size": 0 if removal else _int(_get(a, "file_size"), where + ".attributes.file_size"),
        "etag": "" if kind == DELETE_MARKER else etag,
        "content_type": mime if isinstance(mime, str) and not removal else "",
        "version_id": _text(ext.get("Seaweed-X-Amz-Version-Id")),
        "sequencer": sequencer,
        "user_metadata": user_md if not removal else {},
        "store": store,
        "principal": _text(ext.get("Seaweed-X-Amz-Owner")),
        "source_ip": "",
        "user_agent": "",
        "records": [original],
    }
    return Event(
        # Led by the entry's mtime (see `ordered_id`), which the webhook and meta.tail both carry; ts_ns is the
        # latter's only.
        id=ordered_id(mtime_ns // 1_000_000, "seaweedfs", change, typ, bucket, key, *_fingerprint(entry, ext, where)),
        source=f"seaweedfs:filer/{bucket}",
        type=typ,
        subject=key,
        time=when,
        data=data,
    )


def entry_to_events(
    message: Any,
    *,
    old_dir: str | None,
    store: str | None,
    original: Any,
    ts_ns: int | None = None,
) -> list[Event]:
    """One filer EventNotification -> 0, 1 or 2 envelopes.

    `old_dir` is the directory the change happened in (the webhook's `key` minus the name, or meta.tail's
    `directory`); the new entry's directory is `new_parent_path`, which differs only for a move. `ts_ns`
    is the filer's log timestamp when the source has one (meta.tail); it only feeds `time` and `sequencer`,
    never the id, so webhook and meta.tail agree on ids.
    """
    if not isinstance(message, dict):
        raise RecordError("message must be an object")
    old = _entry(message, "old_entry")
    new = _entry(message, "new_entry")
    if old is None and new is None:
        return []
    new_parent = _get(message, "new_parent_path")
    if new_parent is not None and not isinstance(new_parent, str):
        raise RecordError("message.new_parent_path must be a string")
    if old_dir is not None and (not old_dir.startswith("/") or "\x00" in old_dir):
        raise RecordError("directory must be an absolute path")
    old_path = posixpath.join(old_dir or "/", old["name"]) if old is not None else None
    new_path = None
    if new is not None:
        parent = new_parent or old_dir
        if not parent or not parent.startswith("/") or "\x00" in parent:
            raise RecordError("message.new_parent_path must be an absolute path")
        new_path = posixpath.join(parent, new["name"])

    def make(kind: str, path: str, entry: Mapping[str, Any], where: str, change: str) -> list[Event]:
        ev = _object_event(
            kind, path, entry, where=where, store=store, original=original, ts_ns=ts_ns, change=change
        )
        return [ev] if ev is not None else []

    if old is not None and new is not None and new_path is not None and old_path == new_path:
        # In-place update. Same content (size, ETag, chunks) means only attributes or tags changed: S3 would
        # not report ObjectCreated for that, so neither do we.
        if _content(old, "message.old_entry") == _content(new, "message.new_entry"):
            return []
        return make(PUT, new_path, new, "message.new_entry", "put")
    events: list[Event] = []
    if old is not None and old_path is not None:
        events += make(DELETE, old_path, old, "message.old_entry", "delete" if new is None else "move-from")
    if new is not None and new_path is not None:
        events += make(PUT, new_path, new, "message.new_entry", "put" if old is None else "move-to")
    return events


def webhook_to_events(doc: Any, *, store: str | None, index: int | None = None) -> list[Event]:
    """One decoded webhook body object (`key`, `event_type`, `message`) -> envelopes."""
    where = "body" if index is None else f"body[{index}]"
    if not isinstance(doc, dict):
        raise RecordError(f"{where} must be a JSON object with 'key' and 'message'")
    key = doc.get("key")
    if not isinstance(key, str) or not key.startswith("/") or "\x00" in key:
        raise RecordError(f"{where}.key must be an absolute filer path")
    et = doc.get("event_type")
    if et is not None and (not isinstance(et, str) or et not in EVENT_TYPES):  # a list is unhashable: fuzz find
        raise RecordError(f"{where}.event_type {shown_value(et, 100)} is not one of {sorted(EVENT_TYPES)}")
    msg = doc.get("message", doc.get("message_data"))
    if not isinstance(msg, dict):
        raise RecordError(f"{where}.message must be an object")
    # The webhook's key is the old entry's path when there is one (delete, update, rename), else the new one.
    return entry_to_events(msg, old_dir=posixpath.dirname(key) or "/", store=store, original=doc)


def meta_tail_to_events(doc: Any, *, store: str | None) -> list[Event]:
    """One `weed filer.meta.tail` JSON object (SubscribeMetadataResponse) -> envelopes."""
    if not isinstance(doc, dict):
        raise RecordError("meta.tail record must be a JSON object")
    directory = doc.get("directory")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise RecordError("meta.tail record has no absolute 'directory'")
    msg = _get(doc, "event_notification")
    if msg is None:
        return []
    ts = _int(_get(doc, "ts_ns"), "tsNs") or None
    return entry_to_events(msg, old_dir=directory, store=store, original=doc, ts_ns=ts)


def parse_body(body: bytes, *, store: str | None) -> list[Event]:
    """Parse a SeaweedFS filer webhook POST body; raise RecordError(reason) on anything malformed.

    The body is one webhook object; a JSON array of them is accepted too (handy for replays and tests).
    Bodies that are well-formed but describe no S3 object (directories, bucket creation, `.uploads` parts)
    give an empty list: the hub answers 2xx and journals nothing.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"body is not valid JSON: {e}") from None
    except RecursionError:  # past what the json module reads: no envelope may nest that deep (MAX_NESTING)
        raise RecordError(f"body {NESTING_REFUSAL}") from None
    if isinstance(doc, list):
        if len(doc) > MAX_EVENTS_PER_BODY:
            raise RecordError(f"body has {len(doc)} events; at most {MAX_EVENTS_PER_BODY} per request")
        out: list[Event] = []
        for i, d in enumerate(doc):
            out.extend(webhook_to_events(d, store=store, index=i))
        return out
    return webhook_to_events(doc, store=store)
