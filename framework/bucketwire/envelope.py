"""The event envelope: CloudEvents 1.0 in structured JSON mode.

One envelope type travels everywhere (journal, PUB fan-out, worker deliveries, `tail`), so a consumer written
against `tail` output reads the same thing a plugin receives. The hub serialises an envelope exactly once, when it
commits it (that is when `topic` and `seq` become known), and every later hop forwards those bytes untouched.

`schemaversion` guards against a reader that is older than the writer: such a reader must refuse the envelope
rather than silently ignore fields it does not know.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson
from msgspec import Meta

SPEC_VERSION = "1.0"
SCHEMA_VERSION = 1
"""Bump when the envelope changes in a way an older reader would misread."""

REQUIRED = ("specversion", "id", "source", "type")
_KNOWN = frozenset({
    "specversion", "id", "source", "type", "data", "subject", "time", "datacontenttype", "topic", "seq",
    "causationid", "hops", "schemaversion",
})
"""The attributes `Event` has fields for; anything else in an envelope is an extension."""

MAX_SEQ = 2**63 - 1
"""The journal stores seqs as SQLite INTEGERs (signed 64-bit)."""
MAX_TOPIC_LEN = 255
"""Longest topic name the hub accepts: topics become metric labels and PUB frames."""
_SEQ_DIGITS = re.compile(r"[1-9][0-9]{0,18}")


class EnvelopeError(ValueError):
    """An envelope that cannot be read: malformed, missing attributes, or from a newer schema."""


class SchemaVersionError(EnvelopeError):
    """The envelope was written by a newer bucketwire than this reader understands."""


def shown(text: str, most: int = 64) -> str:
    """A sender's text as a refusal or a log line quotes it: escaped (repr) and clipped to `most` characters, its
    length said when longer. Quoted whole, one value could make an answer as large as the request that carried it,
    or put control characters in a log."""
    return f"{text[:most]!r}" + (f"... ({len(text)} characters)" if len(text) > most else "")


def shown_value(value: object, most: int = 64) -> str:
    """`shown` for a value of any JSON type: a string as `shown` quotes it, anything else as its repr clipped the
    same way (an int of thousands of digits is said by its length; Python refuses to render past 4,300)."""
    if isinstance(value, str):
        return shown(value, most)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 4 * most:
        digits = int(abs(value).bit_length() * 0.30103) + 1  # log10(2): no rendering of the number needed
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    text = repr(value)
    return text[:most] + (f"... ({len(text)} characters)" if len(text) > most else "")


def envelope_bytes(ev: Event, topic: str | None) -> int:
    """Bytes of `ev`'s envelope once the hub has given it `topic` and a seq (the longest seq counted): what a
    journal stores and a worker receives, so what [hub] max_event_bytes bounds."""
    keep = ev.topic, ev.seq
    ev.topic, ev.seq = topic, MAX_SEQ
    try:
        return len(ev.to_json())
    finally:
        ev.topic, ev.seq = keep


def now_iso() -> str:
    """RFC 3339 UTC timestamp with microseconds, the form CloudEvents `time` takes."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seq_to_wire(seq: int) -> str:
    """The `seq` extension as it appears in an envelope: a string of decimal digits.

    CloudEvents integers are signed 32-bit, and one busy topic passes 2^31 within a day (30,000 events/s takes
    20 hours); a string stays a valid CloudEvents attribute for every seq the journal can hold.
    """
    return str(seq)


def parse_seq(value: object) -> int:
    """A seq read from an envelope: decimal digits (the form bucketwire writes) or, from envelopes written by
    bucketwire before the change, a JSON integer. Raises EnvelopeError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        seq = value
    elif isinstance(value, str) and _SEQ_DIGITS.fullmatch(value):
        seq = int(value)
    else:
        raise EnvelopeError(
            f"envelope seq must be a positive integer as decimal digits (\"42\"), got {shown_value(value)}")
    if not 1 <= seq <= MAX_SEQ:
        raise EnvelopeError(f"envelope seq must be between 1 and {MAX_SEQ}, got {shown_value(value)}")
    return seq


def seq_or_none(value: object) -> int | None:
    """`parse_seq` for places that must not fail on a bad envelope (logging, acks of refused envelopes)."""
    try:
        return parse_seq(value)
    except EnvelopeError:
        return None


def stable_id(*parts: object) -> str:
    """A deterministic event id: the same inputs always give the same id, so redeliveries deduplicate."""
    h = hashlib.sha256()
    for p in parts:
        h.update(b"" if p is None else str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:32]


MAX_ID_MS = 1 << 48
"""Unix milliseconds that fit the 12 hex digits an ordered id starts with (until the year 10889)."""


def ordered_id(ms: int | None, *parts: object) -> str:
    """`stable_id` with the event's own time in front: 12 hex digits of its unix milliseconds, then 20 of the hash.

    Why: the journal is unique on (source, id) through a B-tree index. Ids that grow with time are appended at
    its right edge; random ones (a bare hash, a uuid4) land on a different page each, so a commit writes a page
    per event there, and with a journal of a million events each commit cost ~4x the CPU (README "Event ids").
    Still deterministic: the same notification, retried, has the same time and so the same id. Without a usable
    time (none, or out of range), the plain `stable_id`.
    """
    if ms is None or not 0 < ms < MAX_ID_MS:
        return stable_id(*parts)
    return f"{ms:012x}" + stable_id(*parts)[:20]


_id_lock = threading.Lock()
_id_last = [0, 0]  # the last id's milliseconds and counter


def new_event_id() -> str:
    """A fresh id for an event its publisher did not name, like a UUIDv7 (RFC 9562, made for B-tree keys) in 32
    hex digits: the time now (as in `ordered_id`), a 16-bit counter that orders the ids this process makes within
    one millisecond (RFC 9562's method 1), and 64 random bits."""
    ms = time.time_ns() // 1_000_000
    with _id_lock:
        last, n = _id_last
        if ms <= last:  # the same millisecond (or a clock stepped back): go on from the last id
            ms, n = (last, n + 1) if n < 0xFFFF else (last + 1, 0)
        else:
            n = 0
        _id_last[0], _id_last[1] = ms, n
    return f"{ms:012x}{n:04x}" + secrets.token_hex(8)


def iso_ms(value: str) -> int | None:
    """Unix milliseconds of an RFC 3339 time (`2026-11-29T20:34:07.395Z`), or None when it is not one."""
    try:
        t = datetime.fromisoformat(value)
    except (ValueError, TypeError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    try:
        return int(t.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        return None


RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", re.ASCII)
"""The shape of a CloudEvents `time`: an RFC 3339 timestamp with its zone (see `is_rfc3339`)."""


_RFC3339_INSTANT = re.compile(
    r"(?!0000)(?:\d{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1\d|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
    r"|(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29)"
    r"[Tt](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)", re.ASCII).fullmatch
"""`RFC3339` with the ranges a time names an instant in written out (year 1 on, month 1-12, a day its month has,
the 29th of February in leap years only: every 4th year but the centuries not divisible by 400; hour 0-23, minute
and second 0-59, offset under 24 hours): what it takes, `datetime.fromisoformat` does, so `is_rfc3339` asks
nothing more of it."""


def is_rfc3339(value: str) -> bool:
    """Whether `value` is an RFC 3339 timestamp with its zone that names an instant. Why more than the pattern:
    it took a 30th of February, a 13th month, an hour 24 or an offset of 25 hours (and, without re.ASCII, digits
    of other scripts), all of which the CloudEvents SDKs refuse to read, so an envelope carrying one was refused
    by every consumer that used them.

    The common timestamp is taken by one pattern (`_RFC3339_INSTANT`); what it does not take is asked as before:
    the pattern, then `fromisoformat` (a third of the time per event: performance.md, change 23)."""
    if _RFC3339_INSTANT(value):
        return True
    if not RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper())  # Python 3.11 reads RFC 3339's 'T' and 'Z', not their lowercase
    except ValueError:
        return False
    return True


def time_problem(value: object) -> str | None:
    """Why `value`, an envelope's `time` as a producer sent it, is refused at ingress, or None: what bucketwire
    commits must be an envelope the CloudEvents SDKs read (binary mode refuses such a ce-time the same way)."""
    if value is None or (type(value) is str and is_rfc3339(value)):
        return None
    return (f"envelope attribute 'time' {shown_value(value, 40)} is not an RFC 3339 timestamp with its zone "
            "(2024-05-01T10:00:00.123Z)")


def cloudevents_time(value: str) -> str | None:
    """`value` as a CloudEvents `time` (an RFC 3339 timestamp with its zone): itself when it is one, else the
    same instant in that form when it is another ISO 8601 time (one without a zone taken as UTC, as S3's are), else
    None. Why: an envelope bucketwire writes must be one the CloudEvents SDKs read, and a store or proxy writing
    `2024-05-01 10:00:00` or `20240501T100000Z` as an S3 record's eventTime made one they refuse."""
    if is_rfc3339(value):
        return value
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    try:
        # isoformat pads the year to four digits; strftime's %Y wrote year 999 as "999", no RFC 3339 time.
        out = t.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    except (OverflowError, ValueError):
        return None
    return out if is_rfc3339(out) else None


T = TypeVar("T")


def read_envelope(build: Callable[..., T], d: Mapping[str, Any], text_checked: bool = False) -> T:
    """Every check an envelope passes before bucketwire reads it; then `build(id, source, type, data, subject, time,
    datacontenttype, topic, seq, causationid, hops, schemaversion, extensions)` with `Event`'s fields in their order
    (`Event` itself, as `Event.from_dict(d)`, or `unsent_envelope` for the hub's PUB path, which never builds an
    `Event`). The rules are written here once, whichever of the two is built.

    `text_checked`: the caller knows every string in `d` is valid Unicode (msgspec decoded it, and it refuses lone
    surrogates), so the check that renders the whole envelope once more is skipped."""
    if type(d) is not dict and not isinstance(d, Mapping):  # the exact type first: an ABC check costs more
        raise EnvelopeError("envelope must be a JSON object")
    get = d.get
    sv = get("schemaversion", SCHEMA_VERSION)
    if (type(sv) is not int and (not isinstance(sv, int) or isinstance(sv, bool))) or sv < 1:
        raise EnvelopeError(f"envelope has an invalid schemaversion {shown_value(sv)}")
    if sv > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"envelope schemaversion {shown_value(sv)} is newer than this bucketwire understands "
            f"({SCHEMA_VERSION}); "
            "upgrade bucketwire on this host"
        )
    if get("specversion") != SPEC_VERSION:
        raise EnvelopeError(f"unsupported CloudEvents specversion {shown_value(get('specversion'))} (want '1.0')")
    eid, source, typ = get("id"), get("source"), get("type")
    if not (isinstance(eid, str) and eid and isinstance(source, str) and source and isinstance(typ, str)
            and typ):
        k = next(k for k, v in (("id", eid), ("source", source), ("type", typ)) if not isinstance(v, str) or not v)
        raise EnvelopeError(f"envelope attribute {k!r} is missing or not a non-empty string")
    if len(eid) > 256 or len(source) > 1024 or len(typ) > 256:
        name, text, most = next(x for x in (("id", eid, 256), ("source", source, 1024), ("type", typ, 256))
                                if len(x[1]) > x[2])
        raise EnvelopeError(f"envelope attribute {name!r} is {len(text)} characters, over its limit of {most} "
                            f"({text[:40]!r}...)")
    raw_seq = get("seq")
    if raw_seq is None:
        seq = None
    elif (type(raw_seq) is str and raw_seq.isascii() and raw_seq.isdigit() and raw_seq[0] != "0"
          and len(raw_seq) < 19):
        seq = int(raw_seq)  # what every worker reads: parse_seq's regex and range check, without either
    else:
        seq = parse_seq(raw_seq)
    hops = get("hops", 0)
    if (type(hops) is not int and (not isinstance(hops, int) or isinstance(hops, bool))) or hops < 0:
        raise EnvelopeError(f"envelope hops must be a non-negative integer, got {shown_value(hops)}")
    subject, topic, causationid, time_ = get("subject"), get("topic"), get("causationid"), get("time")
    if not ((subject is None or type(subject) is str) and (topic is None or type(topic) is str)
            and (causationid is None or type(causationid) is str) and (time_ is None or type(time_) is str)):
        for k, v in (("subject", subject), ("topic", topic), ("causationid", causationid), ("time", time_)):
            if v is not None and not isinstance(v, str):
                raise EnvelopeError(f"envelope attribute {k!r} must be a string")
    if not text_checked and not valid_unicode(d):
        # JSON can carry lone surrogates (\\ud800); they are not text, and every consumer that encodes them
        # (SQLite, S3 clients, files) fails. Found by tests/test_security_plugins.py; refused at the edge.
        raise EnvelopeError("envelope contains invalid Unicode (a lone surrogate escape such as \\ud800)")
    return build(  # positional, in Event's fields' order (keywords cost a fifth of an Event's construction)
        eid, source, typ, get("data"), subject, time_ or now_iso(), get("datacontenttype") or "application/json",
        topic, seq, causationid, hops, sv,
        {} if _KNOWN.issuperset(d) else {k: v for k, v in d.items() if k not in _KNOWN},
    )


class Attributes(msgspec.Struct, forbid_unknown_fields=True):
    """An envelope as `read_envelope` accepts it, without extensions (an unknown field: the checked path), for
    msgspec to check in C while it decodes: the hub's PUB read (`hub/pubread.py`, performance.md change 18) and
    the worker child's DELIVER read (`worker/child.py`, change 22) try it first and read whatever it refuses the
    way they always did, which then accepts it or words the refusal. The limits are `read_envelope`'s own: id,
    source and type non-empty strings of at most 256, 1024 and 256 characters; hops a non-negative integer,
    schemaversion 1 to SCHEMA_VERSION (neither a bool: msgspec does not take one for an int); subject, topic,
    causationid and time strings or null; datacontenttype and data anything. `seq` is checked after, by each
    reader (a string of digits or an integer, in range)."""

    specversion: Literal["1.0"]
    id: Annotated[str, Meta(min_length=1, max_length=256)]
    source: Annotated[str, Meta(min_length=1, max_length=1024)]
    type: Annotated[str, Meta(min_length=1, max_length=256)]
    time: str | None = None
    subject: str | None = None
    topic: str | None = None
    seq: Any = None
    causationid: str | None = None
    hops: Annotated[int, Meta(ge=0)] = 0
    schemaversion: Annotated[int, Meta(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    datacontenttype: Any = None
    data: Any = None


DETOUR = 16
"""After a read the typed schema (`Attributes`) passed on and the checked way then took (one whose events carry
an extension, say), this many reads go the checked way without trying the schema first: a peer whose events carry
extensions would otherwise pay a decode that is thrown away on every read (~2 µs per event when the extension is
on the last event). Reads the checked way refuses do not count: they are no steady traffic, and a peer whose
reads are refused cannot turn the typed way off."""


class Detour:
    """The count of `DETOUR`, one per reader: the hub's PUB read (`hub/pubread.py`'s `read_pub`) and each worker
    child's DELIVER read (`worker/child.py`'s `read_delivered`). Each reads "typed first, else the checked way":

        if detour.taken():          # still detouring: the checked way directly
            ...checked...
        else:
            ...typed; return what it took...
            ...checked...           # (raises for a refusal: not counted)
            detour.start()          # the schema passed on what the checked way took
    """

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = 0
        """Reads still to go the checked way directly."""

    def taken(self) -> bool:
        """Whether this read goes the checked way directly (then it is counted)."""
        if self.left:
            self.left -= 1
            return True
        return False

    def start(self) -> None:
        """The typed schema passed on a read the checked way then took: the next `DETOUR` go that way directly."""
        self.left = DETOUR


def topic_problem(topic: str) -> str | None:
    """Why the hub refuses `topic` as a name, or None. One rule for the hub's ingest and `ctx.publish`, which
    says it in the plugin's handler instead of the hub refusing the whole ack."""
    if "\0" in topic or len(topic) > MAX_TOPIC_LEN:
        return f"topic names must be 1 to {MAX_TOPIC_LEN} characters without NUL bytes"
    return None


NUL_IN_OBJECT_NAME = "bucket name or object key contains a NUL byte"


DATA_BASE64 = "data_base64"
"""The CloudEvents JSON format's member for binary data (base64): kept in an envelope as it came, with `data`
null, so the CloudEvents SDKs read it as the bytes; a plugin reads them as `Event.data_bytes`."""


def data_base64_problem(d: Mapping[str, Any]) -> str | None:
    """Why the hub refuses an event's `data_base64` as the JSON format defines it, or None (also when it has
    none): a string of valid base64, and no `data` beside it (the two are mutually exclusive; a JSON null `data`
    is taken as absent, as the SDKs read it and as bucketwire's own envelopes carry it). The CloudEvents SDK
    refuses to read all three; committed, each was an envelope no consumer could read."""
    if DATA_BASE64 not in d:
        return None
    value = d[DATA_BASE64]
    if d.get("data") is not None:
        return "event has both 'data' and 'data_base64'; send binary data in data_base64 alone, JSON in data alone"
    if not isinstance(value, str):
        return f"event's data_base64 must be a string of base64, got {type(value).__name__}"
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return f"event's data_base64 {shown(value, 40)} is not valid base64 (RFC 4648, with its '=' padding)"
    return None


def object_name_problem(data: Any) -> str | None:
    """Why the hub refuses an event whose `data` names a bucket or key with a NUL byte (S3 has none), or None."""
    if type(data) is dict or isinstance(data, dict):
        b, k = data.get("bucket"), data.get("key")
        if (isinstance(b, str) and "\0" in b) or (isinstance(k, str) and "\0" in k):
            return NUL_IN_OBJECT_NAME
    return None


LIFECYCLE_EXPIRATION = "s3:LifecycleExpiration:"
REMOVED_TYPES = ("s3:ObjectRemoved:", LIFECYCLE_EXPIRATION)
"""Event types of an object that is gone: deleted, or expired by a lifecycle rule (AWS's names)."""


@dataclass(slots=True)
class Event:
    """A CloudEvent as plugins see it.

    `data` is the event payload; for object events it holds `bucket`, `key`, `size`, `etag`, `content_type`,
    `version_id`, `sequencer`, `user_metadata`, `store` and `records`. `topic` and `seq` are set by the hub at
    commit time and are `None` on an event that has not been committed yet. `seq` is an int here and a string of
    decimal digits in the envelope (see `seq_to_wire`).
    """

    id: str
    source: str
    type: str
    data: Any = None
    subject: str | None = None
    time: str = field(default_factory=now_iso)
    datacontenttype: str = "application/json"
    topic: str | None = None
    seq: int | None = None
    causationid: str | None = None
    hops: int = 0
    schemaversion: int = SCHEMA_VERSION
    extensions: dict[str, Any] = field(default_factory=dict)

    # -- conveniences for object events -------------------------------------------------------------------
    @property
    def bucket(self) -> str | None:
        return self.data.get("bucket") if isinstance(self.data, dict) else None

    @property
    def key(self) -> str | None:
        return self.data.get("key") if isinstance(self.data, dict) else None

    @property
    def store(self) -> str | None:
        return self.data.get("store") if isinstance(self.data, dict) else None

    @property
    def is_object_created(self) -> bool:
        return self.type.startswith("s3:ObjectCreated:")

    @property
    def is_object_removed(self) -> bool:
        """Deleted by a client (`s3:ObjectRemoved:*`) or expired by a lifecycle rule (`s3:LifecycleExpiration:*`,
        as AWS names those): either way the object is gone, and what was made from it should go too."""
        return self.type.startswith(REMOVED_TYPES)

    @property
    def is_lifecycle_expiration(self) -> bool:
        """Removed by the store's own lifecycle rule rather than by a client: S3 replication does not carry
        these over (the target keeps its own rules), and neither does the bundled replication plugin."""
        return self.type.startswith(LIFECYCLE_EXPIRATION)

    @property
    def is_object_event(self) -> bool:
        """A creation or removal of a named object: what object-processing plugins act on."""
        return bool(self.bucket and self.key) and (self.is_object_created or self.is_object_removed)

    @property
    def data_bytes(self) -> bytes | None:
        """The bytes of an event whose producer sent binary data (the CloudEvents JSON format's `data_base64`,
        decoded; `data` is then None), else None."""
        value = self.extensions.get(DATA_BASE64) if self.extensions else None
        if not isinstance(value, str):
            return None
        try:
            return base64.b64decode(value)
        except (binascii.Error, ValueError):  # only in an envelope committed before the hub checked it
            return None

    @property
    def object_key(self) -> str | None:
        """`bucket/key` for object events: the unit of per-object ordering (None unless both are strings)."""
        return object_key_of(self.data)

    # -- wire form -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return envelope_dict(
            self.id, self.source, self.type, self.data, self.subject, self.time, self.datacontenttype, self.topic,
            None if self.seq is None else seq_to_wire(self.seq), self.causationid, self.hops, self.schemaversion,
            self.extensions,
        )

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, text_checked: bool = False) -> Event:
        """See `read_envelope`."""
        return read_envelope(cls, d, text_checked)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise EnvelopeError(f"envelope is not valid JSON: {e}") from None
        return cls.from_dict(d)


def envelope_dict(eid: str, source: str, typ: str, data: Any, subject: str | None, time: str, datacontenttype: str,
                  topic: str | None, seq: str | None, causationid: str | None, hops: int, schemaversion: int,
                  extensions: dict[str, Any]) -> dict[str, Any]:
    """An envelope's JSON object: its attributes in the order every envelope is written in (`seq` in its wire
    form, see `seq_to_wire`; attributes that are None left out), `Event`'s fields as parameters, in their order.
    The one place that order is written: `Event.to_dict` and `unsent_envelope` (and so `unsent_of`) come here."""
    d: dict[str, Any] = {
        "specversion": SPEC_VERSION, "id": eid, "source": source, "type": typ, "time": time,
        "datacontenttype": datacontenttype, "schemaversion": schemaversion, "hops": hops,
    }
    if extensions:  # rare: spliced in front
        d = {**extensions, **d}
    if subject is not None:
        d["subject"] = subject
    if topic is not None:
        d["topic"] = topic
    if seq is not None:
        d["seq"] = seq
    if causationid is not None:
        d["causationid"] = causationid
    d["data"] = data
    return d


UNSET_SEQ = seq_to_wire(MAX_SEQ)
"""The seq an envelope holds until it is committed: the longest, so its rendered size bounds the committed one."""


def unsent_envelope(eid: str, source: str, typ: str, data: Any, subject: str | None, time: str,
                    datacontenttype: str, topic: str | None, seq: int | None, causationid: str | None, hops: int,
                    schemaversion: int, extensions: dict[str, Any]) -> dict[str, Any]:
    """`read_envelope`'s builder on the hub's PUB path: the envelope as the hub will commit it, before its seq is
    known, with a "topic" (the publisher's, or "" until the event is routed) and a "seq" (`UNSET_SEQ`; the
    publisher's is not kept) already in their places, so that setting them keeps the order."""
    return envelope_dict(eid, source, typ, data, subject, time, datacontenttype, topic or "", UNSET_SEQ,
                         causationid, hops, schemaversion, extensions)


def unsent_of(ev: Event, topic: str) -> dict[str, Any]:
    """`ev`'s envelope as the hub will commit it to `topic`, before its seq is known: what `unsent_envelope`
    builds from a published one (follow-ons, dead letters and webhooks start from an `Event`). A function of the
    hub's, not a method: plugins see `Event`, and this is none of theirs."""
    return unsent_envelope(ev.id, ev.source, ev.type, ev.data, ev.subject, ev.time, ev.datacontenttype, topic, None,
                           ev.causationid, ev.hops, ev.schemaversion, ev.extensions)


Unsent = tuple[bytes, bytes] | bytes | dict[str, Any]
"""An envelope waiting for its seq: `pre_render`'s answer (bytes: an envelope made elsewhere holding `SEQ_SLOT`)."""

SEQ_SLOT = b'"seq":"' + UNSET_SEQ.encode() + b'"'
"""The seq's place in an envelope rendered before its seq is known: `pre_render` splits the bytes there."""


def pre_render(envelope: dict[str, Any]) -> Unsent:
    """An `unsent_envelope` rendered as far as it can be before its seq is known, for `render` to finish.

    Its bytes before and after the first `"seq":"..."` in them, which `render` joins around the seq, when no
    object opens before it: then it is a key of the envelope itself, so its own seq (JSON escapes a quote inside a
    string: no string holds `"seq":"`). Else (an extension or a datacontenttype holding an object; a value orjson
    refuses) the dict itself, which `render` renders whole. Why split here: the slot is found here anyway, and
    `render` then writes the seq without searching the bytes for it again (`bytes.replace` searched them twice,
    once per committed event; the journal does the join inline). The three parts' lengths are the envelope's
    size with the longest seq (`unsent_size`).

    Rendering here, when the hub accepts an event, rather than at its commit, lets the decoded request and the
    dict go as soon as the request is read; kept until the commit, they cost the hub's loop more than the render.

    An event sent with `data_base64` is committed without a `"data": null` (the JSON format has one member or the
    other); the hub's own dict keeps the key, which its loop reads."""
    if DATA_BASE64 in envelope and envelope.get("data", 0) is None:
        envelope = {k: v for k, v in envelope.items() if k != "data"}
    try:
        body = orjson.dumps(envelope)
    except TypeError:
        return envelope
    head, slot, tail = body.partition(SEQ_SLOT)
    if slot and head and head.find(b"{", 1) < 0:
        return head, tail
    return envelope  # (no slot at all: not an `unsent_envelope`; `render` sets its seq in the dict)


def unsent_size(envelope: tuple[bytes, bytes]) -> int:
    """Bytes of a split `pre_render`ed envelope with the longest seq: a bound of its committed size."""
    return len(envelope[0]) + len(SEQ_SLOT) + len(envelope[1])


def render(envelope: Unsent, seq: int) -> bytes:
    """The bytes of a `pre_render`ed envelope committed at `seq`: what the journal stores and every worker
    receives."""
    if type(envelope) is tuple:
        return b'%b"seq":"%d"%b' % (envelope[0], seq, envelope[1])
    if type(envelope) is bytes:
        return envelope.replace(SEQ_SLOT, b'"seq":"%d"' % seq, 1)
    assert isinstance(envelope, dict)
    envelope["seq"] = str(seq)  # seq_to_wire, inline: once per committed event
    try:
        return orjson.dumps(envelope)
    except TypeError:
        return dumps(envelope)


def object_key_of(data: Any) -> str | None:
    """`bucket/key` of an event's data (None unless it is an object with both as strings): the unit of
    per-object ordering."""
    if type(data) is dict or isinstance(data, dict):
        b, k = data.get("bucket"), data.get("key")
        if isinstance(b, str) and isinstance(k, str):
            return f"{b}/{k}"
    return None


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes; non-ASCII kept as UTF-8 so keys stay readable in `tail` output.

    orjson does it in a tenth of the time (it is a quarter of the hub's CPU per webhook otherwise). What it
    refuses -- integers beyond 64 bits, non-string keys, lone surrogates -- goes through the json module as
    before. NaN and infinities, which JSON does not have, come out as null.
    """
    try:
        return orjson.dumps(obj)
    except TypeError:
        return _JSON(obj).encode("utf-8", "surrogatepass")


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


HUB_SOURCE = "bucketwire://hub/"
"""Sources under this prefix are written by the hub alone: dead letters, retries, dlq markers, follow-ons.

Dedupe is unique on (source, id) across all topics and the hub's ids are predictable (that is what makes them
deduplicate), so a publisher that could write a hub source could pre-publish those ids and suppress a group's
follow-ons or dead letters. Every ingress path refuses these sources from outside.
"""

RESERVED_SOURCES = (HUB_SOURCE, "bucketwire://cli/")
"""`bucketwire://cli/` is where older versions wrote dlq markers; reserved so nobody can forge one now."""

STEERING_EXTENSIONS = frozenset({"targetgroup"})
"""Extensions that change who receives an event; only the hub sets them (a `dlq retry` it performs)."""

ROOT_EXTENSIONS = frozenset({"rootsource", "rootid"})
"""The upload a follow-on descends from (hub/lineage.py): the hub counts each upload's descendants against
`max_descendants`, so a forged one would spend another upload's budget, or escape its own."""

HUB_EXTENSIONS = STEERING_EXTENSIONS | ROOT_EXTENSIONS | {"retries", "retryof", "retrysource", "retrydeadletter"}
"""Everything a `dlq retry` stamps: besides steering, `dlq show` rebuilds a retry's history from these, so a
forged `retrydeadletter` could make that history lie; and the root of a follow-on. Only the hub writes them."""


def refused_from_outside(ev: Event) -> str | None:
    """Why a publisher (ZeroMQ PUB, HTTP /events, webhooks) may not submit this event, or None if it may."""
    return outside_refusal(ev.id, ev.source, ev.extensions)


def outside_refusal(eid: str, source: str, attributes: Iterable[str]) -> str | None:
    """`refused_from_outside` for an envelope not read into an `Event`: `attributes` are its attribute names
    (only the extensions among them matter)."""
    if source.startswith(RESERVED_SOURCES):
        return (f"event {eid[:64]!r}: source {source[:64]!r} is reserved for the hub (sources starting "
                f"{HUB_SOURCE!r} or 'bucketwire://cli/'); publish under another source")
    steer = sorted(HUB_EXTENSIONS.intersection(attributes))
    if steer:
        if steer[0] in ROOT_EXTENSIONS:
            return (f"event {eid[:64]!r}: extension {steer[0]!r} names the upload a follow-on descends from and "
                    "is set by the hub only; remove it (an event published from outside is an upload of its own)")
        what = "steers delivery" if steer[0] in STEERING_EXTENSIONS else "records a dlq retry"
        return (f"event {eid[:64]!r}: extension {steer[0]!r} {what} and is set by the hub only; remove "
                "it (use `bucketwire dlq retry` to re-deliver a dead letter to one group)")
    return None


def follow_on_source(group: str, plugin: str) -> str:
    """Source of the follow-ons `plugin` publishes in `group`: in the hub's namespace, so no publisher can squat
    on their ids; the hub stamps it on every follow-on it commits, whatever the worker sent."""
    return f"{HUB_SOURCE}follow-on/{group}/{plugin}"


def follow_on_id(causation_id: str, group: str, plugin: str, index: int, topic: str,
                 cause_time: str | None = None, cause_source: str | None = None) -> str:
    """Id of the `index`-th event a plugin publishes while handling `causation_id` (from `cause_source`) in `group`.

    Deterministic, so when the causing event is redelivered the same follow-ons get the same ids and the
    journal's (source, id) uniqueness drops the repeats. Led by the causing event's `time` (`ordered_id`), which a
    redelivery carries unchanged, so follow-ons too are appended to the journal's index. The cause's source is
    part of it: an id is unique per source only, and two causes sharing one (from two stores) gave their
    follow-ons one id, so the journal dropped the second cause's as repeats.
    """
    ms = iso_ms(cause_time) if cause_time else None
    if cause_source is None:
        return ordered_id(ms, "follow-on", causation_id, group, plugin, index, topic)
    return ordered_id(ms, "follow-on", cause_source, causation_id, group, plugin, index, topic)


def valid_unicode(v: Any) -> bool:
    """True if every string (keys too) in a JSON value is encodable as strict UTF-8.

    One C-speed serialisation (orjson refuses lone surrogates) settles the common case; the walk below only runs
    for what orjson refuses.
    """
    try:
        orjson.dumps(v)
        return True
    except TypeError:
        return _valid_unicode_walk(v)


def _valid_unicode_walk(v: Any) -> bool:
    """Without recursing: what orjson refuses includes values nested past its 254 levels, and a recursive walk
    of one nested a few hundred deep raised RecursionError (see MAX_NESTING)."""
    todo = [v]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(x, Mapping):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, list | tuple):
            todo.extend(x)
    return True


MAX_NESTING = 512
"""How many levels of arrays and objects inside each other an event's envelope may hold. The json module, which
workers, `tail` and clients read envelopes with, gives up near 1,000 (less its caller's own stack), and orjson
writes at most 254; without a limit of its own, the hub refused what it could not read with a RecursionError
(and a traceback in its log), on the webhook at one depth and over ZeroMQ at another, and committed what some
consumers could then not read."""

NESTING_REFUSAL = (f"nests deeper than {MAX_NESTING} levels (arrays or objects inside each other); flatten it "
                   "or send it as a string")


def too_deep(v: Any, limit: int = MAX_NESTING) -> bool:
    """Whether `v` nests more than `limit` levels of arrays and objects, found without recursing (a value that
    deep is what overflows a recursive walk). orjson writes at most 254 levels, so a caller that has written `v`
    with it already knows the answer is False and need not ask."""
    todo: list[tuple[Any, int]] = [(v, 1)]
    while todo:
        x, depth = todo.pop()
        if isinstance(x, Mapping):
            inner: Iterable[Any] = x.values()
        elif isinstance(x, list | tuple):
            inner = x
        else:
            continue
        if depth > limit:
            return True
        todo.extend((y, depth + 1) for y in inner)
    return False
