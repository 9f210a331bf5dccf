"""Prometheus metrics of a worker pool, served by the supervisor (`worker --metrics HOST:PORT` or
`[groups.G] metrics`).

Handlers run in child processes, so the counts live there; prometheus-client's multiprocess mode lets each child
write its samples to mmap files in a private temp dir (PROMETHEUS_MULTIPROC_DIR, set by the supervisor before it
spawns children) and the supervisor's HTTP endpoint sums them. Counters survive a child restart; the credit
gauge counts live children only. Without `--metrics` nothing is set up and the hooks below are no-ops, so a pool
that is not scraped pays nothing.

Labels are bounded: group, plugin, topic (configured names), outcome -- never object keys. A follow-on's topic is
a name a plugin chooses (one per object, if its author named one so): a child gives the first MAX_TOPIC_SERIES of
them a label each and counts the rest under OTHER_TOPIC, as the hub does with topics past its own bound.

The temp dir goes at a clean stop; a pool killed -9 cannot remove it, so it is a `procutil.owned_tempdir` and
every pool that starts serving metrics removes the dirs in $TMPDIR whose pool is gone.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Any

from bucketwire.config import ConfigError

log = logging.getLogger("bucketwire.worker")

FLAG = "BUCKETWIRE_WORKER_METRICS"
DIR = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "bucketwire-worker-metrics-"

MAX_TOPIC_SERIES = 1000
"""Distinct follow-on topic labels per child process (the hub's bound on its topic labels, hub/metrics.py)."""
OTHER_TOPIC = "_other"

_child: _ChildMetrics | None = None
_tried = False


class _ChildMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from bucketwire.exposition import configure_created_series

        configure_created_series()

        self.events = Counter("bucketwire_worker_events_total", "Events handled by this pool, by outcome",
                              ["group", "topic", "outcome"], registry=None)
        self.handler = Histogram("bucketwire_worker_handler_seconds", "handle_event latency per plugin",
                                 ["group", "plugin"], registry=None,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                          30, 60, 300))
        self.hook_errors = Counter("bucketwire_worker_hook_errors_total", "Hook calls that raised, per plugin",
                                   ["group", "plugin"], registry=None)
        self.follow_ons = Counter("bucketwire_worker_follow_ons_total", "Follow-on events published with acks",
                                  ["group", "topic"], registry=None)
        self.credit = Gauge("bucketwire_worker_credit", "Credit (events in flight) announced by live children",
                            ["group"], registry=None, multiprocess_mode="livesum")
        self.follow_on_topics: set[str] = set()

    def follow_on_label(self, topic: str) -> str:
        """The topic's own label while fewer than MAX_TOPIC_SERIES follow-on topics have one, else OTHER_TOPIC."""
        seen = self.follow_on_topics
        if topic in seen:
            return topic
        if len(seen) < MAX_TOPIC_SERIES:
            seen.add(topic)
            return topic
        return OTHER_TOPIC


def child() -> _ChildMetrics | None:
    """The child's metrics when the supervisor serves them, else None (checked once per process)."""
    global _child, _tried
    if not _tried:
        _tried = True
        if os.environ.get(FLAG) and os.environ.get(DIR):
            try:
                _child = _ChildMetrics()
            except Exception as e:  # metrics must never stop a worker
                log.warning("worker metrics disabled", extra={"error": str(e)})
    return _child


def handler_done(group: str, plugin: str, seconds: float, ok: bool) -> None:
    m = child()
    if m is not None:
        m.handler.labels(group, plugin).observe(seconds)
        if not ok:
            m.hook_errors.labels(group, plugin).inc()


def event_done(group: str, topic: str | None, outcome: str, follow_on_topics: list[str] | None = None) -> None:
    m = child()
    if m is not None:
        m.events.labels(group, topic or "-", outcome).inc()
        for t in follow_on_topics or []:
            m.follow_ons.labels(group, m.follow_on_label(t)).inc()


def set_credit(group: str, credit: int) -> None:
    m = child()
    if m is not None:
        m.credit.labels(group).set(credit)


class _SupervisorCollector:
    """The supervisor's own view: live children and restarts (plain values, no multiprocess files)."""

    def __init__(self, group: str, alive: Callable[[], int], restarts: Callable[[], int],
                 failing: Callable[[], int]) -> None:
        self.group, self.alive, self.restarts, self.failing = group, alive, restarts, failing

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        g = GaugeMetricFamily("bucketwire_worker_children", "Live child processes", labels=["group"])
        g.add_metric([self.group], self.alive())
        yield g
        c = CounterMetricFamily("bucketwire_worker_child_restarts", "Children restarted after dying",
                                labels=["group"])
        c.add_metric([self.group], self.restarts())
        yield c
        f = GaugeMetricFamily("bucketwire_worker_startup_failing",
                              "Children whose last start failed in a plugin's worker_startup", labels=["group"])
        f.add_metric([self.group], self.failing())
        yield f


HISTORY_KINDS = ("counter", "histogram")
"""The kinds of a dead child's files that are history (summed into the pool's `<kind>_dead.db`); its live gauges
are dropped (`mark_process_dead`)."""


HEADER_BYTES = 8
"""prometheus_client's file header (bytes used, padding): a file shorter than that has no samples yet."""


def _has_header(path: str) -> bool:
    try:
        return os.path.getsize(path) >= HEADER_BYTES
    except OSError:  # a child's live gauge file, removed as the child died
        return False


class _PoolFiles:
    """The children's sample files, merged (prometheus_client's `MultiProcessCollector`), read under the lock
    `Supervisor.child_died` folds files under: a scrape between the fold's two steps would count a dead child
    twice (or not at all), and a counter that drops reads as a reset.

    A child makes its file by opening it empty and then sizing it; the collector's reader needs the header, so a
    scrape in between failed whole (500), which a pool replacing children under load met. Such a file holds no
    sample yet and is left out; once sized it never shrinks, so what is read is whole."""

    def __init__(self, path: str, lock: threading.Lock) -> None:
        self.path, self.lock = path, lock

    def collect(self) -> list[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with self.lock:
            files = [f for f in glob.glob(os.path.join(self.path, "*.db")) if _has_header(f)]
            return list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]


class Supervisor:
    """The pool's /metrics endpoint; start it before spawning children so they inherit the directory."""

    def __init__(self, addr: str, group: str, alive: Callable[[], int], restarts: Callable[[], int],
                 setting: str = "--metrics", failing: Callable[[], int] = lambda: 0) -> None:
        """`setting`: where `addr` came from (`--metrics`, or `[groups.G] metrics`), named by a line about it."""
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            # ConfigError: the CLI prints it as one line (a ValueError left a traceback)
            raise ConfigError(f"{setting} {addr!r} is not HOST:PORT; write it like 127.0.0.1:9101")
        from bucketwire.procutil import owned_tempdir, remove_abandoned_tempdirs

        gone = remove_abandoned_tempdirs(PREFIX)
        if gone:
            log.info("removed worker metrics dirs of pools no longer running", extra={"dirs": len(gone)})
        self.dir, self._lock = owned_tempdir(PREFIX)
        os.environ[DIR] = self.dir
        os.environ[FLAG] = "1"
        from prometheus_client import CollectorRegistry, start_http_server

        from bucketwire.exposition import configure_created_series

        configure_created_series()  # start_http_server negotiates the format as exposition.render does

        self._folding = threading.Lock()
        self._dead: dict[str, Any] = {}  # kind -> the MmapedDict of `<kind>_dead.db`
        reg = CollectorRegistry()
        reg.register(_PoolFiles(self.dir, self._folding))
        reg.register(_SupervisorCollector(group, alive, restarts, failing))
        try:
            self.server, _ = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=reg)
        except OSError as e:
            self._remove_dir()
            other = "" if setting == "--metrics" else " (or start the pool with --metrics HOST:PORT)"
            raise OSError(f"{setting} {addr}: cannot serve worker metrics there ({e.strerror}); each pool on a host "
                          f"needs a port of its own: pick another with {setting} HOST:PORT{other}") from None
        log.info("worker metrics served", extra={"metrics": addr})

    def child_died(self, pid: int | None) -> None:
        """Drop a dead child's live gauges, and fold its counters and histograms (history) into the pool's
        `<kind>_dead.db`, removing its own files: they were kept, two per child, so a pool whose children kept
        crashing grew its directory (and the work of every scrape) by 128 KiB a crash, without end."""
        if not pid:
            return
        from prometheus_client import multiprocess
        from prometheus_client.mmap_dict import MmapedDict

        with self._folding:
            multiprocess.mark_process_dead(pid, self.dir)  # type: ignore[no-untyped-call]
            for kind in HISTORY_KINDS:
                path = os.path.join(self.dir, f"{kind}_{pid}.db")
                try:
                    values = MmapedDict.read_all_values_from_file(path)  # type: ignore[no-untyped-call]
                except FileNotFoundError:  # it never counted anything
                    continue
                dead = self._dead.get(kind)
                if dead is None:
                    file = os.path.join(self.dir, f"{kind}_dead.db")
                    dead = self._dead[kind] = MmapedDict(file)  # type: ignore[no-untyped-call]
                for key, value, timestamp, _ in values:
                    dead.write_value(key, dead.read_value(key)[0] + value, timestamp)
                os.remove(path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._remove_dir()

    def _remove_dir(self) -> None:
        for dead in getattr(self, "_dead", {}).values():
            dead.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock)
