"""A real hub killed with SIGKILL again and again under a mixed load: small PUBs that take the journal's front log
(hub/journal_front.py), large ones that go straight into SQLite, and a worker pool acking. Half of the kills land
inside the front log's window (the hub runs with `Journal.settle` wrapped to SIGKILL it, now and then, before a
staged commit reaches SQLite), the others at a random point from outside; every restart also holds its key filter
unbuilt for a while (hub/key_filter.py: every key "maybe" until then) and is sent a duplicate at once.

What must hold after all of it (README "Guarantees"): every confirmed event is in the journal exactly once, at the
seq it was confirmed with; no seq is missing or holds another event; a publish sent again is answered as a
duplicate at that seq; every confirmed event is handled, and what repeats stays within README "What can repeat".
tests/test_crash_points.py counts handled events across kills; this one checks the journal's seqs themselves."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bucketwire import Event
from bucketwire.client import HubClient
from tests.fixtures_hub import wait_for
from tests.test_local_socket import local_stack

KILLS = int(os.environ.get("BUCKETWIRE_FRONT_KILLS", "6"))
CREDIT = 8

KILLING_HUB = """
import os, random, signal, sys, time
from bucketwire.hub import journal, key_filter

rng = random.Random(int(sys.argv[2]))
chance = float(sys.argv[3])
settle = journal.Journal.settle

def settle_or_die(self, now=None):
    if self._pending is not None and self._pending.batches and rng.random() < chance:
        os.kill(os.getpid(), signal.SIGKILL)
    return settle(self, now)

started = time.monotonic()
poll = key_filter.KeyFilter.poll

def poll_late(self):
    if time.monotonic() - started > 1.5:  # the filter stays unbuilt: every key "maybe", SQLite asked
        poll(self)

journal.Journal.settle = settle_or_die
key_filter.KeyFilter.poll = poll_late
sys.argv = ["bucketwire", "hub", "-c", sys.argv[1]]
from bucketwire_start import main
main()
"""


def ev(i: int) -> Event:
    return Event(id=f"ev-{i}", source="urn:front-crash", type="s3:ObjectCreated:Put", topic="photos",
                 data={"bucket": "b", "key": f"k{i}", "n": i})


@pytest.mark.timeout(300)
def test_confirmed_events_keep_their_seqs_across_kills_inside_and_outside_the_front_log_window(stack_factory):
    short = Path(tempfile.mkdtemp(prefix="bwk-", dir="/tmp"))  # a Unix socket's path is short
    try:
        _run(local_stack(stack_factory, short / "hub.sock", extra=f"credit = {CREDIT}\n"))
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _run(s: Any) -> None:
    rng = random.Random(int(os.environ.get("BUCKETWIRE_CRASH_SEED", "12")))
    killed_inside = 0

    def start(chance: float) -> None:
        log = s.dir / f"hub-killing-{len(s.logs)}.log"
        s.logs.append(log)
        s.hub_proc = subprocess.Popen(
            [sys.executable, "-c", KILLING_HUB, str(s.cfg_path), str(rng.randrange(1 << 30)), str(chance)],
            env=s.env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: s.healthy() or s.hub_proc.poll() is not None, 30, "hub /healthz")

    confirmed: dict[str, int] = {}  # id -> the seq its confirmation gave
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def publisher() -> None:
        n = 0
        try:
            while not stop.is_set():
                size = 20 if n % 7 == 3 else 1 + n % 3  # 20: over FRONT_EVENTS, straight into SQLite
                batch = [ev(i) for i in range(n, n + size)]
                while not stop.is_set() and n - len(s.handled()) > 200:
                    time.sleep(0.02)  # pacing: keep the stream a little ahead of the group
                while not stop.is_set():
                    try:
                        with HubClient(s.cfg, timeout=3) as c:
                            results = c.publish_events(batch)
                        break
                    except Exception:  # the hub is down: send the same ids again (answered as duplicates)
                        time.sleep(0.05)  # pacing: a publisher's retry interval
                else:
                    return
                with lock:
                    for e, r in zip(batch, results, strict=True):
                        seq = int(r["seq"])
                        assert confirmed.setdefault(e.id, seq) == seq, (e.id, confirmed[e.id], r)
                n += size
        except BaseException as e:  # surfaced below
            errors.append(e)

    start(0.02)
    s.start_worker("g", 2)
    t = threading.Thread(target=publisher)
    t.start()
    try:
        for k in range(KILLS):
            before = len(confirmed)
            if k % 2:  # from outside, at a random point of the stream
                wait_for(lambda b=before: len(confirmed) >= b + 100, 60, "100 more events confirmed")
                time.sleep(rng.uniform(0.0, 0.1))  # pacing: a random kill point
                s.hub_proc.send_signal(signal.SIGKILL)
            s.hub_proc.wait(60)  # inside: the hub kills itself at a staged commit's settle, within ~50 of them
            assert s.hub_proc.returncode == -signal.SIGKILL, s.dump_logs()
            if k % 2 == 0:
                killed_inside += 1
            with lock:
                last = max(confirmed.items(), key=lambda kv: kv[1], default=None)
            start(0.02 if k + 1 < KILLS and (k + 1) % 2 == 0 else 0.0)  # killed from outside next: not before
            if last is not None:  # at once: the key filter is not built yet
                with HubClient(s.cfg, timeout=10) as c:
                    again = c.publish_events([ev(int(last[0][3:]))])[0]
                assert again["duplicate"] and int(again["seq"]) == last[1], (last, again)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert killed_inside == (KILLS + 1) // 2

    with HubClient(s.cfg, timeout=10) as c:
        at: dict[int, str] = {}
        while True:
            _, bodies = c.fetch("photos", len(at) + 1, 1000)
            if not bodies:
                break
            for b in bodies:
                env = json.loads(b)
                at[int(env["seq"])] = env["id"]
        assert sorted(at) == list(range(1, len(at) + 1)), "no seq missing"
        assert len(set(at.values())) == len(at), "no event twice in the journal"
        wrong = {i: (q, at.get(q)) for i, q in confirmed.items() if at.get(q) != i}
        assert not wrong, f"{len(wrong)} confirmed events not at their seq, e.g. {list(wrong.items())[:5]}"
        sample = rng.sample(sorted(confirmed), 50)
        again = c.publish_events([ev(int(i[3:])) for i in sample])
        assert [(r["duplicate"], int(r["seq"])) for r in again] == [(True, confirmed[i]) for i in sample]

    wait_for(lambda: s.status()["groups"]["g"]["lag"] == 0 and
             {r["id"] for r in s.handled()} >= set(confirmed), 120, "the group to catch up")
    seen = Counter(r["id"] for r in s.handled())
    dups = sum(c - 1 for c in seen.values())
    bound = KILLS * 2 * CREDIT * 2  # as tests/test_crash_points.py: per kill, in flight plus 5 ms of acks
    print(f"{len(confirmed)} confirmed, {dups} handled twice (bound {bound}) across {KILLS} hub kills")
    assert dups <= bound, f"{dups} repeats over {KILLS} hub kills; bound {bound}"
    assert "writing events the front log held from before a crash" in s.dump_logs(100_000)
