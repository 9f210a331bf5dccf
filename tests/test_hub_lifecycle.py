"""The hub's own start and stop, in-process: `run` returns once `stop` is called (every socket, monitor and the
ZeroMQ context released, in an order that cannot block), and a second hub on taken ports fails with one line."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bucketwire import config as config_mod
from bucketwire.hub.loop import Hub
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
        with pytest.raises(OSError, match="cannot bind ZeroMQ endpoint .*another hub running") as e:
            second.run()
        assert "\n" not in str(e.value)
    finally:
        first.stop()
        t.join(30)
    assert not t.is_alive()
