"""How the hub and the worker pools serve /metrics: one content negotiation, one policy on `_created` series.

Both endpoints answer a scraper the same way, so one scrape config (and one parser) fits both: the format
follows the Accept header exactly as prometheus-client's own HTTP server decides it (`choose_encoder`:
OpenMetrics when asked for, Prometheus text 0.0.4 otherwise). Counters and histograms lose their `_created`
series, which would double the series count for a timestamp few dashboards use; BUCKETWIRE_METRICS_CREATED=1
keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _metrics
from prometheus_client.exposition import choose_encoder

CREATED_ENV = "BUCKETWIRE_METRICS_CREATED"


def created_series_enabled() -> bool:
    """Whether `_created` series are wanted (BUCKETWIRE_METRICS_CREATED), for collectors that make their own."""
    return os.environ.get(CREATED_ENV, "").strip().lower() in ("1", "true", "yes")


def configure_created_series() -> None:
    """Apply the `_created` policy; prometheus-client keeps it per process, so every process that serves or
    writes metrics calls this before it creates any."""
    wanted = created_series_enabled()
    switch = _metrics.enable_created_metrics if wanted else _metrics.disable_created_metrics
    cast(Callable[[], None], switch)()  # prometheus-client leaves these two unannotated


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the Accept header asks for, and its Content-Type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
