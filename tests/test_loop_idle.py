"""An idle hub sleeps until what it waits for is due: its loop does not turn without a reason.

A real hub (ZeroMQ listener, SQLite journal) turned by the test's own thread through `Hub._turn`, the loop's own
step (poll, then tick), with a worker DEALER that acks what it gets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
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



def _yields_per_publish(hub: Hub, monkeypatch: pytest.MonkeyPatch, quick: float,
                        sizes: list[int]) -> list[list[list[bytes]]]:
    """Publish one event with no worker, then, after a worker joined and acked it, one PUB of each of `sizes`
    events, each acked before the next; for each PUB, the frames the hub had sent (commands) at each yield."""
    monkeypatch.setattr("bucketwire.hub.loop.HAND_OFF_QUICK", quick)
    sent: list[bytes] = []
    yields: list[list[bytes]] = []
    send = hub.net.send

    def recording_send(frames: list[bytes]) -> bool:
        sent.append(frames[1])
        return send(frames)

    monkeypatch.setattr(hub.net, "send", recording_send)
    monkeypatch.setattr("os.sched_yield", lambda: yields.append(list(sent)))
    ctx = zmq.Context()
    pub, worker = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (pub, worker):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(hub.cfg.hub.work)
    deadline = time.monotonic() + 20
    n = 0
    out: list[list[list[bytes]]] = []

    def turn_until(cond: Callable[[], bool], what: str) -> None:
        while not cond():
            assert time.monotonic() < deadline, what
            hub._turn()

    def publish(count: int) -> None:
        nonlocal n
        yields.clear()
        sent.clear()
        events = []
        for _ in range(count):
            n += 1
            events.append({"specversion": "1.0", "id": f"e{n}", "source": "test", "type": "t", "topic": "x",
                           "data": {}})
        pub.send_multipart([P.PUB, json.dumps({"req": n, "events": events}).encode()])
        turn_until(lambda: bool(pub.poll(0)), "no PUBACK")
        assert pub.recv_multipart()[0] == P.PUBACK
        out.append(list(yields))

    def work_off() -> None:
        """Take every DELIVER until the hub holds nothing in flight, acking each batch at once."""
        while True:
            turn_until(lambda: bool(worker.poll(0)) or not hub.groups["g"].inflight, "a DELIVER did not come")
            if not worker.poll(0):
                return
            frames = worker.recv_multipart()
            if frames[0] != P.DELIVER:
                continue
            seqs = [int(e["seq"]) for e in json.loads(frames[2])]
            worker.send_multipart([P.ACK, json.dumps({"g": "g", "ok": {"x": [[min(seqs), max(seqs)]]}}).encode()])
            top = max(seqs)
            turn_until(lambda: hub.groups["g"].acked.get("x") == top, "the ack was not taken")  # noqa: B023

    try:
        publish(1)  # no worker yet: committed, handed to nobody
        worker.send_multipart([P.READY, json.dumps({"group": "g", "topics": ["x"], "credit": 100,
                                                    "schema": SCHEMA_VERSION, "proto": 3}).encode()])
        turn_until(lambda: bool(hub.groups["g"].inflight), "the backlog was not handed to the worker")
        work_off()
        for size in sizes:
            publish(size)
            work_off()
    finally:
        pub.close()
        worker.close()
        ctx.term()
    return out


def test_a_small_commit_handed_to_a_quick_worker_yields_the_cpu_after_its_pubacks(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a modest rate the kernel wakes the worker child on the hub's CPU, where it waited for the rest of the hub's
    turn; the hub now yields right after its DELIVERs and PUBACKs (`HAND_OFF_MAX`). Not before the PUBACK (the
    publisher's confirmation must not wait for a handler), not when nothing was handed (a yield for nobody), and not
    for a large commit (a saturated hub's workers are busy already)."""
    from bucketwire.hub.loop import HAND_OFF_MAX

    nobody, small, large = _yields_per_publish(hub, monkeypatch, 60.0, [1, HAND_OFF_MAX + 1])
    assert nobody == [], "yielded with no event handed to a worker"
    assert len(small) == 1, f"{len(small)} yields for a one-event commit handed to a worker"
    assert small[0][-2:] == [P.DELIVER, P.PUBACK], f"yielded after {small[0]}, not after DELIVER and PUBACK"
    assert large == [], "a commit larger than HAND_OFF_MAX yielded"


def test_a_worker_whose_batches_take_long_is_not_yielded_to(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub gets its CPU back only when the handler is done or the kernel's slice ends: a worker whose last
    batch took longer than HAND_OFF_QUICK from DELIVER to ACK (here: any) would hold the hub's turn that long."""
    nobody, small, again = _yields_per_publish(hub, monkeypatch, 0.0, [1, 1])
    assert nobody == small == again == [], "yielded to a worker slower than HAND_OFF_QUICK"
