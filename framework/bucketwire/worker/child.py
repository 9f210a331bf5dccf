"""One worker child: receives events from the hub, runs them through the plugins, reports the outcome.

One thread owns everything: poll the DEALER -> take a DELIVER batch -> run its handlers -> send one ACK for the
batch. An event therefore wakes one thread of ours and crosses no inproc hop (the hot path's cost used to be
the hand-off between an I/O thread and a handler thread). A handler can still run for minutes (a 500 MB
replica) while this thread cannot heartbeat: its supervisor reads the running record (worker/running.py) and
heartbeats to the hub on the child's behalf (RUNNING), so the hub keeps counting it and shows it as long running.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from bucketwire import protocol as P
from bucketwire import security, zmtp
from bucketwire.client import HANDSHAKE_FAILED, handshake_failure
from bucketwire.config import Config, ConfigError
from bucketwire.context import Stores
from bucketwire.envelope import (
    SCHEMA_VERSION,
    Attributes,
    Detour,
    EnvelopeError,
    Event,
    parse_seq,
    read_envelope,
    seq_or_none,
)
from bucketwire.procutil import settle_gc
from bucketwire.worker import plugin_loading as plugin_loader
from bucketwire.worker.metrics import child as metrics_child
from bucketwire.worker.metrics import event_done, handler_done, set_credit
from bucketwire.worker.running import RunningSlot
from bucketwire.worker.startup_failures import EXIT_STARTUP, leave_note, line_of
from bucketwire.worker.stop_signals import StopSignals
from bucketwire.zmqio import readable, recv_frames
from bucketwire.zmtp import LocalDealer

log = logging.getLogger("bucketwire.worker")
events_log = logging.getLogger("bucketwire.events")

ACK_EVERY = 64
"""Within a long batch an ACK goes out after this many events or ACK_AFTER seconds, so the hub commits (and
publishers see) early results without waiting for the batch's end."""
ACK_AFTER = 0.005
ACK_MAX = P.MAX_HEADER
"""The largest header frame the hub reads; an ACK past it is refused whole."""
EXIT_EXHAUSTED = 3
"""A child that a plugin ran out of descriptors or memory ends with this code, to be replaced (see `exhaustion`)."""
BYE_WAITS = 2
"""A draining child waits this many heartbeat intervals for the hub to answer its BYE (a live hub turns its loop
at least once an interval), then closes the connection anyway."""


@dataclass
class WorkerSpec:
    group: str
    topics: list[str]
    credit: int
    local_plugins: list[str]
    start: str = "latest"
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0


class Plugins(plugin_loader.PluginRunner):
    """The plugins of this worker's group (or only its `--plugin` modules, for a group not in the config)."""

    def __init__(self, cfg: Config, spec: WorkerSpec) -> None:
        gc = cfg.groups.get(spec.group)
        # An unconfigured group runs only what it was given with --plugin: loading every installed plugin would
        # duplicate the configured groups' work (a second thumbnail-ready for every upload).
        allow = gc.plugins if gc is not None else []
        if gc is None and not spec.local_plugins:
            raise ConfigError(f"group {spec.group!r} is not in the config and no --plugin was given, so nothing "
                              f"would handle its events; add [groups.{spec.group}] or pass --plugin MODULE")
        loaded = plugin_loader.load(allow, spec.local_plugins, slow_after=cfg.hub.heartbeat_timeout)
        # A startup longer than the hub waits for a silent worker is said in the log (see PluginRunner.startup).
        self.slow_startup = cfg.hub.heartbeat_timeout
        # Without a metrics endpoint nothing is counted, and no handler is timed: per event that is two clock
        # reads and three calls a no-op handler would otherwise pay.
        self.metered = metrics_child() is not None
        self.exhausted: str | None = None  # the line saying what a plugin ran this process out of (`handle`)
        super().__init__(loaded, {n: cfg.plugins.get(n, {}) for n in loaded.names},
                         Stores(cfg.stores, cfg.hub.default_store), spec.group,
                         on_handled=(lambda name, dt, ok: handler_done(spec.group, name, dt, ok=ok))
                         if self.metered else None,
                         max_event_bytes=cfg.hub.max_event_bytes)
        # A plugin the group names (or a group not in the config runs from --plugin) whose `topics` miss all of
        # the group's would never be called: the group would ack every event with its work undone.
        chosen, topics = (loaded.names, spec.topics) if gc is None else (gc.plugins or [], gc.topics)
        for name in chosen:
            missed = plugin_loader.topics_missed(name, self.topics.get(name), spec.group, topics)
            if missed is not None:
                raise ConfigError(missed)

    def lifecycle(self, hook: str) -> None:
        if hook == "worker_startup":
            self.startup(self.slow_startup)
        else:
            self.shutdown()


class Fatal(Exception):
    """The hub refused this worker for good (ERR fatal): the child exits with a configuration error."""


class Child:
    """The child's one loop. Its DEALER is reconnected under a new identity when the hub goes silent."""

    def __init__(self, cfg: Config, spec: WorkerSpec, plugins: Plugins, slot: RunningSlot,
                 signals: StopSignals) -> None:
        self.cfg, self.spec, self.plugins, self.slot = cfg, spec, plugins, slot
        self.signals, self.stop_fd = signals, signals.fd
        # A stop signal, or a plugin that ran this process out of descriptors or memory: either way the child
        # finishes the event in hand, gives back the rest and ends (see `exhaustion`).
        self.stopping: Callable[[], bool] = lambda: signals.stopped or plugins.exhausted is not None
        self.zctx = zmq.Context()
        self.keys = security.client_keys(cfg)  # checked by `bucketwire worker` before the children start
        self.ready = P.enc(P.Ready(
            group=spec.group, topics=spec.topics, credit=spec.credit, proto=P.PROTO, schema=SCHEMA_VERSION,
            host=socket.gethostname()[:64], pid=os.getpid(), start=spec.start,  # type: ignore[arg-type]
            plugins=sorted(plugins.loaded.names), setup=plugins.setup_digest(),
        ))
        self.timeouts: dict[str, float] = {}
        # The batch in hand: (attempt, envelope as read, whether msgspec read it); a frame that is not JSON stays
        # bytes (no JSON text parses to bytes), for `handle` to refuse with the reason.
        self.queue: deque[tuple[int, Any, bool]] = deque()  # (attempt, an Event or as `read` parsed it, strict)
        self.detour = Detour()  # DELIVERs still to be read the old way directly (`read_delivered`)
        self.refused = False  # a DELIVER could not be read: give its events back and rejoin (`_rejoin`)
        self.acks: list[dict[str, Any]] = []  # full results: failures, follow-ons
        self.oks: list[tuple[str, int]] = []  # plain successes, acked as ranges when the hub reads them
        self.ranges = False  # the hub reads ACK ranges (its DELIVERs say so; an older hub's do not)
        self.poller = zmq.Poller()
        self.poller.register(self.stop_fd, zmq.POLLIN)
        # Several hubs: connect to one; a silent one sends us to the next of the list, and a hub that does not
        # dispatch our group names the one that does (ERR `moved`; "" while none does: the next, after a pause).
        self.endpoints = cfg.client.work_endpoints
        self.endpoint = self.endpoints[0]
        self.move_to: tuple[str, float] | None = None
        self.mon: zmq.Socket[bytes] | None = None  # with CURVE: sees the hub refuse our key (`_silent`)
        self.dealer = self._connect()
        now = time.monotonic()
        self.last_hub = self.last_sent = self.last_flush = now
        self.readied = now  # when READY last went out: a burst of ERR reready is answered once
        self.now = now  # `_work`'s clock, read once per event

    def _connect(self) -> zmq.Socket[bytes] | LocalDealer:
        ident = b"w-" + uuid.uuid4().bytes
        self.slot.set_ident(ident)  # so the supervisor can name this child to the hub (death notice, RUNNING)
        local = zmtp.dealer(self.endpoint, ident, linger_ms=2000)
        self.pollout = False  # the poller waits for room to write on the local socket too (see `run`)
        if local is not None:  # the hub's local socket: read and written by this thread, no libzmq thread between
            self.readable, self.more, self.recv = local.readable, local.more, local.recv_ready
            self.poll_key: object = local.fileno()
            self.poller.register(local, zmq.POLLIN)
            self._send(local, [P.READY, self.ready])
            self.readied = time.monotonic()
            return local
        d: zmq.Socket[bytes] = self.zctx.socket(zmq.DEALER)
        self.readable, self.recv = partial(readable, d), partial(recv_frames, d)
        self.more = self.readable  # libzmq parses what its I/O thread read: asking it again is no read
        self.poll_key = d
        d.setsockopt(zmq.LINGER, 2000)
        d.setsockopt(zmq.IDENTITY, ident)
        d.setsockopt(zmq.SNDHWM, 100_000)
        d.setsockopt(zmq.RCVHWM, 100_000)
        security.apply_client(d, self.cfg, self.keys)
        if self.keys is not None:
            self.mon = d.get_monitor_socket(HANDSHAKE_FAILED)
        d.connect(self.endpoint)
        self.poller.register(d, zmq.POLLIN)
        self._send(d, [P.READY, self.ready])
        self.readied = time.monotonic()
        return d

    def _send(self, d: zmq.Socket[bytes] | LocalDealer, frames: list[bytes]) -> bool:
        """Never block: a DEALER whose handshake was refused (CURVE key not yet admitted) has no pipe, and a
        blocking send would hang the child for good. What cannot go out now is dropped; the hub redelivers
        unacked events and the reconnect re-sends READY."""
        try:
            d.send_multipart(frames, zmq.NOBLOCK)
            self.last_sent = time.monotonic()
            return True
        except zmq.Again:
            log.debug("hub not reachable; message dropped", extra={"command": frames[0][:8].decode("ascii", "replace")})
            return False

    def run(self) -> int:
        """Serve until a stop signal; returns the exit code."""
        interval, timeout = self.spec.heartbeat_interval, self.spec.heartbeat_timeout
        poll_ms = int(interval * 1000 / 2)
        try:
            while not self.stopping():
                d = self.dealer
                if isinstance(d, LocalDealer) and d.pending() != self.pollout:
                    # An ACK the socket did not take whole: the rest goes as soon as there is room.
                    self.pollout = not self.pollout
                    self.poller.modify(d, zmq.POLLIN | zmq.POLLOUT if self.pollout else zmq.POLLIN)
                if dict(self.poller.poll(poll_ms)).get(self.poll_key):
                    self._receive(True)
                    if self.refused:
                        self._rejoin()
                # Checked right after receiving: what the hub sent during a long handler is waiting on the
                # socket and counts before the silence does.
                now = time.monotonic()
                if self.move_to is not None and now >= self.move_to[1]:
                    log.info("moving to the hub that dispatches the group", extra={"endpoint": self.move_to[0]})
                    self._reconnect(self.move_to[0])
                    continue
                if now - self.last_hub > timeout:
                    self._silent()
                    self._reconnect(self._next_endpoint())
                    continue
                if now - self.last_sent >= interval:
                    self._send(self.dealer, [P.HB, b"{}"])  # between events: nothing is running
                self._work()
                if self.refused:  # seen by `_work` between two events
                    self._rejoin()
        except Fatal:
            return 2
        self._drain()
        return 0

    def _receive(self, ready: bool = False) -> None:
        """Take every message waiting on the DEALER, without blocking. `ready`: the poll has just said one waits,
        so the first is read without asking libzmq again (its EVENTS getter runs libzmq's command processing,
        ~10 µs in a child that has just woken, on the path of every event). After the first message, `more`: on
        the local socket a read that did not fill its chunk has taken all there was, and no second read is made."""
        queue, readable_, more, recv = self.queue, self.readable, self.more, self.recv
        got = False
        while (ready and not got) or (more() if got else readable_()):
            try:
                frames = recv()
            except zmq.Again:  # the local socket: the poll saw the first bytes of a message, not all of it
                break
            got = True
            cmd = frames[0]
            if cmd == P.DELIVER:
                try:
                    hdr = P.decode(frames[1] if len(frames) > 1 else b"", P.Deliver)
                    attempts, self.ranges = hdr.a, hdr.r
                    if hdr.j:
                        envelopes, strict = read_delivered(frames, len(attempts), self.detour)
                        queue.extend(zip(attempts, envelopes, repeat(strict)))  # lengths checked
                        continue
                except P.ProtocolError as e:
                    # Nothing of it runs or is acked (its events cannot be told apart, or not trusted): the hub
                    # must take them back, which `_rejoin` makes it do, before anything else is read.
                    log.error("refusing a DELIVER from the hub; giving its events back and joining again",
                              extra={"error": str(e), "endpoint": self.endpoint})
                    self.refused = True
                    break
                for i, body in enumerate(frames[2:]):
                    raw, strict = read(body)
                    queue.append((attempts[i] if i < len(attempts) else 1, raw, strict))
            elif cmd == P.ERR:
                self._on_err(frames)
        if got:
            self.last_hub = time.monotonic()

    def _on_err(self, frames: list[bytes]) -> None:
        try:
            err = P.decode(frames[1], P.Err)
        except (P.ProtocolError, IndexError) as e:
            log.warning("unreadable ERR from the hub", extra={"error": str(e)})
            return
        if err.fatal:
            log.error(err.error or "hub refused this worker")
            raise Fatal
        if err.moved is not None and self.move_to is None:
            # This hub no longer dispatches the group and forgot what it handed us; the next one hands that out
            # again, so what is still queued here is not run (`_reconnect` would drop it too, after the batch).
            self.queue.clear()
            now = time.monotonic()
            pause = self.spec.heartbeat_interval if len(self.endpoints) > 1 else 0.0
            self.move_to = (err.moved, now) if err.moved else (self._next_endpoint(), now + pause)
        elif err.reready:
            # The hub does not know this connection (it restarted, took the group over, or gave us up): nothing
            # still queued here is ours to run (it hands those events out again), and it takes the outcomes of
            # what ran (sent first, on this connection) only from the connection it holds them with.
            self._flush()
            self.queue.clear()
            now = time.monotonic()
            if now - self.readied >= self.spec.heartbeat_interval:
                self._send(self.dealer, [P.READY, self.ready])
                self.readied = now
        else:
            log.warning("hub rejected a message", extra={"error": err.error})

    def _work(self) -> None:
        """Run the events in hand, then ack them: one ACK per batch (or per ACK_EVERY / ACK_AFTER within a long
        one). A stop signal ends it after the event in hand; the rest is given back by `_drain`."""
        q, acks, oks = self.queue, self.acks, self.oks
        plugins, signals, begin, end = self.plugins, self.signals, self._begin, self.slot.end
        interval, timeout = self.spec.heartbeat_interval, self.spec.heartbeat_timeout
        debug = events_log.isEnabledFor(logging.DEBUG)  # once a batch, not once an event
        # One clock read per event: taken as a handler returns, it is the flush's "now" and the next event's start
        # in the running record (`_begin`); read again after whatever else runs between two events.
        monotonic = time.monotonic
        self.now = now = monotonic()
        while q and not (signals.stopped or plugins.exhausted is not None):  # `stopping`, without its call
            attempt, raw, strict = q.popleft()
            out = handle(plugins, attempt, raw, strict, begin, debug)
            end()
            if isinstance(out, tuple):
                oks.append(out)
            else:
                acks.append(out)
            self.now = now = monotonic()
            if q and (len(acks) + len(oks) >= ACK_EVERY or now - self.last_flush > ACK_AFTER):
                self._flush()
                self.now = self.last_flush
            if q and now - self.last_hub > interval:
                # A long handler: before the next event, hear what the hub said meanwhile. A hub that forgot us
                # (ERR reready: restarted) or went silent (dead; the next one takes the group over) hands the rest
                # of this batch out again, so running it here would run each event twice at once.
                self._receive()
                self.now = time.monotonic()
                if self.refused or self.now - self.last_hub > timeout:
                    break
        self._flush()  # the ACK first: the hub and the next batch wait for it, not for the check below
        self.signals.keep("in handle_event")  # once a batch: a plugin may install its handler on its first event

    def _flush(self) -> None:
        if self.acks or self.oks:
            for frame in ack_frames(self.spec.group, self.oks, self.acks, self.ranges):
                self._send(self.dealer, [P.ACK, frame])
            self.acks.clear()  # encoded above; `_work` holds these lists
            self.oks.clear()
        self.last_flush = time.monotonic()

    def _next_endpoint(self) -> str:
        i = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else -1
        return self.endpoints[(i + 1) % len(self.endpoints)]

    def _silent(self) -> None:
        """Say why the hub is silent when the handshake says it: a refused key is the operator's to fix, and
        looks otherwise like a hub that is down."""
        failed = 0
        while self.mon is not None and self.mon.poll(0):
            failed = recv_monitor_message(self.mon)["event"]
        if failed:
            log.error(handshake_failure(self.cfg, self.endpoint, failed, "worker"))
        elif isinstance(self.dealer, zmtp.LocalDealer) and self.dealer.error:
            # Over the local socket the connect itself says why: no socket file (no hub, or [client] work names
            # another path than the hub's [hub] local), or a file nobody listens on (a hub that died).
            log.warning(f"hub silent; reconnecting: cannot connect to {self.dealer.path} ({self.dealer.error}); is "
                        f"`bucketwire hub` running with [hub] local = \"{self.endpoint}\"?",
                        extra={"endpoint": self.endpoint})
        else:
            log.warning("hub silent; reconnecting", extra={"endpoint": self.endpoint})

    def _reconnect(self, endpoint: str) -> None:
        """The hub went quiet (restart, network) or sent us to another: reconnect under a new identity. Events it
        delivered to the old one are redelivered by the hub, so none is held here."""
        self.endpoint, self.move_to = endpoint, None
        self.poller.unregister(self.dealer)
        if self.mon is not None and isinstance(self.dealer, zmq.Socket):
            self.dealer.disable_monitor()
            self.mon.close(0)
            self.mon = None
        self.dealer.close(0)
        self.queue.clear()
        self.dealer = self._connect()
        self.last_hub = time.monotonic()

    def _drain(self) -> None:
        """Give back what was delivered but not started (the rest of the batch, and what is waiting on the
        socket) with BYE, so the hub hands it to another worker at once."""
        self._flush()
        try:
            self._receive()
        except Fatal:
            pass
        if self._send(self.dealer, [P.BYE, P.enc({"requeue": self._unstarted()})]):
            self._await_bye()

    def _unstarted(self) -> list[list[Any]]:
        """The events in hand, as BYE's `requeue` (the hub gives those back uncharged); empties the queue."""
        requeue = []
        for _, raw, _ in self.queue:
            if type(raw) is Event:  # read by the typed schema: its topic a string, its seq one parse_seq reads
                requeue.append([raw.topic, raw.seq])
                continue
            try:
                requeue.append([raw["topic"], parse_seq(raw["seq"])])
            except (ValueError, KeyError, TypeError):  # EnvelopeError is a ValueError; bytes: not JSON
                pass
        self.queue.clear()
        return requeue

    def _rejoin(self) -> None:
        """After a DELIVER this child could not read: make the hub take back every event it handed us, then join
        again. Acking nothing for those events is not enough: the hub would hold them for this worker, which
        keeps heartbeating, for ever. The outcomes of events already run are acked first; the unstarted ones go
        back uncharged (BYE `requeue`); the unreadable batch's events go back charged one attempt (BYE `refused`:
        a BYE alone charges nothing, or a peer taking batches and leaving would spend innocent events' attempts),
        so a batch that always arrives broken ends in the dead-letter topic instead of going round for ever.
        What arrives before the hub answers the BYE was sent to the registration the BYE
        ended, and is not run (`_await_bye`)."""
        self.refused = False
        self._flush()
        requeue = self._unstarted()
        sent = self._send(self.dealer, [P.BYE, P.enc({"requeue": requeue, "refused": True})])
        if sent and self._await_bye() == "unknown field":
            # A hub from before `refused` refuses the whole BYE and would keep the events for this worker: the
            # plain BYE it knows gives them back (charged as that hub charges them).
            log.info("the hub does not know BYE 'refused'; leaving with a plain BYE")
            if self._send(self.dealer, [P.BYE, P.enc({"requeue": requeue})]):
                self._await_bye()
        self._send(self.dealer, [P.READY, self.ready])
        self.last_hub = time.monotonic()

    def _await_bye(self) -> str:
        """Wait, briefly, for the hub to answer the BYE before the connection closes.

        A child that closed right after sending it lost the BYE now and then on a loaded machine (sent, never
        read by the hub, which then never logged that the worker left: `bucketwire dev` stopping showed one
        'worker left' line too few), while the hub was still sending it heartbeats and DELIVERs. Waiting for the
        answer makes the order explicit instead of left to socket teardown. What arrives meanwhile is not run;
        the hub takes back everything delivered to a worker that said BYE. A hub that does not answer (stopping,
        or older) costs at most BYE_WAITS heartbeat intervals. Returns "answered", "unknown field" (the hub
        refused the BYE for a field it does not know: one from before `refused`) or "silent"."""
        d = self.dealer
        if time.monotonic() - self.last_hub > self.spec.heartbeat_timeout:
            return "silent"  # the hub is gone already: nobody to answer
        deadline = time.monotonic() + min(BYE_WAITS * self.spec.heartbeat_interval, self.spec.heartbeat_timeout)
        while (left := deadline - time.monotonic()) > 0:
            if not d.poll(max(1, int(left * 1000))):
                break
            frames = self.recv()
            if frames[0] == P.BYE:
                return "answered"
            if frames[0] == P.ERR and len(frames) > 1 and b"unknown field" in frames[1] and b"refused" in frames[1]:
                return "unknown field"
        log.debug("the hub did not answer BYE in time")
        return "silent"

    def close(self) -> None:
        if self.mon is not None and isinstance(self.dealer, zmq.Socket):
            self.dealer.disable_monitor()
            self.mon.close(0)
        self.dealer.close()  # LINGER: the last ACK and BYE still go out
        self.zctx.term()

    def _begin(self, topic: object, seq: object) -> None:
        """Record the event whose handlers are about to run (see worker/running.py), started at `now`: the clock
        `_work` read since the last handler returned."""
        if isinstance(topic, str) and isinstance(seq, int):
            t = self.timeouts.get(topic)
            if t is None:
                t = self.timeouts[topic] = self.cfg.handler_timeout(self.spec.group, topic)
            self.slot.begin(topic, seq, t, self.now)


def ack_frames(group: str, oks: list[tuple[str, int]], results: list[dict[str, Any]], ranges: bool) -> list[bytes]:
    """The ACK headers for a batch: one, unless the follow-ons its results carry pass what the hub reads in one
    (ACK_MAX); then the results are split over several. One event's follow-ons fit one (context.FOLLOW_ONS_MAX).

    A result whose follow-ons cannot be encoded (`ctx.publish` checks them, so this is a last resort) becomes a
    failure of its event: raised here, it would kill the child after its handlers ran, with no event charged,
    and the batch would come back for ever."""
    frame: bytes | None = None
    try:
        frame = ack_frame(group, oks, results, ranges)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
        if not results:
            raise  # oks alone are (topic, seq) pairs: never
        if len(results) == 1:
            r = results[0]
            line = f"follow-ons cannot be sent to the hub: {type(e).__name__}: {e}"[:1000]
            log.error("handler's follow-ons cannot be encoded", extra={"topic": r.get("t"), "seq": r.get("s"),
                                                                        "error": line})
            return ack_frames(group, oks, [{"t": r.get("t"), "s": r.get("s"), "ok": False, "error": line,
                                            "line": line, "permanent": False}], ranges)
        # several results: split below until the one that fails is alone
    if frame is not None and (len(frame) <= ACK_MAX or len(results) < 2):
        return [frame]
    half = len(results) // 2
    return ack_frames(group, oks, results[:half], ranges) + ack_frames(group, [], results[half:], ranges)


def ack_frame(group: str, oks: list[tuple[str, int]], results: list[dict[str, Any]], ranges: bool) -> bytes:
    """The ACK header for a batch: plain successes as per-topic seq ranges when the hub reads them (one pair of
    integers for a run of events instead of a result object each), else each as a full result."""
    if not ranges:
        full = [{"t": t, "s": s, "ok": True, "f": []} for t, s in oks]
        return P.enc({"g": group, "results": full + results if results else full})
    runs: dict[str, list[list[int]]] = {}
    # A stretch of consecutive seqs of one topic (nearly every batch is one) is walked with locals, and only its
    # ends go into `runs`: there it extends the topic's last range when it follows on, as each seq did before.
    topic: str | None = None
    first = last = 0
    for t, s in oks + [("", 0)]:  # the sentinel ends the last stretch
        if s == last + 1 and t == topic:
            last = s
            continue
        if topic is not None:
            rs = runs.get(topic)
            if rs is None:
                runs[topic] = [[first, last]]
            elif rs[-1][1] + 1 == first:
                rs[-1][1] = last
            else:
                rs.append([first, last])
        topic, first, last = t, s, s
    return P.enc({"g": group, "ok": runs, "results": results} if results else {"g": group, "ok": runs})


def child_main(cfg: Config, spec: WorkerSpec, slot: RunningSlot | None = None) -> int:
    """Entry point of a worker child process; returns the exit code. `slot` is shared with the supervisor."""
    signals = StopSignals()
    try:
        plugins = Plugins(cfg, spec)
        signals.keep("as the plugins were imported or their settings validated")
        try:
            plugins.lifecycle("worker_startup")
            signals.keep("in worker_startup")
        except ConfigError:
            raise
        except BaseException as e:
            # Said by the supervisor, from the note left in the slot: once whole, then counted (see
            # worker/startup_failures.py). Raised on out of the process, multiprocessing printed the traceback
            # (and a sys.exit(N) became the child's exit code).
            plugin = plugins.failed_startup or "?"
            if slot is None:  # no supervisor to say it
                log.error(f"worker_startup of plugin {plugin!r} failed: {line_of(e)}", exc_info=e)
                return EXIT_STARTUP
            log.debug("worker_startup failed", exc_info=e, extra={"plugin": plugin})
            leave_note(slot, plugin, e)
            return EXIT_STARTUP
        set_credit(spec.group, spec.credit)
    except ConfigError as e:
        log.error(str(e))
        return 2
    child = Child(cfg, spec, plugins, slot if slot is not None else RunningSlot.private(), signals)
    settle_gc()
    try:
        code = child.run()
        if plugins.exhausted is not None and code == 0:
            log.error(plugins.exhausted)
            return EXIT_EXHAUSTED
        return code
    finally:
        try:
            plugins.lifecycle("worker_shutdown")
        finally:
            child.close()
            signals.close()




_decode = msgspec.json.Decoder().decode


def parse(body: bytes) -> tuple[Any, bool]:
    """msgspec reads the hub's envelopes in a third of json's time and, unlike orjson (3.13 turns an integer past
    64 bits into a float), reads every integer exactly as the hub committed it; json still reads what msgspec
    refuses (NaN, lone surrogates), so nothing readable before is refused now. The flag says msgspec read it: it
    refuses lone surrogates, so every string in it is valid Unicode."""
    try:
        return _decode(body), True
    except msgspec.DecodeError:
        return json.loads(body), False


def read(body: bytes) -> tuple[Any, bool]:
    """One envelope frame, parsed; a frame that is not JSON stays as its bytes, refused by `handle` with the
    reason (the other events of its batch still run)."""
    try:
        return parse(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; json recurses per nesting level
        return body, False


def read_joined(frames: list[bytes], n: int) -> tuple[list[Any], bool]:
    """The envelopes of a one-frame DELIVER (`j`), in one parse: `frames` is [DELIVER, header, array]. Anything
    but a JSON array of exactly `n` items (one per attempt in the header) is refused whole with ProtocolError:
    which of its events a broken frame still holds cannot be known, so none of them may be run or acked. An
    item that is not a valid envelope is refused by `handle`, as a frame of its own would be."""
    if len(frames) != 3:
        raise P.ProtocolError(f"DELIVER with 'j' must carry exactly one envelope frame, got {len(frames) - 2}")
    try:
        envelopes, strict = parse(frames[2])
    except (ValueError, RecursionError) as e:
        raise P.ProtocolError(f"DELIVER envelope frame is not JSON ({str(e)[:200]})") from None
    if type(envelopes) is not list:
        raise P.ProtocolError("DELIVER envelope frame is not a JSON array")
    if len(envelopes) != n:
        raise P.ProtocolError(f"DELIVER envelope frame holds {len(envelopes)} envelopes, its header {n} attempts")
    return envelopes, strict


_TYPED = msgspec.json.Decoder(list[Attributes]).decode


def read_typed(frames: list[bytes], n: int) -> list[Event] | None:
    """The `Event`s of a one-frame DELIVER read by the typed schema (performance.md, change 22): the array decoded
    as `Attributes`, whose types and limits msgspec checks in C, each `Event` built from one. None, for the batch
    whole, when anything in it is not what the schema takes as the hub commits it: an extension, a mistyped or
    out-of-range attribute, a lone surrogate, NaN, a topic that is not a string, a seq `parse_seq` refuses or
    none, a missing or empty time (`read_envelope` would give it the clock
    when the event runs), not `n` items. The schema never refuses anything itself: `read_joined` and `handle`
    then read the batch as they always did."""
    if len(frames) != 3:
        return None
    try:
        attributes = _TYPED(frames[2])
    except (msgspec.MsgspecError, RecursionError):
        return None
    if len(attributes) != n:
        return None
    events = []
    for a in attributes:
        s, topic, t = a.seq, a.topic, a.time
        if topic is None or not t:
            return None
        seq: int | None
        if type(s) is str and s.isascii() and s.isdigit() and s[0] != "0" and len(s) < 19:
            seq = int(s)  # read_envelope's own shortcut
        elif (seq := seq_or_none(s)) is None:  # parse_seq refuses it (or there is none)
            return None
        events.append(Event(a.id, a.source, a.type, a.data, a.subject, t, a.datacontenttype or "application/json",
                            topic, seq, a.causationid, a.hops, a.schemaversion, {}))
    return events


def read_delivered(frames: list[bytes], n: int, detour: Detour) -> tuple[list[Any], bool]:
    """The envelopes of a one-frame DELIVER: `Event`s when the typed schema takes it (`read_typed`), else as
    `read_joined` reads them (raising its ProtocolError). `detour`: the child's own count of the DELIVERs still to
    go the old way directly (see `Detour`)."""
    if detour.taken():
        tried = False
    else:
        events = read_typed(frames, n)
        if events is not None:
            return events, True
        tried = True
    envelopes, strict = read_joined(frames, n)
    if tried:
        detour.start()
    return envelopes, strict


def exhaustion(err: BaseException) -> str | None:
    """What a handler's failure says this process has run out of ("file descriptors", "memory"), else None.

    A process out of descriptors or memory fails every event after the one that met it, on every attempt: with a
    plugin that leaks an open file per event, a group sent its whole stream to the dead-letter topic within a
    second while the pool looked healthy. That is a broken process, as one the OOM killer ends is: the event that
    met it is charged, the child ends and a fresh one takes the rest. The exception may be wrapped (an S3 client's
    connection error caused by EMFILE), so its causes are looked at too."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if isinstance(e, MemoryError):
            return "memory"
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
            return "file descriptors"
        e = e.__cause__ or e.__context__
        seen += 1
    return None


LINE_MAX = 1024
"""What the hub keeps of a failure's `line`. An exception's text may hold a whole response body: sent whole, one
past what the hub reads in a message (P.MAX_HEADER) had its ACK refused, and the event stayed in flight for as
long as the worker lived, the later events of its object waiting behind it."""
ERROR_MAX = 8000
"""What the hub keeps of a failure's traceback (`error`), and what one of its parts is cut to."""


def cut(text: str, limit: int = LINE_MAX) -> str:
    """`text` in at most `limit` characters, saying how long it was (a traceback part keeps its newline)."""
    if len(text) <= limit:
        return text
    end = "\n" if text.endswith("\n") else ""
    tail = f" ... [cut: {len(text)} characters]{end}"
    return text[:limit - len(tail)] + tail


Outcome = tuple[str, int] | dict[str, Any]
"""What `handle` reports: (topic, seq) for an event its handlers took without error and without follow-ons (the
common case, acked in the compact form), else the full ACK result for it (a failure, or follow-ons to carry)."""


def handle(plugins: Plugins, attempt: int, raw: Any, strict: bool,
           begin: Callable[[object, object], None], debug: bool | None = None) -> Outcome:
    """Run one envelope, as parsed by `read` or `read_joined` (`strict`: msgspec read it, so its text is valid), or
    its `Event` as `read_typed` built it. `debug`: whether bucketwire.events logs at DEBUG, as `_work` found it
    at the batch's start (None: asked here)."""
    try:
        # `Event.from_dict`'s reader, without the classmethod and the keyword in between (once per event)
        event = raw if type(raw) is Event else Event.from_json(raw) if type(raw) is bytes else read_envelope(
            Event, raw, strict)
    except EnvelopeError as e:
        # Refuse loudly: an envelope we cannot fully read must not be half-processed.
        topic, seq = (raw.get("topic"), seq_or_none(raw.get("seq"))) if isinstance(raw, dict) else (None, None)
        begin(topic, seq)
        log.error("refusing envelope", extra={"topic": topic, "seq": seq, "error": str(e)})
        if plugins.metered:
            event_done(plugins.group, topic if isinstance(topic, str) else None, "refused")
        return {"t": topic, "s": seq, "ok": False, "error": str(e), "line": str(e), "permanent": True}
    # The running record is written once the envelope is read (its topic and seq are known then): reading it
    # runs no plugin code, so a child that dies in between was not killed by this event's handlers.
    topic, seq = event.topic, event.seq
    begin(topic, seq)
    try:
        follow = plugins.run(event, attempt)
    except plugin_loader.HandlerFailed as f:
        err = f.error
        line = cut(traceback.format_exception_only(type(err), err)[-1].strip())
        log.warning("handler failed", extra={"plugin": f.plugin, "topic": topic, "seq": seq, "error": line,
                                             "attempt": attempt})
        if plugins.metered:
            event_done(plugins.group, topic, "failed")
        res: dict[str, Any] = {"t": topic, "s": seq, "ok": False,
                               "error": "".join(cut(t, ERROR_MAX) for t in traceback.format_exception(err))[-8000:],
                               "line": line,
                               "plugin": f.plugin, "permanent": f.permanent}
        if f.delay is not None:
            res["delay"] = f.delay
        out_of = exhaustion(err)
        if out_of is not None:
            plugins.exhausted = (
                f"this worker child ran out of {out_of}, met by plugin {f.plugin!r} ({line}); the child gives back "
                "its other events uncharged and ends, and a fresh one replaces it. A plugin of the group "
                + ("leaks open files or connections: close what it opens (with open(...) as f:, and "
                   "resp.close() and resp.release_conn() for S3 responses)" if out_of == "file descriptors" else
                   "keeps memory from event to event, or an event needs more than the child can have"))
        return res
    if plugins.metered:
        event_done(plugins.group, topic, "ok", [f.topic or "-" for f in follow] if follow else None)
    if events_log.isEnabledFor(logging.DEBUG) if debug is None else debug:
        events_log.debug(
            "event handled", extra={"topic": topic, "seq": seq, "attempt": attempt, "follow_ons": len(follow)})
    if follow or topic is None or seq is None:
        return {"t": topic, "s": seq, "ok": True, "f": [f.to_dict() for f in follow]}
    return topic, seq
