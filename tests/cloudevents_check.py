"""CloudEvents 1.0 conformance, judged by the official SDK (`cloudevents` >= 2) plus the spec's type system.

The SDK validates attribute names and the required attributes when it reads an event, but it does not check the
type of an extension's value. The spec allows only boolean, integer (signed 32-bit), string, binary, URI,
URI-reference and timestamp; in JSON the last four are strings. So after the SDK has read an envelope, every
extension value must be a bool, a 32-bit int or a str, and the event must survive the SDK's HTTP binary-mode
round trip (where every attribute becomes a header) unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import from_binary_event, to_binary_event
from cloudevents.core.formats.json import JSONFormat

CORE = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"}
INT32 = range(-(2**31), 2**31)


def assert_cloudevent(raw: bytes | str | dict[str, Any]) -> BaseCloudEvent:
    """Read `raw` with the SDK and fail unless it is a CloudEvent whose attributes all have spec types."""
    body = json.dumps(raw) if isinstance(raw, dict) else raw
    event = JSONFormat().read(None, body)
    for name, value in event.get_attributes().items():
        if name in CORE:
            continue
        if isinstance(value, bool | str):
            continue
        assert isinstance(value, int) and value in INT32, (
            f"extension {name!r} = {value!r} is not a CloudEvents type (boolean, 32-bit integer, string)")
    back = from_binary_event(to_binary_event(event))
    for name, value in event.get_attributes().items():
        if name in CORE:
            continue
        got = back.get_extension(name)
        assert str(got) == str(value) and not str(got).startswith(("[", "{")), (
            f"extension {name!r} does not survive binary mode: {value!r} -> {got!r}")
    return event
