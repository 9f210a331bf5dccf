"""A real hub killed between a small commit's front-log append and its SQLite write, after the DELIVER and the
PUBACK went out: the one window the front log (hub/journal_front.py) opens. The hub process runs with
`Journal.settle` wrapped to SIGKILL it when the staged commit holds the event "kill-me", so the kill lands there
every time (a random kill almost never does: it lasts microseconds).

What must hold: the publisher had its confirmation, so after a restart the event is in the journal at the seq it
was confirmed with, is handled (again: it was in flight when the hub died, README "What can repeat"), and no seq
is handed out twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bucketwire import Event
from tests.fixtures_hub import wait_for
from tests.test_local_socket import GROUP, local_stack

KILLING_HUB = """
import os, signal, sys
from bucketwire.hub import journal

settle = journal.Journal.settle

def settle_or_die(self, now=None):
    p = self._pending
    if p is not None and any(ev.id == "kill-me" for b in p.batches for ev in b.events):
        os.kill(os.getpid(), signal.SIGKILL)
    return settle(self, now)

journal.Journal.settle = settle_or_die
sys.argv = ["bucketwire", "hub", "-c", sys.argv[1]]
from bucketwire_start import main
main()
"""


def test_a_hub_killed_after_confirming_a_staged_commit_has_it_after_a_restart(stack_factory: Any) -> None:
    """The publisher and the pool on the hub's local socket: the loop thread writes the PUBACK into the socket
    itself before it settles. Over TCP libzmq's I/O thread writes it later, and a kill right after the send can
    take it unsent (the publisher then has no confirmation and sends again, which is fine but not this test)."""
    short = Path(tempfile.mkdtemp(prefix="bwf-", dir="/tmp"))  # a Unix socket's path is short
    try:
        _killed_inside_the_window(local_stack(stack_factory, short / "hub.sock"))
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_a_front_log_damaged_before_the_staged_commit_still_gives_it_back(stack_factory: Any) -> None:
    """The same kill, then a byte of the front log's first record (event "before", long in journal.db) flipped
    while the hub is down: a bad sector. The replay stopped at the damage and dropped "kill-me", confirmed as seq 2,
    and the next publish was handed seq 2 again."""
    def damage(front: Path) -> None:
        data = bytearray(front.read_bytes())
        data[20] ^= 0xFF  # inside the first record's rows (its header is 12 bytes)
        front.write_bytes(bytes(data))

    short = Path(tempfile.mkdtemp(prefix="bwf-", dir="/tmp"))
    try:
        s = local_stack(stack_factory, short / "hub.sock")
        _killed_inside_the_window(s, damage)
        assert "front log holds bytes that do not check out" in s.dump_logs()
        assert list((s.dir / "state").glob("journal.db-front.damaged-*")), "the damaged file is kept"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _killed_inside_the_window(s: Any, damage: Callable[[Path], None] | None = None) -> None:
    log = s.dir / "hub-killing.log"
    s.logs.append(log)
    s.hub_proc = subprocess.Popen([sys.executable, "-c", KILLING_HUB, str(s.cfg_path)], env=s.env,
                                  stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: s.healthy() or s.hub_proc.poll() is not None, 30, "hub /healthz")
    s.start_worker("g", 1)
    with s.client() as c:
        assert c.publish("photos", {"n": 0}, id="before")["seq"] == 1
        wait_for(lambda: len(s.handled()) == 1, 20, "the first event handled")
        # "before" goes into SQLite within SETTLE_AFTER of its commit, with the commits staged after it; a read of
        # the journal writes it at once: the kill's staged commits then hold "kill-me" alone, as the damage test
        # means them to.
        assert [b'"id":"before"' in b for b in c.fetch("photos", 1)[1]] == [True]
        confirmed = c.publish("photos", {"n": 1}, id="kill-me")
    assert confirmed["seq"] == 2 and not confirmed.get("duplicate")
    s.hub_proc.wait(10)
    assert s.hub_proc.returncode == -signal.SIGKILL, "the hub died inside the window"
    front = s.dir / "state" / "journal.db-front"
    assert front.stat().st_size > 0, "the staged commit was in the front log when the hub died"
    if damage is not None:
        damage(front)

    s.start_hub()
    with s.client() as c:
        _, bodies = c.fetch("photos", 1)
        assert [b'"id":"kill-me"' in b for b in bodies] == [False, True], bodies
        again = c.publish("photos", {"n": 1}, id="kill-me")
        assert again["seq"] == 2 and again["duplicate"], "the replayed event still deduplicates"
        assert c.publish("photos", {"n": 2}, id="after")["seq"] == 3, "no seq handed out twice"
    wait_for(lambda: {"kill-me", "after"} <= {r["id"] for r in s.handled()}, 30, "the events handled")
    assert sum(r["id"] == "kill-me" for r in s.handled()) <= 2
    assert "writing events the front log held from before a crash" in s.dump_logs()


FREEZING_HUB = KILLING_HUB.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                   "journal.Journal.settle = settle; os.kill(os.getpid(), signal.SIGSTOP)")
"""The hub stops itself (SIGSTOP) with a staged commit of "kill-me" confirmed and not yet in SQLite: what a
filesystem snapshot taken at that instant holds. Once: let go on, it may wait to write the commit (it is called
again with "kill-me" still staged) and must not stop again."""


def test_the_backup_recipe_copy_taken_inside_the_window_holds_every_confirmed_event(stack_factory: Any) -> None:
    """docs/operations.md, "Backups", a hub running: copy journal.db, journal.db-wal and journal.db-front as one
    instant left them, and start a hub on the copy. The instant is the worst one: the last confirmed commit in the
    front log only. The copy must hold every event confirmed before it, at its seq, with no gap; and the original
    hub, let go on, must not be disturbed by it."""
    short = Path(tempfile.mkdtemp(prefix="bwb-", dir="/tmp"))
    try:
        s = local_stack(stack_factory, short / "hub.sock")
        log = s.dir / "hub-freezing.log"
        s.logs.append(log)
        s.hub_proc = subprocess.Popen([sys.executable, "-c", FREEZING_HUB, str(s.cfg_path)], env=s.env,
                                      stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: s.healthy() or s.hub_proc.poll() is not None, 30, "hub /healthz")
        with s.client() as c:
            small = [c.publish("photos", {"n": i}, id=f"small-{i}")["seq"] for i in range(5)]
            big = c.publish_events([Event(id=f"big-{i}", source="urn:b", type="t", topic="photos", data={"n": i})
                                    for i in range(20)])  # over FRONT_EVENTS: straight into SQLite
            confirmed = c.publish("photos", {"n": 99}, id="kill-me")["seq"]
        assert small + [int(r["seq"]) for r in big] + [confirmed] == list(range(1, 27))
        wait_for(lambda: _state(s.hub_proc.pid) == "T", 20, "the hub stopped inside the window")
        copy = stack_factory(GROUP)
        (copy.dir / "state").mkdir()
        for name in ("journal.db", "journal.db-wal", "journal.db-front"):  # "copy the three files together"
            shutil.copy2(s.dir / "state" / name, copy.dir / "state" / name)
        os.kill(s.hub_proc.pid, signal.SIGCONT)
        copy.start_hub()
        with copy.client() as c:
            _, bodies = c.fetch("photos", 1, 100)
            ids = [json.loads(b)["id"] for b in bodies]
            seqs = [int(json.loads(b)["seq"]) for b in bodies]
            assert seqs == list(range(1, 27)) and ids[-1] == "kill-me", (seqs, ids)
            assert c.publish("photos", {"n": 100}, id="after")["seq"] == 27
        with s.client() as c:  # the original goes on, its staged commit written
            assert c.publish("photos", {"n": 100}, id="after")["seq"] == 27
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# -- several staged commits written into SQLite together (docs/performance.md, change 27) ------------------------

HOLDING_HUB = KILLING_HUB.replace("settle = journal.Journal.settle\n", """\
import json
journal.SETTLE_AFTER = 3600.0  # nothing is written by its deadline: the staged commits pile up
journal.SETTLE_EVENTS = 1000
settle = journal.Journal.settle
seen = sys.argv[2]
""").replace("        os.kill(os.getpid(), signal.SIGKILL)", """\
        with open(seen, "w") as f:
            json.dump({"batches": len(p.batches), "rows": len(p.rows) // journal.ROW}, f)
        os.kill(os.getpid(), signal.SIGKILL)""")


def test_a_hub_killed_with_several_confirmed_commits_staged_has_them_all_after_a_restart(stack_factory: Any) -> None:
    """Five publishes, each confirmed from its own front-log commit, none written into SQLite yet (the hub is told
    to wait for more): a kill -9 then, and after a restart every one is there at the seq it was confirmed with,
    each still deduplicates, and the next seq is new."""
    short = Path(tempfile.mkdtemp(prefix="bws-", dir="/tmp"))
    try:
        s = local_stack(stack_factory, short / "hub.sock")
        seen = s.dir / "staged.json"
        _scripted_hub(s, HOLDING_HUB, "holding", str(seen))
        with s.client() as c:
            seqs = [c.publish("photos", {"n": i}, id=f"held-{i}")["seq"] for i in range(4)]
            seqs.append(c.publish("photos", {"n": 4}, id="kill-me")["seq"])
        assert seqs == [1, 2, 3, 4, 5]
        s.hub_proc.wait(10)
        assert s.hub_proc.returncode == -signal.SIGKILL
        staged = json.loads(seen.read_text())
        assert staged["batches"] >= 2 and staged["rows"] >= 2, staged

        s.start_hub()
        with s.client() as c:
            _, bodies = c.fetch("photos", 1, 100)
            got = [(int(json.loads(b)["seq"]), json.loads(b)["id"]) for b in bodies]
            assert got == [(1, "held-0"), (2, "held-1"), (3, "held-2"), (4, "held-3"), (5, "kill-me")], got
            again = c.publish("photos", {"n": 2}, id="held-2")
            assert again["seq"] == 3 and again["duplicate"], "a replayed event still deduplicates"
            assert c.publish("photos", {"n": 5}, id="after")["seq"] == 6, "no seq handed out twice"
    finally:
        shutil.rmtree(short, ignore_errors=True)


TIMED_HUB = """
import sys
from bucketwire.hub import journal

settle = journal.Journal.settle

def settle_and_say(self, now=None):
    had = self._pending is not None
    out = settle(self, now)
    if had and self._pending is None:
        print("SETTLED by", "the loop's deadline" if now is not None else "a call that needs it", flush=True)
    return out

journal.Journal.settle = settle_and_say
sys.argv = ["bucketwire", "hub", "-c", sys.argv[1]]
from bucketwire_start import main
main()
"""


def test_a_staged_commit_with_no_traffic_after_it_is_written_by_the_loops_deadline(stack_factory: Any) -> None:
    """One publish, then nothing (no worker, so no acks either): the loop writes the staged commit into SQLite by its
    deadline, not at the next probe or status call, which could be seconds away (a crash meanwhile replays it, but
    the front log would grow, and a snapshot backup would need it)."""
    short = Path(tempfile.mkdtemp(prefix="bwt-", dir="/tmp"))
    try:
        s = local_stack(stack_factory, short / "hub.sock")
        log = _scripted_hub(s, TIMED_HUB, "timed")
        with s.client() as c:
            assert c.publish("photos", {"n": 0}, id="lone")["seq"] == 1
        wait_for(lambda: "SETTLED by" in log.read_text(), 20, "the staged commit written")
        first = next(line for line in log.read_text().splitlines() if line.startswith("SETTLED by"))
        assert first == "SETTLED by the loop's deadline", log.read_text()
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _scripted_hub(s: Any, script: str, name: str, *args: str) -> Path:
    """Start the stack's hub as `script` (the config's path, then `args`, on its command line); its log's path."""
    log = s.dir / f"hub-{name}.log"
    s.logs.append(log)
    s.hub_proc = subprocess.Popen([sys.executable, "-c", script, str(s.cfg_path), *args], env=s.env,
                                  stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: s.healthy() or s.hub_proc.poll() is not None, 30, "hub /healthz")
    return log

