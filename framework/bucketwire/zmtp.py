"""ZMTP 3.1 with the NULL mechanism over a Unix socket, spoken by bucketwire's own threads.

Why: every libzmq socket hands each message to and from a libzmq I/O thread. On the path of one event at a low
rate (publisher -> hub -> worker child) that is six thread wake-ups more than the path needs, and on a 2-core
machine each costs 10-60 µs (docs/performance.md, "the scheduler's view"). A Unix socket read and written by
the thread that uses it has none of them. The bytes on it are ZeroMQ's own `ipc://` transport (ZMTP 3.1, RFC
37, NULL mechanism), so a libzmq DEALER connects to a hub's local socket as it would to any ZeroMQ ROUTER, and
our DEALER to a libzmq ROUTER.

Who may connect is decided by the operating system: the socket file is made 0600 in a directory of ours, and a
peer whose credentials (SO_PEERCRED) are not this process's user is closed at once. The same account can read
the hub's state_dir (its server key included), so the local socket trusts no one the files did not already.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import zmq

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING_SERVER = SIGNATURE + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x01" + b"\x00" * 31
GREETING_CLIENT = SIGNATURE + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
MORE, LONG, COMMAND = 1, 2, 4
_LONG = struct.Struct(">Q")
_U32 = struct.Struct(">I")
LOCAL_IDENT = b"\x00\xff"
"""Prefix of the identities the hub makes for local peers that name none: 6 bytes, where libzmq's own are 5."""
READ_CHUNK = 1 << 16
"""Bytes asked of the socket per read: under glibc's mmap threshold (128 KiB). A 256 KiB recv() buffer is an mmap and
an munmap per read, 19 µs where a 64 KiB one takes 2.4 (a read per message at a low rate)."""
OUT_LIMIT = 64 << 20
"""Bytes a peer may have waiting to be written before sends to it are refused (ZeroMQ's high-water mark)."""


class ZmtpError(Exception):
    """The peer broke the protocol (or sent more than allowed): its connection is closed."""


def endpoint_path(endpoint: str) -> str | None:
    """The socket path of an `ipc://` endpoint, else None."""
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def ready_command(socket_type: bytes, identity: bytes = b"") -> bytes:
    body = b"\x05READY" + _prop(b"Socket-Type", socket_type) + _prop(b"Identity", identity)
    return _command(body)


def _prop(name: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + _U32.pack(len(value)) + value


def _command(body: bytes) -> bytes:
    if len(body) > 255:
        return bytes((COMMAND | LONG,)) + _LONG.pack(len(body)) + body
    return bytes((COMMAND, len(body))) + body


def encode(frames: list[bytes]) -> bytes:
    """One message as ZMTP frames."""
    out: list[bytes] = []
    last = len(frames) - 1
    for i, f in enumerate(frames):
        n = len(f)
        more = MORE if i < last else 0
        out.append(bytes((more, n)) if n < 256 else bytes((more | LONG,)) + _LONG.pack(n))
        out.append(f)
    return b"".join(out)


def parse_properties(body: bytes) -> dict[bytes, bytes]:
    props: dict[bytes, bytes] = {}
    i = 0
    while i < len(body):
        n = body[i]
        name = body[i + 1:i + 1 + n]
        i += 1 + n
        if i + 4 > len(body):
            raise ZmtpError("truncated property")
        (vlen,) = _U32.unpack_from(body, i)
        i += 4
        if i + vlen > len(body):
            raise ZmtpError("truncated property value")
        props[name.lower()] = body[i:i + vlen]
        i += vlen
    return props


class Stream:
    """One connection's bytes: the greeting and READY, then messages; what to write is buffered."""

    __slots__ = ("sock", "inbuf", "out", "held", "greeted", "peer", "frames", "size", "max_msg", "messages",
                 "watching", "drained")

    def __init__(self, sock: socket.socket, server: bool, socket_type: bytes, identity: bytes, max_msg: int) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray(GREETING_SERVER if server else GREETING_CLIENT)
        self.held: bytearray | None = bytearray(ready_command(socket_type, identity))
        """What waits for the peer's greeting: libzmq reads a greeting and what follows it in one read only when
        the greeting came first (sent together, the rest was never read)."""
        self.greeted = False
        self.peer: dict[bytes, bytes] | None = None
        self.frames: list[bytes] = []
        self.size = 0
        self.max_msg = max_msg
        self.messages: deque[list[bytes]] = deque()
        self.watching = False
        """The hub's epoll watches this connection for room to write (what waits did not all go)."""
        self.drained = False
        """The last read took less than READ_CHUNK, or found nothing: the socket held no more bytes then."""

    def read(self) -> bool:
        """Read what waits and parse it; False when the peer has closed."""
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            self.drained = True
            return True
        except OSError:
            return False
        if not data:
            return False
        self.drained = len(data) < READ_CHUNK
        buf = self.inbuf
        buf += data
        self._parse()
        return True

    def _parse(self) -> None:
        buf = self.inbuf
        i = 0
        n = len(buf)
        if not self.greeted:
            if (n and buf[0] != 0xFF) or (n >= 10 and not buf[9] & 1):  # as libzmq: refused on the first bytes,
                raise ZmtpError("not a ZMTP peer")  # not held open while it waits for 64 that never come
            if n < 64:
                return
            if buf[0] != 0xFF or not buf[9] & 1 or buf[10] < 3 or bytes(buf[12:32]).rstrip(b"\x00") != b"NULL":
                raise ZmtpError("not a ZMTP 3 peer with the NULL mechanism")
            self.greeted = True
            i = 64
            if self.held is not None:
                self.out += self.held
                self.held = None
        frames = self.frames
        while i + 2 <= n:
            flags = buf[i]
            if flags & LONG:
                if i + 9 > n:
                    break
                (size,) = _LONG.unpack_from(buf, i + 1)
                start = i + 9
            else:
                size = buf[i + 1]
                start = i + 2
            if flags & ~(MORE | LONG | COMMAND):
                raise ZmtpError("bad frame flags")
            if self.size + size > self.max_msg:
                raise ZmtpError(f"message over {self.max_msg} bytes")
            end = start + size
            if end > n:
                break
            body = bytes(buf[start:end])
            i = end
            if flags & COMMAND:
                self._command(body)
                continue
            if self.peer is None:
                raise ZmtpError("message before READY")
            frames.append(body)
            self.size += size
            if not flags & MORE:
                self.messages.append(frames)
                frames = self.frames = []
                self.size = 0
        if i:
            del buf[:i]

    def _command(self, body: bytes) -> None:
        if not body:
            raise ZmtpError("empty command")
        name = body[1:1 + body[0]]
        rest = body[1 + body[0]:]
        if name == b"READY":
            if self.peer is not None:
                raise ZmtpError("READY twice")
            self.peer = parse_properties(rest)
        elif name == b"PING":  # ZMTP 3.1 heartbeat: answered with the context it carries
            self.out += _command(b"\x04PONG" + rest[2:18])
        elif name == b"ERROR":
            raise ZmtpError("peer error: " + rest[1:1 + (rest[0] if rest else 0)].decode("utf-8", "replace"))
        # PONG and anything newer: ignored, as libzmq does

    def queue(self, data: bytes) -> None:
        if self.held is not None:
            self.held += data
        else:
            self.out += data

    def waiting(self) -> int:
        return len(self.out) + (len(self.held) if self.held is not None else 0)

    def flush(self) -> bool:
        """Write what waits; True when nothing is left."""
        out = self.out
        if not out:
            return True
        try:
            n = self.sock.send(out, socket.MSG_NOSIGNAL)  # as libzmq: EPIPE, not a SIGPIPE that may kill
        except BlockingIOError:
            return False
        except OSError:
            raise ZmtpError("connection lost") from None
        del out[:n]
        return not out


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def listen(path: str) -> socket.socket:
    """Bind `path` as a Unix socket only this user can open. A file left by a process that died is replaced; one a
    live process listens on is an EADDRINUSE."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(os.lstat(p).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            p.unlink()  # nobody listens: left by a process that died
        except PermissionError:  # live or not, another user's: never ours to remove
            raise OSError(errno.EACCES, f"{path} is another user's socket") from None
        else:
            raise OSError(errno.EADDRINUSE, "address already in use: a process listens on it (another hub?)")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(512)
    s.setblocking(False)
    return s


class Watcher(Protocol):
    """An epoll the owner of a `LocalRouter` waits on already (the hub loop's `LoopPoller`): the router's
    descriptors go there, so one wait covers them and the rest."""

    def watch(self, fd: int, events: int, handler: Callable[[int, int], object], owner: object) -> None: ...
    def serve_watched(self) -> None: ...
    def modify(self, fd: int, events: int) -> None: ...
    def forget(self, fd: int) -> None: ...


class _OwnEpoll:
    """The `Watcher` of a `LocalRouter` no loop waits on (tests, tools): an epoll of its own, which the router
    asks itself and whose `fileno()` its owner can poll."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int, int], object]] = {}

    def fileno(self) -> int:
        return self.ep.fileno()

    def watch(self, fd: int, events: int, handler: Callable[[int, int], object], owner: object) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, events)

    def serve_watched(self) -> None:
        for fd, ev in self.ep.poll(0):
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(fd, ev)

    def modify(self, fd: int, events: int) -> None:
        self.ep.modify(fd, events)

    def forget(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass

    def close(self) -> None:
        self.ep.close()


class LocalRouter:
    """The hub's side: a ROUTER on a Unix socket, read and written by the hub's loop thread itself.

    Its descriptors are registered with a `watcher`, the hub's `LoopPoller`, whose wait serves them (`handle`).
    Without one, the router keeps an epoll of its own: `fileno()`, readable when a peer connects, sends, or can
    take what waits for it. Messages come out of `receive` as a ROUTER's do, `[identity, *frames]`; the identity
    is the one the peer named in its READY, or one made here."""

    def __init__(self, path: str, max_msg: int, on_refused: Callable[[str], None] = lambda why: None,
                 watcher: Watcher | None = None) -> None:
        self.path = path
        self.max_msg = max_msg
        self.on_refused = on_refused
        self.lsock = listen(path)
        self._own: _OwnEpoll | None = None
        if watcher is None:
            watcher = self._own = _OwnEpoll()
        self.watcher = watcher
        self.by_fd: dict[int, Stream] = {}
        self.by_ident: dict[bytes, Stream] = {}
        self.ident_of: dict[int, bytes] = {}
        self.ready: deque[int] = deque()
        self.uid = os.geteuid()
        self._n = 0
        self.paused = 0.0
        """While accept() fails (out of descriptors): when to listen again."""
        self._taken = 0
        """Messages `receive` returned since the sockets were last read (see `_poll`)."""
        self.watcher.watch(self.lsock.fileno(), select.EPOLLIN, self.handle, self)

    def fileno(self) -> int:
        """The router's own epoll; -1 when the descriptors are a `watcher`'s."""
        return self._own.fileno() if self._own is not None else -1

    def close(self) -> None:
        for fd, st in list(self.by_fd.items()):
            self.watcher.forget(fd)
            st.sock.close()
        self.by_fd.clear()
        self.by_ident.clear()
        self.watcher.forget(self.lsock.fileno())
        if self._own is not None:
            self._own.close()
        self.lsock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def receive(self) -> list[bytes] | None:
        """The next message, `[identity, *frames]`, or None when none waits."""
        ready = self.ready
        while True:
            while ready:  # a message from each peer in turn, as a ROUTER fair-queues
                fd = ready.popleft()
                st = self.by_fd.get(fd)
                if st is not None and st.messages:
                    msg = st.messages.popleft()
                    if st.messages:
                        ready.append(fd)
                    self._taken += 1
                    return [self.ident_of[fd], *msg]
            if not self._poll():
                return None

    def _poll(self) -> bool:
        """Accept, read and write what the sockets allow now; True when a message was parsed.

        The hub loop's wait reads the sockets (`handle`) before each of its turns. A drain that has taken what
        that read asks again, without waiting: under load what came meanwhile joins the same commit (asking only
        after two or more messages, a PUB of 100 events being one, made 2.5 times the commits at saturation and
        cost 5-10 us per event). A drain that took nothing does not ask: the loop's wait has just answered. A
        router with an epoll of its own asks it every time: nothing else does."""
        if self.paused and time.monotonic() >= self.paused:
            self.paused = 0.0
            self.watcher.modify(self.lsock.fileno(), select.EPOLLIN)
        taken, self._taken = self._taken, 0
        if not taken and self._own is None:
            return False
        self.watcher.serve_watched()
        return bool(self.ready)

    def handle(self, fd: int, ev: int) -> bool:
        """Serve what epoll said of `fd`; True when a message was parsed."""
        if fd == self.lsock.fileno():
            try:
                self._accept()
            except Exception as e:  # a peer gone between accept and greeting: only it is lost
                self.on_refused(f"{type(e).__name__}: {e}")
            return False
        st = self.by_fd.get(fd)
        if st is None:
            return False
        try:
            if ev & select.EPOLLOUT:
                self._flush(fd, st)
            # A peer whose messages wait still is not read again: what one peer sends is buffered a read at a
            # time, whatever it floods, and every peer gets its turn (`receive`).
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not st.messages:
                if not st.read():
                    self._drop(fd)
                    return False
                if st.peer is not None and fd not in self.ident_of and not self._admit(fd, st):
                    return False
                if st.out:
                    self._flush(fd, st)
                if st.messages:
                    self.ready.append(fd)
                    return True
        except ZmtpError as e:
            self.on_refused(str(e))
            self._drop(fd)
        except Exception as e:  # nothing one peer sends may stop the hub's loop: that peer goes
            self.on_refused(f"{type(e).__name__}: {e}")
            self._drop(fd)
        return False

    def _accept(self) -> None:
        for _ in range(64):
            try:
                s, _ = self.lsock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of descriptors (EMFILE): stop listening for a second, not spin on it
                self.on_refused(f"cannot accept a local connection: {e.strerror or e}; trying again in 1 s")
                self.watcher.modify(self.lsock.fileno(), 0)
                self.paused = time.monotonic() + 1.0
                return
            try:
                uid = peer_uid(s)
            except OSError:
                s.close()
                continue
            if uid != self.uid:
                self.on_refused("a peer of another user connected to the local socket")
                s.close()
                continue
            s.setblocking(False)
            st = Stream(s, True, b"ROUTER", b"", self.max_msg)
            fd = s.fileno()
            self.by_fd[fd] = st
            self.watcher.watch(fd, select.EPOLLIN, self.handle, self)
            try:
                self._flush(fd, st)
            except ZmtpError:  # gone before its greeting went out (a probe: connect, close), as a hub's start does
                self._drop(fd)

    def _admit(self, fd: int, st: Stream) -> bool:
        assert st.peer is not None
        if st.peer.get(b"socket-type") not in (b"DEALER", b"REQ", b"ROUTER"):
            self.on_refused("a local peer that is not a DEALER")
            self._drop(fd)
            return False
        ident = st.peer.get(b"identity", b"")
        if not ident:
            while not ident or ident in self.by_ident:  # a peer may have named the one that comes next
                self._n += 1
                ident = LOCAL_IDENT + _U32.pack(self._n & 0xFFFFFFFF)
        elif ident in self.by_ident:  # ZeroMQ's rule: a second peer under a live identity is refused
            self.on_refused("a local peer named an identity already connected")
            self._drop(fd)
            return False
        self.ident_of[fd] = ident
        self.by_ident[ident] = st
        return True

    def _flush(self, fd: int, st: Stream) -> None:
        """Write what waits; watch for room only while some is left (an epoll_ctl per send was a syscall more on
        the path of every DELIVER)."""
        done = st.flush()
        if done == st.watching:
            st.watching = not done
            self.watcher.modify(fd, select.EPOLLIN if done else select.EPOLLIN | select.EPOLLOUT)

    def _drop(self, fd: int) -> None:
        st = self.by_fd.pop(fd, None)
        ident = self.ident_of.pop(fd, None)
        if ident is not None and self.by_ident.get(ident) is st:
            del self.by_ident[ident]
        if st is not None:
            self.watcher.forget(fd)
            st.sock.close()

    def has(self, ident: bytes) -> bool:
        return ident in self.by_ident

    def send(self, frames: list[bytes]) -> bool:
        """Route `frames[1:]` to the peer `frames[0]`; False when it is gone or has too much waiting."""
        st = self.by_ident.get(frames[0])
        if st is None:
            return False
        if st.waiting() > OUT_LIMIT:
            return False
        was = bool(st.out)
        st.queue(encode(frames[1:]))
        if not was:
            fd = st.sock.fileno()
            try:
                self._flush(fd, st)
            except ZmtpError:
                self._drop(fd)
                return False
        return True


class LocalDealer:
    """A DEALER on a Unix socket, read and written by the thread that uses it (a worker child, a publisher).

    It offers what those use of a ZeroMQ socket: `send_multipart`, `recv_frames` (`recv_multipart`),
    `readable`, `poll`, `fileno` (for a zmq.Poller, which then reports the descriptor) and `close`. Like a
    ZeroMQ DEALER with ZMQ_IMMEDIATE it reconnects by itself (the hub restarted) and refuses a send with
    zmq.Again while it has no connection; unlike one, a message is never queued for a peer not yet there."""

    RECONNECT = 0.1

    def __init__(self, path: str, identity: bytes = b"", max_msg: int = 1 << 30, linger_ms: int = 0) -> None:
        self.path = path
        self.identity = identity
        self.max_msg = max_msg
        self.linger_ms = linger_ms
        self._idle: socket.socket | None = None
        self.sock = self._placeholder()
        self.st: Stream | None = None
        self.error: str | None = None
        """Why the last connection attempt failed (no such file, refused: no hub there), for an error line."""
        self._tried = -1e9
        self._connect()

    def _connect(self) -> None:
        self._tried = time.monotonic()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            self.error = e.strerror or str(e)
            return
        self.error = None
        sock.setblocking(False)
        self._replace(sock)
        self.st = Stream(self.sock, False, b"DEALER", self.identity, self.max_msg)
        try:
            self.st.flush()
        except ZmtpError:
            self.st = None

    def _replace(self, sock: socket.socket) -> None:
        """Put `sock` under our descriptor: a poller it is registered with keeps watching the right socket across
        reconnections (a lost connection polls readable for ever, a fresh socket not at all)."""
        os.dup2(sock.fileno(), self.sock.fileno())
        sock.close()

    def _placeholder(self) -> socket.socket:
        """What stands under our descriptor while there is no connection: one end of a pair whose other end we
        keep, so it polls neither readable nor hung up. (An unconnected socket polls hung up at once, for ever: a
        worker child polling it spun a core while the hub was down.)"""
        if self._idle is not None:
            self._idle.close()
        sock, self._idle = socket.socketpair()
        return sock

    def _lost(self) -> None:
        self.st = None
        self._replace(self._placeholder())

    def _stream(self) -> Stream | None:
        if self.st is None and time.monotonic() - self._tried >= self.RECONNECT:
            self._connect()
        return self.st

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Whether bytes wait to be written: a poller should then wait for room too (`readable` writes them)."""
        st = self.st
        return st is not None and bool(st.out)

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        st = self._stream()
        if st is None or st.waiting() > OUT_LIMIT:
            raise zmq.Again()
        st.queue(encode(frames))
        try:
            if not st.flush() and not flags & zmq.NOBLOCK:
                while not st.flush():
                    select.select([], [self.sock], [], 1.0)
        except ZmtpError:
            self._lost()
            raise zmq.Again() from None

    def readable(self) -> bool:
        st = self._stream()
        if st is None:
            return False
        if st.messages:
            return True
        try:
            if st.out:
                st.flush()
            if not st.read():
                self._lost()
                return False
            if st.out:  # the READY and what was sent before the greeting came
                st.flush()
        except ZmtpError:
            self._lost()
            return False
        return bool(st.messages)

    def more(self) -> bool:
        """`readable`, for a reader that has just taken a message: one already parsed, or more bytes may wait
        because the last read filled its chunk. After a shorter read the socket was empty: asking again is a
        `recv` that fails (~15 µs on a CPU that has just woken, before the handler at a modest rate), and what
        comes later the next poll sees."""
        st = self.st
        if st is None:
            return False
        if st.messages:
            return True
        return not st.drained and self.readable()

    def recv_frames(self, flags: int = 0) -> list[bytes]:
        """The next message; without NOBLOCK it waits for one (for ever, like ZeroMQ's)."""
        if not self.readable() and (flags & zmq.NOBLOCK or not self.poll(-1)):
            raise zmq.Again()
        assert self.st is not None
        return self.st.messages.popleft()

    def recv_ready(self) -> list[bytes]:
        """The next message, which the poll has just said waits: raises zmq.Again when it has not all come yet
        (a ZeroMQ socket only polls readable with a whole message; a byte stream does with its first bytes)."""
        return self.recv_frames(zmq.NOBLOCK)

    recv_multipart = recv_frames

    def poll(self, timeout_ms: int = -1) -> bool:
        end = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            if self.readable():
                return True
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            st = self.st
            if st is None:
                time.sleep(min(self.RECONNECT, left) if left is not None else self.RECONNECT)
                continue
            select.select([self.sock], [self.sock] if st.out else [], [], left)

    def close(self, linger: int | None = None) -> None:
        st = self.st
        end = time.monotonic() + (self.linger_ms if linger is None else linger) / 1000
        try:
            while st is not None and (st.out or st.held) and time.monotonic() < end:
                if st.held is not None and not st.read():  # no greeting yet: it lets the READY and the rest go
                    break
                if st.flush() and st.held is None:
                    break
                select.select([self.sock], [self.sock], [], 0.05)
        except ZmtpError:
            pass
        self.sock.close()
        if self._idle is not None:
            self._idle.close()
            self._idle = None
        self.st = None


def dealer(endpoint: str, identity: bytes = b"", linger_ms: int = 0) -> LocalDealer | None:
    """Our own DEALER for an `ipc://` endpoint (none of libzmq's threads), else None: use a ZeroMQ one."""
    path = endpoint_path(endpoint)
    return None if path is None else LocalDealer(path, identity, linger_ms=linger_ms)
