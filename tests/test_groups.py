"""Group lifecycle against a real hub and real worker pools: no false alarm while pools connect, and
`bucketwire group rm` for a group nobody uses any more."""

from __future__ import annotations

import signal
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
RETRY_LATER = """
[topics.jobs]
max_attempts = 3
backoff_base = 60
backoff_max = 60
"""


def _handled(s: Stack, group: str) -> list[tuple[int, int]]:
    """(seq, attempt) of each event `group` handled, in the order handled."""
    return [(r["s"], r["a"]) for r in s.handled() if r["g"] == group]


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


def test_group_rm_removes_an_unused_ad_hoc_group_and_refuses_the_rest(hub_stack: Any) -> None:
    """`group rm` refuses a group in use or configured, removes an unused one, and a new group of that name
    starts afresh: from its `start`, with no acks and no attempt counts of the removed one."""
    s = hub_stack(GROUPS + RETRY_LATER)
    # The pool's own config names the group; the hub's does not (as after removing [groups.adhoc] from it).
    pool_cfg = s.dir / "pool.toml"
    pool_cfg.write_text(s.cfg_path.read_text() + '\n[groups.adhoc]\ntopics = ["jobs"]\nplugins = []\n')
    s.start_hub()
    adhoc = s.start_worker("adhoc", 1, cfg_path=pool_cfg)
    publish(s, 1, fail=1)  # seq 1 fails its first attempt and waits a minute for the next
    publish(s, 1)  # seq 2 is acked above the cursor's gap
    wait_for(lambda: s.status()["groups"]["adhoc"]["retrying"] == 1 and _handled(s, "adhoc") == [(2, 1)], 30,
             "seq 1 waiting for its retry, seq 2 handled")

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
    assert r.stdout.strip() == "removed group adhoc (topics: jobs; 4 event(s) it had not acked)"
    st = s.status()
    assert sorted(st["groups"]) == ["a"] and "adhoc" not in st.get("dispatch", {})
    m = _metrics(s)
    assert value(m, "bucketwire_group_state", None, group="adhoc", state="stalled") is None
    assert value(m, "bucketwire_group_lag", None, group="adhoc", topic="jobs") is None
    assert "group removed" in _hub_log(s)
    r = cli(s, "group", "rm", "adhoc", check=False)
    if s.backend == "jetstream":  # the cluster keeps a record of the removal: a re-run succeeds (see test_ha_probe)
        assert r.returncode == 0 and r.stdout.strip() == "removed group adhoc (removed before)", r.stdout + r.stderr
    else:
        assert r.returncode == 1 and "unknown group 'adhoc' (groups: a)" in r.stderr

    # A new group of that name: every event again, each at its first attempt (seq 1 fails it again and waits).
    s.start_worker("adhoc", 1, "--start", "earliest", cfg_path=pool_cfg)
    wait_for(lambda: _handled(s, "adhoc")[1:] == [(2, 1), (3, 1), (4, 1)]
             and s.status()["groups"]["adhoc"]["retrying"] == 1, 30, "seqs 2-4 handled again, seq 1 failed again")
    assert s.status()["groups"]["adhoc"]["retried"] == 1, "the removed group's counters are gone too"


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


EXTRA_PLUGIN = '''
from bucketwire import hookimpl


@hookimpl
def handle_event(event, ctx):
    pass
'''


def test_pools_of_one_group_running_different_plugins_are_named(stack_factory: Any, tmp_path: Path) -> None:
    """Two pools of one group that load different plugins (one host not yet upgraded, a pool started with another
    config or --plugin) split the group's events between them: each event is handled by whichever pool gets it,
    so about half of them silently never reach the plugin the other pool lacks. The hub said nothing; now its log
    and `status` name the group and the pools' plugin sets."""
    s = stack_factory(GROUPS)
    s.start_hub()
    s.start_worker("a", 1)
    extra = tmp_path / "extra_step.py"
    extra.write_text(EXTRA_PLUGIN)
    s.start_worker("a", 2, "--plugin", str(extra))  # waits until both pools' workers joined
    hub_log = s.logs[0].read_text()
    line = next((ln for ln in hub_log.splitlines() if "different plugins" in ln), None)
    assert line is not None and "group=a" in line and "extra_step" in line, hub_log
    out = cli(s, "status")
    assert "different plugins" in out.stdout and "extra_step" in out.stdout, out.stdout


STASHES_IN_SETTINGS = '''
import threading
from bucketwire import hookimpl


@hookimpl
def worker_startup(ctx):
    ctx.settings["lock"] = threading.Lock()  # a process resource kept in its settings rather than ctx.state


@hookimpl
def handle_event(event, ctx):
    pass
'''


def test_one_pool_whose_plugin_keeps_objects_in_its_settings_is_not_called_divided(stack_factory: Any,
                                                                                   tmp_path: Path) -> None:
    """The digest READY carries was taken of each child's settings after its worker_startup: a plugin that kept
    a lock or a client in `ctx.settings` (not `ctx.state`, but it works) gave every child of one pool its own
    digest (the object's repr holds its address), and the hub warned that the pool's own children ran the same
    plugins with different settings, a false alarm in the log and a '!' line in status. The digest is of the
    validated settings, as the config gives them."""
    s = stack_factory(GROUPS)
    s.start_hub()
    plug = tmp_path / "stash.py"
    plug.write_text(STASHES_IN_SETTINGS)
    s.start_worker("a", 3, "--plugin", str(plug))
    with s.client() as c:
        c.publish("jobs", {"n": 1})
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 20, "the event handled")
    assert "different" not in _hub_log(s), _hub_log(s)[-2000:]
    assert "different" not in cli(s, "status").stdout


def test_group_rm_forgets_a_group_taken_out_of_the_config(hub_stack: Any) -> None:
    """`group rm` of a configured group says to remove its section and restart the hub instead. Done so, the hub
    no longer had the group, but its journal kept the cursors: `group rm` then said `unknown group`, so nothing
    could forget them, and the group put back in the config (or a pool of that name) resumed from the old cursor
    whatever its `start`. Now `group rm` deletes what the journal holds of a group the hub does not run: with
    jetstream too, where the cursors (KV keys of the cluster) were left and the command said `unknown group`."""
    s = hub_stack(GROUPS)
    s.start_hub()
    w = s.start_worker("a", 1)
    publish(s, 3)
    wait_for(lambda: s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 3, 30, "group a acked 3")
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0
    r = cli(s, "group", "rm", "a", check=False)
    assert r.returncode == 1 and "remove that section from the config and restart the hub" in r.stderr, r.stderr
    s.kill_hub(signal.SIGTERM)
    with_group = s.cfg_path.read_text()
    s.cfg_path.write_text(with_group.replace(GROUPS, ""))  # as the line above says
    s.start_hub()
    publish(s, 1)  # seq 4: one event the removed group never saw
    assert "a" not in s.status()["groups"]
    if s.backend == "jetstream":
        # The cluster's journal is every hub's: with no hub dispatching the group (none running that names it), a
        # stopped hub whose config still names it would make it again at its start, from its `start`, the cursors
        # gone. This hub cannot read that config: removed only with --force, after one line that says why.
        r = cli(s, "group", "rm", "a", check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "--force" in lines[0], r.stdout + r.stderr
        assert "stopped hub" in lines[0] and "Traceback" not in r.stderr, lines
        again = cli(s, "group", "rm", "a", check=False)  # nothing was removed: refused again, not "removed before"
        assert again.returncode == 1 and "--force" in again.stderr, again.stdout + again.stderr
    r = cli(s, "group", "rm", *(["--force"] if s.backend == "jetstream" else []), "a", check=False)
    assert r.returncode == 0 and r.stdout.strip() == "removed group a (topics: jobs; 1 event(s) it had not acked)", (
        r.stdout + r.stderr)
    r = cli(s, "group", "rm", "a", check=False)  # nothing left of it: as for any removed group
    if s.backend == "jetstream":  # the cluster keeps a record of the removal: a re-run succeeds
        assert r.returncode == 0 and r.stdout.strip() == "removed group a (removed before)", r.stdout + r.stderr
    else:
        assert r.returncode == 1 and "unknown group 'a'" in r.stderr, r.stdout + r.stderr
    s.kill_hub(signal.SIGTERM)
    s.cfg_path.write_text(with_group)  # the group back: a new group, from its start (earliest): every event
    s.start_hub()
    assert s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 0
    s.start_worker("a", 1)
    wait_for(lambda: sorted(r["s"] for r in s.handled() if r["g"] == "a") == [1, 1, 2, 2, 3, 3, 4], 30,
             "the new group a handled seqs 1-4")


def test_group_rm_refuses_a_group_the_config_it_was_given_names(hub_stack: Any) -> None:
    """`group rm --force` of a group the command's own config names: a hub started with that config makes it again
    (from its `start`, the cursors gone). Refused before the hub is asked, in one line, whatever the hub's config
    says; the group and its cursors stay."""
    s = hub_stack(GROUPS)
    s.start_hub()
    publish(s, 2)
    r = cli(s, "group", "rm", "--force", "a", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    assert f"[groups.a] of {s.cfg_path}" in lines[0] and "remove that section" in lines[0], lines
    assert s.status()["groups"]["a"]["topics"]["jobs"]["head"] == 2
