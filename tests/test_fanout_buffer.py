"""The fan-out (`[hub] publish`) holds at most `fanout_buffer_mb` for a subscriber that stops reading, and an event
over `fanout_event_bytes` goes out as a head frame (`[topic, seq, ""]`, the heartbeat's shape) that subscribers
fetch from the journal: measured on a real hub process (its RSS) with real SUB sockets."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import zmq

from bucketwire import protocol as P
from bucketwire.client import follow
from bucketwire.envelope import Event, new_event_id
from tests.fixtures_hub import Stack, wait_for

EVENTS = int(os.environ.get("BUCKETWIRE_FANOUT_TEST_EVENTS", "20000"))
PAD = 8000


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _sub(s: Stack, topic: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10)  # a reader that stops: its own side keeps little, the hub's pipe the rest
    sock.setsockopt(zmq.RCVBUF, 64 << 10)
    sock.setsockopt(zmq.SUBSCRIBE, P.topic_frame(topic))
    sock.connect(f"tcp://127.0.0.1:{s.pub_port}")
    return sock


def _subscribed(s: Stack, sock: zmq.Socket[bytes], topic: str) -> None:
    """Publish until the hub fans one out to `sock` (the subscription has reached its XPUB), then drain."""
    def seen() -> bool:
        with s.client() as c:
            c.publish(topic, {"warm": True})
        return bool(sock.poll(200))
    wait_for(seen, 20, "the hub to read the subscription")
    while sock.poll(100):
        sock.recv_multipart()


def _events(topic: str, n: int, pad: str) -> list[Event]:
    return [Event(id=new_event_id(), source="bucketwire://test/fanout", type="t", data={"n": i, "pad": pad},
                  topic=topic) for i in range(n)]


def test_a_subscriber_that_stops_reading_holds_at_most_the_fanout_budget(
        stack_factory: Callable[..., Stack]) -> None:
    """20,000 events of 8 KB to a subscriber that stopped reading, with a 4 MiB budget. Before the budget the hub
    kept up to 100,000 messages per subscriber whatever their size (+150 MB RSS here); now about 4 MiB. A `follow`
    (what `tail` runs) from seq 1 still reads every event: what the fan-out dropped comes from the journal."""
    s = stack_factory("")
    text = s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                          "heartbeat_timeout = 1.5\nfanout_buffer_mb = 4\n")
    s.cfg_path.write_text(text)
    s.start_hub()
    assert s.hub_proc is not None
    pid = s.hub_proc.pid
    sock = _sub(s, "big")
    try:
        _subscribed(s, sock, "big")
        pad = "x" * PAD
        with s.client(30) as c:
            c.publish_events(_events("big", 100, pad))  # warm the publish path before the baseline
            base = _rss_kb(pid)
            for _ in range(EVENTS // 100):
                c.publish_events(_events("big", 100, pad))
        grown_mb = (_rss_kb(pid) - base) // 1024
        print(f"hub RSS with a subscriber that stopped reading {EVENTS} events of {PAD} B: +{grown_mb} MB")
        assert grown_mb < 40, f"the hub's RSS grew by {grown_mb} MB for one subscriber that stopped reading"
    finally:
        sock.close(0)
    with s.client() as c:
        head = c.publish("big", {"last": True})["seq"]
    seqs = []
    for _t, seq, _body in follow(s.cfg, ["big"], from_seq=1):
        seqs.append(seq)
        if seq == head:
            break
    assert seqs == list(range(1, head + 1)), "follow read every event once, in order"


def test_an_event_over_fanout_event_bytes_goes_out_as_its_head_and_follow_fetches_it(
        stack_factory: Callable[..., Stack]) -> None:
    s = stack_factory("")
    text = s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                          "heartbeat_timeout = 1.5\nfanout_event_bytes = 4096\n")
    s.cfg_path.write_text(text)
    s.start_hub()
    sock = _sub(s, "mixed")
    try:
        _subscribed(s, sock, "mixed")
        with s.client() as c:
            small = c.publish("mixed", {"size": "small"})
            large = c.publish("mixed", {"size": "large", "pad": "y" * 10_000})
            small2 = c.publish("mixed", {"size": "small again"})
        frames: dict[int, bytes] = {}

        def read() -> bool:
            while sock.poll(50):
                t, seq_b, body = sock.recv_multipart()
                if body or int(seq_b) == large["seq"]:
                    frames.setdefault(int(seq_b), body)
            return {small["seq"], large["seq"], small2["seq"]} <= frames.keys()
        wait_for(read, 20, "the three events on the fan-out")
        assert json.loads(frames[small["seq"]])["data"] == {"size": "small"}
        assert frames[large["seq"]] == b"", "an event over fanout_event_bytes is announced by its seq alone"
        assert json.loads(frames[small2["seq"]])["data"] == {"size": "small again"}
    finally:
        sock.close(0)
    seen: dict[int, dict] = {}
    for _t, seq, body in follow(s.cfg, ["mixed"], from_seq=small["seq"]):
        seen[seq] = json.loads(body)
        if seq == small2["seq"]:
            break
    assert seen[large["seq"]]["data"]["pad"] == "y" * 10_000
    assert [seen[q]["data"]["size"] for q in sorted(seen)] == ["small", "large", "small again"]



def test_a_live_follow_reads_a_large_first_event_of_a_topic_new_since_it_started(
        stack_factory: Callable[..., Stack]) -> None:
    """`tail` with no topics and no --from-seq: a topic created after it started whose first event is over
    fanout_event_bytes reaches it as a head frame only, which must not be taken for "history before I started"."""
    s = stack_factory("")
    s.start_hub()
    got: list[tuple[str, int, dict]] = []

    def run() -> None:
        done = lambda: any(t == "fresh" and q == 2 for t, q, _ in got)  # noqa: E731
        for t, seq, body in follow(s.cfg, None, None, stop=done):
            got.append((t, seq, json.loads(body)))
            if done():
                return

    th = threading.Thread(target=run, daemon=True)
    th.start()

    def warm() -> bool:  # until follow's subscription has reached the hub: it yields what it is sent
        with s.client() as c:
            c.publish("warm", {})
        return any(t == "warm" for t, _, _ in got)
    wait_for(warm, 20, "follow to hear the fan-out")
    with s.client() as c:
        c.publish("fresh", {"pad": "z" * 40_000})
        c.publish("fresh", {"small": True})
    th.join(20)
    fresh = [(seq, d["data"]) for t, seq, d in got if t == "fresh"]
    assert fresh == [(1, {"pad": "z" * 40_000}), (2, {"small": True})], fresh
