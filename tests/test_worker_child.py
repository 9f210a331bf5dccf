"""The worker child is one thread: an event goes socket -> handler -> ack without crossing a thread, and a long
handler still looks alive to the hub (its supervisor heartbeats for it). Real hub and worker pool processes."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from bucketwire import Event
from tests.fixtures_hub import wait_for

CFG = """
[topics.jobs]
max_attempts = 3
backoff_base = 0.1
backoff_max = 0.5

[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
"""


def job(key: str, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject=key, topic="jobs",
                 data={"bucket": "b", "key": key, **data})


def thread_names(pid: int) -> dict[int, str]:
    tasks = Path(f"/proc/{pid}/task")
    return {int(t.name): (t / "comm").read_text().strip() for t in tasks.iterdir()}


def test_a_worker_child_runs_one_python_thread(stack_factory: Any) -> None:
    """Every thread of a child besides its main one is libzmq's own (I/O and reaper): no Python thread hands
    events to another, so an event wakes one thread of ours, not two."""
    s = stack_factory(CFG)
    s.start_hub()
    pool = s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([job(f"k{i}") for i in range(20)])
    wait_for(lambda: len(s.handled()) == 20, 30, "20 events handled")
    (child,) = s.child_pids(pool)
    others = {tid: name for tid, name in thread_names(child).items() if tid != child}
    assert others and all(name.startswith("ZMQbg/") for name in others.values()), others


def test_a_handler_longer_than_the_heartbeat_timeout_keeps_its_worker(stack_factory: Any) -> None:
    """The child's one thread is inside the handler for 2.5 s, past the hub's 1.5 s heartbeat timeout: the hub
    still counts the worker (its supervisor speaks for it), so the event is handled once, on its first attempt,
    and nothing is redelivered."""
    s = stack_factory(CFG)
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([job("long", sleep=2.5), job("after")])
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0 and len(s.handled()) >= 2, 30,
             "both events handled and acked")
    attempts = sorted((r["key"], r["a"]) for r in s.handled())
    assert attempts == [("after", 1), ("long", 1)], attempts
    assert s.metric("bucketwire_redelivered_total", group="a") == 0
    assert s.status()["groups"]["a"]["workers"] == 1


def test_the_hub_answers_a_bye_once_the_worker_is_gone(stack_factory: Any) -> None:
    """A draining child closes its connection only after the hub answered its BYE: one that closed right after
    sending it lost the BYE now and then under load, and the hub never logged that the worker left (seen as
    `bucketwire dev` stopping with one 'worker left' line missing, tests/test_dev.py)."""
    import zmq

    from bucketwire import protocol as P
    from bucketwire.envelope import SCHEMA_VERSION

    s = stack_factory(CFG)
    s.start_hub()
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.cfg.client.work)
    try:
        d.send_multipart([P.READY, P.enc(P.Ready(group="a", topics=["jobs"], credit=1, proto=P.PROTO,
                                                  schema=SCHEMA_VERSION, host="test", pid=1, start="earliest"))])
        wait_for(lambda: s.status()["groups"]["a"]["workers"] == 1, 10, "the worker to join")
        d.send_multipart([P.BYE, P.enc({"requeue": []})])
        answers = []
        while d.poll(10_000):  # the hub heartbeats meanwhile; the answer comes within its next loop turns
            answers.append(d.recv_multipart()[0])
            if answers[-1] == P.BYE:
                break
        assert answers[-1:] == [P.BYE], answers
        assert s.status()["groups"]["a"]["workers"] == 0  # answered once the worker was removed
    finally:
        d.close()


def test_an_ack_too_large_for_one_message_is_split_and_the_hub_reads_every_part() -> None:
    """Three events with 25 MB of follow-ons each, acked together, would be one 75 MB header that the hub refuses
    whole (it reads at most 64 MiB), leaving all three in flight. Split, each part is read and every result is
    in one of them."""
    from bucketwire import protocol as P
    from bucketwire.worker.child import ACK_MAX, ack_frames

    pad = "x" * (25 << 20)
    results = [{"t": "jobs", "s": s, "ok": True, "f": [{"specversion": "1.0", "id": f"f{s}", "source": "x",
                                                        "type": "t", "topic": "follow", "data": pad}]}
               for s in (1, 2, 3)]
    frames = ack_frames("g", [("jobs", 4), ("jobs", 5)], results, True)
    assert len(frames) > 1 and all(len(f) <= ACK_MAX for f in frames)
    acks = [P.decode(f, P.Ack) for f in frames]
    assert sorted(r.s for a in acks for r in a.results) == [1, 2, 3]
    assert [rng for a in acks for rng in a.ranges()] == [("jobs", 4, 5)]


def test_a_result_whose_follow_ons_cannot_be_encoded_fails_its_event_alone() -> None:
    """The last resort behind ctx.publish's checks: an outcome the ACK cannot encode used to raise out of the
    child's flush, killing it after its handlers ran (nothing charged, the batch delivered again for ever). It
    becomes a failure of its own event; the other outcomes are acked as they were."""
    from bucketwire import protocol as P
    from bucketwire.worker.child import ack_frames

    good = {"t": "jobs", "s": 2, "ok": True, "f": [{"specversion": "1.0", "id": "f", "source": "x", "type": "t",
                                                     "topic": "follow", "data": {"n": 1}}]}
    bad = {"t": "jobs", "s": 3, "ok": True, "f": [{"specversion": "1.0", "id": "g", "source": "x", "type": "t",
                                                    "topic": "follow", "data": {"obj": object()}}]}
    frames = ack_frames("g", [("jobs", 1)], [good, bad, {"t": "jobs", "s": 4, "ok": False, "error": "e"}], True)
    results = {r.s: r for f in frames for r in P.decode(f, P.Ack).results}
    assert results[2].ok and len(results[2].f) == 1
    assert not results[3].ok and "cannot be sent to the hub" in (results[3].line or ""), results[3]
    assert not results[4].ok
    assert [rng for f in frames for rng in P.decode(f, P.Ack).ranges()] == [("jobs", 1, 1)]


def test_a_child_whose_supervisor_is_killed_stops(stack_factory: Any) -> None:
    """kill -9 of the pool (OOM killer, an operator): its children must not live on as orphans, taking events
    with no one to enforce handler_timeout, restart them or speak for their long handlers, and running old plugin
    code beside the pool that replaces them. A child was reparented to init and kept working."""
    import os
    import signal

    from tests.procs import processes

    s = stack_factory(CFG)
    s.start_hub()
    pool = s.start_worker("a", 1)
    (child,) = s.child_pids(pool)
    os.kill(pool.pid, signal.SIGKILL)
    pool.wait(10)
    try:
        wait_for(lambda: child not in processes(), 15, "the orphaned child to stop")
    finally:  # the stack's teardown stops pools it sees alive: an orphan would outlive the test
        if child in processes():
            os.kill(child, signal.SIGKILL)
    wait_for(lambda: s.status()["groups"]["a"]["workers"] == 0, 15, "the hub to count no worker")
