from __future__ import annotations

import json

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
