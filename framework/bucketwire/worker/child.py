"""One worker child: receives events from the hub, runs them through the plugins, reports the outcome.

Two threads, because a handler can run for minutes (a 500 MB replica) while the hub must keep hearing
heartbeats: the I/O thread owns the DEALER socket (heartbeats, reconnects, forwarding), the main thread runs
handlers. They talk over an inproc PAIR, so no ZeroMQ socket is ever shared between threads.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from bucketwire import protocol as P
from bucketwire import security
from bucketwire.config import Config, ConfigError
from bucketwire.context import Stores
from bucketwire.envelope import SCHEMA_VERSION, EnvelopeError, Event, parse_seq, seq_or_none
from bucketwire.procutil import on_stop_signals
from bucketwire.worker import plugin_loading as plugin_loader
from bucketwire.worker.metrics import event_done, handler_done, set_credit
from bucketwire.worker.running import RunningSlot

log = logging.getLogger("bucketwire.worker")



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
        loaded = plugin_loader.load(allow, spec.local_plugins)
        super().__init__(loaded, {n: cfg.plugins.get(n, {}) for n in loaded.names},
                         Stores(cfg.stores, cfg.hub.default_store), spec.group,
                         on_handled=lambda name, dt, ok: handler_done(spec.group, name, dt, ok=ok))

    def lifecycle(self, hook: str) -> None:
        if hook == "worker_startup":
            self.startup()
        else:
            self.shutdown()


def _io_thread(zctx: zmq.Context, cfg: Config, spec: WorkerSpec, pair_addr: str, stop: threading.Event,
               slot: RunningSlot) -> None:
    """Own the DEALER: forward deliveries to the main thread, acks to the hub, heartbeat both ways."""
    pair = zctx.socket(zmq.PAIR)
    pair.connect(pair_addr)
    ready = P.enc(P.Ready(
        group=spec.group, topics=spec.topics, credit=spec.credit, proto=P.PROTO, schema=SCHEMA_VERSION,
        host=socket.gethostname()[:64], pid=os.getpid(), start=spec.start,  # type: ignore[arg-type]
    ))

    keys = security.client_keys(cfg)  # checked by `bucketwire worker` before the children start

    def send(d: zmq.Socket, frames: list[bytes]) -> bool:
        """Never block: a DEALER whose handshake was refused (CURVE key not yet admitted) has no pipe, and a
        blocking send would hang this thread for good -- no heartbeats, no reconnect. What cannot go out now is
        dropped; the hub redelivers unacked events and the reconnect below re-sends READY."""
        try:
            d.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.debug("hub not reachable; message dropped", extra={"command": frames[0][:8].decode("ascii", "replace")})
            return False

    def connect() -> zmq.Socket:
        d = zctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 2000)
        ident = b"w-" + uuid.uuid4().bytes
        slot.set_ident(ident)  # so the supervisor can name this child to the hub if it dies
        d.setsockopt(zmq.IDENTITY, ident)
        d.setsockopt(zmq.SNDHWM, 100_000)
        d.setsockopt(zmq.RCVHWM, 100_000)
        security.apply_client(d, cfg, keys)
        d.connect(cfg.client.work)
        send(d, [P.READY, ready])
        return d

    dealer = connect()
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(pair, zmq.POLLIN)
    last_hub = last_sent = time.monotonic()
    interval, timeout = spec.heartbeat_interval, spec.heartbeat_timeout
    try:
        while True:
            socks = dict(poller.poll(int(interval * 1000 / 2)))
            now = time.monotonic()
            if pair in socks:
                for frames in drain(pair):
                    if frames[0] == b"QUIT":
                        return
                    send(dealer, frames)
                    last_sent = now
            if dealer in socks:
                for frames in drain(dealer):
                    last_hub = now
                    cmd = frames[0]
                    if cmd == P.DELIVER:
                        pair.send_multipart(frames)
                    elif cmd == P.ERR:
                        try:
                            err = P.decode(frames[1], P.Err)
                        except (P.ProtocolError, IndexError) as e:
                            log.warning("unreadable ERR from the hub", extra={"error": str(e)})
                            continue
                        if err.fatal:
                            pair.send_multipart([b"FATAL", frames[1]])
                        elif err.reready:
                            send(dealer, [P.READY, ready])
                        else:
                            log.warning("hub rejected a message", extra={"error": err.error})
            if now - last_hub > timeout:
                # The hub went quiet (restart, network): reconnect under a new identity. Events already
                # delivered to us will be redelivered by the hub; tell the main thread to drop unstarted ones.
                log.warning("hub silent; reconnecting", extra={"endpoint": cfg.client.work})
                poller.unregister(dealer)
                dealer.close(0)
                dealer = connect()
                poller.register(dealer, zmq.POLLIN)
                pair.send_multipart([b"RESET"])
                last_hub = last_sent = now
            elif now - last_sent >= interval and not stop.is_set():
                send(dealer, [P.HB, heartbeat(slot)])
                last_sent = now
    finally:
        dealer.close()
        pair.close(0)


def heartbeat(slot: RunningSlot) -> bytes:
    """A heartbeat goes out only when nothing else did for an interval, so a handler running then is a long one:
    say which, for `bucketwire status`. Costs nothing on the hot path."""
    r = slot.read()
    if r is None:
        return b"{}"
    return P.enc({"run": [r.topic, r.seq, round(time.monotonic() - r.started, 3), r.timeout]})


def drain(sock: zmq.Socket, limit: int = 1000) -> Iterator[list[bytes]]:
    """The messages waiting on `sock` right now (at most `limit`), without blocking."""
    for _ in range(limit):
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
            return
        yield sock.recv_multipart(zmq.NOBLOCK)


def child_main(cfg: Config, spec: WorkerSpec, slot: RunningSlot | None = None) -> int:
    """Entry point of a worker child process; returns the exit code. `slot` is shared with the supervisor."""
    # The I/O and handler threads hand every event to each other; the default 5 ms GIL switch interval
    # would show up directly as tail latency.
    sys.setswitchinterval(0.0005)
    stopping = threading.Event()
    on_stop_signals(stopping.set)
    try:
        plugins = Plugins(cfg, spec)
        plugins.lifecycle("worker_startup")
        set_credit(spec.group, spec.credit)
    except ConfigError as e:
        log.error(str(e))
        return 2
    zctx = zmq.Context()
    pair = zctx.socket(zmq.PAIR)
    addr = f"inproc://worker-io-{os.getpid()}"
    pair.bind(addr)
    slot = slot if slot is not None else RunningSlot.private()
    timeouts: dict[str, float] = {}

    def begin(topic: object, seq: object) -> None:
        """Record the event whose handlers are about to run (see worker/running.py)."""
        if isinstance(topic, str) and isinstance(seq, int):
            t = timeouts.get(topic)
            if t is None:
                t = timeouts[topic] = cfg.handler_timeout(spec.group, topic)
            slot.begin(topic, seq, t)

    io = threading.Thread(target=_io_thread, args=(zctx, cfg, spec, addr, stopping, slot), name="io", daemon=True)
    io.start()
    queue: deque[tuple[int, bytes]] = deque()
    acks: list[dict[str, Any]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if acks:
            pair.send_multipart([P.ACK, P.enc({"g": spec.group, "results": acks})])
            acks.clear()
        last_flush = time.monotonic()

    def take(block_ms: int) -> bool:
        """Pull whatever the I/O thread forwarded; False on a fatal error from the hub."""
        if not pair.poll(block_ms):
            return True
        for frames in drain(pair, limit=1 << 30):
            if frames[0] == P.DELIVER:
                attempts = P.decode(frames[1], P.Deliver).a
                for i, body in enumerate(frames[2:]):
                    queue.append((attempts[i] if i < len(attempts) else 1, body))
            elif frames[0] == b"RESET":
                queue.clear()
            elif frames[0] == b"FATAL":
                log.error(P.decode(frames[1], P.Err).error or "hub refused this worker")
                return False
        return True

    code = 0
    try:
        while not stopping.is_set():
            if not take(0 if queue else 200):
                code = 2
                break
            if not queue:
                flush()
                continue
            attempt, body = queue.popleft()
            acks.append(_handle(plugins, attempt, body, begin))
            slot.end()
            if not queue or len(acks) >= 64 or time.monotonic() - last_flush > 0.005:
                flush()
        flush()
        # Drain: give back what we had not started so the hub hands it to another worker at once.
        requeue = []
        for _, body in queue:
            try:
                d = json.loads(body)
                requeue.append([d["topic"], parse_seq(d["seq"])])
            except (ValueError, KeyError, TypeError):  # EnvelopeError is a ValueError
                pass
        pair.send_multipart([P.BYE, P.enc({"requeue": requeue})])
        time.sleep(0.05)
        pair.send_multipart([b"QUIT"])
        io.join(timeout=3)
    finally:
        try:
            plugins.lifecycle("worker_shutdown")
        finally:
            pair.close(0)
            zctx.term()
    return code


def _handle(plugins: Plugins, attempt: int, body: bytes, begin: Callable[[object, object], None]) -> dict[str, Any]:
    try:
        raw = json.loads(body)
        topic, seq = raw.get("topic"), seq_or_none(raw.get("seq"))  # the hub's ACK frame carries it as an int
    except ValueError:
        topic, seq = None, None
        raw = None
    begin(topic, seq)
    try:
        event = Event.from_dict(raw) if raw is not None else Event.from_json(body)
    except EnvelopeError as e:
        # Refuse loudly: an envelope we cannot fully read must not be half-processed.
        log.error("refusing envelope", extra={"topic": topic, "seq": seq, "error": str(e)})
        event_done(plugins.group, topic if isinstance(topic, str) else None, "refused")
        return {"t": topic, "s": seq, "ok": False, "error": str(e), "line": str(e), "permanent": True}
    try:
        follow = plugins.run(event, attempt)
    except plugin_loader.HandlerFailed as f:
        err = f.error
        line = traceback.format_exception_only(type(err), err)[-1].strip()
        log.warning("handler failed", extra={"plugin": f.plugin, "topic": topic, "seq": seq, "error": line,
                                             "attempt": attempt})
        event_done(plugins.group, event.topic, "failed")
        res = {"t": topic, "s": seq, "ok": False, "error": "".join(traceback.format_exception(err))[-8000:],
               "line": line, "plugin": f.plugin, "permanent": f.permanent}
        if f.delay is not None:
            res["delay"] = f.delay
        return res
    event_done(plugins.group, event.topic, "ok", [f.topic or "-" for f in follow])
    logging.getLogger("bucketwire.events").debug(
        "event handled", extra={"topic": topic, "seq": seq, "attempt": attempt, "follow_ons": len(follow)})
    return {"t": topic, "s": seq, "ok": True, "f": [f.to_dict() for f in follow]}
