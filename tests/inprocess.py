"""A real hub (ZeroMQ listeners, SQLite journal) turned by the test's own thread, with a DEALER to talk to it: for
tests that watch what one loop turn does, which a hub process would hide."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import zmq

from bucketwire import config
from bucketwire import protocol as P
from bucketwire.hub.loop import Hub
from bucketwire.procutil import free_port


class InProcessHub:
    """`hub_extra`: lines for [hub]; `extra`: more of the config file after it."""

    def __init__(self, tmp: Path, hub_extra: str = "", extra: str = "") -> None:
        cfgp = tmp / "bucketwire.toml"
        cfgp.write_text(f"""
[hub]
http = "127.0.0.1:{free_port()}"
publish = "tcp://127.0.0.1:{free_port()}"
work = "tcp://127.0.0.1:{free_port()}"
state_dir = "{tmp / 'state'}"
{hub_extra}
{extra}
""")
        self.cfg = config.load(cfgp)
        self.hub = Hub(self.cfg)
        self.hub.net.open()
        self.hub._loop_thread = 0
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.connect(self.cfg.hub.work)

    def request(self, frames: list[bytes], timeout: float = 10) -> tuple[bytes, dict[str, Any]]:
        """Send `frames` on the DEALER and turn the hub until it answers: (command, header)."""
        self.dealer.send_multipart(frames)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.hub.tick()
            if self.dealer.poll(1):
                cmd, hdr = self.dealer.recv_multipart()[:2]
                return cmd, json.loads(hdr)
        raise AssertionError(f"the hub did not answer {frames[0]!r}")

    def close(self) -> None:
        self.dealer.close(0)
        self.ctx.term()
        self.hub.net.close()
        self.hub.journal.close()


def pub_frames(req: int, raw_events: list[bytes]) -> list[bytes]:
    """A PUB of `raw_events` (JSON texts, as a publisher wrote them)."""
    return [P.PUB, b'{"req":%d,"events":[%s]}' % (req, b",".join(raw_events))]
