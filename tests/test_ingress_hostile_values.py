"""What a hostile or broken client sends, and what the hub answers: a refusal quotes the client's value clipped
(never a megabyte of it back, nor into the log), and a CloudEvent's `data_base64` is checked as the JSON format
says before anything is committed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures_hub import Stack
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
