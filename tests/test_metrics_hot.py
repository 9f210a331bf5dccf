"""The hub's per-event metrics are plain numbers read at scrape time (hub/metrics.py, `Hot`): what a scraper
reads must be what prometheus-client's own Counter, Gauge and Histogram would have served for the same calls."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from bucketwire.exposition import configure_created_series, render
from bucketwire.hub.metrics import Hot, HotHistogram, HubMetrics

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry, accept: str | None = None) -> Samples:
    body, _ = render(registry, accept)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text"])
def test_hot_families_serve_what_prometheus_client_would(accept: str | None) -> None:
    configure_created_series()  # as every process does first (no _created series unless asked for)
    ours, ref = CollectorRegistry(), CollectorRegistry()
    c = Hot("counter", "t_received_total", "Events", ["source", "topic"], ours)
    g = Hot("gauge", "t_inflight", "In flight", ["group"], ours)
    h = HotHistogram("t_commit_seconds", "Commit latency", BUCKETS, ours)
    commits = Hot("counter", "t_commits_total", "Commits", [], ours)
    rn = Counter("t_commits_total", "Commits", registry=ref)
    commits.inc()
    commits.inc(2)
    rn.inc()
    rn.inc(2)
    rc = Counter("t_received_total", "Events", ["source", "topic"], registry=ref)
    rg = Gauge("t_inflight", "In flight", ["group"], registry=ref)
    rh = Histogram("t_commit_seconds", "Commit latency", buckets=BUCKETS, registry=ref)
    for source, topic, n in [("zmq", "a", 1), ("zmq", "a", 4), ("http", "b", 2)]:
        c.labels(source, topic).inc(n)
        rc.labels(source, topic).inc(n)
    for group, v in [("g", 3.0), ("g", 1.0), ("h", 0.0)]:
        g.labels(group).set(v)
        rg.labels(group).set(v)
    for v in (0.00005, 0.0003, 0.0003, 2.0):
        h.observe(v)
        rh.observe(v)
    got, want = samples(ours, accept), samples(ref, accept)
    assert got == want
    assert got[("t_received_total", (("source", "zmq"), ("topic", "a")))] == 5
    assert got[("t_commit_seconds_count", ())] == 4


def test_a_histogram_scraped_rarely_holds_a_bounded_list() -> None:
    h = HotHistogram("t_seconds", "x", BUCKETS, CollectorRegistry())
    for _ in range(HotHistogram.LIMIT * 2 + 5):
        h.observe(0.001)
    assert len(h._waiting) == 5  # the rest went into the histogram as they passed the limit


def test_wrong_label_count_is_refused_like_prometheus_client() -> None:
    c = Hot("counter", "t_total", "x", ["group"], CollectorRegistry())
    with pytest.raises(ValueError):
        c.labels("a", "b")


def test_the_hub_registry_holds_each_name_once() -> None:
    """A Hot family registers itself: registering a name twice (a Hot beside an old Counter) would raise here."""
    m = HubMetrics()
    m.received.labels("zmq", "t").inc()
    names = {k[0] for k in samples(m.registry)}
    assert "bucketwire_events_received_total" in names
