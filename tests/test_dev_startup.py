"""`bucketwire dev` while it is still starting: Ctrl+C, a second `dev` on the same state dir, a state dir it
cannot use. Each is what a newcomer does in the first minute; each must end in one line and leave nothing running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bucketwire.commands.dev import DEV_MARK_ENV, dev, needed_buckets
from bucketwire.devstack.seaweedfs import WeedError, find_weed

BUCKETWIRE = str(Path(sys.executable).parent / "bucketwire")


def needs_weed() -> None:
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))


def running_on(state: Path) -> list[str]:
    """Command lines of live processes that name `state` (weed, hub, workers of that dev stack)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(state) in cmd:
                out.append(f"{d.name}: {cmd}")
    return out


def start_dev(state: Path, out: Path) -> subprocess.Popen[bytes]:
    """`dev` in its own session, waited for until SeaweedFS is being started (its log exists): the stack is
    then certainly not up yet, since weed alone takes a second or more to answer."""
    p = subprocess.Popen([BUCKETWIRE, "dev", "--state-dir", str(state)], stdout=out.open("wb"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (state / "seaweedfs" / "weed.log").exists():
        assert p.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.02)  # pacing: poll interval of a wait with a deadline
    return p


def stop_and_check(p: subprocess.Popen[bytes], state: Path, out: Path) -> str:
    p.send_signal(signal.SIGINT)
    assert p.wait(90) == 0, out.read_text()
    text = out.read_text()
    assert "Traceback" not in text, text
    deadline = time.monotonic() + 10
    while running_on(state) and time.monotonic() < deadline:
        time.sleep(0.1)  # pacing: a killed process group leaves /proc a moment after its leader is reaped
    assert running_on(state) == []
    return text


@pytest.mark.timeout(120)
def test_second_dev_is_refused_and_ctrl_c_while_starting_stops_without_claiming_to_run(tmp_path: Path) -> None:
    """A second `dev` on the same state dir used to start a second SeaweedFS on the first one's data and fail
    with a line of a Go stack trace. Ctrl+C while starting used to go on starting the hub and every pool, print
    "bucketwire dev is running", then stop."""
    needs_weed()
    state, out = tmp_path / "state", tmp_path / "dev.out"
    p = start_dev(state, out)
    try:
        r = CliRunner().invoke(dev, ["--state-dir", str(state)])  # in-process: fast, the first is still starting
        assert r.exit_code == 1, r.output
        assert r.output.count("\n") == 1, r.output
        assert f"another `bucketwire dev` (pid {p.pid}) is running with the state dir {state}" in r.output
        assert "--state-dir" in r.output
    finally:
        text = stop_and_check(p, state, out)
    assert "is running" not in text, text
    assert not (state / "logs").exists(), "started the hub or pools after Ctrl+C"
    assert text.rstrip().endswith("stopped"), text


def test_state_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    r = CliRunner().invoke(dev, ["--state-dir", str(tmp_path / "a-file" / "dev")])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.output.count("\n") == 1, r.output
    assert "cannot use" in r.output and "--state-dir" in r.output


def test_a_bad_base_config_is_named_as_the_user_wrote_it_before_anything_starts(tmp_path: Path) -> None:
    """The line named the generated <state-dir>/bucketwire.toml (not the file to edit), after starting SeaweedFS."""
    needs_weed()
    base = tmp_path / "mine.toml"
    base.write_text('[groups.x]\ntopics = ["a"]\ncredit = "ten"\n')
    r = CliRunner().invoke(dev, ["--state-dir", str(tmp_path / "s"), "--config", str(base)])
    assert r.exit_code == 1, r.output
    assert r.output == f'Error: {base}: [groups.x] credit: expected an integer ≥ 1, got "ten"\n', r.output
    assert not (tmp_path / "s" / "seaweedfs").exists()


@pytest.mark.timeout(180)
def test_a_pool_that_stops_at_start_is_named_with_its_own_error_line(tmp_path: Path) -> None:
    """A group naming a plugin that is not installed (a typo): its pool stops at start with one line in its log.
    `dev` said only `worker-x (exit 1, see .../worker-x.log) exited during startup`; the reason is the line."""
    needs_weed()
    base = tmp_path / "mine.toml"
    base.write_text((Path(__file__).parent.parent / "examples" / "dev.toml").read_text()
                    + '\n[groups.x]\ntopics = ["photos"]\nplugins = ["thumbnial"]\nprocesses = 1\n')
    state = tmp_path / "s"
    state.mkdir()
    (state / "logs").mkdir()
    (state / "logs" / "worker-x.log").write_text("Error: a line an earlier run left in the log\n")
    r = subprocess.run([BUCKETWIRE, "dev", "--state-dir", str(state), "--config", str(base)], capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: worker-x exited during startup (exit 1, see {state / 'logs' / 'worker-x.log'}): "
                           "plugin 'thumbnial' is named in the config but not installed"), r.stderr
    wait_for_nothing_on(state)


def wait_for_nothing_on(state: Path) -> None:
    deadline = time.monotonic() + 20
    while running_on(state) and time.monotonic() < deadline:
        time.sleep(0.1)  # pacing: a killed process group leaves /proc a moment after its leader is reaped
    assert running_on(state) == []


@pytest.mark.parametrize("dev_table, line", [
    ('bucket = ["mine"]', "[dev] bucket: unknown key; did you mean buckets?"),
    ("buckets = [1]", "[dev] buckets[0]: expected a non-empty string, got 1"),
    ("bukets = 'x'\nbuckets = ['a']", "[dev] bukets: unknown key; did you mean buckets?"),
])
def test_a_mistake_in_the_dev_table_is_one_line_before_anything_starts(tmp_path: Path, dev_table: str,
                                                                        line: str) -> None:
    """`[dev]` was read unchecked: `bucket = [...]` (a typo) was ignored, so the bucket was never made, and
    `buckets = [1]` ended in a TypeError traceback."""
    base = tmp_path / "mine.toml"
    base.write_text(f"[dev]\n{dev_table}\n")
    r = CliRunner().invoke(dev, ["--state-dir", str(tmp_path / "s"), "--config", str(base)])
    assert r.exit_code == 1, r.output
    assert r.output == f"Error: {base}: {line}\n", r.output
    assert not (tmp_path / "s").exists()


def test_one_bucket_name_in_the_dev_table_is_a_list_of_one() -> None:
    """`buckets = "mine"` was iterated letter by letter: `bucket name 'm' in the config is not a valid S3 bucket
    name`. As everywhere in the config, one string is a list of one."""
    assert needed_buckets({"dev": {"buckets": "mine"}}) == ["mine"]


@pytest.mark.timeout(120)
def test_dev_stops_only_what_a_dev_started_not_every_process_naming_its_state_dir(tmp_path: Path) -> None:
    """A `dev` stopped the leftovers of a killed `dev` by command line: every session leader of the user with a
    word under the state dir got SIGTERM, then SIGKILL. `--state-dir /tmp` (or ~, or a project dir) took down
    whatever else ran with a path there: other programs' servers, other test suites' weed and nats-server. Only
    processes a `dev` on this state dir started are its leftovers."""
    needs_weed()
    state = tmp_path / "state"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(state / "data.db")],
                             start_new_session=True)  # another program, using a file under the same directory
    # What a killed `dev` on this state dir left (its environment marked as dev marks everything it starts).
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # a-leftover"],
                            env={**os.environ, DEV_MARK_ENV: str(state.absolute())}, start_new_session=True)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        # --s3-port taken: dev looks for leftovers, then fails to start SeaweedFS; nothing of a stack comes up.
        r = subprocess.run([BUCKETWIRE, "dev", "--state-dir", str(state), "--s3-port", str(taken.getsockname()[1])],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "already in use" in r.stderr, r.stderr
        first = r.stderr.splitlines()[0]
        assert first.startswith(f"stopped what a killed `bucketwire dev` left running on {state.absolute()}: "), \
            r.stderr
        assert first.endswith(f"a-leftover (pid {left.pid})"), r.stderr  # it alone
        assert left.wait(30) == -signal.SIGTERM
        assert other.poll() is None, "dev killed a process it did not start"
    finally:
        taken.close()
        for p in (other, left):
            p.kill()
            p.wait()


def wait_running(p: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 90
    while "is running" not in out.read_text():
        assert p.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)  # pacing: poll interval of a wait with a deadline


@pytest.mark.timeout(240)
@pytest.mark.xdist_group("dev-demo")
def test_dev_killed_9_leaves_nothing_running_and_restarts_on_its_state_dir(tmp_path: Path) -> None:
    """kill -9 of `dev` (an OOM kill, a closed terminal's SIGKILL) left SeaweedFS, the hub and every pool running,
    each in its own session; the next `dev` on that state dir took the free lock, started a second weed on the
    first one's data and stopped with a line of a Go stack trace, the old stack still running."""
    needs_weed()
    state = tmp_path / "state"
    out1, out2 = tmp_path / "dev1.out", tmp_path / "dev2.out"
    p1 = subprocess.Popen([BUCKETWIRE, "dev", "--state-dir", str(state)], stdout=out1.open("wb"),
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_running(p1, out1)
        assert running_on(state), "the stack's processes should name the state dir"
    finally:
        os.killpg(p1.pid, signal.SIGKILL)  # dev's group only: weed, hub and pools lead their own sessions
        p1.wait(10)
    p2 = subprocess.Popen([BUCKETWIRE, "dev", "--state-dir", str(state)], stdout=out2.open("wb"),
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_running(p2, out2)
    finally:
        if p2.poll() is None:
            os.killpg(p2.pid, signal.SIGKILL)
            p2.wait(10)
        deadline = time.monotonic() + 60
        while running_on(state) and time.monotonic() < deadline:
            time.sleep(0.1)  # pacing: poll interval of a wait with a deadline
        left = running_on(state)
        for line in left:  # never leave a stack behind, whatever the outcome
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(line.split(":")[0]), signal.SIGKILL)
    assert left == [], "a dev killed with -9 left its stack running"
    text = out2.read_text()
    assert "Traceback" not in text and ".go:" not in text, text


PARENT = """
import os, subprocess, sys, time
env = {**os.environ, "BUCKETWIRE_STOP_WITH": str(os.getpid())} if sys.argv[1] == "watched" else dict(os.environ)
for cmd in (["hub"], ["worker", "--group", "g", "--topic", "photos", "-n", "1", "--plugin", sys.argv[3]]):
    p = subprocess.Popen([sys.argv[2], *cmd, "-c", sys.argv[4]], env=env, start_new_session=True,
                         stdout=open(sys.argv[5] + "-" + cmd[0] + ".log", "wb"), stderr=subprocess.STDOUT)
    print(p.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("watched", [True, False], ids=["watched", "not watched"])
def test_a_hub_and_pool_whose_parent_dies_without_its_death_signal_stop_when_they_are_told_to_watch_it(
        stack_factory: Any, tmp_path: Path, watched: bool) -> None:
    """`dev` has the kernel signal its hub and pools when it dies (PR_SET_PDEATHSIG), yet under load a killed
    `dev` once left a pool running for good, its signal never seen. So `dev` also names itself in
    BUCKETWIRE_STOP_WITH, and a hub or pool started so stops (as for SIGTERM) once its parent is gone, whatever
    became of the signal. Here the parent sets no death signal at all: watched, both stop; not watched, both live
    on (the test stops them), which shows the watch is what stopped them."""
    from tests.fixtures_hub import RECORDER, wait_for

    s = stack_factory()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "watched" if watched else "plain", BUCKETWIRE, RECORDER,
                               str(s.cfg_path), str(tmp_path / "out")], stdout=subprocess.PIPE, env=s.env)
    assert parent.stdout is not None
    pids = [int(parent.stdout.readline()), int(parent.stdout.readline())]
    try:
        wait_for(lambda: s.healthy() and s.status()["groups"].get("g", {}).get("workers"), 30,
                 "the hub up and the pool joined")
        parent.kill()
        parent.wait(10)

        def alive() -> list[int]:
            return [p for p in pids if Path(f"/proc/{p}").exists()
                    and Path(f"/proc/{p}/stat").read_text().split(")")[1].split()[0] != "Z"]

        if watched:
            wait_for(lambda: not alive(), 30, "the hub and the pool to stop after their parent died")
            assert "worker pool stopped" in (tmp_path / "out-worker.log").read_text()  # drained, not killed
        else:
            time.sleep(2)  # pacing: long enough for a watch to have acted (it looks every 0.5 s)
            assert alive() == pids, "nothing should stop them without the watch"
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_an_s3_port_in_use_is_said_first_and_alone(tmp_path: Path) -> None:
    """`dev --s3-port N` with N taken printed `stopping...` and then the error, as if something had been started
    and stopped: the operator read a shutdown. Nothing was started; the error is the whole output, naming the flag
    and how to pick another."""
    needs_weed()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = subprocess.run([BUCKETWIRE, "dev", "--state-dir", str(tmp_path / "state"), "--s3-port", str(port)],
                           capture_output=True, text=True, timeout=90)
    finally:
        taken.close()
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "already in use" in lines[0] and "--s3-port" in lines[0] and str(port) in lines[0], lines[0]
    assert "stopping" not in r.stdout + r.stderr and "Traceback" not in r.stderr
