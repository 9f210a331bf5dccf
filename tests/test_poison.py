"""One bad event hurts only itself: a handler that kills its child, or never returns, is charged alone.

Real hub and worker pool processes; the recorder plugin (tests/plugins/recorder.py) aborts or sleeps on request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from bucketwire import Event
from tests.fixtures_hub import Stack, wait_for
from tests.procs import processes

CFG = """
[topics.jobs]
max_attempts = 3
backoff_base = 0.1
backoff_max = 0.5
{extra}

[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
credit = 16
"""


def job(key: str, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject=key, topic="jobs",
                 data={"bucket": "b", "key": key, **data})


def dead_letters(s: Stack) -> list[dict[str, Any]]:
    """The dead letters committed, once every one `status` counts is: status counts a dead letter when the hub makes
    it and the next commit stores it, so a test that waited for the count could read the topic a moment early."""
    def committed() -> tuple[list[bytes]] | None:
        counted = sum(g.get("dead_lettered", 0) for g in s.status()["groups"].values())
        with s.client() as c:
            _, bodies = c.fetch("dead-letter", 1)
        return (bodies,) if len(bodies) >= counted else None  # a tuple: no dead letters at all is an answer too

    (bodies,) = wait_for(committed, 20, "the dead letters status counts, committed")
    return [json.loads(b)["data"] for b in bodies]


def test_a_child_that_aborts_charges_only_the_event_it_was_running(hub_stack: Any) -> None:
    """15 innocents share the poison's batch in one child; the poison os.abort()s the child on every attempt.
    Only the poison may be charged: every innocent is handled on its first attempt, none is dead-lettered."""
    s = hub_stack(CFG.format(extra=""))
    s.start_hub()
    s.start_worker("a", 1)
    events = [job(f"innocent-{i}") for i in range(16)]
    events[4] = job("poison", abort=True)  # four innocents before it in the child's queue, eleven after
    with s.client() as c:
        c.publish_events(events)
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] >= 1 and st["lag"] == 0, 60,
             "the group to finish (handled or dead-lettered) every event")
    dls = dead_letters(s)
    assert [d["event"]["data"]["key"] for d in dls] == ["poison"], "only the poison is dead-lettered"
    assert dls[0]["attempts"] == 3
    assert "SIGABRT" in dls[0]["line"] and "died" in dls[0]["line"], dls[0]["line"]
    rows = [r for r in s.handled() if r["key"] != "poison"]
    assert {r["key"] for r in rows} == {f"innocent-{i}" for i in range(16) if i != 4}, "every innocent handled"
    assert {r["a"] for r in rows} == {1}, "no innocent was charged an attempt for the poison's crashes"


def test_a_child_that_dies_after_its_handler_forked_a_leftover_is_seen_to_die(stack_factory: Any, tmp_path: Any
                                                                                ) -> None:
    """A handler os.fork()s a process that outlives it (a copy of the child holding every descriptor it had,
    multiprocessing's sentinel pipe among them); the child then os.abort()s on a later event. The pool must see
    that death as it sees any other: the poison charged, the child replaced, every innocent handled once. It
    waited on the sentinel, which the leftover kept open: the death went unseen, the pool kept telling the hub
    the dead child's handler was running (for up to handler_timeout, then waited for good) and every event it
    held stalled."""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    pool = s.start_worker("a", 1)
    pidfile = tmp_path / "leftover.pid"
    events = [job("forker", fork=str(pidfile)), job("poison", abort=True), *(job(f"innocent-{i}") for i in range(6))]
    with s.client() as c:
        c.publish_events(events)
    try:
        wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] >= 1 and st["lag"] == 0, 40,
                 "the pool to see its child die (poison dead-lettered, every innocent handled):\n" + s.dump_logs())
        dls = dead_letters(s)
        assert [d["event"]["data"]["key"] for d in dls] == ["poison"], "only the poison is dead-lettered"
        assert dls[0]["attempts"] == 3 and "SIGABRT" in dls[0]["line"], dls[0]
        attempts = {r["key"]: r["a"] for r in s.handled()}
        assert attempts == {"forker": 1, **{f"innocent-{i}": 1 for i in range(6)}}, attempts
        assert pool.poll() is None, "the pool stopped:\n" + s.dump_logs()
        s.stop()
        assert pool.returncode == 0, s.dump_logs()
        assert "did not drain in time" not in s.dump_logs(), "the stop waited for the leftover"
    finally:
        (tmp_path / "leftover.pid.release").touch()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_forked_copy_that_returns_from_its_handler_ends_there(stack_factory: Any) -> None:
    """A handler os.fork()s for background work and the copy returns from the handler (its os._exit() forgotten).
    The copy went on with the child's loop: it ran every event queued behind in the batch again (their work done
    twice), then lived on for good, outliving the pool's stop. It ends where it returns, saying why in one line;
    the child's own events are each handled once."""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    pool = s.start_worker("a", 1)
    (child,) = s.child_pids(pool)
    with s.client() as c:
        c.publish_events([job("forker", fork_return=True), *(job(f"innocent-{i}") for i in range(6))])
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0 and len(s.handled()) >= 7, 30, "every event handled")
    forks = {r["pid"] for r in s.handled()} - {child}
    assert len(forks) == 1, s.handled()  # the fork's own line for the forker: it returned from the handler
    (fork,) = forks
    try:
        wait_for(lambda: fork not in processes(), 15, "the forked copy to end:\n" + s.dump_logs())
    finally:
        if fork in processes():
            os.kill(fork, signal.SIGKILL)
    innocents = [r for r in s.handled() if r["key"] != "forker"]
    assert sorted(r["key"] for r in innocents) == [f"innocent-{i}" for i in range(6)], "an innocent ran twice"
    assert {r["pid"] for r in innocents} == {child}
    said = [ln for ln in s.logs[-1].read_text().splitlines() if "os._exit" in ln]
    assert len(said) == 1 and "fork" in said[0] and "recorder" in said[0], said
    assert pool.poll() is None


def test_a_child_a_plugin_ran_out_of_descriptors_is_replaced_instead_of_failing_every_event(stack_factory: Any,
                                                                                           tmp_path: Any) -> None:
    """A plugin leaks a file per event until its child has no descriptor left. From then on every event in that
    child failed ('Too many open files') on each attempt, so the group sent its whole stream to the dead-letter
    topic within a second while the pool looked healthy. A process out of descriptors (or memory) is a broken
    process, as one the OOM killer ends is: the event that met it fails, the child hands back the rest uncharged
    and ends, saying why in one line, and a fresh one goes on. Nothing is dead-lettered."""
    rec = tmp_path / "leaky.jsonl"
    s = stack_factory(CFG.format(extra="") + f'\n[plugins.leaky]\npath = "{rec}"\nheadroom = 30\n')
    s.start_hub()
    pool = s.start_worker("a", 1, "--plugin", str(Path(__file__).parent / "plugins" / "leaky.py"))
    with s.client() as c:
        c.publish_events([job(f"k{i}") for i in range(120)])
    wait_for(lambda: (st := s.status()["groups"]["a"])["lag"] == 0 and st["inflight"] == 0
             and st["retrying"] == 0, 90, "every event handled or dead-lettered:\n" + s.dump_logs())
    st = s.status()["groups"]["a"]
    assert st["dead_lettered"] == 0, s.dump_logs()
    rows = [json.loads(line) for line in rec.read_text().splitlines()]
    assert {r["key"] for r in rows} == {f"k{i}" for i in range(120)}
    assert len({r["pid"] for r in rows}) >= 3, "the child was replaced as it ran out"
    said = [ln for ln in s.logs[-1].read_text().splitlines() if "out of file descriptors" in ln]
    assert said and "Too many open files" in said[0] and "close what it opens" in said[0], s.dump_logs()
    # The pool says what it did in its own words: a replacement, not a crash (it said 'worker child died').
    pool_lines = s.logs[-1].read_text().splitlines()
    assert not [ln for ln in pool_lines if "worker child died" in ln], s.dump_logs()
    assert [ln for ln in pool_lines if "worker child replaced" in ln and "ran out of" in ln], s.dump_logs()
    assert pool.poll() is None


def test_a_handler_that_breaks_its_child_for_after_it_returns_is_charged(stack_factory: Any) -> None:
    """The handler closes every descriptor of its process (ZeroMQ's among them) and returns; the child dies in the
    framework's code a moment later (libzmq's assertion, SIGABRT), with no handler running. Nothing was charged
    then: the poison came back on its first attempt for good, each time killing the child that took it, and the
    events queued behind it waited for ever. The first event whose handlers ran in the dead child but whose ack
    was not sent is charged; the poison is dead-lettered and every innocent is handled on its first attempt."""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    pool = s.start_worker("a", 1)
    poison = job("poison", close_fds=True)
    with s.client() as c:
        c.publish_events([poison, *(job(f"innocent-{i}") for i in range(5))])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] >= 1 and st["lag"] == 0, 60,
             "the poison dead-lettered and every innocent handled:\n" + s.dump_logs())
    (dl,) = dead_letters(s)
    assert dl["event"]["id"] == poison.id and dl["attempts"] == 3, dl
    assert "died" in dl["line"] and "after" in dl["line"], dl["line"]
    rows = [r for r in s.handled() if r["key"] != "poison"]
    assert {r["key"] for r in rows} == {f"innocent-{i}" for i in range(5)}, rows
    assert {r["a"] for r in rows} == {1}, "an innocent was charged an attempt"
    assert pool.poll() is None


def test_a_vanished_worker_charges_only_the_oldest_event_it_held(stack_factory: Any) -> None:
    """A child frozen mid-handler (SIGSTOP: its pool cannot tell anyone) is found by heartbeat timeout. Its pool's
    last heartbeat for it (RUNNING) named the event its handler was in: that one is charged, and the rest go to
    another worker uncharged. (A worker that never said it ran anything is charged nothing when it vanishes:
    test_wire_hostile.py.)"""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    pool = s.start_worker("a", 1)
    events = [job("slow", mark_start=True, sleep=2)] + [job(f"queued-{i}") for i in range(5)]
    with s.client() as c:
        c.publish_events(events)
    started = s.record.with_name(s.record.name + ".started")
    wait_for(lambda: started.exists() and started.read_text().strip(), 20, "the slow handler to start")
    wait_for(lambda: [r["seq"] for r in s.status()["groups"]["a"]["long_running"]] == [1], 20,
             "the pool to tell the hub the slow handler is running")
    (child,) = s.child_pids(pool)
    os.kill(child, signal.SIGSTOP)
    try:
        wait_for(lambda: s.status()["groups"]["a"]["workers"] == 0, 20, "the hub to give up on the frozen child")
        s.start_worker("a", 1)
        wait_for(lambda: len({r["key"] for r in s.handled()}) == 6, 30, "every event handled by the new pool")
    finally:
        os.kill(child, signal.SIGKILL)
    attempts = {r["key"]: r["a"] for r in s.handled()}
    assert attempts == {"slow": 2, **{f"queued-{i}": 1 for i in range(5)}}, attempts


def test_a_hanging_handler_is_timed_out_charged_and_shown_while_it_waits(stack_factory: Any) -> None:
    """A handler that never returns: status names it while it runs; past handler_timeout its child is killed and
    replaced, the event is charged (dead-lettered with a timeout reason) and the events queued behind it are
    handled on their first attempt."""
    s = stack_factory(CFG.format(extra="handler_timeout = 2.5").replace("max_attempts = 3", "max_attempts = 2"))
    s.start_hub()
    s.start_worker("a", 1)
    hang = job("hang", sleep=3600)
    with s.client() as c:
        c.publish_events([hang] + [job(f"behind-{i}") for i in range(8)])

    def stuck() -> dict[str, Any] | None:
        for r in s.status()["groups"]["a"].get("long_running", []):
            if r["id"] == hang.id:
                return r  # type: ignore[no-any-return]
        return None

    r = wait_for(stuck, 15, "status to show the hanging handler")
    assert r["topic"] == "jobs" and r["seq"] == 1 and r["key"] == "b/hang" and r["timeout"] == 2.5
    assert r["age"] > 0
    out = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(s.cfg_path)], env=s.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "b/hang" in out.stdout and "jobs:1" in out.stdout, out.stdout

    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 1 and st["lag"] == 0, 30,
             "the hanging event to be dead-lettered")
    (dl,) = dead_letters(s)
    assert dl["event"]["id"] == hang.id and dl["attempts"] == 2
    assert "timed out after 2.5 s" in dl["line"], dl["line"]
    rows = s.handled()
    assert sorted(r["key"] for r in rows) == sorted(f"behind-{i}" for i in range(8))
    assert {r["a"] for r in rows} == {1}, "the events queued behind the hanging one were not charged"


def test_death_notices_pass_curve_and_name_the_signal(stack_factory: Any, tmp_path: Any) -> None:
    """With CURVE on, the supervisor's death notice is admitted under the pool's key like its children: the dead
    letter names the signal (only the notice knows it) and the innocents are untouched."""
    from tests.test_security import secure_stack

    groups = CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 2")
    s, _ = secure_stack(stack_factory, tmp_path, groups=groups)
    s.start_hub()
    s.start_worker("a", 1)
    events = [job("poison", abort=True)] + [job(f"innocent-{i}") for i in range(5)]
    with s.client() as c:
        c.publish_events(events)
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] >= 1 and st["lag"] == 0, 60,
             "the group to finish every event")
    (dl,) = dead_letters(s)
    assert dl["event"]["data"]["key"] == "poison" and dl["attempts"] == 2 and "SIGABRT" in dl["line"]
    rows = s.handled()
    assert sorted(r["key"] for r in rows) == [f"innocent-{i}" for i in range(5)] and {r["a"] for r in rows} == {1}


def test_a_handler_that_exits_or_raises_base_exceptions_hurts_only_its_own_event(stack_factory: Any) -> None:
    """sys.exit(2), KeyboardInterrupt, GeneratorExit raised in a handler, and os._exit(2) (the exit code a child's
    configuration error has): each poison is dead-lettered alone with a line naming what it did, the innocents
    around it are handled on their first attempt, and the pool keeps running (it used to stop whole, taking
    exit code 2 for a configuration error)."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 2"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    poisons = {"exit2": {"exit": 2}, "sysexit": {"raise": "SystemExit"}, "kbint": {"raise": "KeyboardInterrupt"},
               "genexit": {"raise": "GeneratorExit"}}
    events = [job(f"innocent-{i}") for i in range(8)]
    for i, (key, data) in enumerate(poisons.items()):
        events.insert(2 * i + 1, job(key, **data))
    with s.client() as c:
        c.publish_events(events)
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] >= len(poisons) and st["lag"] == 0, 40,
             "every poison to be dead-lettered:\n" + s.dump_logs())
    lines = {d["event"]["data"]["key"]: d for d in dead_letters(s)}
    assert sorted(lines) == sorted(poisons), "only the poisons are dead-lettered"
    assert "died (exit code 2)" in lines["exit2"]["line"], lines["exit2"]
    assert lines["sysexit"]["line"] == "SystemExit: 2" and lines["sysexit"]["plugin"] == "recorder", lines["sysexit"]
    assert lines["kbint"]["line"] == "KeyboardInterrupt: planned", lines["kbint"]
    assert lines["genexit"]["line"] == "GeneratorExit: planned", lines["genexit"]
    assert all(d["attempts"] == 2 for d in lines.values()), lines
    rows = s.handled()
    assert {r["key"] for r in rows} == {f"innocent-{i}" for i in range(8)}, "every innocent handled"
    assert {r["a"] for r in rows} == {1}, "no innocent was charged an attempt"
    assert pool.poll() is None, "the pool stopped:\n" + s.dump_logs()


def test_a_flood_of_follow_ons_larger_than_one_message_fails_only_its_event(stack_factory: Any) -> None:
    """One event whose handler publishes more follow-ons than one message to the hub may carry (64 MiB: ZeroMQ
    drops the connection of a peer that sends more, with no answer). Its outcome must not vanish: the event fails
    and is dead-lettered with a line saying why, and the events after it, one for the same object among them, are
    handled."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    flood = job("same", follow=4500, follow_pad=15_000)  # 4,500 follow-ons of 15 kB: 67 MB
    with s.client() as c:
        c.publish_events([flood, job("other")])
        c.publish_events([job("same", n=2)])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 1 and st["lag"] == 0, 40,
             "the flood to be dead-lettered and the rest handled")
    (dl,) = dead_letters(s)
    assert dl["event"]["id"] == flood.id and "follow-on" in dl["line"], dl["line"]
    assert sorted((r["key"], r["data"].get("n")) for r in s.handled()) == [("other", None), ("same", 2)]
    assert pool.poll() is None


def test_a_handler_error_too_long_for_one_message_fails_only_its_event(stack_factory: Any) -> None:
    """A handler raises an exception whose message holds more than one message to the hub may carry (a whole
    response body, 65 MiB). The child put it whole into the ACK (the hub keeps 1 KiB of it): the hub refused
    that ACK, so the event stayed in flight for as long as the worker lived and the later events of the same
    object waited behind it for good. Its line is cut as the hub would cut it: the event is dead-lettered, saying
    what was raised, and the events after it are handled."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    bad = job("same", raise_len=65 << 20)
    with s.client() as c:
        c.publish_events([bad, job("other")])
        c.publish_events([job("same", n=2)])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 1 and st["lag"] == 0, 40,
             "the event to be dead-lettered and the rest handled:\n" + s.dump_logs(600))
    (dl,) = dead_letters(s)
    assert dl["event"]["id"] == bad.id and dl["line"].startswith("RuntimeError: unexpected body: xxx"), dl["line"]
    assert len(dl["line"]) <= 1024, len(dl["line"])
    assert sorted((r["key"], r["data"].get("n")) for r in s.handled()) == [("other", None), ("same", 2)]
    assert max(len(line) for log in s.logs for line in log.read_text().splitlines()) < 20_000, "a huge log line"
    assert pool.poll() is None


def test_follow_ons_published_from_the_handlers_threads_are_each_committed(stack_factory: Any) -> None:
    """A handler fans its work out to a thread pool it waits for, each thread calling ctx.publish (what the guide
    allows: before the handler returns). Two calls at once took the same index for the follow-on id, so two
    follow-ons got one id and the hub kept one of them as a repeat: follow-ons lost without a word (2-8 of 400)."""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([job(f"fan-{i}", follow_threads=400) for i in range(3)])
    wait_for(lambda: len(s.handled()) == 3 and s.status()["groups"]["a"]["lag"] == 0, 60, "the fan-outs handled")

    def committed() -> list[dict[str, Any]]:
        got, nxt = [], 1
        with s.client() as c:
            while envs := [json.loads(b) for b in c.fetch("follow", nxt)[1]]:
                got += [e["data"] for e in envs]
                nxt = int(envs[-1]["seq"]) + 1
        return got

    wait_for(lambda: len(committed()) >= 1200, 20, "1200 follow-ons committed")
    got = committed()
    assert len(got) == 1200 and len({(d["cause_seq"], d["part"]) for d in got}) == 1200, len(got)


def test_a_follow_on_the_hub_would_refuse_fails_only_its_event(stack_factory: Any) -> None:
    """ctx.publish() took follow-ons the hub refuses (a subject that is not a string, a file name that is not
    UTF-8): the hub refused the whole ACK they came in, so their events, and the innocent ones acked with them,
    stayed in flight for as long as the worker lived, and later events for the same objects waited behind them.
    Now the plugin's publish raises, and only the event whose handler published it fails."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    bad = [job("bad-subject", follow_kw={"subject": 5}), job("bad-name", follow_fsname=True)]
    with s.client() as c:
        c.publish_events([job("innocent-0"), bad[0], job("innocent-1"), bad[1], job("innocent-2")])
        c.publish_events([job("bad-name", n=2)])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 2 and st["lag"] == 0, 30,
             "the two bad events to be dead-lettered and the rest handled")
    lines = {d["event"]["id"]: d["line"] for d in dead_letters(s)}
    assert lines.keys() == {b.id for b in bad}, lines
    assert all("ValueError: follow-on to topic 'follow' would be refused by the hub" in v for v in lines.values())
    assert sorted((r["key"], r["data"].get("n")) for r in s.handled()) == [
        ("bad-name", 2), ("innocent-0", None), ("innocent-1", None), ("innocent-2", None)]
    assert pool.poll() is None


def test_a_follow_on_holding_str_and_int_subclasses_is_committed(stack_factory: Any) -> None:
    """ctx.publish() takes what the envelope encoder takes, str and int subclasses among them (lxml's XPath
    results, IntEnum-like types); the ACK's encoder refused them, so the child died sending the ACK after its
    handlers had run, nothing was charged (no handler was running), and the batch was delivered again, and again.
    Now the follow-on is committed as plain JSON, and every event of the batch is handled once."""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    pool = s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([job("innocent-0"), job("sub", follow_strsub=True), job("innocent-1")])
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0 and "follow" in s.status()["topics"], 20,
             "the batch acked and the follow-on committed")
    with s.client() as c:
        _, bodies = c.fetch("follow", 1)
    assert [json.loads(b)["data"] for b in bodies] == [{"name": "caption", "n": 7}]
    assert sorted(r["key"] for r in s.handled()) == ["innocent-0", "innocent-1", "sub"], "each handled once"
    assert pool.poll() is None


RETURNS_A_COROUTINE = '''
from bucketwire import hookimpl


async def _work(event):
    raise AssertionError("never runs: nobody awaits it")


@hookimpl
def handle_event(event, ctx):
    if event.data.get("awaitable"):
        return _work(event)  # a sync hook handing back the async work it meant to do
'''


def test_a_handler_that_returns_a_coroutine_fails_its_event_instead_of_acking_work_never_done(
        stack_factory: Any, tmp_path: Any) -> None:
    """`async def handle_event` is refused at start; a plain hook that returns a coroutine (it calls an async
    helper and returns what it got) was acked: the work never ran, and only a RuntimeWarning about a coroutine
    never awaited, if that, said anything. Now the event fails with a line saying what was returned and what to
    do, and is dead-lettered like any failure; the recorder, the other plugin of the pool, and the next event are
    not touched."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    plugin = tmp_path / "returns_awaitable.py"
    plugin.write_text(RETURNS_A_COROUTINE)
    s.start_hub()
    s.start_worker("a", 1, "--plugin", str(plugin))
    bad = job("k1", awaitable=True)
    with s.client() as c:
        c.publish_events([bad, job("k2")])
    wait_for(lambda: (st := s.status()["groups"]["a"])["lag"] == 0 and st["inflight"] == 0 and
             st["retrying"] == 0, 30, "both events finished")
    assert s.status()["groups"]["a"]["dead_lettered"] == 1, "the event whose work never ran was acked"
    (dl,) = dead_letters(s)
    assert dl["event"]["id"] == bad.id and "coroutine" in dl["line"] and "await" in dl["line"], dl["line"]
    assert "k2" in [r["key"] for r in s.handled()]


def test_a_pool_stopped_mid_batch_finishes_the_event_in_hand_and_gives_back_the_rest(stack_factory: Any,
                                                                                     tmp_path: Any) -> None:
    """SIGTERM while a child's handler runs with more of its batch queued behind it: the running event is finished
    and acked (with its follow-on) by that child, the queued ones go back uncharged and are handled once, on their
    first attempt, by the pool that takes over; nothing is lost or handled twice (README "A drain")."""
    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    a = s.start_worker("a", 1)
    release = tmp_path / "release"
    first = job("first", mark_start=True, hold=str(release), follow=1)
    rest = [job(f"queued-{i}") for i in range(10)]
    with s.client() as c:
        c.publish_events([first, *rest])
    started = s.record.with_name(s.record.name + ".started")
    wait_for(lambda: started.exists() and started.read_text().strip(), 20, "the first handler to start")
    wait_for(lambda: s.status()["groups"]["a"]["inflight"] == 11, 20, "the whole batch in the child's hands")
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining worker pool" in s.logs[-1].read_text(), 20, "the pool to begin its drain")
    release.touch()
    assert a.wait(30) == 0, s.dump_logs()
    s.start_worker("a", 1)
    wait_for(lambda: len(s.handled()) >= 11 and s.status()["groups"]["a"]["lag"] == 0, 30, "every event handled")
    rows = s.handled()
    assert sorted(r["key"] for r in rows) == sorted(["first"] + [f"queued-{i}" for i in range(10)]), rows
    assert {r["a"] for r in rows} == {1}, "nothing was charged an attempt by the drain"
    assert {r["pid"] for r in rows if r["key"] == "first"} != {r["pid"] for r in rows if r["key"] != "first"}
    with s.client() as c:
        _, bodies = c.fetch("follow", 1)
    assert len(bodies) == 1, "the finished event's follow-on committed once"


def test_a_follow_on_changed_after_ctx_publish_checked_it_fails_only_its_event(stack_factory: Any) -> None:
    """ctx.publish() checks a follow-on as the hub will, but returns the Event, and a plugin may change it after
    (a subject set from a number, a type cleared). The hub refused the whole ACK it came in: the events acked
    before it in that ACK were applied, it and those after it stayed in flight for as long as the worker lived,
    and later events for the same objects waited behind them. The follow-ons are checked again as the handler
    returns, so only the event whose handler changed one fails."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    bad = [job("bad-subject", follow_then_set={"subject": 5}), job("bad-type", follow_then_set={"type": None})]
    with s.client() as c:
        c.publish_events([job("innocent-0"), bad[0], job("innocent-1"), bad[1], job("innocent-2")])
        c.publish_events([job("bad-subject", n=2)])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 2 and st["lag"] == 0
             and st["inflight"] == 0, 30, "the two bad events to be dead-lettered and the rest handled")
    lines = {d["event"]["id"]: d["line"] for d in dead_letters(s)}
    assert lines.keys() == {b.id for b in bad}, lines
    assert all("changed after ctx.publish" in v for v in lines.values()), lines
    assert "follow" not in s.status()["topics"], "no follow-on of a failed event was committed"
    assert pool.poll() is None


def test_a_follow_on_grown_after_ctx_publish_measured_it_fails_only_its_event(stack_factory: Any) -> None:
    """ctx.publish() measures a follow-on (max_event_bytes, 32 MiB per event), but the data it was given is the
    plugin's own dict, which it may go on filling after the call (a result list appended to). Grown past what one
    message to the hub carries (70 MB), the follow-on went out whole in its ACK: the hub refused that ACK, so the
    event and the innocent ones acked with it stayed in flight for as long as the worker lived, and the later
    event of the same object waited behind them for good. Grown past max_event_bytes only (2 MB), the hub
    dead-lettered the follow-on and acked its event, whose handler ctx.publish would have failed. The follow-ons
    are measured again as the handler returns: only the event that grew one fails, saying why."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    bad = [job("same", follow_then_grow=70_000_000), job("grown", follow_then_grow=2_000_000)]
    with s.client() as c:
        c.publish_events([job("innocent-0"), bad[0], job("innocent-1"), bad[1], job("innocent-2")])
        c.publish_events([job("same", n=2)])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 2 and st["lag"] == 0
             and st["inflight"] == 0, 40, "the two bad events to be dead-lettered and the rest handled:\n"
             + s.dump_logs(600))
    lines = {d["event"]["id"]: d["line"] for d in dead_letters(s)}
    assert lines.keys() == {b.id for b in bad}, lines
    assert all("FollowOnTooLarge" in v and "changed after ctx.publish" in v for v in lines.values()), lines
    # (the bad events' handlers ran to their end, recording them, before their follow-ons were measured)
    assert sorted(r["key"] for r in s.handled() if r["id"] not in lines) == ["innocent-0", "innocent-1",
                                                                            "innocent-2", "same"]
    assert "follow" not in s.status()["topics"], "no follow-on of a failed event was committed"
    assert pool.poll() is None


def test_a_follow_on_id_changed_after_ctx_publish_is_put_back(stack_factory: Any) -> None:
    """Exactly-once for follow-ons rests on their ids: derived from the causing event, so a redelivery publishes
    the same ids and the hub commits them once. A plugin that set its own (a random one) through the Event
    ctx.publish returned had every redelivery commit its follow-on again. The id is put back as the handler
    returns: the committed follow-on carries the id ctx.publish derived."""
    from bucketwire.envelope import follow_on_id

    s = stack_factory(CFG.format(extra=""))
    s.start_hub()
    s.start_worker("a", 1)
    e = job("own-id", follow_then_set={"id": "random-4f1c"})
    with s.client() as c:
        c.publish_events([e])
    wait_for(lambda: "follow" in s.status()["topics"], 30, "the follow-on committed")
    with s.client() as c:
        _, bodies = c.fetch("follow", 1)
        _, causes = c.fetch("jobs", 1)
    (fo,) = [json.loads(b) for b in bodies]
    cause = next(json.loads(b) for b in causes if json.loads(b)["id"] == e.id)
    assert fo["id"] != "random-4f1c"
    assert fo["id"] == follow_on_id(cause["id"], "a", "recorder", 0, "follow", cause.get("time"), cause["source"])


def test_a_plugin_that_edits_ctx_published_fails_only_its_event(stack_factory: Any) -> None:
    """`ctx.published` was the context's own list: a plugin that appended a raw dict to it, cleared it or replaced
    an item (instead of calling ctx.publish) broke the pairing of follow-ons with their derived ids (a zip(...,
    strict=True) as the handler returned), and the child died after its handlers ran: no event charged, the whole
    batch delivered again, and again. Now `ctx.published` is read-only: the edit raises in the plugin's own
    handler, and only that event fails, with one line naming what to call instead."""
    s = stack_factory(CFG.format(extra="").replace("max_attempts = 3", "max_attempts = 1"))
    s.start_hub()
    pool = s.start_worker("a", 1)
    bad = [job(f"bad-{how}", published_edit=how) for how in ("append", "clear", "replace", "assign")]
    with s.client() as c:
        c.publish_events([job("innocent-0"), bad[0], job("innocent-1"), bad[1], bad[2], bad[3],
                          job("innocent-2")])
    wait_for(lambda: (st := s.status()["groups"]["a"])["dead_lettered"] == 4 and st["lag"] == 0, 30,
             "the four bad events to be dead-lettered and the rest handled:\n" + s.dump_logs(2000))
    dls = {d["event"]["id"]: d for d in dead_letters(s)}
    assert dls.keys() == {b.id for b in bad}, dls
    for d in dls.values():
        assert d["plugin"] == "recorder", d
        assert "ctx.published is read-only" in d["line"] and "ctx.publish(topic, data)" in d["line"], d["line"]
    assert sorted(r["key"] for r in s.handled()) == ["innocent-0", "innocent-1", "innocent-2"]
    assert pool.poll() is None
    assert not any("worker child died" in log.read_text() for log in s.logs), s.dump_logs()
