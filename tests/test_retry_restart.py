"""A failing event's attempts and its scheduled retry survive a SIGKILL of the (sqlite) hub.

Before, both lived only in the hub's memory: every restart gave a poison event `max_attempts` fresh tries (a new
round of crashes for an event that kills its worker) and delivered a retry that a plugin had asked to wait for
(`Retry(delay=...)`) at once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from bucketwire import Event
from tests.fixtures_hub import wait_for

FLAKY = str(Path(__file__).parent / "plugins" / "flaky.py")

CONFIG = """
[topics.t]
max_attempts = 4
backoff_base = 0.01
backoff_max = 0.02

[groups.w]
topics = ["t"]
plugins = []
start = "earliest"

[plugins.flaky]
path = "{flaky}"
"""


def _stored(state: Path) -> dict[int, int]:
    """seq -> attempts, as the journal holds them (once the hub has stopped: it holds the file's lock)."""
    db = sqlite3.connect(f"file:{state / 'journal.db'}?mode=ro", uri=True)
    try:
        return {q: n for q, n in db.execute("SELECT seq, attempts FROM retries WHERE grp='w' AND topic='t'")}
    finally:
        db.close()


def _attempts(log: Path) -> dict[int, list[int]]:
    """seq -> the attempt number (ctx.attempt) of each try, in order."""
    out: dict[int, list[int]] = {}
    for ln in log.read_text().splitlines() if log.exists() else []:
        seq, a, _ = ln.split()
        out.setdefault(int(seq), []).append(int(a))
    return out


def test_attempts_and_a_scheduled_retry_survive_a_hub_sigkill(stack_factory: Any, tmp_path: Path) -> None:
    flaky = tmp_path / "flaky.log"
    s = stack_factory(CONFIG.format(flaky=flaky))
    s.start_hub()
    s.start_worker("w", 1, "--plugin", FLAKY)

    def ev(**data: Any) -> Event:
        return Event(id=uuid.uuid4().hex, source="urn:test", type="test.thing", topic="t", data=data)

    with s.client() as c:
        # seq 1 asks for a retry 0.5 s later on every try (4 tries, then a dead letter); seq 2 for one 120 s later
        c.publish_events([ev(retry=0.5), ev(retry=120)])
    # seq 2's failure and seq 1's first two (seq 1's third comes 0.5 s after its second), then a commit: the one
    # that stores their counts (the loop counts a failure, then writes it with the cursors within 5 ms)
    wait_for(lambda: s.metric("bucketwire_retries_total", group="w") >= 3, 20, "three failed tries")
    commits = s.metric("bucketwire_journal_commits_total")
    wait_for(lambda: s.metric("bucketwire_journal_commits_total") > commits, 10, "a commit after them")
    s.kill_hub(signal.SIGKILL)
    s.start_hub()
    wait_for(lambda: (g := s.status()["groups"].get("w", {})).get("dead_lettered") == 1 and g.get("retrying") == 1
             and g.get("workers", 0) >= 1, 30, "seq 1 dead-lettered by the restarted hub, seq 2 waiting for its retry")
    tries = _attempts(flaky)
    # The restarted hub goes on counting: 1, 2, (3), 4. One try that was running when the hub died may be made
    # again under the same number (its failure never reached the journal). Counted afresh it would be 1, 2, 1, 2, ...
    one = tries[1]
    assert one[:2] == [1, 2] and one[-1] == 4 and all(b >= a for a, b in zip(one, one[1:], strict=False)), tries
    assert len(one) <= 5, tries
    def dead_letters() -> list[bytes]:  # counted in status as it is made, committed with the next commit
        with s.client() as c:
            return c.fetch("dead-letter", 1)[1]
    bodies = wait_for(dead_letters, 10, "the dead letter committed")
    assert json.loads(bodies[0])["data"]["attempts"] == 4
    # seq 2 is not delivered again before the 120 s it asked for: the restarted hub waits out the stored due time
    assert tries[2] == [1], tries
    s.stop()
    assert _stored(s.cfg.hub.state_dir) == {2: 1}, "a dead-lettered event's count is deleted, the waiting one's kept"


def test_a_clock_stepped_back_does_not_stretch_a_stored_retry(stack_factory: Any, tmp_path: Path) -> None:
    """Due times are stored as wall-clock times. A hub restarted after the clock stepped back (here: the stored
    time lies 30 days ahead, as it would after a 30-day step back) waited out the step on top of the backoff; what
    it loads waits no longer than the retry was given (Retry(delay=120)), stored beside it. A row written by a hub
    that stored no wait is clamped to the longest wait a retry can be given (Retry(delay)'s cap, a day)."""
    flaky = tmp_path / "flaky.log"
    s = stack_factory(CONFIG.format(flaky=flaky))
    s.start_hub()
    s.start_worker("w", 1, "--plugin", FLAKY)
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:test", type="test.thing", topic="t",
                                data={"retry": 120})])
    wait_for(lambda: s.status()["groups"]["w"]["retrying"] == 1, 20, "the event waiting for its retry")
    s.kill_hub(signal.SIGTERM)  # a clean stop writes the attempt count and due time
    db = sqlite3.connect(s.cfg.hub.state_dir / "journal.db")
    with db:
        assert db.execute("UPDATE retries SET due = due + ? WHERE grp='w'", (30 * 86_400,)).rowcount == 1
    db.close()
    s.start_hub()
    g = wait_for(lambda: (g := s.status()["groups"].get("w", {})).get("retrying") == 1 and g, 30,
                 "the restarted hub holding the retry")
    assert 0 < g["next_retry_in"] <= 120, g
    s.kill_hub(signal.SIGTERM)
    db = sqlite3.connect(s.cfg.hub.state_dir / "journal.db")
    with db:  # as a hub that predates retry_waits leaves it
        assert db.execute("DELETE FROM retry_waits WHERE grp='w'").rowcount == 1
        db.execute("UPDATE retries SET due = due + ? WHERE grp='w'", (30 * 86_400,))
    db.close()
    s.start_hub()
    g = wait_for(lambda: (g := s.status()["groups"].get("w", {})).get("retrying") == 1 and g, 30,
                 "the hub holding the retry without its wait")
    assert 120 < g["next_retry_in"] <= 86_400, g
    assert _attempts(flaky) == {1: [1]}
