"""The journal's disk fills up under a running hub, and space comes back from outside (no restart); and a hub
SIGKILLed while its disk is full. A real tmpfs mount (root only; skipped otherwise), real hub and worker
processes on loopback.

What must hold (README "Guarantees" and "Operations"): while the disk is full every publish -- webhook or ZeroMQ
-- is refused with a reason naming the journal, and none of it is ever committed or handled later; the hub stays
up and says so in one line, not one per request; once space is free it commits again by itself, what was
committed before is neither lost nor handled again, and acks that arrived while nothing could be written are not
forgotten."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bucketwire.client import HubRefused
from bucketwire.envelope import Event
from tests.fixtures_hub import Stack, wait_for
from tests.test_ingress_guarantees import _fill as fill
from tests.test_ingress_guarantees import _healthz, _mount_tmpfs

StackFactory = Callable[..., Stack]
CFG = '\n[groups.g]\ntopics = ["x"]\nplugins = []\nstart = "earliest"\n'


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "disk"
    if not _mount_tmpfs(d, "8m"):
        pytest.skip("needs root and a tmpfs mount for a real full filesystem")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def on_disk(s: Stack, disk: Path) -> Stack:
    s.cfg_path.write_text(s.cfg_path.read_text().replace(str(s.dir / "state"), str(disk / "state")))
    return s


def ce(eid: str, **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": eid, "source": "urn:disk", "type": "t", "topic": "x", "data": data}


def post(s: Stack, eid: str, **data: Any) -> tuple[int, dict[str, Any]]:
    return s.post("/events", json.dumps(ce(eid, **data)).encode())


def pub(s: Stack, eid: str, **data: Any) -> dict[str, Any]:
    with s.client(10) as c:
        return c.publish_events([Event(id=eid, source="urn:disk", type="t", topic="x", data=data)])[0]


def journal_ids(s: Stack) -> list[str]:
    """Every event id topic x holds, read back through the hub."""
    out: list[str] = []
    with s.client(10) as c:
        while True:
            _, bodies = c.fetch("x", len(out) + 1, 1000)
            if not bodies:
                return out
            out += [json.loads(b)["id"] for b in bodies]


def hub_log(s: Stack) -> str:
    return "".join(p.read_text() for p in s.logs if p.name.startswith("hub-"))


def refused_while_full(s: Stack, n: int) -> list[str]:
    """`n` webhook posts and `n` ZeroMQ publishes, each of which must be refused because of the journal."""
    ids = []
    for i in range(n):
        eid = f"full-http-{i}"
        code, body = post(s, eid)
        assert code == 503, (code, body)
        assert "journal" in body.get("error", ""), body
        ids.append(eid)
        eid = f"full-zmq-{i}"
        with pytest.raises(HubRefused, match="journal") as refused:
            pub(s, eid)
        assert not refused.value.permanent, "a full disk passes: a source must retry, not stop"
        ids.append(eid)
    return ids


def test_a_running_hub_whose_disk_fills_refuses_everything_then_recovers_by_itself(
        stack_factory: StackFactory, disk: Path) -> None:
    s = on_disk(stack_factory(CFG), disk)
    s.start_hub()
    s.start_worker("g", 1)
    before = [f"pre-{i}" for i in range(10)]
    for eid in before[:5]:
        assert post(s, eid)[0] == 200
    for eid in before[5:]:
        assert pub(s, eid)["seq"]
    wait_for(lambda: len(s.handled()) == 10, 20, "the first 10 events handled")
    wait_for(lambda: s.status()["groups"]["g"]["topics"]["x"]["cursor"] == 10, 10, "their acks")
    # Three more, committed now and handed out, whose handlers finish (and ack) only once the disk is full.
    release = s.dir / "release"
    held = [f"held-{i}" for i in range(3)]
    for eid in held:
        assert pub(s, eid, hold=str(release))["seq"]
    filler = fill(disk)
    release.touch()
    wait_for(lambda: len(s.handled()) == 13, 20, "the held events handled while the disk is full")
    wait_for(lambda: s.status()["groups"]["g"]["topics"]["x"]["cursor"] == 13, 10, "their acks, in memory")

    code, body = wait_for(lambda: (r := _healthz(s))[0] == 503 and r, 10, "/healthz 503 on the full disk")
    assert body["ok"] is False and "reason" in body, body
    refused = refused_while_full(s, 20)
    assert s.hub_proc is not None and s.hub_proc.poll() is None, "the hub must stay up on a full disk"
    assert s.status()["hub"]["journal_ok"] is False

    filler.unlink()
    wait_for(lambda: _healthz(s)[0] == 200, 15, "/healthz 200 once space is free (no restart)")
    after = [f"post-{i}" for i in range(6)]
    for eid in after[:3]:
        assert post(s, eid)[0] == 200
    for eid in after[3:]:
        assert pub(s, eid)["seq"]
    wait_for(lambda: len(s.handled()) >= 19, 20, "the events published after recovery handled")
    wait_for(lambda: s.status()["groups"]["g"]["topics"]["x"]["cursor"] == 19, 10, "their acks")

    ids = journal_ids(s)
    assert ids == before + held + after, ids  # nothing refused is in the journal, and nothing was lost
    handled = Counter(h["id"] for h in s.handled())
    assert handled == Counter(before + held + after), handled  # each once; nothing refused handled
    assert not set(refused) & set(handled)
    log = hub_log(s)
    assert "Traceback" not in log, log[-3000:]
    errors = [ln for ln in log.splitlines() if '"level": "ERROR"' in ln or "ERROR" in ln]
    assert len(errors) <= 3, "\n".join(errors)

    # The acks of the held events came while nothing could be written: they must be in the journal now, so a
    # crash from here repeats nothing of them.
    s.kill_hub()
    db = sqlite3.connect(disk / "state" / "journal.db")
    try:
        (acked,) = db.execute("SELECT acked FROM cursors WHERE grp='g' AND topic='x'").fetchone()
    finally:
        db.close()
    assert acked >= 13, acked


def test_a_hub_killed_on_a_full_disk_restarts_with_every_committed_event_and_hands_out_nothing_meanwhile(
        stack_factory: StackFactory, disk: Path) -> None:
    """While acks cannot be written the hub hands out no new work, so a crash then repeats at most what was in
    flight when the disk filled; the journal, whose last writes ran out of space, opens after a SIGKILL with every
    event a publisher was told is committed."""
    s = on_disk(stack_factory(CFG), disk)
    s.env["BUCKETWIRE_PROBE_INTERVAL"] = "0.5"  # the full disk is seen by a probe (no commit fails first): not 5 s
    s.start_hub()
    s.start_worker("g", 1)
    release = s.dir / "release"
    ids = [f"k-{i}" for i in range(40)]
    with s.client(10) as c:
        res = c.publish_events([Event(id=eid, source="urn:disk", type="t", topic="x",
                                      data={"hold": str(release)} if i == 0 else {}) for i, eid in enumerate(ids)])
    assert [r["seq"] for r in res] == list(range(1, 41))

    def group() -> dict[str, Any]:
        g: dict[str, Any] = s.status()["groups"]["g"]
        return g

    inflight = wait_for(lambda: (n := group()["inflight"]) >= 16 and n, 10, "the worker's credit handed out")
    filler = fill(disk)
    wait_for(lambda: _healthz(s)[0] == 503, 10, "/healthz 503 on the full disk (its probe)")
    release.touch()
    wait_for(lambda: group()["topics"]["x"]["cursor"] >= inflight, 20, "the in-flight events acked")
    g = group()  # the acks were taken in an earlier turn than this answer: any new work would show here
    assert g["inflight"] == 0 and g["lag"] == 40 - inflight, g
    assert len(s.handled()) == inflight
    refused = refused_while_full(s, 3)

    s.kill_hub()
    filler.unlink()
    s.hub_proc = None
    s.start_hub()
    assert journal_ids(s) == ids  # every committed event, in order, and nothing that was refused
    wait_for(lambda: {h["id"] for h in s.handled()} == set(ids), 30, "every event handled after the restart")
    handled = Counter(h["id"] for h in s.handled())
    again = sum(n - 1 for n in handled.values())
    assert again <= inflight, handled  # only what was in flight when the disk filled may repeat
    assert not set(refused) & set(handled)
    assert "Traceback" not in hub_log(s)
