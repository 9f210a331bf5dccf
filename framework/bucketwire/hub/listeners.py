"""The hub's ZeroMQ listeners: the work ROUTER and fan-out XPUB pairs, and everything CURVE does to them.

Kept apart from the delivery loop because it changes for different reasons: key rotation (an old and a new server
key served side by side on their own endpoints), allow-list reloads (SIGHUP or a periodic check), revoked keys
refused on live connections, role checks on live subscriptions (XPUB in manual mode), and which topics anyone
subscribes to at all, so the hub sends nothing to a fan-out nobody listens to. `Hub` holds one
`Listeners` and calls it; what the listeners need from the hub (the metrics, what to do when a connected key is
revoked) is handed in, so nothing here reaches into the delivery state. Everything runs on the hub's loop thread.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq
from zmq import backend as zmq_backend

from bucketwire import config as config_mod
from bucketwire import protocol as P
from bucketwire.config import Config, ConfigError
from bucketwire.hub.metrics import HubMetrics
from bucketwire.hub.poller import LoopPoller
from bucketwire.security import (
    LOCAL_USER,
    KeyAuthenticator,
    RevocationSource,
    Roles,
    apply_server,
    load_keypair,
    server_key_path,
    start_authenticator,
)
from bucketwire.zmqio import readable, recv_frames
from bucketwire.zmtp import LocalRouter, endpoint_path

log = logging.getLogger("bucketwire.hub")

_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_send = cast(Callable[[Any, bytes, int], None], zmq_backend.Socket.send)
"""libzmq's send without pyzmq's Python layer (routing-id, group and Frame checks we never use): the hub sends a
frame per event, and that layer was a fifth of the cost of each."""

Socket = zmq.Socket[bytes]


@dataclass(slots=True)
class _Listener:
    """One work ROUTER + XPUB pair served with one server key (None without CURVE).

    `subs` counts the live subscriptions of the XPUB by prefix. Without CURVE libzmq reports a prefix when its
    first subscriber arrives and when its last one leaves, so a count is 0 or 1. With CURVE (manual mode) it
    reports every subscription and every cancellation, a departed subscriber's included, so the counts add up;
    a subscription refused by role is counted too (its cancellation comes like any other), which can only make
    the hub send something libzmq then drops."""

    work_ep: str
    pub_ep: str
    key: Path | None
    work: Socket
    pub: Socket
    subs: dict[bytes, int] = field(default_factory=dict)


class Listeners:
    """The hub's sockets, CURVE/ZAP, key reloads, subscription checks and reply routing.

    `user` is the key name (ZAP User-Id) of the message `receive` returned last: the hub's role checks read it
    while they handle that message. `on_revoked(ident)` is called when a message arrives from a key that was
    removed from the allow-list after it connected (the hub forgets that peer's worker, if it was one).
    `revocations` is where the revocation list is read (`keys revoke`: the cluster's bucket with JetStream, the
    state_dir's file with SQLite); it is read off the loop and `wake` is called when a reading has ended.
    """

    def __init__(self, cfg: Config, metrics: HubMetrics, on_revoked: Callable[[bytes], None],
                 revocations: RevocationSource | None = None, wake: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._on_revoked = on_revoked
        self._revocations = revocations
        self._wake = wake
        self._revoked_read = threading.Event()
        """Set (from whichever thread read it) when a reading of the revocation list has ended."""
        self.roles = Roles(cfg.security.roles)
        self.auth: KeyAuthenticator | None = None
        self.listeners: list[_Listener] = []
        self.pubs: list[Socket] = []
        self.poller = LoopPoller()
        """Polled by the hub's loop; the work sockets and the local socket are registered here, the hub adds its
        own descriptors. What uses a ZeroMQ socket here says so (`touched`): see hub/poller.py."""
        self.user: str | None = None
        self._zctx: zmq.Context[Socket] | None = None
        self._sock_of: dict[bytes, Socket] = {}
        self._targets: dict[str, tuple[Socket, ...]] = {}
        """topic -> the XPUB sockets with a subscriber for it; forgotten whenever a subscription changes."""
        self._reload = threading.Event()
        self._next_key_check = 0.0
        self.local: LocalRouter | None = None
        """[hub] local: the Unix socket this thread serves itself (no libzmq I/O thread on the path)."""

    # -- life cycle ------------------------------------------------------------------------------------------
    @property
    def work(self) -> Socket:
        return self.listeners[0].work

    @property
    def pub(self) -> Socket:
        return self.listeners[0].pub

    @property
    def curve(self) -> bool:
        return self.auth is not None

    def work_sockets(self) -> list[Socket]:
        return [ls.work for ls in self.listeners]

    def local_ready(self, ready: Container[object] | None) -> bool:
        """Whether the local socket may have something to read this turn."""
        local = self.local
        return local is not None and (ready is None or local in ready or bool(local.ready) or bool(local.paused))

    def open(self) -> None:
        """Create and bind every listener (with CURVE: start ZAP first). A bind failure is one OSError line.

        The local socket first: what is wrong with its path is the config's to say, whether or not the TCP ports
        are free (they are taken by others at times; a path is ours)."""
        path = endpoint_path(self.cfg.hub.local)
        if path:
            try:
                self.local = LocalRouter(path, max_message_bytes(self.cfg), self._local_refused, self.poller)
            except OSError as e:
                why = e.strerror or str(e)
                raise OSError(f"cannot bind [hub] local {self.cfg.hub.local}: {why}; set [hub] local to a path this "
                              "user can create a socket at, or to \"\" for none") from None
        zctx = self._zctx = zmq.Context()
        try:
            self.listeners = [_Listener(self.cfg.hub.work, self.cfg.hub.publish, None,
                                        _router(zctx, max_message_bytes(self.cfg)),
                                        self._make_pub(zctx))]
            self.pubs = [self.pub]
            self._secure_primary(zctx)
            _bind(self.work, self.cfg.hub.work, "[hub] work")
            _bind(self.pub, self.cfg.hub.publish, "[hub] publish")
            self._open_previous(zctx)
        except zmq.ZMQError as e:
            self.close()
            raise OSError(f"cannot open the hub's ZeroMQ sockets ({e})") from None
        except OSError:
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        for ls in self.listeners:
            self.poller.register(ls.work, zmq.POLLIN)
            self.poller.register(ls.pub, zmq.POLLIN)  # a subscription wakes the loop: served from the next event

    def _local_refused(self, why: str) -> None:
        self.metrics.rejected.labels("local", "protocol").inc()
        # Named by its ingress, so logs.PeerRateLimit keeps it to a line per 10 s: a libzmq DEALER refused for a
        # live identity reconnects every 100 ms for as long as it runs (a line each, without end). The metric
        # counts every refusal.
        log.warning("local peer refused", extra={"ingress": "local", "error": why})

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None
        for ls in self.listeners:
            self.poller.unregister(ls.work)
            self.poller.unregister(ls.pub)
            ls.work.close(0)
            ls.pub.close(0)
        self.listeners, self.pubs = [], []
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self._zctx is not None:
            self._zctx.term()
            self._zctx = None
        self.poller.close()  # last: the local socket and the listeners have left it above

    def _make_pub(self, zctx: zmq.Context[Socket]) -> Socket:
        """An XPUB: the hub learns which topics anyone subscribes to and sends nothing else (at saturation three
        of the hub's four socket sends per event used to go to a fan-out nobody listened to). With CURVE it is in
        manual mode: the hub then sees every subscription with the key that asked for it and applies only what
        that key's role allows (`[security.roles.NAME] subscribe`)."""
        curve = self.cfg.security.curve
        p = zctx.socket(zmq.XPUB)
        p.setsockopt(zmq.LINGER, 0)
        p.setsockopt(zmq.SNDHWM, fanout_hwm(self.cfg))
        if curve:
            p.setsockopt(zmq.XPUB_MANUAL, 1)
        return p

    def _secure_primary(self, zctx: zmq.Context[Socket]) -> None:
        """With [security] curve: start ZAP and make the primary work/PUB pair CURVE servers (before bind)."""
        sec = self.cfg.security
        if not sec.curve:
            return
        revoked = self._revocations.revoked_seen().keys if self._revocations is not None else frozenset()
        self.auth = start_authenticator(zctx, sec, revoked)
        self.roles.admitted = self.auth.allowed_names
        self.metrics.keys_invalid.set(len(self.auth.invalid))
        key = server_key_path(sec)
        apply_server(self.work, key, sec.zap_domain)
        apply_server(self.pub, key, sec.zap_domain)
        self.listeners[0].key = key
        self._next_key_check = time.monotonic() + sec.reload_interval

    def _new_listener(self, zctx: zmq.Context[Socket], work_ep: str, pub_ep: str, key: Path,
                      names: tuple[str, str] | None = None) -> _Listener:
        """`names`: the settings the endpoints come from, for a bind failure's line (at start)."""
        w = _router(zctx, max_message_bytes(self.cfg))
        p = self._make_pub(zctx)
        try:
            apply_server(w, key, self.cfg.security.zap_domain)
            apply_server(p, key, self.cfg.security.zap_domain)
            for sock, ep, name in ((w, work_ep, names and names[0]), (p, pub_ep, names and names[1])):
                try:
                    _bind_retry(sock, ep)
                except zmq.ZMQError as e:
                    if name is None:
                        raise
                    raise _bind_error(e, ep, name) from None
        except Exception:
            w.close(0)
            p.close(0)
            raise
        return _Listener(work_ep, pub_ep, key, w, p)

    def _open_previous(self, zctx: zmq.Context[Socket]) -> None:
        """Serve the previous server key on its own endpoints, so clients can move to the new key gradually."""
        sec = self.cfg.security
        if sec.curve and sec.previous_server_secret_key is not None:
            assert sec.work_previous and sec.publish_previous
            self.listeners.append(self._new_listener(zctx, sec.work_previous, sec.publish_previous,
                                                     sec.previous_server_secret_key,
                                                     ("[security] work_previous", "[security] publish_previous")))
            self.pubs = [ls.pub for ls in self.listeners]
            log.info("serving the previous server key too", extra={"work": sec.work_previous,
                                                                   "publish": sec.publish_previous})

    # -- work sockets ----------------------------------------------------------------------------------------
    def receive(self, sock: Socket, ready: bool = False) -> list[bytes] | None:
        """The next message on `sock`, or None when none waits; [] for one from a revoked key (already answered).
        `ready`: the loop's poll has just said a message waits, so libzmq is not asked again.

        With CURVE, zero-copy frames carry the ZAP User-Id (the name of the key that admitted the peer): it
        becomes `user`, and the peer's ROUTER is remembered so replies leave on the socket it came in on.
        """
        self.poller.touched(sock)
        if not ready and not readable(sock):  # cheaper than raising zmq.Again on every turn
            return None
        try:
            if self.auth is None:
                frames = recv_frames(sock)
                if self.local is not None:
                    if self.local.has(frames[0]):
                        return []  # a remote peer under a local peer's identity: never read as that peer's
                    self.user = None  # not the last local peer's LOCAL_USER: a pool's notices name its workers by it
                return frames
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self.user = _user_id(parts[-1])
        frames = [f.bytes for f in parts]
        if self.local is not None and self.local.has(frames[0]):
            return []
        self._remember_socket(frames[0], sock)
        return frames if self._admitted(frames[0], self.auth) else []

    def receive_local(self, local: LocalRouter) -> list[bytes] | None:
        """The next message from a local peer, or None. It acts as the hub's own user: with CURVE, as a key
        without a role (the account that can open the socket can read the hub's server key too)."""
        frames = local.receive()
        if frames is not None:
            self.user = LOCAL_USER
        return frames

    def send(self, frames: list[bytes]) -> bool:
        """Route a reply to the peer `frames[0]` names; False if it is gone or its queue is full."""
        local = self.local
        if local is not None and local.has(frames[0]):
            if local.send(frames):
                return True
            self.metrics.send_again.labels("work").inc()
            return False
        sock = self._sock_of.get(frames[0], self.work) if self._sock_of else self.work
        self.poller.touched(sock)
        try:
            # Frame by frame with int flags: send_multipart computes `SNDMORE | flags` on enums for every frame,
            # which cost more than the send itself (~3 us a frame, and a DELIVER has a frame per event). A
            # refusal (unknown peer, full queue) comes at the first frame: ZeroMQ takes a message whole or not.
            for f in frames[:-1]:
                _send(sock, f, _MORE)
            _send(sock, frames[-1], _NOBLOCK)
            return True
        except zmq.Again:
            self.metrics.send_again.labels("work").inc()
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
        return False

    def forbidden(self, ident: bytes, why: str) -> None:
        """Answer a request the sender's role does not allow."""
        self.metrics.rejected.labels("zmq", "forbidden").inc()
        log.warning("request refused by role", extra={"key": self.user, "error": why})
        self.send([ident, P.ERR, P.enc({"fatal": True, "error": why})])

    def _remember_socket(self, ident: bytes, sock: Socket) -> None:
        """Replies go out on the ROUTER the peer came in on; bounded, oldest entries forgotten first."""
        self._sock_of.pop(ident, None)
        self._sock_of[ident] = sock
        if len(self._sock_of) > 100_000:
            for k in list(self._sock_of)[:10_000]:
                del self._sock_of[k]

    def _admitted(self, ident: bytes, auth: KeyAuthenticator) -> bool:
        """Refuse every message from a key that was removed from the allow-list after it connected."""
        if self.user in auth.allowed_names:
            return True
        self.metrics.rejected.labels("zmq", "revoked").inc()
        self._on_revoked(ident)
        self.send([ident, P.ERR, P.enc({"fatal": True, "error": "this client key is no longer authorized"})])
        return False

    # -- fan-out ---------------------------------------------------------------------------------------------
    def targets(self, topic: str) -> tuple[Socket, ...]:
        """The XPUB sockets (two while an old and a new server key are both served) where someone subscribes to
        `topic`: empty, and the hub builds and sends nothing, when nobody does."""
        got = self._targets.get(topic)
        if got is None:
            frame = P.topic_frame(topic)
            # A tuple: the empty one is shared, and the cache holds no list per topic for the collector to walk.
            got = tuple(ls.pub for ls in self.listeners
                        if any(n > 0 and frame.startswith(prefix) for prefix, n in ls.subs.items()))
            if len(self._targets) > max(10_000, 2 * self.cfg.hub.max_topics):  # every topic, not thrashing
                self._targets.clear()
            self._targets[topic] = got
        return got

    def subscriptions(self) -> int:
        """Prefixes someone subscribes to, over every XPUB (the gauge `bucketwire_fanout_subscriptions`)."""
        return sum(1 for ls in self.listeners for n in ls.subs.values() if n > 0)

    def publish(self, frames: list[bytes], pubs: Sequence[Socket] | None = None) -> None:
        """Send on `pubs` (`targets(topic)`), or on every XPUB socket."""
        *head, last = frames
        for pub in self.pubs if pubs is None else pubs:
            self.poller.touched(pub)
            try:  # frame by frame with int flags: send_multipart's enum arithmetic cost more than the sends
                for f in head:
                    _send(pub, f, _MORE)
                _send(pub, last, _NOBLOCK)
            except zmq.Again:  # refused at the first frame: ZeroMQ takes a message whole or not at all
                self.metrics.send_again.labels("pub").inc()

    def _drain_subscriptions(self, ready: Container[object] | None) -> None:
        """Count the subscriptions that arrived on the XPUB sockets; with CURVE also apply or refuse each.
        `ready`: what the loop's poll found readable (None: ask every socket)."""
        manual = self.auth is not None
        for ls in self.listeners:
            pub = ls.pub
            if ready is not None and pub not in ready:
                continue
            self.poller.touched(pub)
            for _ in range(1000):
                if not readable(pub):
                    break
                msg = pub.recv(copy=False)
                data = msg.bytes
                if not data or data[0] not in (0, 1):
                    continue
                sub = data[1:]
                self._count(ls, sub, data[0] == 1, manual)
                if not manual:
                    continue  # libzmq applied it already
                if data[0] == 0:
                    pub.setsockopt(zmq.UNSUBSCRIBE, sub)
                    continue
                try:
                    user = _user_id(msg)
                except zmq.ZMQError:
                    user = None
                if sub.endswith(P.TOPIC_END):
                    ok = self.roles.allows(user, "subscribe", P.topic_of(sub))
                else:  # everything, or a bare prefix: only for a key whose role does not limit subscriptions
                    ok = self.roles.allows(user, "subscribe", "\0any topic\0")
                if ok:
                    pub.setsockopt(zmq.SUBSCRIBE, sub)  # applies to the pipe this subscription came from
                else:
                    self.metrics.rejected.labels("zmq", "forbidden").inc()
                    log.warning("subscription refused by role",
                                extra={"key": user, "subscription": sub[:64].decode("utf-8", "replace")})

    def _count(self, ls: _Listener, prefix: bytes, subscribe: bool, manual: bool) -> None:
        n = ls.subs.get(prefix, 0)
        n = (n + 1 if manual else 1) if subscribe else max(0, n - 1)
        if n:
            ls.subs[prefix] = n
        else:
            ls.subs.pop(prefix, None)
        self._targets.clear()
        self.metrics.fanout_subscriptions.set(self.subscriptions())

    # -- security ----------------------------------------------------------------------------------------------
    def request_reload(self) -> None:
        """Thread/signal-safe: re-read the key allow-list and the server keys on the next `tick` (SIGHUP)."""
        self._reload.set()

    def tick(self, now: float, ready: Container[object] | None = None) -> None:
        """Each loop turn: with CURVE the reloads when due; then the subscriptions that arrived (`ready`: what the
        loop's poll found readable; None asks every socket)."""
        if self.auth is not None:
            self._security_tick(now, self.auth)
        self._drain_subscriptions(ready)

    def revocation_problem(self) -> str | None:
        """Why the revocation list cannot be read now (the last list read stays in force), for /healthz."""
        return self._revocations.revoked_seen().error if self._revocations is not None else None

    def _revocations_read(self) -> None:
        self._revoked_read.set()
        self._wake()

    def _security_tick(self, now: float, auth: KeyAuthenticator) -> None:
        """Every reload_interval (and on SIGHUP): pick up allow-list changes and start a reading of the
        revocation list, applied when it has ended (the next turn); on SIGHUP also the server keys."""
        hup = self._reload.is_set()
        due = hup or now >= self._next_key_check
        if due and self._revocations is not None:
            self._revocations.read_revoked(self._revocations_read)
        read = self._revoked_read.is_set()
        if not due and not read:
            return
        if due:
            self._next_key_check = now + self.cfg.security.reload_interval
            self._reload.clear()
        self._revoked_read.clear()
        roles_changed = self._reload_server_keys(auth) if hup else False
        revoked = self._revocations.revoked_seen().keys if self._revocations is not None else None
        changed = auth.reload(force=hup, revoked=revoked)
        self.roles.admitted = auth.allowed_names
        self.metrics.keys_invalid.set(len(auth.invalid))
        if (changed and changed[1]) or roles_changed:
            # PUB cannot refuse one subscriber, nor take back a subscription it applied: re-create the PUB
            # sockets so every subscriber reconnects, re-authenticates (removed keys fail the handshake) and
            # re-sends its subscriptions, which are decided again under the roles now in force. Live
            # subscribers catch up via heartbeats.
            log.info("fan-out sockets re-created; subscribers reconnect and their subscriptions are re-checked",
                     extra={"removed_keys": sorted(changed[1]) if changed else [], "roles_changed": roles_changed})
            self._rebind_pubs()

    def _rebind_pubs(self) -> None:
        assert self._zctx is not None
        for ls in self.listeners:
            self.poller.unregister(ls.pub)
            ls.pub.close(0)
            ls.subs.clear()  # every subscriber reconnects and subscribes again
            p = self._make_pub(self._zctx)
            if ls.key is not None:
                apply_server(p, ls.key, self.cfg.security.zap_domain)
            _bind_retry(p, ls.pub_ep)
            ls.pub = p
            self.poller.register(p, zmq.POLLIN)
        self.pubs = [ls.pub for ls in self.listeners]
        self._targets.clear()
        self.metrics.fanout_subscriptions.set(self.subscriptions())

    def _reload_server_keys(self, auth: KeyAuthenticator) -> bool:
        """Re-read [hub] work/publish, the [security] server keys and roles; keep unchanged listeners, open new
        ones. Returns True when the roles changed (live subscriptions must then be decided again).

        Listeners are matched by (endpoints, server public key), so a rotation step that moves the current key
        to `previous_server_secret_key` on its existing endpoints keeps every established connection.
        """
        if self.cfg.path is None or self._zctx is None:
            return False
        try:
            new = config_mod.load(self.cfg.path, warn=False)
        except ConfigError as e:
            log.error("reload refused; keeping the running configuration", extra={"error": str(e)})
            return False
        sec = new.security
        if not sec.curve or sec.server_secret_key is None:
            log.error("reload refused: [security] curve must stay on with a server_secret_key")
            return False
        want: list[tuple[str, str, Path]] = [(new.hub.work, new.hub.publish, sec.server_secret_key)]
        if sec.previous_server_secret_key is not None and sec.work_previous and sec.publish_previous:
            want.append((sec.work_previous, sec.publish_previous, sec.previous_server_secret_key))

        def ident(w: str, p: str, key: Path | None) -> tuple[str, str, bytes | None]:
            return (w, p, None if key is None else load_keypair(key, secret=True, what="[security] server key")[0])

        try:
            want_ids = [ident(*x) for x in want]
        except ConfigError as e:
            log.error("reload refused; keeping the running configuration", extra={"error": str(e)})
            return False
        have = {ident(ls.work_ep, ls.pub_ep, ls.key): ls for ls in self.listeners}
        keep = [have.get(i) for i in want_ids]
        for i, old in have.items():
            if i not in want_ids:
                self.poller.unregister(old.work)
                self.poller.unregister(old.pub)
                old.work.close(0)
                old.pub.close(0)
                self._sock_of = {k: v for k, v in self._sock_of.items() if v is not old.work}
                log.info("stopped serving a server key", extra={"work": old.work_ep, "publish": old.pub_ep})
        out = []
        for (w, p, key), ls in zip(want, keep, strict=True):
            if ls is None:
                try:
                    ls = self._new_listener(self._zctx, w, p, key)
                except (zmq.ZMQError, ConfigError) as e:
                    log.error("cannot serve a server key", extra={"work": w, "publish": p, "error": str(e)})
                    continue
                self.poller.register(ls.work, zmq.POLLIN)
                self.poller.register(ls.pub, zmq.POLLIN)
                log.info("serving a server key", extra={"work": w, "publish": p})
            out.append(ls)
        if not out:
            log.error("reload left no listener; this hub no longer serves ZeroMQ clients")
            return False
        self.listeners = out
        self.pubs = [ls.pub for ls in out]
        self._targets.clear()
        self.metrics.fanout_subscriptions.set(self.subscriptions())
        self.cfg.hub.work, self.cfg.hub.publish = out[0].work_ep, out[0].pub_ep
        roles_changed = sec.roles != self.cfg.security.roles
        self.cfg.security.roles = sec.roles
        self.roles = Roles(sec.roles, auth.allowed_names)
        return roles_changed


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id a CURVE frame carries: the name of the key that admitted its peer."""
    uid = frame.get("User-Id")
    return uid if isinstance(uid, str) and uid else None


FANOUT_HWM_MAX = 100_000
"""The fan-out's high-water mark when its byte budget allows more: what it was before the budget."""


def fanout_hwm(cfg: Config) -> int:
    """The XPUB's queue per subscriber, in messages: a slow subscriber holds at most `fanout_buffer_mb`, as no
    fan-out message carries an envelope over `fanout_event_bytes` (larger ones go out as their head frame)."""
    n = int(cfg.hub.fanout_buffer_mb * (1 << 20)) // cfg.hub.fanout_event_bytes
    return max(16, min(FANOUT_HWM_MAX, n))


def max_message_bytes(cfg: Config) -> int:
    """The largest message the work sockets take (ZeroMQ drops the connection of a peer that sends more, with
    no answer): room for a full DELIVER batch's worth of events at [hub] max_event_bytes, both ways (a PUB of
    many events, an ack carrying follow-ons), and never less than 64 MiB. The per-event limit is what gets a
    clear answer (PUBNACK naming the event); this one only stops a peer from making the hub buffer without
    bound."""
    return max(64 << 20, 2 * cfg.hub.dispatch_batch * cfg.hub.max_event_bytes)


def _router(zctx: zmq.Context[Socket], max_msg: int) -> Socket:
    w = zctx.socket(zmq.ROUTER)
    for opt, v in ((zmq.ROUTER_MANDATORY, 1), (zmq.LINGER, 0), (zmq.SNDHWM, 100_000), (zmq.RCVHWM, 100_000),
                   (zmq.MAXMSGSIZE, max_msg)):
        w.setsockopt(opt, v)
    return w


def _bind(sock: Socket, endpoint: str, key: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise _bind_error(e, endpoint, key) from None


def _bind_error(e: zmq.ZMQError, endpoint: str, key: str) -> OSError:
    """One line naming the setting to change: a hub has three listeners (and two more during a key rotation),
    and "address already in use" alone does not say which of them to move."""
    if e.errno == zmq.EADDRINUSE:
        why = f"address already in use; another process (a hub?) listens there: stop it, or set {key} to a free port"
    elif e.errno == errno.EADDRNOTAVAIL:
        why = f"is not an address of this host: set {key} to one of its addresses, or to 0.0.0.0 for all of them"
    else:
        why = f"{e.strerror}; set {key} to a ZeroMQ endpoint this host can listen on, like tcp://127.0.0.1:5557"
    return OSError(f"cannot bind {key} {endpoint}: {why}")


def _bind_retry(sock: Socket, endpoint: str, tries: int = 50) -> None:
    """Bind, retrying briefly: a socket just closed on the same endpoint is released asynchronously."""
    for i in range(tries):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or i == tries - 1:
                raise
            time.sleep(0.02)
