"""Prometheus metrics, one registry per process so tests can run a hub in-process without collisions.

Labels are bounded: topic, group, source, reason, plugin -- never object keys. Topics are bounded twice: the hub
refuses new topics past `[hub] max_topics`, and only the first MAX_TOPIC_SERIES topics get series of their own
(later ones are counted under topic="_other"), so /metrics stays small whatever max_topics is raised to. Groups
the config does not name are at most `[hub] max_groups`, their names at most 255 characters (hub.loop), and
(group, topic) pairs get series for the first MAX_GROUP_TOPIC_SERIES only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from bucketwire.exposition import configure_created_series, created_series_enabled

MAX_TOPIC_SERIES = 1000
"""Distinct topic label values per process; past it, topic counters go to OTHER_TOPIC and topic gauges are not
set."""
OTHER_TOPIC = "_other"
MAX_GROUP_TOPIC_SERIES = 5000
"""Distinct (group, topic) label pairs per process for the cursor and lag gauges; past it, a pair's gauges are not
set and its retention skips are counted under OTHER_TOPIC. Each group the config does not name may consume
max_topics topics of any name, so READYs alone could make max_groups x max_topics pairs (100,000 by default)."""


class Cell:
    """One series of a `Hot` family: a plain number the loop moves, read when /metrics is scraped."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class Hot:
    """A labelled counter or gauge the hub moves per event, read by the registry only when scraped (a custom
    collector, prometheus-client's way for numbers kept elsewhere). Its own metric validates, locks and makes four
    calls per `inc`: about ten of those per event cost the loop tens of µs on a thread that had just woken
    (docs/performance.md, change 15). The exposition is the same: names, help, labels, `_created` when asked."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 ) -> None:
        self.family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        registry.register(self)

    def labels(self, *values: str) -> Cell:
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, given {values}")
            cell = self._cells[values] = Cell()
        return cell

    def remove(self, *values: str) -> None:
        self._cells.pop(values, None)

    def inc(self, amount: float = 1) -> None:
        """For a family without labels."""
        self.labels().inc(amount)

    def describe(self) -> Iterator[Metric]:
        yield self.family(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self.family(self.name, self.doc, labels=self.labelnames)
        created = created_series_enabled() and self.family is CounterMetricFamily
        for values, cell in list(self._cells.items()):  # one C call: safe beside the loop thread
            if created:
                cast(CounterMetricFamily, fam).add_metric(list(values), cell.value, created=cell.created)
            else:
                fam.add_metric(list(values), cell.value)
        yield fam


class HotHistogram:
    """A histogram observed once per journal commit: the observations wait in a list and go into the histogram
    when it is scraped (or when many wait), not through its bucket search and two locks on every commit."""

    LIMIT = 4096

    def __init__(self, name: str, doc: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.inner = Histogram(name, doc, buckets=buckets, registry=None)
        self._waiting: list[float] = []
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._waiting.append(amount)
        if len(self._waiting) >= self.LIMIT:
            self._apply()

    def _apply(self) -> None:
        waiting, self._waiting = self._waiting, []
        for amount in waiting:
            self.inner.observe(amount)

    def describe(self) -> Iterator[Metric]:
        return iter(self.inner.describe())

    def collect(self) -> Iterator[Metric]:
        self._apply()
        return iter(self.inner.collect())


class HubMetrics:
    def topic_label(self, topic: str) -> str:
        """The topic's own label while fewer than MAX_TOPIC_SERIES topics have one, else OTHER_TOPIC."""
        if topic in self._topics:
            return topic
        if len(self._topics) < MAX_TOPIC_SERIES:
            self._topics.add(topic)
            return topic
        return OTHER_TOPIC

    def group_topic_series(self, group: str, topic: str) -> bool:
        """Whether the pair has (or now gets) series of its own: the first MAX_GROUP_TOPIC_SERIES pairs do."""
        pair = (group, topic)
        if pair in self._pairs:
            return True
        if len(self._pairs) < MAX_GROUP_TOPIC_SERIES:
            self._pairs.add(pair)
            return True
        return False

    def forget_group_topic(self, group: str, topic: str) -> None:
        """A removed group's pair (its series removed too) leaves room for another."""
        self._pairs.discard((group, topic))

    def __init__(self) -> None:
        configure_created_series()
        self._topics: set[str] = set()
        self._pairs: set[tuple[str, str]] = set()
        r = self.registry = CollectorRegistry()
        self.received = Hot("counter", "bucketwire_events_received_total", "Events accepted at ingress",
                            ["source", "topic"], registry=r)
        self.unrouted = Counter("bucketwire_events_unrouted_total", "Well-formed events that matched no route",
                                ["source"], registry=r)
        self.duplicates = Hot("counter", "bucketwire_events_duplicate_total",
                              "Events dropped as duplicates of (source, id)", ["source"], registry=r)
        self.rejected = Counter("bucketwire_ingress_rejected_total", "Requests or frames rejected",
                                ["ingress", "reason"], registry=r)
        self.commits = Hot("counter", "bucketwire_journal_commits_total", "Journal transactions committed", [],
                           registry=r)
        self.commit_failures = Counter("bucketwire_journal_commit_failures_total", "Journal commits that failed",
                                       registry=r)
        self.commit_seconds = HotHistogram("bucketwire_journal_commit_seconds", "Journal commit latency", registry=r,
                                           buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                    0.05, 0.1, 0.25, 1.0))
        self.journal_bytes = Gauge("bucketwire_journal_bytes", "Journal size in bytes", registry=r)
        self.head = Hot("gauge", "bucketwire_topic_head_seq", "Latest seq per topic", ["topic"], registry=r)
        self.cursor = Gauge("bucketwire_group_cursor_seq", "Acked watermark per group and topic",
                            ["group", "topic"], registry=r)
        self.lag = Gauge("bucketwire_group_lag", "Events not yet acked per group and topic", ["group", "topic"],
                         registry=r)
        self.inflight = Hot("gauge", "bucketwire_group_inflight", "Events in flight per group", ["group"],
                            registry=r)
        self.workers = Gauge("bucketwire_group_workers", "Connected workers per group", ["group"], registry=r)
        self.leading = Gauge("bucketwire_group_dispatching", "1 while this hub dispatches the group (holds its lease)",
                             ["group"], registry=r)
        self.dispatched = Hot("counter", "bucketwire_dispatched_total", "Events handed to workers", ["group"],
                              registry=r)
        self.batches = Hot("counter", "bucketwire_dispatch_batches_total", "Dispatch batches sent", ["group"],
                           registry=r)
        self.acked = Hot("counter", "bucketwire_acked_total", "Events acked", ["group"], registry=r)
        self.acked_again = Counter("bucketwire_acked_again_total",
                                   "Acks for events already done (a redelivered event acked twice); ignored",
                                   ["group"], registry=r)
        self.retries = Counter("bucketwire_retries_total", "Failed events scheduled for retry", ["group"], registry=r)
        self.redelivered = Counter("bucketwire_redelivered_total", "In-flight events redelivered after a worker left",
                                   ["group"], registry=r)
        self.dead_lettered = Counter("bucketwire_dead_lettered_total", "Events sent to the dead-letter topic",
                                     ["group"], registry=r)
        self.follow_ons = Hot("counter", "bucketwire_follow_ons_total", "Follow-on events committed", ["topic"],
                              registry=r)
        self.hop_limited = Counter("bucketwire_hop_limit_total", "Follow-ons refused by the hop limit", registry=r)
        self.descendant_limited = Counter("bucketwire_descendant_limit_total",
                                          "Follow-ons refused because their upload has max_descendants already",
                                          registry=r)
        self.send_again = Counter("bucketwire_zmq_send_eagain_total", "Sends refused by a full queue (HWM)",
                                  ["socket"], registry=r)
        self.fanout_skipped = Hot("counter", "bucketwire_fanout_skipped_total",
                                  "Committed events not sent on the fan-out: nobody subscribed to their topic", [],
                                  registry=r)
        self.fanout_subscriptions = Gauge("bucketwire_fanout_subscriptions",
                                          "Subscription prefixes of the fan-out's live subscribers", registry=r)
        self.retention_dropped = Counter("bucketwire_retention_dropped_total", "Events removed by retention",
                                         registry=r)
        self.group_skipped_by_retention = Counter(
            "bucketwire_group_skipped_by_retention_total",
            "Events a group never got: retention dropped them before it consumed them", ["group", "topic"],
            registry=r)
        # Operations (issue 6): refreshed by the hub loop every heartbeat, not only when someone asks for status.
        self.retrying = Gauge("bucketwire_group_retrying", "Failed events waiting for their retry", ["group"],
                              registry=r)
        self.ready = Gauge("bucketwire_group_ready", "Events loaded and waiting for worker credit", ["group"],
                           registry=r)
        self.credit = Gauge("bucketwire_group_credit", "Credit (events in flight allowed) of connected workers",
                            ["group"], registry=r)
        self.credit_free = Gauge("bucketwire_group_credit_free", "Unused worker credit", ["group"], registry=r)
        self.oldest_unacked = Gauge("bucketwire_group_oldest_unacked_seconds",
                                    "Age of the oldest in-flight or retrying event", ["group"], registry=r)
        self.group_state = Gauge("bucketwire_group_state", "1 for the group's current state (ok, idle, saturated, "
                                 "stalled, replaying)", ["group", "state"], registry=r)
        self.topic_rate = Gauge("bucketwire_topic_rate", "Events committed per second (10 s window)", ["topic"],
                                registry=r)
        self.journal_available = Gauge("bucketwire_journal_available", "1 when the last journal commit succeeded",
                                       registry=r)
        self.ingress_pending = Gauge("bucketwire_ingress_pending", "Ingress requests waiting for the hub loop",
                                     registry=r)
        self.zmq_events = Counter("bucketwire_zmq_connection_events_total",
                                  "ZeroMQ socket monitor events (accepted, disconnected, handshake_failed, ...)",
                                  ["socket", "event"], registry=r)
        self.zmq_peers = Gauge("bucketwire_zmq_peers", "Peers connected (handshake done) per socket", ["socket"],
                               registry=r)
        self.replays = Counter("bucketwire_replays_total", "Operator replays (cursor rewinds) per group", ["group"],
                               registry=r)
        self.keys_invalid = Gauge("bucketwire_authorized_keys_invalid",
                                  "Files in authorized_keys_dir skipped because they hold no valid public key",
                                  registry=r)
        self.info = Gauge("bucketwire_hub_info", "Hub build information", ["version", "schema"], registry=r)
        self._tls_expiry: Gauge | None = None

    def tls_cert_expiry(self) -> Gauge:
        """Made only by a hub that serves HTTPS: a gauge always present would read 0 (expired in 1970) without
        TLS, and an alert on it would fire for every plain-HTTP hub."""
        if self._tls_expiry is None:
            self._tls_expiry = Gauge("bucketwire_tls_cert_expiry_timestamp_seconds",
                                     "When the HTTPS certificate served to new connections expires (Unix time)",
                                     registry=self.registry)
        return self._tls_expiry
