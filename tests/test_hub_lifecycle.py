"""The hub's own start and stop, in-process: `run` returns once `stop` is called (every socket, monitor and the
ZeroMQ context released, in an order that cannot block), and a second hub on taken ports fails with one line."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from bucketwire import config as config_mod
from bucketwire.hub.loop import Hub
from bucketwire.procutil import free_port
from tests.fixtures_hub import Stack


def _running(hub: Hub) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            hub.run()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_run_returns_after_stop(tmp_path: Path) -> None:
    hub = Hub(config_mod.load(Stack(tmp_path).cfg_path))
    t, errors = _running(hub)
    assert hub.ready.wait(30), errors
    hub.stop()
    t.join(30)  # a deadline, not a pace: a hang in shutdown (the context waiting for a socket) fails here
    assert not t.is_alive(), "Hub.run did not return after stop()"
    assert errors == []


def test_second_hub_on_taken_ports_fails_with_one_line(tmp_path: Path) -> None:
    s = Stack(tmp_path)
    first = Hub(config_mod.load(s.cfg_path))
    t, errors = _running(first)
    try:
        assert first.ready.wait(30), errors
        cfg2 = config_mod.load(s.cfg_path)
        cfg2.hub.state_dir = tmp_path / "state2"
        second = Hub(cfg2)
        with pytest.raises(OSError, match=r"cannot bind \[hub\] work .*another process \(a hub\?\) listens there") as e:
            second.run()
        assert "\n" not in str(e.value)
    finally:
        first.stop()
        t.join(30)
    assert not t.is_alive()


@pytest.mark.parametrize("key", ["work", "publish"])
def test_a_taken_zeromq_port_names_its_key(stack_factory: Any, key: str) -> None:
    """`bucketwire hub` on a work or publish port another process holds: one line naming the key to change, as
    the taken http port does ("set [hub] http"); it said only "cannot bind ZeroMQ endpoint (...); is another hub
    running on these ports?", leaving the user to find which of three settings was meant."""
    s = stack_factory()
    s.start_hub()
    taken = s.cfg.hub.work if key == "work" else s.cfg.hub.publish
    other = {"work": f"tcp://127.0.0.1:{free_port()}", "publish": f"tcp://127.0.0.1:{free_port()}", key: taken}
    cfg = s.dir / "second.toml"
    cfg.write_text(f'[hub]\nhttp = "127.0.0.1:{free_port()}"\nwork = "{other["work"]}"\n'
                   f'publish = "{other["publish"]}"\nstate_dir = "{s.dir / "second"}"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"Error: cannot bind [hub] {key} {taken}: address already in use; another process (a hub?) "
                    f"listens there: stop it, or set [hub] {key} to a free port"), r.stderr


def test_a_zeromq_address_not_of_this_host_names_its_key(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET) is no address of this host: the line says so and names the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[hub]\nhttp = "127.0.0.1:{free_port()}"\nwork = "tcp://127.0.0.1:{free_port()}"\n'
                   f'publish = "tcp://192.0.2.1:{free_port()}"\nstate_dir = "{tmp_path / "st"}"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot bind [hub] publish tcp://192.0.2.1:"), r.stderr
    assert last.endswith("is not an address of this host: set [hub] publish to one of its addresses, or to "
                         "0.0.0.0 for all of them"), r.stderr
