"""What bucketwire leaves on an operator's machine after processes die the hard way (kill -9, crashes): either
nothing, or something the next start removes. Real processes with a $TMPDIR of their own, looked at afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bucketwire.devstack.bench.common import Stack as BenchStack
from bucketwire.procutil import free_port
from tests.fixtures_hub import Stack, wait_for
from tests.procs import cmdline, processes, zombies_of

GROUPS = """
[groups.g]
topics = ["x"]
plugins = []

[groups.h]
topics = ["x"]
plugins = []
"""


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _metrics_dirs(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.glob("bucketwire-worker-metrics-*"))


def test_a_pool_killed_9_leaves_no_metrics_dir_piling_up(stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    """A pool serving /metrics keeps its children's samples in a temp dir, removed at a clean stop. A pool killed -9
    left it, one per kill; the next pool's start removes the dirs whose pool is gone (not a live one's)."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    s = stack_factory(GROUPS)
    s.env["TMPDIR"] = str(tmpdir)
    s.start_hub()
    killed_port, live_port, next_port = free_port(), free_port(), free_port()
    killed = s.start_worker("g", 1, "--metrics", f"127.0.0.1:{killed_port}")
    s.start_worker("h", 1, "--metrics", f"127.0.0.1:{live_port}")
    wait_for(lambda: _serving(killed_port) and _serving(live_port), 20, "both pools' /metrics")
    assert len(_metrics_dirs(tmpdir)) == 2
    children = s.child_pids(killed)
    os.killpg(killed.pid, signal.SIGKILL)  # the pool and its children, as an OOM kill or `kill -9 -PGID` does
    killed.wait(10)
    wait_for(lambda: not set(children) & set(processes()), 20, "the killed pool's children to be gone")
    assert len(_metrics_dirs(tmpdir)) == 2  # the leak: nobody was left to remove it

    s.start_worker("g", 1, "--metrics", f"127.0.0.1:{next_port}")
    wait_for(lambda: _serving(next_port), 20, "the new pool's /metrics")
    assert len(_metrics_dirs(tmpdir)) == 2, "the dead pool's dir should be gone, the live pool's kept"
    assert _serving(live_port)
    s.stop()
    assert sorted(os.listdir(tmpdir)) == []


def test_the_suite_guard_names_what_a_run_left_behind(tmp_path: Path) -> None:
    """`make test` runs the suite through .ci/suite.py, which fails on a leftover in its $TMPDIR or a process that
    outlived the run. Here a two-test suite leaves both; the guard must fail, name them, and kill the process."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_leaky.py").write_text(
        "import subprocess, sys, tempfile\n"
        "def test_leaves_a_file():\n"
        "    tempfile.mkstemp(prefix='leaked-by-a-test-')\n"
        "def test_leaves_a_process():\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)  # outlives-the-suite'],\n"
        "                     start_new_session=True)\n")
    guard = Path(__file__).parent.parent / ".ci" / "suite.py"
    env = {**os.environ, "BUCKETWIRE_SUITE_GRACE": "1", "TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, str(guard), "-q", "-p", "no:cacheprovider", str(suite)], cwd=suite,
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "2 passed" in p.stdout
    assert "leaked-by-a-test-" in p.stderr and "outlives-the-suite" in p.stderr and "outlived it" in p.stderr
    kept = p.stderr.strip().splitlines()[-1].split(": ")[-1]
    assert Path(kept).parent == tmp_path and Path(kept).is_dir()
    wait_for(lambda: not [pid for pid in processes() if b"outlives-the-suite" in cmdline(pid)], 10,
             "the guard to have killed the process that outlived its suite")



def test_ctrl_c_during_the_suite_tears_it_down_and_cleans_up(tmp_path: Path) -> None:
    """Ctrl+C in `make test` (the terminal's SIGINT to the whole foreground group): .ci/suite.py printed a
    KeyboardInterrupt traceback, SIGKILLed pytest mid-teardown and skipped its own checks, so a `weed` the
    session had started ran on and the suite's TMPDIR stayed. Now pytest finishes its teardown, the guard kills
    what still carries its TMPDIR, removes it and exits 130 with one line."""
    suite = tmp_path / "suite"
    suite.mkdir()
    ready = tmp_path / "ready"
    (suite / "test_interrupted.py").write_text(
        "import subprocess, sys, time\nfrom pathlib import Path\nimport pytest\n"
        "@pytest.fixture(scope='session')\n"
        "def server():\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)  # a-session-server'],\n"
        "                         start_new_session=True)  # like weed: its own session, no terminal SIGINT\n"
        "    yield p\n"
        "    p.kill()\n"
        "    p.wait()\n"
        "def test_long(server):\n"
        f"    Path({str(ready)!r}).write_text('x')\n"
        "    time.sleep(600)\n")
    base = tmp_path / "tmp"
    base.mkdir()
    guard = Path(__file__).parent.parent / ".ci" / "suite.py"
    env = {**os.environ, "BUCKETWIRE_SUITE_GRACE": "5", "TMPDIR": str(base)}
    p = subprocess.Popen([sys.executable, str(guard), "-q", "-p", "no:cacheprovider", "-n", "1", str(suite)],
                         cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        wait_for(lambda: ready.exists() or p.poll() is not None, 60, "the test to be running")
        assert p.poll() is None
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl+C does: the whole foreground process group
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in [q for q in processes() if b"a-session-server" in cmdline(q)]:
            os.kill(pid, signal.SIGKILL)  # the leftover, when the test fails: not left running
    assert "Traceback" not in err, err
    assert p.returncode == 130, out + err
    assert err.strip().splitlines()[-1] == "suite: interrupted", err
    wait_for(lambda: not [q for q in processes() if b"a-session-server" in cmdline(q)], 10,
             "the session's server to be gone")
    assert sorted(os.listdir(base)) == []



def _with_tmpdir(tmpdir: Path) -> list[int]:
    """Live processes started with TMPDIR=tmpdir (the environment a process was exec'd with)."""
    needle = b"TMPDIR=" + bytes(tmpdir)
    found = []
    for pid in processes():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(pid)
    return found


def test_a_bench_killed_9_takes_its_processes_along_and_the_next_bench_removes_its_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench bus` killed -9 mid-run: its hub and pool ran on (their own sessions; nothing told them) and its temp
    dir, a journal of every event, stayed. Now they get SIGTERM from the kernel, and the next bench removes the dir."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    argv = [sys.executable, "-m", "bucketwire", "bench", "bus", "-p", "1", "-d", "os", "--rate", "1000", "--json"]
    bench = subprocess.Popen([*argv, "-n", "100000", "--seconds", "0.2"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: list(tmpdir.glob("*/state/journal.db")), 60, "the bench's hub to open its journal")
        wait_for(lambda: len(_with_tmpdir(tmpdir)) >= 3, 60, "the bench, its hub and its pool")
    finally:
        bench.kill()
        bench.wait(10)
    try:
        wait_for(lambda: _with_tmpdir(tmpdir) == [], 30, "the killed bench's hub and pool to stop")
    finally:
        for pid in _with_tmpdir(tmpdir):  # the orphans, when the test fails: not left running
            os.kill(pid, signal.SIGKILL)
    assert [p.name for p in tmpdir.iterdir()], "the killed bench left its dir (what the next one must remove)"
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))  # the next bench's Stack, in this process
    with BenchStack() as st:
        assert [p.name for p in tmpdir.iterdir()] == [st.tmp.name]
    assert sorted(os.listdir(tmpdir)) == []


def test_a_plugin_failing_every_event_does_not_fill_the_disk_with_log_lines(stack_factory: Callable[..., Stack]
                                                                           ) -> None:
    """A plugin that fails every event (a bad deploy, a store down) wrote one warning per event in the pool and one
    per dead letter in the hub: at 10,000 events/s that is the disk. Each is one line per 10 s per plugin / group,
    the next one saying how many were left out; the metrics and the dead-letter topic still have every one."""
    import time
    import uuid

    from bucketwire.envelope import Event

    n = 1500
    s = stack_factory('[groups.g]\ntopics = ["x"]\nplugins = []\n\n[topics.x]\nmax_attempts = 1\n')
    s.start_hub()
    s.start_worker("g", 1)
    t0 = time.monotonic()
    with s.client() as c:
        for i in range(0, n, 100):
            c.publish_events([Event(id=uuid.uuid4().hex, source="urn:test", type="t", subject=f"b/k{j}", topic="x",
                                    data={"fail": 1}) for j in range(i, i + 100)])
    wait_for(lambda: s.metric("bucketwire_dead_lettered_total", group="g") == n, 60, f"{n} dead letters")
    windows = 2 + (time.monotonic() - t0) // 10  # lines allowed: one per started 10 s window (PEER_WINDOW)
    s.stop()
    worker_log = "".join(p.read_text() for p in s.logs if p.name.startswith("worker"))
    hub_log = "".join(p.read_text() for p in s.logs if p.name.startswith("hub"))
    failed, dead = worker_log.count("handler failed"), hub_log.count("event dead-lettered")
    assert 1 <= failed <= windows, f"{failed} 'handler failed' lines for {n} events"
    assert 1 <= dead <= windows, f"{dead} 'event dead-lettered' lines for {n} events"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


CYCLES = int(os.environ.get("BUCKETWIRE_LEAK_CYCLES", "1000"))


def test_a_hub_keeps_no_descriptor_or_thread_per_connection_it_served(stack_factory: Callable[..., Stack]) -> None:
    """A hub runs for months while clients come and go: CYCLES client connections (connect, a status request,
    close), tail subscriptions (SUB connect, close) and webhook requests each on a new TCP connection. Once they are
    gone its descriptors and threads are back where they were (BUCKETWIRE_LEAK_CYCLES for a longer run)."""
    import json
    import uuid

    import zmq

    s = stack_factory('[groups.g]\ntopics = ["x"]\nplugins = []\n')
    s.start_hub()
    assert s.hub_proc is not None
    pid = s.hub_proc.pid

    def one_round(k: int) -> None:
        for i in range(k):
            with s.client(5) as c:
                c.status()
            ctx = zmq.Context.instance()
            sub = ctx.socket(zmq.SUB)
            sub.connect(f"tcp://127.0.0.1:{s.pub_port}")
            sub.close(linger=0)
            code, _ = s.post("/events", json.dumps({"id": uuid.uuid4().hex, "source": "urn:leak", "type": "t",
                                                    "specversion": "1.0", "topic": "x", "data": {"i": i}}).encode())
            assert code < 300, code

    one_round(20)  # warm: lazily made sockets, caches, the first of each kind of connection
    fds, threads = _fds(pid), _threads(pid)
    one_round(CYCLES)
    wait_for(lambda: _fds(pid) <= fds + 2 and _threads(pid) <= threads, 30,
             f"the hub's descriptors ({fds}) and threads ({threads}) back after {CYCLES} cycles: "
             f"now {_fds(pid)} and {_threads(pid)}")


def test_a_pool_whose_children_keep_crashing_reaps_them(stack_factory: Callable[..., Stack]) -> None:
    """Every crashed child is waited for: a pool restarting children for months must not collect zombies (each
    holds a pid; the pid space runs out)."""
    import uuid

    from bucketwire.envelope import Event

    crashes = 4  # restarts back off 0.1 s, 0.2 s, ...: four take under a second
    s = stack_factory('[groups.g]\ntopics = ["x"]\nplugins = []\n\n[topics.x]\nmax_attempts = 1\n')
    s.start_hub()
    pool = s.start_worker("g", 1)
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:test", type="t", subject=f"b/k{i}", topic="x",
                                data={"exit": 3}) for i in range(crashes)])
    wait_for(lambda: s.metric("bucketwire_dead_lettered_total", group="g") == crashes, 60,
             f"{crashes} crashed events dead-lettered")
    wait_for(lambda: s.status()["groups"]["g"]["workers"] >= 1, 30, "the last crashed child replaced")
    assert zombies_of(pool.pid) == []


def _pool_serving_metrics(stack_factory: Callable[..., Stack], tmpdir: Path, extra: str = "") -> tuple[Stack, int]:
    """A hub and a one-child pool of group g serving /metrics on a port of its own, its files under `tmpdir`."""
    tmpdir.mkdir()
    s = stack_factory('[groups.g]\ntopics = ["x"]\nplugins = []\n' + extra)
    s.env["TMPDIR"] = str(tmpdir)
    s.start_hub()
    port = free_port()
    s.start_worker("g", 1, "--metrics", f"127.0.0.1:{port}")
    return s, port


def test_a_crash_looping_pool_keeps_its_metrics_files_bounded_and_its_counts(stack_factory: Callable[..., Stack],
                                                                              tmp_path: Path) -> None:
    """Each child writes its samples to files of its own (`counter_<pid>.db`, `histogram_<pid>.db`, 64 KiB and up)
    that outlived it as history: a pool whose children crash every 30 s for a month kept ~170,000 of them, and a
    scrape read every one. A dead child's counts now go into one file per kind the pool keeps; its own go."""
    import urllib.request
    import uuid

    from prometheus_client.parser import text_string_to_metric_families

    from bucketwire.envelope import Event

    tmpdir = tmp_path / "tmpdir"
    s, port = _pool_serving_metrics(stack_factory, tmpdir, "\n[topics.x]\nmax_attempts = 1\n")
    crashes = 4

    def ev(data: dict[str, object]) -> Event:
        return Event(id=uuid.uuid4().hex, source="urn:test", type="t", subject="b/k", topic="x", data=data)

    with s.client() as c:  # one at a time: each child handles one event, then dies on the next
        for _ in range(crashes):
            c.publish_events([ev({}), ev({"exit": 3})])
    wait_for(lambda: s.metric("bucketwire_dead_lettered_total", group="g") == crashes, 60, "every crash dead-lettered")
    wait_for(lambda: s.status()["groups"]["g"]["workers"] >= 1, 30, "the last crashed child replaced")

    def ok_count() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
                   if smp.name == "bucketwire_worker_events_total" and smp.labels.get("outcome") == "ok")

    assert ok_count() >= crashes, "the dead children's counts must stay"
    [d] = tmpdir.glob("bucketwire-worker-metrics-*")
    files = sorted(p.name for p in d.glob("*.db"))
    assert len(files) <= 5, f"a live child's 3 files and 2 for the dead ones at most, not {files}"


def test_a_scrape_while_a_child_creates_its_metrics_file_still_answers(stack_factory: Callable[..., Stack],
                                                                      tmp_path: Path) -> None:
    """A child makes its `<kind>_<pid>.db` by opening it empty and then sizing it; a scrape in between read the
    empty file and answered 500 (prometheus_client's reader needs its 8-byte header), so a pool replacing a
    child under load failed scrapes. A file with no header yet has no samples: the scrape goes on without it."""
    from prometheus_client.parser import text_string_to_metric_families

    tmpdir = tmp_path / "tmpdir"
    _, port = _pool_serving_metrics(stack_factory, tmpdir)
    wait_for(lambda: _serving(port), 30, "the pool's /metrics")
    [d] = tmpdir.glob("bucketwire-worker-metrics-*")
    (d / "counter_2147483647.db").touch()  # a child between its open and its truncate: no header yet
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    children = [smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
                if smp.name == "bucketwire_worker_children"]
    assert children == [1], text
