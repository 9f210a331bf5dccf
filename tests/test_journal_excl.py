"""One hub per journal file. Two hubs on one `[hub] state_dir` both keep topic heads in memory and assign seqs from
them: before the hub held its journal exclusively, the second one started, and every publish through it was
answered "journal unavailable" (its seqs clashed with the first hub's on the UNIQUE (topic, seq) index) while it
accepted workers and connections as if healthy. Now the second hub refuses to start, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from bucketwire import config as config_mod
from tests.fixtures_hub import Stack


def _same_state_dir(a: Stack, b: Stack) -> None:
    """Point `b`'s config (its own ports) at `a`'s state_dir."""
    b.cfg_path.write_text(b.cfg_path.read_text().replace(str(b.dir / "state"), str(a.dir / "state")))
    b.cfg = config_mod.load(b.cfg_path)


def test_a_second_hub_on_the_same_state_dir_refuses_to_start(stack_factory: Any) -> None:
    a: Stack = stack_factory()
    b: Stack = stack_factory()
    _same_state_dir(a, b)
    a.start_hub()
    assert a.hub_proc is not None
    with a.client() as c:
        assert c.publish("t", {"i": 0}, id="a-0")["seq"] == 1
    r = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(b.cfg_path)], env=b.env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    db = a.dir / "state" / "journal.db"
    assert str(db) in lines[0] and f"pid {a.hub_proc.pid}" in lines[0] and "state_dir" in lines[0], lines[0]
    # The first hub is unaffected: it commits and its seqs go on from where they were.
    assert a.healthy()
    with a.client() as c:
        assert [c.publish("t", {"i": i}, id=f"a-{i}")["seq"] for i in (1, 2)] == [2, 3]
    assert a.status()["hub"]["journal_ok"] is True


def test_the_state_dir_may_hold_characters_a_uri_would_read(tmp_path: Path) -> None:
    """The journal is opened through a `file:` URI: a state_dir with '?', '#', '%' or a space still names itself."""
    from bucketwire.hub.journal import Journal

    d = tmp_path / "a b?c#d%20e"
    j = Journal(d / "journal.db")
    try:
        assert j.heads == {}
    finally:
        j.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b?c#d%20e"]
    assert (d / "journal.db").is_file()
