"""`bucketwire dev` while it is still starting: Ctrl+C, a second `dev` on the same state dir, a state dir it
cannot use. Each is what a newcomer does in the first minute; each must end in one line and leave nothing running.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bucketwire.commands.dev import dev
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
