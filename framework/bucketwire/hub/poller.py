"""The hub loop's one epoll: its ZeroMQ sockets (by their ZMQ_FD), its own descriptors and the local socket's
connections, waited on with a single system call.

`zmq.Poller` (libzmq's `zmq_poll`) cost each turn of the loop ten system calls where one does: a first `poll`
with no wait, then for every ZeroMQ socket a `getpid` and a `poll` of its mailbox to ask its events, then the
real `poll`, then the events again, and then the local socket's own `epoll_wait`. On a thread that has just
woken those calls are several µs each, on the path of every event (docs/performance.md, change 15).

A ZeroMQ socket's descriptor only says that its events may have changed, and any operation on the socket (a
send, a receive, asking its events) may take in what changed without the descriptor saying so again. So a
socket that was used since the last wait (`touched`) is asked for its events before the next wait, and one
whose descriptor fired is asked after it; a socket nobody used and whose descriptor is quiet is not asked at
all. That is the whole saving where the peers are local: the hub's TCP sockets then sit untouched.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import zmq

from bucketwire.zmqio import readable

POLLIN = int(zmq.POLLIN)

FdHandler = Callable[[int, int], object]
"""Called with (descriptor, epoll events) for a descriptor `watch` registered, from inside `poll`."""


class LoopPoller:
    """What the hub's loop waits on. `poll` answers like `zmq.Poller.poll` (the objects given to `register`,
    with the events they have), plus `owner` for a descriptor registered by `watch` once its handler ran."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self._objs: dict[int, Any] = {}
        """descriptor -> what was registered (a ZeroMQ socket, or the descriptor itself)"""
        self._zmq: dict[int, zmq.Socket[bytes]] = {}
        self._watched: dict[int, tuple[FdHandler, object]] = {}
        self._touched: set[zmq.Socket[bytes]] = set()

    def close(self) -> None:
        self.ep.close()

    def register(self, obj: zmq.Socket[bytes] | int, flags: int = POLLIN) -> None:
        if isinstance(obj, zmq.Socket):
            fd = int(obj.getsockopt(zmq.FD))
            self._zmq[fd] = obj
            self._touched.add(obj)  # new here: what it holds already is not signalled again
            self.ep.register(fd, select.EPOLLIN)
        else:
            fd = obj
            self.ep.register(fd, _epoll_events(flags))
        self._objs[fd] = obj

    def unregister(self, obj: zmq.Socket[bytes] | int) -> None:
        fd = next((f for f, o in self._objs.items() if o is obj), None)
        if fd is None:
            return
        del self._objs[fd]
        self._zmq.pop(fd, None)
        if isinstance(obj, zmq.Socket):
            self._touched.discard(obj)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):  # closed already
            pass

    def watch(self, fd: int, events: int, handler: FdHandler, owner: object) -> None:
        """Register a descriptor served by `handler` (the local socket's): `poll` runs it and reports `owner`."""
        self._watched[fd] = (handler, owner)
        self.ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.ep.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed)."""
        if self._watched.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def serve_watched(self) -> None:
        """Run the handlers of the watched descriptors that are ready now, without waiting. The rest is left: the
        epoll is level-triggered, and the next `poll` reports it again."""
        watched = self._watched
        for fd, ev in self.ep.poll(0):
            w = watched.get(fd)
            if w is not None:
                w[0](fd, ev)

    def touched(self, sock: zmq.Socket[bytes]) -> None:
        """`sock` was used (sent on, read, asked): ask it for its events before the next wait."""
        self._touched.add(sock)

    def poll(self, timeout_ms: int | None = None) -> dict[Any, int]:
        """Wait up to `timeout_ms` (None: for good) for a registered object to have something, and say which."""
        ready: dict[Any, int] = {}
        if self._touched:
            for sock in self._touched:
                if readable(sock):
                    ready[sock] = POLLIN
            self._touched.clear()
        timeout = 0.0 if ready else (-1.0 if timeout_ms is None or timeout_ms < 0 else timeout_ms / 1000)
        for fd, ev in self.ep.poll(timeout):
            obj = self._objs.get(fd)
            if obj is None:
                w = self._watched.get(fd)
                if w is not None:
                    w[0](fd, ev)
                    ready[w[1]] = POLLIN
                continue
            zsock = self._zmq.get(fd)
            if zsock is None:
                ready[obj] = _zmq_events(ev)
            elif readable(zsock):  # the descriptor fired: asking the events takes in what changed
                ready[zsock] = POLLIN
        return ready


def _epoll_events(flags: int) -> int:
    out = 0
    if flags & zmq.POLLIN:
        out |= select.EPOLLIN
    if flags & zmq.POLLOUT:
        out |= select.EPOLLOUT
    return out


def _zmq_events(ev: int) -> int:
    out = 0
    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
        out |= POLLIN
    if ev & select.EPOLLOUT:
        out |= int(zmq.POLLOUT)
    return out
