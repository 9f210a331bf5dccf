"""The PUB fan-out with real hub processes and a real SUB socket: the hub sends a committed event to the fan-out
only when a subscriber wants its topic (the XPUB tells it), and a subscriber that arrives is served live."""

from __future__ import annotations

import time
from typing import Any

import zmq

from bucketwire import protocol as P
from tests.fixtures_hub import Stack, wait_for
from tests.test_ops import publish


def _recv(sock: zmq.Socket, deadline: float) -> list[bytes]:
    """The next message on `sock`, or fail at `deadline` (a subscriber that is never served)."""
    while time.monotonic() < deadline:
        if sock.poll(100):
            return sock.recv_multipart()
    raise AssertionError("no message on the subscriber before the deadline")


def test_fan_out_skips_topics_nobody_subscribes_and_serves_a_subscriber(stack_factory: Any) -> None:
    s: Stack = stack_factory()
    s.start_hub()
    publish(s, 3)
    wait_for(lambda: s.metric("bucketwire_fanout_skipped_total") == 3, 20, "three events not fanned out")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, P.topic_frame("jobs"))
    sub.connect(s.cfg.hub.publish)
    try:
        wait_for(lambda: s.metric("bucketwire_fanout_subscriptions") == 1, 20, "the hub to see the subscription")
        publish(s, 2)
        deadline = time.monotonic() + 20
        got = []
        while len(got) < 2:
            topic, seq, body = _recv(sub, deadline)
            if body:  # heartbeats ([topic, head, b""]) are not events
                got.append((topic, int(seq)))
        assert got == [(b"jobs\0", 4), (b"jobs\0", 5)]
        assert s.metric("bucketwire_fanout_skipped_total") == 3
    finally:
        sub.close(0)
        ctx.term()
    # The subscriber left: the hub stops sending again.
    wait_for(lambda: s.metric("bucketwire_fanout_subscriptions") == 0, 20, "the hub to see the subscriber leave")
    publish(s, 1)
    wait_for(lambda: s.metric("bucketwire_fanout_skipped_total") == 4, 20, "the next event not fanned out")
