"""Pull sources: the meta.tail stream splitter and state file, the durable SeaweedFS source against a real weed,
and the MinIO listen source against recorded stream bytes served by a local HTTP server."""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import minio
import pytest

from bucketwire.devstack.seaweedfs import WeedServer
from bucketwire.envelope import Event
from bucketwire.formats.s3_records import RecordError
from bucketwire.sources import minio_listen, publish_until_acked
from bucketwire.sources.minio_listen import MinioListenSource, parse_line
from bucketwire.sources.seaweed_meta import (
    FilerMismatch,
    JsonStreamSplitter,
    Saved,
    SeaweedMetaSource,
    StreamError,
    doc_events,
    doc_signatures,
    read_saved,
    read_state,
    write_state,
)

DATA = Path(__file__).parent / "data" / "seaweedfs"


class FakeHub:
    """Collects published events; can be told to fail the first N publishes like a hub that is down."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[Event] = []
        self.fail = fail_first
        self.calls = 0
        self.lock = threading.Lock()

    def publish(self, events: list[Event]) -> list[dict[str, Any]]:
        with self.lock:
            self.calls += 1
            if self.fail > 0:
                self.fail -= 1
                raise TimeoutError("hub down")
            self.events += events
            return [{"id": e.id, "topic": "t", "seq": i, "duplicate": False, "unrouted": False}
                    for i, e in enumerate(events)]


def wait_for(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)  # pacing: the poll interval of a wait with a deadline
    raise AssertionError("condition not met in time")


# -- meta.tail stream -----------------------------------------------------------------------------------------
def test_splitter_handles_any_chunking_of_the_recorded_stream() -> None:
    raw = (DATA / "meta_tail.txt").read_bytes()
    whole = JsonStreamSplitter().feed(raw)
    assert len(whole) == 22
    rnd = random.Random(7)
    for _ in range(20):
        sp, got, i = JsonStreamSplitter(), [], 0
        while i < len(raw):
            n = rnd.randint(1, 300)
            got += sp.feed(raw[i : i + n])
            i += n
        assert got == whole


def test_splitter_strings_with_braces_and_errors() -> None:
    sp = JsonStreamSplitter()
    assert sp.feed(b'{"a": "}{\\"", "b": {"c": 1}}\n{"d"') == [{"a": '}{"', "b": {"c": 1}}]
    assert sp.feed(b": 2}") == [{"d": 2}]
    with pytest.raises(StreamError):
        JsonStreamSplitter().feed(b"garbage {}")
    with pytest.raises(StreamError):
        JsonStreamSplitter().feed(b"}")

    # What weed prints instead of JSON (a filer it cannot reach) is shown in its own words, not as a stray byte.
    with pytest.raises(StreamError, match=r"meta.tail printed 'subscribe: rpc error: connection refused'"):
        JsonStreamSplitter().feed(b'{"a": 1}\nsubscribe: rpc error: connection refused\n{"b": 2}')


def test_doc_events_from_recorded_stream_and_nested_batches() -> None:
    docs = JsonStreamSplitter().feed((DATA / "meta_tail.txt").read_bytes())
    evs, ts = [], 0
    for d in docs:
        e, t = doc_events(d, "primary")
        evs += e
        ts = max(ts, t)
    assert len(evs) == 9 and ts == int(docs[-1]["tsNs"])
    nested, t2 = doc_events({"events": docs}, "primary")
    assert [e.id for e in nested] == [e.id for e in evs] and t2 == ts


def test_state_file_roundtrip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "s" / "state.json"
    assert read_state(p) is None
    write_state(p, 123, "127.0.0.1:1")
    assert read_state(p) == 123
    assert not p.with_name("state.json.tmp").exists()
    p.write_text("{")
    with pytest.raises(Exception, match="--reset-state"):
        read_state(p)


def test_the_state_file_names_its_filer(tmp_path: Path) -> None:
    """The position is one filer's: the state keeps the signatures its changes carried (read here from a
    recorded meta.tail stream), and a file from before them, saved following another address, is refused at
    once, before meta.tail starts."""
    docs = JsonStreamSplitter().feed((DATA / "meta_tail.txt").read_bytes())
    sigs = {s for d in docs for s in doc_signatures(d)}
    assert len(sigs) == 1 and doc_signatures({"events": docs[:2]}) == doc_signatures(docs[0]) + doc_signatures(docs[1])
    p = tmp_path / "state.json"
    write_state(p, 5, "127.0.0.1:1", tuple(sigs))
    assert read_saved(p) == Saved(5, "127.0.0.1:1", tuple(sigs))
    p.write_text('{"ts_ns": 5, "filer": "127.0.0.1:1"}')  # as written before signatures were kept
    src = SeaweedMetaSource(FakeHub().publish, filer="127.0.0.1:2", state_path=p)
    with pytest.raises(FilerMismatch, match=r"saved following 127.0.0.1:1.*--reset-state to follow 127.0.0.1:2"):
        src.run()
    assert src.proc is None


def test_publish_until_acked_retries_then_succeeds() -> None:
    hub, stop = FakeHub(fail_first=2), threading.Event()
    ev = Event(id="1", source="s", type="t")
    assert publish_until_acked(hub.publish, [ev], stop, base=0.01) is not None
    assert hub.calls == 3 and hub.events == [ev]
    stop.set()
    assert publish_until_acked(FakeHub(fail_first=99).publish, [ev], stop, base=0.01) is None


# -- durable SeaweedFS source against a real weed ---------------------------------------------------------------
def _put(c: minio.Minio, bucket: str, key: str, body: bytes = b"data") -> None:
    c.put_object(bucket, key, io.BytesIO(body), len(body))


def test_seaweed_meta_source_publishes_and_resumes(weed: WeedServer, bucket: str, tmp_path: Path) -> None:
    c = weed.client()
    state = tmp_path / "state.json"
    hub = FakeHub(fail_first=1)  # the first batch meets a "down" hub and is retried
    src = SeaweedMetaSource(hub.publish, filer=weed.filer_address, state_path=state, store="primary",
                            path_prefix=f"/buckets/{bucket}", start_ago=60, linger=0.1)
    t = threading.Thread(target=src.run, daemon=True)
    t.start()
    try:
        for i in range(3):
            _put(c, bucket, f"k{i}.txt")
        c.remove_object(bucket, "k0.txt")
        wait_for(lambda: len(hub.events) >= 4)
        wait_for(lambda: state.exists())
    finally:
        src.stop()
        t.join(10)
    assert not t.is_alive()
    assert [(e.type, e.key) for e in hub.events] == [
        ("s3:ObjectCreated:Put", "k0.txt"), ("s3:ObjectCreated:Put", "k1.txt"),
        ("s3:ObjectCreated:Put", "k2.txt"), ("s3:ObjectRemoved:Delete", "k0.txt"),
    ]
    first_ids = {e.id for e in hub.events}
    saved = read_state(state)
    assert saved is not None

    # Changes while the source is down are picked up on restart; the overlap repeats ids, never invents new ones.
    _put(c, bucket, "while-down.txt")
    hub2 = FakeHub()
    src2 = SeaweedMetaSource(hub2.publish, filer=weed.filer_address, state_path=state, store="primary",
                             path_prefix=f"/buckets/{bucket}", linger=0.1)
    assert any(a.startswith("-timeAgo=") for a in src2.command(saved))
    t2 = threading.Thread(target=src2.run, daemon=True)
    t2.start()
    try:
        wait_for(lambda: any(e.key == "while-down.txt" for e in hub2.events))
    finally:
        src2.stop()
        t2.join(10)
    new = [e for e in hub2.events if e.id not in first_ids]
    assert [e.key for e in new] == ["while-down.txt"]
    assert src2.proc is not None and src2.proc.poll() is not None  # meta.tail child is gone


# -- MinIO listen source ---------------------------------------------------------------------------------------
def minio_record(name: str, key: str, size: int = 0, seq: str = "1") -> dict[str, Any]:
    """A record as MinIO writes it in the listen stream: the key is *not* URL-encoded there."""
    obj: dict[str, Any] = {"key": key, "sequencer": seq}
    if name.startswith("s3:ObjectCreated"):
        obj.update(size=size, eTag="0123456789abcdef0123456789abcdef", contentType="image/jpeg",
                   userMetadata={"content-type": "image/jpeg"})
    return {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": "2024-05-01T10:00:00.000Z",
        "eventName": name, "userIdentity": {"principalId": "minioadmin"},
        "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
                             "x-amz-request-id": f"17C5{seq}", "x-minio-deployment-id": "d",
                             "x-minio-origin-endpoint": ""},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": "photos", "ownerIdentity": {"principalId": "minioadmin"},
                          "arn": "arn:aws:s3:::photos"},
               "object": obj},
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"},
    }


def stream_bytes() -> bytes:
    lines = [
        b"",  # keep-alive
        json.dumps({"Records": [minio_record("s3:ObjectCreated:Put", "a b+c%20.jpg", 10, "1")]}).encode(),
        b" ",
        b"",
        json.dumps({"Records": [minio_record("s3:ObjectCreated:Put", "dir/x.jpg", 5, "2"),
                                minio_record("s3:ObjectRemoved:Delete", "old.jpg", 0, "3")]}).encode(),
        b"{not json",
        json.dumps({"Records": [minio_record("s3:ObjectCreated:CompleteMultipartUpload", "big.bin", 99, "4")]}
                   ).encode(),
    ]
    return b"\n".join(lines) + b"\n"


def test_parse_line_keeps_keys_verbatim() -> None:
    assert parse_line(b"   \n", store="m") == []
    (ev,) = parse_line(json.dumps({"Records": [minio_record("s3:ObjectCreated:Put", "a b+c%20.jpg")]}), store="m")
    assert ev.subject == "a b+c%20.jpg" and ev.data["store"] == "m" and ev.data["bucket"] == "photos"


def test_a_listen_line_nested_past_reading_is_one_unreadable_line() -> None:
    """A line nested thousands deep raised RecursionError out of `parse_line`, which the source took for a broken
    connection: it dropped the stream and reconnected after its backoff, missing what MinIO sent meanwhile (listen
    keeps nothing). It is a RecordError now, which the source logs and skips, staying connected."""
    deep = b'{"Records": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    with pytest.raises(RecordError, match="nests deeper than 512 levels"):
        parse_line(deep, store="m")


@pytest.fixture
def fake_minio() -> Iterator[tuple[ThreadingHTTPServer, list[str]]]:
    """An HTTP server that answers ListenBucketNotification with the recorded stream, then closes."""
    yield from serve_stream(stream_bytes())


def serve_stream(payload: bytes) -> Iterator[tuple[ThreadingHTTPServer, list[str]]]:
    """An HTTP server that answers every GET with `payload` (chunked), then closes; and the paths it was asked."""
    paths: list[str] = []

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (payload[:37], payload[37:400], payload[400:]):  # arbitrary network chunking
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True

        def log_message(self, *a: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, paths
    httpd.shutdown()
    httpd.server_close()


def test_a_listen_line_over_the_limit_is_skipped_unread_and_the_stream_kept(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`readline()` without a limit read a line however long it was: an endpoint sending an endless line (hostile,
    or a broken proxy) grew the source's memory until the process died. A line over MAX_LINE_BYTES is now read
    no further than the limit, skipped with one error line, and the lines after it are read as before."""
    monkeypatch.setattr(minio_listen, "MAX_LINE_BYTES", 64 * 1024)
    pad = minio_record("s3:ObjectCreated:Put", "huge.jpg", 1, "H")
    pad["s3"]["object"]["userMetadata"] = {"x-amz-meta-pad": "p" * 1_000_000}  # valid JSON, and 1 MB long
    good = minio_record("s3:ObjectCreated:Put", "after.jpg", 1, "G")
    payload = b"\n".join(json.dumps({"Records": [r]}).encode() for r in (pad, good)) + b"\n"
    serving = serve_stream(payload)
    httpd, _ = next(serving)
    client = minio.Minio(f"127.0.0.1:{httpd.server_address[1]}", access_key="a", secret_key="b", secure=False,
                         region="us-east-1")
    hub = FakeHub()
    src = MinioListenSource(hub.publish, client, bucket="photos", store="minio", backoff_base=30)
    t = threading.Thread(target=src.run, daemon=True)
    caplog.set_level(logging.ERROR, "bucketwire.sources.minio_listen")
    t.start()
    try:
        wait_for(lambda: len(hub.events) >= 1)
    finally:
        src.stop()
        t.join(5)
        next(serving, None)
    assert [e.subject for e in hub.events] == ["after.jpg"], "the over-long line was read and published"
    assert src.connects == 1, "the stream was kept"
    skipped = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(skipped) == 1 and "65536 bytes" in skipped[0] and "photos" in skipped[0], skipped


def test_minio_listen_source_publishes_reconnects_and_stops(
    fake_minio: tuple[ThreadingHTTPServer, list[str]],
) -> None:
    httpd, paths = fake_minio
    client = minio.Minio(f"127.0.0.1:{httpd.server_address[1]}", access_key="a", secret_key="b", secure=False,
                         region="us-east-1")
    hub = FakeHub(fail_first=1)
    src = MinioListenSource(hub.publish, client, bucket="photos", store="minio", prefix="dir/", suffix=".jpg",
                            backoff_base=0.05, backoff_cap=0.2)
    t = threading.Thread(target=src.run, daemon=True)
    t.start()
    wait_for(lambda: src.connects >= 3 and len(hub.events) >= 8)
    src.stop()
    t.join(5)
    assert not t.is_alive()
    first = hub.events[:4]
    assert [(e.type, e.subject) for e in first] == [
        ("s3:ObjectCreated:Put", "a b+c%20.jpg"),
        ("s3:ObjectCreated:Put", "dir/x.jpg"),
        ("s3:ObjectRemoved:Delete", "old.jpg"),
        ("s3:ObjectCreated:CompleteMultipartUpload", "big.bin"),
    ]
    assert hub.events[4].id == first[0].id  # a replay after reconnect has the same ids: the hub dedupes
    assert "prefix=dir%2F" in paths[0] and "suffix=.jpg" in paths[0] and "events=s3%3AObjectCreated" in paths[0]
