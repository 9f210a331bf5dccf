"""`bucketwire tail` across a hub restart, with real hub processes: it says on stderr that the hub is gone, and
when the hub is back it goes on from the last seq it printed, with no gap and no duplicate line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fixtures_hub import Stack, wait_for
from tests.test_ops import publish


def _seqs(out: Path) -> list[int]:
    lines = out.read_text().splitlines() if out.exists() else []
    return [int(json.loads(x)["seq"]) for x in lines if x.strip()]


def _tail(s: Stack, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = s.dir / "tail.out", s.dir / "tail.err"
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", "tail", "-c", str(s.cfg_path), *args], env=s.env,
                         stdout=out.open("wb"), stderr=err.open("wb"), start_new_session=True)
    return p, out, err


def test_tail_reports_a_lost_hub_and_resumes_without_gap_or_duplicate(stack_factory: Any) -> None:
    s = stack_factory()
    s.start_hub()
    publish(s, 3)
    p, out, err = _tail(s, "jobs", "--from-seq", "1")
    try:
        wait_for(lambda: _seqs(out) == [1, 2, 3], 20, "the first three events")
        s.kill_hub(signal.SIGKILL)
        wait_for(lambda: "lost the hub" in err.read_text(), 20, "tail to say the hub is gone")
        assert p.poll() is None
        # Events committed while tail cannot see them (stopped: not even its ZeroMQ thread reconnects) never
        # reach it over the fan-out; they must come from the journal when it resumes.
        p.send_signal(signal.SIGSTOP)
        try:
            s.start_hub()
            publish(s, 3)
        finally:
            p.send_signal(signal.SIGCONT)
        wait_for(lambda: "resumed" in err.read_text(), 30, "tail to say it resumed")
        publish(s, 3)
        wait_for(lambda: len(_seqs(out)) >= 9, 20, "nine events")
        assert _seqs(out) == list(range(1, 10))
        lines = err.read_text().splitlines()
        assert len(lines) == 2, lines  # one line when lost, one when resumed
        assert "will resume: jobs after seq 3" in lines[0] and "resumed (jobs after seq 6)" in lines[1]
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0


def test_a_fetch_of_large_events_is_bounded_in_bytes_and_the_rest_follows(stack_factory: Any) -> None:
    """FETCH returned up to 1,000 events whatever their size: with events near max_event_bytes that is up to 1 GB
    read on the hub's loop (nothing else served meanwhile) and held for one reply, for any key that may read the
    topic, as often as it asks. A reply now stops past FETCH_BYTES; `next` says where to go on, and a reader
    that follows it (tail) still gets every event once."""
    from bucketwire.hub import loop

    FETCH_BYTES = getattr(loop, "FETCH_BYTES", 16 << 20)  # noqa: N806 - the README's bound, also before it was one
    s = stack_factory()
    s.start_hub()
    size = 700_000
    n = FETCH_BYTES // size + 8
    with s.client(30) as c:
        for i in range(n):
            c.publish("big", {"i": i, "pad": "x" * size})
        meta, bodies = c.fetch("big", 1)
        assert 0 < len(bodies) < n, len(bodies)
        assert sum(map(len, bodies)) <= FETCH_BYTES + size + 1000
        assert meta["next"] == len(bodies) + 1 and meta["head"] == n
        got = [json.loads(b)["data"]["i"] for b in bodies]
        while meta["next"] <= meta["head"]:
            meta, bodies = c.fetch("big", meta["next"])
            got += [json.loads(b)["data"]["i"] for b in bodies]
    assert got == list(range(n))


def test_tail_of_a_topic_gone_idle_does_not_report_a_lost_hub(stack_factory: Any) -> None:
    """The hub heartbeats a topic the config does not name only for HEARTBEAT_TURNS intervals after its last
    commit. tail took the end of those heartbeats for a dead hub: following a follow-on topic (what the README
    says to do with `csv-counted`), it printed `lost the hub` / `hub is back` every heartbeat_timeout once the
    topic went quiet, with the hub alive throughout."""
    import zmq

    from bucketwire import protocol as P  # noqa: N812

    s = stack_factory('\n[topics.clock]\n')
    s.start_hub()
    with s.client() as c:
        c.publish("clock", {"n": 0})  # a configured topic with a head is heartbeated always: the test's clock
    clock = zmq.Context.instance().socket(zmq.SUB)
    clock.setsockopt(zmq.SUBSCRIBE, P.topic_frame("clock"))
    clock.setsockopt(zmq.SUBSCRIBE, P.topic_frame("jobs"))
    clock.connect(f"tcp://127.0.0.1:{s.pub_port}")
    p, out, err = _tail(s, "jobs", "--from-seq", "1")
    try:
        publish(s, 1)
        wait_for(lambda: _seqs(out) == [1], 20, "the first event")
        # Count the clock's heartbeats since the last one of `jobs`: 4 x heartbeat_timeout of silence on `jobs`
        # is far past what tail waits before it calls the hub lost.
        quiet = 0
        deadline = 60 * 4  # heartbeats at 0.25 s: a minute at most
        while quiet < 24 and deadline > 0 and "lost the hub" not in err.read_text():
            if not clock.poll(5000):
                break
            topic, _seq, body = clock.recv_multipart()
            if body:
                continue
            quiet = 0 if P.topic_of(topic) == "jobs" else quiet + 1
            deadline -= 1
        assert "lost the hub" not in err.read_text(), err.read_text()
        assert quiet >= 24, "the hub kept heartbeating the idle topic, or stopped heartbeating the configured one"
        publish(s, 1)
        wait_for(lambda: _seqs(out) == [1, 2], 20, "the second event")
        assert err.read_text() == ""
    finally:
        clock.close(0)
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0


def test_tail_of_a_topic_the_hub_does_not_have_says_so_and_waits_for_it(stack_factory: Any) -> None:
    """`bucketwire tail -c C thumbnail-redy` (a typo) printed nothing, forever: no different from a quiet topic.
    One stderr line now names the topics the hub has; tail still waits, and prints the topic's first event."""
    s = stack_factory('\n[topics.clock]\n')  # a topic the config names is one before its first event
    s.start_hub()
    publish(s, 2)  # topic `jobs`
    p, out, err = _tail(s, "jobz", "jobs", "clock")
    try:
        wait_for(lambda: err.read_text(), 20, "tail's note on stderr")
        assert err.read_text().splitlines() == [
            "tail: the hub has no topic 'jobz' yet (its topics: clock, dead-letter, jobs); waiting for its first "
            "event"]
        with s.client() as c:
            c.publish("jobz", {"n": 1})
        wait_for(lambda: _seqs(out) == [1], 20, "jobz's first event")
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0
