"""Operations support inside the hub: gauges refreshed every heartbeat, per-topic rates, socket monitors,
group health states, backpressure visibility and the REPLAY command.

It lives apart from `hub/loop.py` so the loop stays about delivery; everything here runs on the hub loop thread
(the only thread that touches GroupState and the journal), called from a handful of hooks in `Hub`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from bucketwire import __version__
from bucketwire import protocol as P
from bucketwire.envelope import SCHEMA_VERSION

if TYPE_CHECKING:
    from bucketwire.hub.dispatch import GroupState
    from bucketwire.hub.loop import Hub

log = logging.getLogger("bucketwire.hub")

RATE_WINDOW = 10.0
"""Seconds of head samples behind `rate`: long enough to smooth group commits, short enough to show a stop."""

MAX_INGRESS_PENDING = 1024
"""Webhook requests allowed to wait for the loop; beyond that ingress answers 503 instead of queueing forever."""

MONITOR_INTERVAL = 0.05
"""Socket-monitor events only feed counters: reading them every turn cost ~3% of the hub's CPU under load."""

SATURATED_AFTER = 3.0
"""A group must have work waiting and no free credit this long before it is reported saturated (no flapping)."""

STATES = ("ok", "idle", "saturated", "stalled", "replaying")

_EVENTS = {
    zmq.EVENT_ACCEPTED: "accepted",
    zmq.EVENT_ACCEPT_FAILED: "accept_failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
}


class RateWindow:
    """Head samples of one topic over the last RATE_WINDOW seconds; rate = events committed per second."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, head: int) -> None:
        self.samples.append((now, head))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, h0), (t1, h1) = self.samples[0], self.samples[-1]
        return (h1 - h0) / (t1 - t0) if t1 > t0 else 0.0


class HubOps:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.rates: dict[str, RateWindow] = {}
        self.monitors: list[tuple[str, zmq.Socket, zmq.Socket]] = []
        self._last_monitors = 0.0
        self.peers: dict[str, int] = {}
        self.state: dict[str, str] = {}
        self._pressure_since: dict[str, float] = {}
        self._last_size = 0.0
        self.journal_bytes = 0
        hub.metrics.info.labels(__version__, str(SCHEMA_VERSION)).set(1)
        hub.metrics.journal_available.set(1)

    # -- socket monitors -------------------------------------------------------------------------------------
    def attach_monitors(self, socks: dict[str, zmq.Socket]) -> list[zmq.Socket]:
        """Monitor the hub's sockets; returns the monitor sockets (read by `tick`, not polled)."""
        mask = 0
        for ev in _EVENTS:
            mask |= ev
        out = []
        for name, s in socks.items():
            try:
                mon = s.get_monitor_socket(mask)
            except zmq.ZMQError as e:  # monitoring is diagnostics: never stop the hub for it
                log.warning("cannot monitor socket", extra={"socket": name, "error": str(e)})
                continue
            self.monitors.append((name, s, mon))
            self.peers[name] = 0
            out.append(mon)
        return out

    def drain_monitors(self) -> None:
        m = self.hub.metrics
        for name, _, mon in self.monitors:
            for _ in range(1000):
                if not mon.get(zmq.EVENTS) & zmq.POLLIN:  # checked per tick: avoid raising zmq.Again each time
                    break
                try:
                    msg = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    break
                ev = _EVENTS.get(msg["event"])
                if ev is None:
                    continue
                m.zmq_events.labels(name, ev).inc()
                if ev == "handshake_succeeded":
                    self.peers[name] += 1
                elif ev == "disconnected":
                    self.peers[name] = max(0, self.peers[name] - 1)
                elif ev == "handshake_failed":
                    log.debug("ZeroMQ handshake failed", extra={"socket": name, "endpoint": msg.get("endpoint")})
                m.zmq_peers.labels(name).set(self.peers[name])

    def close(self) -> None:
        for _, s, mon in self.monitors:
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(0)
        self.monitors = []

    # -- every turn and every heartbeat ----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Apply replays whose topic has drained; cheap when none are pending."""
        if self.monitors and now - self._last_monitors >= MONITOR_INTERVAL:
            self._last_monitors = now
            self.drain_monitors()
        for g in self.hub.groups.values():
            if g.replays:
                for t in g.apply_replays():
                    log.info("replay applied", extra={"group": g.name, "topic": t, "cursor": g.acked[t]})

    def periodic(self, now: float) -> None:
        """Refresh every gauge; called each heartbeat so dashboards do not depend on someone running status."""
        hub, m = self.hub, self.hub.metrics
        heads = hub.journal.heads
        for t, h in heads.items():
            rw = self.rates.setdefault(t, RateWindow())
            rw.add(now, h)
            m.head.labels(t).set(h)
            m.topic_rate.labels(t).set(round(rw.rate(), 3))
        for g in hub.groups.values():
            self._group_gauges(g, heads, now)
        m.journal_available.set(1 if hub.journal_ok else 0)
        m.ingress_pending.set(self.ingress_pending())
        if now - self._last_size >= 5.0:
            self._last_size = now
            try:
                self.journal_bytes = hub.journal.size_bytes()
                m.journal_bytes.set(self.journal_bytes)
            except Exception as e:  # a size probe must not stop the loop
                log.debug("journal size probe failed", extra={"error": str(e)})

    def _group_gauges(self, g: GroupState, heads: dict[str, int], now: float) -> None:
        m = self.hub.metrics
        lag = 0
        for t in g.topics:
            head = heads.get(t, 0)
            m.cursor.labels(g.name, t).set(g.acked[t])
            m.lag.labels(g.name, t).set(max(0, head - g.acked[t]))
            lag += max(0, head - g.acked[t])
        credit = sum(w.credit for w in g.workers.values())
        free = sum(max(0, w.free) for w in g.workers.values())
        m.inflight.labels(g.name).set(len(g.inflight))
        m.workers.labels(g.name).set(len(g.workers))
        m.retrying.labels(g.name).set(len(g.retry))
        m.ready.labels(g.name).set(len(g.ready))
        m.credit.labels(g.name).set(credit)
        m.credit_free.labels(g.name).set(free)
        m.oldest_unacked.labels(g.name).set(round(g.oldest_unacked_age(now), 3))
        state = self._state(g, lag, free, now)
        old = self.state.get(g.name)
        if state != old:
            self.state[g.name] = state
            for s in STATES:
                m.group_state.labels(g.name, s).set(1 if s == state else 0)
            if old is not None:
                # idle <-> ok is the ordinary rhythm of a working group: not worth a line by default.
                lvl = (logging.WARNING if state in ("stalled", "saturated")
                       else logging.DEBUG if {old, state} <= {"idle", "ok"} else logging.INFO)
                log.log(lvl, f"group {state}", extra={"group": g.name, "was": old, "lag": lag,
                                                      "workers": len(g.workers), "inflight": len(g.inflight)})

    def _state(self, g: GroupState, lag: int, free: int, now: float) -> str:
        """ok / idle / saturated (work waits, every worker's credit is used) / stalled (lag, no workers)."""
        if g.replays:
            return "replaying"
        if lag and not g.workers:
            return "stalled"
        waiting = bool(g.ready or g.blocked) or lag > len(g.inflight) + len(g.retry)
        if waiting and free == 0:
            since = self._pressure_since.setdefault(g.name, now)
            if now - since >= SATURATED_AFTER:
                return "saturated"
            return self.state.get(g.name, "ok")
        self._pressure_since.pop(g.name, None)
        return "ok" if lag else "idle"

    def ingress_pending(self) -> int:
        try:
            return self.hub.ingress_q.qsize()
        except NotImplementedError:  # qsize is not available on every platform
            return 0

    def overloaded(self) -> bool:
        """Bounded ingress: too many webhook requests already wait for the loop (or the journal)."""
        return self.ingress_pending() >= MAX_INGRESS_PENDING

    # -- status ----------------------------------------------------------------------------------------------
    def extend_status(self, st: dict[str, Any], now: float) -> dict[str, Any]:
        hub = self.hub
        st["hub"].update(version=__version__, schema=SCHEMA_VERSION, proto=P.PROTO,
                         ingress_pending=self.ingress_pending(), journal_bytes=self.journal_bytes)
        for t, v in st["topics"].items():
            rw = self.rates.get(t)
            v["rate"] = round(rw.rate(), 3) if rw else 0.0
        for name, gs in st["groups"].items():
            g = hub.groups[name]
            gs["ready"] = len(g.ready)
            gs["blocked"] = sum(len(q) for q in g.blocked.values())
            gs["loaded"] = g.loaded
            gs["credit"] = sum(w.credit for w in g.workers.values())
            gs["credit_free"] = sum(max(0, w.free) for w in g.workers.values())
            gs["replaying"] = dict(g.replays)
            gs["state"] = self.state.get(name) or ("ok" if gs["lag"] else "idle")
            gs["worker_list"] = [{"host": w.host, "pid": w.pid, "credit": w.credit, "inflight": len(w.inflight),
                                  "silent": round(now - w.last_seen, 3)} for w in g.workers.values()]
        return st

    # -- REPLAY ----------------------------------------------------------------------------------------------
    def on_replay(self, ident: bytes, hdr: dict[str, Any]) -> None:
        """Rewind (or skip) a group's cursor on some topics: from a seq, or from the first event at/after `since`."""
        hub = self.hub
        req = hdr.get("req")

        def reply(**kw: Any) -> None:
            hub._send([ident, P.REPLAYR, P.enc({"req": req, **kw})])

        gname, topics = hdr.get("group"), hdr.get("topics")
        from_seq, since = hdr.get("from_seq"), hdr.get("since")
        if isinstance(gname, str) and not hub.roles.may_operate(hub._user, gname):
            # Moving a cursor is an operator's act: it can make a group handle everything again, or skip it.
            hub.metrics.rejected.labels("zmq", "forbidden").inc()
            log.warning("replay refused by role", extra={"key": hub._user, "group": gname})
            reply(error=f"key {hub._user!r} may not replay group {gname!r} ([security.roles]: needs admin = true "
                        "or the group in its groups)")
            return
        g = hub.groups.get(gname) if isinstance(gname, str) else None
        if g is None:
            reply(error=f"unknown group {gname!r} (groups: {', '.join(sorted(hub.groups)) or 'none'})")
            return
        if topics is None:
            topics = list(g.topics)
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            reply(error="'topics' must be a list of topic names")
            return
        bad = [t for t in topics if t not in g.read_pos]
        if bad:
            reply(error=f"group {gname!r} does not consume {bad[0]!r} (its topics: {', '.join(g.topics)})")
            return
        if isinstance(from_seq, bool) or (from_seq is None) == (since is None):
            reply(error="give exactly one of 'from_seq' (integer) or 'since' (unix time)")
            return
        if from_seq is not None and (not isinstance(from_seq, int) or from_seq < 1):
            reply(error="'from_seq' must be an integer >= 1")
            return
        if since is not None and (not isinstance(since, int | float) or isinstance(since, bool)):
            reply(error="'since' must be a unix time in seconds")
            return
        # A cursor past the head would make the group silently skip events that do not exist yet: refused for
        # every key, admins included. head + 1 (skip what is there now) is the furthest a replay may move.
        if since is not None and since > time.time():
            reply(error=f"--since {datetime.fromtimestamp(since, UTC).isoformat()} is in the future: the group "
                        "would skip every event until then; give a time in the past")
            return
        for t in topics:
            head = hub.journal.heads.get(t, 0)
            if from_seq is not None and from_seq > head + 1:
                reply(error=f"--from-seq {from_seq} is beyond the head of {t!r} (head {head}): the group would skip "
                            f"events not yet published; the furthest is {head + 1}")
                return
        out: dict[str, Any] = {}
        for t in topics:
            head = hub.journal.heads.get(t, 0)
            start = from_seq if from_seq is not None else self._first_since(t, float(since), head)
            before = g.acked[t]
            applied = g.request_replay(t, start)
            out[t] = {"from": start, "head": head, "cursor_was": before, "pending": not applied,
                      "events": max(0, head - start + 1)}
            log.info("replay requested", extra={"group": g.name, "topic": t, "from_seq": start,
                                                "cursor_was": before, "applied": applied})
        hub.metrics.replays.labels(g.name).inc()
        reply(group=g.name, topics=out)

    def _first_since(self, topic: str, since: float, head: int) -> int:
        row = self.hub.journal.db.execute("SELECT min(seq) FROM events WHERE topic=? AND ts>=?",
                                          (topic, since)).fetchone()
        return row[0] if row and row[0] is not None else head + 1
