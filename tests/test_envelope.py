from __future__ import annotations

import json
import re
from datetime import datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bucketwire import SCHEMA_VERSION, EnvelopeError, Event, SchemaVersionError
from bucketwire.envelope import follow_on_id


def test_round_trip_keeps_every_attribute_and_extension():
    ev = Event(id="1", source="urn:x", type="t", subject="a b/ü", data={"k": [1, 2]}, topic="tp", seq=7,
               causationid="c", hops=2, extensions={"traceparent": "00-abc"})
    back = Event.from_json(ev.to_json())
    assert back == ev
    assert json.loads(ev.to_json())["specversion"] == "1.0"


def test_newer_schema_is_refused_loudly():
    d = Event(id="1", source="s", type="t").to_dict()
    d["schemaversion"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError, match="newer than this bucketwire understands"):
        Event.from_dict(d)


@pytest.mark.parametrize("patch", [
    {"specversion": "0.3"}, {"id": ""}, {"source": None}, {"type": 5}, {"seq": 0}, {"seq": True},
    {"hops": -1}, {"subject": 3}, {"schemaversion": "1"}, {"seq": "0"}, {"seq": "07"}, {"seq": 2**63},
])
def test_invalid_envelopes_are_refused(patch):
    d = {**Event(id="1", source="s", type="t").to_dict(), **patch}
    with pytest.raises(EnvelopeError):
        Event.from_dict(d)


def test_follow_on_ids_are_deterministic_and_distinct():
    a = follow_on_id("cause", "g", "p", 0, "t")
    assert a == follow_on_id("cause", "g", "p", 0, "t")
    assert len({a, follow_on_id("cause", "g", "p", 1, "t"), follow_on_id("cause", "g2", "p", 0, "t"),
                follow_on_id("other", "g", "p", 0, "t"), follow_on_id("cause", "g", "p", 0, "t", None, "urn:s1"),
                follow_on_id("cause", "g", "p", 0, "t", None, "urn:s2")}) == 6


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3), max_leaves=10))
def test_arbitrary_json_is_either_an_event_or_an_envelope_error(doc):
    try:
        Event.from_dict(doc) if isinstance(doc, dict) else Event.from_json(json.dumps(doc))
    except EnvelopeError:
        pass


@example("9223372036854775807")
@example("9223372036854775808")
@example("9999999999999999999")
@example("٣")
@given(st.one_of(
    st.text(alphabet="0123456789", max_size=22),
    st.text(alphabet="0123456789٠١٢³ +-_x", max_size=22),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
))
def test_from_dict_reads_a_seq_exactly_as_parse_seq(raw: str) -> None:
    """from_dict reads the common seq (decimal digits) without parse_seq; for every string the two agree: the same
    seq, or both refuse it."""
    from bucketwire.envelope import parse_seq

    base = {"specversion": "1.0", "id": "1", "source": "s", "type": "t"}
    try:
        want: int | None = parse_seq(raw)
    except EnvelopeError:
        want = None
    if want is None:
        with pytest.raises(EnvelopeError):
            Event.from_dict({**base, "seq": raw})
    else:
        assert Event.from_dict({**base, "seq": raw}).seq == want


_RFC3339_SHAPE = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", re.ASCII)


def _is_rfc3339_reference(value: str) -> bool:
    """`is_rfc3339` as it was written before its fast path (performance.md, change 23): the shape, then the
    instant as the standard library reads it."""
    if not _RFC3339_SHAPE.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper())
    except ValueError:
        return False
    return True


def _stamp(year: int, month: int, day: int, hour: int, minute: int, second: int, fraction: str, zone: str,
           t: str) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}{t}{hour:02d}:{minute:02d}:{second:02d}{fraction}{zone}"


_ZONES = st.one_of(
    st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "UTC", "+0100", "+01", " Z", "Z "]),
    st.builds(lambda s, h, m: f"{s}{h:02d}:{m:02d}", st.sampled_from("+-"), st.integers(0, 26),
              st.integers(0, 61)),
)
_STAMPS = st.builds(
    _stamp, st.integers(0, 10_000), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61),
    st.integers(0, 61), st.one_of(st.just(""), st.just("."), st.text("0123456789", min_size=1, max_size=12).map(
        lambda f: "." + f), st.just(",5")), _ZONES, st.sampled_from(["T", "t", " ", "_"]),
)
_OTHER_DIGITS = "\u0660\u0661\u0662\u06f3\u0966\uff11\U0001d7ce\u00b2"


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    """A timestamp with one character replaced, inserted or removed: a digit of another script, a letter, a
    separator."""
    s = draw(_STAMPS)
    i = draw(st.integers(0, len(s)))
    c = draw(st.sampled_from(_OTHER_DIGITS + "0519TtZz:-+. \n\0é"))
    how = draw(st.sampled_from(["replace", "insert", "remove"]))
    if how == "insert":
        return s[:i] + c + s[i:]
    return s[:i] + ("" if how == "remove" else c) + s[i + 1:]


@example("2024-02-29T10:00:00Z")
@example("2023-02-29T10:00:00Z")
@example("2100-02-29T10:00:00Z")
@example("2000-02-29T10:00:00Z")
@example("2024-02-30T10:00:00Z")
@example("2024-04-31T10:00:00Z")
@example("2024-12-31T23:59:59.999999999Z")
@example("2024-13-01T10:00:00Z")
@example("2024-00-01T10:00:00Z")
@example("2024-01-00T10:00:00Z")
@example("0000-01-01T00:00:00Z")
@example("0001-01-01T00:00:00Z")
@example("9999-12-31T23:59:59+23:59")
@example("2024-05-01T24:00:00Z")
@example("2024-05-01T23:60:00Z")
@example("2024-05-01T23:59:60Z")
@example("2024-05-01T10:00:00+24:00")
@example("2024-05-01T10:00:00+25:00")
@example("2024-05-01T10:00:00-23:60")
@example("2024-05-01t10:00:00z")
@example("2024-05-01T10:00:00.Z")
@example("\u0662\u0660\u0662\u0664-05-01T10:00:00Z")
@example("2024-05-01T10:00:00Z\n")
@given(st.one_of(_STAMPS, _mutated(), st.datetimes().map(lambda d: d.isoformat() + "Z"), st.text(max_size=40)))
def test_is_rfc3339_answers_as_the_shape_and_the_standard_library_do(value: str) -> None:
    """`is_rfc3339` takes the common timestamp by one pattern that encodes the ranges (month, day of month, hour,
    minute, second, offset); whatever it does not take is asked the way it always was. The answers are those of
    the pattern and `datetime.fromisoformat` together, for valid, invalid and edge timestamps alike (29 February
    in leap and other years, an hour 24, an offset of 24 or 25 hours, lowercase t and z, digits of other scripts,
    fractions of any length)."""
    from bucketwire.envelope import is_rfc3339

    assert is_rfc3339(value) is _is_rfc3339_reference(value)


def test_the_fast_pattern_takes_every_date_the_standard_library_does_and_no_other() -> None:
    """The ends of every month of every year (0000 to 9999, the 28th to the 31st): `is_rfc3339`'s pattern takes
    exactly the dates `fromisoformat` reads, 29 February in leap years included, so none of them is left to the
    slow way (the differential above would not see that) and none it should refuse is taken."""
    from bucketwire.envelope import _RFC3339_INSTANT

    wrong = [s for y in range(10_000) for m in range(1, 13) for d in range(28, 33)
             if bool(_RFC3339_INSTANT(s := f"{y:04d}-{m:02d}-{d}T23:59:59.5+05:30")) is not _is_rfc3339_reference(s)]
    assert wrong == []
