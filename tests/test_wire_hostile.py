"""A peer that holds a valid key of a group and speaks the wire itself (a stolen worker key, a buggy port of the
worker): what it may NOT do to the group's other workers and events. Real hub processes, real sockets; the
attacker and its victim are plain DEALERs speaking the documented frames (docs/wire.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

import zmq

from bucketwire import Event
from bucketwire.envelope import SCHEMA_VERSION
from tests.fixtures_hub import Stack, wait_for

CFG = """
[groups.g]
topics = ["x"]
plugins = []
start = "earliest"
"""


def ev(i: int) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="t", subject=f"b/k{i}", topic="x",
                 data={"bucket": "b", "key": f"k{i}"})


LIVE: list[zmq.Socket[bytes]] = []
"""The joined DEALERs of the running test: they heartbeat while the test waits, as a worker does (the test hub's
heartbeat_timeout is 1.5 s)."""


def beat() -> bool:
    for d in LIVE:
        d.send_multipart([b"HB", b"{}"])
    return True


def poll(d: zmq.Socket[bytes] | zmq.Poller, deadline: float, what: str) -> Any:
    """Wait for a message in slices, heartbeating between them."""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, what
        beat()
        got = d.poll(max(1, int(min(left, 0.2) * 1000)))
        if got:
            return got


def dealer(s: Stack, ready: dict[str, Any] | None = None) -> zmq.Socket[bytes]:
    d: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.cfg.client.work)
    if ready is not None:
        d.send_multipart([b"READY", json.dumps({"schema": SCHEMA_VERSION, **ready}).encode()])
        LIVE.append(d)
    return d


def close(*socks: zmq.Socket[bytes] | None) -> None:
    for d in socks:
        if d is not None:
            if d in LIVE:
                LIVE.remove(d)
            d.close()


def join(s: Stack, credit: int = 1) -> zmq.Socket[bytes]:
    return dealer(s, {"group": "g", "topics": ["x"], "credit": credit, "proto": 2})


def delivered(d: zmq.Socket[bytes], n: int, timeout: float = 20) -> list[int]:
    """The seqs of the next `n` events DELIVERed to `d` (hub heartbeats skipped)."""
    seqs: list[int] = []
    deadline = time.monotonic() + timeout
    while len(seqs) < n:
        poll(d, deadline, f"only {seqs} of {n} delivered")
        frames = d.recv_multipart()
        if frames[0] == b"DELIVER":
            seqs += [int(json.loads(b)["seq"]) for b in frames[2:]]
    return seqs


def work_off(socks: list[zmq.Socket[bytes]], seqs: set[int], timeout: float = 20) -> set[int]:
    """Each worker acks every event DELIVERed to it, as a worker does, until `seqs` were all handed out; returns
    the seqs handed out (a seq handed out twice is caught by the caller's count of acks)."""
    got: set[int] = set()
    poller = zmq.Poller()
    for d in socks:
        poller.register(d, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while not seqs <= got:
        for d, _ in poll(poller, deadline, f"only {sorted(got)} of {sorted(seqs)} handed out"):
            frames = d.recv_multipart()
            if frames[0] == b"DELIVER":
                mine = [int(json.loads(b)["seq"]) for b in frames[2:]]
                got.update(mine)
                ack(d, ok={"x": [[q, q] for q in mine]})
    return got


def reply(d: zmq.Socket[bytes], cmd: bytes, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        poll(d, deadline, f"no {cmd!r}")
        frames = d.recv_multipart()
        if frames[0] == cmd:
            out: dict[str, Any] = json.loads(frames[1])
            return out


def ack(d: zmq.Socket[bytes], **hdr: Any) -> None:
    d.send_multipart([b"ACK", json.dumps({"g": "g", **hdr}).encode()])


def not_held(s: Stack) -> float:
    return s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="not_held")


def ok(seq: int) -> dict[str, Any]:
    return {"t": "x", "s": seq, "ok": True, "f": []}


def test_a_worker_cannot_ack_or_fail_events_it_was_not_handed(stack_factory: Any) -> None:
    """The attacker holds a key of group g and joins it. It acks the victim's in-flight event, fails it
    permanently (which dead-lettered it, with the victim still running it), and acks the loaded events nobody was
    handed yet, in both forms (which made the group skip them: lost), and rides a follow-on on such an ack.
    None of it applies: every event is handed out and acked by the worker that holds it, nothing dead-letters,
    no follow-on is committed."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(6)])
    victim = join(s)
    attacker = None
    try:
        assert delivered(victim, 1) == [1]
        attacker = join(s)
        assert delivered(attacker, 1) == [2]
        # seqs 3..6 are loaded, handed to nobody (both workers are at their credit)
        fo = {"specversion": "1.0", "id": "fo-1", "source": "urn:x", "type": "t", "topic": "x",
              "data": {"bucket": "b", "key": "planted"}}
        ack(attacker, results=[{"t": "x", "s": 1, "ok": False, "error": "forged", "permanent": True}])
        ack(attacker, results=[{**ok(3), "f": [fo]}, ok(4)])
        ack(attacker, ok={"x": [[1, 1], [5, 6]]})
        wait_for(lambda: beat() and not_held(s) == 3, 10, "the three forged acks refused")
        assert "ack for events not handed to this worker; ignored" in s.dump_logs()
        assert s.metric("bucketwire_acked_total", group="g") == 0
        assert s.metric("bucketwire_dead_lettered_total", group="g") == 0
        # what the workers do hold, they ack; the rest then reaches them too
        ack(victim, results=[ok(1)])
        ack(attacker, ok={"x": [[2, 2]]})
        assert work_off([victim, attacker], {3, 4, 5, 6}) == {3, 4, 5, 6}
        wait_for(lambda: beat() and s.metric("bucketwire_acked_total", group="g") == 6, 10, "all six acked once")
        with s.client() as c:
            head = c.status()["topics"]["x"]["head"]
        assert head == 6, "a follow-on riding a forged ack was committed"
        assert s.metric("bucketwire_dead_lettered_total", group="g") == 0
    finally:
        close(victim, attacker)


def test_an_ack_from_a_peer_that_never_joined_changes_nothing(stack_factory: Any) -> None:
    """A peer with the group's key that sent no READY acks the group's in-flight and loaded events: ignored."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(3)])
    victim = join(s)
    outsider = dealer(s)
    try:
        assert delivered(victim, 1) == [1]
        ack(outsider, ok={"x": [[1, 3]]})
        wait_for(lambda: beat() and not_held(s) == 1, 10, "the forged ack refused")
        assert "ack for events not handed to this worker; ignored" in s.dump_logs()
        assert s.metric("bucketwire_acked_total", group="g") == 0
        ack(victim, ok={"x": [[1, 1]]})
        assert work_off([victim], {2, 3}) == {2, 3}
        wait_for(lambda: beat() and s.metric("bucketwire_acked_total", group="g") == 3, 10, "all three acked once")
    finally:
        close(victim, outsider)


def test_a_ready_with_absurd_topics_is_refused_and_makes_no_group(stack_factory: Any) -> None:
    """A READY for a group the config does not name, listing 60,000 topic names (each would get a stored cursor
    and the group's refill would walk them every turn, for good), a NUL byte in a name, or a name over 255
    characters, is refused with one ERR naming the fix; no group is made and the hub goes on serving."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    cases = {
        "many": [f"t{i}" for i in range(60_000)],
        "nul": ["ok", "a\0b"],
        "long": ["x" * 256],
    }
    for name, topics in cases.items():
        d = dealer(s, {"group": f"adhoc-{name}", "topics": topics, "credit": 1, "proto": 2})
        try:
            err = reply(d, b"ERR")
            assert err["fatal"] is True, err
            assert "topic" in err["error"] and "\n" not in err["error"], err
        finally:
            close(d)
    with s.client() as c:
        st = c.status()
    assert not [g for g in st["groups"] if g.startswith("adhoc")], st["groups"].keys()
    assert s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="topics") == 3


def test_absurd_seqs_are_refused_with_one_err_and_change_nothing(stack_factory: Any) -> None:
    """Valid msgspec, absurd values: a seq below 1 in an ACK's results (the ranges refuse one already), a seq of
    2**63 (past what the journal can store) in a FETCH or a DLQ item. Each gets one ERR or a per-item error
    naming the field, never a traceback in the hub's log; the held event stays held."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(0)])
    w = join(s)
    peer = dealer(s)
    try:
        assert delivered(w, 1) == [1]
        for seq in (0, -1, 2**64):
            ack(w, results=[{"t": "x", "s": seq, "ok": False, "error": "forged", "permanent": True}, ok(1)])
            err = reply(w, b"ERR")["error"]
            assert "ACK header" in err and "\n" not in err, err
        peer.send_multipart([b"FETCH", json.dumps({"req": 1, "topic": "x", "from": 2**63, "limit": 10}).encode()])
        err = reply(peer, b"ERR")["error"]
        assert "FETCH header" in err and "from" in err, err
        peer.send_multipart([b"DLQ", json.dumps({"req": 2, "action": "purge", "by": "t",
                                                 "items": [{"topic": "dead-letter", "seq": 2**63}]}).encode()])
        res = reply(peer, b"DLQR")
        assert "no such event" in res["results"][0]["error"], res
        logs = s.dump_logs()
        assert "Traceback" not in logs and "unexpected error" not in logs, logs[-3000:]
        assert s.metric("bucketwire_acked_total", group="g") == 0
        assert s.metric("bucketwire_dead_lettered_total", group="g") == 0
        ack(w, ok={"x": [[1, 1]]})
        wait_for(lambda: beat() and s.metric("bucketwire_acked_total", group="g") == 1, 10, "seq 1 acked by w")
    finally:
        close(w, peer)


def curve_dealer(cfg: Any, ready: dict[str, Any] | None = None, ident: bytes | None = None) -> zmq.Socket[bytes]:
    from bucketwire import security

    d: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    if ident is not None:
        d.setsockopt(zmq.IDENTITY, ident)
    security.apply_client(d, cfg)
    d.connect(cfg.client.work)
    if ready is not None:
        d.send_multipart([b"READY", json.dumps({"schema": SCHEMA_VERSION, **ready}).encode()])
        LIVE.append(d)
    return d


def test_another_keys_death_and_running_notices_do_not_touch_a_worker(stack_factory: Any, tmp_path: Any) -> None:
    """With CURVE, a peer holding another worker key of the same group names the victim's identity in GONE
    (which would charge the victim's running event an attempt and requeue it while the victim runs it) and in
    RUNNING (which would keep a silent victim's events held past heartbeat_timeout). Neither is that key's worker
    to speak for: the victim keeps its event, and when it falls silent the hub still gives it up and hands the
    event out again."""
    from tests.test_security import cfg_for, client_config, secure_stack

    roles = """
[security.roles.worker-a]
groups = ["g"]
subscribe = ["x"]

[security.roles.worker-b]
groups = ["g"]
subscribe = ["x"]
"""
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "worker-a", "worker-b"), roles=roles,
                        clients=("admin", "worker-a", "worker-b"))
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(0)])
    victim_id = b"w-victim-0001"
    joined = {"group": "g", "topics": ["x"], "credit": 1, "proto": 2}
    victim = curve_dealer(cfg_for(client_config(s, d, "worker-a")), joined, victim_id)
    attacker = curve_dealer(cfg_for(client_config(s, d, "worker-b")))
    try:
        assert delivered(victim, 1) == [1]
        gone = {"g": "g", "w": victim_id.hex(), "running": ["x", 1], "reason": "forged death"}
        attacker.send_multipart([b"GONE", json.dumps(gone).encode()])
        # the victim is still the holder: its own ack counts (an ack of an event handed back would not)
        attacker.send_multipart([b"STATUS", b'{"req": 1}'])
        assert reply(attacker, b"STATUSR")["groups"]["g"]["inflight"] == 1
        ack(victim, ok={"x": [[1, 1]]})
        wait_for(lambda: beat() and s.metric("bucketwire_acked_total", group="g") == 1, 10, "the victim's ack")
        assert s.metric("bucketwire_retries_total", group="g") == 0
        assert "worker child died" not in s.dump_logs()
        # RUNNING for a victim that went silent does not keep it
        with s.client() as c:
            c.publish_events([ev(1)])
        assert delivered(victim, 1) == [2]
        LIVE.remove(victim)  # silent from now on
        run = {"g": "g", "w": victim_id.hex(), "run": ["x", 2, 0.5, 60]}
        deadline = time.monotonic() + 20
        while "worker lost (no heartbeat)" not in s.dump_logs():
            assert time.monotonic() < deadline, "the silent victim was kept alive by another key's RUNNING"
            attacker.send_multipart([b"RUNNING", json.dumps(run).encode()])
            time.sleep(0.1)
    finally:
        close(victim, attacker)


def test_dlq_and_replay_tell_a_limited_key_nothing_of_topics_and_groups_it_may_not_see(stack_factory: Any,
                                                                                         tmp_path: Any) -> None:
    """A worker key of group g (role: groups g, reads x) sends DLQ purge items naming seqs of a topic it may not
    read, and REPLAY of an unknown group. The answers told it whether each seq exists in that topic, whether it is
    a dead letter, and which group it belongs to ('may not purge dead letters of group 'h''), and listed every
    group of the hub. Now: the same refusal for every seq of a topic it may not read, and only its own groups."""
    from tests.test_security import cfg_for, client_config, secure_stack

    roles = """
[security.roles.worker-a]
groups = ["g"]
subscribe = ["x"]
"""
    groups = CFG + '\n[groups.hidden-h]\ntopics = ["secret"]\nplugins = []\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "worker-a"), roles=roles, groups=groups,
                        clients=("admin", "worker-a"))
    s.start_hub()
    with s.client() as c:
        c.publish("secret", {"a": 1})
    peer = curve_dealer(cfg_for(client_config(s, d, "worker-a")))
    try:
        answers = []
        for topic, seq in (("secret", 1), ("secret", 2), ("dead-letter", 1)):
            peer.send_multipart([b"DLQ", json.dumps({"req": seq, "action": "purge", "by": "t",
                                                     "items": [{"topic": topic, "seq": seq}]}).encode()])
            err = reply(peer, b"DLQR")["results"][0]["error"]
            answers.append(err.replace(topic, "T"))
        assert len(set(answers)) == 1 and "may not read topic" in answers[0], answers
        peer.send_multipart([b"REPLAY", json.dumps({"req": 9, "group": "nope", "from_seq": 1}).encode()])
        err = reply(peer, b"REPLAYR")["error"]
        assert "hidden-h" not in err, err
        assert not any("hidden-h" in a for a in answers)
    finally:
        close(peer)


def test_a_worker_given_up_on_still_has_its_late_ack_counted_for_what_it_held(stack_factory: Any) -> None:
    """A worker the hub gave up on (silent past heartbeat_timeout: a stall, a congested link; or its supervisor's
    death notice overtook its last ACK) may still have done its events: its ACK, arriving within
    heartbeat_timeout after, counts for the events it held, so they do not run again on the next worker. Not for
    others': the same late ACK naming an event it never held is ignored (past the grace: the next test)."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(3)])
    late = join(s, credit=2)
    fresh = None
    try:
        assert delivered(late, 2) == [1, 2]
        LIVE.remove(late)  # it stops heartbeating: the hub gives up on it and requeues 1 and 2
        wait_for(lambda: s.status()["groups"]["g"]["workers"] == 0, 20, "the hub to give the silent worker up")
        ack(late, ok={"x": [[1, 1]]}, results=[ok(2), ok(3)])  # done while silent; 3 was never its event
        fresh = join(s, credit=8)
        got = set(delivered(fresh, 1))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # pacing: anything more it would be handed comes now
            if fresh.poll(100):
                frames = fresh.recv_multipart()
                if frames[0] == b"DELIVER":
                    got.update(int(json.loads(b)["seq"]) for b in frames[2:])
            beat()
        assert got == {3}, f"handed out again: {sorted(got)} (1 and 2 were done by the worker given up on)"
    finally:
        close(late, fresh)


def test_a_late_ack_past_the_grace_does_not_count(stack_factory: Any) -> None:
    """Past heartbeat_timeout after the hub gave a worker up, its ACK no longer counts: the event runs again
    (at least once), as the README's "What can repeat" says."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(0)])
    late = join(s)
    fresh = None
    try:
        assert delivered(late, 1) == [1]
        LIVE.remove(late)
        wait_for(lambda: s.status()["groups"]["g"]["workers"] == 0, 20, "the hub to give the silent worker up")
        time.sleep(s.cfg.hub.heartbeat_timeout + 0.5)  # pacing: past the grace the late ACK had
        ack(late, ok={"x": [[1, 1]]})
        fresh = join(s)
        assert delivered(fresh, 1) == [1]
    finally:
        close(late, fresh)


def test_a_join_and_leave_loop_cannot_fill_the_hubs_log(stack_factory: Any) -> None:
    """A peer of a group sending READY then BYE in a loop (a stolen key, a crash-looping port of the worker) made
    two info lines per cycle in the hub's log, without end. Joins and departures of one group are logged as they
    come up to a burst a real pool start never reaches, then once per window with how many were left out; the
    `workers` gauge and `status` still see every one."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    cycles = 400
    for _ in range(cycles):
        d = dealer(s)
        d.send_multipart([b"READY", json.dumps({"schema": SCHEMA_VERSION, "group": "g", "credit": 1,
                                                "proto": 3}).encode()])
        d.send_multipart([b"BYE", json.dumps({"requeue": []}).encode()])
        reply(d, b"BYE")  # the hub answers a BYE once it has read it
        close(d)
    # a last, honest worker that stays: its join is what the wait below sees
    stay = dealer(s, {"group": "g", "credit": 1, "proto": 3})
    try:
        wait_for(lambda: beat() and s.status()["groups"]["g"]["workers"] == 1, 20, "the last worker joined")
        log = (s.dir / "hub-0.log").read_text(errors="replace")
        joined, left = log.count("worker joined"), log.count("worker left")
        assert joined + left < cycles / 2, f"{joined} join and {left} leave lines for {cycles} cycles"
        assert joined >= 10 and left >= 10, "a burst is still logged line by line"
    finally:
        close(stay)


def handed(d: zmq.Socket[bytes], seqs: set[int], timeout: float = 20) -> dict[int, int]:
    """The attempt number each of `seqs` is DELIVERed to `d` with (a retried one may come in a later batch)."""
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while not seqs <= set(got):
        poll(d, deadline, f"only {got} of {sorted(seqs)} delivered")
        frames = d.recv_multipart()
        if frames[0] == b"DELIVER":
            got.update(zip([int(json.loads(b)["seq"]) for b in frames[2:]], json.loads(frames[1])["a"], strict=True))
    return got


def test_taking_batches_and_leaving_charges_no_attempt(stack_factory: Any) -> None:
    """A peer holding the group's key (or a flapping, crash-looping pool) joins, is handed a batch, and leaves
    without running anything -- by BYE, or by going silent past heartbeat_timeout -- again and again. Each cycle
    used to charge an attempt (every event a BYE did not name; the oldest event of a silent one), so after
    max_attempts cycles innocent events were dead letters no handler ever failed. Nothing is charged: the next
    worker gets each event on its first attempt, and nothing reaches the dead-letter topic."""
    s: Stack = stack_factory(CFG + "\n[topics.x]\nmax_attempts = 2\nbackoff_base = 0.05\nbackoff_max = 0.1\n")
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(3)])
    seqs = {1, 2, 3}
    for cycle in range(6):  # three of each way of leaving: past max_attempts either way
        d = join(s, credit=8)
        try:
            got = handed(d, seqs)
            assert got == {1: 1, 2: 1, 3: 1}, f"cycle {cycle}: charged by an earlier departure: {got}"
            if cycle % 2:
                LIVE.remove(d)  # silent: the hub gives it up after heartbeat_timeout
                wait_for(lambda: beat() and s.status()["groups"]["g"]["workers"] == 0, 20, "the silent peer given up")
            else:
                d.send_multipart([b"BYE", json.dumps({"requeue": []}).encode()])
                reply(d, b"BYE")
        finally:
            close(d)
    honest = join(s, credit=8)
    try:
        assert handed(honest, seqs) == {1: 1, 2: 1, 3: 1}
        ack(honest, ok={"x": [[1, 3]]})
        wait_for(lambda: beat() and s.status()["groups"]["g"]["lag"] == 0, 20, "the honest worker's acks")
    finally:
        close(honest)
    st = s.status()["groups"]["g"]
    assert st["dead_lettered"] == 0, st
    with s.client() as c:
        assert c.fetch("dead-letter", 1)[1] == [], "an innocent event was dead-lettered"


def test_a_silent_worker_is_charged_only_for_what_it_was_seen_running(stack_factory: Any) -> None:
    """The other side of the rule above: a worker that vanishes after showing it works -- it acked an event, or
    its heartbeat named the event it was running -- is charged that event (the one it ran, or the oldest it held,
    the one it was on), so an event that takes whole hosts down still ends in the dead-letter topic."""
    s: Stack = stack_factory(CFG + "\n[topics.x]\nmax_attempts = 5\nbackoff_base = 0.05\nbackoff_max = 0.1\n")
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(4)])
    w1 = join(s, credit=8)
    w2 = None
    try:
        assert handed(w1, {1, 2, 3, 4}) == {1: 1, 2: 1, 3: 1, 4: 1}
        ack(w1, ok={"x": [[1, 1]]})  # it ran 1: it works through its events
        w1.send_multipart([b"HB", json.dumps({"run": ["x", 3, 0.5, 60]}).encode()])  # now running 3
        LIVE.remove(w1)
        wait_for(lambda: beat() and s.status()["groups"]["g"]["workers"] == 0, 20, "the silent worker given up")
        w2 = join(s, credit=8)
        assert handed(w2, {2, 3, 4}) == {2: 1, 3: 2, 4: 1}, "only the event its heartbeat named is charged"
        LIVE.remove(w2)  # never acked, never said what it ran: nothing charged
        wait_for(lambda: beat() and s.status()["groups"]["g"]["workers"] == 0, 20, "the second worker given up")
        close(w2)
        w2 = join(s, credit=8)
        got = handed(w2, {2, 3, 4})
        assert got == {2: 1, 3: 2, 4: 1}, got
        ack(w2, ok={"x": [[2, 2]]})  # it acked 2, then goes silent holding 3 and 4: the oldest, 3, pays
        LIVE.remove(w2)
        wait_for(lambda: beat() and s.status()["groups"]["g"]["workers"] == 0, 20, "the third worker given up")
        close(w2)
        w2 = join(s, credit=8)
        assert handed(w2, {3, 4}) == {3: 3, 4: 1}
    finally:
        close(w1, w2)


def test_a_heartbeat_naming_a_running_event_with_absurd_numbers_is_refused(stack_factory: Any) -> None:
    """A worker's heartbeat (or its pool's RUNNING) says which event its handler runs, for how long, under what
    handler_timeout; `status` shows it and now a silent worker is charged that event. Its numbers were taken
    as they came: NaN or Infinity (which the hub's JSON reader accepts) showed in `status` as null, and
    `bucketwire status` died with a traceback for every operator while such a peer held an event. They are
    refused with an ERR naming the field, and nothing of them is kept."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(0)])
    w = join(s)
    try:
        assert delivered(w, 1) == [1]
        for run in ('["x", 1, NaN, 300]', '["x", 1, 2, Infinity]', '["x", 1, -5, 300]', '["x", 1, 2, 0]',
                    '["x", 0, 2, 300]', '["x", 1, 1e999, 300]'):
            w.send_multipart([b"HB", b'{"run": ' + run.encode() + b"}"])
            err = reply(w, b"ERR")["error"]
            assert "'run'" in err, (run, err)
        assert s.status()["groups"]["g"]["long_running"] == []
        LIVE.remove(w)  # from now on it heartbeats only with a real `run`, which still counts (a plain HB clears it)

        def honest() -> bool:
            w.send_multipart([b"HB", b'{"run": ["x", 1, 2.5, 300]}'])
            return [r["seq"] for r in s.status()["groups"]["g"]["long_running"]] == [1]

        wait_for(honest, 10, "the honest heartbeat shown")
        p = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(s.cfg_path)],
                           capture_output=True, text=True, timeout=60, env=s.env)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    finally:
        close(w)


def test_a_failure_with_an_absurd_retry_delay_is_refused_whole_and_changes_nothing(stack_factory: Any) -> None:
    """A worker holding an event fails it with a Retry delay of NaN, one out of range (1e999), a negative number
    or a string: the whole ACK is refused with an ERR naming `delay`, and the event stays in flight with that
    worker, uncharged (its ACK then counts as usual). A delay past a day (`Infinity` too, which the fallback JSON
    reader takes) is capped at a day (MAX_RETRY_DELAY), as any long Retry is. A guard: the ACK schema refuses
    these today; it must go on doing so."""
    s: Stack = stack_factory(CFG)
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(0)])
    w = join(s)
    try:
        assert delivered(w, 1) == [1]
        for delay in (b"NaN", b"1e999", b"-1", b'"soon"'):
            w.send_multipart([b"ACK", b'{"g": "g", "results": [{"t": "x", "s": 1, "ok": false, "error": "e", '
                                      b'"line": "e", "permanent": false, "delay": ' + delay + b"}]}"])
            err = reply(w, b"ERR")["error"]
            assert "delay" in err or "JSON" in err, (delay, err)
        st = s.status()["groups"]["g"]
        assert st["retried"] == 0 and st["dead_lettered"] == 0 and st["inflight"] == 1, st
        ack(w, ok={"x": [[1, 1]]})
        wait_for(lambda: beat() and s.status()["groups"]["g"]["lag"] == 0, 10, "its ack counted")
    finally:
        close(w)


def test_a_ready_asking_for_earliest_does_not_move_an_existing_groups_cursor(stack_factory: Any) -> None:
    """`start = "earliest"` in a READY applies to a topic new to its group only: a peer joining a group that
    already consumes the topic cannot make it read the topic's history again (a guard)."""
    s: Stack = stack_factory("")
    s.start_hub()
    with s.client() as c:
        c.publish_events([ev(i) for i in range(3)])  # before group h exists: "latest" starts after them
    first = dealer(s, {"group": "h", "topics": ["x"], "credit": 8, "proto": 2, "start": "latest"})
    late = None
    try:
        wait_for(lambda: beat() and "h" in s.status()["groups"], 10, "group h made")
        with s.client() as c:
            c.publish_events([ev(3)])
        assert delivered(first, 1) == [4]
        ack(first, g="h", ok={"x": [[4, 4]]})
        wait_for(lambda: beat() and s.status()["groups"]["h"]["lag"] == 0, 10, "its ack counted")
        late = dealer(s, {"group": "h", "topics": ["x"], "credit": 8, "proto": 2, "start": "earliest"})
        wait_for(lambda: beat() and s.status()["groups"]["h"]["workers"] == 2, 10, "the second peer joined")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # pacing: anything it would be handed comes now
            beat()
            for d in (first, late):
                if d.poll(100):
                    frames = d.recv_multipart()
                    assert frames[0] != b"DELIVER", f"handed out again: {frames[2:]}"
        assert s.status()["groups"]["h"]["lag"] == 0, s.status()["groups"]["h"]
    finally:
        close(first, late)
