"""Group lifecycle against a real hub and real worker pools: no false alarm while pools connect, and
`bucketwire group rm` for a group nobody uses any more."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fixtures_hub import Stack, wait_for
from tests.test_ops import cli, metrics, publish, value
from tests.test_security import client_config, secure_stack

GROUPS = """
[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
"""


def _hub_log(s: Stack) -> str:
    return s.logs[0].read_text()


def _metrics(s: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return metrics(f"http://127.0.0.1:{s.http_port}/metrics")


def test_no_stalled_warning_while_the_pools_connect(stack_factory: Any) -> None:
    """Events that arrive before the group's first worker are work waiting for it, not a stall."""
    s = stack_factory(GROUPS)
    # The grace is heartbeat_timeout; a long one keeps a slow machine from turning this into a race.
    s.cfg_path.write_text(s.cfg_path.read_text().replace("heartbeat_timeout = 1.5", "heartbeat_timeout = 60"))
    s.start_hub()
    publish(s, 3)
    # The gauges (and the group's state) are refreshed in one pass on the hub's loop: once the head gauge shows
    # the events, the state was computed with lag 3 and no workers.
    wait_for(lambda: value(_metrics(s), "bucketwire_topic_head_seq", topic="jobs") == 3, 20, "head gauge at 3")
    g = s.status()["groups"]["a"]
    assert (g["lag"], g["workers"]) == (3, 0)
    assert g["state"] != "stalled"
    s.start_worker("a")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 30, "the pool to catch up")
    assert "group stalled" not in _hub_log(s)


def test_group_rm_removes_an_unused_ad_hoc_group_and_refuses_the_rest(stack_factory: Any) -> None:
    s = stack_factory(GROUPS)
    # The pool's own config names the group; the hub's does not (as after removing [groups.adhoc] from it).
    pool_cfg = s.dir / "pool.toml"
    pool_cfg.write_text(s.cfg_path.read_text() + '\n[groups.adhoc]\ntopics = ["jobs"]\nplugins = []\n')
    s.start_hub()
    adhoc = s.start_worker("adhoc", 1, cfg_path=pool_cfg)
    publish(s, 2)
    wait_for(lambda: s.status()["groups"]["adhoc"]["lag"] == 0, 30, "the ad-hoc group to catch up")

    r = cli(s, "group", "rm", "adhoc", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "has 1 live worker(s)" in r.stderr and "stop them first" in r.stderr
    r = cli(s, "group", "rm", "a", check=False)
    assert r.returncode == 1 and "configured in [groups.a]" in r.stderr and r.stderr.count("\n") == 1

    adhoc.send_signal(signal.SIGTERM)
    assert adhoc.wait(30) == 0
    publish(s, 2)
    # What the command is for: with nobody left, the group stays stalled.
    wait_for(lambda: s.status()["groups"]["adhoc"]["state"] == "stalled", 20, "adhoc stalled")
    assert value(_metrics(s), "bucketwire_group_state", group="adhoc", state="stalled") == 1

    r = cli(s, "group", "rm", "adhoc")
    assert r.stdout.strip() == "removed group adhoc (topics: jobs; 2 event(s) it had not acked)"
    st = s.status()
    assert sorted(st["groups"]) == ["a"]
    m = _metrics(s)
    assert value(m, "bucketwire_group_state", None, group="adhoc", state="stalled") is None
    assert value(m, "bucketwire_group_lag", None, group="adhoc", topic="jobs") is None
    assert "group removed" in _hub_log(s)
    db = sqlite3.connect(s.dir / "state" / "journal.db")
    try:
        assert db.execute("SELECT count(*) FROM cursors WHERE grp='adhoc'").fetchone() == (0,)
    finally:
        db.close()

    r = cli(s, "group", "rm", "adhoc", check=False)
    assert r.returncode == 1 and "unknown group 'adhoc' (groups: a)" in r.stderr


def test_group_rm_is_an_operator_act(stack_factory: Any, tmp_path: Path) -> None:
    """With CURVE roles, removing a group asks what a replay asks: no role, `admin = true`, or the group listed."""
    roles = '\n[security.roles.limited]\ngroups = ["g"]\npublish = ["x"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles,
                        clients=("admin", "limited"))
    s.start_hub()

    def rm(cfg_path: Path, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bucketwire", "group", "rm", "-c", str(cfg_path), name],
                              env=s.env, capture_output=True, text=True, timeout=60)

    r = rm(client_config(s, d, "limited"), "other")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "key 'limited' may not remove group 'other'" in r.stderr
    r = rm(s.cfg_path, "other")  # admin has no role: unrestricted, and so it learns the group does not exist
    assert r.returncode == 1 and "unknown group 'other'" in r.stderr
