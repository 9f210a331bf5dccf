"""The wire documentation is enough for a non-Python client: examples/c-subscriber, plain C against libzmq, built
with its Makefile and run against a real hub, with and without CURVE.

Skipped (with the reason) where there is no C compiler, make or libzmq headers (`apt-get install libzmq3-dev`;
.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from bucketwire import Event
from bucketwire.envelope import parse_seq
from tests.cloudevents_check import assert_cloudevent
from tests.fixtures_hub import Stack, wait_for
from tests.test_security import authorize, make_keys, security_toml

SRC = Path(__file__).resolve().parent.parent / "examples" / "c-subscriber"
GROUPS = """
[topics.jobs]
[topics.jobs2]
"""


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc) or not shutil.which("make"):
        pytest.skip(f"no C compiler ({cc}) or make on this machine")
    probe = subprocess.run([cc, "-E", "-x", "c", "-", *_pkg_cflags()], input="#include <zmq.h>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("libzmq headers (zmq.h) not found; apt-get install libzmq3-dev")
    out = tmp_path_factory.mktemp("c-subscriber")
    r = subprocess.run(["make", "-C", str(SRC), f"O={out}"], capture_output=True, text=True)
    assert r.returncode == 0, f"the example does not build:\n{r.stdout}\n{r.stderr}"
    return out / "bw-subscribe"


def _pkg_cflags() -> list[str]:
    if not shutil.which("pkg-config"):
        return []
    r = subprocess.run(["pkg-config", "--cflags", "libzmq"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


class Subscriber:
    """bw-subscribe running with -v: stdout lines are events, stderr lines heartbeats (the signal that the
    subscription reached the hub)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda st=stream, sk=sink: sk.extend(st), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def wait(self, timeout: float) -> int:
        """The exit code, once everything the process wrote has been read (the readers reach end of file)."""
        code = self.proc.wait(timeout)
        for t in self.readers:
            t.join(timeout)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.wait(10)


def publish(s: Stack, topic: str, n: int) -> None:
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:c-test", type="test.c", topic=topic,
                                data={"n": i, "text": "grüße"}) for i in range(n)])


def run_against(s: Stack, binary: Path, key_args: list[str]) -> None:
    publish(s, "jobs", 1)  # the topic exists, so the hub heartbeats it
    publish(s, "jobs2", 1)
    sub = Subscriber([str(binary), "-v", "-n", "3", *key_args, f"tcp://127.0.0.1:{s.pub_port}", "jobs"])
    try:
        wait_for(lambda: any(x.startswith("# heartbeat jobs ") for x in sub.err), 20,
                 "a heartbeat on the C subscriber (its subscription is live)")
        publish(s, "jobs2", 2)  # a topic that shares the prefix: must not arrive
        publish(s, "jobs", 3)
        assert sub.wait(20) == 0, "".join(sub.err)
    finally:
        sub.stop()
    assert len(sub.lines) == 3, sub.lines
    for want_seq, line in enumerate(sub.lines, start=2):
        topic, seq, envelope = line.rstrip("\n").split(" ", 2)
        assert (topic, seq) == ("jobs", str(want_seq))
        ev = json.loads(envelope)
        assert parse_seq(ev["seq"]) == want_seq and ev["topic"] == "jobs" and ev["data"]["text"] == "grüße"
        assert_cloudevent(envelope)


def test_c_subscriber_without_curve(stack_factory: Callable[..., Stack], binary: Path) -> None:
    s = stack_factory(GROUPS)
    s.start_hub()
    run_against(s, binary, [])


def test_c_subscriber_with_curve(stack_factory: Callable[..., Stack], tmp_path: Path, binary: Path) -> None:
    d = tmp_path / "sec"
    make_keys(d, "hub", "admin", "csub", "stranger")
    authorize(d, "admin")
    authorize(d, "csub")
    s = stack_factory(GROUPS + security_toml(d))
    s.start_hub()
    run_against(s, binary, ["-s", str(d / "keys" / "hub.key"), "-k", str(d / "keys" / "csub.key_secret")])
    # a key the hub does not know never completes the handshake: nothing, not even a heartbeat, arrives
    stranger = Subscriber([str(binary), "-v", "-s", str(d / "keys" / "hub.key"), "-k",
                           str(d / "keys" / "stranger.key_secret"), f"tcp://127.0.0.1:{s.pub_port}", "jobs"])
    try:
        checker = Subscriber([str(binary), "-v", "-s", str(d / "keys" / "hub.key"), "-k",
                              str(d / "keys" / "csub.key_secret"), f"tcp://127.0.0.1:{s.pub_port}", "jobs"])
        try:  # a known key connected at the same time sees heartbeats: the stranger had the same chance
            wait_for(lambda: len([x for x in checker.err if x.startswith("# heartbeat")]) >= 3, 20,
                     "heartbeats on the authorized subscriber")
        finally:
            checker.stop()
        assert stranger.lines == [] and not [x for x in stranger.err if x.startswith("# heartbeat")]
    finally:
        stranger.stop()


def test_c_subscriber_bad_key_file_is_one_line(binary: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.key").write_text("hello\n")
    r = subprocess.run([str(binary), "-s", str(tmp_path / "junk.key"), "-k", str(tmp_path / "missing.key_secret"),
                        "tcp://127.0.0.1:1", "jobs"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "junk.key holds no public-key" in r.stderr
