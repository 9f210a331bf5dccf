"""Frames on the hub's ROUTER `work` endpoint.

Every message a peer sends is `[COMMAND, json-header, *payload-frames]` (the ROUTER prepends the peer identity).
JSON headers keep the protocol debuggable with any ZeroMQ client; envelopes travel as their own frames so the
hub forwards committed bytes without re-encoding them.

    worker -> hub   READY     {"group", "topics", "credit", "proto", "schema", "host", "pid"}
                    ACK       {"results": [{"t": topic, "s": seq, "ok": true, "f": [follow-on envelope]} |
                                           {"t", "s", "ok": false, "error", "line", "plugin", "permanent",
                                            "delay"?}]}   (delay: seconds, from a plugin's Retry(delay=...))
                    HB        {} | {"run": [topic, seq, age, timeout]}  (a handler running for an interval or
                                                               more: which event, how long, its handler_timeout)
                    BYE       {"requeue": [[topic, seq], ...]}     (draining: give back unstarted events)
    supervisor -> hub
                    GONE      {"g": group, "w": worker identity (hex), "running": [topic, seq] | null, "reason"}
                              a worker child died (crash, or killed past handler_timeout): the hub charges the
                              `running` event one attempt with `reason` and gives the child's other events back
                              uncharged. Sent with the same key as the child's READY, once per death.
    hub -> worker   DELIVER   {"a": [attempt, ...]}, envelope, envelope, ...
                    HB        {}
                    ERR       {"error", "fatal"}
    client -> hub   PUB       {"req", "events": [envelope dict, ...]}  -> PUBACK {"req", "results"} | PUBNACK
                    FETCH     {"req", "topic", "from", "limit"}        -> EVENTS {"req","topic","head","next"}, env...
                    STATUS    {"req"}                                  -> STATUSR {...}
                    REPLAY    {"req", "group", "topics"?, "from_seq" | "since"}
                                                               -> REPLAYR {"req", "group", "topics"} | {"error"}
                    DLQ       {"req", "action": "retry"|"purge", "items": [{"topic", "seq"}], "by"}
                                                               -> DLQR {"req", "results": [{"id", ...} | {"error"}]}
                    GROUPRM   {"req", "group"}           -> GROUPRMR {"req", "group", "topics", "lag"} | {"error"}
"""

from __future__ import annotations

import json
from typing import Any

from bucketwire.envelope import dumps

PROTO = 1

READY = b"READY"
ACK = b"ACK"
HB = b"HB"
BYE = b"BYE"
GONE = b"GONE"
DELIVER = b"DELIVER"
ERR = b"ERR"
PUB = b"PUB"
PUBACK = b"PUBACK"
PUBNACK = b"PUBNACK"
FETCH = b"FETCH"
EVENTS = b"EVENTS"
STATUS = b"STATUS"
STATUSR = b"STATUSR"
REPLAY = b"REPLAY"
REPLAYR = b"REPLAYR"
DLQ = b"DLQ"
DLQR = b"DLQR"
GROUPRM = b"GROUPRM"
GROUPRMR = b"GROUPRMR"


HEARTBEAT_FRAME = b""
"""On the PUB socket a heartbeat is `[topic, head-seq, b""]`: an empty envelope frame."""

TOPIC_END = b"\0"


def topic_frame(topic: str) -> bytes:
    """The PUB topic frame: the name and a NUL. ZeroMQ subscriptions are prefix matches, so without the
    terminator a subscriber to "a" would also receive "ab" (and a role allowing "a" would leak "ab")."""
    return topic.encode() + TOPIC_END


def topic_of(frame: bytes) -> str:
    return frame[:-1].decode() if frame.endswith(TOPIC_END) else frame.decode()


class ProtocolError(ValueError):
    """A frame sequence that does not follow the protocol; counted and answered with ERR, never fatal."""


def header(frame: bytes, max_len: int = 64 << 20) -> dict[str, Any]:
    if len(frame) > max_len:
        raise ProtocolError("header frame too large")
    try:
        h = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header frame is not JSON") from None
    if not isinstance(h, dict):
        raise ProtocolError("header frame is not a JSON object")
    return h


def enc(obj: Any) -> bytes:
    return dumps(obj)
