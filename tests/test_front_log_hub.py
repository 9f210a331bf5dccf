"""A real hub killed between a small commit's front-log append and its SQLite write, after the DELIVER and the
PUBACK went out: the one window the front log (hub/journal_front.py) opens. The hub process runs with
`Journal.settle` wrapped to SIGKILL it when the staged commit holds the event "kill-me", so the kill lands there
every time (a random kill almost never does: it lasts microseconds).

What must hold: the publisher had its confirmation, so after a restart the event is in the journal at the seq it
was confirmed with, is handled (again: it was in flight when the hub died, README "What can repeat"), and no seq
is handed out twice."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fixtures_hub import wait_for
from tests.test_local_socket import local_stack

KILLING_HUB = """
import os, signal, sys
from bucketwire.hub import journal

settle = journal.Journal.settle

def settle_or_die(self):
    p = self._pending
    if p is not None and any(ev.id == "kill-me" for ev in p.batch.events):
        os.kill(os.getpid(), signal.SIGKILL)
    settle(self)

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
