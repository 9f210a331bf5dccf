"""Proto 3: a DELIVER batch's envelopes travel as ONE frame (a JSON array of the committed envelopes), to a worker
whose READY says proto 3, and a frame each to older ones. Real hub and worker pool processes, real sockets; the
peer on the other side is a plain DEALER or ROUTER speaking the documented frames (docs/wire.md)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from bucketwire import Event
from bucketwire.envelope import SCHEMA_VERSION
from tests.fixtures_hub import Stack, wait_for

ENVELOPES = str(Path(__file__).parent / "plugins" / "envelopes.py")

CFG = """
[groups.g]
topics = ["x"]
plugins = []
start = "earliest"
"""


def ev(i: int, seq: int | None = None, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="t", subject=f"b/k{i}", topic="x", seq=seq,
                 data={"bucket": "b", "key": f"k{i}", **data})


def committed(s: Stack, first: int, last: int) -> list[bytes]:
    """The envelopes of seqs first..last as the journal holds them."""
    out: list[bytes] = []
    with s.client() as c:
        while first + len(out) <= last:
            _, bodies = c.fetch("x", first + len(out), min(1000, last - first - len(out) + 1))
            assert bodies, "the journal ends early"
            out += bodies
    return out[: last - first + 1]


def test_a_proto3_worker_gets_one_frame_of_the_committed_envelopes_and_older_ones_a_frame_each(
        stack_factory: Any) -> None:
    """Each version of worker gets the DELIVER it reads: before proto 3 a frame per envelope and no `j` (the
    DELIVER schema of those pools refuses unknown fields); from proto 3 `j` and one frame, the committed
    envelopes untouched inside a JSON array, as many as the header has attempts."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    first = 1
    for proto in (None, 1, 2, 3):
        with s.client() as c:
            c.publish_events([ev(i, note="ü €", n=[1, 2.5, None]) for i in range(first, first + 4)])
        want = committed(s, first, first + 3)
        d: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(s.cfg.client.work)
        try:
            hdr: dict[str, Any] = {"group": "g", "topics": ["x"], "credit": 100, "schema": SCHEMA_VERSION}
            if proto is not None:
                hdr["proto"] = proto
            d.send_multipart([b"READY", json.dumps(hdr).encode()])
            got: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(got) < 4:
                assert d.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"proto {proto}: {len(got)} of 4"
                frames = d.recv_multipart()
                if frames[0] != b"DELIVER":
                    continue
                h = json.loads(frames[1])
                if proto == 3:
                    assert h.get("j") is True and h.get("r") is True, h
                    assert len(frames) == 3, f"{len(frames) - 2} envelope frames, not one"
                    items = json.loads(frames[2])
                    assert len(items) == len(h["a"])
                    n = len(items)
                    assert frames[2] == b"[" + b",".join(want[len(got):len(got) + n]) + b"]", "not as committed"
                    got += want[len(got):len(got) + n]
                else:
                    assert "j" not in h, (proto, h)
                    got += frames[2:]
            assert got == want, f"proto {proto}: the envelopes are not the committed bytes"
            d.send_multipart([b"ACK", json.dumps({"g": "g", "results": [
                {"t": "x", "s": q, "ok": True, "f": []} for q in range(first, first + 4)]}).encode()])
            wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0, 20, "the 4 events acked")
            d.send_multipart([b"BYE", b"{}"])
            wait_for(lambda: s.status()["groups"]["g"]["workers"] == 0, 20, "the worker left")
        finally:
            d.close()
        first += 4


def test_a_proto3_pool_handles_every_event_once_with_the_envelope_as_committed(stack_factory: Any,
                                                                               tmp_path: Path) -> None:
    """A real hub and a real proto-3 pool, many events per DELIVER: every event is handled once, and each handler
    sees the envelope the hub committed, byte for byte once written back out (integers past 64 bits included: a
    parser that turns them into floats would hand the plugin other data than was published)."""
    n = 300
    seen = tmp_path / "seen.jsonl"
    s: Stack = stack_factory(CFG + f'\n[plugins.envelopes]\npath = "{seen}"\n')
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i, note="ü €\u2028", f=i / 7, nest={"a": [i, {"b": None}]}, big=2**63 + i,
                             huge=2**70 + i, low=-(2**65) - i)
                          for i in range(n)])
    s.start_worker("g", 1, "--plugin", ENVELOPES)
    wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0, 30, "every event acked")
    assert sorted(r["s"] for r in s.handled()) == list(range(1, n + 1)), "not every event handled exactly once"
    lines = seen.read_bytes().splitlines()
    by_seq = {int(json.loads(b)["seq"]): b for b in lines}
    assert len(lines) == len(by_seq) == n
    assert [by_seq[q] for q in range(1, n + 1)] == committed(s, 1, n), "a handler saw another envelope"
    assert s.metric("bucketwire_dispatch_batches_total", group="g") < n / 2, "the events were not batched"


def test_a_pool_refuses_a_broken_one_frame_deliver_and_gives_its_events_back(stack_factory: Any) -> None:
    """A one-frame DELIVER that cannot be read (not JSON, truncated, not an array, a count other than its
    header's, two frames) runs and acks none of its events: the child says so, gives the events back (BYE, with
    `refused`: the hub charges that batch) so the hub hands them out again, and joins again (READY); then it
    handles a good one. Against a peer that answers like a hub (once like a hub that does not know `refused`:
    the child then leaves with a plain BYE rather than let that hub keep the events)."""
    s: Stack = stack_factory(CFG)
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(s.cfg.client.work)
    try:
        s.start_worker("g", 1, wait=False)

        def recv() -> list[bytes]:
            """The next command other than a heartbeat (answered, so the child does not call us silent)."""
            deadline = time.monotonic() + 30
            while True:
                assert router.poll(max(1, int((deadline - time.monotonic()) * 1000))), "nothing from the pool"
                frames = router.recv_multipart()
                if frames[1] != b"HB":
                    return frames
                router.send_multipart([frames[0], b"HB", b"{}"])

        ident, cmd, hdr = recv()
        assert cmd == b"READY" and json.loads(hdr)["proto"] == 3
        e = [ev(i, i).to_json() for i in range(1, 4)]
        whole = b"[" + b",".join(e) + b"]"
        broken = {
            "truncated": [b'{"a":[1,1,1],"r":true,"j":true}', whole[:-40]],
            "not JSON": [b'{"a":[1,1,1],"r":true,"j":true}', b"\xff" + whole],
            "not an array": [b'{"a":[1],"r":true,"j":true}', e[0]],
            "fewer than its attempts": [b'{"a":[1,1,1,1],"r":true,"j":true}', whole],
            "more than its attempts": [b'{"a":[1,1],"r":true,"j":true}', whole],
            "two frames": [b'{"a":[1,1,1],"r":true,"j":true}', whole, whole],
        }
        for what, frames in broken.items():
            router.send_multipart([ident, b"DELIVER", *frames])
            who, cmd, hdr = recv()
            assert cmd == b"BYE", f"{what}: {cmd!r} {hdr!r} before the BYE"
            assert json.loads(hdr) == {"requeue": [], "refused": True}, what  # the hub charges that batch
            if what == "truncated":  # answered as a hub from before `refused` does: the plain BYE follows
                router.send_multipart([who, b"ERR", json.dumps(
                    {"error": "BYE header: Object contains unknown field `refused`"}).encode()])
                who, cmd, hdr = recv()
                assert (cmd, json.loads(hdr)) == (b"BYE", {"requeue": []}), f"{what}: {cmd!r} {hdr!r}"
            router.send_multipart([who, b"BYE", b"{}"])
            who, cmd, hdr = recv()
            assert cmd == b"READY", f"{what}: {cmd!r} instead of joining again"
            assert who == ident  # the same connection: the hub ended its registration at the BYE
        router.send_multipart([ident, b"DELIVER", b'{"a":[1,1],"r":true,"j":true}',
                               b"[" + ev(7, 7).to_json() + b"," + ev(8, 8).to_json() + b"]"])
        who, cmd, hdr = recv()
        # Acked once each: in one ACK, or in two when the first handler took longer than ACK_AFTER (a loaded machine).
        acked: list[int] = []
        while True:
            assert cmd == b"ACK", (cmd, hdr)
            ack = json.loads(hdr)
            assert ack["g"] == "g" and list(ack) == ["g", "ok"] and list(ack["ok"]) == ["x"], ack
            acked += [s for a, b in ack["ok"]["x"] for s in range(a, b + 1)]
            if len(acked) >= 2:
                break
            who, cmd, hdr = recv()
        assert acked == [7, 8], acked
        assert sorted(r["s"] for r in s.handled()) == [7, 8], "an event of a broken DELIVER ran"
        logs = "".join(p.read_text() for p in s.logs)  # whole files: dump_logs keeps only their ends
        assert logs.count("refusing a DELIVER from the hub") == len(broken), logs[-3000:]
        assert "envelope frame is not JSON" in logs and "holds 3 envelopes, its header 4 attempts" in logs
    finally:
        router.close()


def test_what_a_pool_gives_back_that_way_the_hub_hands_out_again(stack_factory: Any) -> None:
    """The other half, against the real hub: what a pool does with a DELIVER it cannot read (BYE naming none of
    its events with `refused`, then READY on the same connection) gets those events handed out again, charged
    the attempt they were sent with, so none is lost and a batch that always arrives broken ends as dead letters
    after max_attempts. A BYE without `refused` gives the same events back uncharged: leaving is no evidence
    that anything ran (it used to charge them, so a peer that took batches and left spent their attempts)."""
    s: Stack = stack_factory(CFG + "\n[topics.x]\nmax_attempts = 3\nbackoff_base = 0.05\nbackoff_max = 0.1\n")
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(3)])
    d: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.cfg.client.work)
    ready = json.dumps({"group": "g", "topics": ["x"], "credit": 100, "schema": SCHEMA_VERSION, "proto": 3})

    def deliver() -> tuple[list[int], list[int]]:
        """The next DELIVERs, until they hold the three events (a charged batch may come back in parts)."""
        attempts: dict[int, int] = {}
        deadline = time.monotonic() + 20
        while len(attempts) < 3:
            assert d.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"no DELIVER, after {attempts}"
            frames = d.recv_multipart()
            if frames[0] == b"DELIVER":
                h = json.loads(frames[1])
                assert h.get("j") is True and len(frames) == 3, h
                attempts.update(zip([int(e["seq"]) for e in json.loads(frames[2])], h["a"], strict=True))
            d.send_multipart([b"HB", b"{}"])
        return [attempts[q] for q in sorted(attempts)], sorted(attempts)

    def leave(bye: bytes) -> None:
        d.send_multipart([b"BYE", bye])
        deadline = time.monotonic() + 10
        while d.poll(max(1, int((deadline - time.monotonic()) * 1000))) and d.recv_multipart()[0] != b"BYE":
            pass
        d.send_multipart([b"READY", ready.encode()])

    try:
        d.send_multipart([b"READY", ready.encode()])
        assert deliver() == ([1, 1, 1], [1, 2, 3])
        leave(b'{"requeue":[]}')
        assert deliver() == ([1, 1, 1], [1, 2, 3]), "a plain BYE charged the events it held"
        leave(b'{"requeue":[],"refused":true}')
        assert deliver() == ([2, 2, 2], [1, 2, 3])
        # Their retries come back after a jittered backoff, so in batches of their own now: refuse each batch as
        # it comes (only that batch is charged) until all three are dead letters, each after its third attempt.
        last = {1: 2, 2: 2, 3: 2}
        leave(b'{"requeue":[],"refused":true}')  # the earliest batch of the three (all of them, or the first ones)
        deadline = time.monotonic() + 30
        while s.status()["groups"]["g"]["dead_lettered"] < 3:
            assert time.monotonic() < deadline, f"not dead-lettered: {last}"
            if not d.poll(200):
                continue
            frames = d.recv_multipart()
            if frames[0] == b"DELIVER":
                got = dict(zip([int(e["seq"]) for e in json.loads(frames[2])], json.loads(frames[1])["a"], strict=True))
                assert all(a in (last[q], last[q] + 1) for q, a in got.items()), f"{got} after {last}"
                last.update(got)
                leave(b'{"requeue":[],"refused":true}')
        assert last == {1: 3, 2: 3, 3: 3}, last
        wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0, 20, "the dead letters to move the cursor")
    finally:
        d.close()
