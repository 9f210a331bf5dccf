"""The worker child's DELIVER read by a typed schema (performance.md, change 22): the envelope array decoded into
`Attributes` Structs and each `Event` built from one, or, for whatever the schema does not take, the array read
the way it always was (`read_joined`, then `read_envelope` in `handle`). Either way every envelope has the same
outcome: the same `Event` handed to the plugins (compared by repr, every field), the same refusal of a poison
envelope (its words, its topic and seq, the running record), the same events given back by BYE, the same
ProtocolError for a DELIVER that cannot be read."""

from __future__ import annotations

import json
from collections import deque
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bucketwire import envelope as E
from bucketwire import protocol as P
from bucketwire.worker import child as CH
from tests.test_fuzz import JSONV
from tests.test_pub_forms import FORMS, _envelope
from tests.test_pub_path import ATTRS, EXTENSIONS, FUZZ, HOSTILE, NOW, ODD, envelopes


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "now_iso", lambda: NOW)


def _delivered(i: int, **changes: Any) -> dict[str, Any]:
    """A bench envelope as the hub delivers it (its topic and seq written), then changed (`...` removes)."""
    return _envelope(i, {"seq": str(i + 1), **changes})


def _array(events: list[Any], escaped: bool = False) -> bytes:
    try:
        return json.dumps(events, ensure_ascii=escaped).encode()
    except UnicodeEncodeError:  # a lone surrogate: only the escaped form can carry it
        return json.dumps(events).encode()


def _outcomes(items: list[tuple[int, Any, bool]]) -> tuple[Any, ...]:
    """What the child does with a batch in hand: what BYE would give back of it unstarted, then, per event, the
    running record, the Event its plugins get (by repr: every field, its type, and key order in `data`) and what
    `handle` acks (an ok, or the refusal with its words)."""
    unstarted = CH.Child._unstarted(cast(Any, SimpleNamespace(queue=deque(items))))
    return unstarted, [_handled(*item) for item in items]


def _handled(attempt: int, raw: Any, strict: bool) -> tuple[Any, ...]:
    seen: list[str] = []
    began: list[Any] = []
    plugins = SimpleNamespace(metered=False, group="g", run=lambda event, attempt: seen.append(repr(event)) or [])
    out = CH.handle(cast(Any, plugins), attempt, raw, strict, lambda t, s: began.append((t, s)))
    return attempt, began, seen, repr(out)


def _today(frame: bytes, attempts: list[int]) -> tuple[Any, ...]:
    """The DELIVER as the child read it before the typed schema: `read_joined`, then each envelope in `handle`."""
    try:
        envs, strict = CH.read_joined([P.DELIVER, b"{}", frame], len(attempts))
    except P.ProtocolError as e:
        return ("refused", str(e))
    return ("read", _outcomes(list(zip(attempts, envs, [strict] * len(envs), strict=True))))


def _now(frame: bytes, attempts: list[int]) -> tuple[tuple[Any, ...], bool]:
    """The same through the child's reader now, and whether the typed schema took it."""
    typed = CH.read_typed([P.DELIVER, b"{}", frame], len(attempts)) is not None
    try:
        envs, strict = CH.read_delivered([P.DELIVER, b"{}", frame], len(attempts), E.Detour())
    except P.ProtocolError as e:
        return ("refused", str(e)), typed
    return ("read", _outcomes(list(zip(attempts, envs, [strict] * len(envs), strict=True)))), typed


def _same(frame: bytes, attempts: list[int] | None = None) -> bool:
    """Asserts the reader's outcome is today's for every envelope of `frame`; returns whether the schema took it."""
    attempts = attempts if attempts is not None else [1 + i % 3 for i in range(len(json.loads(frame)))]
    now, typed = _now(frame, attempts)
    assert now == _today(frame, attempts)
    if typed:  # what the schema takes, the old way reads without a refusal and hands every event to the plugins
        assert now[0] == "read" and all(seen for _, _, seen, _ in now[1][1])
    return typed


def _hub_shaped(d: dict[str, Any]) -> bool:
    """An envelope as the hub commits it: its topic a string, its seq one (digits, or an integer as before), its
    time set, no extension."""
    return (E._KNOWN.issuperset(d) and isinstance(d.get("topic"), str) and E.seq_or_none(d.get("seq")) is not None
            and bool(d.get("time")))


@pytest.mark.parametrize("escaped", [False, True])
@pytest.mark.parametrize(("name", "changes"), FORMS, ids=[f[0] for f in FORMS])
def test_each_attribute_form_is_read_as_today_and_the_typed_way_when_it_can(
        name: str, changes: dict[str, Any], escaped: bool) -> None:
    """Every attribute form of tests/test_pub_forms.py, delivered between two plain envelopes: the same Event or
    the same refusal as today; and the typed way is no detour: it takes every batch today reads without a refusal
    whose envelopes are shaped as the hub commits them, and no other."""
    d = _delivered(1, **changes)
    frame = _array([_delivered(2), d, _delivered(3)], escaped)
    typed = _same(frame)
    today = _today(frame, [1, 2, 3])
    accepted = today[0] == "read" and all(seen for _, _, seen, _ in today[1][1])
    assert typed == (accepted and _hub_shaped(d))


def test_the_forms_include_refusals_and_the_typed_way() -> None:
    taken = refused = 0
    for _, changes in FORMS:
        frame = _array([_delivered(1, **changes)])
        taken += _same(frame)
        today = _today(frame, [1])
        refused += today[0] == "read" and not today[1][1][0][2]
    assert taken >= 20 and refused >= 30


FRAMES = [
    # (name, the envelope array as the hub's bytes would carry it)
    ("duplicate-id", b'[{"specversion":"1.0","id":"a","id":"b","source":"s","type":"t","topic":"x","seq":"1",'
                     b'"time":"2026-01-01T00:00:00Z"}]'),
    ("duplicate-id-too-long", b'[{"specversion":"1.0","id":"' + b"i" * 300 + b'","id":"b","source":"s","type":"t",'
                              b'"topic":"x","seq":"1","time":"2026-01-01T00:00:00Z"}]'),
    ("duplicate-seq", b'[{"specversion":"1.0","id":"a","source":"s","type":"t","topic":"x","seq":"1","seq":"x",'
                      b'"time":"2026-01-01T00:00:00Z"}]'),
    ("surrogate-in-data", b'[{"specversion":"1.0","id":"a","source":"s","type":"t","topic":"x","seq":"1",'
                          b'"time":"2026-01-01T00:00:00Z","data":"\\ud800"}]'),
    ("nan-in-data", b'[{"specversion":"1.0","id":"a","source":"s","type":"t","topic":"x","seq":"1",'
                    b'"time":"2026-01-01T00:00:00Z","data":NaN}]'),
    ("not-an-array", b'{"specversion":"1.0"}'),
    ("not-json", b"[{"),
    ("deep", b"[" + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"]"),
    ("string-item", b'["x"]'),
    ("null-item", b"[null]"),
    ("empty", b"[]"),
]


@pytest.mark.parametrize(("name", "frame"), FRAMES, ids=[f[0] for f in FRAMES])
def test_frames_json_readers_take_differently_are_read_as_today(name: str, frame: bytes) -> None:
    for attempts in ([1], [1, 1], []):
        now, typed = _now(frame, attempts)
        assert now == _today(frame, attempts)


@pytest.mark.parametrize(("name", "data", "kind", "want"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_data_is_read_as_today(name: str, data: bytes, kind: str, want: Any) -> None:
    frame = (b'[{"specversion":"1.0","id":"h","source":"s","type":"t","topic":"x","seq":"7",'
             b'"time":"2026-01-01T00:00:00Z","data":%s}]' % data)
    _same(frame, [2])


@st.composite
def delivered_change(draw: st.DrawFn) -> dict[str, Any]:
    """A delivered envelope with one attribute set to an odd value, removed, or an extension added."""
    d = _delivered(draw(st.integers(0, 10**6)))
    what = draw(st.sampled_from(["attr", "drop", "ext", "none"]))
    if what == "attr":
        d[draw(st.sampled_from(ATTRS))] = draw(ODD)
    elif what == "drop":
        d.pop(draw(st.sampled_from(ATTRS)), None)
    elif what == "ext":
        d[draw(EXTENSIONS)] = draw(ODD)
    return d


@FUZZ
@given(events=st.lists(st.one_of(delivered_change(), envelopes(), JSONV), min_size=0, max_size=4),
       escaped=st.booleans(), off=st.sampled_from([0, 0, 0, 1, -1]))
def test_any_deliver_is_read_as_today_envelope_by_envelope(events: list[Any], escaped: bool, off: int) -> None:
    """Any array of envelopes (and of anything else), its header's count right or wrong: the same outcome."""
    frame = _array(events, escaped)
    _same(frame, [1 + i % 3 for i in range(max(0, len(events) + off))])


def test_a_group_of_extensions_is_read_the_old_way_for_a_while_then_the_typed_way_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A DELIVER the schema passes on and the old way reads (an extension on its last event) sends the next
    `DETOUR` DELIVERs the old way directly, so a group whose events carry extensions does not pay a thrown-away
    decode on each; then the schema is tried again. One the old way refuses does not count."""
    tried = []
    typed = CH.read_typed
    monkeypatch.setattr(CH, "read_typed", lambda frames, n: tried.append(frames[2]) or typed(frames, n))
    detour = E.Detour()
    plain = _array([_delivered(1), _delivered(2)])
    ext = _array([_delivered(3), _delivered(4, traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad-01")])
    broken = b"[1,"

    def read(frame: bytes) -> tuple[list[Any], bool]:
        return CH.read_delivered([P.DELIVER, b"{}", frame], 2, detour)

    with pytest.raises(P.ProtocolError):
        read(broken)
    assert detour.left == 0 and type(read(plain)[0][0]) is E.Event and tried == [broken, plain]
    got, _ = read(ext)
    assert type(got[0]) is dict and tried[-1] == ext and detour.left == E.DETOUR
    for _ in range(E.DETOUR):
        assert type(read(plain)[0][0]) is dict
    assert tried[-1] == ext and detour.left == 0
    assert type(read(plain)[0][0]) is E.Event and tried[-1] == plain
