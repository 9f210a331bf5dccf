"""Frames on the hub's ROUTER `work` endpoint.

Every message a peer sends is `[COMMAND, json-header, *payload-frames]` (the ROUTER prepends the peer identity).
JSON headers keep the protocol debuggable with any ZeroMQ client; envelopes travel as their own frames so the
hub forwards committed bytes without re-encoding them. Each header is a schema below (a msgspec Struct that
refuses unknown fields), decoded and checked by `decode` in one C pass; the sketch here is the overview.

    worker -> hub   READY     {"group", "topics", "credit", "proto", "schema", "host", "pid", "start"}
                    ACK       {"g": group, "results": [{"t": topic, "s": seq, "ok": true, "f": [follow-on envelope]} |
                                           {"t", "s", "ok": false, "error", "line", "plugin", "permanent",
                                            "delay"?}],   (delay: seconds, from a plugin's Retry(delay=...))
                               "ok"?: {topic: [[first seq, last seq], ...]}}
                              `ok` (proto 2, only to a hub whose DELIVER carried "r": true): events handled
                              without error or follow-on, as ranges (both ends included, at most MAX_CREDIT
                              events per ACK); either key may be absent
                    HB        {} | {"run": [topic, seq, age, timeout]}  (a handler running for an interval or
                                                               more: which event, how long, its handler_timeout)
                    BYE       {"requeue": [[topic, seq], ...], "refused"?: true}  (leaving: every event it holds
                              goes back uncharged, except, with "refused", the earliest batch outside `requeue`:
                              the DELIVER it could not read, charged one attempt)
    supervisor -> hub
                    GONE      {"g": group, "w": worker identity (hex), "running": [topic, seq] | null, "reason"}
                              a worker child died (crash, or killed past handler_timeout): the hub charges the
                              `running` event one attempt with `reason` and gives the child's other events back
                              uncharged. Sent with the same key as the child's READY, once per death.
                    RUNNING   {"g": group, "w": worker identity (hex), "run": [topic, seq, age, timeout]}
                              a child's one thread is inside a handler (for half a heartbeat interval or more):
                              the supervisor heartbeats for it, so the hub keeps it and shows it as long running.
                              To a hub that does not know that identity (the child's hub died or lost the group)
                              it is a report: that hub holds the event for it (hub/reports.py). Sent to every
                              hub of [client] work, as GONE is.
                              | {"g", "w", "ended": [topic, seq]}  that handler has ended (the child lives on)
                    STARTFAIL {"g": group, "host", "pid": the supervisor's, "plugin", "line", "count", "retry_in"}
                              the pool's children cannot start: that plugin's worker_startup raised `line`, `count`
                              times in a row; count 0: it has started since. Shown by `status` (hub/startfail.py).
                              Sent to every hub of [client] work, as GONE is.
    hub -> worker   DELIVER   {"a": [attempt, ...], "r"?: true}, envelope, envelope, ...
                              ("r": this hub reads ACK ranges; sent only to a worker whose READY said proto >= 2)
                              | {"a": [attempt, ...], "r": true, "j": true}, [envelope,envelope,...]
                              ("j", proto 3: the batch's envelopes travel as ONE frame, a JSON array of them,
                              each exactly as committed; len(a) of them)
                    HB        {}
                    ERR       {"error", "fatal", "reready"}
    client -> hub   PUB       {"req", "events": [envelope dict, ...]}  -> PUBACK {"req", "results"} | PUBNACK
                                                               {"req", "error", "retry", "too_large"?}
                    FETCH     {"req", "topic", "from", "limit"}        -> EVENTS {"req","topic","head","next","first"},
                                                                              env...
                    STATUS    {"req", "topics"?}                       -> STATUSR {...}
                    REPLAY    {"req", "group", "topics"?, "from_seq" | "since"}
                                                               -> REPLAYR {"req", "group", "topics"} | {"error"}
                    DLQ       {"req", "action": "retry"|"purge", "items": [{"topic", "seq"}], "by"}
                                                               -> DLQR {"req", "results": [{"id", ...} | {"error"}]}
                    GROUPRM   {"req", "group"}           -> GROUPRMR {"req", "group", "topics", "lag"} | {"error"}

On the PUB endpoint every message is `[topic + NUL, seq, envelope]`: the seq frame is ASCII decimal digits,
and the envelope's own `seq` attribute is a decimal string (CloudEvents integers are 32-bit). docs/wire.md is the
reference for clients in other languages.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from bucketwire.envelope import NESTING_REFUSAL, dumps

PROTO = 3
"""1: ACKs carry a result per event. 2: the worker acks plain successes as ranges to a hub that reads them.
3: the worker reads a DELIVER batch whose envelopes travel as one frame (`Deliver.j`)."""

READY = b"READY"
ACK = b"ACK"
HB = b"HB"
BYE = b"BYE"
GONE = b"GONE"
STARTFAIL = b"STARTFAIL"
RUNNING = b"RUNNING"
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

ATTEMPT_TIMEOUT = 2.0
"""Seconds a client (`bucketwire.client`) waits for a reply before it sends the request again on a new socket
(to the next hub of its list): a request the hub holds must be answered within this, or its answer goes to a
socket nobody reads any more."""
MAX_CREDIT = 10_000
MAX_PUB_EVENTS = 10_000
MAX_FETCH = 1000


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


# -- header schemas: what each command's JSON header may hold, checked by msgspec in C -------------------------------
Name = Annotated[str, Meta(min_length=1)]
Req = int | str | None  # echoed back so a client matches the answer to its request


class Header(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A header frame. Unknown fields are refused: a typo or a peer of another version is an error, not a no-op.
    (Subclasses list required fields first: msgspec's kw_only is per class, not inherited.)"""


class Empty(Header):
    """HB (both ways) and STATUS without a request id."""


class Ready(Header):
    group: Name
    topics: list[Name] = []  # may be empty for a group the hub knows: then it serves all the group's topics
    credit: Annotated[int, Meta(ge=1, le=MAX_CREDIT)] = 1
    proto: int = 1  # absent in every READY before proto 2 (omit_defaults left out the default it then had)
    schema: int | None = None
    host: Annotated[str, Meta(max_length=64)] = ""
    pid: int = 0
    start: Literal["latest", "earliest"] = "latest"
    # The plugins the worker runs and a digest of their settings: the hub names pools of one group that differ
    # (each event reaches one pool's set only). None from a worker before they were sent: not compared.
    plugins: Annotated[list[Annotated[str, Meta(max_length=200)]], Meta(max_length=256)] | None = None
    setup: Annotated[str, Meta(max_length=64)] = ""


class Versions(msgspec.Struct):
    """Only the versions of a READY, read leniently first, so a peer of another version is told so in words."""

    schema: Any = None


MAX_SEQ = 2**63 - 1
"""The largest seq a journal can store (SQLite's INTEGER): a seq frame past it names no event, and reading it
made the journal raise instead of answering."""
Seq = Annotated[int, Meta(ge=1, le=MAX_SEQ)]


class AckResult(Header):
    t: str  # topic
    s: Seq
    ok: bool = False
    f: list[dict[str, Any]] = []  # follow-on envelopes (ok only)
    error: str = "handler failed"
    line: str | None = None
    plugin: str | None = None
    permanent: bool = False
    delay: Annotated[float, Meta(ge=0)] | None = None  # the plugin raised Retry(delay=S): wait at least S seconds


Range = tuple[Seq, Seq]


class Ack(Header):
    g: str
    results: list[AckResult] = []
    ok: dict[str, list[Range]] = {}
    """The compact form of plain successes (ok, no follow-ons), per topic: [first, last] seq ranges, both ends
    included. Sent only to a hub whose DELIVER said `r` (it reads them); failures and follow-ons stay in `results`."""

    def ranges(self) -> list[tuple[str, int, int]]:
        """The `ok` ranges, checked: a reversed range, or more events than a worker can hold (MAX_CREDIT) in one
        ACK, is refused whole, so a few bytes cannot make the hub walk a billion seqs."""
        out: list[tuple[str, int, int]] = []
        n = 0
        for topic, rs in self.ok.items():
            for first, last in rs:
                if last < first:
                    raise ProtocolError(f"ACK header: range [{first}, {last}] of topic {topic[:64]!r} ends before "
                                        "it starts")
                n += last - first + 1
                out.append((topic, first, last))
        if n > MAX_CREDIT:
            raise ProtocolError(f"ACK header: the ok ranges name {n} events, more than {MAX_CREDIT} "
                                "(the most a worker can hold)")
        return out


class StartFail(Header):
    """A pool whose children's `worker_startup` keeps failing (hub/startfail.py)."""

    g: Name
    host: Annotated[str, Meta(max_length=64)]
    pid: int
    plugin: Annotated[str, Meta(max_length=200)]
    line: Annotated[str, Meta(max_length=1024)]
    count: Annotated[int, Meta(ge=0)]
    retry_in: Annotated[float, Meta(ge=0)] = 0.0


class Bye(Header):
    requeue: list[tuple[str, int]] = []  # (topic, seq) the worker had not started: hand them out again at once
    # The worker could not read a DELIVER (docs/wire.md): the earliest batch it holds outside `requeue` is charged.
    # Without it nothing outside `requeue` is: a departure alone is no evidence that anything ran.
    refused: bool = False


class Deliver(Header):
    a: list[int] = []  # the attempt number of each envelope frame that follows
    r: bool = False
    """The hub reads ACK ranges (`Ack.ok`). Sent only to a worker whose READY said proto 2 or later: an older
    worker's schema refuses the field, and an older hub never sets it, so its workers keep the full form."""
    j: bool = False
    """The envelopes follow as ONE frame, a JSON array of them (`[env,env,...]`, each exactly as committed), not
    a frame each: one frame to send, receive and decrypt per batch instead of one per event, and one JSON parse
    in the worker. Sent only to a worker whose READY said proto 3 or later, for the same reason as `r`."""


def joined(bodies: list[bytes]) -> bytes:
    """The one envelope frame of a `j` DELIVER: the committed envelopes, untouched, joined into a JSON array.

    The brackets go onto the first and last envelope, not around the joined whole: that would copy the whole
    frame (~100 KB for a batch) once more, and in the hub's loop the copy cost ~0.2 us per event."""
    if len(bodies) < 2:
        return b"[" + (bodies[0] if bodies else b"") + b"]"
    return b",".join([b"[" + bodies[0], *bodies[1:-1], bodies[-1] + b"]"])


class Err(Header):
    error: str = ""
    fatal: bool = False
    reready: bool = False
    moved: str | None = None
    """Set when another hub dispatches the group: its work endpoint, or "" when none does yet (try the next one)."""


class Pub(Header):
    events: Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=MAX_PUB_EVENTS)]
    req: Req = None


class PubResult(msgspec.Struct):
    """One event's answer in a PUBACK: the JSON object `{"id", "topic", "seq", "duplicate", "unrouted"}` (every
    field, in this order, as the hub wrote it from a dict before), built and encoded for less than a dict."""

    id: str
    topic: str | None
    seq: int | None
    duplicate: bool
    unrouted: bool


class PubAck(Header):
    req: Req = None
    results: list[PubResult] = []


class PubNack(Header):
    error: str
    retry: bool
    """True: the refusal is a state of the hub that passes (its journal cannot write, a topic's stream is not there
    yet), so the same request may commit later. False: the hub will refuse this request for as long as its config
    is what it is (an envelope it cannot read, a role that forbids the topic, [hub] max_topics reached): sending it
    again can never help. Required (no default): every refusal the hub sends says which, so a path that forgot it
    fails type-checking and at once, rather than telling publishers to send again for ever."""
    req: Req = None
    too_large: int | None = None
    """Index of the event over [hub] max_event_bytes that got the whole request refused: a publisher can drop
    that one event (it will never commit) and send the rest again."""


class PubNackRead(PubNack, forbid_unknown_fields=False):
    """A PUBNACK as a publisher reads it (`read_pubnack`), from a hub of any version: one from before `retry`
    leaves it out, which means the request may be sent again, as it always did; fields of a newer hub are
    skipped (an answer is read, not refused)."""

    retry: bool = True


def read_pubnack(reply: dict[str, Any]) -> PubNackRead:
    """A PUBNACK's header (as `header` read it) in its schema; ProtocolError when it does not fit."""
    try:
        return msgspec.convert(reply, PubNackRead)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"PUBNACK header: {e}") from None


class Fetch(Header):
    topic: str
    req: Req = None
    start: Annotated[int, Meta(le=MAX_SEQ)] = msgspec.field(default=1, name="from")  # below 1 reads from 1
    limit: int = MAX_FETCH


class Events(Header):
    topic: str
    head: int
    next: int
    req: Req = None
    first: int | None = None


class Status(Header):
    req: Req = None
    topics: list[str] | None = None
    """Only these topics' heads (a `tail` of some topics): listing every topic of a hub with tens of thousands
    cost its loop ~0.1-0.2 s a call."""


class Replay(Header):
    group: str
    req: Req = None
    topics: list[str] | None = None
    from_seq: int | None = None
    since: float | None = None


class Dlq(Header):
    action: Literal["retry", "purge"]
    items: Annotated[list[Any], Meta(min_length=1, max_length=1000)]  # {topic, seq}; each checked on its own
    req: Req = None
    by: str | None = None  # who asked, for the log


class GroupRm(Header):
    group: str
    req: Req = None
    force: bool = False
    """Remove a group the cluster's journal (jetstream) holds though no hub dispatches it: a stopped hub's config
    may name it (refused without)."""


H = TypeVar("H", bound=msgspec.Struct)
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def _plain(obj: Any) -> Any:
    """What msgspec does not encode but the envelope encoder (orjson) does, as its plain type: instances of
    subclasses of str, int, float, list and dict (lxml's XPath strings, a plugin's own types) in follow-on data, which
    `ctx.publish` accepted. The ACK carrying them could not be sent, and its child died after its handlers ran."""
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, list | tuple):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    raise TypeError(f"Encoding objects of type {type(obj).__name__} is unsupported")


_encoder = msgspec.json.Encoder(enc_hook=_plain)


MAX_HEADER = 64 << 20
"""The largest header frame the hub reads; it answers a larger one with ERR `header frame too large`."""


def decode(frame: bytes, typ: type[H], max_len: int = MAX_HEADER) -> H:
    """The header frame as `typ`; ProtocolError (one line naming the command's field) if it does not fit."""
    if len(frame) > max_len:
        raise ProtocolError("header frame too large")
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        decoded: H = dec.decode(frame)
        return decoded
    except msgspec.ValidationError as e:
        raise ProtocolError(f"{typ.__name__.upper()} header: {e}") from None
    except msgspec.DecodeError:
        pass
    except RecursionError:  # msgspec's own, past its depth: no envelope may nest that deep (MAX_NESTING)
        raise ProtocolError(f"header frame {NESTING_REFUSAL}") from None
    # msgspec refuses what the json module reads (a lone surrogate escape, say); the envelope checks then decide
    try:
        obj = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header frame is not JSON") from None
    except RecursionError:  # no envelope may nest that deep; said as the hub says it of one it could read
        raise ProtocolError(f"header frame {NESTING_REFUSAL}") from None
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"{typ.__name__.upper()} header: {e}") from None


def header(frame: bytes, max_len: int = MAX_HEADER) -> dict[str, Any]:
    """A header whose shape another module owns (STATUSR, REPLAYR): any JSON object."""
    if len(frame) > max_len:
        raise ProtocolError("header frame too large")
    try:
        h = msgspec.json.decode(frame)
    except RecursionError:
        raise ProtocolError(f"header frame {NESTING_REFUSAL}") from None
    except msgspec.DecodeError:
        try:
            h = json.loads(frame)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("header frame is not JSON") from None
        except RecursionError:
            raise ProtocolError(f"header frame {NESTING_REFUSAL}") from None
    if not isinstance(h, dict):
        raise ProtocolError("header frame is not a JSON object")
    return h


def enc(obj: Any) -> bytes:
    """A header (a schema above, or a plain dict) as compact JSON, by msgspec; what it refuses (a lone surrogate
    in a follow-on a plugin made) goes through the envelope encoder, which keeps it as the json module would."""
    try:
        return _encoder.encode(obj)
    except (TypeError, UnicodeEncodeError, OverflowError, msgspec.EncodeError):
        return dumps(msgspec.to_builtins(obj, enc_hook=_plain))
