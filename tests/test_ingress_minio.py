"""MinIO webhook ingress against a real hub process: every event kind, exact keys, and bad input."""

from __future__ import annotations

import json
import socket

import pytest

from tests.minio_payloads import body, ceph_record, record

ROUTES = """
[[routes]]
events = ["s3:ObjectCreated:*"]
topic = "created"

[[routes]]
events = ["s3:ObjectRemoved:*"]
topic = "removed"

[[routes]]
events = ["s3:ObjectAccessed:*"]
topic = "accessed"

[[routes]]
events = ["s3:ObjectCreated:*"]
bucket = "never"
topic = "unreachable"
"""

KEYS = ["plain.jpg", "dir/sub dir/a b.jpg", "c++/x+y=z&w.png", "fotos/straße 日本語 ü.jpeg", "100%/~tilde_-.txt"]


@pytest.fixture
def stack(stack_factory):
    s = stack_factory(ROUTES)
    s.start_hub()
    return s


def fetch_all(stack, topic):
    with stack.client() as c:
        meta, bodies = c.fetch(topic, 1)
    return [json.loads(b) for b in bodies]


def test_every_minio_event_kind_arrives_decoded_on_its_topic(stack):
    sent = [
        record("s3:ObjectCreated:Put", "photos", KEYS[0], size=1234, etag="d41d8cd98f00b204e9800998ecf8427e",
               content_type="image/jpeg", user_metadata={"content-type": "image/jpeg", "X-Amz-Meta-Owner": "ann"},
               version="v1", request_id="R1"),
        record("s3:ObjectCreated:CompleteMultipartUpload", "photos", KEYS[1], size=20 << 20,
               etag="9b2cf535f27731c974343645a3985328-4", content_type="image/jpeg", request_id="R2"),
        record("s3:ObjectCreated:Copy", "photos", KEYS[2], size=7, etag="abc", request_id="R3"),
        record("s3:ObjectRemoved:Delete", "photos", KEYS[3], request_id="R4"),
        record("s3:ObjectRemoved:DeleteMarkerCreated", "photos", KEYS[4], version="dm-1", request_id="R5"),
        # A GET repeats the PUT's sequencer: ids must still differ.
        record("s3:ObjectAccessed:Get", "photos", KEYS[0], size=1234, etag="d41d8cd98f00b204e9800998ecf8427e",
               request_id="R6"),
    ]
    for r in sent:
        code, resp = stack.post("/minio/events", body(r))
        assert code == 200, resp
        assert resp["accepted"] == 1
    created = fetch_all(stack, "created")
    removed = fetch_all(stack, "removed")
    accessed = fetch_all(stack, "accessed")
    assert [e["subject"] for e in created] == KEYS[:3]
    assert [e["type"] for e in created] == ["s3:ObjectCreated:Put", "s3:ObjectCreated:CompleteMultipartUpload",
                                           "s3:ObjectCreated:Copy"]
    assert [e["subject"] for e in removed] == KEYS[3:5]
    assert [int(e["seq"]) for e in created] == [1, 2, 3] and [int(e["seq"]) for e in removed] == [1, 2]
    put = created[0]
    assert put["specversion"] == "1.0" and put["schemaversion"] == 1 and put["topic"] == "created"
    d = put["data"]
    assert (d["bucket"], d["key"], d["size"], d["etag"], d["version_id"], d["content_type"]) == (
        "photos", KEYS[0], 1234, "d41d8cd98f00b204e9800998ecf8427e", "v1", "image/jpeg")
    assert d["user_metadata"]["X-Amz-Meta-Owner"] == "ann"
    assert d["records"][0] == sent[0], "the original record travels untouched"
    assert d["principal"] == "minioadmin" and d["source_ip"] == "192.0.2.10"
    assert created[1]["data"]["size"] == 20 << 20 and created[1]["data"]["etag"].endswith("-4")
    dm = removed[1]["data"]
    assert dm["version_id"] == "dm-1" and dm["size"] == 0 and dm["etag"] == ""
    assert accessed[0]["id"] != put["id"]
    assert len({e["id"] for e in created + removed + accessed}) == 6


def test_same_notification_twice_is_one_event(stack):
    r = record("s3:ObjectCreated:Put", "photos", "dup.jpg", size=1, etag="e", request_id="SAME")
    c1, r1 = stack.post("/minio/events", body(r))
    c2, r2 = stack.post("/minio/events", body(r))
    assert (c1, c2) == (200, 200)
    assert r1["accepted"] == 1 and r2["duplicates"] == 1 and r2["events"][0]["seq"] == r1["events"][0]["seq"]
    assert len(fetch_all(stack, "created")) == 1


def test_aws_style_body_with_several_records(stack):
    recs = [record("s3:ObjectCreated:Put", "photos", f"k{i} x.jpg", size=i + 1, request_id=f"M{i}") for i in range(5)]
    for r in recs:  # AWS S3 omits the "s3:" prefix and the MinIO envelope keys
        r["eventName"] = r["eventName"][3:]
    code, resp = stack.post("/minio/events", json.dumps({"Records": recs}).encode())
    assert code == 200 and resp["accepted"] == 5
    assert [e["subject"] for e in fetch_all(stack, "created")] == [f"k{i} x.jpg" for i in range(5)]


def test_ceph_rgw_records_keep_their_keys_as_sent(stack):
    """Ceph RGW posts S3 records with the object's name as it is, not URL-encoded as MinIO and AWS do. Every
    record's key was decoded all the same, so 'a+b.jpg' became 'a b.jpg' and '100%41' became '100A': events for
    objects that do not exist, or for another object (a delete that a replica applies to the wrong key)."""
    keys = ["dir/a+b.jpg", "100%41 x%2By.txt", "c++/x+y=z&w.png", "plain.jpg"]
    recs = [ceph_record("ObjectCreated:Put", "photos", k, size=i + 1, etag="e", request_id=f"C{i}")
            for i, k in enumerate(keys)]
    code, resp = stack.post("/minio/events", json.dumps({"Records": recs}).encode())
    assert code == 200 and resp["accepted"] == len(keys), resp
    got = fetch_all(stack, "created")
    assert [e["data"]["key"] for e in got] == keys
    assert [e["subject"] for e in got] == keys
    assert got[0]["source"] == "ceph:s3.default.photos" and got[0]["type"] == "s3:ObjectCreated:Put"
    assert [e["data"]["records"][0]["s3"]["object"]["key"] for e in got] == keys
    # MinIO's records beside them are still decoded
    code, _ = stack.post("/minio/events", body(record("s3:ObjectCreated:Put", "photos", "m a+b.jpg", size=1)))
    assert code == 200 and fetch_all(stack, "created")[-1]["data"]["key"] == "m a+b.jpg"


def test_unrouted_event_is_accepted_and_counted(stack):
    r = record("s3:ObjectRestore:Completed", "photos", "cold.jpg", request_id="U1")
    code, resp = stack.post("/minio/events", body(r))
    assert code == 200 and resp["unrouted"] == 1 and resp["accepted"] == 0
    metrics = _get(stack, "/metrics")
    assert 'bucketwire_events_unrouted_total{source="minio"} 1.0' in metrics


def _get(stack, path):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}{path}", timeout=5) as r:
        return r.read().decode()


def _raw_http(stack, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                n = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                if n and len(rest) >= n[0]:
                    break
        return out


def _rec_body(s3: dict) -> bytes:
    return json.dumps({"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": s3}]}).encode()


BAD = [
    ("no token", dict(token=""), b'{"Records":[]}', 401),
    ("wrong token", dict(token="nope"), b'{"Records":[]}', 401),
    ("not json", {}, b'{"Records": [', 400),
    ("not an object", {}, b"[1,2]", 400),
    ("no records", {}, b'{"EventName":"s3:ObjectCreated:Put","Key":"a/b"}', 400),
    ("record without key", {}, _rec_body({"bucket": {"name": "b"}, "object": {}}), 400),
    ("record without bucket", {}, _rec_body({"object": {"key": "k"}}), 400),
    ("negative size", {}, _rec_body({"bucket": {"name": "b"}, "object": {"key": "k", "size": -1}}), 400),
    ("bad escape", {}, _rec_body({"bucket": {"name": "b"}, "object": {"key": "%ff%fe"}}), 400),
    ("one bad record spoils the batch", {}, json.dumps({"Records": [
        record("s3:ObjectCreated:Put", "photos", "good.jpg", request_id="G"), {"eventName": 5}]}).encode(), 400),
    ("too large", {}, b'{"Records":[' + b" " * (1 << 20) + b"]}", 413),
    ("unknown path", dict(path="/nope"), b"{}", 404),
    ("unknown store", dict(path="/minio/events?store=zzz"), body(record("s3:ObjectCreated:Put", "b", "k")), 400),
]


@pytest.mark.parametrize("name,opts,payload,code", BAD, ids=[b[0] for b in BAD])
def test_bad_webhook_input_is_rejected_and_changes_nothing(stack, name, opts, payload, code):
    before = stack.status()["topics"]
    got, resp = stack.post(opts.get("path", "/minio/events"), payload, token=opts.get("token"))
    assert got == code, resp
    assert resp.get("error"), "every rejection carries a reason"
    assert stack.status()["topics"] == before
    ok, resp = stack.post("/minio/events", body(record("s3:ObjectCreated:Put", "photos", "after.jpg",
                                                            request_id="after-" + name)))
    assert ok == 200 and resp["accepted"] == 1, "the hub keeps serving"


def test_missing_content_length_and_chunked_are_refused(stack):
    out = _raw_http(stack, b"POST /minio/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411")
    out = _raw_http(stack, b"POST /minio/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411")
    assert stack.status()["topics"] == {}


def test_cloudevents_endpoint(stack):
    ev = {"specversion": "1.0", "id": "ce-1", "source": "urn:test", "type": "com.example.thing", "topic": "misc",
          "data": {"x": 1}}
    code, resp = stack.post("/events", json.dumps(ev).encode())
    assert code == 200 and resp["events"][0]["topic"] == "misc"
    code, resp = stack.post("/events", json.dumps({**ev, "schemaversion": 99}).encode())
    assert code == 400 and "newer" in resp["error"]
    assert [e["id"] for e in fetch_all(stack, "misc")] == ["ce-1"]


def test_pipelined_webhooks_are_committed_and_answered_in_order(stack):
    """Several POSTs in one write on one keep-alive connection: each answered after its commit, in order."""
    reqs = b""
    for i in range(5):
        b = body(record("s3:ObjectCreated:Put", "photos", f"pipe-{i}.jpg", request_id=f"pipe-{i}"))
        reqs += (b"POST /minio/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(b)) + b
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as s:
        s.sendall(reqs)
        buf, answers = b"", []
        while len(answers) < 5:
            buf += s.recv(65536)
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                n = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
                if len(rest) < n:
                    break
                assert head.startswith(b"HTTP/1.1 200")
                answers.append(json.loads(rest[:n]))
                buf = rest[n:]
    assert [a["events"][0]["seq"] for a in answers] == [1, 2, 3, 4, 5]
    assert [e["data"]["key"] for e in fetch_all(stack, "created")] == [f"pipe-{i}.jpg" for i in range(5)]


def test_other_methods_are_refused(stack):
    out = _raw_http(stack, b"PUT /minio/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 405") and b"not allowed" in out
    assert stack.status()["topics"] == {}


@pytest.mark.parametrize(("event_time", "envelope_time"), [
    ("2024-05-01T10:00:00.123Z", "2024-05-01T10:00:00.123Z"),  # MinIO's and AWS's form: kept as sent
    ("2024-05-01T12:00:00.5+02:00", "2024-05-01T12:00:00.5+02:00"),
    ("2024-05-01T10:00:00.123", "2024-05-01T10:00:00.123000Z"),  # no zone: S3 times are UTC
    ("2024-05-01 10:00:00.123456Z", "2024-05-01T10:00:00.123456Z"),
    ("20240501T100000Z", "2024-05-01T10:00:00.000000Z"),  # ISO 8601's basic form, not RFC 3339's
    ("yesterday", None),  # no time at all: when the hub took it
    ("2024-02-30T10:00:00Z", None),  # RFC 3339's shape, no such day: copied as sent, which the SDK refuses
    ("2024-05-01T10:00:00+25:00", None),
    ("0999-01-01 00:00:00", None),  # rewritten, with its year unpadded ("999-01-01T..."): not RFC 3339 either
])
def test_a_records_event_time_becomes_a_valid_cloudevents_time(stack, event_time, envelope_time):
    """The envelope's `time` is bucketwire's to write, and CloudEvents wants an RFC 3339 timestamp with a zone.
    A record's eventTime was copied as sent, so a store (or proxy) writing another ISO 8601 form made an
    envelope the CloudEvents SDK refuses to read. The original stays in data.records; the id keeps its time."""
    from tests.cloudevents_check import assert_cloudevent

    r = record("s3:ObjectCreated:Put", "photos", "t.jpg", size=1, request_id="T1")
    r["eventTime"] = event_time
    code, resp = stack.post("/minio/events", body(r))
    assert code == 200, resp
    (env,) = fetch_all(stack, "created")
    assert_cloudevent(env)
    if envelope_time is not None:
        assert env["time"] == envelope_time
        assert env["id"].startswith("018f3398c"), "the id still leads with the record's time"
    assert env["data"]["records"][0]["eventTime"] == event_time


def test_an_unknown_store_name_is_clipped_and_escaped_in_the_answer_and_the_log(stack):
    """`?store=` comes from whoever holds the token: its name was echoed whole (twice) in the 400, up to the 64
    KiB a request line may take, control characters and all. The answer and the hub's log line show a clipped,
    escaped form; the request still changes nothing."""
    from urllib.parse import quote

    long_name = "n" * 60_000
    evil = "\x1b[31mred\r\n12:00:00 info  bucketwire.hub: forged line"
    for name in (long_name, evil):
        code, resp = stack.post(f"/minio/events?store={quote(name)}", body(record("s3:ObjectCreated:Put", "b", "k")))
        assert code == 400, resp
        err = resp["error"]
        assert "unknown store" in err and len(err) < 400, err[:500]
        assert all(c.isprintable() for c in err), repr(err[:500])
    assert "\\x1b[31mred\\r\\n" in err, err
    assert stack.status()["topics"] == {}
    log = stack.dump_logs(10**6)
    lines = [line for line in log.splitlines() if "unknown store" in line]
    assert lines and all(len(line) < 600 for line in lines), lines
    assert "\x1b" not in log and not any(line.startswith("12:00:00 info  bucketwire.hub: forged") for line in
                                         log.splitlines())


def test_a_senders_text_in_a_log_line_cannot_forge_lines(stack):
    """Log lines name what a sender sent (an event id, a key): the text format wrote those fields raw, so an id
    holding a newline and a made-up timestamp wrote a line of its own, indistinguishable from the hub's, and an
    escape sequence reached the operator's terminal. Control characters are written escaped."""
    forged = "01:02:03 error bucketwire.hub: journal corrupt"
    ev = {"specversion": "1.0", "id": f"x\n{forged}\x1b[2J", "source": "urn:x", "type": "t", "topic": "misc",
          "data": {"pad": "p" * 1_010_000}}
    code, resp = stack.post("/events", json.dumps(ev).encode(),
                            headers={"Content-Type": "application/cloudevents+json"})
    assert code == 413, resp  # refused as too large, with a warning line that names the event's id
    log = stack.dump_logs(10**6)
    assert "event refused: too large" in log, log
    assert not any(line.startswith(forged) for line in log.splitlines()), log
    assert "\x1b" not in log and "\\n01:02:03 error" in log, log


def test_a_refusal_quotes_a_senders_long_value_clipped(stack):
    """A 400 naming a bad value (an event name that is not S3's) echoed it whole: up to a whole body's worth."""
    rec = record("s3:ObjectCreated:Put", "b", "k")
    rec["eventName"] = "x" * 500_000
    code, resp = stack.post("/minio/events", json.dumps({"Records": [rec]}).encode())
    assert code == 400 and "is not an S3 event name" in resp["error"] and len(resp["error"]) < 300, resp["error"][:300]
    assert stack.status()["topics"] == {}


@pytest.mark.parametrize("name", ["s3:ObjectCreated:Put\n", "s3:ObjectCreated:Put\x1b[2J", "s3:Object Created:Put",
                                  "s3:" + "A" * 200])
def test_an_event_name_that_no_store_sends_is_refused(stack, name):
    """S3 event names are words joined by colons. One with a newline, an escape sequence or a space was committed
    as the event's `type`: a route on `s3:ObjectCreated:*` took it, a consumer dispatching on the exact name did
    not, and the type went into every log line that names it."""
    rec = record("s3:ObjectCreated:Put", "b", "k")
    rec["eventName"] = name
    code, resp = stack.post("/minio/events", json.dumps({"Records": [rec]}).encode())
    assert code == 400 and "is not an S3 event name" in resp["error"], resp
    assert stack.status()["topics"] == {}
    for ok in ("s3:ObjectCreated:CompleteMultipartUpload", "ObjectRemoved:DeleteMarkerCreated",
               "s3:Replication:OperationFailedReplication", "s3:ObjectRestore:Post", "s3:Scanner:ManyVersions"):
        rec["eventName"], rec["s3"]["object"]["key"] = ok, f"k-{ok}"
        code, resp = stack.post("/minio/events", json.dumps({"Records": [rec]}).encode())
        assert code == 200, (ok, resp)
