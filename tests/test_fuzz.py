"""Property-based tests for every parser an outsider can reach.

For any input, a parser either returns envelopes that serialise and read back, or raises its one documented error
(RecordError / EnvelopeError, a 4xx at the edge). Anything else -- a TypeError, a UnicodeEncodeError at
serialisation time, a hang -- is a bug an attacker can trigger.

Examples per test: BUCKETWIRE_FUZZ_EXAMPLES (default 150, keeps the suite fast); for a long run:
    BUCKETWIRE_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketwire.envelope import EnvelopeError, Event
from bucketwire.formats import s3_records
from bucketwire.hub import ingress
from tests import minio_payloads

EXAMPLES = int(os.environ.get("BUCKETWIRE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TRICKY = st.sampled_from([
    "", "..", "../../etc/passwd", "/abs/path", "a/../../b", "\x00", "a\x00b", "\ud800", "x\udfffy", "%", "%ZZ",
    "%2e%2e%2f", "%00", "+", "a" * 5000, "\u202e", "\ufeff", "\n", "s3:ObjectCreated:Put", "1.0", "-1", "1e999",
])
TEXT = st.one_of(st.text(max_size=40), TRICKY)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=False), TEXT)
JSONV = st.recursive(SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(TEXT, kids, max_size=4)), max_leaves=12)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def mutate(data: st.DataObject, doc: Any, n: int = 3) -> Any:
    """Replace, delete or add at up to n random places of a valid document."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, n))):
        ps = paths(doc)
        p = data.draw(st.sampled_from(ps))
        if not p:
            doc = data.draw(JSONV)
            continue
        parent = doc
        for k in p[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[p[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(TEXT)] = data.draw(JSONV)
        else:
            parent[p[-1]] = data.draw(JSONV)
    return doc


def check(parse: Callable[[bytes], list[Event]], body: bytes, errors: tuple[type[Exception], ...]) -> None:
    try:
        events = parse(body)
    except errors:
        return
    assert isinstance(events, list)
    for ev in events:
        assert isinstance(ev, Event)
        raw = ev.to_json()  # must serialise (no non-JSON values)
        raw.decode("utf-8")  # strict UTF-8: no lone surrogates reach the journal (they broke the audit plugin)
        back = Event.from_dict(json.loads(raw))
        assert back.id == ev.id and back.source == ev.source
        if ev.key is not None:
            assert isinstance(ev.key, str) and "\x00" not in ev.key


def dump(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # ASCII: lone surrogates travel as \\udXXX escapes, as a hostile client sends


MINIO = json.loads(minio_payloads.body(
    minio_payloads.record("s3:ObjectCreated:Put", "photos", "a b/ü.jpg", size=3, etag="abc",
                          content_type="image/jpeg", user_metadata={"X-Amz-Meta-A": "1"}, version="v1"),
    minio_payloads.record("s3:ObjectRemoved:Delete", "photos", "x.jpg")))
SEAWEED = {"key": "/buckets/photos/a.jpg", "event_type": "create", "message": {
    "new_entry": {"name": "a.jpg", "chunks": [{"size": 3, "modified_ts_ns": 1700000000123456789, "e_tag": "x"}],
                  "attributes": {"file_size": 3, "mtime": 1700000000, "mime": "text/plain", "md5": "rL0Y20zC+Fzt"
                                 "72VPzMSk2A=="}, "extended": {"Seaweed-X-Amz-Owner": "YWxpY2U="}},
    "new_parent_path": "/buckets/photos"}}
CLOUDEVENT = {"specversion": "1.0", "id": "e1", "source": "src", "type": "t", "topic": "x", "subject": "s",
              "data": {"k": 1}, "hops": 0, "schemaversion": 1, "causationid": "c"}

PARSERS = {
    "minio": (lambda b: ingress.parse_minio(b, "primary"), (s3_records.RecordError,), MINIO),
    "seaweedfs": (lambda b: ingress.parse_seaweedfs(b, "primary"), (s3_records.RecordError,), SEAWEED),
    "cloudevents": (lambda b: ingress.parse_cloudevents(b, "primary"), (s3_records.RecordError,), CLOUDEVENT),
}


def test_templates_are_valid() -> None:
    for name, (parse, _, doc) in PARSERS.items():
        assert parse(dump(doc)), name


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(body=st.binary(max_size=300))
def test_parsers_on_raw_bytes(name: str, body: bytes) -> None:
    parse, errors, _ = PARSERS[name]
    check(parse, body, errors)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_parsers_on_mutated_documents(name: str, data: st.DataObject) -> None:
    parse, errors, doc = PARSERS[name]
    check(parse, dump(mutate(data, doc)), errors)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(doc=JSONV)
def test_parsers_on_arbitrary_json(name: str, doc: Any) -> None:
    parse, errors, _ = PARSERS[name]
    check(parse, dump(doc), errors)


@FUZZ
@given(data=st.data())
def test_envelope_from_dict(data: st.DataObject) -> None:
    d = mutate(data, CLOUDEVENT) if data.draw(st.booleans()) else data.draw(JSONV)
    try:
        ev = Event.from_dict(d)
    except EnvelopeError:
        return
    back = Event.from_dict(json.loads(ev.to_json()))
    assert back.to_dict() == ev.to_dict()


def _parse_pub(body: bytes) -> list[Event]:
    """The hub's PUB path: the header as `decode_pub` reads it, each envelope as `Hub._on_pub` builds it (without
    the Unicode check when msgspec read the frame)."""
    from bucketwire.hub.loop import decode_pub

    pub, strict = decode_pub(body)
    return [Event.from_dict(d, text_checked=strict) for d in pub.events]


@FUZZ
@given(data=st.data())
def test_pub_frame(data: st.DataObject) -> None:
    """A lone surrogate anywhere in a published envelope is refused, whichever decoder read the frame. (The hub
    answers any ValueError of a frame's handling with ERR: ProtocolError, EnvelopeError, UnicodeEncodeError.)"""
    events = [mutate(data, CLOUDEVENT) for _ in range(data.draw(st.integers(1, 3)))]
    check(_parse_pub, dump({"req": 1, "events": events}), (ValueError,))


SHORT_NUMBER = st.builds(lambda m, e, neg: f"{'-' if neg else ''}{m}e{e}", st.integers(1, 9), st.integers(-30, 30),
                         st.booleans())


def _raw_json(data: st.DataObject, v: Any) -> str:
    """`v` as JSON text the way any client may write it: floats also in the shortest exponent form, the worst case
    for how much longer the hub's own rendering gets."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_raw_json(data, x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_raw_json(data, x) for x in v) + "]"
    if isinstance(v, float) and data.draw(st.booleans()):
        return data.draw(SHORT_NUMBER)
    return json.dumps(v)


@FUZZ
@given(data=st.data())
def test_pub_envelope_bound_holds(data: st.DataObject) -> None:
    """The hub skips rendering an event to measure it when a bound computed from the PUB header's size says it
    fits under [hub] max_event_bytes; an envelope over that bound would let an oversized event through."""
    from bucketwire.envelope import envelope_bytes
    from bucketwire.hub.loop import decode_pub, pub_envelope_bound

    events = []
    for _ in range(data.draw(st.integers(1, 3))):
        ev = dict(CLOUDEVENT, id=data.draw(st.text(min_size=1, max_size=20)), data=data.draw(JSONV))
        for k in ("subject", "causationid", "hops", "schemaversion", "topic"):
            if data.draw(st.booleans()):
                del ev[k]
        events.append(ev)
    raw = ('{"req":1,"events":[' + ",".join(_raw_json(data, e) for e in events) + "]}").encode("utf-8", "surrogatepass")
    try:
        pub, strict = decode_pub(raw)
        parsed = [Event.from_dict(d, text_checked=strict) for d in pub.events]
    except ValueError:  # refused at the door: nothing to measure
        return
    topic = data.draw(st.text(min_size=1, max_size=300))
    for ev in parsed:
        assert envelope_bytes(ev, topic) <= pub_envelope_bound(len(raw)) + 6 * len(topic)


def test_pub_envelope_bound_holds_for_the_worst_case() -> None:
    """Large enough that the constant for hub-added attributes cannot hide it: thousands of floats written in the
    shortest form, which the hub renders 4.5 times longer."""
    from bucketwire.envelope import envelope_bytes
    from bucketwire.hub.loop import decode_pub, pub_envelope_bound

    floats = "[" + ",".join(["1e15"] * 5000) + "]"
    body = json.dumps(dict(CLOUDEVENT, data=None)).replace('"data": null', '"data": ' + floats)
    raw = ('{"req":1,"events":[' + body + "]}").encode()
    pub, strict = decode_pub(raw)
    (ev,) = [Event.from_dict(d, text_checked=strict) for d in pub.events]
    assert envelope_bytes(ev, "t") > 3 * len(raw)  # the case is as bad as it should be
    assert envelope_bytes(ev, "t") <= pub_envelope_bound(len(raw)) + 6


@pytest.mark.parametrize("key", ["%ff%fe.jpg", "a/%C3%28.png"])
def test_minio_key_escaping_invalid_utf8_is_a_record_error(key: str) -> None:
    """A record key whose %-escapes are not UTF-8 is the sender's mistake: a one-line 400 reason naming the
    field, not the 'parser failed' traceback a parser bug gets."""
    body = minio_payloads.body(minio_payloads.record("s3:ObjectCreated:Put", "photos", "x", size=1))
    doc = json.loads(body)
    doc["Records"][0]["s3"]["object"]["key"] = key
    with pytest.raises(s3_records.RecordError, match=r"Records\[0\]\.s3\.object\.key .*not UTF-8"):
        ingress.parse_minio(dump(doc), "primary")
