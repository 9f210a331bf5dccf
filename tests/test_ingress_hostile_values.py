"""What a hostile or broken client sends, and what the hub answers: a refusal quotes the client's value clipped
(never a megabyte of it back, nor into the log), and a CloudEvent's `data_base64` is checked as the JSON format
says before anything is committed."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat

from bucketwire.client import HubRefused
from bucketwire.envelope import Event
from tests.fixtures_hub import Stack, wait_for
from tests.test_ingress_guarantees import ROUTE, ce, head

StackFactory = Callable[..., Stack]

HUGE_TEXT = "A" * 900_000
HUGE_INT = 10**4000  # near the most digits Python's json module reads (4300)


@pytest.mark.parametrize("attr,value", [
    pytest.param("specversion", HUGE_TEXT, id="specversion-text"),
    pytest.param("schemaversion", HUGE_TEXT, id="schemaversion-text"),
    pytest.param("schemaversion", HUGE_INT, id="schemaversion-int"),
    pytest.param("schemaversion", -HUGE_INT, id="schemaversion-negative-int"),
    pytest.param("seq", HUGE_TEXT, id="seq-text"),
    pytest.param("seq", HUGE_INT, id="seq-int"),
    pytest.param("hops", HUGE_TEXT, id="hops-text"),
    pytest.param("hops", -HUGE_INT, id="hops-negative-int"),
    pytest.param("time", [HUGE_TEXT], id="time-list"),
])
def test_a_huge_value_is_refused_clipped_and_named(stack_factory: StackFactory, attr: str, value: Any) -> None:
    s = stack_factory(ROUTE)
    s.start_hub()
    code, body = s.post("/events", json.dumps(ce(1, **{attr: value})).encode())
    assert code == 400, str(body)[:300]
    err = body["error"]
    assert len(err) < 400, f"{len(err)} characters answered: {err[:300]}"
    assert attr in err, err
    assert head(s, "x") == 0
    log = s.dump_logs(10**8)
    assert "A" * 1000 not in log and "0" * 1000 not in log, "the value went whole into the hub's log"


# -- data_base64: the JSON format's binary data ------------------------------------------------------------------
GROUP_X = ROUTE.replace("plugins = []", 'plugins = []\nstart = "earliest"')


def _sdk_reads(d: dict[str, Any]) -> bool:
    try:
        JSONFormat().read(None, json.dumps(d))
    except Exception:
        return False
    return True


@pytest.mark.parametrize("extra,why", [
    pytest.param({"data_base64": 5}, "must be a string", id="not-a-string"),
    pytest.param({"data_base64": "!!not*base64"}, "not valid base64", id="not-base64"),
    pytest.param({"data_base64": "aGVsbG8"}, "not valid base64", id="bad-padding"),
    pytest.param({"data_base64": "aGVsbG8=", "data": {"a": 1}}, "both", id="both-data-and-data_base64"),
])
def test_a_bad_data_base64_is_one_clear_400_and_commits_nothing(stack_factory: StackFactory,
                                                                 extra: dict[str, Any], why: str) -> None:
    bad = {**ce(2), "data": None, **extra}
    assert not _sdk_reads(bad), "the CloudEvents SDK reads it: then the hub should too"
    s = stack_factory(ROUTE)
    s.start_hub()
    code, body = s.post("/events", json.dumps([ce(1), bad]).encode())
    assert code == 400, body
    assert "event 1" in body["error"] and "data_base64" in body["error"] and why in body["error"], body
    assert head(s, "x") == 0
    with s.client() as c, pytest.raises(HubRefused, match="data_base64"):
        c.publish_events([Event.from_dict(ce(1)), Event.from_dict(bad)])
    assert head(s, "x") == 0


def test_data_base64_reaches_a_worker_as_bytes(stack_factory: StackFactory) -> None:
    payload = bytes(range(256)) * 3
    sent = {**ce(1), "datacontenttype": "application/octet-stream",
            "data_base64": base64.b64encode(payload).decode()}
    del sent["data"]
    s = stack_factory(GROUP_X)
    s.start_hub()
    code, body = s.post("/events", json.dumps(sent).encode())
    assert code == 200 and body["accepted"] == 1, body
    with s.client() as c:
        _, stored = c.fetch("x", 1)
    assert JSONFormat().read(None, stored[0]).get_data() == payload, "the SDK reads the stored envelope's bytes"
    # the JSON format: an event with data_base64 has no data member (it was stored as "data": null beside it)
    assert "data" not in json.loads(stored[0]), stored[0]
    s.start_worker("g")
    wait_for(lambda: len(s.handled()) == 1, 30, "the event handled")
    assert bytes.fromhex(s.handled()[0]["bytes"]) == payload
