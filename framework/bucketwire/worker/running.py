"""What a worker child is running right now, in a few hundred bytes of memory its supervisor also maps.

A child that dies in a handler (os.abort(), a segfault in a C extension, the OOM killer) cannot say which event
killed it. Its supervisor can: it reads here which event's handler was running and tells the hub, which charges
that one event an attempt and gives every other event the child held back uncharged. The supervisor also reads
here when a handler passes its `handler_timeout`, and the child's heartbeat says what it is stuck on. Recording an
event costs two small writes into this memory and no message, so the hot path gains no round trip.

Layout: a generation counter (odd while a write is under way, so a reader never trusts a half-written record),
the running event's seq (0 = none), its start (time.monotonic(), one clock for every process of the host), its
timeout and topic; then, written by the child's I/O thread, the identity its DEALER has on the hub; then a note
the child leaves for its supervisor as it ends: why its plugins' `worker_startup` failed (worker/startup_failures.py).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnContext
from typing import Any

_HEAD = struct.Struct("<QqddH")  # generation, seq, started, timeout, topic length
_GEN = struct.Struct("<Q")
_END = struct.Struct("<Qq")  # generation, seq
TOPIC_MAX = 1024
IDENT_MAX = 64
_IDENT_AT = _HEAD.size + TOPIC_MAX
_NOTE_LEN = struct.Struct("<I")
_NOTE_AT = _IDENT_AT + 1 + IDENT_MAX
NOTE_MAX = 12 << 10
SIZE = _NOTE_AT + _NOTE_LEN.size + NOTE_MAX
_pack_head, _pack_gen, _pack_end = _HEAD.pack_into, _GEN.pack_into, _END.pack_into  # bound once: per event


@dataclass(frozen=True, slots=True)
class Running:
    topic: str
    seq: int
    started: float  # time.monotonic() of the host
    timeout: float

    @property
    def deadline(self) -> float:
        return self.started + self.timeout


class RunningSlot:
    """One child's record. The child writes it (`begin`/`end` from the handler thread, `set_ident` from the I/O
    thread); the supervisor and the child's I/O thread read it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw  # a multiprocessing RawArray, or a bytearray when no supervisor shares it
        self._buf = memoryview(raw).cast("B")
        self._gen = _GEN.unpack_from(self._buf, 0)[0] & ~1
        self._topic = ""
        self._topic_len = 0

    @classmethod
    def shared(cls, ctx: SpawnContext) -> RunningSlot:
        """A slot in memory that survives the child and is passed to it at spawn."""
        return cls(ctx.RawArray("B", SIZE))

    @classmethod
    def private(cls) -> RunningSlot:
        return cls(bytearray(SIZE))

    def reset(self) -> None:
        """Before a new child takes the slot: nothing running, no identity."""
        self._buf[:] = bytes(SIZE)
        self._gen = 0
        self._topic = ""
        self._topic_len = 0

    def begin(self, topic: str, seq: int, timeout: float, started: float | None = None) -> None:
        """`started`: the time.monotonic() its caller has just read (the child's loop reads the clock once per
        event), else read here."""
        # Hot path (once per event): the odd generation goes out with the record in one write, the topic bytes
        # only when the topic changes, then the even generation says the record is whole.
        if topic != self._topic:
            t = topic.encode()
            if len(t) > TOPIC_MAX or seq <= 0:
                return  # cannot be named to the hub: recorded as nothing running (the hub then charges nothing)
            _HEAD.pack_into(self._buf, 0, self._gen + 1, 0, 0.0, 0.0, len(t))
            self._buf[_HEAD.size:_HEAD.size + len(t)] = t
            self._topic, self._topic_len = topic, len(t)
        gen, buf = self._gen + 1, self._buf
        _pack_head(buf, 0, gen, seq, time.monotonic() if started is None else started, timeout, self._topic_len)
        self._gen = gen = gen + 1
        _pack_gen(buf, 0, gen)

    def end(self) -> None:
        self._gen = gen = self._gen + 2
        _pack_end(self._buf, 0, gen, 0)  # seq 0: nothing running, whatever else a reader sees

    def read(self) -> Running | None:
        """The running event, or None when nothing runs or the record is mid-write (a child that dies mid-write
        was between events)."""
        g1, seq, started, timeout, n = _HEAD.unpack_from(self._buf, 0)
        if g1 & 1 or seq <= 0:
            return None
        topic = bytes(self._buf[_HEAD.size:_HEAD.size + n]).decode(errors="replace")
        if _GEN.unpack_from(self._buf, 0)[0] != g1:
            return None  # rewritten while we read: a new event started, this one is over
        return Running(topic, seq, started, timeout)

    def set_ident(self, ident: bytes) -> None:
        ident = ident[:IDENT_MAX]
        self._buf[_IDENT_AT + 1:_IDENT_AT + 1 + len(ident)] = ident
        self._buf[_IDENT_AT] = len(ident)

    def ident(self) -> bytes:
        n = self._buf[_IDENT_AT]
        return bytes(self._buf[_IDENT_AT + 1:_IDENT_AT + 1 + n])

    def set_note(self, note: bytes) -> None:
        """Leave `note` (at most NOTE_MAX bytes: the rest is cut) for the supervisor to read once this child ended."""
        note = note[:NOTE_MAX]
        start = _NOTE_AT + _NOTE_LEN.size
        self._buf[start:start + len(note)] = note
        _NOTE_LEN.pack_into(self._buf, _NOTE_AT, len(note))

    def note(self) -> bytes:
        n = min(_NOTE_LEN.unpack_from(self._buf, _NOTE_AT)[0], NOTE_MAX)
        start = _NOTE_AT + _NOTE_LEN.size
        return bytes(self._buf[start:start + n])
