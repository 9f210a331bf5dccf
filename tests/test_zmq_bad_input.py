"""An authenticated-but-misbehaving peer on the work socket: every bad frame is rejected and counted, the hub
keeps serving, and the journal is unchanged."""

from __future__ import annotations

import json
import urllib.request

import zmq

BAD_MESSAGES = [
    [b"JUNK"],
    [b"HB"],
    [b"NOPE", b"{}"],
    [b"PUB", b"not json"],
    [b"PUB", b"[1,2,3]"],
    [b"PUB", b'{"req":1}'],
    [b"PUB", b'{"req":1,"events":[{"id":"x"}]}'],
    [b"PUB", json.dumps({"req": 1, "events": [{"specversion": "1.0", "id": "x", "source": "s", "type": "t",
                                               "topic": "x", "schemaversion": 999}]}).encode()],
    [b"PUB", json.dumps({"req": 1, "events": [{"specversion": "1.0", "id": "h", "source": "s", "type": "t",
                                               "topic": "x", "hops": 1000}]}).encode()],
    [b"ACK", b'{"g":"nope","results":[]}'],
    [b"ACK", b'{"g":"g","results":[{"t":"x","s":"one"}]}'],
    [b"ACK", b'{"g":"g","results":[{"t":"x","s":1,"ok":true,"f":[{"bad":1}]}]}'],
    [b"READY", b'{"group":"g","topics":["x"],"credit":-5,"schema":1}'],
    [b"READY", b'{"group":"","topics":"x"}'],
    [b"FETCH", b'{"topic":5}'],
    [b"BYE", b'{"requeue":[[1,2,3]]}'],
    [b"STATUS", b"\xff\xfe"],
    [b"PUB", b"{" * 5000],
]


def test_bad_frames_are_rejected_and_change_nothing(stack_factory):
    s = stack_factory("[groups.g]\ntopics = [\"x\"]\nplugins = []\n")
    s.start_hub()
    with s.client() as c:
        c.publish("x", {"ok": 1})
    before = s.status()["topics"]
    ctx = zmq.Context.instance()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.cfg.client.work)
    for m in BAD_MESSAGES:
        d.send_multipart(m)
    replies = []
    while d.poll(2000):
        replies.append(d.recv_multipart())
        if len(replies) >= len(BAD_MESSAGES):
            break
    errors = [r for r in replies if r[0] in (b"ERR", b"PUBNACK")]
    assert len(errors) >= len(BAD_MESSAGES) - 2, replies  # HB from a stranger is answered with ERR too
    assert all(json.loads(r[1]).get("error") for r in errors)
    # Oversized frame: beyond MAXMSGSIZE the peer is disconnected, nothing is read.
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(s.cfg.client.work)
    big.send_multipart([b"PUB", b"x" * (65 << 20)])
    big.close()
    d.close()
    assert s.status()["topics"] == before, "the journal is unchanged"
    with s.client() as c:
        assert c.publish("x", {"ok": 2})["seq"] == 2, "the hub keeps serving"
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    rejected = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith('bucketwire_ingress_rejected_total{ingress="zmq"'))
    assert rejected >= len(BAD_MESSAGES) - 3


def test_unknown_or_mistyped_header_fields_are_refused_with_the_field_named(stack_factory):
    """Headers are schemas (protocol.py): a misspelt field is an error the peer hears about, not silently ignored
    (a FETCH with `form` instead of `from` used to be answered from seq 1)."""
    s = stack_factory("[groups.g]\ntopics = [\"x\"]\nplugins = []\n")
    s.start_hub()
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.cfg.client.work)
    cases = [
        ([b"FETCH", b'{"req":1,"topic":"x","form":5}'], "unknown field `form`"),
        ([b"READY", b'{"group":"g","topics":["x"],"credit":20000,"schema":1}'], "credit"),
        ([b"ACK", b'{"g":"g","results":[{"t":"x","s":1,"ok":"yes"}]}'], "results[0].ok"),
        ([b"PUB", b'{"req":1,"events":[]}'], "events"),
    ]
    try:
        for frames, needle in cases:
            d.send_multipart(frames)
            assert d.poll(10_000), f"no answer to {frames}"
            cmd, hdr = d.recv_multipart()[:2]
            assert cmd == b"ERR", (frames, cmd, hdr)
            err = json.loads(hdr)["error"]
            assert needle in err and "\n" not in err, (frames, err)
    finally:
        d.close()


def test_a_client_hears_the_hubs_refusal_instead_of_timing_out(stack_factory):
    """The hub answers a request it cannot read with ERR; HubClient took only PUBNACK / fatal ERR as answers, so
    a publish of more than one message may carry (here 72 MB), or a header the hub refuses, ended after the
    timeout as 'no answer from the hub ...; is `bucketwire hub` running?', having sent the request again every
    2 s meanwhile. Now the oversized request is refused before it is sent and the ERR is the answer."""
    import uuid

    import pytest

    from bucketwire import Event
    from bucketwire.client import HubRefused

    s = stack_factory("")
    s.start_hub()
    big = [Event(id=uuid.uuid4().hex, source="urn:t", type="t", topic="big", data={"pad": "x" * 900_000})
           for _ in range(80)]
    with s.client(timeout=30) as c:
        with pytest.raises(HubRefused, match="64 MiB"):
            c.publish_events(big)
        with pytest.raises(HubRefused, match="unknown field `form`"):
            c.request(b"FETCH", {"topic": "x", "form": 5}, {b"EVENTS"})
        assert c.publish("x", {"ok": 1})["seq"] == 1, "the client goes on"
    assert "big" not in s.status()["topics"]
