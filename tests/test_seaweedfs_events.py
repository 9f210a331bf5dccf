"""SeaweedFS filer events -> envelopes, against bodies recorded from a real weed 4.48 and hand-built cases.

`tests/data/seaweedfs/recorded.json` and `meta_tail.txt` come from one run of `record.py` in that directory:
the same changes seen by the filer webhook and by `weed filer.meta.tail`, so the two sources can be checked
to agree on event ids.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from bucketwire.envelope import Event
from bucketwire.formats.s3_records import RecordError
from bucketwire.formats.seaweedfs_events import (
    DELETE,
    MULTIPART,
    PUT,
    meta_tail_to_events,
    parse_body,
    split_path,
)

DATA = Path(__file__).parent / "data" / "seaweedfs"


def recorded(name: str = "recorded.json") -> list[dict[str, Any]]:
    return [r["body"] for r in json.loads((DATA / name).read_text())["requests"]]


def meta_tail(name: str = "meta_tail.txt") -> list[dict[str, Any]]:
    text, dec, i, out = (DATA / name).read_text(), json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def events_of(bodies: list[dict[str, Any]]) -> list[Event]:
    out: list[Event] = []
    for b in bodies:
        out += parse_body(json.dumps(b).encode(), store="primary")
    return out


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def entry(name: str, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "name": name,
        "chunks": [
            {"size": 3, "modified_ts_ns": kw.pop("ts", 1700000000123456789), "e_tag": "rL0Y20zC+Fzt72VPzMSk2A=="}
        ],
        "attributes": {"file_size": 3, "mtime": 1700000000, "mime": "text/plain", "inode": 42,
                       "md5": "rL0Y20zC+Fzt72VPzMSk2A=="},
        "extended": {"Seaweed-X-Amz-Owner": b64("alice")},
    }
    e.update(kw)
    return e


def body(key: str, event_type: str, **msg: Any) -> bytes:
    return json.dumps({"key": key, "event_type": event_type, "message": msg}).encode()


# -- the recorded real traffic -----------------------------------------------------------------------------
def test_recorded_webhook_yields_exactly_the_object_changes() -> None:
    evs = events_of(recorded())
    got = [(e.type, e.data["bucket"], e.data["key"]) for e in evs]
    assert got == [
        (PUT, "photos", "a/cat 1.jpg"),
        (PUT, "photos", "a/cat 1.jpg"),          # overwrite
        (PUT, "photos", "b/copy.jpg"),           # server-side copy
        (DELETE, "photos", "a/cat 1.jpg"),
        (MULTIPART, "photos", "big/multi.bin"),  # parts under .uploads/ are invisible
        (DELETE, "photos", "b/copy.jpg"),        # filer rename = removal + creation
        (PUT, "photos", "b/renamed.jpg"),
        (DELETE, "photos", "b/renamed.jpg"),
        (DELETE, "photos", "big/multi.bin"),
    ]
    assert len({e.id for e in evs}) == len(evs)
    for e in evs:
        assert e.source == "seaweedfs:filer/photos"
        assert e.subject == e.data["key"]
        assert e.data["store"] == "primary"
        assert e.data["principal"] == "admin"
        assert isinstance(e.data["records"][0], dict) and "message" in e.data["records"][0]
        Event.from_json(e.to_json())  # the envelope survives the wire


def test_recorded_put_fields_match_the_minio_shape() -> None:
    put = events_of(recorded())[0]
    d = put.data
    assert d["size"] == 100
    assert d["etag"] == "aed563ecafb4bcc5654c597a421547b2"
    assert d["content_type"] == "image/jpeg"
    assert d["user_metadata"] == {"X-Amz-Meta-Camera": "Nikon", "X-Amz-Meta-Note": "hello world"}
    assert d["version_id"] == ""
    assert len(d["sequencer"]) == 16
    assert set(d) >= {"bucket", "key", "size", "etag", "content_type", "version_id", "sequencer",
                      "user_metadata", "store", "principal", "source_ip", "user_agent", "records"}


def test_recorded_overwrite_and_multipart_details() -> None:
    evs = events_of(recorded())
    assert evs[1].data["size"] == 50 and evs[1].data["user_metadata"] == {}
    assert evs[1].id != evs[0].id
    mp = evs[4]
    assert mp.data["size"] == 11534336
    assert mp.data["etag"].endswith("-3")
    assert evs[3].data["size"] == 0  # deletes carry the key, not the gone object's size


def test_ids_are_deterministic() -> None:
    assert [e.id for e in events_of(recorded())] == [e.id for e in events_of(recorded())]


def test_meta_tail_and_webhook_agree_on_ids() -> None:
    """The durable source and the webhook describe the same changes with the same ids (hub dedupes)."""
    tail: list[Event] = []
    for doc in meta_tail():
        tail += meta_tail_to_events(doc, store="primary")
    hook = events_of(recorded())
    assert [(e.type, e.data["key"]) for e in tail] == [(e.type, e.data["key"]) for e in hook]
    assert [e.id for e in tail] == [e.id for e in hook]
    # meta.tail knows when the change was logged; that shows in time/sequencer only.
    assert tail[3].time.startswith("20")


def test_versioned_bucket_events_are_the_objects_not_seaweedfs_version_files() -> None:
    """A bucket with versioning on (recorded_versioned.json): SeaweedFS writes each version as a file
    `k.versions/v_<id>`, a delete marker as one more. These used to become events for keys that do not exist in
    S3 (`a/photo.jpg.versions/v_...`), and the delete as an ObjectCreated of such a key, so a deleted photo kept
    its thumbnails. They are events for `a/photo.jpg` with the version id, as MinIO and S3 send them."""
    bodies = recorded("recorded_versioned.json")
    evs = events_of(bodies)
    got = [(e.type, e.data["key"], e.data["size"]) for e in evs]
    assert got == [
        ("s3:ObjectCreated:Put", "a/photo.jpg", 100),
        ("s3:ObjectCreated:Put", "a/photo.jpg", 200),
        ("s3:ObjectRemoved:DeleteMarkerCreated", "a/photo.jpg", 0),
        ("s3:ObjectRemoved:Delete", "a/photo.jpg", 0),
    ], got
    versions = [e.data["version_id"] for e in evs]
    assert all(len(v) == 32 for v in versions) and len(set(versions)) == 3 and versions[1] == versions[3]
    assert evs[0].data["etag"] != evs[1].data["etag"] and evs[2].data["etag"] == ""
    assert evs[2].is_object_removed and evs[3].is_object_removed and evs[0].subject == "a/photo.jpg"
    assert len({e.id for e in evs}) == 4
    tail: list[Event] = []
    for doc in meta_tail("meta_tail_versioned.txt"):
        tail += meta_tail_to_events(doc, store="primary")
    assert [(e.type, e.data["key"]) for e in tail] == [(t, k) for t, k, _ in got]
    assert [e.id for e in tail] == [e.id for e in evs], "the durable source and the webhook agree on ids"


def test_a_key_named_like_a_version_file_without_versioning_stays_as_named() -> None:
    """No version id (a bucket without versioning where someone named an object `x.versions/v_1`): as named."""
    evs = parse_body(body("/buckets/b/x.versions/v_1", "create", new_entry=entry("v_1"),
                          new_parent_path="/buckets/b/x.versions"), store=None)
    assert [(e.type, e.data["key"]) for e in evs] == [(PUT, "x.versions/v_1")]


# -- hand-built edge cases ---------------------------------------------------------------------------------
def test_create_update_delete() -> None:
    (c,) = parse_body(body("/buckets/b/x.txt", "create", new_entry=entry("x.txt"), new_parent_path="/buckets/b"),
                      store=None)
    assert (c.type, c.data["etag"], c.data["principal"]) == (PUT, "acbd18db4cc2f85cedef654fccc4a4d8", "alice")
    (u,) = parse_body(body("/buckets/b/x.txt", "update", old_entry=entry("x.txt"),
                           new_entry=entry("x.txt", ts=1700000001000000000), new_parent_path="/buckets/b"),
                      store=None)
    assert u.type == PUT and u.id != c.id
    (d,) = parse_body(body("/buckets/b/x.txt", "delete", old_entry=entry("x.txt")), store=None)
    assert d.type == DELETE and d.id not in {c.id, u.id}


def test_metadata_only_update_is_not_a_new_object() -> None:
    new = entry("x.txt")
    new["extended"]["X-Amz-Tagging-k"] = b64("v")
    assert parse_body(body("/buckets/b/x.txt", "update", old_entry=entry("x.txt"), new_entry=new,
                           new_parent_path="/buckets/b"), store=None) == []


def test_rename_across_directories() -> None:
    evs = parse_body(body("/buckets/b/in/x.txt", "rename", old_entry=entry("x.txt"),
                          new_entry=entry("y.txt"), new_parent_path="/buckets/b/out"), store=None)
    assert [(e.type, e.data["key"]) for e in evs] == [(DELETE, "in/x.txt"), (PUT, "out/y.txt")]


def test_rename_out_of_internal_path_is_only_a_creation() -> None:
    evs = parse_body(body("/buckets/b/.uploads/u1/x", "rename", old_entry=entry("x"),
                          new_entry=entry("final.bin"), new_parent_path="/buckets/b"), store=None)
    assert [(e.type, e.data["key"]) for e in evs] == [(PUT, "final.bin")]


@pytest.mark.parametrize(
    "key, parent",
    [
        ("/buckets/b", "/buckets"),                          # bucket creation
        ("/buckets/.system/owners/x", "/buckets/.system/owners"),
        ("/buckets/b/.uploads/abc/0001_x.part", "/buckets/b/.uploads/abc"),
        ("/etc/passwd", "/etc"),                             # outside /buckets
        ("/buckets/b/.uploads", "/buckets/b"),
    ],
)
def test_non_objects_are_ignored(key: str, parent: str) -> None:
    name = key.rsplit("/", 1)[1]
    assert parse_body(body(key, "create", new_entry=entry(name), new_parent_path=parent), store=None) == []


def test_directories_are_ignored() -> None:
    d = entry("dir", is_directory=True)
    assert parse_body(body("/buckets/b/dir", "create", new_entry=d, new_parent_path="/buckets/b"), store=None) == []
    assert parse_body(body("/buckets/b/dir", "delete", old_entry=d), store=None) == []


def test_multipart_detected_from_upload_id() -> None:
    e = entry("big.bin")
    e["extended"].update({"X-Seaweedfs-Upload-Id": b64("u1"), "Seaweed-X-Amz-ETag": b64("abc-2")})
    (ev,) = parse_body(body("/buckets/b/big.bin", "create", new_entry=e, new_parent_path="/buckets/b"), store=None)
    assert ev.type == MULTIPART and ev.data["etag"] == "abc-2"


def test_metadata_decoding_handles_utf8_and_odd_case() -> None:
    e = entry("m")
    e["extended"].update({"x-amz-meta-Über": b64("grüße"), "Other": b64("ignored")})
    (ev,) = parse_body(body("/buckets/b/m", "create", new_entry=e, new_parent_path="/buckets/b"), store=None)
    assert ev.data["user_metadata"] == {"x-amz-meta-Über": "grüße"}


def test_key_with_spaces_and_unicode_is_not_url_decoded() -> None:
    (ev,) = parse_body(body("/buckets/b/a+b %20ü.txt", "create", new_entry=entry("a+b %20ü.txt"),
                            new_parent_path="/buckets/b"), store=None)
    assert ev.subject == "a+b %20ü.txt"


def test_batched_array_body() -> None:
    one = json.loads(body("/buckets/b/x", "create", new_entry=entry("x"), new_parent_path="/buckets/b"))
    assert len(parse_body(json.dumps([one, one]).encode(), store=None)) == 2


def test_split_path() -> None:
    assert split_path("/buckets/b/k/e y") == ("b", "k/e y")
    assert split_path("/buckets/b/") is None
    assert split_path("/bucketsx/b/k") is None


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"not json", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'"x"', "must be a JSON object"),
        (b'{"message": {}}', "key must be an absolute filer path"),
        (b'{"key": "rel/x", "message": {}}', "absolute filer path"),
        (b'{"key": "/buckets/b/x", "event_type": "explode", "message": {}}', "event_type"),
        (b'{"key": "/buckets/b/x"}', "message must be an object"),
        (b'{"key": "/buckets/b/x", "message": {"new_entry": 5}}', "new_entry must be an object"),
        (b'{"key": "/buckets/b/x", "message": {"new_entry": {"name": "a/b"}}}', "file name"),
        (b'{"key": "/buckets/b/x", "message": {"new_entry": {"name": "x", "attributes": []}}}', "attributes"),
        (b'{"key": "/buckets/b/x", "message": {"new_entry": {"name": "x", "extended": {"X-Amz-Meta-A": "%%"}},'
         b' "new_parent_path": "/buckets/b"}}', "base64"),
        (b'{"key": "/buckets/b/x", "message": {"new_entry": {"name": "x", "attributes": {"file_size": "big"}},'
         b' "new_parent_path": "/buckets/b"}}', "integer"),
        (b'{"key": "/buckets/b/x", "message": {"new_entry": {"name": "x"}, "new_parent_path": 7}}', "string"),
    ],
)
def test_malformed_bodies_raise_record_error(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        parse_body(raw, store=None)


def test_empty_notification_is_nothing() -> None:
    assert parse_body(b'{"key": "/buckets/b/x", "message": {}}', store=None) == []


@pytest.mark.parametrize("mtime", [1_700_000_000_000, 10**13, -(10**12)])
def test_an_mtime_no_calendar_holds_is_an_event_with_the_time_it_was_taken(mtime: int, stack_factory: Any) -> None:
    """A client that wrote milliseconds where the filer keeps seconds (mtime 1700000000000: the year 55,839)
    made the webhook parser raise ValueError ('year is out of range'): the hub logged a 'parser failed' traceback
    for every such notification and answered 400 'cannot parse body: ValueError', so SeaweedFS's change was never
    an event. The event's time is then when the hub took it; its id stays deterministic."""
    from tests.cloudevents_check import assert_cloudevent

    e = entry("x.txt")
    e["attributes"]["mtime"] = mtime
    raw = body("/buckets/b/x.txt", "create", new_entry=e, new_parent_path="/buckets/b")
    (ev,) = parse_body(raw, store=None)
    assert ev.id == parse_body(raw, store=None)[0].id
    s = stack_factory('[[routes]]\nevents = ["s3:ObjectCreated:*"]\ntopic = "created"\n')
    s.start_hub()
    code, resp = s.post("/seaweedfs/events", raw)
    assert code == 200 and resp["accepted"] == 1, resp
    with s.client() as c:
        _, (envelope,) = c.fetch("created", 1)
    assert_cloudevent(envelope)
    assert "parser failed" not in s.dump_logs()
