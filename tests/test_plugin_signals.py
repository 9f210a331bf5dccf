"""A plugin that takes the worker child's stop signal (its own SIGTERM handler, as a hurried author writes to
"flush on shutdown", or a library it calls installs) must not take the pool's promises with it: a child stops
when its pool is killed, a stop drains (the event in hand finished, the rest given back uncharged) and is prompt.
Real hub and worker pool processes."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from bucketwire import Event
from tests.fixtures_hub import Stack, wait_for
from tests.procs import processes

PLUGIN = str(Path(__file__).parent / "plugins" / "own_sigterm.py")

CFG = """
[topics.jobs]
max_attempts = 3
backoff_base = 0.1
backoff_max = 0.5

[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
credit = 16

[plugins.own_sigterm]
sigterm = "{mode}"
"""


def job(key: str, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject=key, topic="jobs",
                 data={"bucket": "b", "key": key, **data})


def pool_log(s: Stack) -> str:
    return s.logs[-1].read_text(errors="replace")


@pytest.mark.parametrize(("mode", "at_import"), [("flag", False), ("ignore", True), ("block", False),
                                                 ("block", True)])
def test_a_child_whose_plugin_took_sigterm_still_stops_when_its_pool_is_killed(stack_factory: Any, mode: str,
                                                                              at_import: bool) -> None:
    """The kernel tells a child its pool died with SIGTERM (PR_SET_PDEATHSIG). A plugin's own handler (or
    SIG_IGN) swallowed it: after kill -9 of the pool its child lived on under init, still taking events, with no
    one to enforce handler_timeout, beside the pool that replaced it; so did a plugin that blocked the signal
    (pthread_sigmask). The child puts its own handler back (unblocks it) and says so in one line naming the
    plugin's."""
    s = stack_factory(CFG.format(mode="" if at_import else mode))
    if at_import:
        s.env["OWN_SIGTERM_AT_IMPORT"] = mode
    s.start_hub()
    pool = s.start_worker("a", 1, "--plugin", PLUGIN)
    (child,) = s.child_pids(pool)
    os.kill(pool.pid, signal.SIGKILL)
    pool.wait(10)
    try:
        wait_for(lambda: child not in processes(), 15, "the orphaned child to stop:\n" + s.dump_logs())
    finally:  # the stack's teardown stops pools it sees alive: an orphan would outlive the test
        if child in processes():
            os.kill(child, signal.SIGKILL)
    wait_for(lambda: s.status()["groups"]["a"]["workers"] == 0, 15, "the hub to count no worker")
    said = [ln for ln in pool_log(s).splitlines() if "SIGTERM" in ln]
    assert len(said) == 1, pool_log(s)
    assert {"ignore": "SIG_IGN", "block": "blocked", "flag": "own_sigterm.on_term"}[mode] in said[0], said
    assert "worker_shutdown" in said[0], said


def test_a_stop_drains_a_child_whose_plugin_exits_on_sigterm(stack_factory: Any, tmp_path: Path) -> None:
    """The plugin's handler calls sys.exit(0). A stop raised SystemExit inside whatever ran: the event in hand
    failed ('SystemExit: 0') and was charged, the events queued behind it were not given back and waited for the
    hub's heartbeat timeout. Now the stop is the pool's drain: the event in hand is finished, the rest handled
    once on their first attempt by the next pool, none charged."""
    s = stack_factory(CFG.format(mode="exit"))
    s.start_hub()
    a = s.start_worker("a", 1, "--plugin", PLUGIN)
    release = tmp_path / "release"
    first = job("first", mark_start=True, hold=str(release))
    rest = [job(f"queued-{i}") for i in range(10)]
    with s.client() as c:
        c.publish_events([first, *rest])
    started = s.record.with_name(s.record.name + ".started")
    wait_for(lambda: started.exists() and started.read_text().strip(), 20, "the first handler to start")
    wait_for(lambda: s.status()["groups"]["a"]["inflight"] == 11, 20, "the whole batch in the child's hands")
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining worker pool" in pool_log(s), 20, "the pool to begin its drain")
    release.touch()
    assert a.wait(30) == 0, s.dump_logs()
    s.start_worker("a", 1)
    wait_for(lambda: len(s.handled()) >= 11 and s.status()["groups"]["a"]["lag"] == 0, 30, "every event handled")
    rows = s.handled()
    assert sorted(r["key"] for r in rows) == sorted(["first"] + [f"queued-{i}" for i in range(10)]), rows
    assert {r["a"] for r in rows} == {1}, "an event was charged an attempt by the stop:\n" + s.dump_logs()
    st = s.status()["groups"]["a"]
    assert st["retried"] == 0, st
    assert "SystemExit" not in s.dump_logs(), s.dump_logs()


def test_a_stop_of_a_child_whose_plugin_ignores_sigterm_is_prompt(stack_factory: Any) -> None:
    """With the plugin's flag-only handler the child never saw the stop: every stop and reload waited out the
    whole drain timeout and then SIGKILLed it."""
    s = stack_factory(CFG.format(mode="flag"))
    s.start_hub()
    a = s.start_worker("a", 1, "--plugin", PLUGIN, "--drain-timeout", "20")
    with s.client() as c:
        c.publish_events([job(f"k{i}") for i in range(5)])
    wait_for(lambda: len(s.handled()) == 5, 20, "the events handled")
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: "worker pool stopped" in pool_log(s), 15, "the pool to stop before its drain timeout:\n"
             + s.dump_logs())
    assert a.wait(10) == 0
    assert "did not drain in time" not in pool_log(s), pool_log(s)


def test_a_pool_of_innocent_plugins_says_nothing_about_signals(stack_factory: Any) -> None:
    """The pool blocks SIGINT for the moment it starts a child (so a Ctrl+C then stays pending for its own
    handler), and a signal mask survives exec: every child after the first (the first is spawned while
    multiprocessing starts its resource tracker, which unblocks SIGINT) started with SIGINT blocked, and its first
    check blamed the plugins: `plugin code blocked the signal (pthread_sigmask) as the plugins were imported ...`
    at the start of every pool of two or more processes, and for every replaced child, with no plugin doing any
    such thing. The child unblocks its stop signals as it takes them, before any plugin code runs."""
    s = stack_factory(CFG.format(mode=""))
    s.start_hub()
    pool = s.start_worker("a", 2)
    children = s.child_pids(pool)
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)  # its replacement is started like any later child
    wait_for(lambda: len(set(s.child_pids(pool)) - set(children)) == 1, 20, "the killed child to be replaced")
    wait_for(lambda: s.status()["groups"]["a"]["workers"] == 2, 20, "two workers again")
    with s.client() as c:
        c.publish_events([job(f"k{i}") for i in range(8)])
    wait_for(lambda: len(s.handled()) == 8, 20, "the events handled")
    assert "plugin code" not in pool_log(s), pool_log(s)
