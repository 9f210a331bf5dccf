"""The ACK's compact form: a worker acks plain successes as per-topic seq ranges, only to a hub that said it reads
them, and the hub applies a range as it would each result. Real hub and worker pool processes, real sockets; the
peer on the other side is a plain DEALER or ROUTER speaking the documented frames (docs/wire.md)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketwire import Event
from bucketwire.envelope import SCHEMA_VERSION
from tests.fixtures_hub import Stack, wait_for

CFG = """
[groups.g]
topics = ["x"]
plugins = []
start = "earliest"
"""


def ev(i: int, seq: int | None = None) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="t", subject=f"b/k{i}", topic="x", seq=seq,
                 data={"bucket": "b", "key": f"k{i}"})


def hub_with(stack_factory: Any, n: int, cfg: str = CFG) -> Stack:
    """A started hub whose topic x holds `n` events (seqs 1..n)."""
    s: Stack = stack_factory(cfg)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(n)])
    return s


def dealer(s: Stack) -> zmq.Socket[bytes]:
    d: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.cfg.client.work)
    return d


def ready(d: zmq.Socket[bytes], proto: int | None) -> None:
    """None: the READY a pool from before proto 2 sends, which carries no `proto` at all."""
    hdr: dict[str, Any] = {"group": "g", "topics": ["x"], "credit": 100, "schema": SCHEMA_VERSION}
    if proto is not None:
        hdr["proto"] = proto
    d.send_multipart([b"READY", json.dumps(hdr).encode()])


def take_delivers(d: zmq.Socket[bytes], n: int) -> tuple[list[dict[str, Any]], list[int]]:
    """DELIVER headers and the seqs they carried, until `n` events arrived (hub heartbeats are skipped)."""
    headers: list[dict[str, Any]] = []
    seqs: list[int] = []
    deadline = time.monotonic() + 20
    while len(seqs) < n:
        assert d.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"only {seqs} delivered"
        frames = d.recv_multipart()
        if frames[0] == b"DELIVER":
            headers.append(json.loads(frames[1]))
            seqs += [int(json.loads(b)["seq"]) for b in frames[2:]]
    return headers, seqs


def err_of(d: zmq.Socket[bytes]) -> str:
    deadline = time.monotonic() + 10
    while True:
        assert d.poll(max(1, int((deadline - time.monotonic()) * 1000))), "no ERR"
        frames = d.recv_multipart()
        if frames[0] == b"ERR":
            return str(json.loads(frames[1])["error"])


def test_a_range_ack_is_read_by_the_hub_with_failures_in_the_full_form(stack_factory: Any) -> None:
    """A worker announcing proto 2 is told `r` in each DELIVER; its ACK of seqs 1-4 and 6-10 as two ranges, with
    seq 5 failed in the full form in the same frame, acks nine events and dead-letters one: the cursor reaches
    10 and nothing is redelivered."""
    s = hub_with(stack_factory, 10, CFG + '\n[topics.x]\nmax_attempts = 1\n')
    d = dealer(s)
    try:
        ready(d, 2)
        headers, seqs = take_delivers(d, 10)
        assert sorted(seqs) == list(range(1, 11))
        assert all(h.get("r") is True for h in headers), headers
        d.send_multipart([b"ACK", json.dumps({
            "g": "g", "ok": {"x": [[1, 4], [6, 10]]},
            "results": [{"t": "x", "s": 5, "ok": False, "error": "boom", "line": "E: boom", "permanent": True}],
        }).encode()])
        wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0, 20, "the group's lag drops to 0")
        assert s.metric("bucketwire_acked_total", group="g") == 9
        assert s.metric("bucketwire_dead_lettered_total", group="g") == 1
        # A range repeated (the worker's ACK sent again after a reconnect) is counted as acked again, no more.
        d.send_multipart([b"ACK", json.dumps({"g": "g", "ok": {"x": [[1, 3]]}}).encode()])
        wait_for(lambda: s.metric("bucketwire_acked_again_total", group="g") == 3, 20, "3 acks counted again")
        assert s.metric("bucketwire_acked_total", group="g") == 9
        assert s.metric("bucketwire_dispatched_total", group="g") == 10, "nothing was handed out twice"
    finally:
        d.close()


def test_a_proto1_worker_gets_and_gives_the_full_form(stack_factory: Any) -> None:
    """A pool from before the compact form must never see `r` (its DELIVER schema refuses unknown fields), and
    its per-event results still ack. Such a pool's READY carries no `proto` (it was left out as the default)."""
    s = stack_factory(CFG)
    s.start_hub()
    for proto, first in ((None, 1), (1, 4)):
        with s.client() as c:
            c.publish_events([ev(i) for i in range(first, first + 3)])
        d = dealer(s)
        try:
            ready(d, proto)
            headers, seqs = take_delivers(d, 3)
            assert all(set(h) == {"a"} for h in headers), (proto, headers)
            d.send_multipart([b"ACK", json.dumps({"g": "g", "results": [
                {"t": "x", "s": q, "ok": True, "f": []} for q in range(first, first + 3)]}).encode()])
            want = first + 2
            wait_for(lambda: s.metric("bucketwire_acked_total", group="g") == want, 20, "3 more acked")  # noqa: B023
            d.send_multipart([b"BYE", b"{}"])
            wait_for(lambda: s.status()["groups"]["g"]["workers"] == 0, 20, "the worker left")
        finally:
            d.close()


def test_bad_ranges_are_refused_whole_and_ack_nothing(stack_factory: Any) -> None:
    """A reversed range, or ranges naming more events than a worker can hold, get an ERR saying so; the valid
    range in the same frame is not applied either, and a few bytes never make the hub walk a billion seqs."""
    s = hub_with(stack_factory, 4)
    d = dealer(s)
    try:
        ready(d, 2)
        take_delivers(d, 4)
        d.send_multipart([b"ACK", b'{"g":"g","ok":{"x":[[1,2],[4,3]]}}'])
        assert "ends before it starts" in err_of(d)
        d.send_multipart([b"ACK", b'{"g":"g","ok":{"x":[[1,2],[3,1000000000]]}}'])
        assert "more than 10000" in err_of(d)
        d.send_multipart([b"ACK", b'{"g":"g","ok":{"x":[[0,2]]}}'])
        assert "ok" in err_of(d)
        assert s.status()["groups"]["g"]["lag"] == 4, "nothing was acked"
        d.send_multipart([b"ACK", b'{"g":"g","ok":{"x":[[1,4]]}}'])
        wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0, 20, "a valid range still acks")
    finally:
        d.close()


def test_a_worker_pool_acks_in_ranges_only_when_the_hub_says_it_reads_them(stack_factory: Any) -> None:
    """A real pool against a peer that answers like a hub: DELIVERs without `r` (a hub from before the compact
    form) get one full result per event; DELIVERs with `r` get the events as ranges. So a new pool keeps working
    with an old hub, and a pool that reads one-frame DELIVERs (proto 3) still reads a frame per event."""
    s = stack_factory(CFG)
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(s.cfg.client.work)
    try:
        s.start_worker("g", 1, wait=False)

        def recv(cmd: bytes) -> list[bytes]:
            deadline = time.monotonic() + 30
            while True:
                assert router.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"no {cmd!r}"
                frames = router.recv_multipart()
                if frames[1] == cmd:
                    return frames
                router.send_multipart([frames[0], b"HB", b"{}"])  # keep it from calling us silent

        def acks(n: int) -> tuple[bytes, list[dict[str, Any]]]:
            """ACK headers until `n` events are acked (a slow first event may get an ACK of its own: ACK_AFTER)."""
            got: list[dict[str, Any]] = []
            count = 0
            while count < n:
                who, _, hdr = recv(b"ACK")
                h = json.loads(hdr)
                got.append(h)
                count += len(h.get("results", [])) + sum(b - a + 1 for rs in h.get("ok", {}).values() for a, b in rs)
            return who, got

        ident, _, hdr = recv(b"READY")
        assert json.loads(hdr)["proto"] == 3  # today's pool: it also reads one-frame DELIVERs (test_deliver_joined)
        router.send_multipart([ident, b"DELIVER", b'{"a":[1,1,1]}', *(ev(i, i).to_json() for i in (1, 2, 3))])
        ident, old = acks(3)
        assert all("ok" not in h for h in old), old
        assert [(r["s"], r["ok"]) for h in old for r in h["results"]] == [(1, True), (2, True), (3, True)]
        router.send_multipart([ident, b"DELIVER", b'{"a":[1,1,1,1],"r":true}',
                               *(ev(i, i).to_json() for i in (4, 5, 6, 8))])
        ident, new = acks(4)
        assert all(set(h) == {"g", "ok"} and set(h["ok"]) == {"x"} for h in new), new
        runs = [h["ok"]["x"] for h in new]
        assert [q for rs in runs for a, b in rs for q in range(a, b + 1)] == [4, 5, 6, 8], runs
        merged = all(x[1] + 1 < y[0] for rs in runs for x, y in zip(rs, rs[1:], strict=False))
        assert merged, f"consecutive seqs not merged into one range: {runs}"
        if len(new) == 1:
            assert runs == [[[4, 6], [8, 8]]]
        assert sorted(r["s"] for r in s.handled()) == [1, 2, 3, 4, 5, 6, 8]
    finally:
        router.close()


@pytest.mark.parametrize("form", ["ranges", "full"])
def test_an_ack_for_events_not_yet_handed_out_skips_none_of_them(stack_factory: Any, form: str) -> None:
    """A buggy or hostile worker acks seqs the hub has not handed out (here: not even published yet), in either
    form. Applied, those acks would make the group skip the events once they are published; they are ignored
    (and logged), and the events that come later are all delivered."""
    s = hub_with(stack_factory, 1)
    d = dealer(s)
    try:
        ready(d, 2)
        _, seqs = take_delivers(d, 1)
        assert seqs == [1]
        ack: dict[str, Any] = ({"g": "g", "ok": {"x": [[1, 50]]}} if form == "ranges" else
                               {"g": "g", "results": [{"t": "x", "s": q, "ok": True, "f": []} for q in range(1, 51)]})
        d.send_multipart([b"ACK", json.dumps(ack).encode()])
        wait_for(lambda: s.metric("bucketwire_acked_total", group="g") == 1, 20, "seq 1 acked")
        with s.client() as c:
            c.publish_events([ev(i) for i in range(1, 6)])
        _, seqs = take_delivers(d, 5)
        assert sorted(seqs) == [2, 3, 4, 5, 6]
        wait_for(lambda: "ack for events the group has not loaded" in s.dump_logs(), 10, "the ignored ack logged")
    finally:
        d.close()


def _ranges_one_seq_at_a_time(oks: list[tuple[str, int]]) -> dict[str, list[list[int]]]:
    """How a child built its ranges before they were built a stretch at a time: each seq extends its topic's last
    range when it follows on, else starts one."""
    runs: dict[str, list[list[int]]] = {}
    for t, s in oks:
        rs = runs.get(t)
        if rs is None:
            runs[t] = [[s, s]]
        elif rs[-1][1] + 1 == s:
            rs[-1][1] = s
        else:
            rs.append([s, s])
    return runs


@settings(max_examples=400, deadline=None, derandomize=True)
@given(oks=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 12)), max_size=40))
def test_a_childs_ack_ranges_are_what_acking_seq_by_seq_made(oks: list[tuple[str, int]]) -> None:
    """Whatever the order of its events (topics interleaved, seqs repeated, out of order, in runs), a child's ACK
    names exactly the ranges, in the same order, that it built one seq at a time: the same bytes."""
    from bucketwire import protocol as P
    from bucketwire.worker.child import ack_frame

    want = _ranges_one_seq_at_a_time(oks)
    assert ack_frame("g", list(oks), [], True) == P.enc({"g": "g", "ok": want})
    failed = [{"t": "a", "s": 1, "ok": False, "error": "x"}]
    assert ack_frame("g", list(oks), failed, True) == P.enc({"g": "g", "ok": want, "results": failed})


def test_a_bad_follow_on_in_an_ack_fails_its_own_event_and_the_rest_of_the_ack_applies(stack_factory: Any) -> None:
    """A worker (an older pool, or a hostile one) whose ACK carries a follow-on the hub cannot read: the hub applied
    the ACK's results one by one and stopped at that one, so the results after it were never applied and those
    events stayed in flight as long as the worker lived (later events of their objects waiting behind them). Now
    the bad follow-on fails its own event (dead-lettered, saying why) and every other result applies."""
    s = hub_with(stack_factory, 3)
    d = dealer(s)
    try:
        ready(d, 1)
        _, seqs = take_delivers(d, 3)
        assert sorted(seqs) == [1, 2, 3]
        good_fo = {"specversion": "1.0", "id": "fo-1", "source": "w", "type": "t", "topic": "y", "data": {}}
        bad_fo = {"specversion": "1.0", "source": "w", "type": "t", "topic": "y", "data": {}}  # no id
        d.send_multipart([b"ACK", json.dumps({"g": "g", "results": [
            {"t": "x", "s": 1, "ok": True, "f": [good_fo]},
            {"t": "x", "s": 2, "ok": True, "f": [bad_fo]},
            {"t": "x", "s": 3, "ok": True, "f": []},
        ]}).encode()])
        wait_for(lambda: s.status()["groups"]["g"]["inflight"] == 0, 20, "nothing left in flight")
        assert s.metric("bucketwire_acked_total", group="g") == 2
        assert s.metric("bucketwire_dead_lettered_total", group="g") == 1
        with s.client() as c:
            _, dl = c.fetch("dead-letter", 1)
            _, fos = c.fetch("y", 1)
        (letter,) = [json.loads(b) for b in dl]
        assert letter["data"]["event"]["seq"] in (2, "2") and "follow-on" in letter["data"]["error"], letter
        assert [json.loads(b)["data"] for b in fos] == [{}], "the good follow-on was committed"
    finally:
        d.close()
