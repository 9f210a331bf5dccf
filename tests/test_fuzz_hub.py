"""Fuzzing a running hub: hostile webhook bodies over HTTP and hostile frames from an authenticated (CURVE) but
misbehaving ZeroMQ peer. Every bad input is answered with an error and counted in
bucketwire_ingress_rejected_total, the hub keeps serving, and the journal is unchanged.

Examples per test: BUCKETWIRE_FUZZ_EXAMPLES (default 150 here).
"""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketwire import security
from tests.fixtures_hub import Stack
from tests.test_fuzz import EXAMPLES, JSONV
from tests.test_security import authorize, make_keys, security_toml

HUB_EXAMPLES = min(EXAMPLES, 150) if EXAMPLES <= 150 else EXAMPLES
FUZZ = settings(max_examples=HUB_EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
GROUPS = '\n[groups.g]\ntopics = ["x"]\nplugins = []\n'
COMMANDS = [b"READY", b"ACK", b"HB", b"BYE", b"PUB", b"FETCH", b"STATUS", b"JUNK", b"", b"\xff" * 40]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("fuzzhub")
    make_keys(d / "sec", "hub", "admin")
    authorize(d / "sec", "admin")
    (d / "stack").mkdir()
    s = Stack(d / "stack", GROUPS + security_toml(d / "sec"))
    s.start_hub()
    with s.client() as c:
        c.publish("x", {"ok": 1})
    yield s
    s.stop()


def heads(s: Stack) -> dict[str, int]:
    return {t: v["head"] for t, v in s.status()["topics"].items()}


def rejected(s: Stack, ingress: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f'bucketwire_ingress_rejected_total{{ingress="{ingress}"'))


class Peer:
    """An authenticated DEALER that sends anything, then proves the hub still answers with a STATUS probe."""

    def __init__(self, s: Stack) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_client(self.sock, s.cfg)
        self.sock.connect(s.cfg.client.work)
        self.req = itertools.count(10**9)

    def send_and_probe(self, frames: list[bytes]) -> list[list[bytes]]:
        self.sock.send_multipart(frames)
        req = next(self.req)
        self.sock.send_multipart([b"STATUS", json.dumps({"req": req}).encode()])
        got = []
        while self.sock.poll(10_000):
            m = self.sock.recv_multipart()
            if m[0] == b"STATUSR" and json.loads(m[1]).get("req") == req:
                return got
            got.append(m)
        raise AssertionError("the hub stopped answering")

    def close(self) -> None:
        self.sock.close(0)


header = st.one_of(st.binary(max_size=200), JSONV.map(lambda v: json.dumps(v).encode()),
                   st.dictionaries(st.sampled_from(["req", "group", "topics", "credit", "schema", "g", "results",
                                                    "events", "topic", "from", "limit", "requeue", "start"]),
                                   JSONV, max_size=5).map(lambda v: json.dumps(v).encode()))
frames_st = st.one_of(
    st.lists(st.binary(max_size=200), min_size=1, max_size=6),
    st.tuples(st.sampled_from(COMMANDS), header, st.lists(st.binary(max_size=100), max_size=3))
      .map(lambda t: [t[0], t[1], *t[2]]),
)


def test_zmq_frames_from_an_authenticated_peer(hub: Stack) -> None:
    before = heads(hub)
    r0 = rejected(hub, "zmq")
    peer = Peer(hub)
    stats = {"sent": 0, "answered_err": 0}

    @FUZZ
    @given(frames=frames_st)
    def run(frames: list[bytes]) -> None:
        replies = peer.send_and_probe(frames)
        stats["sent"] += 1
        malformed = len(frames) < 2
        if not malformed:
            try:
                malformed = not isinstance(json.loads(frames[1]), dict)
            except (ValueError, UnicodeDecodeError):
                malformed = True
        if malformed:
            assert any(r[0] == b"ERR" and json.loads(r[1]).get("error") for r in replies), (frames, replies)
            stats["answered_err"] += 1
        for r in replies:
            assert r[0] in (b"ERR", b"PUBNACK", b"PUBACK", b"EVENTS", b"STATUSR", b"DELIVER", b"HB", b"REPLAYR",
                            b"BYE"), r

    try:
        run()
    finally:
        # leave no registered worker behind: a fuzzed READY may have joined group g
        peer.sock.send_multipart([b"BYE", b"{}"])
        peer.close()
    assert heads(hub) == before, "the journal is unchanged"
    assert rejected(hub, "zmq") - r0 >= stats["answered_err"] > 0
    with hub.client() as c:
        assert c.publish("x", {"still": "serving"})["seq"] == before["x"] + 1


def test_oversized_frame_disconnects_only_that_peer(hub: Stack) -> None:
    peer = Peer(hub)
    peer.sock.send_multipart([b"PUB", b"x" * (65 << 20)])  # beyond MAXMSGSIZE (64 MiB): dropped, not read
    other = Peer(hub)
    assert other.send_and_probe([b"HB", b"{}"])[0][0] == b"ERR"
    other.close()
    peer.close()
    assert hub.healthy()


@pytest.mark.parametrize("path", ["/minio/events", "/seaweedfs/events", "/events"])
def test_webhook_bodies_over_http(hub: Stack, path: str) -> None:
    before = heads(hub)
    r0 = rejected(hub, "http")
    conn = http.client.HTTPConnection("127.0.0.1", hub.http_port, timeout=10)
    counts = {"4xx": 0, "200": 0}

    @FUZZ
    @given(body=st.one_of(st.binary(max_size=400), JSONV.map(lambda v: json.dumps(v).encode())))
    def run(body: bytes) -> None:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {hub.token}"})
        r = conn.getresponse()
        doc = json.loads(r.read())
        if r.status == 200:
            assert doc.get("accepted", 0) == 0, (body, doc)  # random input must never commit an event
            counts["200"] += 1
        else:
            assert 400 <= r.status < 500 and doc.get("error"), (body, r.status, doc)
            counts["4xx"] += 1
        if r.getheader("Connection", "").lower() == "close":
            conn.close()

    run()
    conn.close()
    assert heads(hub) == before, "the journal is unchanged"
    assert rejected(hub, "http") - r0 == counts["4xx"] > 0
    assert hub.healthy()


def test_fixture_key_dir_layout(hub: Stack) -> None:
    assert Path(hub.cfg.security.authorized_keys_dir, "admin.key").exists()
