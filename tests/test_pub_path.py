"""The hub's PUB path reads each published envelope straight into the dict it commits (`read_envelope` building an
`unsent_envelope`, rendered by `envelope.render`), never into an `Event`. These tests hold it to what the hub wrote
before that change: for any envelope, the same bytes in the journal or the same refusal.

`_before` is the reference: `Event.from_dict` followed by the commit's render (`Event.to_json` with the topic and
seq set), as the code stood before the change, copied here so that a change to the shared rules cannot also
change the yardstick.

Examples per test: BUCKETWIRE_FUZZ_EXAMPLES (default 150), as in tests/test_fuzz.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bucketwire import envelope as E
from bucketwire import protocol as P
from bucketwire.devstack.bench.bus import payload
from tests import inprocess
from tests.test_fuzz import JSONV, TEXT, mutate

EXAMPLES = int(os.environ.get("BUCKETWIRE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
NOW = "2026-11-29T12:00:00.000000Z"
"""What `now_iso` answers in these tests: an envelope without a `time` gets the hub's clock, in both paths."""


# -- the reference: the code before the change ------------------------------------------------------------------
_KNOWN = frozenset({
    "specversion", "id", "source", "type", "data", "subject", "time", "datacontenttype", "topic", "seq",
    "causationid", "hops", "schemaversion",
})
_SEQ_DIGITS = re.compile(r"[1-9][0-9]{0,18}")
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _valid_unicode(v: Any) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, Mapping):
        return all(_valid_unicode(k) and _valid_unicode(x) for k, x in v.items())
    if isinstance(v, list | tuple):
        return all(_valid_unicode(x) for x in v)
    return True


def _parse_seq(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        seq = value
    elif isinstance(value, str) and _SEQ_DIGITS.fullmatch(value):
        seq = int(value)
    else:
        raise E.EnvelopeError(
            f"envelope seq must be a positive integer as decimal digits (\"42\"), got {E.shown_value(value)}")
    if not 1 <= seq <= E.MAX_SEQ:
        raise E.EnvelopeError(f"envelope seq must be between 1 and {E.MAX_SEQ}, got {E.shown_value(value)}")
    return seq


def _before(d: Any, topic: str | None, seq: int | None) -> tuple[dict[str, Any], bytes]:
    """(the attributes the hub's checks read, the committed bytes) for `d` committed to `topic` at `seq`; raises
    EnvelopeError with the message the publisher was told (a client's value quoted clipped, `shown_value`). With
    `seq` None: `Event.from_dict(d).to_json()`, the
    envelope's own topic and seq kept."""
    if not isinstance(d, Mapping):
        raise E.EnvelopeError("envelope must be a JSON object")
    sv = d.get("schemaversion", E.SCHEMA_VERSION)
    if not isinstance(sv, int) or isinstance(sv, bool) or sv < 1:
        raise E.EnvelopeError(f"envelope has an invalid schemaversion {E.shown_value(sv)}")
    if sv > E.SCHEMA_VERSION:
        raise E.SchemaVersionError(
            f"envelope schemaversion {E.shown_value(sv)} is newer than this bucketwire understands "
            f"({E.SCHEMA_VERSION}); upgrade bucketwire on this host")
    if d.get("specversion") != E.SPEC_VERSION:
        raise E.EnvelopeError(f"unsupported CloudEvents specversion {E.shown_value(d.get('specversion'))} (want '1.0')")
    for k in ("id", "source", "type"):
        if not isinstance(d.get(k), str) or not d.get(k):
            raise E.EnvelopeError(f"envelope attribute {k!r} is missing or not a non-empty string")
    if len(d["id"]) > 256 or len(d["source"]) > 1024 or len(d["type"]) > 256:
        raise E.EnvelopeError("envelope id/source/type is too long")
    own_seq = None if d.get("seq") is None else _parse_seq(d.get("seq"))
    hops = d.get("hops", 0)
    if not isinstance(hops, int) or isinstance(hops, bool) or hops < 0:
        raise E.EnvelopeError(f"envelope hops must be a non-negative integer, got {E.shown_value(hops)}")
    for k in ("subject", "topic", "causationid", "time"):
        if d.get(k) is not None and not isinstance(d.get(k), str):
            raise E.EnvelopeError(f"envelope attribute {k!r} must be a string")
    if not _valid_unicode(d):
        raise E.EnvelopeError("envelope contains invalid Unicode (a lone surrogate escape such as \\ud800)")
    ext = {k: v for k, v in d.items() if k not in _KNOWN}
    out: dict[str, Any] = {
        "specversion": "1.0", "id": d["id"], "source": d["source"], "type": d["type"], "time": d.get("time") or NOW,
        "datacontenttype": d.get("datacontenttype") or "application/json", "schemaversion": sv, "hops": hops,
    }
    if ext:
        out = {**ext, **out}
    if d.get("subject") is not None:
        out["subject"] = d["subject"]
    if seq is not None:
        out["topic"] = topic
        out["seq"] = str(seq)
    else:
        if d.get("topic") is not None:
            out["topic"] = d["topic"]
        if own_seq is not None:
            out["seq"] = str(own_seq)
    if d.get("causationid") is not None:
        out["causationid"] = d["causationid"]
    out["data"] = d.get("data")
    try:
        body = orjson.dumps(out)
    except TypeError:
        body = _JSON(out).encode("utf-8", "surrogatepass")
    return out, body


# -- envelopes to try --------------------------------------------------------------------------------------------
ATTRS = ["specversion", "id", "source", "type", "time", "subject", "topic", "seq", "causationid", "hops",
         "schemaversion", "datacontenttype", "data"]
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.sampled_from(["", "\x00", "\x00b", "1.0", "0", "7", "007", "9" * 19, "9223372036854775807",
                     "9223372036854775808", "\ud800", "a\x00b", "x" * 300, "bucketwire://hub/dead-letter/g",
                     "bucketwire://cli/x", "b", "k"]),
    TEXT, JSONV,
)
EXTENSIONS = st.sampled_from(["targetgroup", "retries", "retryof", "retrysource", "retrydeadletter", "myext",
                              "traceparent", "zzz", "\ud800x"])
DATA_KEYS = st.sampled_from(["bucket", "key", "size", "big", "f", "x\ud800"])


@st.composite
def envelopes(draw: st.DrawFn) -> Any:
    """A bench envelope (what publishers send), then changed: attributes set to odd values or removed,
    extensions (some of them the hub's) added, the data's bucket and key changed, or anything at all mutated."""
    d: dict[str, Any] = payload(draw(st.integers(0, 10**6)), 0.0)
    d["data"] = dict(d["data"])
    for _ in range(draw(st.integers(0, 3))):
        if not isinstance(d, dict):  # a mutation replaced the whole envelope
            break
        what = draw(st.sampled_from(["attr", "drop", "ext", "data", "mutate"]))
        if what == "attr":
            d[draw(st.sampled_from(ATTRS))] = draw(ODD)
        elif what == "drop" and d:
            d.pop(draw(st.sampled_from(sorted(d))))
        elif what == "ext":
            d[draw(EXTENSIONS)] = draw(ODD)
        elif what == "data" and isinstance(d.get("data"), dict):
            d["data"][draw(DATA_KEYS)] = draw(st.one_of(st.sampled_from(["\x00", "\x00b", "b\x00", "b/\x00"]), ODD))
        elif what == "mutate":
            d = mutate(draw(st.data()), d, 2)
    return d


def _bench(i: int, **attrs: Any) -> dict[str, Any]:
    d = payload(i, 0.0)
    d["data"] = {**d["data"], **attrs.pop("data", {})}
    return {**d, **attrs}


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "now_iso", lambda: NOW)


# -- the envelope: read and rendered ------------------------------------------------------------------------------
def _after(d: Any, topic: str, seq: int, text_checked: bool) -> bytes:
    env = E.read_envelope(E.unsent_envelope, d, text_checked)
    env["topic"] = topic
    return E.render(E.pre_render(env), seq)


SLOT = {"seq": E.UNSET_SEQ}
"""What the seq looks like in an envelope before its commit, hidden where a careless `render` would replace it."""


@FUZZ
@given(d=st.one_of(envelopes(), JSONV), topic=TEXT, seq=st.integers(1, E.MAX_SEQ))
@example(d=_bench(1, datacontenttype=SLOT), topic="t", seq=5)
@example(d=_bench(2, data=SLOT), topic="t", seq=5)
@example(d=_bench(3, myext=SLOT), topic="t", seq=5)
@example(d=_bench(4, data={"x": 2**70}), topic="t", seq=5)
def test_an_envelope_is_read_and_rendered_as_before(d: Any, topic: str, seq: int) -> None:
    """Same bytes, or the same refusal (type and message), for any JSON value."""
    try:
        want: bytes | Exception = _before(copy.deepcopy(d), topic, seq)[1]
    except E.EnvelopeError as e:
        want = e
    try:
        got: bytes | Exception = _after(copy.deepcopy(d), topic, seq, text_checked=False)
    except E.EnvelopeError as e:
        got = e
    if isinstance(want, Exception):
        assert isinstance(got, Exception) and (type(got), str(got)) == (type(want), str(want))
    else:
        assert got == want
        # and what a worker reads and writes back (follow-ons, `tail`): the envelope as it came
        assert E.Event.from_dict(copy.deepcopy(d)).to_json() == _before(copy.deepcopy(d), None, None)[1]
    # What msgspec reads is valid Unicode; the hub then skips the walk that checks it.
    if not isinstance(want, Exception) or "Unicode" not in str(want):
        try:
            checked: bytes | Exception = _after(copy.deepcopy(d), topic, seq, text_checked=True)
        except E.EnvelopeError as e:
            checked = e
        assert type(checked) is type(got) and str(checked) == str(got)


def test_an_event_unsent_is_its_envelope() -> None:
    """`unsent_of` (follow-ons, dead letters, webhooks) renders what `to_json` wrote with the topic and seq set."""
    for d in (payload(1, 0.0), {**payload(2, 0.0), "myext": [1, 2], "causationid": "c", "subject": None}):
        ev = E.Event.from_dict(d)
        env = E.unsent_of(ev, "t")
        assert len(orjson.dumps(env)) == E.envelope_bytes(ev, "t")
        body = E.render(E.pre_render(env), 42)
        ev.topic, ev.seq = "t", 42
        assert body == ev.to_json()


# -- the hub: what it commits, or how it refuses ------------------------------------------------------------------
MAX_HOPS = 3


class InProcessHub(inprocess.InProcessHub):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, f"max_hops = {MAX_HOPS}\nmax_topics = 100000", """
[[routes]]
topic = "created"
events = ["s3:ObjectCreated:*"]
bucket = "b*"
""")
        self.req = 0

    def publish(self, raw_events: list[bytes]) -> tuple[bytes, dict[str, Any]]:
        """Send one PUB of `raw_events` (JSON texts, as a publisher wrote them) and turn the hub until it answers."""
        self.req += 1
        return self.request(inprocess.pub_frames(self.req, raw_events))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    h = InProcessHub(tmp_path_factory.mktemp("pubpath"))
    yield h
    h.close()


def _expected(d: Any, hub: InProcessHub) -> tuple[str, Any]:
    """What the hub answered before the change: ("err", None) (the PUB header's schema refuses it), ("nack", the
    error), ("unrouted", None) or ("ack", (topic, source, id))."""
    if not isinstance(d, dict):
        return "err", None
    try:
        _before(d, "", 1)
    except E.EnvelopeError as e:
        return "nack", str(e)
    # the checks the PUB path has made after reading since (hub/pubread.py's read_checked)
    if "time" in d and (why := E.time_problem(d["time"])) is not None:
        return "nack", why
    if E.DATA_BASE64 in d and (why := E.data_base64_problem(d)) is not None:
        return "nack", why
    ev = E.Event.from_dict(d)
    why = E.refused_from_outside(ev)
    if why:
        return "nack", why
    try:
        topic = ev.topic or hub.hub.router.topic_for(ev)
    except (TypeError, AttributeError) as e:  # a route's pattern against a bucket or key that is not a string
        return "err", f"{type(e).__name__}: {e}"
    data = d.get("data")
    if isinstance(data, dict) and any(isinstance(data.get(k), str) and "\0" in data[k] for k in ("bucket", "key")):
        refusal = "bucket name or object key contains a NUL byte"
    elif topic is None:
        return "unrouted", None
    elif "\0" in topic or len(topic) > 255:
        refusal = "topic names must be 1 to 255 characters without NUL bytes"
    elif ev.hops > MAX_HOPS:
        refusal = f"hop limit {MAX_HOPS} exceeded"
    else:
        return "ack", (topic, ev.source, ev.id)
    return "nack", f"event 0: {refusal}; nothing in this request was committed"


@FUZZ
@given(d=envelopes(), escaped=st.booleans())
@example(d=_bench(1, data={"bucket": "\x00b"}), escaped=False)
@example(d=_bench(2, data={"key": "\x00"}), escaped=False)
@example(d=_bench(3, topic=None, data={"bucket": 7}), escaped=False)
@example(d=_bench(4, hops=MAX_HOPS + 1), escaped=False)
@example(d=_bench(5, hops=MAX_HOPS), escaped=True)
@example(d=_bench(6, retryof="x"), escaped=False)
@example(d=_bench(7, source="bucketwire://hub/x"), escaped=False)
@example(d=_bench(8, topic="t\x00"), escaped=False)
@example(d=_bench(9, topic=None), escaped=False)
def test_the_hub_commits_the_same_bytes_or_refuses_the_same(hub: InProcessHub, d: Any, escaped: bool,
                                                            ) -> None:
    """One envelope per PUB through a real hub: the journal row holds the bytes the code before the change
    committed for it, or the PUBNACK says what it said. `escaped`: the JSON escapes non-ASCII (a lone surrogate
    always is; msgspec refuses it, and the request takes the json module's path)."""
    hub.req += 1
    if isinstance(d, dict) and isinstance(d.get("id"), str) and 0 < len(d["id"]) <= 240:
        d["id"] += f"-{hub.req}"  # a fresh (source, id): one published before would be answered as a duplicate
    try:
        text = json.dumps(d, ensure_ascii=escaped).encode()
    except UnicodeEncodeError:
        text = json.dumps(d).encode()
    kind, want = _expected(copy.deepcopy(d), hub)
    cmd, hdr = hub.publish([text])
    if kind == "err":
        assert cmd == P.ERR and (want is None or want in hdr["error"]), hdr
        return
    if kind == "nack":
        assert (cmd, hdr.get("error")) == (P.PUBNACK, want), hdr
        return
    assert cmd == P.PUBACK, hdr
    (res,) = hdr["results"]
    if kind == "unrouted":
        assert res["unrouted"] and res["seq"] is None
        return
    topic, source, eid = want
    hub.hub.journal.settle()  # staged commits go into SQLite within SETTLE_AFTER: read them there now
    row = hub.hub.journal.db.execute("SELECT topic, seq, body FROM events WHERE source = ? AND id = ?",
                                     (source, eid)).fetchone()
    assert (res["topic"], res["seq"]) == (row[0], row[1])
    if not res["duplicate"]:  # the same (source, id) again is answered with the first one's topic and seq
        assert row[0] == topic and row[2] == _before(d, topic, row[1])[1]


def test_a_mixed_request_is_answered_event_by_event_in_its_order(hub: InProcessHub) -> None:
    """The PUBACK of one request holding new events on two topics, unrouted ones, a duplicate of an event of the
    same request and one of an event committed before: one result per event, in the request's order, each with
    exactly the keys and values the hub answered before its results were built straight from the commit, and
    the received, duplicate and unrouted counters moved by what the request really did."""
    m = hub.hub.metrics
    old = _bench(900, id="mix-old", topic="mix-a")
    cmd, hdr = hub.publish([json.dumps(old).encode()])
    assert cmd == P.PUBACK, hdr
    old_seq = hdr["results"][0]["seq"]
    unrouted = {"topic": None, "data": {"bucket": "zzz"}}  # no route takes bucket "zzz"
    sent = [_bench(901, id="mix-1", topic="mix-a"), _bench(902, id="mix-2", **unrouted),
            _bench(903, id="mix-3", topic="mix-b"), _bench(904, id="mix-1", topic="mix-a"),
            _bench(905, id="mix-old", topic="mix-b"), _bench(906, id="mix-4", **unrouted),
            _bench(907, id="mix-5", topic="mix-a")]
    def counters() -> tuple[float, ...]:
        """As a scrape reads them (the registry's own API: the per-event families are read at scrape time)."""
        get = m.registry.get_sample_value
        return tuple(get(name, labels) or 0.0 for name, labels in (
            ("bucketwire_events_received_total", {"source": "zmq", "topic": "mix-a"}),
            ("bucketwire_events_received_total", {"source": "zmq", "topic": "mix-b"}),
            ("bucketwire_events_duplicate_total", {"source": "zmq"}),
            ("bucketwire_events_unrouted_total", {"source": "zmq"})))

    counts = counters()
    cmd, hdr = hub.publish([json.dumps(d).encode() for d in sent])
    assert cmd == P.PUBACK, hdr

    def res(eid: str, topic: str | None, seq: int | None, dup: bool = False) -> list[tuple[str, Any]]:
        return [("id", eid), ("topic", topic), ("seq", seq), ("duplicate", dup), ("unrouted", topic is None)]

    assert [list(r.items()) for r in hdr["results"]] == [
        res("mix-1", "mix-a", old_seq + 1), res("mix-2", None, None), res("mix-3", "mix-b", 1),
        res("mix-1", "mix-a", old_seq + 1, True), res("mix-old", "mix-a", old_seq, True), res("mix-4", None, None),
        res("mix-5", "mix-a", old_seq + 2)]
    after = counters()
    assert [b - a for a, b in zip(counts, after, strict=True)] == [2, 1, 2, 2]


def test_an_event_behind_one_that_passed_its_topic_is_still_checked(hub: InProcessHub) -> None:
    """A topic's own checks run once per request, each event's (hops, a NUL in its object key) for every event:
    an object event behind one that passed on the same topic is refused, and with it the whole request."""
    for i, bad in enumerate([{"hops": MAX_HOPS + 1}, {"data": {"key": "a\0b"}}]):
        sent = [_bench(950 + 2 * i, id=f"behind-{i}-ok", topic="behind"),
                _bench(951 + 2 * i, id=f"behind-{i}-bad", topic="behind", **bad)]
        assert all(isinstance(d["data"]["bucket"], str) for d in sent)  # object events: the inline test's case
        cmd, hdr = hub.publish([json.dumps(d).encode() for d in sent])
        assert cmd == P.PUBNACK, hdr
        assert ("hop limit" if i == 0 else "NUL") in hdr["error"], hdr
    assert "behind" not in hub.hub.journal.heads, "nothing of a refused request was committed"


def test_a_malformed_hb_from_a_peer_that_is_not_a_worker_is_refused_and_counted(hub: InProcessHub) -> None:
    """It got the 'unknown worker; send READY' ERR without its header being read, so a garbage HB was answered
    as a lost worker's and never counted as a refused frame."""
    before = hub.hub.metrics.rejected.labels("zmq", "protocol")._value.get()
    cmd, hdr = hub.request([P.HB, b"not json"])
    assert cmd == P.ERR and not hdr.get("reready"), hdr
    assert hub.hub.metrics.rejected.labels("zmq", "protocol")._value.get() == before + 1
    cmd, hdr = hub.request([P.HB, b"{}"])  # a well-formed one from a stranger: told to send READY
    assert cmd == P.ERR and hdr.get("reready") is True, hdr


# -- JSON that readers take differently: what the PUB path refuses, and what it commits --------------------------
def _nest(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HOSTILE: list[tuple[str, bytes, str, Any]] = [
    # (name, the data as the publisher wrote it, what the hub answers, the refusal's words or the data committed)
    ("overflowing-float", b'{"r":1e400}', "err", "Number out of range"),
    ("overflowing-negative", b"[-1e400]", "err", "Number out of range"),
    ("overflowing-long-float", b"[1" + b"0" * 400 + b".0]", "err", "Number out of range"),
    ("nan", b'{"r":NaN}', "ack", {"r": None}),  # the json module reads NaN and Infinity; JSON has neither
    ("infinities", b"[Infinity,-Infinity]", "ack", [None, None]),
    ("underflow", b"[1e-400]", "ack", [0.0]),
    ("ints-past-64-bits", b"[1180591620717411303424,-1180591620717411303424]", "ack",
     [2**70, -(2**70)]),
    ("int-of-401-digits", b"[1" + b"0" * 400 + b"]", "ack", [10**400]),
    ("duplicate-keys", b'{"a":1,"a":2,"bucket":"x","key":"k","bucket":"bz"}', "ack",
     {"a": 2, "bucket": "bz", "key": "k"}),
    ("lone-surrogate", b'{"k":"\\ud800"}', "nack", "invalid Unicode"),
    ("lone-surrogate-in-a-name", b'{"\\udfff":1}', "nack", "invalid Unicode"),
    ("not-utf8", b'{"k":"\xff"}', "err", "not JSON"),
    ("escaped-nul-in-key", b'{"bucket":"b","key":"a\\u0000b"}', "nack", "NUL byte"),
    ("escapes", b'{"k":"\\ud83d\\ude00 \\u00e9 \\"q\\" \\/"}', "ack", {"k": "\U0001f600 \u00e9 \"q\" /"}),
    ("nested-300", _nest(300), "ack", json.loads(_nest(300))),  # past orjson's 254 levels, within MAX_NESTING
    ("nested-600", _nest(600), "nack", "nests deeper than 512 levels"),
    ("spaces-and-number-forms", b'{ "a" : [ 1 , 2.50 , 1E2 , -0 ] ,\n "b" : true }', "ack",
     {"a": [1, 2.5, 100.0, 0], "b": True}),
]


@pytest.mark.parametrize(("name", "data", "kind", "want"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_json_that_readers_take_differently_is_refused_or_committed_as_read(
        hub: InProcessHub, name: str, data: bytes, kind: str, want: Any) -> None:
    """A published event whose `data` holds JSON that parsers disagree on (numbers past a double, NaN, integers
    past 64 bits, a key twice, escapes, lone surrogates, bytes that are not UTF-8, deep nesting): refused as the
    hub refuses it, or committed as strict JSON that every reader (the worker's msgspec, orjson, json) takes to
    the value the hub read, rendered by the hub and not passed through as the publisher wrote it. Its bucket and
    object key (routing, per-object order) are the ones a worker reads. Guards any faster PUB path that would
    keep `data` as the publisher's bytes."""
    eid = f"hostile-{name}"
    routed = name == "duplicate-keys"  # no topic: the route (bucket b*) reads the bucket
    text = (b'{"specversion":"1.0","id":"%s","source":"hostile","type":"s3:ObjectCreated:Put",%s"data":%s}'
            % (eid.encode(), b"" if routed else b'"topic":"hostile",', data))
    cmd, hdr = hub.publish([text])
    hub.hub.journal.settle()  # staged commits go into SQLite within SETTLE_AFTER: read them there now
    row = hub.hub.journal.db.execute("SELECT topic, seq, objkey, body FROM events WHERE source = ? AND id = ?",
                                     ("hostile", eid)).fetchone()
    if kind != "ack":
        assert (cmd, row) == ((P.ERR if kind == "err" else P.PUBNACK), None), hdr
        assert want in hdr["error"], hdr
        return
    assert cmd == P.PUBACK and row is not None, hdr
    topic, seq, objkey, body = row
    assert (topic, seq) == ("created" if routed else "hostile", hdr["results"][0]["seq"])
    assert body == _before(json.loads(text), topic, seq)[1]
    assert body.decode("utf-8")  # strict UTF-8
    got = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in a committed envelope"))
    assert got["data"] == want
    assert msgspec.json.decode(body)["data"] == want  # the worker's reader
    if name != "int-of-401-digits":  # orjson reads no integer past a double (a worker does not use it)
        assert orjson.loads(body)["data"] == (json.loads(json.dumps(want)) if "64" not in name else
                                              [float(x) for x in want])
    assert objkey == ("bz/k" if routed else None)


# -- PUBNACK's retry: said by every hub that sends one, read as "may retry" from one that does not -----------------
def test_a_pubnack_cannot_be_made_without_saying_whether_to_retry() -> None:
    """`retry` had a default (None: "does not say"), so a new refusal path that forgot it answered as a hub from
    before the field, which publishers read as "may retry": a request refused for good was sent again for ever."""
    with pytest.raises(TypeError, match="retry"):
        P.PubNack(error="refused")  # type: ignore[call-arg]
    for retry in (True, False):
        assert json.loads(P.enc(P.PubNack(error="x", retry=retry)))["retry"] is retry


@pytest.mark.parametrize("d", [
    pytest.param(_bench(950, hops=MAX_HOPS + 1), id="hop-limit"),
    pytest.param(_bench(951, source="bucketwire://hub/x"), id="reserved-source"),
    pytest.param(_bench(952, specversion="0.3"), id="unreadable-envelope"),
])
def test_every_refusal_of_the_hub_says_retry(hub: InProcessHub, d: dict[str, Any]) -> None:
    cmd, hdr = hub.publish([json.dumps(d).encode()])
    assert cmd == P.PUBNACK and hdr["retry"] is False, hdr


@pytest.mark.parametrize("sent,retry", [
    pytest.param({"error": "journal down"}, True, id="hub-before-the-field"),
    pytest.param({"error": "no", "retry": False}, False, id="refused-for-good"),
    pytest.param({"error": "later", "retry": True}, True, id="may-retry"),
    pytest.param({"error": "no", "retry": False, "hint": "a field of a newer hub"}, False, id="newer-hub"),
])
def test_a_pubnack_is_read_from_any_hub(sent: dict[str, Any], retry: bool) -> None:
    nack = P.read_pubnack({"req": 3, **sent})
    assert (nack.error, nack.retry, nack.req) == (sent["error"], retry, 3)
