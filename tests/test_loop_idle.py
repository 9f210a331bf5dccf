"""An idle hub sleeps until what it waits for is due: its loop does not turn without a reason.

A real hub (ZeroMQ listener, SQLite journal) turned by the test's own thread through `Hub._turn`, the loop's own
step (poll, then tick), with a worker DEALER that acks what it gets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bucketwire import config
from bucketwire import protocol as P
from bucketwire.envelope import SCHEMA_VERSION
from bucketwire.hub.loop import CURSOR_DELAY, Hub
from bucketwire.procutil import free_port


@pytest.fixture()
def hub(tmp_path: Path) -> Iterator[Hub]:
    cfgp = tmp_path / "bucketwire.toml"
    cfgp.write_text(f"""
[hub]
http = "127.0.0.1:{free_port()}"
publish = "tcp://127.0.0.1:{free_port()}"
work = "tcp://127.0.0.1:{free_port()}"
state_dir = "{tmp_path / 'state'}"

[groups.g]
topics = ["x"]
""")
    h = Hub(config.load(cfgp))
    h.net.open()
    h._start(None)
    try:
        yield h
    finally:
        h.ops.close()  # its monitor sockets first, as `Hub.run` does: the context's term waits for every socket
        h.net.close()
        h.journal.close()


def test_a_cursor_write_waits_in_the_poll_not_in_a_spinning_loop(hub: Hub) -> None:
    """After an ack the cursor is written CURSOR_DELAY later, by a commit of its own when nothing else comes. The
    loop must sleep until then. It used to round the wait down to whole milliseconds, so in the last millisecond
    it polled with a timeout of 0, again and again: dozens of turns per ack, and at 1,000 events/s a core's worth
    of wake-ups fighting the handlers for the CPU."""
    ctx = zmq.Context()
    pub, worker = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (pub, worker):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(hub.cfg.hub.work)
    try:
        worker.send_multipart([P.READY, json.dumps({"group": "g", "topics": ["x"], "credit": 10,
                                                    "schema": SCHEMA_VERSION, "proto": 3}).encode()])
        deadline = time.monotonic() + 20
        # Three acks, each waited out on its own: a poll that happens to wake over a millisecond late skips the
        # last millisecond, so one wait alone could look right with the rounding broken. An ack whose turn was
        # held up past CURSOR_DELAY (a busy machine pausing this thread) is written in that same turn: no wait to
        # watch, so it does not count, and another ack is sent (at most 12 in all).
        waited = 0
        for n in range(1, 13):
            env = {"specversion": "1.0", "id": f"e{n}", "source": "test", "type": "t", "topic": "x", "data": {}}
            pub.send_multipart([P.PUB, json.dumps({"req": n, "events": [env]}).encode()])
            delivered: int | None = None
            while delivered is None:
                assert time.monotonic() < deadline, "no DELIVER"
                hub._turn()
                while worker.poll(0):
                    frames = worker.recv_multipart()
                    if frames[0] == P.DELIVER:
                        delivered = int(json.loads(frames[2])[0]["seq"])
            worker.send_multipart([P.ACK, json.dumps({"g": "g", "ok": {"x": [[delivered, delivered]]}})
                                   .encode()])
            while hub.groups["g"].acked["x"] != delivered:
                assert time.monotonic() < deadline, "the ack was not taken"
                hub._turn()
            if hub._cursor_due is None:  # already written in the turn that took the ack
                assert hub.journal.cursors()[("g", "x")] == delivered == n, "the ack's cursor write is not pending"
                continue
            turns = 0
            while hub._cursor_due is not None:
                assert time.monotonic() < deadline, "the cursor was never written"
                hub._turn()
                turns += 1
            assert hub.journal.cursors()[("g", "x")] == delivered == n
            # Sleeping until it is due takes one turn, two when the poll wakes a little early; a heartbeat may add
            # one.
            assert turns <= 3, f"ack {n}: {turns} loop turns to wait {CURSOR_DELAY * 1000:g} ms for a cursor write"
            waited += 1
            if waited == 3:
                break
        assert waited == 3, f"only {waited} of 12 acks left a cursor write pending to wait for"
    finally:
        pub.close()
        worker.close()
        ctx.term()


def test_retention_drops_a_backlog_in_slices_between_turns_not_in_one_stall(hub: Hub) -> None:
    """Retention runs on the loop, and nothing else does meanwhile: it used to drop every expired event in one
    go (a minute of 1,000 events/s: 0.5 s in which no topic was served, 2 s with random ids). Now a call drops at
    most RETENTION_SLICE, and while it is behind the next slice comes as soon as the last one took, with turns
    in between; the loop does not wait the next minute for it, nor spin."""
    from bucketwire.hub.journal import Batch, NewEvent
    from bucketwire.hub.loop import RETENTION_SLICE

    total = 2 * RETENTION_SLICE + RETENTION_SLICE // 2
    hub.journal.commit(Batch(events=[NewEvent("x", "s", f"e{i:06d}", None, b'{"seq":""}') for i in range(total)]))
    hub.journal.db.execute("UPDATE events SET ts = 0")  # type: ignore[attr-defined]  # all past retention_days
    hub._last_retention = float("-inf")
    dropped: list[int] = []
    first = hub.journal.first_seq("x")
    deadline = time.monotonic() + 20
    turns = 0
    while hub.journal.first_seq("x") is not None and time.monotonic() < deadline:
        before = hub.metrics.retention_dropped._value.get()
        hub._turn()
        turns += 1
        n = int(hub.metrics.retention_dropped._value.get() - before)
        if n:
            dropped.append(n)
    assert first == 1 and hub.journal.first_seq("x") is None, "the backlog dropped within 20 s, not a minute later"
    assert dropped == [RETENTION_SLICE, RETENTION_SLICE, RETENTION_SLICE // 2], dropped
    assert turns < 500, f"{turns} turns: the loop spun between slices"
    assert not hub._retention_behind
