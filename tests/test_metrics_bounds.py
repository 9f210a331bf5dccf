"""What a peer names becomes Prometheus labels: those names are bounded in length and in number, so no peer can
grow the hub's /metrics (rendered on its loop thread) or its memory without end. A real hub; READY frames from a
raw DEALER, as any peer that can reach the work socket (every key a role does not limit, with CURVE) can send."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_hub import Stack, wait_for

StackFactory = Callable[..., Stack]


def scrape(s: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=30) as r:
        text: str = r.read().decode()
    list(text_string_to_metric_families(text))  # still valid exposition format
    return text


def ready(s: Stack, header: dict[str, Any]) -> dict[str, Any]:
    """Send one READY from a fresh DEALER and return the hub's first answer's header."""
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        d.connect(s.cfg.client.work)
        d.send_multipart([b"READY", json.dumps({"schema": 1, "proto": 2, **header}).encode()])
        assert d.poll(10_000), "no answer to READY"
        frames = d.recv_multipart()
        out: dict[str, Any] = json.loads(frames[1]) if len(frames) > 1 else {}
        out["_cmd"] = frames[0].decode()
        return out
    finally:
        d.close()


def test_a_group_name_is_bounded_before_it_becomes_a_label(stack_factory: StackFactory) -> None:
    """A READY's group name had no length limit: a 200,000-character name became the `group` label of some fifteen
    series, 3 MB of /metrics per group (and max_groups of them), all rendered on the hub's loop per scrape. Now a
    group name over 255 characters is refused with one line, like a topic's."""
    s = stack_factory()
    s.start_hub()
    name = "g" * 200_000
    got = ready(s, {"group": name, "topics": ["x"]})
    assert got["_cmd"] == "ERR" and got.get("fatal") is True, got
    assert "255" in got["error"] and len(got["error"]) < 500, got["error"][:300]
    assert name[:1000] not in scrape(s)
    assert s.status()["groups"].get(name) is None


def test_group_and_topic_pairs_have_bounded_series(stack_factory: StackFactory) -> None:
    """Each group the config does not name may consume up to max_topics topics of any name, and each (group, topic)
    had its own cursor and lag series: max_groups x max_topics x 2 (200,000 with the defaults) from READYs alone.
    Like per-topic series (MAX_TOPIC_SERIES), only the first MAX_GROUP_TOPIC_SERIES pairs get them."""
    from bucketwire.hub.metrics import MAX_GROUP_TOPIC_SERIES

    s = stack_factory()
    s.cfg_path.write_text(s.cfg_path.read_text().replace(
        "heartbeat_timeout = 1.5\n", "heartbeat_timeout = 1.5\nmax_topics = 5000\nmax_groups = 10\n", 1))
    s.start_hub()
    per = 1000
    groups = MAX_GROUP_TOPIC_SERIES // per + 2
    for i in range(groups):
        got = ready(s, {"group": f"made-{i}", "topics": [f"t{i}-{j}" for j in range(per)]})
        assert got["_cmd"] != "ERR", got

    def series() -> int:
        return sum(1 for fam in text_string_to_metric_families(scrape(s)) if fam.name == "bucketwire_group_cursor_seq"
                   for _ in fam.samples)

    wait_for(lambda: series() >= MAX_GROUP_TOPIC_SERIES, 60, "cursor series of the groups")
    assert series() <= MAX_GROUP_TOPIC_SERIES


def test_a_plugins_follow_on_topic_names_are_bounded_before_they_become_worker_labels(
        stack_factory: StackFactory) -> None:
    """A plugin names the topic of each follow-on (one per object, say: ctx.publish(f"done-{event.key}", ...)).
    The pool's /metrics (worker --metrics) took each name as a label of bucketwire_worker_follow_ons_total: one
    more series per object, in every child's multiprocess file and every scrape, for good. The names past the
    first 1000 a child has counted are counted under '_other', as the hub counts topics past its own bound."""
    from bucketwire import Event
    from bucketwire.procutil import free_port

    s = stack_factory("""
[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
""")
    port = free_port()
    s.start_hub()
    s.start_worker("a", 1, "--metrics", f"127.0.0.1:{port}")
    with s.client() as c:
        c.publish_events([Event(id=f"many-{i}", source="urn:test", type="s3:ObjectCreated:Put", subject=f"k{i}",
                                topic="jobs", data={"bucket": "b", "key": f"k{i}", "follow_topics": 700})
                          for i in range(2)])
    wait_for(lambda: len(s.handled()) == 2, 60, "both events handled")

    def follow_on_series() -> dict[str, float] | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            fams = text_string_to_metric_families(r.read().decode())
        got = {smp.labels["topic"]: smp.value for fam in fams for smp in fam.samples
               if smp.name == "bucketwire_worker_follow_ons_total"}
        return got if sum(got.values()) == 1400 else None

    got = wait_for(follow_on_series, 30, "1400 follow-ons counted by the pool")
    assert len(got) <= 1001, len(got)
    assert got.get("_other") == 400, got.get("_other")
