"""The worker pool's supervisor as a real process with real (crashing) children."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

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
        wait_for(lambda: "restarting" in log.read_text() or p.poll() is not None, 60, "the first child to crash")
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
