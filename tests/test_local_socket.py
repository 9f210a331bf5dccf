"""The hub's local socket ([hub] local, bucketwire/zmtp.py): ZMTP 3.1 NULL over a Unix socket, spoken by our own
threads. Each test tries to break one thing it promises: interop with libzmq both ways, the codec, the end-to-end
path through real hub and worker processes, a hub killed -9, a second hub on the path, peers that break the protocol,
another OS user, identities, and the config value."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as hs

from bucketwire import config as config_mod
from bucketwire import protocol as P
from bucketwire import security, zmtp
from bucketwire.client import HubClient, HubUnavailable
from bucketwire.envelope import SCHEMA_VERSION, Event, new_event_id
from bucketwire.zmtp import LocalDealer, LocalRouter, Stream
from tests.fixtures_hub import Stack, wait_for
from tests.test_security import authorize, make_keys, security_toml

SIZES = [0, 1, 255, 256, 70_000]
GROUP = """
[groups.g]
topics = ["photos", "follow"]
plugins = []
"""


# -- helpers -------------------------------------------------------------------------------------------------------
def pump(router: LocalRouter, until: Callable[[], bool], what: str, timeout: float = 20.0,
         got: list[list[bytes]] | None = None) -> list[list[bytes]]:
    """Run the router as the hub's loop does (poll its descriptor, take what waits) until `until()`."""
    got = [] if got is None else got
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if not router.ready:
            select.select([router.fileno()], [], [], 0.05)
        while (m := router.receive()) is not None:
            got.append(m)
    return got


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test, which asserts on it
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def closed_by_peer(s: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the other end closed `s` (EOF or reset) within `timeout`, reading and dropping what it sent."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 16):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def raw_peer(path: str, greeting: bytes = zmtp.GREETING_CLIENT) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(greeting)
    return s


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for socket files (a Unix socket path holds at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="bwl-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (TMPDIR may sit in one only we can enter, as the suite's does)."""
    d = Path(tempfile.mkdtemp(prefix="bwl-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def local_stack(make: Callable[..., Stack], sock: Path, client_local: bool = True, extra: str = "") -> Stack:
    """A Stack whose hub also serves `[hub] local` at `sock`; with `client_local` its clients (workers, status,
    publish) connect there too."""
    s = make(GROUP + extra + (f'\n[client]\nwork = "ipc://{sock}"\n' if client_local else ""))
    text = s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                          f'heartbeat_timeout = 1.5\nlocal = "ipc://{sock}"\n', 1)
    s.cfg_path.write_text(text)
    s.cfg = config_mod.load(s.cfg_path)
    return s


def tcp_dealer(ctx: zmq.Context[zmq.Socket[bytes]], s: Stack, identity: bytes = b"",
               cfg: config_mod.Config | None = None) -> zmq.Socket[bytes]:
    """A libzmq DEALER on the hub's tcp work socket (with `cfg`: that config's CURVE client key), under
    `identity` when given: an impostor's, when it is a local peer's."""
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    if identity:
        d.setsockopt(zmq.IDENTITY, identity)
    if cfg is not None:
        security.apply_client(d, cfg)
    d.connect(f"tcp://127.0.0.1:{s.work_port}")
    return d


@contextlib.contextmanager
def hub_and_local_peer(make: Callable[..., Stack], sock_dir: Path, ident: bytes
                       ) -> Iterator[tuple[Stack, LocalDealer, zmq.Context[zmq.Socket[bytes]]]]:
    """A started hub serving `[hub] local`, a LocalDealer on it named `ident`, and a context for tcp peers."""
    sock = sock_dir / "hub.sock"
    s = local_stack(make, sock)
    s.start_hub()
    peer = LocalDealer(str(sock), ident)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield s, peer, ctx
    finally:
        peer.close()
        ctx.destroy(0)


def tcp_client(s: Stack) -> HubClient:
    cfg = config_mod.load(s.cfg_path)
    cfg.client.work = f"tcp://127.0.0.1:{s.work_port}"
    cfg.client.work_endpoints = [cfg.client.work]
    return HubClient(cfg, timeout=10)


def bw(args: list[str], cfg: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(cfg)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "BW_TEST_TOKEN": "test-token"})


def one_line(text: str) -> str:
    """The one line saying what is wrong (the hub may have logged its start before it)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and " info " not in ln]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def status_over(sock: Path, timeout: float = 10) -> dict[str, Any]:
    """STATUS asked by our own DEALER on the local socket (not through the Stack's config)."""
    cfg = config_mod.parse({"client": {"work": f"ipc://{sock}"}})
    with HubClient(cfg, timeout=timeout) as c:
        return c.status()


# -- 1. interop with libzmq ----------------------------------------------------------------------------------------
def messages() -> list[list[bytes]]:
    out = [[os.urandom(n)] for n in SIZES]
    out.append([os.urandom(n) for n in SIZES])  # one message of every size, many frames
    out += [[b"m", str(i).encode(), os.urandom(i % 300)] for i in range(500)]
    return out


def test_a_libzmq_dealer_talks_to_the_local_router(sock_dir: Path) -> None:
    path = str(sock_dir / "r.sock")
    router = LocalRouter(path, 1 << 20)
    ctx = zmq.Context()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.IDENTITY, b"zmq-dealer")
        d.connect(f"ipc://{path}")
        sent = messages()
        for m in sent:
            d.send_multipart(m)
        got = pump(router, lambda: len(got) >= len(sent), "the DEALER's messages", got=(got := []))
        assert [m[1:] for m in got] == sent
        assert {m[0] for m in got} == {b"zmq-dealer"}
        for m in sent:
            assert router.send([b"zmq-dealer", *m])
        back: list[list[bytes]] = []
        while len(back) < len(sent):
            pump(router, lambda: bool(d.poll(0)), "a reply at the DEALER")
            while d.poll(0):
                back.append(d.recv_multipart())
        assert back == sent
        # an anonymous libzmq peer is given an identity of ours (6 bytes, where libzmq's own are 5)
        a = ctx.socket(zmq.DEALER)
        a.setsockopt(zmq.LINGER, 0)
        a.connect(f"ipc://{path}")
        a.send_multipart([b"", b"hello"])
        got = pump(router, lambda: bool(got), "the anonymous DEALER", got=(got := []))
        assert got[0][1:] == [b"", b"hello"] and got[0][0].startswith(zmtp.LOCAL_IDENT) and len(got[0][0]) == 6
        assert router.send([got[0][0], b"to you"])
        pump(router, lambda: bool(a.poll(0)), "the reply to the anonymous DEALER")
        assert a.recv_multipart() == [b"to you"]
    finally:
        router.close()
        ctx.destroy(0)
    assert not os.path.exists(path)


def test_a_libzmq_dealer_with_heartbeats_stays_connected(sock_dir: Path) -> None:
    """ZMTP 3.1 PING/PONG: a libzmq peer that heartbeats drops a connection whose PINGs go unanswered."""
    path = str(sock_dir / "r.sock")
    refused: list[str] = []
    router = LocalRouter(path, 1 << 20, refused.append)
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.IDENTITY, b"beating")
        d.setsockopt(zmq.HEARTBEAT_IVL, 20)
        d.setsockopt(zmq.HEARTBEAT_TIMEOUT, 100)
        mon = d.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        d.connect(f"ipc://{path}")
        d.send(b"first")
        got: list[list[bytes]] = []
        pump(router, lambda: bool(got), "the first message", got=got)
        first_fd = next(iter(router.by_fd))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # pacing: 50 of its heartbeat intervals, the router serving them
            select.select([router.fileno()], [], [], 0.02)
            assert router.receive() is None
        assert not mon.poll(0), "libzmq dropped the connection: its PINGs were not answered"
        assert list(router.by_fd) == [first_fd] and not refused
        d.send(b"second")
        got.clear()
        pump(router, lambda: bool(got), "the second message", got=got)
        assert got == [[b"beating", b"second"]]
    finally:
        router.close()
        ctx.destroy(0)


def test_the_local_dealer_talks_to_a_libzmq_router(sock_dir: Path) -> None:
    path = str(sock_dir / "z.sock")
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.bind(f"ipc://{path}")
    d = LocalDealer(path, b"our-dealer")
    try:
        sent = messages()
        for m in sent:
            d.send_multipart(m)
        got = []
        while len(got) < len(sent):
            d.readable()  # our dealer writes what waits when it is used (here: the READY after the greeting)
            if r.poll(50):
                got.append(r.recv_multipart())
        assert [m[1:] for m in got] == sent
        assert {m[0] for m in got} == {b"our-dealer"}
        for m in sent:
            r.send_multipart([b"our-dealer", *m])
        back = [d.recv_frames() for _ in sent]
        assert back == sent
    finally:
        d.close()
        ctx.destroy(0)


class CountingSocket:
    """A socket whose `recv` calls are counted (Stream's slots take any object with its methods)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.recvs = sock, 0

    def recv(self, n: int) -> bytes:
        self.recvs += 1
        return self.sock.recv(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def dealer_with_router(path: str) -> tuple[LocalRouter, LocalDealer, CountingSocket]:
    router = LocalRouter(path, 1 << 20)
    d = LocalDealer(path, b"d")
    d.send_multipart([b"hi"])
    got: list[list[bytes]] = []
    pump(router, lambda: d.readable() or bool(got), "the dealer's first message", got=got)
    assert got == [[b"d", b"hi"]] and d.st is not None
    counted = CountingSocket(d.st.sock)  # type: ignore[arg-type]
    d.st.sock = counted  # type: ignore[assignment]
    return router, d, counted


def test_after_a_short_read_the_dealer_asks_the_socket_no_more(sock_dir: Path) -> None:
    """A worker child takes a DELIVER and then asks whether another waits (`more`) before running it. A read that
    took less than its chunk took all the socket held: `more` is no when nothing was parsed, without a `recv`
    that would fail (~15 us per event at a modest rate). What comes later, the next poll sees and reads."""
    router, d, counted = dealer_with_router(str(sock_dir / "m.sock"))
    try:
        assert router.send([b"d", b"DELIVER", b"one"])
        assert select.select([d.fileno()], [], [], 10)[0]
        assert d.recv_ready() == [b"DELIVER", b"one"]
        assert counted.recvs == 1
        assert d.more() is False
        assert counted.recvs == 1  # nothing asked of the socket
        assert router.send([b"d", b"DELIVER", b"two"])
        assert select.select([d.fileno()], [], [], 10)[0]  # the next poll sees what came after
        assert d.readable() and d.recv_ready() == [b"DELIVER", b"two"]
        # Two messages in one read: the second is parsed already, and `more` says so without a read.
        assert router.send([b"d", b"A", b"3"]) and router.send([b"d", b"B", b"4"])
        assert not router.by_ident[b"d"].out  # both written into the socket: one read takes them
        assert select.select([d.fileno()], [], [], 10)[0]
        before = counted.recvs
        assert d.recv_ready() == [b"A", b"3"]
        assert d.more() is True and d.recv_ready() == [b"B", b"4"]
        assert d.more() is False and counted.recvs == before + 1
    finally:
        d.close()
        router.close()


def test_after_a_read_that_filled_its_chunk_the_dealer_reads_on(sock_dir: Path) -> None:
    """A batch larger than one read's chunk (a DELIVER at saturation is ~170 KB) is all taken before it runs:
    `more` reads again while the last read filled its chunk."""
    router, d, counted = dealer_with_router(str(sock_dir / "c.sock"))
    big = [[b"DELIVER", bytes([i]) * (zmtp.READ_CHUNK // 2 + 1000)] for i in range(4)]
    try:
        sent = []
        for m in big:
            assert router.send([b"d", *m])
            sent.append(m)
        deadline = time.monotonic() + 10
        while router.by_ident[b"d"].out and time.monotonic() < deadline:  # all of it in the socket
            router.receive()
            time.sleep(0.01)
        assert not router.by_ident[b"d"].out
        assert select.select([d.fileno()], [], [], 10)[0]
        got = [d.recv_ready()]
        while d.more():
            got.append(d.recv_ready())
        assert got == sent
        assert counted.recvs >= 3  # 130 KB and more do not come in one 64 KiB read
    finally:
        d.close()
        router.close()


SIGPIPE_SCRIPT = """
import signal, sys, time, zmq
from bucketwire.zmtp import LocalDealer, LocalRouter
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a plugin or a library may set it
router = LocalRouter(sys.argv[1], 1 << 20)
d = LocalDealer(sys.argv[1], b"d")
d.send_multipart([b"hi"])
while router.receive() is None:
    d.readable()
router.close()  # the hub goes away
for _ in range(100):
    try:
        d.send_multipart([b"x" * 100_000], zmq.NOBLOCK)
    except zmq.Again:
        pass
    time.sleep(0.001)
print("alive")
"""


def test_a_write_to_a_gone_hub_is_an_error_not_sigpipe(sock_dir: Path) -> None:
    """libzmq writes with MSG_NOSIGNAL: a process whose SIGPIPE is the default (a plugin may set it) is not
    killed by a write to a peer that has gone."""
    r = subprocess.run([sys.executable, "-c", SIGPIPE_SCRIPT, str(sock_dir / "p.sock")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "alive" in r.stdout, (r.returncode, r.stderr)


# -- 2. the codec --------------------------------------------------------------------------------------------------
frame_st = hs.one_of(hs.binary(max_size=300), hs.sampled_from(SIZES).map(lambda n: b"x" * n))
messages_st = hs.lists(hs.lists(frame_st, min_size=1, max_size=5), max_size=12)


@settings(max_examples=200, deadline=None)
@given(msgs=messages_st, cuts=hs.lists(hs.integers(min_value=1, max_value=400), max_size=50))
def test_any_messages_in_any_chunks_come_out_whole(msgs: list[list[bytes]], cuts: list[int]) -> None:
    a, b = socket.socketpair()
    try:
        st = Stream(a, True, b"ROUTER", b"", 1 << 20)
        data = zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"id") + b"".join(zmtp.encode(m) for m in msgs)
        i = 0
        for n in [*cuts, len(data)]:
            st.inbuf += data[i:i + n]
            st._parse()
            i += n
            if i >= len(data):
                break
        assert st.peer == {b"socket-type": b"DEALER", b"identity": b"id"}
        assert list(st.messages) == msgs
        assert not st.inbuf and not st.frames
    finally:
        a.close()
        b.close()


# -- 3. end to end -------------------------------------------------------------------------------------------------
def test_events_go_end_to_end_over_the_local_socket(stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    s.start_worker("g", 2)  # waits for them through status, over the local socket
    with s.client() as c:
        assert isinstance(c._socket(), LocalDealer)
        for i in range(40):
            c.publish("photos", {"i": i})
    wait_for(lambda: len(s.handled()) >= 40, 30, "40 events handled")
    assert sorted(e["data"]["i"] for e in s.handled()) == list(range(40))
    pub = bw(["publish", "photos", '{"i": 40}'], s.cfg_path)
    assert pub.returncode == 0, pub.stdout + pub.stderr
    wait_for(lambda: len(s.handled()) >= 41, 30, "the CLI's event handled")
    # events larger than one read (256 KiB) both ways, and a batch of them in one request, follow-ons too
    with s.client() as c:
        c.publish_events([Event(id=new_event_id(), source="t", type="t", topic="photos",
                                data={"i": 41 + k, "pad": "y" * (300_000 + k)}) for k in range(3)])
        c.publish("photos", {"i": 44, "follow": 3, "follow_pad": 200_000})
    wait_for(lambda: len(s.handled()) >= 48, 30, "the large events and follow-ons handled")
    assert sorted(e["data"]["i"] for e in s.handled() if e["t"] == "photos") == list(range(45))
    assert len([e for e in s.handled() if e["t"] == "follow"]) == 3

    def acked() -> bool:
        g = s.status()["groups"]["g"]
        return bool(g["lag"] == 0 and g["inflight"] == 0)

    wait_for(acked, 20, "every event acked")
    st = bw(["status"], s.cfg_path)
    assert st.returncode == 0, st.stdout + st.stderr
    assert s.metric("bucketwire_ingress_rejected_total", ingress="local", reason="protocol") == 0
    s.stop()
    assert s.hub_proc is not None and s.hub_proc.returncode == 0, s.dump_logs()
    assert not sock.exists(), "a hub that stopped left its socket file"


def test_a_relative_local_path_is_beside_the_config_from_any_directory(stack_factory: Callable[..., Stack],
                                                                      sock_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `[hub] local = "ipc://./state/hub/hub.sock"`, written in a config and used as `[client] work`:
    the hub bound it in the directory it was started from (and made the directories there), and a pool or
    `publish` started from another directory could not find it. Like every relative path, it is the config's."""
    s = stack_factory(GROUP)
    cfg = sock_dir / "bucketwire.toml"  # short: the socket path must fit a Unix socket's 107 bytes
    cfg.write_text(s.cfg_path.read_text().replace(
        "heartbeat_timeout = 1.5\n", 'heartbeat_timeout = 1.5\nlocal = "ipc://./run/hub.sock"\n', 1)
        + '\n[client]\nwork = "ipc://./run/hub.sock"\n')
    s.cfg_path = cfg
    hub_dir, worker_dir, cli_dir = (sock_dir / n for n in ("h", "w", "c"))
    for d in (hub_dir, worker_dir, cli_dir):
        d.mkdir()
    monkeypatch.chdir(hub_dir)  # each process starts in the test's working directory
    s.start_hub()
    assert (sock_dir / "run" / "hub.sock").is_socket(), os.listdir(sock_dir)
    # its start line says where the socket is (it named only work and publish)
    started = next(ln for ln in s.logs[0].read_text().splitlines() if "hub started" in ln)
    assert f"local=ipc://{sock_dir}/run/hub.sock" in started, started
    assert not (hub_dir / "run").exists(), "the hub bound its socket in its working directory"
    monkeypatch.chdir(worker_dir)
    s.cfg = config_mod.load(cfg)
    s.start_worker("g")  # waits for it through status, over the local socket
    monkeypatch.chdir(cli_dir)
    pub = bw(["publish", "photos", '{"i": 1}'], cfg, timeout=30)
    assert pub.returncode == 0, pub.stdout + pub.stderr
    wait_for(lambda: [e["data"] for e in s.handled()] == [{"i": 1}], 30, "the event handled")


def test_a_client_of_a_stopped_hub_over_the_local_socket_is_told_so(sock_dir: Path) -> None:
    cfg = config_mod.parse({"client": {"work": f"ipc://{sock_dir / 'none.sock'}"}})
    with HubClient(cfg, timeout=1) as c, pytest.raises(HubUnavailable):
        c.status()
    conf = sock_dir / "c.toml"
    conf.write_text(f'[client]\nwork = "ipc://{sock_dir / "none.sock"}"\ntimeout = 1\n')
    for args in (["status"], ["publish", "photos", "{}"]):
        r = bw(args, conf)
        assert r.returncode != 0
        line = one_line(r.stdout + r.stderr)
        assert "hub" in line and str(sock_dir / "none.sock") in line, line


def test_a_request_sent_before_the_hub_is_up_gets_through_once_it_is(stack_factory: Callable[..., Stack],
                                                                     sock_dir: Path) -> None:
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    t, out = in_thread(lambda: status_over(sock, timeout=60))
    time.sleep(0.5)  # pacing: the request is under way (refused sends) before the hub starts
    s.start_hub()
    t.join(60)
    assert out and isinstance(out[0], dict) and "groups" in out[0], out


def test_a_large_request_to_a_frozen_hub_ends_in_its_timeout(stack_factory: Callable[..., Stack],
                                                              sock_dir: Path) -> None:
    """A request bigger than the kernel's socket buffer, to a hub that reads nothing (stopped): the client gives up
    after [client] timeout as over ZeroMQ, not blocked for ever in the write."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    assert s.hub_proc is not None
    c = HubClient(s.cfg, timeout=2)
    c.status()  # connected, greeted: what it sends now goes straight to the socket
    os.kill(s.hub_proc.pid, signal.SIGSTOP)
    try:
        events = [Event(id=new_event_id(), source="t", type="t", data="x" * 10_000, topic="photos")
                  for _ in range(200)]

        def publish() -> Any:
            with c:
                return c.publish_events(events)

        t, out = in_thread(publish)
        t.join(30)  # a bound on a hang, far above the 2 s asked for
        assert not t.is_alive(), "the client is stuck writing to a hub that does not read"
        assert out and isinstance(out[0], HubUnavailable), out
    finally:
        os.kill(s.hub_proc.pid, signal.SIGCONT)


# -- 4. kill -9 of the hub -----------------------------------------------------------------------------------------
def test_workers_come_back_over_the_local_socket_after_a_hub_kill9(stack_factory: Callable[..., Stack],
                                                                    sock_dir: Path) -> None:
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    s.start_worker("g", 2)
    sent = 0
    with s.client() as c:
        for _ in range(60):
            c.publish("photos", {"i": sent})
            sent += 1
    wait_for(lambda: len(s.handled()) >= 10, 30, "traffic under way")
    s.kill_hub()
    assert sock.exists()  # the dead hub's socket file stays
    s.start_hub()
    with s.client() as c:
        for _ in range(60):
            c.publish("photos", {"i": sent})
            sent += 1
    wait_for(lambda: {e["data"]["i"] for e in s.handled()} >= set(range(sent)), 60,
             f"all {sent} events handled at least once")
    wait_for(lambda: s.status()["groups"].get("g", {}).get("workers", 0) >= 2, 30, "both workers back")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_worker_child_does_not_spin_while_the_hub_is_down(stack_factory: Callable[..., Stack],
                                                            sock_dir: Path) -> None:
    """With no hub on the local socket, the child waits (as its ZeroMQ DEALER lets it) and is back once the hub
    is; it does not poll a dead descriptor in a loop."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    w = s.start_worker("g", 1, wait=False)  # before the hub: it has never had a connection
    child = wait_for(lambda: s.child_pids(w), 30, "the worker child")[0]
    for i in range(2):
        before, t0 = cpu_seconds(child), time.monotonic()
        time.sleep(2)  # pacing: a window in which a spinning child would use all of it
        used, wall = cpu_seconds(child) - before, time.monotonic() - t0
        assert used < wall / 3, f"the worker child used {used:.2f} s of CPU in {wall:.2f} s with the hub down"
        s.start_hub()
        wait_for(lambda: s.status()["groups"].get("g", {}).get("workers", 0) >= 1, 30, "the worker at the hub")
        with s.client() as c:
            c.publish("photos", {"i": i})
        wait_for(lambda n=i + 1: len(s.handled()) >= n, 30, "an event once the hub is up")
        if i == 0:
            s.kill_hub()  # then: it had a connection, and lost it


def test_a_worker_without_a_hub_on_the_local_socket_says_why(stack_factory: Callable[..., Stack],
                                                              sock_dir: Path) -> None:
    """A pool started before its hub (or pointed at a local socket nobody serves) logged only `hub silent;
    reconnecting`, every few seconds, naming nothing to check; the socket's own answer says which it is."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_worker("g", 1, wait=False)
    log = s.logs[-1]
    line = wait_for(lambda: next((ln for ln in log.read_text().splitlines() if "hub silent" in ln), None), 30,
                    "the pool's 'hub silent' line")
    assert f"cannot connect to {sock} (No such file or directory)" in line, line
    assert "[hub] local" in line, line


# -- 5. the path ---------------------------------------------------------------------------------------------------
def test_a_second_hub_on_the_same_local_path_fails_in_one_line(stack_factory: Callable[..., Stack],
                                                               sock_dir: Path) -> None:
    sock = sock_dir / "hub.sock"
    first = local_stack(stack_factory, sock)
    first.start_hub()
    first.start_worker("g", 1)
    second = local_stack(stack_factory, sock, client_local=False)
    r = bw(["hub"], second.cfg_path)
    assert r.returncode != 0
    line = one_line(r.stdout + r.stderr)
    assert "[hub] local" in line and "in use" in line, line
    # the first hub is unharmed: its socket file is there and it still serves over it
    assert first.hub_proc is not None and first.hub_proc.poll() is None
    assert sock.exists()
    with first.client() as c:
        c.publish("photos", {"i": 1})
    wait_for(lambda: len(first.handled()) >= 1, 20, "an event after the second hub's try")


def test_probes_that_connect_and_close_do_not_harm_the_hub(stack_factory: Callable[..., Stack],
                                                           sock_dir: Path) -> None:
    """What a second hub's start does to see whether the path is live: connect, then close at once."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    for _ in range(200):
        p = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        p.connect(str(sock))
        p.close()
    assert status_over(sock)["groups"] is not None
    assert s.hub_proc is not None and s.hub_proc.poll() is None


def test_a_file_at_the_local_path_fails_in_one_line(stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    sock = sock_dir / "hub.sock"
    sock.write_text("mine\n")
    s = local_stack(stack_factory, sock, client_local=False)
    r = bw(["hub"], s.cfg_path)
    assert r.returncode != 0
    line = one_line(r.stdout + r.stderr)
    assert "[hub] local" in line and "not a socket" in line, line
    assert sock.read_text() == "mine\n"


# -- 6. peers that break the protocol ------------------------------------------------------------------------------
CURVE_GREETING = zmtp.SIGNATURE + b"\x03\x01" + b"CURVE".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


@pytest.mark.parametrize("case", ["garbage", "short-garbage", "curve", "too-large", "before-ready"])
def test_a_peer_breaking_the_protocol_is_closed_alone(stack_factory: Callable[..., Stack], sock_dir: Path,
                                                      case: str) -> None:
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    s.start_worker("g", 1)
    good = LocalDealer(str(sock), b"good-peer")
    try:
        if case == "garbage":
            bad = raw_peer(str(sock), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100)
        elif case == "short-garbage":
            bad = raw_peer(str(sock), b"GET /\r\n")
        elif case == "curve":
            bad = raw_peer(str(sock), CURVE_GREETING)
        elif case == "too-large":
            bad = raw_peer(str(sock), zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER"))
            bad.sendall(bytes((zmtp.LONG,)) + zmtp._LONG.pack(1 << 40))
        else:
            bad = raw_peer(str(sock), zmtp.GREETING_CLIENT + zmtp.encode([b"HB", b"{}"]))
        assert closed_by_peer(bad), f"the hub kept a {case} peer"
        bad.close()
        assert status_over(sock)["groups"]["g"]["workers"] == 1
        with s.client() as c:
            c.publish("photos", {"i": 1})
        wait_for(lambda: len(s.handled()) >= 1, 20, "an event after the bad peer")
        good.send_multipart([b"nothing-known", b"{}"])
        assert s.hub_proc is not None and s.hub_proc.poll() is None
    finally:
        good.close()


def test_a_peer_that_never_reads_does_not_block_the_hub(stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    """Status requests sent without ever reading the replies: the hub's writes to it stop at OUT_LIMIT (refused),
    and it serves the others meanwhile."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    s.start_worker("g", 1)
    hog = raw_peer(str(sock), zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"hog"))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    req = zmtp.encode([b"STATUS", b'{"req": 1}'])
    stop = threading.Event()

    def flood() -> None:
        hog.settimeout(0.5)
        while not stop.is_set():
            try:
                hog.sendall(req * 200)
            except (TimeoutError, OSError):
                if stop.is_set():
                    return

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        wait_for(lambda: s.metric("bucketwire_zmq_send_eagain_total", socket="work") > 0, 120,
                 "the hub refusing sends to the peer that does not read")
        for i in range(5):
            assert status_over(sock)["groups"]["g"]["workers"] == 1
            with s.client() as c:
                c.publish("photos", {"i": i})
        wait_for(lambda: len(s.handled()) >= 5, 20, "events while a peer does not read")
    finally:
        stop.set()
        t.join(5)
        hog.close()


def test_the_local_router_refuses_sends_past_out_limit_without_blocking(sock_dir: Path) -> None:
    path = str(sock_dir / "r.sock")
    router = LocalRouter(path, 1 << 20)
    ctx = zmq.Context()
    try:
        hog = raw_peer(path, zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"hog"))
        hog.sendall(zmtp.encode([b"hi"]))
        pump(router, lambda: router.has(b"hog"), "the hog admitted", got=[])
        chunk = b"x" * 65536
        sent = 0
        while router.send([b"hog", chunk]):
            sent += 1
            assert sent * len(chunk) <= zmtp.OUT_LIMIT + (8 << 20)  # and what the kernel's buffers took
        other = ctx.socket(zmq.DEALER)
        other.setsockopt(zmq.LINGER, 0)
        other.setsockopt(zmq.IDENTITY, b"other")
        other.connect(f"ipc://{path}")
        other.send(b"ping")
        got = pump(router, lambda: bool(got), "the other peer", got=(got := []))
        assert got == [[b"other", b"ping"]]
        assert router.send([b"other", b"pong"])
        pump(router, lambda: bool(other.poll(0)), "the reply to the other peer")
        assert other.recv_multipart() == [b"pong"]
        hog.close()
    finally:
        router.close()
        ctx.destroy(0)


# -- 7. another user -----------------------------------------------------------------------------------------------
NOBODY = 65534


def _as_nobody(path: str, act: Callable[[], int]) -> int:
    """Fork, become nobody, and return what `act` returns there as the child's exit code: 3 if it raised, 4 if
    nobody cannot even reach `path` (then the test would prove nothing)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                os.stat(path)
            except OSError:
                os._exit(4)
            code = act()
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)


def _as_nobody_connect(path: str) -> int:
    """Connect and speak as nobody: 0 refused at connect (file mode), 1 closed by the hub without a greeting, 2
    answered."""
    def act() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except PermissionError:
            return 0
        s.settimeout(10)
        try:
            s.sendall(zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"intruder") +
                      zmtp.encode([b"STATUS", b'{"req": 1}']))
            data = s.recv(1 << 16)
        except OSError:
            data = b""
        return 2 if data else 1
    return _as_nobody(path, act)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid() to another user")
def test_another_user_is_refused(stack_factory: Callable[..., Stack], public_dir: Path) -> None:
    sock = public_dir / "hub.sock"  # nobody may reach the file: only its mode and SO_PEERCRED stand in the way
    s = local_stack(stack_factory, sock)
    s.start_hub()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert _as_nobody_connect(str(sock)) == 0
    os.chmod(sock, 0o777)
    assert _as_nobody_connect(str(sock)) == 1
    wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="local", reason="protocol") >= 1, 10,
             "the refusal counted")
    assert "intruder" not in str(status_over(sock))
    assert s.hub_proc is not None and s.hub_proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid() to another user")
def test_a_hub_of_another_user_cannot_take_over_a_live_path(public_dir: Path) -> None:
    """Its probe of the path fails with EACCES, not ECONNREFUSED: the socket is live, not left by a dead process,
    and must not be unlinked (in a directory both may write, as a shared /run/bucketwire)."""
    public_dir.chmod(0o777)
    path = str(public_dir / "hub.sock")
    router = LocalRouter(path, 1 << 20)
    def take_over() -> int:
        try:
            zmtp.listen(path).close()
            return 1
        except OSError:
            return 0

    try:
        assert _as_nobody(path, take_over) == 0, "another user's hub took the path of a live one"
        assert os.stat(path).st_uid == 0
        d = LocalDealer(path, b"after")
        d.send_multipart([b"still here"])
        got = pump(router, lambda: d.readable() or bool(got), "a peer of the first hub", got=(got := []))
        assert got == [[b"after", b"still here"]]
        d.close()
    finally:
        router.close()


# -- 8. identities -------------------------------------------------------------------------------------------------
def test_a_second_local_peer_under_a_live_identity_is_refused(stack_factory: Callable[..., Stack],
                                                              sock_dir: Path) -> None:
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    first = raw_peer(str(sock), zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"twin"))
    twin = raw_peer(str(sock), zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"twin"))
    try:
        first.settimeout(10)
        assert first.recv(64)  # its greeting: it is in
        wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="local", reason="protocol") >= 1,
                 10, "the second peer refused")
        twin.settimeout(10)
        assert closed_by_peer(twin)
        # the first keeps its identity: its request is answered
        first.sendall(zmtp.encode([b"STATUS", b'{"req": 7}']))
        data = b""
        while b"STATUSR" not in data:
            chunk = first.recv(1 << 16)
            assert chunk, "the hub closed the first peer"
            data += chunk
    finally:
        first.close()
        twin.close()


def test_a_twin_that_reconnects_for_ever_is_not_a_log_line_each_time(stack_factory: Callable[..., Stack],
                                                                     sock_dir: Path) -> None:
    """A libzmq DEALER refused for a live identity reconnects every 100 ms (its reconnect_ivl), for as long as it
    runs: a warning per refusal was ten lines a second in the hub's log, without end. The refusals are counted
    in the metric, each one; the log says it once per 10 s (logs.PeerRateLimit) with how many it left out."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    s.start_hub()
    first = raw_peer(str(sock), zmtp.GREETING_CLIENT + zmtp.ready_command(b"DEALER", b"twin"))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    twin = ctx.socket(zmq.DEALER)
    twin.setsockopt(zmq.LINGER, 0)
    twin.setsockopt(zmq.IDENTITY, b"twin")
    twin.setsockopt(zmq.RECONNECT_IVL, 50)
    try:
        first.settimeout(10)
        assert first.recv(64)  # its greeting: it is in
        twin.connect(f"ipc://{sock}")
        wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="local", reason="protocol") >= 15,
                 30, "the twin refused again and again")
        log = s.logs[0].read_text()
        assert 1 <= log.count("local peer refused") <= 2, log[-3000:]
    finally:
        twin.close(0)
        ctx.destroy(0)
        first.close()


def check_named_next(router: LocalRouter, ctx: zmq.Context[Any], path: str) -> None:
    sly = LocalDealer(path, zmtp.LOCAL_IDENT + zmtp._U32.pack(router._n + 1))  # the next one it makes
    sly.send_multipart([b"sly"])
    got: list[list[bytes]] = []
    pump(router, lambda: sly.readable() or bool(got), "the sly peer", got=got)
    anon = ctx.socket(zmq.DEALER)
    anon.setsockopt(zmq.LINGER, 0)
    anon.connect(f"ipc://{path}")
    anon.send(b"anon")
    got2: list[list[bytes]] = []
    pump(router, lambda: bool(got2), "the anonymous peer", got=got2)
    assert got2[0][0] != got[0][0]
    assert router.send([got[0][0], b"for sly"])
    assert router.send([got2[0][0], b"for anon"])
    pump(router, lambda: bool(anon.poll(0)), "the anonymous peer's reply")
    assert anon.recv_multipart() == [b"for anon"]
    assert sly.recv_frames() == [b"for sly"]
    anon.close(0)
    sly.close()


def test_a_named_identity_cannot_take_an_anonymous_peers(sock_dir: Path) -> None:
    """A peer naming the identity the router will make next for an anonymous one: each keeps its own."""
    path = str(sock_dir / "r.sock")
    router = LocalRouter(path, 1 << 20)
    ctx = zmq.Context()
    try:
        for _ in range(2):
            check_named_next(router, ctx, path)
    finally:
        router.close()
        ctx.destroy(0)


def test_a_tcp_peer_cannot_speak_as_a_local_one(stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    with hub_and_local_peer(stack_factory, sock_dir, b"w-shared") as (s, local, ctx):
        local.send_multipart([b"STATUS", b'{"req": 1}'])
        assert local.poll(10_000), "no answer to the local peer"
        assert local.recv_frames()[0] == b"STATUSR"
        impostor = tcp_dealer(ctx, s, b"w-shared")
        impostor.send_multipart([b"STATUS", b'{"req": 2}'])
        impostor.send_multipart([b"ACK", b'{"req": 3}'])
        honest = tcp_dealer(ctx, s)  # sent after the impostor's, on the same tcp socket of the hub
        honest.send_multipart([b"STATUS", b'{"req": 4}'])
        assert honest.poll(10_000), "the hub did not answer a tcp peer"
        assert not impostor.poll(500)
        assert not local.poll(200), "the impostor's request was answered to the local peer"
        local.send_multipart([b"STATUS", b'{"req": 5}'])
        assert local.poll(10_000)


def test_a_tcp_peer_cannot_ack_a_local_workers_events(stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    with hub_and_local_peer(stack_factory, sock_dir, b"w-victim") as (s, victim, ctx):
        victim.send_multipart([b"READY", P.enc({"group": "g", "topics": ["photos", "follow"], "credit": 100,
                                                 "schema": SCHEMA_VERSION, "proto": 2})])
        wait_for(lambda: victim.readable() or s.status()["groups"]["g"]["workers"] == 1, 10, "the worker READY")
        with s.client() as c:
            c.publish_events([Event(id=new_event_id(), source="t", type="t", topic="photos", data={"i": i})
                              for i in range(3)])
        seqs: list[int] = []
        while len(seqs) < 3:
            assert victim.poll(10_000), f"only {seqs} delivered"
            frames = victim.recv_frames()
            if frames[0] == b"DELIVER":
                seqs += [int(P.header(b)["seq"]) for b in frames[2:]]
        impostor = tcp_dealer(ctx, s, b"w-victim")
        impostor.send_multipart([b"ACK", P.enc({"g": "g", "ok": {"photos": [[min(seqs), max(seqs)]]}})])
        with tcp_client(s) as c:  # sent after the impostor's ACK on the same hub socket: read after it
            assert c.status()["groups"]["g"]["inflight"] == 3
        assert s.status()["groups"]["g"]["lag"] == 3
        victim.send_multipart([b"ACK", P.enc({"g": "g", "ok": {"photos": [[min(seqs), max(seqs)]]}})])
        wait_for(lambda: s.status()["groups"]["g"]["inflight"] == 0, 10, "the worker's own ACK taken")


def test_with_curve_local_peers_work_and_a_keyed_tcp_peer_cannot_speak_as_one(
        stack_factory: Callable[..., Stack], sock_dir: Path, tmp_path: Path) -> None:
    """CURVE on the ZeroMQ endpoints: the local socket needs no key (the OS account admits), a key with a role
    does not limit it, and a tcp peer with a good key still cannot send under a local peer's identity."""
    d = tmp_path / "sec"
    make_keys(d, "hub", "admin", "limited")
    authorize(d, "admin")
    authorize(d, "limited")
    roles = '\n[security.roles.limited]\npublish = ["nothing"]\n'
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock, extra=security_toml(d, client="limited", roles=roles))
    s.start_hub()
    s.start_worker("g", 1)
    with s.client() as c:
        c.publish("photos", {"i": 0})  # the key named in the file has a role that may not: locally, it is not used
    wait_for(lambda: len(s.handled()) >= 1, 20, "an event over the local socket with CURVE on")
    local = LocalDealer(str(sock), b"w-shared")
    ctx = zmq.Context()
    try:
        local.send_multipart([b"STATUS", b'{"req": 1}'])
        assert local.poll(10_000) and local.recv_frames()[0] == b"STATUSR"
        admin = config_mod.load(s.cfg_path)
        admin.security.client_secret_key = d / "keys" / "admin.key_secret"
        impostor = tcp_dealer(ctx, s, b"w-shared", admin)
        impostor.send_multipart([b"STATUS", b'{"req": 2}'])
        honest = tcp_dealer(ctx, s, cfg=admin)
        honest.send_multipart([b"STATUS", b'{"req": 3}'])
        assert honest.poll(10_000), "the hub did not answer a keyed tcp peer"
        assert not impostor.poll(500)
        assert not local.poll(200), "the impostor's request was answered to the local peer"
    finally:
        local.close()
        ctx.destroy(0)


def test_a_local_request_does_not_change_who_tcp_peers_are(stack_factory: Callable[..., Stack],
                                                            sock_dir: Path) -> None:
    """Without CURVE: a tcp pool joined before anyone used the local socket still speaks for its own children
    after someone did (its RUNNING notices keep a child inside a long handler from being timed out and its event
    handed to another child: duplicate work)."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock, client_local=False)
    s.start_hub()
    s.start_worker("g", 2)  # over tcp
    assert status_over(sock)["groups"]["g"]["workers"] == 2  # a local peer was served
    hold = s.dir / "release"
    with s.client() as c:
        ev_id = c.publish("photos", {"hold": str(hold)})["id"]
    wait_for(lambda: s.status()["groups"]["g"]["inflight"] == 1, 20, "the event in a handler")
    time.sleep(3 * 1.5)  # pacing: three heartbeat timeouts of the hub with the handler running
    hold.touch()
    wait_for(lambda: any(e["id"] == ev_id for e in s.handled()), 60, "the event handled")
    wait_for(lambda: (g := s.status()["groups"]["g"])["inflight"] == 0 and g["lag"] == 0, 60, "everything acked")
    runs = [e for e in s.handled() if e["id"] == ev_id]
    assert len(runs) == 1, f"the event ran {len(runs)} times: {runs}"


# -- 9. the config value -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["tcp://127.0.0.1:5000", "ipc://", "/tmp/hub.sock", "ipc:///tmp/" + "a" * 120,
                                   "ipc:///proc/self/hub.sock", "ipc:///dev/null"])
def test_a_bad_local_value_is_one_config_line(stack_factory: Callable[..., Stack], sock_dir: Path,
                                              value: str) -> None:
    s = stack_factory()
    text = s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                          f'heartbeat_timeout = 1.5\nlocal = "{value}"\n', 1)
    s.cfg_path.write_text(text)
    r = bw(["hub"], s.cfg_path)
    assert r.returncode != 0
    line = one_line(r.stdout + r.stderr)
    assert "local" in line, line


@pytest.mark.parametrize("args", [["doctor", "--offline"], ["hub"], ["publish", "photos", "{}"], ["status"]])
def test_a_socket_path_too_long_is_one_config_line_from_every_command(sock_dir: Path, args: list[str]) -> None:
    """A `[hub] local` (and so `[client] work`) path over a Unix socket's 107 bytes: `doctor --offline` passed it,
    the hub stopped only at the bind (having made its directories), and a client tried it until its timeout,
    then said `AF_UNIX path too long`. The config says it, in one line naming the key, before anything starts."""
    sock = sock_dir / ("d" * 120) / "hub.sock"
    conf = sock_dir / "c.toml"
    conf.write_text(f'[hub]\nlocal = "ipc://{sock}"\n[client]\nwork = "ipc://{sock}"\ntimeout = 1\n')
    r = bw(args, conf)
    assert r.returncode != 0, r.stdout + r.stderr
    line = one_line(r.stdout + r.stderr)  # doctor's findings are its output
    assert "c.toml: [hub] local: the socket path" in line and f"is {len(str(sock))} bytes" in line, line
    assert not sock.parent.exists(), "the hub made the directories of a path it cannot bind"


def test_doctor_probes_the_local_socket(stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    """doctor checks an ipc:// `[client] work` like a tcp one: the hub not there is an error naming the socket and
    the setting to fix (it was 'not probed'), a hub there is `ROUTER socket answers`."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    out = bw(["doctor"], s.cfg_path)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ERROR [client] work = ipc://")), "")
    assert "cannot connect (No such file or directory)" in line and f'[hub] local = "ipc://{sock}"' in line, out.stdout
    s.start_hub()
    out = bw(["doctor"], s.cfg_path)
    assert f"ok    [client] work = ipc://{sock}: ROUTER socket answers" in out.stdout, out.stdout
    assert "not probed" not in out.stdout


def test_an_ack_larger_than_the_socket_takes_at_once_is_sent_whole_without_waiting(
        stack_factory: Callable[..., Stack], sock_dir: Path) -> None:
    """A child's ACK carrying ~600 KB of follow-ons does not fit the socket's buffer in one write. Its rest went
    out only when the child next woke for something else: with a 20 s heartbeat interval the event stayed in flight
    for up to 20 s. The child now waits for room to write as well as for messages."""
    sock = sock_dir / "hub.sock"
    s = local_stack(stack_factory, sock)
    text = s.cfg_path.read_text()
    text = re.sub(r"heartbeat_interval = [0-9.]+", "heartbeat_interval = 20.0", text)
    text = re.sub(r"heartbeat_timeout = [0-9.]+", "heartbeat_timeout = 60.0", text)
    s.cfg_path.write_text(text)
    s.start_hub()
    s.start_worker("g", 1)
    with s.client() as c:
        c.publish("photos", {"i": 0, "follow": 3, "follow_pad": 200_000})

    def acked() -> bool:
        g = s.status()["groups"]["g"]
        return bool(g["lag"] == 0 and g["inflight"] == 0)

    wait_for(lambda: len([e for e in s.handled() if e["t"] == "photos"]) == 1, 30, "the event handled")
    wait_for(acked, 8, "the event acked (its follow-ons committed) before the next heartbeat")
