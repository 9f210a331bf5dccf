"""The /metrics endpoints of the hub and of a worker pool, read as Prometheus reads them.

Both negotiate the format from the Accept header the same way (Prometheus text 0.0.4 unless OpenMetrics is
asked for), both parse with prometheus-client's own parsers, and neither serves `_created` series unless
BUCKETWIRE_METRICS_CREATED=1 asks for them.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Callable, Iterable
from typing import cast

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from bucketwire import Event
from bucketwire.procutil import free_port
from tests.fixtures_hub import Stack, wait_for

MakeStack = Callable[..., Stack]

TEXT = "text/plain; version=0.0.4; charset=utf-8"
# what Prometheus 3 sends when it scrapes (scrape_protocols default order)
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,"
                     "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;"
                     "escaping=underscores;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1")


def get(url: str, accept: str | None, token: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url)
    if accept is not None:
        req.add_header("Accept", accept)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def sample_names(text: str, openmetrics: bool) -> set[str]:
    parse = cast(Callable[[str], Iterable[Metric]], parse_openmetrics) if openmetrics else parse_text
    fams = parse(text)
    return {s.name for f in fams for s in f.samples}


def config(wport: int) -> str:
    return f"""
[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
metrics = "127.0.0.1:{wport}"
"""


def start(stack_factory: MakeStack, env: dict[str, str] | None = None) -> tuple[Stack, str, str]:
    wport = free_port()
    s = stack_factory(config(wport))
    s.env.update(env or {})
    s.start_hub()
    s.start_worker("a")
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:m", type="t", topic="jobs", data={"n": 1})])
    hub = f"http://127.0.0.1:{s.http_port}/metrics"
    worker = f"http://127.0.0.1:{wport}/metrics"
    def counted() -> bool:
        try:
            return "bucketwire_worker_events_total{" in get(worker, None)[1]
        except OSError:  # the pool's metrics listener is not up yet
            return False

    wait_for(counted, 20, "the worker to count an event")
    return s, hub, worker


@pytest.mark.parametrize(("accept", "openmetrics"), [
    (None, False),
    ("text/plain", False),
    ("application/openmetrics-text; version=1.0.0", True),
    (PROMETHEUS_ACCEPT, True),
])
def test_both_endpoints_negotiate_the_same_format_and_parse_without_created_series(
        stack_factory: MakeStack, accept: str | None, openmetrics: bool) -> None:
    s, hub, worker = start(stack_factory)
    types = []
    for url in (hub, worker):
        ctype, text = get(url, accept, s.token)
        types.append(ctype)
        if openmetrics:
            assert ctype.startswith("application/openmetrics-text; version=1.0.0"), (url, ctype)
            assert text.endswith("# EOF\n")
        else:
            assert ctype == TEXT, (url, ctype)
        names = sample_names(text, openmetrics)
        assert {"bucketwire_events_received_total", "bucketwire_worker_events_total"} & names, (url, names)
        assert not [n for n in names if n.endswith("_created")], (url, sorted(names))
    assert types[0] == types[1]


def test_created_series_on_request(stack_factory: MakeStack) -> None:
    s, hub, _ = start(stack_factory, {"BUCKETWIRE_METRICS_CREATED": "1"})
    _, text = get(hub, None, s.token)
    assert "bucketwire_events_received_created" in sample_names(text, False)
