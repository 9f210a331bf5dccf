"""Operations support inside the hub: gauges refreshed every heartbeat, per-topic rates, socket monitors,
group health states, backpressure visibility and the REPLAY command.

It lives apart from `hub/loop.py` so the loop stays about delivery; everything here runs on the hub loop thread
(the only thread that touches GroupState and the journal), called from a handful of hooks in `Hub`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from bucketwire import __version__
from bucketwire import protocol as P
from bucketwire.envelope import HUB_SOURCE, SCHEMA_VERSION, Event, now_iso, stable_id
from bucketwire.hub.journal import JournalError, RemovalUnfinished
from bucketwire.zmqio import readable

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from bucketwire.config import Config
    from bucketwire.hub.dispatch import GroupState
    from bucketwire.hub.journal import Appended, JournalAPI, NewEvent
    from bucketwire.hub.listeners import Listeners
    from bucketwire.hub.metrics import HubMetrics

log = logging.getLogger("bucketwire.hub")

RATE_WINDOW = 10.0
"""Seconds of head samples behind `rate`: long enough to smooth group commits, short enough to show a stop."""

MAX_INGRESS_PENDING = 1024
"""Webhook requests allowed to wait for the loop; beyond that ingress answers 503 instead of queueing forever."""

MONITOR_INTERVAL = 0.05
"""Socket-monitor events only feed counters: reading them every turn cost ~3% of the hub's CPU under load."""

SATURATED_AFTER = 3.0
"""A group must have work waiting and no free credit this long before it is reported saturated (no flapping)."""

DEAD_TYPE = "bucketwire.dead-letter"
HANDLED_TYPE = "bucketwire.dead-letter.handled"
HANDLED_SUFFIX = ".handled"
"""Dead letters are events of DEAD_TYPE; `dlq retry|purge` marks one handled with a HANDLED_TYPE event on
`<dead-letter topic>.handled` (see commands/ops.py)."""
ENVELOPE_KEYS = frozenset({"specversion", "id", "source", "type", "data", "subject", "time", "datacontenttype",
                           "topic", "seq", "causationid", "hops", "schemaversion"})

STATES = ("ok", "idle", "saturated", "stalled", "replaying")

_EVENTS: dict[int, str] = {
    zmq.EVENT_ACCEPTED: "accepted",
    zmq.EVENT_ACCEPT_FAILED: "accept_failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
}


RateWindow = tuple[float, int, float, int]
"""A topic's rate, as two head samples (time, head): the older one between RATE_WINDOW / 2 and RATE_WINDOW before the
newest sample, the other the last one taken at least RATE_WINDOW / 2 after it. A tuple of numbers, not a deque of
samples: a hub with tens of thousands of live topics held millions of small objects there, which every full
garbage collection walked (a loop turn of 50-100 ms every few seconds with 60,000 topics); a tuple of numbers is
not tracked by the collector at all."""


def rate_sample(rw: RateWindow | None, now: float, head: int) -> RateWindow:
    if rw is None:
        return (now, head, now, head)
    t0, h0, t1, h1 = rw
    if now - t1 >= RATE_WINDOW / 2:
        return (t1, h1, now, head)
    return rw


def rate_of(rw: RateWindow | None, now: float, head: int) -> float:
    """Events committed per second from the older sample to (now, head)."""
    if rw is None or now <= rw[0]:
        return 0.0
    return (head - rw[1]) / (now - rw[0])


class HubOps:
    def __init__(self, cfg: Config, metrics: HubMetrics, journal: JournalAPI, groups: dict[str, GroupState],
                 net: Listeners, *, new_event: Callable[[Event, str], NewEvent],
                 journal_ok: Callable[[], bool],
                 queued: Callable[[], int], group_topics: Callable[[str], Collection[str] | None],
                 too_large: Callable[[Event, str], str | None] = lambda ev, t: None,
                 holder: Callable[[str], str | None] = lambda g: None) -> None:
        """`groups` is the hub's own mapping (removing a group here removes it from the hub); `new_event` makes a
        journal entry the way the hub does, `too_large` says why one would be over the hub's event size limit;
        `group_topics` names the topics of a group this hub or the cluster knows, dispatched here or not (with
        several hubs a `dlq retry` may reach one that does not dispatch the group: the retry is an event like any,
        which every hub may commit and the dispatcher then delivers; reading the cluster may raise JournalError);
        `holder` reads now which hub holds a group's dispatch lease (None: no hub; with SQLite always None);
        the other callables read hub state that changes every turn."""
        self.cfg = cfg
        self.metrics = metrics
        self.journal = journal
        self.groups = groups
        self.net = net
        self.new_event = new_event
        self.too_large = too_large
        self.group_topics = group_topics
        self.holder = holder
        self.journal_ok = journal_ok
        self.queued = queued
        self.rates: dict[str, RateWindow] = {}
        self.monitors: list[tuple[str, zmq.Socket[bytes], zmq.Socket[bytes]]] = []
        self._last_monitors = 0.0
        self.peers: dict[str, int] = {}
        self.state: dict[str, str] = {}
        self._pressure_since: dict[str, float] = {}
        self._unmanned_since: dict[str, float] = {}
        self._last_size = 0.0
        self.journal_bytes = 0
        self.metrics.info.labels(__version__, str(SCHEMA_VERSION)).set(1)
        self.metrics.journal_available.set(1)

    # -- socket monitors -------------------------------------------------------------------------------------
    def attach_monitors(self, socks: dict[str, zmq.Socket[bytes]]) -> list[zmq.Socket[bytes]]:
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
        m = self.metrics
        for name, _, mon in self.monitors:
            for _ in range(1000):
                if not readable(mon):  # checked per tick: avoid raising zmq.Again each time
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
        for g in self.groups.values():
            if g.replays:
                for t in g.apply_replays():
                    log.info("replay applied", extra={"group": g.name, "topic": t, "cursor": g.acked[t]})

    def periodic(self, now: float) -> None:
        """Refresh every gauge; called each heartbeat so dashboards do not depend on someone running status."""
        m = self.metrics
        heads = self.journal.heads
        for g in self.groups.values():
            self._group_gauges(g, heads, now)
        m.journal_available.set(1 if self.journal_ok() else 0)
        m.ingress_pending.set(self.ingress_pending())
        if now - self._last_size >= 5.0:
            self._last_size = now
            try:
                self.journal_bytes = self.journal.size_bytes()
                m.journal_bytes.set(self.journal_bytes)
            except Exception as e:  # a size probe must not stop the loop
                log.debug("journal size probe failed", extra={"error": str(e)})

    def sample_topic(self, t: str, head: int, now: float, live: bool) -> None:
        """A topic's turn in the hub's heartbeat round (in slices: see hub.loop.HEARTBEAT_SLICE): its head and
        rate gauges; `live`: committed to within RATE_WINDOW (or configured), else its rate is 0."""
        m = self.metrics
        if live:
            rw = self.rates[t] = rate_sample(self.rates.get(t), now, head)
            if m.topic_label(t) == t:
                m.head.labels(t).set(head)
                m.topic_rate.labels(t).set(round(rate_of(rw, now, head), 3))
        else:
            self.forget_topic(t)

    def forget_topic(self, t: str) -> None:
        """Quiet for a whole window: its rate is 0, and its window goes (one per topic in use, not ever made)."""
        if self.rates.pop(t, None) is not None and self.metrics.topic_label(t) == t:
            self.metrics.topic_rate.labels(t).set(0)

    def _group_gauges(self, g: GroupState, heads: dict[str, int], now: float) -> None:
        m = self.metrics
        lag = 0
        for t in g.topics:
            head = heads.get(t, 0)
            if m.group_topic_series(g.name, t):
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
        """ok / idle / saturated (work waits, every worker's credit is used) / stalled (lag, no workers).

        A group is stalled only once it has had no worker for `heartbeat_timeout` (since the hub started, or
        since its last worker left): pools start after the hub and reconnect after its restart, and a warning
        in those first seconds is noise. It is the same time the hub gives a silent worker.
        """
        if g.workers:
            self._unmanned_since.pop(g.name, None)
            since = now
        else:
            since = self._unmanned_since.setdefault(g.name, now)
        if g.replays:
            return "replaying"
        if lag and not g.workers:
            return "stalled" if now - since >= self.cfg.hub.heartbeat_timeout else "ok"
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
            return self.queued()
        except NotImplementedError:  # qsize is not available on every platform
            return 0

    def overloaded(self) -> bool:
        """Bounded ingress: too many webhook requests already wait for the loop (or the journal)."""
        return self.ingress_pending() >= MAX_INGRESS_PENDING

    # -- status ----------------------------------------------------------------------------------------------
    def extend_status(self, st: dict[str, Any], now: float) -> dict[str, Any]:
        st["hub"].update(version=__version__, schema=SCHEMA_VERSION, proto=P.PROTO,
                         ingress_pending=self.ingress_pending(), journal_bytes=self.journal_bytes)
        for t, v in st["topics"].items():
            v["rate"] = round(rate_of(self.rates.get(t), now, v["head"]), 3)
        for name, gs in st["groups"].items():
            g = self.groups[name]
            gs["ready"] = len(g.ready)
            gs["blocked"] = sum(len(q) for q in g.blocked.values())
            gs["loaded"] = g.loaded
            gs["loaded_bytes"] = g.loaded_bytes  # held in memory against [hub] group_buffer_mb
            gs["credit"] = sum(w.credit for w in g.workers.values())
            gs["credit_free"] = sum(max(0, w.free) for w in g.workers.values())
            gs["replaying"] = dict(g.replays)
            gs["state"] = self.state.get(name) or ("ok" if gs["lag"] else "idle")
            gs["worker_list"] = [{"host": w.host, "pid": w.pid, "credit": w.credit, "inflight": len(w.inflight),
                                  "silent": round(now - w.last_seen, 3)} for w in g.workers.values()]
        return st

    def _operated_group(self, gname: str, act: str, reply: Callable[..., None]) -> GroupState | None:
        """The group an operator's command names, once the key's role allows the act on it (admin = true, or the
        group in its groups); otherwise the refusal is answered and None returned."""
        if not self.net.roles.may_operate(self.net.user, gname):
            self.metrics.rejected.labels("zmq", "forbidden").inc()
            log.warning(f"{'replay' if act == 'replay' else 'group removal'} refused by role",
                        extra={"key": self.net.user, "group": gname})
            reply(error=f"key {self.net.user!r} may not {act} group {gname!r} ([security.roles]: needs admin = true "
                        "or the group in its groups)")
            return None
        g = self.groups.get(gname)
        if g is None:
            mine = sorted(n for n in self.groups if self.net.roles.may_operate(self.net.user, n))
            reply(error=f"unknown group {gname!r} (groups: {', '.join(mine) or 'none'})")
        return g

    # -- GROUPRM ---------------------------------------------------------------------------------------------
    def on_group_rm(self, ident: bytes, hdr: P.GroupRm) -> None:
        """Forget a group nobody uses any more: an ad-hoc group (made by a worker's READY, not in the config)
        would otherwise show as stalled in status and metrics forever. Allowed to whoever may replay the group."""
        req = hdr.req

        def reply(**kw: Any) -> None:
            self.net.send([ident, P.GROUPRMR, P.enc({"req": req, **kw})])

        gname = hdr.group
        if gname not in self.groups and self.net.roles.may_operate(self.net.user, gname) and (
                self._finish_rm(gname, reply) or self._forget_stored(gname, reply, hdr.force)):
            return
        # Forgetting a group drops its cursors: an operator's act, allowed to whoever may replay it.
        g = self._operated_group(gname, "remove", reply)
        if g is None:
            return
        if g.name in self.cfg.groups:
            reply(error=f"group {g.name!r} is configured in [groups.{g.name}]; remove that section from the "
                        "config and restart the hub instead")
            return
        if g.workers:
            who = ", ".join(f"{w.host or '?'} pid {w.pid}" for w in list(g.workers.values())[:3])
            reply(error=f"group {g.name!r} has {len(g.workers)} live worker(s) ({who}); stop them first")
            return
        heads = self.journal.heads
        lag = sum(max(0, heads.get(t, 0) - g.acked[t]) for t in g.topics)
        unfinished = None
        try:
            self.journal.forget_group(g.name)
        except RemovalUnfinished as e:  # stored as removed: removed here too, the rest left for a re-run
            unfinished = str(e)
        except JournalError as e:
            reply(error=f"could not remove group {g.name!r}: {e}; it is still there, run `bucketwire group rm "
                        f"{g.name}` again")
            return
        del self.groups[g.name]
        self._forget_gauges(g)
        if unfinished is not None:
            log.warning("group removed, some of its cursors left", extra={"group": g.name, "error": unfinished})
            reply(error=f"{unfinished}; no hub reads them, run `bucketwire group rm {g.name}` again to delete them")
            return
        log.info("group removed", extra={"group": g.name, "topics": list(g.topics), "lag": lag})
        reply(group=g.name, topics=list(g.topics), lag=lag)

    def _finish_rm(self, gname: str, reply: Callable[..., None]) -> bool:
        """`group rm` of a group this hub does not have: one removed already, perhaps cut off half-way (see
        `JournalAPI.forget_group`), is removed again, the rest of its keys deleted, and the command succeeds, so a
        re-run through any hub finishes a removal. False: the journal holds no removal of it."""
        try:
            left = self.journal.finish_removal(gname)
        except RemovalUnfinished as e:
            reply(error=f"{e}; no hub reads them, run `bucketwire group rm {gname}` again to delete them")
            return True
        except JournalError as e:
            reply(error=f"could not remove group {gname!r}: {e}")
            return True
        if left is None:
            return False
        log.info("group removal finished", extra={"group": gname, "keys": left})
        reply(group=gname, topics=[], lag=0, already=True, left=left)
        return True

    def _forget_stored(self, gname: str, reply: Callable[..., None], force: bool) -> bool:
        """`group rm` of a group this hub does not run whose cursors its journal holds: one taken out of the config
        (as the refusal of a configured group says to do) and the hub restarted, with no worker back since. The
        hub had no such group, so `group rm` said `unknown group` and nothing could forget the cursors: the group
        put back, or a pool of that name, resumed from them whatever its `start`. False: nothing stored (or the
        group is configured, then it is the configured group's refusal). With jetstream the cursors are the
        cluster's, read now, and a group another hub dispatches (its lease held, read now too) is that hub's to
        remove: refused, as the hub's own groups with workers are. One no hub dispatches is removed with `force`
        only: a stopped hub whose config still names it (this hub cannot read that config) would make it again
        at its start, from its `start`, the cursors gone. With SQLite this hub is the only one: its config is
        the one that counts."""
        if gname in self.cfg.groups:
            return False
        try:
            stored = self.journal.stored_cursors(gname)
            holder = self.holder(gname) if stored else None
        except JournalError as e:
            reply(error=f"could not read what the journal holds of group {gname!r}: {e}; nothing was removed, run "
                        f"`bucketwire group rm {gname}` again")
            return True
        if not stored:
            return False
        if holder is not None:
            reply(error=f"group {gname!r} is dispatched by hub {holder}; run `bucketwire group rm {gname}` with a "
                        "config that points at that hub, once its workers are stopped")
            return True
        if self.cfg.journal.backend == "jetstream" and not force:
            reply(error=f"group {gname!r} has cursors in the cluster's journal and no hub dispatches it now: a stopped "
                        f"hub whose config still names [groups.{gname}] would make it again at its start, from its "
                        f"`start`, the cursors gone; take the section out of every hub's config, then run "
                        f"`bucketwire group rm --force {gname}`; nothing was removed")
            return True
        heads = self.journal.heads
        lag = sum(max(0, heads.get(t, 0) - acked) for t, acked in stored.items())
        try:
            self.journal.forget_group(gname)
        except RemovalUnfinished as e:  # stored as removed (jetstream): the rest is left for a re-run
            reply(error=f"{e}; no hub reads them, run `bucketwire group rm {gname}` again to delete them")
            return True
        except JournalError as e:
            reply(error=f"could not remove group {gname!r}: {e}; it is still there, run `bucketwire group rm "
                        f"{gname}` again")
            return True
        log.info("group removed", extra={"group": gname, "topics": sorted(stored), "lag": lag, "running": False})
        reply(group=gname, topics=sorted(stored), lag=lag)
        return True

    def _forget_gauges(self, g: GroupState) -> None:
        """Drop the removed group's gauge series, so dashboards and alerts stop seeing it (counters stay)."""
        m = self.metrics
        self.state.pop(g.name, None)
        self._pressure_since.pop(g.name, None)
        self._unmanned_since.pop(g.name, None)
        series: list[tuple[Any, tuple[str, ...]]] = [(m.group_state, (g.name, s)) for s in STATES]
        series += [(gauge, (g.name, t)) for t in g.topics for gauge in (m.cursor, m.lag)]
        series += [(gauge, (g.name,)) for gauge in (m.inflight, m.workers, m.retrying, m.ready, m.credit,
                                                   m.credit_free, m.oldest_unacked)]
        for gauge, labels in series:
            try:
                gauge.remove(*labels)
            except KeyError:  # never set
                pass
        for t in g.topics:
            m.forget_group_topic(g.name, t)

    # -- REPLAY ----------------------------------------------------------------------------------------------
    def on_replay(self, ident: bytes, hdr: P.Replay) -> None:
        """Rewind (or skip) a group's cursor on some topics: from a seq, or from the first event at/after `since`."""
        req = hdr.req

        def reply(**kw: Any) -> None:
            self.net.send([ident, P.REPLAYR, P.enc({"req": req, **kw})])

        gname, topics = hdr.group, hdr.topics
        from_seq, since = hdr.from_seq, hdr.since
        # Moving a cursor is an operator's act: it can make a group handle everything again, or skip it.
        g = self._operated_group(gname, "replay", reply)
        if g is None:
            return
        if topics is None:
            topics = list(g.topics)
        bad = [t for t in topics if t not in g.read_pos]
        if bad:
            reply(error=f"group {gname!r} does not consume {bad[0]!r} (its topics: {', '.join(g.topics)})")
            return
        if (from_seq is None) == (since is None):
            reply(error="give exactly one of 'from_seq' (integer) or 'since' (unix time)")
            return
        if from_seq is not None and from_seq < 1:
            reply(error="'from_seq' must be an integer >= 1")
            return
        # A cursor past the head would make the group silently skip events that do not exist yet: refused for
        # every key, admins included. head + 1 (skip what is there now) is the furthest a replay may move.
        if since is not None and since > time.time():
            reply(error=f"--since {datetime.fromtimestamp(since, UTC).isoformat()} is in the future: the group "
                        "would skip every event until then; give a time in the past")
            return
        for t in topics:
            head = self.journal.heads.get(t, 0)
            if from_seq is not None and from_seq > head + 1:
                reply(error=f"--from-seq {from_seq} is beyond the head of {t!r} (head {head}): the group would skip "
                            f"events not yet published; the furthest is {head + 1}")
                return
        out: dict[str, Any] = {}
        for t in topics:
            head = self.journal.heads.get(t, 0)
            start = from_seq if from_seq is not None else self._first_since(t, float(since or 0), head)
            dropped = 0
            if from_seq is not None and start <= head:
                dropped = self._retained_from(t, start) - start
                start += dropped
            before = g.acked[t]
            applied = g.request_replay(t, start)
            out[t] = {"from": start, "head": head, "cursor_was": before, "pending": not applied,
                      "events": max(0, head - start + 1), "dropped": dropped}
            log.info("replay requested", extra={"group": g.name, "topic": t, "from_seq": start,
                                                "cursor_was": before, "applied": applied})
        self.metrics.replays.labels(g.name).inc()
        reply(group=g.name, topics=out)

    def _retained_from(self, topic: str, seq: int) -> int:
        """The first seq at or after `seq` the journal still holds (`seq` when it cannot tell). A replay from
        below it started the group in retention's gap: the command said it would deliver events that were gone,
        and the group then took the gap for events it had lost before consuming them (a warning, and a `status`
        line telling the operator to raise retention for events the group had handled)."""
        try:
            rows = self.journal.read(topic, seq, 1)
        except JournalError:  # the replay goes ahead as asked; the group skips the gap as it would anyway
            return seq
        return rows[0][0] if rows and rows[0][0] > seq else seq

    def _first_since(self, topic: str, since: float, head: int) -> int:
        first = self.journal.first_seq_since(topic, since)
        return head + 1 if first is None else first

    # -- DLQ (retry / purge, performed by the hub) -------------------------------------------------------------
    def on_dlq(self, ident: bytes, hdr: P.Dlq,
               commit: Callable[[list[NewEvent], Callable[[list[Appended] | None, str | None], None]], None]
               ) -> None:
        """Retry or purge dead letters named by (dead-letter topic, seq).

        The hub does it, not the CLI: a retried event carries `targetgroup` (only the group that failed it
        handles it) and a marker records the dead letter as handled; both are hub-only (reserved source, steering
        extension), so no publisher can forge a retry, steer one, or hide a dead letter. The hub reads the dead
        letter from its own journal, so what goes back is exactly what failed, to the group that failed it.
        `commit` queues events for a commit of their own, with the callback that answers it (with JetStream they
        may wait for a new topic's stream first, off the loop).

        With JetStream, two steps: the retried events, and only once they are stored the markers (SQLite stores
        both in one transaction, all or nothing). They go to different topics,
        which with JetStream are different streams, and a commit that fails may have stored some of its topics'
        events: a marker stored beside a retry that was not hid the dead letter with nothing retried, an event
        lost. In this order a failure leaves the dead letter waiting; at worst its retry was stored without its
        marker, and a second `dlq retry` retries it again (README "What can repeat").
        """
        req, action, items = hdr.req, hdr.action, hdr.items
        by = f"{(hdr.by or '?')[:200]} (key {self.net.user})" if self.net.user else (hdr.by or "?")[:200]
        results: list[dict[str, Any]] = []
        retries: list[NewEvent] = []
        markers: list[tuple[int, NewEvent]] = []  # (index in results, the marker)
        for it in items:
            res = self._dlq_item(it, action, by, retries, markers, len(results))
            results.append(res)
            if res.get("error"):
                log.warning("dlq request refused", extra={"key": self.net.user, "action": action,
                                                          "error": res["error"]})

        def marked(appended: list[Appended] | None, err: str | None) -> None:
            if appended is None:
                if retries:
                    err = (f"{err} (the retried event(s) were stored, the dead letter(s) not marked handled: they "
                           "stay listed, and `dlq retry` again retries them again)")
                self.net.send([ident, P.DLQR, P.enc({"req": req, "error": err})])
                return
            for (i, _), a in zip(markers, appended, strict=True):
                results[i]["duplicate"] = a.duplicate  # handled before, nothing done again
            for r in results:
                if not r.get("error") and not r.get("duplicate"):
                    log.info("dead letter purged" if action == "purge" else "dead letter retried",
                             extra={"deadletter": r["id"], "group": r.get("group"), "by": by})
            self.net.send([ident, P.DLQR, P.enc({"req": req, "results": results})])

        def retried(appended: list[Appended] | None, err: str | None) -> None:
            if appended is None:  # no marker written: every dead letter is still waiting
                self.net.send([ident, P.DLQR, P.enc({"req": req, "error": err})])
                return
            commit([ne for _, ne in markers], marked)

        def together(appended: list[Appended] | None, err: str | None) -> None:
            if appended is None:  # nothing stored: every dead letter is still waiting
                self.net.send([ident, P.DLQR, P.enc({"req": req, "error": err})])
                return
            marked(appended[len(retries):], None)

        if retries and self.cfg.journal.backend == "jetstream":
            commit(retries, retried)
        else:  # SQLite: one transaction stores the retries and their markers, or neither
            commit([*retries, *(ne for _, ne in markers)], together)

    def _dlq_item(self, it: Any, action: str, by: str, retries: list[NewEvent],
                  markers: list[tuple[int, NewEvent]], index: int) -> dict[str, Any]:
        if not isinstance(it, dict) or not isinstance(it.get("topic"), str) or not isinstance(it.get("seq"), int):
            return {"error": "each item needs 'topic' (string) and 'seq' (integer)"}
        topic, seq = it["topic"], it["seq"]
        # Read only a topic the key may read (an admin's or an unrestricted key's: any): else the answers told a
        # key which seqs exist in a topic it may not read, which are dead letters, and of which group.
        roles, user = self.net.roles, self.net.user
        role = roles.roles.get(user) if user else None
        if not ((role is not None and role.admin and roles.may_operate(user, "")) or
                roles.allows(user, "subscribe", topic)):
            self.metrics.rejected.labels("zmq", "forbidden").inc()
            return {"error": f"key {user!r} may not read topic {topic[:255]!r} ([security.roles] subscribe), so "
                             "not retry or purge its dead letters"}
        where = f"{topic}:{seq}"
        rows = self.journal.read(topic, seq, 1) if 1 <= seq <= P.MAX_SEQ else []
        if not rows or rows[0][0] != seq:
            return {"error": f"{where}: no such event in the journal (retention may have removed it)"}
        try:
            dl = json.loads(rows[0][2])
        except ValueError:
            dl = None
        data = dl.get("data") if isinstance(dl, dict) else None
        if (not isinstance(dl, dict) or dl.get("type") != DEAD_TYPE or not isinstance(data, dict)
                or not str(dl.get("source", "")).startswith(f"{HUB_SOURCE}dead-letter/")):
            return {"error": f"{where}: not a dead letter written by the hub"}
        dl_id, group, orig = str(dl.get("id")), data.get("group"), data.get("event")
        if not isinstance(group, str) or not self.net.roles.may_operate(self.net.user, group):
            self.metrics.rejected.labels("zmq", "forbidden").inc()
            return {"id": dl_id, "error": f"key {self.net.user!r} may not {action} dead letters of group {group!r} "
                                          "([security.roles]: needs admin = true or the group in its groups)"}
        res: dict[str, Any] = {"id": dl_id, "group": group, "action": action}
        retry_id = None
        if action == "retry":
            if data.get("refused") or data.get("line") in ("forbidden by role", "hop limit"):
                return {"id": dl_id, "group": group,
                        "error": f"dead letter {dl_id[:12]} is a follow-on the hub refused ({data.get('line')}: "
                                 f"{str(data.get('error'))[:200]}); a refused follow-on stays refused -- fix "
                                 "[security.roles] or the hop limit and replay the causing event, or purge it"}
            try:
                topics = self.group_topics(group)
            except JournalError as e:  # with several hubs an unknown group's topics are read from the cluster
                return {"id": dl_id, "group": group,
                        "error": f"dead letter {dl_id[:12]}: cannot read the topics of group {group!r}: {e}"}
            otopic = data.get("topic")
            if topics is None or not isinstance(otopic, str) or otopic not in topics:
                return {"id": dl_id, "group": group,
                        "error": f"dead letter {dl_id[:12]}: group {group!r} no longer consumes {otopic!r}"}
            oseq = data.get("seq")
            if isinstance(orig, dict) and "omitted" in orig and isinstance(oseq, int):
                # Too large to be carried in the dead letter (loop.omit_original): read it where it was committed.
                rows = self.journal.read(otopic, oseq, 1)
                if not rows or rows[0][0] != oseq:
                    return {"id": dl_id, "group": group,
                            "error": f"dead letter {dl_id[:12]}: the failed event was too large to be carried in it "
                                     f"and {otopic}/{oseq} is no longer in the journal (retention removed it)"}
                orig = json.loads(rows[0][2])
            if not isinstance(orig, dict) or not all(isinstance(orig.get(k), str) and orig.get(k)
                                                     for k in ("id", "source", "type")):
                return {"id": dl_id, "group": group,
                        "error": f"dead letter {dl_id[:12]} does not hold a readable original event"}
            ev = _retry_event(dl, orig, group, otopic)
            big = self.too_large(ev, otopic)
            if big is not None:  # the retry's extensions can take a near-limit event over it
                return {"id": dl_id, "group": group, "error": f"dead letter {dl_id[:12]}: the retried event: {big}"}
            retry_id = res["retry"] = ev.id
            retries.append(self.new_event(ev, otopic))
        marker = {"deadletter": dl_id, "dlseq": seq, "action": "retried" if action == "retry" else "purged",
                  "by": by, "at": now_iso(), **({"retry": retry_id} if retry_id else {})}
        mk = Event(id=stable_id("dlq-handled", dl_id), source=f"{HUB_SOURCE}dlq", type=HANDLED_TYPE,
                   subject=dl.get("subject") if isinstance(dl.get("subject"), str) else None, data=marker,
                   topic=topic + HANDLED_SUFFIX)
        markers.append((index, self.new_event(mk, topic + HANDLED_SUFFIX)))
        return res


def _retry_count(value: object) -> int:
    """`retries` of an earlier retry: an integer, or (written before it became one) the list of failures."""
    if isinstance(value, list):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def _retry_event(dl: dict[str, Any], orig: dict[str, Any], group: str, topic: str) -> Event:
    """The original event again, for the group that failed it, saying how often it failed before and where.

    Only CloudEvents types: `retries` is a count and `retrydeadletter` names this dead letter, whose own original
    names the one before, so `dlq show` rebuilds the history from the chain (a list here would not be a valid
    CloudEvents attribute).
    """
    ext = {k: v for k, v in orig.items() if k not in ENVELOPE_KEYS}
    ext.update(targetgroup=group, retries=_retry_count(ext.get("retries")) + 1,
               retryof=ext.get("retryof") or orig["id"], retrysource=ext.get("retrysource") or orig["source"],
               retrydeadletter=str(dl.get("id")))
    hops = orig.get("hops", 0)
    return Event(
        id=stable_id("retry", dl.get("id")), source=f"{HUB_SOURCE}retry/{group}", type=orig["type"],
        subject=orig.get("subject") if isinstance(orig.get("subject"), str) else None, data=orig.get("data"),
        topic=topic, causationid=orig.get("causationid") if isinstance(orig.get("causationid"), str) else None,
        hops=hops if isinstance(hops, int) and not isinstance(hops, bool) and hops >= 0 else 0, extensions=ext,
    )
