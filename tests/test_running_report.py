"""A handler still running when its hub dies goes on; the hub that dispatches next must hold its event, from what
the worker's supervisor reports (hub/reports.py), and must trust no report beyond the reporting key's own group.

Real hub processes, real worker pools, real ZeroMQ; the JetStream takeover case is in tests/test_ha_crash.py.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import zmq

from bucketwire import security
from tests.fixtures_hub import Stack, wait_for
from tests.test_security import GROUPS, cfg_for, client_config, secure_stack

GROUP = """
[groups.g]
topics = ["photos"]
plugins = []
start = "earliest"
"""


def _runs(s: Stack) -> list[str]:
    started = Path(str(s.record) + ".started")
    return started.read_text().splitlines() if started.exists() else []


def _ids(s: Stack) -> list[str]:
    return [h["id"] for h in s.handled()]


def test_an_event_still_running_when_the_sqlite_hub_restarts_is_held_until_its_outcome(stack_factory,
                                                                                       tmp_path: Path) -> None:
    """The one hub is SIGKILLed while a worker runs a long handler, and started again: the handler goes on. The
    restarted hub must not hand that event, or a later event of its object, to another worker while it runs
    (README "Per-object order"); the event's ACK from the worker that ran it counts (not `not_held`), so it is
    handled once, and the later event of its object runs after it. An event the dead hub had also handed that
    child, queued behind the long one, is not run there after it: the restarted hub hands it out again."""
    s = stack_factory(GROUP)
    release = tmp_path / "release"
    try:
        s.start_hub()
        s.start_worker("g", 1)
        with s.client() as c:
            c.publish("photos", {"bucket": "b", "key": "big.jpg", "hold": str(release), "mark_start": True},
                      id="long")
        wait_for(lambda: len(_runs(s)) == 1, 30, "the long handler to start")
        with s.client() as c:
            c.publish("photos", {"bucket": "b", "key": "queued.jpg"}, id="queued")
        wait_for(lambda: s.status()["groups"]["g"]["inflight"] == 2, 30, "the queued event handed to the child")
        s.kill_hub()
        s.start_hub()
        s.start_worker("g", 2, wait=False)  # free workers the restarted hub could hand "long" to
        with s.client() as c:
            c.publish("photos", {"bucket": "b", "key": "big.jpg"}, id="later")  # same object: waits behind it
            c.publish("photos", {"bucket": "b", "key": "small.jpg"}, id="after")
        # "after" comes behind both in the topic: once it is handled, the hub has handed out all it would.
        wait_for(lambda: "after" in _ids(s) or len(_runs(s)) >= 2, 60, "the next event handled, or a second run")
        assert len(_runs(s)) == 1, "the event was run again while its first run still held it"
        assert "later" not in _ids(s), "a later event of the object ran while an earlier one still ran"
        held = s.status()["groups"]["g"]["long_running"]
        assert [(r["seq"], r["key"], r.get("reported")) for r in held] == [(1, "b/big.jpg", True)], held
        release.touch()
        wait_for(lambda: {"long", "later", "queued"} <= set(_ids(s)), 30, "the long event and the later one handled")
        ids = _ids(s)
        assert ids.count("long") == 1 and len(_runs(s)) == 1, ids
        assert ids.count("queued") == 1, ids
        assert ids.index("long") < ids.index("later"), ids
        assert s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="not_held") == 0
        assert s.status()["groups"]["g"]["topics"]["photos"]["lag"] == 0
    finally:
        release.touch()


def _report(cfg_path: Path, hdr: dict) -> None:
    """Send one supervisor's RUNNING notice, as the key of `cfg_path`."""
    cfg = cfg_for(cfg_path)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    security.apply_client(sock, cfg)
    sock.connect(cfg.client.work)
    try:
        sock.send_multipart([b"RUNNING", json.dumps(hdr).encode()])
        sock.send_multipart([b"STATUS", b'{"req": 1}'])  # answered once the hub has read the notice before it
        assert sock.poll(10_000), "no answer from the hub"
        sock.recv_multipart()
    finally:
        sock.close()


def test_a_forged_report_holds_nothing(stack_factory, tmp_path: Path) -> None:
    """A key that may work for group g sends RUNNING notices in the name of a child the hub does not know: for
    group h (its role does not have it), for g naming h's topic, for an event g has acked, for a seq past the
    topic's head. Each is refused (counted, logged), nothing is held, and those events go to real workers as
    ever. A true report of g's own unacked event is held, and only until its notices stop."""
    roles = '\n[security.roles.limited]\ngroups = ["g"]\nsubscribe = ["x"]\n'
    groups = GROUPS + '\n[groups.h]\ntopics = ["secret"]\nplugins = []\nstart = "earliest"\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles, groups=groups)
    s.start_hub()
    with s.client() as c:
        c.publish("x", {"bucket": "b", "key": "one"}, id="x1")
    pool = s.start_worker("g", 1)
    wait_for(lambda: s.status()["groups"]["g"]["topics"]["x"]["cursor"] == 1, 30, "x 1 acked")
    os.killpg(pool.pid, signal.SIGTERM)
    pool.wait(30)
    with s.client() as c:
        c.publish("x", {"bucket": "b", "key": "two"}, id="x2")
        c.publish("secret", {"bucket": "b", "key": "s"}, id="s1")
    lim = client_config(s, d, "limited")

    def forged(group: str, topic: str, seq: int) -> dict:
        return {"g": group, "w": (b"w-" + uuid.uuid4().bytes).hex(), "run": [topic, seq, 0.5, 600]}

    for hdr in (forged("h", "secret", 1), forged("g", "secret", 1), forged("g", "x", 1), forged("g", "x", 99)):
        _report(lim, hdr)
    wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="report") == 4, 20,
             "four reports refused")
    st = s.status()["groups"]
    assert (st["g"]["inflight"], st["g"]["workers"], st["h"]["inflight"], st["h"]["workers"]) == (0, 0, 0, 0), st
    # Logged once per key and window (logs.PeerRateLimit: a key cannot fill the log); counted every time, above.
    log = "\n".join(p.read_text(errors="replace") for p in s.logs if p.name.startswith("hub"))
    assert "report of a running event refused; nothing held group=h" in log and "may not join group 'h'" in log

    true = forged("g", "x", 2)  # g's own unacked event: held as long as its notices come
    _report(lim, true)
    wait_for(lambda: s.status()["groups"]["g"]["inflight"] == 1, 10, "the reported event held")
    s.start_worker("g", 1, wait=False)
    s.start_worker("h", 1, wait=False)
    # The notices stopped: given up after heartbeat_timeout (charged, as a lost worker is), then handled.
    wait_for(lambda: {"x2", "s1"} <= set(_ids(s)), 30, "x 2 and the secret event handled by real workers")
    assert s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="report") == 4
