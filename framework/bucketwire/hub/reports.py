"""What the workers of a previous dispatcher still run, as their supervisors report it.

When a hub dies (one sqlite hub restarted; with jetstream, another hub takes the group over), a handler running on
one of its workers goes on: the child's one thread is inside it and cannot tell anyone. The events the previous
dispatcher had in flight are unacked in the journal, so the hub that dispatches next would hand that event out
again at once, and two runs of it (or a later event of its object behind it) would overlap. The child's supervisor
reads what the child runs (worker/running.py) and sends it as RUNNING to every hub of its list, naming the child's
connection; the hub that dispatches the group holds that event as in flight with that connection (`pin`): handed
to nobody else, with the later events of its object waiting, until the child reports its outcome on that
connection, its supervisor says it died or its handler ended, or the hub gives it up (charged as a death is).

A report is trusted only so far: for a group the sending key may join, for an event of that group that exists, is
not acked and is handed to nobody here; and for no longer than the hub's own `handler_timeout` of that group and
topic after the run began, plus `heartbeat_timeout` between reports. A peer cannot pin another group's events, nor
any event for ever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from bucketwire.config import Config
from bucketwire.hub.dispatch import GroupState, Key, WorkerState
from bucketwire.hub.metrics import HubMetrics

log = logging.getLogger("bucketwire.hub")

PENDING_MAX = 10_000
"""At most this many reports wait for their group (a standby's, or one whose event is not loaded yet)."""


@dataclass(slots=True)
class Report:
    key: Key
    started: float  # monotonic, this host's clock: when the run began, by the first report of it
    timeout: float  # the handler_timeout the worker runs it under
    user: str | None  # the key that reported it: only that key may refresh it or report its end
    seen: float


class Reports:
    """The reports of running events this hub holds, or keeps until it dispatches their group."""

    def __init__(self, cfg: Config, metrics: HubMetrics, groups: dict[str, GroupState],
                 workers: dict[bytes, WorkerState], heads: Callable[[], dict[str, int]]) -> None:
        self.cfg, self.metrics, self.groups, self.workers, self.heads = cfg, metrics, groups, workers, heads
        # group -> child -> its report, not held yet: its group is not dispatched here (a standby's; a group a
        # restarted hub makes when its workers join), or its event is not loaded yet. At most PENDING_MAX.
        self.pending: dict[str, dict[bytes, Report]] = {}
        self.kept = 0

    def report(self, gname: str, ident: bytes, rep: Report, now: float) -> None:
        """A supervisor says its child `ident` (a connection this hub does not know) runs `rep.key` for group
        `gname`, whose key the sender may use. Held at once if this hub dispatches the group, else kept."""
        g = self.groups.get(gname)
        if g is None:
            self._keep(gname, ident, rep, now)
            return
        self._pin(g, ident, rep, now)

    def apply(self, g: GroupState, now: float) -> None:
        """Hold what was reported for `g` and not held yet: called when this hub starts dispatching it, and after
        each load of its events (before they are handed out), so a report that named an event not loaded then
        is held before that event can go to another worker."""
        waiting = self.pending.pop(g.name, None)
        if not waiting:
            return
        self.kept -= len(waiting)
        limit = self.cfg.hub.heartbeat_timeout
        for ident, rep in waiting.items():
            if now - rep.seen <= limit and ident not in self.workers:
                self._pin(g, ident, rep, now)

    def forget(self, gname: str, ident: bytes) -> None:
        """The child died or its run ended: its report is void."""
        mine = self.pending.get(gname)
        if mine is not None and mine.pop(ident, None) is not None:
            self.kept -= 1
            if not mine:
                del self.pending[gname]

    def _keep(self, gname: str, ident: bytes, rep: Report, now: float) -> None:
        mine = self.pending.get(gname)
        old = mine.get(ident) if mine is not None else None
        if old is not None and old.key == rep.key and old.user == rep.user:
            old.seen = now
            return
        if old is None and self.kept >= PENDING_MAX:
            limit = self.cfg.hub.heartbeat_timeout
            self.pending = {gn: fresh for gn, rs in self.pending.items()
                            if (fresh := {i: r for i, r in rs.items() if now - r.seen <= limit})}
            self.kept = sum(map(len, self.pending.values()))
            if self.kept >= PENDING_MAX:
                return  # full of fresh reports: this one is not kept (it is sent again next interval)
        if old is None:
            self.kept += 1
        self.pending.setdefault(gname, {})[ident] = rep

    def _pin(self, g: GroupState, ident: bytes, rep: Report, now: float) -> None:
        topic, seq = rep.key
        head = self.heads().get(topic, 0)
        why = "the seq is beyond the topic's head" if seq > head else None
        w = WorkerState(ident, g.name, frozenset({topic}), 0, now, user=rep.user, reported=True,
                        running=(rep.key, rep.started, rep.timeout),
                        pinned_until=rep.started + self.cfg.handler_timeout(g.name, topic)
                        + self.cfg.hub.heartbeat_timeout)
        if why is None:
            why = g.pin(w, rep.key, now)
        if why == "not loaded":  # it exists and is not done: held once the group has loaded it (`apply`)
            self._keep(g.name, ident, rep, now)
            return
        self.forget(g.name, ident)
        if why is not None:
            self.metrics.rejected.labels("zmq", "report").inc()
            log.warning("report of a running event refused; nothing held", extra={
                "group": g.name, "topic": topic[:64], "seq": seq, "worker": ident.hex(), "key": rep.user,
                "error": why})
            return
        self.workers[ident] = w
        g.workers[ident] = w
        self.metrics.workers.labels(g.name).set(len(g.workers))
        log.info("holding an event a worker of the previous dispatcher still runs", extra={
            "group": g.name, "topic": topic, "seq": seq, "worker": ident.hex(), "age": round(now - rep.started, 3)})
