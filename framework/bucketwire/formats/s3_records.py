"""S3 event records (MinIO webhook, AWS S3, Ceph RGW) into envelopes.

MinIO's webhook target POSTs `{"EventName", "Key", "Records": [record]}` with one record per request; AWS-style
senders put several records in one body. Inside a record the object key is escaped the way Go's
`url.QueryEscape` does it (space -> `+`, `/` -> `%2F`); the top-level `Key` is already decoded. Ceph RGW's
records (`eventSource` "ceph:s3") carry the key as it is. MinIO omits
`size`, `eTag`, `contentType`, `userMetadata` and `versionId` when empty, so delete events carry only the key
and sequencer. MinIO's `sequencer` is not unique per event (a GET repeats the PUT's), so the event id is
derived from the request ids, the event name, bucket, key and version instead.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

import orjson

from bucketwire.envelope import NESTING_REFUSAL, Event, cloudevents_time, iso_ms, now_iso, ordered_id, shown

MAX_RECORDS = 1000


EVENT_NAME = re.compile(r"[A-Za-z0-9_.*-]{1,64}(?::[A-Za-z0-9_.*-]{1,64}){1,3}")
"""An S3 event name: `s3:ObjectCreated:Put`, `ObjectRemoved:Delete`, `s3:Replication:OperationFailedReplication`."""


class RecordError(ValueError):
    """A body or record that is not a well-formed S3 event notification; the message is the 400 reason."""


def _str(d: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    v = d.get(key)
    if v is None or v == "":
        if required:
            raise RecordError(f"{where}.{key} is required")
        return ""
    if not isinstance(v, str):
        raise RecordError(f"{where}.{key} must be a string")
    return v


def _obj(d: dict[str, Any], key: str, where: str, *, required: bool = False) -> dict[str, Any]:
    v = d.get(key)
    if v is None:
        if required:
            raise RecordError(f"{where}.{key} is required")
        return {}
    if not isinstance(v, dict):
        raise RecordError(f"{where}.{key} must be an object")
    return v


def _str_map(d: dict[str, Any], key: str, where: str) -> dict[str, str]:
    m = _obj(d, key, where)
    if not all(type(v) is str for v in m.values()):  # keys of a parsed JSON object are always strings
        raise RecordError(f"{where}.{key} must map strings to strings")
    return m


RAW_KEY_SOURCES = frozenset({"ceph:s3"})
"""`eventSource`s whose records carry the object's name as it is: Ceph RGW writes `obj->get_name()` into
`s3.object.key` (rgw_notify.cc) where MinIO and AWS URL-encode it. Decoding such a key turned 'a+b.jpg' into
'a b.jpg', an event for another object."""


def raw_keys(rec: dict[str, Any]) -> bool:
    """Whether this record's `s3.object.key` is the key itself rather than URL-encoded (see RAW_KEY_SOURCES)."""
    src = rec.get("eventSource")
    return type(src) is str and src in RAW_KEY_SOURCES


def record_to_event(rec: Any, *, store: str | None, key_encoded: bool = True, index: int = 0) -> Event:
    """One S3 event record -> one envelope (without topic/seq, which the hub assigns)."""
    where = f"Records[{index}]"
    if not isinstance(rec, dict):
        raise RecordError(f"{where} must be an object")
    name = _str(rec, "eventName", where, required=True)
    if not EVENT_NAME.fullmatch(name):
        # Words joined by colons (AWS itself sends "ObjectCreated:Put" without the "s3:" prefix). A name with a
        # newline, an escape sequence or a space would become the event's `type`, taken by a wildcard route and
        # matched by no consumer that dispatches on the exact name.
        raise RecordError(f"{where}.eventName {shown(name)} is not an S3 event name (words joined by ':', like "
                          "s3:ObjectCreated:Put)")
    if not name.startswith("s3:"):
        name = "s3:" + name
    s3 = _obj(rec, "s3", where, required=True)
    bucket = _str(_obj(s3, "bucket", where + ".s3", required=True), "name", where + ".s3.bucket", required=True)
    obj = _obj(s3, "object", where + ".s3", required=True)
    raw_key = obj.get("key")
    if not isinstance(raw_key, str) or raw_key == "":
        raise RecordError(f"{where}.s3.object.key is required")
    try:
        key = unquote_plus(raw_key, errors="strict") if key_encoded and not raw_keys(rec) else raw_key
    except UnicodeDecodeError:
        raise RecordError(
            f"{where}.s3.object.key {shown(raw_key, 200)}: its %-escapes are not UTF-8 (S3 keys are UTF-8)"
        ) from None
    if "\x00" in key:
        raise RecordError(f"{where}.s3.object.key contains a NUL byte")
    size = obj.get("size", 0)
    if size is None:
        size = 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RecordError(f"{where}.s3.object.size must be a non-negative integer")
    etag = _str(obj, "eTag", where + ".s3.object") or _str(obj, "etag", where + ".s3.object")
    version = _str(obj, "versionId", where + ".s3.object")
    sequencer = _str(obj, "sequencer", where + ".s3.object")
    content_type = _str(obj, "contentType", where + ".s3.object")
    user_md = _str_map(obj, "userMetadata", where + ".s3.object")
    resp = _str_map(rec, "responseElements", where)
    req = _str_map(rec, "requestParameters", where)
    event_time = _str(rec, "eventTime", where)
    source_name = _str(rec, "eventSource", where) or "s3"
    region = _str(rec, "awsRegion", where)
    request_id = resp.get("x-amz-request-id", "")
    host_id = resp.get("x-amz-id-2", "")
    # Led by the record's own eventTime (see `ordered_id`): a retried notification carries the same one.
    ms = iso_ms(event_time) if event_time else None
    if request_id or host_id:
        eid = ordered_id(ms, request_id, host_id, name, bucket, key, version)
    else:
        # Nothing request-specific: fall back to what identifies this change of this object.
        eid = ordered_id(ms, event_time, sequencer, name, bucket, key, version, etag)
    src = _obj(rec, "source", where)
    ident = _obj(rec, "userIdentity", where)
    data = {
        "bucket": bucket,
        "key": key,
        "size": size,
        "etag": etag.strip('"'),
        "content_type": content_type or user_md.get("content-type", ""),
        "version_id": version,
        "sequencer": sequencer,
        "user_metadata": user_md,
        "store": store,
        "principal": ident.get("principalId", "") if isinstance(ident.get("principalId", ""), str) else "",
        "source_ip": req.get("sourceIPAddress", "") or (src["host"] if isinstance(src.get("host"), str) else ""),
        "user_agent": src.get("userAgent", "") if isinstance(src.get("userAgent", ""), str) else "",
        "records": [rec],
    }
    return Event(
        id=eid,
        source=f"{source_name}.{region}.{bucket}" if region else f"{source_name}..{bucket}",
        type=name,
        subject=key,
        # The record's own time in the form CloudEvents requires (the record keeps what was sent); without one
        # that reads as a time, when the hub took it.
        time=(cloudevents_time(event_time) if event_time else None) or now_iso(),
        data=data,
    )


def parse_body(body: bytes, *, store: str | None, key_encoded: bool = True) -> list[Event]:
    """Parse a webhook body holding S3 event records; raise RecordError with a reason on anything malformed."""
    try:
        # orjson: a third of the json module's time, and strict where S3 records need no leniency (no NaN, no
        # lone surrogates, no BOM). Integers beyond 64 bits come back as floats and fail the size check.
        doc = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        if str(e).startswith("depth limit exceeded"):  # orjson's 1024 levels: said as every way in says it
            raise RecordError(f"body {NESTING_REFUSAL}") from None
        raise RecordError(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RecordError("body must be a JSON object with a 'Records' array")
    records = doc.get("Records")
    if not isinstance(records, list):
        # MinIO's own test event on target creation is only {"EventName":..,"Key":..} without Records.
        raise RecordError("body has no 'Records' array")
    if len(records) > MAX_RECORDS:
        raise RecordError(f"body has {len(records)} records; at most {MAX_RECORDS} per request")
    return [record_to_event(r, store=store, key_encoded=key_encoded, index=i) for i, r in enumerate(records)]
