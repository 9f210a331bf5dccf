"""CloudEvents 1.0 conformance against real hub and worker processes, judged by the official SDK.

What leaves the hub (`tail` output, follow-ons) must be read by the SDK as valid CloudEvents, with every extension
of a type the spec allows, and the HTTP ingress must take what the SDK sends in binary mode as well as in
structured and batch mode.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import pytest

from bucketwire import EnvelopeError, Event
from tests.cloudevents_check import assert_cloudevent
from tests.fixtures_hub import wait_for

GROUPS = """
[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"

[groups.f]
topics = ["follow"]
plugins = []
start = "earliest"
"""


# -- the envelope ------------------------------------------------------------------------------------------------
def test_seq_past_32_bits_stays_a_valid_cloudevent():
    """At 30,000 events/s a topic passes 2^31 in a day; the envelope must stay valid after that."""
    big = 2**31 + 7
    raw = Event(id="1", source="urn:x", type="t", topic="jobs", seq=big, data={"k": 1}).to_json()
    ce = assert_cloudevent(raw)
    assert ce.get_extension("seq") == str(big)
    assert Event.from_json(raw).seq == big


def test_seq_reader_accepts_the_old_integer_form_and_refuses_non_decimal_strings():
    base = Event(id="1", source="s", type="t").to_dict()
    assert Event.from_dict({**base, "seq": 42}).seq == 42  # written by an older hub
    assert Event.from_dict({**base, "seq": "42"}).seq == 42
    for bad in ("0", "042", "-1", "4e2", " 4", "", "1" * 20):
        with pytest.raises(EnvelopeError, match="seq"):
            Event.from_dict({**base, "seq": bad})


# -- what leaves the hub -----------------------------------------------------------------------------------------
def read_tail(s, topics: list[str], n: int) -> list[bytes]:
    """The first `n` lines `bucketwire tail --from-seq 1` prints, raw."""
    tail = subprocess.Popen([sys.executable, "-m", "bucketwire", "tail", "-c", str(s.cfg_path), *topics,
                             "--from-seq", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=s.env)
    lines: list[bytes] = []

    def reader() -> None:
        assert tail.stdout is not None
        for line in tail.stdout:
            lines.append(line)

    threading.Thread(target=reader, daemon=True).start()
    try:
        wait_for(lambda: len(lines) >= n, 30, f"tail to print {n} lines")
    finally:
        tail.terminate()
        tail.wait(10)
    return lines[:n]


def test_tail_output_and_follow_ons_are_valid_cloudevents(stack_factory):
    s = stack_factory(GROUPS)
    s.start_hub()
    s.start_worker("a")
    s.start_worker("f")
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:ce-test", type="test.job", topic="jobs",
                                subject=f"k{i}", data={"n": i, "follow": 2}) for i in range(3)])
    wait_for(lambda: len([h for h in s.handled() if h["g"] == "f"]) == 6, 20, "group f to handle 6 follow-ons")
    for line in read_tail(s, ["jobs", "follow"], 9):
        ce = assert_cloudevent(line)
        assert ce.get_extension("topic") in ("jobs", "follow")
        assert isinstance(ce.get_extension("seq"), str) and ce.get_extension("seq").isdigit()
        if ce.get_extension("topic") == "follow":
            assert ce.get_extension("causationid")
    # workers read the new seq form: the plugin sees integer seqs, and every event was acked
    assert sorted(h["s"] for h in s.handled() if h["g"] == "f") == [1, 2, 3, 4, 5, 6]
    assert s.status()["groups"]["f"]["lag"] == 0
