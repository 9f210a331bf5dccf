"""Tens of thousands of live topics: the hub's per-topic chores (a PUB heartbeat per topic, rate windows and gauges)
used to run for every topic in one loop turn each heartbeat interval, so with 60,000 topics the loop stopped for
~0.2-0.5 s every second and every event waited behind it (p90 at 1,000/s 345-384 ms against 3-11 ms; `bench
topics`). They now run in slices of HEARTBEAT_SLICE topics, one slice per turn, spread over the interval."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bucketwire import protocol as P
from bucketwire.hub.loop import HEARTBEAT_SLICE
from tests import inprocess

TOPICS = 12_000


class InProcessHub(inprocess.InProcessHub):
    """With a SUB subscribed to every topic of its fan-out."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, f"max_topics = {TOPICS + 10}\nmax_groups = 100000\nheartbeat_interval = 30\n"
                              "heartbeat_timeout = 90")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.cfg.hub.publish)

    def publish(self, topics: list[str]) -> None:
        events = [{"specversion": "1.0", "id": f"e-{t}", "source": "test", "type": "t", "topic": t, "data": {}}
                  for t in topics]
        cmd, _ = self.request([P.PUB, json.dumps({"req": 1, "events": events}).encode()], 30)
        assert cmd == P.PUBACK, cmd

    def drain(self) -> list[list[bytes]]:
        out = []
        while self.sub.poll(20):
            out.append(self.sub.recv_multipart())
        return out

    def close(self) -> None:
        self.sub.close(0)
        super().close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[InProcessHub]:
    h = InProcessHub(tmp_path)
    yield h
    h.close()


def test_heartbeats_of_many_topics_are_spread_over_turns_and_each_topic_gets_one(hub: InProcessHub) -> None:
    for lo in range(0, TOPICS, 2000):
        hub.publish([f"t{i}" for i in range(lo, lo + 2000)])
    deadline = time.monotonic() + 10
    while hub.hub.net.subscriptions() == 0:  # the hub has read the SUB's subscription
        assert time.monotonic() < deadline, "the subscription never reached the hub"
        hub.hub.tick()
    hub.drain()
    sent: list[int] = [0]  # heartbeats the hub sends, counted per turn on its side (the SUB sees them later)
    publish = hub.hub.net.publish

    def counting(frames: list[bytes], pubs: list[zmq.Socket[bytes]] | None = None) -> None:
        sent[0] += frames[2] == b""
        publish(frames, pubs)
    hub.hub.net.publish = counting  # type: ignore[method-assign]
    while hub.hub._hb_todo:  # the round that began while the topics were made ends first
        hub.hub.tick()
    hub.hub._last_hb = float("-inf")  # a heartbeat round over every topic is due on the next turn
    per_turn = []
    for _ in range(TOPICS // HEARTBEAT_SLICE + 5):
        sent[0] = 0
        hub.hub.tick()
        per_turn.append(sent[0])
    assert max(per_turn) <= HEARTBEAT_SLICE, f"one turn sent {max(per_turn)} heartbeats"
    assert sum(per_turn) >= TOPICS, per_turn
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(seen) < TOPICS and time.monotonic() < deadline:
        for topic_b, seq_b, body in hub.drain():
            if body == b"":
                seen[P.topic_of(topic_b)] = int(seq_b)
    assert {f"t{i}" for i in range(TOPICS)} <= seen.keys(), "every live topic gets its heartbeat"
    assert all(seen[f"t{i}"] == 1 for i in range(TOPICS)), "with the topic's head"
    st = hub.hub.ops.extend_status(hub.hub.status(), time.monotonic())
    assert len(st["topics"]) >= TOPICS and all("rate" in v for v in st["topics"].values())


def test_status_lists_only_the_topics_asked_for(hub: InProcessHub) -> None:
    """What `tail TOPIC` asks at its start: the heads of its topics, not of every topic (~0.1-0.2 s of the hub's
    loop and ~2 MB per call with 60,000 topics)."""
    hub.publish([f"t{i}" for i in range(50)])
    hub.dealer.send_multipart([P.STATUS, json.dumps({"req": 7, "topics": ["t3", "t7", "nope"]}).encode()])
    deadline = time.monotonic() + 10
    while not hub.dealer.poll(1):
        assert time.monotonic() < deadline, "no STATUSR"
        hub.hub.tick()
    cmd, hdr = hub.dealer.recv_multipart()[:2]
    st = json.loads(hdr)
    assert cmd == P.STATUSR and st["req"] == 7
    assert st["topics"] == {"t3": {"head": 1, "rate": st["topics"]["t3"]["rate"]},
                            "t7": {"head": 1, "rate": st["topics"]["t7"]["rate"]}}, st["topics"]


def test_status_of_some_topics_from_a_hub_before_the_filter_asks_again_for_all(tmp_path: Path) -> None:
    """A hub from before `topics` refuses the field (unknown fields are errors); `HubClient.status(topics=...)`,
    what `tail TOPIC` runs at its start, then asks for every topic and keeps its own. The old hub here is a ROUTER
    speaking its frames (docs/wire.md)."""
    import threading

    from bucketwire import config
    from bucketwire.client import HubClient
    from bucketwire.procutil import free_port

    port = free_port()
    cfgp = tmp_path / "c.toml"
    cfgp.write_text(f'[client]\nwork = "tcp://127.0.0.1:{port}"\n')
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"tcp://127.0.0.1:{port}")
    asked: list[dict] = []

    def old_hub() -> None:
        for _ in range(2):
            if not router.poll(10_000):
                return
            ident, cmd, raw = router.recv_multipart()
            hdr = json.loads(raw)
            asked.append(hdr)
            if "topics" in hdr:  # what an old hub's decoder answers
                router.send_multipart([ident, P.ERR, json.dumps(
                    {"error": "STATUS header: Object contains unknown field `topics`"}).encode()])
            else:
                router.send_multipart([ident, P.STATUSR, json.dumps(
                    {"req": hdr["req"], "hub": {}, "groups": {},
                     "topics": {"a": {"head": 1}, "b": {"head": 2}, "c": {"head": 3}}}).encode()])

    th = threading.Thread(target=old_hub, daemon=True)
    th.start()
    try:
        with HubClient(config.load(cfgp), timeout=10) as c:
            st = c.status(topics=["b", "zz"])
    finally:
        th.join(10)
        router.close(0)
    assert st["topics"] == {"b": {"head": 2}}
    assert [("topics" in h) for h in asked] == [True, False]

