"""Asking libzmq straight, for the hub's loop and the worker child: is a message waiting, and receiving it.

pyzmq's `recv_multipart` asks for RCVMORE through its Python option layer (an enum per frame, its own checks)
and costs more than the receive itself; on a thread that has just woken, once per event, that is several µs
on the path between a publish and its handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import zmq
from zmq import backend as zmq_backend

_recv = cast(Callable[[Any, int], bytes], zmq_backend.Socket.recv)
_get = cast(Callable[[Any, int], int], zmq_backend.Socket.get)
_NOBLOCK, _RCVMORE, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)


def readable(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message waits on `sock`. Read through libzmq's own getter: pyzmq's wraps EVENTS in an enum,
    and the hub asks its sockets on every loop turn."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Every frame of the next message, as bytes; raises zmq.Again when none waits."""
    frames = [_recv(sock, _NOBLOCK)]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, _NOBLOCK))
    return frames
