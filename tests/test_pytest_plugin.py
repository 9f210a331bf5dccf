"""The pytest fixtures bucketwire ships for plugin authors (`bucketwire.pytest_plugin`, a pytest11 entry point):
a plugin test reads like the README's example, against a real SeaweedFS and the worker child's own hook code."""

from __future__ import annotations

from typing import Any

import pytest

from bucketwire import ConfigError, Context, Event, hookimpl


class CsvCounter:
    """The README's example plugin."""

    PLUGIN_NAME = "csv-counter"

    @hookimpl
    def handle_event(self, event: Event, ctx: Context) -> None:
        if event.is_object_created and event.bucket and event.key and event.key.endswith(".csv"):
            resp = ctx.store().get_object(event.bucket, event.key)
            try:
                body = resp.read()
            finally:
                resp.close()
                resp.release_conn()
            ctx.publish("csv-counted", {"bucket": event.bucket, "key": event.key, "rows": body.count(b"\n")})

    @hookimpl
    def validate_settings(self, settings: dict[str, Any]) -> None:
        if settings.get("strict") not in (None, True, False):
            raise ConfigError("strict: expected true or false")


def test_a_plugin_test_reads_like_the_readme(bucketwire_store: Any, plugin_harness: Any, make_event: Any) -> None:
    bucketwire_store.put("in/a b.csv", b"x\ny\nz\n")
    h = plugin_harness(CsvCounter())
    [out] = h.handle(make_event(bucketwire_store.bucket, "in/a b.csv", size=6))
    assert out.topic == "csv-counted"
    assert out.data == {"bucket": bucketwire_store.bucket, "key": "in/a b.csv", "rows": 3}
    assert h.handle(make_event(bucketwire_store.bucket, "in/a b.csv", kind="ObjectRemoved:Delete")) == []


def test_make_event_is_what_the_hub_makes(make_event: Any) -> None:
    e = make_event("photos", "a b.jpg", size=123, content_type="image/jpeg", metadata={"k": "v"})
    assert (e.bucket, e.key, e.store, e.topic) == ("photos", "a b.jpg", "primary", "bucket-update")
    assert e.is_object_created and e.data["size"] == 123 and e.data["user_metadata"] == {"k": "v"}
    assert make_event("photos", "x").id != make_event("photos", "x").id, "each call is a new upload"
    assert make_event("photos", "x", kind="s3:ObjectRemoved:Delete").is_object_removed


def test_plugin_harness_runs_validation(plugin_harness: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[plugins.csv-counter\] strict: expected true or false"):
        plugin_harness(CsvCounter(), settings={"strict": "yes"})
