"""The hub loop's one epoll (hub/poller.py): ZeroMQ sockets by their descriptor, plain descriptors, watched ones.

A ZeroMQ socket's descriptor only says that its events may have changed, and an operation on the socket takes in
what changed without it saying so again: these tests pin that down with a real libzmq, and that `touched` makes
the poller ask such a socket before it waits (a message left unseen would wait for the next timer).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bucketwire.hub.poller import LoopPoller
from bucketwire.zmqio import readable


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"d1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield router, dealer
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def _fd_fires(sock: zmq.Socket[bytes], timeout: float = 5.0) -> bool:
    r, _, _ = select.select([int(sock.getsockopt(zmq.FD))], [], [], timeout)
    return bool(r)


def test_a_message_wakes_the_poll_and_names_its_socket(pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    p = LoopPoller()
    p.register(router)
    p.poll(0)  # the socket is asked once when registered: nothing waits yet
    dealer.send(b"hello")
    deadline = time.monotonic() + 5
    got: dict[object, int] = {}
    while router not in got and time.monotonic() < deadline:
        got = p.poll(1000)
    assert got.get(router) == zmq.POLLIN
    assert router.recv_multipart(zmq.NOBLOCK) == [b"d1", b"hello"]
    p.touched(router)
    assert p.poll(50) == {}  # drained: asked before the wait, and nothing more arrives
    p.close()


def test_a_socket_used_since_the_last_wait_is_asked_before_the_next(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    """The case `touched` exists for: a message whose arrival another operation took in (here asking the events,
    as a send or a receive would) leaves the descriptor quiet. Unasked, the poll would sleep past it."""
    router, dealer = pair
    p = LoopPoller()
    p.register(router)
    p.poll(0)
    dealer.send(b"first")
    assert _fd_fires(router)
    assert readable(router)  # the loop used the socket: libzmq took the news in, the descriptor is reset
    assert not _fd_fires(router, 0.2), "libzmq's descriptor signals again: the premise of `touched` changed"
    assert p.poll(200) == {}, "without being told, the poller cannot know"  # the stranded message
    p.touched(router)
    assert p.poll(5000).get(router) == zmq.POLLIN
    assert router.recv_multipart(zmq.NOBLOCK) == [b"d1", b"first"]
    p.close()


def test_plain_and_watched_descriptors() -> None:
    p = LoopPoller()
    r, w = os.pipe()
    r2, w2 = os.pipe()
    seen: list[tuple[int, int]] = []
    owner = object()
    try:
        p.register(r)
        p.watch(r2, select.EPOLLIN, lambda fd, ev: seen.append((fd, ev)), owner)
        assert p.poll(0) == {}
        os.write(w, b"x")
        assert p.poll(1000) == {r: zmq.POLLIN}
        os.read(r, 1)
        os.write(w2, b"y")
        assert p.poll(1000) == {owner: zmq.POLLIN}
        assert seen == [(r2, select.EPOLLIN)]
        p.forget(r2)
        p.unregister(r)
        os.write(w, b"x")
        assert p.poll(50) == {}  # neither is watched any more
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)
        p.close()


def test_an_unregistered_socket_is_not_reported(pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    p = LoopPoller()
    p.register(router)
    p.unregister(router)
    dealer.send(b"x")
    assert _fd_fires(router)
    assert p.poll(100) == {}
    p.close()


def test_the_local_router_in_the_loops_epoll(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the loop's poller as its watcher: the poll reads a peer's messages and names the router; a drain that
    has taken them asks again without waiting, so what came meanwhile joins it (the same commit, under load); a
    flooding peer does not keep a quiet one waiting."""
    import tempfile

    from bucketwire.zmtp import LocalRouter

    path = os.path.join(tempfile.mkdtemp(prefix="bwp-", dir="/tmp"), "r.sock")
    p = LoopPoller()
    router = LocalRouter(path, 1 << 20, watcher=p)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        assert router.fileno() == -1
        a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for s, name in ((a, b"a"), (b, b"b")):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, name)
            s.connect(f"ipc://{path}")

        a.send(b"one")
        first = None
        deadline = time.monotonic() + 5
        while first is None and time.monotonic() < deadline:  # the accept and the greeting come first
            if router in p.poll(1000):
                first = router.receive()
        assert first == [b"a", b"one"]
        a.send(b"two")  # arrives after the loop's poll, while the drain that took "one" goes on
        assert select.select([p.ep.fileno()], [], [], 5)[0], "the second message never came"
        assert router.receive() == [b"a", b"two"], "the drain did not ask for what came meanwhile"
        assert router.receive() is None
        for i in range(200):
            a.send(b"flood %d" % i)
        b.send(b"quiet")
        time.sleep(0.2)
        seen: list[list[bytes]] = []
        deadline = time.monotonic() + 5
        while [b"b", b"quiet"] not in seen and time.monotonic() < deadline:
            p.poll(100)
            for _ in range(20):  # a turn's share (MAX_DRAIN in the hub)
                m = router.receive()
                if m is None:
                    break
                seen.append(m)
        assert [b"b", b"quiet"] in seen
        assert seen.index([b"b", b"quiet"]) < 40, "the quiet peer waited behind the flood"
    finally:
        router.close()
        ctx.destroy(0)
        p.close()


def test_the_hubs_listeners_say_when_they_used_a_socket(tmp_path: Path) -> None:
    """Through the hub's own `Listeners`: a reply sent on the work socket takes in the arrival of the next
    message (libzmq processes its commands on a send); the loop's poll must still report it."""
    from bucketwire import config as config_mod
    from bucketwire.hub.listeners import Listeners
    from bucketwire.hub.metrics import HubMetrics
    from bucketwire.procutil import free_port

    work, pub = free_port(), free_port()
    cfg = config_mod.parse({"hub": {"work": f"tcp://127.0.0.1:{work}", "publish": f"tcp://127.0.0.1:{pub}",
                                    "http": f"127.0.0.1:{free_port()}", "state_dir": str(tmp_path / "state")}})
    net = Listeners(cfg, HubMetrics(), lambda ident: None)
    net.open()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.IDENTITY, b"peer")
    d.connect(f"tcp://127.0.0.1:{work}")
    try:
        d.send_multipart([b"first"])
        deadline = time.monotonic() + 5
        while net.work not in net.poller.poll(1000) and time.monotonic() < deadline:
            pass
        assert net.receive(net.work, True) == [b"peer", b"first"]
        net.poller.poll(0)  # the turn ends: nothing more waits
        d.send_multipart([b"second"])
        assert _fd_fires(net.work)
        assert net.send([b"peer", b"reply"])  # libzmq takes in "second" here: the descriptor goes quiet
        assert net.poller.poll(2000).get(net.work) == zmq.POLLIN, "a message left unseen after a send"
        assert net.receive(net.work, True) == [b"peer", b"second"]
    finally:
        d.close(0)
        ctx.term()
        net.close()
