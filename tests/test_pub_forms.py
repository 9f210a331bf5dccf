"""Attribute forms on the hub's PUB path: every refusal an attribute can earn (seq in its forms, hops and
schemaversion as booleans, floats, strings or out of range, extensions with odd names or values, the string
attributes' types and limits, time, data_base64) and the forms that are accepted, each through a real hub
(in-process).

The yardstick is the PUB path's own reader, `read_envelope` building an `unsent_envelope`, then the time,
data_base64 and hub-only checks, as `Hub._on_pub` ran them before the typed pre-check (hub/pubread.py): the hub
must commit the bytes it builds, or refuse with the words it says. A faster way to the same dict must keep both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bucketwire import envelope as E
from bucketwire import protocol as P
from bucketwire.hub import pubread
from bucketwire.hub.pubread import decode_pub, read_checked, read_typed
from tests.test_fuzz import JSONV, TEXT
from tests.test_pub_path import ATTRS, FUZZ, HOSTILE, MAX_HOPS, NOW, ODD, InProcessHub, _bench, envelopes


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "now_iso", lambda: NOW)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    h = InProcessHub(tmp_path_factory.mktemp("pubforms"))
    yield h
    h.close()


MAX = E.MAX_SEQ
FORMS: list[tuple[str, dict[str, Any]]] = [
    # seq: the hub takes the publisher's only to check it (it commits its own)
    ("seq-digits", {"seq": "42"}), ("seq-int", {"seq": 42}), ("seq-max-digits", {"seq": str(MAX)}),
    ("seq-max-int", {"seq": MAX}), ("seq-18-digits", {"seq": "9" * 18}), ("seq-null", {"seq": None}),
    ("seq-zero", {"seq": 0}), ("seq-zero-digits", {"seq": "0"}), ("seq-negative", {"seq": -1}),
    ("seq-leading-zero", {"seq": "007"}), ("seq-past-max-digits", {"seq": str(MAX + 1)}),
    ("seq-19-nines", {"seq": "9" * 19}), ("seq-past-max-int", {"seq": MAX + 1}), ("seq-past-64-bits", {"seq": 2**70}),
    ("seq-true", {"seq": True}), ("seq-false", {"seq": False}), ("seq-float", {"seq": 1.0}),
    ("seq-decimal", {"seq": "1.5"}), ("seq-space", {"seq": " 1"}), ("seq-newline", {"seq": "1\n"}),
    ("seq-empty", {"seq": ""}), ("seq-arabic-digit", {"seq": "\u0663"}), ("seq-list", {"seq": [1]}),
    ("seq-object", {"seq": {"seq": "1"}}), ("seq-plus", {"seq": "+1"}),
    # hops
    ("hops-zero", {"hops": 0}), ("hops-two", {"hops": 2}), ("hops-true", {"hops": True}),
    ("hops-false", {"hops": False}), ("hops-negative", {"hops": -1}), ("hops-float", {"hops": 1.0}),
    ("hops-string", {"hops": "1"}), ("hops-null", {"hops": None}), ("hops-past-64-bits", {"hops": 2**70}),
    # schemaversion
    ("schemaversion-one", {"schemaversion": 1}), ("schemaversion-true", {"schemaversion": True}),
    ("schemaversion-false", {"schemaversion": False}), ("schemaversion-zero", {"schemaversion": 0}),
    ("schemaversion-newer", {"schemaversion": E.SCHEMA_VERSION + 1}), ("schemaversion-huge", {"schemaversion": 2**70}),
    ("schemaversion-float", {"schemaversion": 1.0}), ("schemaversion-string", {"schemaversion": "1"}),
    ("schemaversion-null", {"schemaversion": None}),
    # specversion, id, source, type
    ("specversion-float", {"specversion": 1.0}), ("specversion-other", {"specversion": "1"}),
    ("specversion-null", {"specversion": None}), ("specversion-missing", {"specversion": ...}),
    ("id-empty", {"id": ""}), ("id-int", {"id": 5}), ("id-missing", {"id": ...}), ("id-256", {"id": "i" * 256}),
    ("id-257", {"id": "i" * 257}), ("id-256-astral", {"id": "\U0001f600" * 256}),
    ("id-257-astral", {"id": "\U0001f600" * 257}), ("source-1024", {"source": "s" * 1024}),
    ("source-1025", {"source": "s" * 1025}), ("type-257", {"type": "t" * 257}), ("type-null", {"type": None}),
    ("source-list", {"source": ["s"]}),
    # the optional strings
    ("subject", {"subject": "sub"}), ("subject-int", {"subject": 5}), ("subject-null", {"subject": None}),
    ("topic-int", {"topic": 5}), ("topic-null", {"topic": None}), ("topic-empty", {"topic": ""}),
    ("causationid", {"causationid": "c"}), ("causationid-list", {"causationid": []}),
    ("causationid-null", {"causationid": None}),
    # time
    ("time-missing", {"time": ...}), ("time-null", {"time": None}), ("time-empty", {"time": ""}),
    ("time-int", {"time": 5}), ("time-words", {"time": "yesterday"}), ("time-no-zone", {"time": "2024-05-01T10:00:00"}),
    ("time-offset", {"time": "2024-05-01T10:00:00+02:00"}), ("time-feb-30", {"time": "2024-02-30T10:00:00Z"}),
    # datacontenttype and data: taken as they come
    ("datacontenttype-text", {"datacontenttype": "text/plain"}), ("datacontenttype-zero", {"datacontenttype": 0}),
    ("datacontenttype-empty", {"datacontenttype": ""}), ("datacontenttype-object", {"datacontenttype": {"a": 1}}),
    ("datacontenttype-false", {"datacontenttype": False}), ("data-missing", {"data": ...}),
    ("data-null", {"data": None}), ("data-list", {"data": [1, "x"]}),
    # extensions
    ("extension", {"myext": "v"}), ("extension-odd-name", {"Bad-Name!": 1}), ("extension-empty-name", {"": 1}),
    ("extension-object", {"traceparent": {"a": [1, 2]}}), ("extension-null", {"myext": None}),
    ("extension-surrogate-value", {"myext": "\ud800"}), ("extension-surrogate-name", {"\udc00x": 1}),
    ("extension-hub-steering", {"targetgroup": "g"}), ("extension-hub-root", {"rootid": "r"}),
    ("extension-hub-retry", {"retryof": "x"}), ("extension-data_base64", {"data_base64": "aGk=", "data": ...}),
    ("extension-data_base64-null-data", {"data_base64": "aGk=", "data": None}),
    ("extension-data_base64-beside-data", {"data_base64": "aGk="}),
    ("extension-data_base64-not-base64", {"data_base64": "a!", "data": ...}),
    ("extension-data_base64-int", {"data_base64": 5, "data": ...}),
    # the hub's own sources
    ("source-hub", {"source": "bucketwire://hub/x"}), ("source-cli", {"source": "bucketwire://cli/x"}),
]


def _envelope(i: int, changes: dict[str, Any]) -> dict[str, Any]:
    d = {**_bench(i), "topic": "forms"}
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def _today(d: dict[str, Any]) -> tuple[str, Any]:
    """("nack", the refusal) or ("ack", the unsent envelope), as the PUB path read one envelope before the typed
    pre-check: its reader, then the time, data_base64 and hub-only checks (and the hop limit this hub sets)."""
    try:
        env = E.read_envelope(E.unsent_envelope, d)
        if "time" in d and (why := E.time_problem(d["time"])) is not None:
            raise E.EnvelopeError(why)
        if (why := E.data_base64_problem(d)) is not None:
            raise E.EnvelopeError(why)
    except E.EnvelopeError as e:
        return "nack", str(e)
    why = E.outside_refusal(env["id"], env["source"], env)
    if not why and env["hops"] > MAX_HOPS:  # the topic's checks (the hub's own, after these)
        why = f"event 0: hop limit {MAX_HOPS} exceeded; nothing in this request was committed"
    return ("nack", why) if why else ("ack", env)


@pytest.mark.parametrize(("name", "changes"), FORMS, ids=[f[0] for f in FORMS])
@pytest.mark.parametrize("escaped", [False, True], ids=["utf8", "escaped"])
def test_each_attribute_form_is_committed_or_refused_as_the_pub_path_read_it(
        hub: InProcessHub, name: str, changes: dict[str, Any], escaped: bool) -> None:
    """One envelope per PUB: refused with the words `read_envelope` and the time, data_base64 and hub-only checks
    say, or committed as the envelope they build, byte for byte. `escaped`: the JSON escapes non-ASCII (msgspec
    refuses a lone surrogate escape; the request then takes the json module's path)."""
    hub.req += 1
    d = _envelope(hub.req, changes)
    if isinstance(d.get("id"), str) and 0 < len(d["id"]) <= 240:
        d["id"] += f"-{hub.req}"  # a fresh (source, id)
    elif isinstance(d.get("source"), str) and 0 < len(d["source"]) <= 1000:
        d["source"] += f"-{hub.req}"
    try:
        text = json.dumps(d, ensure_ascii=escaped).encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON carries it escaped only
        text = json.dumps(d).encode()
    kind, want = _today(json.loads(text))
    cmd, hdr = hub.publish([text])
    if kind == "nack":
        assert (cmd, hdr.get("error")) == (P.PUBNACK, want), hdr
        return
    assert cmd == P.PUBACK, hdr
    (res,) = hdr["results"]
    assert not res["duplicate"] and not res["unrouted"], res
    topic = want["topic"] or hub.hub.router.topic_of(want["type"], want["data"])
    hub.hub.journal.settle()  # staged commits go into SQLite within SETTLE_AFTER: read them there now
    row = hub.hub.journal.db.execute("SELECT topic, seq, body FROM events WHERE source = ? AND id = ?",
                                     (want["source"], want["id"])).fetchone()
    assert (row[0], row[1]) == (res["topic"], res["seq"]) == (topic, res["seq"])
    want["topic"] = topic
    assert row[2] == E.render(E.pre_render(want), row[1])


def test_the_forms_cover_both_answers() -> None:
    """The table above holds accepted forms and refused ones of each attribute (else it tests one side)."""
    kinds = {name.split("-")[0]: set() for name, _ in FORMS}  # type: dict[str, set[str]]
    for i, (name, changes) in enumerate(FORMS):
        kinds[name.split("-")[0]].add(_today(_envelope(i, changes))[0])
    for attr in ("seq", "hops", "schemaversion", "id", "time", "extension", "subject", "causationid"):
        assert kinds[attr] == {"ack", "nack"}, attr


# -- the typed pre-check against the checked path, request by request ----------------------------------------------
def _checked(raw: bytes) -> tuple[Any, ...]:
    """How the checked path (`decode_pub`, then `read_checked`: the PUB path before the typed pre-check) takes a
    PUB header: ("err", its words), ("nack", the error's type and words) or ("ok", req, envelopes)."""
    try:
        pub, strict = decode_pub(raw)
    except P.ProtocolError as e:
        return "err", str(e)
    try:
        return "ok", pub.req, read_checked(pub.events, strict)
    except E.EnvelopeError as e:
        return "nack", type(e), str(e)


def _same_request(raw: bytes) -> bool:
    """Whether the typed pre-check took `raw`; when it did, it read what the checked path reads: the same request
    id and envelopes, key order, types (True is not 1, 1.0 is not 1) and rendered bytes included."""
    fast = read_typed(raw)
    if fast is None:
        return False
    want = _checked(raw)
    assert want[0] == "ok", (want, fast)
    assert repr(fast) == repr(want[1:])
    assert [E.render(E.pre_render(e), 7) for e in fast[1]] == [E.render(E.pre_render(e), 7) for e in want[2]]
    return True


def _pub(events: list[Any], req: Any = 1, escaped: bool = False) -> bytes:
    try:
        return json.dumps({"req": req, "events": events}, ensure_ascii=escaped).encode()
    except UnicodeEncodeError:
        return json.dumps({"req": req, "events": events}).encode()


@st.composite
def one_change(draw: st.DrawFn) -> dict[str, Any]:
    """A bench envelope with one attribute set to an odd value (of any type) or removed: one that is refused is
    refused for that attribute alone, so the pre-check must see to it."""
    d = _bench(draw(st.integers(0, 10**6)))
    k = draw(st.sampled_from(ATTRS))
    if draw(st.booleans()):
        d.pop(k, None)
    else:
        d[k] = draw(ODD)
    return d


@FUZZ
@given(d=st.one_of(one_change(), envelopes()), escaped=st.booleans())
def test_the_typed_pre_check_takes_only_what_the_checked_path_accepts_and_reads_it_the_same(
        d: Any, escaped: bool) -> None:
    """For any envelope: the typed pre-check either passes its PUB on (then the checked path answers, as it
    always did) or reads exactly the envelope the checked path reads from it, and so commits the same bytes."""
    _same_request(_pub([d], 1, escaped))


@FUZZ
@given(events=st.lists(st.one_of(one_change(), envelopes(), JSONV), min_size=1, max_size=4), escaped=st.booleans(),
       req=st.one_of(st.integers(-5, 5), TEXT, st.none(), st.booleans(), st.floats(allow_nan=False)))
def test_a_request_of_several_is_read_by_the_typed_pre_check_whole_or_not_at_all(
        events: list[Any], escaped: bool, req: Any) -> None:
    """Several envelopes in one PUB, any request id: the same, for the request as a whole."""
    _same_request(_pub(events, req, escaped))


@pytest.mark.parametrize(("name", "changes"), FORMS, ids=[f[0] for f in FORMS])
def test_each_accepted_form_without_extensions_takes_the_typed_way(name: str, changes: dict[str, Any]) -> None:
    """The pre-check is no detour: every form the table accepts that has no extension is read the typed way (and
    read as the checked path reads it); every refused one is passed on to the checked path, for its words."""
    d = _envelope(1, changes)
    events = [_bench(2), d, _bench(3)]  # its neighbours take the typed way alone
    assert _same_request(_pub([_bench(2), _bench(3)]))
    accepted = _checked(_pub(events))[0] == "ok"
    assert _same_request(_pub(events)) == (accepted and E._KNOWN.issuperset(d)), _checked(_pub(events))


@pytest.mark.parametrize(("name", "changes"), FORMS, ids=[f[0] for f in FORMS])
def test_read_pub_says_typed_only_of_envelopes_without_an_extension(
        monkeypatch: pytest.MonkeyPatch, name: str, changes: dict[str, Any]) -> None:
    """`read_pub` tells the hub's loop whether the typed schema read the request: then no envelope carries an
    extension (the schema takes none), so the loop tests only their sources for the hub's own, not their
    attributes for a hub-only extension; read the checked way, it tests both, as before."""
    monkeypatch.setattr(pubread, "_detour", E.Detour())
    raw = _pub([_bench(2), _envelope(1, changes), _bench(3)])
    try:
        req, envs, typed = pubread.read_pub(raw)
    except (pubread.PubRefused, P.ProtocolError):
        return
    assert (req, envs) == _checked(raw)[1:]
    assert typed is _same_request(raw)
    assert not typed or all(E._KNOWN.issuperset(env) for env in envs)


@pytest.mark.parametrize(("name", "data", "kind", "want"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_json_that_readers_take_differently_is_read_the_same_by_the_typed_pre_check(
        name: str, data: bytes, kind: str, want: Any) -> None:
    """The hostile `data` of tests/test_pub_path.py as the pre-check reads it: as the checked path does, or not
    at all (then the checked path answers: what msgspec does not read, NaN say, the json module reads there)."""
    raw = (b'{"req":1,"events":[{"specversion":"1.0","id":"h","source":"s","type":"t","data":%s}]}' % data)
    assert _same_request(raw) == (_checked(raw)[0] == "ok" and decode_pub(raw)[1])


def test_a_publisher_of_extensions_is_read_the_checked_way_for_a_while_then_the_typed_way_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request the typed schema passes on and the checked path accepts (an extension on its last event) sends the
    next `DETOUR` requests the checked way directly, so a publisher of extensions does not pay a thrown-away decode
    on each; then the schema is tried again. A refused request does not: a peer whose requests are refused cannot
    turn the typed way off. The answers are the checked path's throughout."""
    monkeypatch.setattr(pubread, "_detour", E.Detour())
    tried = []
    typed = pubread.read_typed
    monkeypatch.setattr(pubread, "read_typed", lambda raw: tried.append(raw) or typed(raw))
    plain = _pub([_bench(1), _bench(2)])
    ext = _pub([_bench(3), {**_bench(4), "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}])
    refused = _pub([_bench(5), {**_bench(6), "hops": True}])
    with pytest.raises(pubread.PubRefused):
        pubread.read_pub(refused)
    assert pubread.read_pub(plain) == (*_checked(plain)[1:], True) and tried == [refused, plain]
    assert pubread.read_pub(ext) == (*_checked(ext)[1:], False) and tried[-1] == ext
    del tried[:]
    for _ in range(E.DETOUR):
        assert pubread.read_pub(plain) == (*_checked(plain)[1:], False)
    assert tried == []
    assert pubread.read_pub(plain) == (*_checked(plain)[1:], True) and tried == [plain]
