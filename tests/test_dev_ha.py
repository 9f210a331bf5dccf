"""`bucketwire dev --ha --demo`: 3 NATS nodes, 2 hubs, the pools and SeaweedFS come up and make thumbnails; the
dispatching hub is SIGKILLed, the other takes over and keeps handling the store's events; SIGINT leaves no
process behind."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import minio
import pytest

from bucketwire.devstack.seaweedfs import WeedError, find_weed
from tests.test_dev import BUCKETWIRE, banner_value, descendants

pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")


def wait_until(cond: Any, timeout: float, what: str, p: subprocess.Popen[bytes], out: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        assert p.poll() is None, f"dev exited while waiting for {what}:\n{out.read_text()}"
        time.sleep(0.3)  # pacing: the poll interval of a wait with a deadline
    raise AssertionError(f"timed out waiting for {what}:\n{out.read_text()}")


@pytest.mark.xdist_group("dev-demo")  # the two full demo stacks (test_dev too) never run at the same time
@pytest.mark.timeout(240)
def test_dev_ha_demo_takeover_and_clean_stop(tmp_path: Path) -> None:
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    out = tmp_path / "dev.out"
    state = tmp_path / "state"
    p = subprocess.Popen([BUCKETWIRE, "dev", "--ha", "--state-dir", str(state), "--demo"],
                         stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: out.read_text().count("thumbnail-ready") >= 8, 120, "the demo thumbnails", p, out)
        text = out.read_text()
        kill_pid = int(re.search(r"^  takeover +kill (\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
        leader_cmd = banner_value(text, "leader").split("  (")[0]

        def leader() -> str | None:
            r = subprocess.run(leader_cmd, shell=True, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                return None
            return json.loads(r.stdout).get("dispatch", {}).get("thumbnails", {}).get("leader")

        assert wait_until(leader, 30, "status to name a leader", p, out) == "hub-a"
        assert len(descendants(p.pid)) >= 9  # 3 nats, weed, 2 hubs, 3 pools (plus their children)

        os.kill(kill_pid, signal.SIGKILL)
        wait_until(lambda: leader() == "hub-b", 60, "hub b to take over", p, out)
        s3 = minio.Minio(banner_value(text, "S3 endpoint").removeprefix("http://"),
                         access_key=banner_value(text, "access key"), secret_key=banner_value(text, "secret key"),
                         secure=False)
        jpeg = _jpeg()
        s3.put_object("photos", "after/takeover.jpg", io.BytesIO(jpeg), len(jpeg), content_type="image/jpeg")

        def thumb() -> bool:
            try:
                s3.stat_object("thumbnails", "128/after/takeover.jpg.webp")
                return True
            except minio.error.S3Error:
                return False

        wait_until(thumb, 60, "a thumbnail made after the takeover", p, out)

        p.send_signal(signal.SIGINT)
        p.wait(90)
        assert p.returncode == 0, out.read_text()
        assert descendants(p.pid) == [], descendants(p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()
