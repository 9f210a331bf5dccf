"""The worker pool's supervisor as a real process with real (crashing) children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.fixtures_hub import wait_for

CRASHER = '''
from bucketwire import hookimpl


@hookimpl
def worker_startup(ctx):
    raise RuntimeError("this child crashes at start, every time")
'''

POOL = '''
import sys
from bucketwire import config, logs
from bucketwire.worker.supervisor import make_spec, run_pool

logs.setup("text", 0)
cfg = config.load(sys.argv[1], warn=False)
spec = make_spec(cfg, "g", None, [sys.argv[2]])
sys.exit(run_pool(cfg, spec, 1, restart_backoff=(BACKOFF, BACKOFF)))
'''

BACKOFF = 30.0


def test_sigterm_during_restart_backoff_drains_and_exits_promptly(tmp_path: Path) -> None:
    """A child that keeps crashing puts the supervisor in a 30 s restart backoff; SIGTERM then must end the pool
    at once (exit code 0), not after the backoff: a deploy or `systemctl stop` waits for it."""
    plugin = tmp_path / "crasher.py"
    plugin.write_text(CRASHER)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hub]\nwork = "tcp://127.0.0.1:1"\n[groups.g]\ntopics = ["x"]\nplugins = []\n')
    log = tmp_path / "pool.log"
    p = subprocess.Popen([sys.executable, "-c", POOL.replace("BACKOFF", repr(BACKOFF)), str(cfg), str(plugin)],
                         stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the first failure says "the child is restarted in 30 s" (a repeat: "restarting the child in"): waiting
        # for "restarting" alone waited out the first backoff and sent SIGTERM in the second (31 s a run)
        wait_for(lambda: "restart" in log.read_text() or p.poll() is not None, 60, "the first child to crash")
        assert p.poll() is None, log.read_text()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(BACKOFF * 0.8)
        except subprocess.TimeoutExpired:
            raise AssertionError("the pool sat out its restart backoff instead of stopping on SIGTERM") from None
        assert time.monotonic() - t0 < BACKOFF
        assert code == 0, log.read_text()
        assert "worker pool stopped" in log.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


STUCK_SHUTDOWN = '''
import time
from bucketwire import hookimpl


@hookimpl
def worker_shutdown(ctx):
    time.sleep(3600)  # a client's close() that never returns (a server that does not answer)


@hookimpl
def handle_event(event, ctx):
    with open({out!r}, "a") as f:
        f.write(str(event.data["n"]) + "\\n")
'''


def test_a_reload_whose_child_hangs_in_worker_shutdown_replaces_it_after_the_drain_timeout(
        stack_factory: Any, tmp_path: Path) -> None:
    """kill -HUP drains each child and replaces it once it exits. A plugin whose worker_shutdown hangs kept its
    child from exiting: the slot was never replaced and the pool took no event again, with nothing in its log
    (a stop is bounded by --drain-timeout; a reload was not). Now the reload gives it --drain-timeout too, then
    kills it, says so and starts the new child."""
    out, plug = tmp_path / "handled.txt", tmp_path / "stuck_shutdown.py"
    plug.write_text(STUCK_SHUTDOWN.format(out=str(out)))
    s = stack_factory()
    s.start_hub()
    w = s.start_worker("st", 1, "--topic", "in", "--plugin", str(plug), "--drain-timeout", "1")
    log = s.logs[-1]
    with s.client() as c:
        c.publish("in", {"n": 1})
    wait_for(lambda: out.exists() and out.read_text() == "1\n", 30, "event 1 handled")
    w.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloading" in log.read_text(), 20, "the pool to start its reload")
    with s.client() as c:
        c.publish("in", {"n": 2})
    wait_for(lambda: out.read_text() == "1\n2\n" or w.poll() is not None, 30, "event 2 handled by the new child")
    assert w.poll() is None, s.dump_logs()
    text = log.read_text()
    assert "did not drain in time" in text and "worker child died" not in text, text[-3000:]


def test_a_stop_whose_child_hangs_in_worker_shutdown_ends_after_the_drain_timeout(stack_factory: Any,
                                                                                  tmp_path: Path) -> None:
    """SIGTERM with a worker_shutdown that never returns: the pool kills the child past --drain-timeout, says so,
    and exits 0; the hub saw the child's BYE (it drained before its shutdown hook ran), so nothing is charged."""
    out, plug = tmp_path / "handled.txt", tmp_path / "stuck_shutdown.py"
    plug.write_text(STUCK_SHUTDOWN.format(out=str(out)))
    s = stack_factory()
    s.start_hub()
    w = s.start_worker("st", 1, "--topic", "in", "--plugin", str(plug), "--drain-timeout", "1")
    with s.client() as c:
        c.publish("in", {"n": 1})
    wait_for(lambda: out.exists() and out.read_text() == "1\n", 30, "event 1 handled")
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0, s.dump_logs()
    assert "did not drain in time" in s.logs[-1].read_text()
    wait_for(lambda: s.status()["groups"]["st"]["workers"] == 0, 10, "the hub to see the worker leave")
    assert s.status()["groups"]["st"]["dead_lettered"] == 0 and s.status()["groups"]["st"]["retrying"] == 0


def test_an_old_hub_that_refuses_startfail_is_said_once(tmp_path: Path) -> None:
    """A hub from before STARTFAIL answers each one `ERR unknown command`; the supervisor never read its socket,
    so the pool's failing starts were missing from `status` without a word. It says so once, however many
    reports the hub refuses."""
    import zmq

    from bucketwire import protocol as P

    plugin = tmp_path / "crasher.py"
    plugin.write_text(CRASHER)
    zctx = zmq.Context()
    hub = zctx.socket(zmq.ROUTER)
    hub.setsockopt(zmq.LINGER, 0)
    port = hub.bind_to_random_port("tcp://127.0.0.1")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[hub]\nwork = "tcp://127.0.0.1:{port}"\n[groups.g]\ntopics = ["x"]\nplugins = []\n')
    log = tmp_path / "pool.log"
    p = subprocess.Popen([sys.executable, "-c", POOL.replace("BACKOFF", "0.05"), str(cfg), str(plugin)],
                         stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    refused = [0]

    def old_hub_answers(until: int) -> bool:
        """As a hub that predates STARTFAIL: ERR 'unknown command' to each, nothing else answered."""
        while hub.poll(100):
            ident, cmd, *_ = hub.recv_multipart()
            if cmd == P.STARTFAIL:
                hub.send_multipart([ident, P.ERR, P.enc(P.Err(error=f"unknown command {cmd[:32]!r}"))])
                refused[0] += 1
        assert p.poll() is None, log.read_text()
        return refused[0] >= until

    try:
        wait_for(lambda: old_hub_answers(3) and "upgrade the hub" in log.read_text(), 60,
                 "the supervisor to say the hub refused its reports")
        said = refused[0]
        wait_for(lambda: old_hub_answers(said + 5), 60, "five more reports refused")
        text = log.read_text()
        assert text.count("upgrade the hub") == 1, text
        line = next(ln for ln in text.splitlines() if "upgrade the hub" in ln)
        assert "does not support startup-failure reports" in line, line
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        hub.close()
        zctx.term()
