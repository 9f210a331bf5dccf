"""The hub's ZeroMQ listeners: the work ROUTER and fan-out PUB pairs, and everything CURVE does to them.

A mixin of `Hub`, kept apart from the delivery loop because it changes for different reasons: key rotation
(an old and a new server key served side by side on their own endpoints), allow-list reloads (SIGHUP or a
periodic check), revoked keys refused on live connections, and role checks on live subscriptions (XPUB in manual
mode). Everything here runs on the hub's loop thread, like the rest of the hub.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import zmq

from bucketwire import protocol as P
from bucketwire.security import Roles

log = logging.getLogger("bucketwire.hub")

_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class Listeners:
    """Socket set-up and CURVE management for `Hub`; relies on the hub's cfg, metrics and worker bookkeeping."""

    cfg: Any
    metrics: Any
    roles: Roles
    auth: Any
    workers: dict
    listeners: list[_Listener]
    work: zmq.Socket
    pub: zmq.Socket
    pubs: list[zmq.Socket]

    # -- fan-out ---------------------------------------------------------------------------------------------
    def _make_pub(self, zctx: zmq.Context) -> zmq.Socket:
        """PUB, or with CURVE an XPUB in manual mode: the hub then sees every subscription with the key that
        asked for it and applies only what that key's role allows (`[security.roles.NAME] subscribe`)."""
        curve = self.cfg.security.curve
        p = zctx.socket(zmq.XPUB if curve else zmq.PUB)
        p.setsockopt(zmq.LINGER, 0)
        p.setsockopt(zmq.SNDHWM, 100_000)
        if curve:
            p.setsockopt(zmq.XPUB_MANUAL, 1)
        return p

    def _drain_subscriptions(self) -> None:
        """Apply or refuse the subscriptions that arrived on the XPUB sockets (CURVE only)."""
        for pub in self.pubs:
            if pub.socket_type != zmq.XPUB:
                continue
            for _ in range(1000):
                if not pub.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                msg = pub.recv(copy=False)
                data = msg.bytes
                if not data or data[0] not in (0, 1):
                    continue
                sub = data[1:]
                if data[0] == 0:
                    pub.setsockopt(zmq.UNSUBSCRIBE, sub)
                    continue
                try:
                    user = msg.get("User-Id") or None
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

    def _publish(self, frames: list[bytes]) -> None:
        """Fan out on every PUB socket (two while an old and a new server key are both served)."""
        *head, last = frames
        for pub in self.pubs:
            try:  # frame by frame with int flags: send_multipart's enum arithmetic cost more than the sends
                for f in head:
                    pub.send(f, _MORE)
                pub.send(last, _NOBLOCK)
            except zmq.Again:  # refused at the first frame: ZeroMQ takes a message whole or not at all
                self.metrics.send_again.labels("pub").inc()

    # -- security ----------------------------------------------------------------------------------------------
    def _secure_sockets(self, zctx: zmq.Context) -> None:
        """With [security] curve: start ZAP and make the primary work/PUB pair CURVE servers (before bind)."""
        from bucketwire.security import apply_server, server_key_path, start_authenticator

        sec = self.cfg.security
        self.listeners = [_Listener(self.cfg.hub.work, self.cfg.hub.publish, None, self.work, self.pub)]
        if not sec.curve:
            return
        self._zctx = zctx
        self.auth = start_authenticator(zctx, sec)
        self.roles.admitted = self.auth.allowed_names
        self.metrics.keys_invalid.set(len(self.auth.invalid))
        key = server_key_path(sec)
        apply_server(self.work, key, sec.zap_domain)
        apply_server(self.pub, key, sec.zap_domain)
        self.listeners[0].key = key
        self._next_key_check = time.monotonic() + sec.reload_interval

    def _new_listener(self, work_ep: str, pub_ep: str, key: Any) -> _Listener:
        from bucketwire.security import apply_server

        w = self._zctx.socket(zmq.ROUTER)
        p = self._make_pub(self._zctx)
        for opt, v in ((zmq.ROUTER_MANDATORY, 1), (zmq.LINGER, 0), (zmq.SNDHWM, 100_000), (zmq.RCVHWM, 100_000),
                       (zmq.MAXMSGSIZE, 64 << 20)):
            w.setsockopt(opt, v)
        try:
            apply_server(w, key, self.cfg.security.zap_domain)
            apply_server(p, key, self.cfg.security.zap_domain)
            _bind_retry(w, work_ep)
            _bind_retry(p, pub_ep)
        except Exception:
            w.close(0)
            p.close(0)
            raise
        return _Listener(work_ep, pub_ep, key, w, p)

    def _open_previous(self) -> None:
        """Serve the previous server key on its own endpoints, so clients can move to the new key gradually."""
        sec = self.cfg.security
        if sec.curve and sec.previous_server_secret_key is not None:
            assert sec.work_previous and sec.publish_previous
            self.listeners.append(self._new_listener(sec.work_previous, sec.publish_previous,
                                                     sec.previous_server_secret_key))
            self.pubs = [ls.pub for ls in self.listeners]
            log.info("serving the previous server key too", extra={"work": sec.work_previous,
                                                                   "publish": sec.publish_previous})

    def _close_security(self) -> None:
        for ls in self.listeners[1:]:
            ls.work.close(0)
            ls.pub.close(0)
        self.listeners = self.listeners[:1]
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def request_reload(self) -> None:
        """Thread/signal-safe: re-read the key allow-list and the server keys on the next loop turn (SIGHUP)."""
        self._reload.set()
        self.wake()

    def _remember_socket(self, ident: bytes, sock: zmq.Socket) -> None:
        """Replies go out on the ROUTER the peer came in on; bounded, oldest entries forgotten first."""
        self._sock_of.pop(ident, None)
        self._sock_of[ident] = sock
        if len(self._sock_of) > 100_000:
            for k in list(self._sock_of)[:10_000]:
                del self._sock_of[k]

    def _admitted(self, ident: bytes) -> bool:
        """Refuse every message from a key that was removed from the allow-list after it connected."""
        if self._user in self.auth.allowed_names:
            return True
        self.metrics.rejected.labels("zmq", "revoked").inc()
        w = self.workers.get(ident)
        if w is not None:
            self._worker_gone(w, lost=False)
        self._send([ident, P.ERR, P.enc({"fatal": True, "error": "this client key is no longer authorized"})])
        return False

    def _forbidden(self, ident: bytes, why: str) -> None:
        self.metrics.rejected.labels("zmq", "forbidden").inc()
        log.warning("request refused by role", extra={"key": self._user, "error": why})
        self._send([ident, P.ERR, P.enc({"fatal": True, "error": why})])

    def _security_tick(self, now: float) -> None:
        """Every reload_interval (and on SIGHUP): pick up allow-list changes; on SIGHUP also the server keys."""
        hup = self._reload.is_set()
        if not hup and now < self._next_key_check:
            return
        self._next_key_check = now + self.cfg.security.reload_interval
        self._reload.clear()
        roles_changed = self._reload_server_keys() if hup else False
        changed = self.auth.reload(force=hup)
        self.roles.admitted = self.auth.allowed_names
        self.metrics.keys_invalid.set(len(self.auth.invalid))
        if (changed and changed[1]) or roles_changed:
            # PUB cannot refuse one subscriber, nor take back a subscription it applied: re-create the PUB
            # sockets so every subscriber reconnects, re-authenticates (removed keys fail the handshake) and
            # re-sends its subscriptions, which are decided again under the roles now in force. Live
            # subscribers catch up via heartbeats.
            log.info("fan-out sockets re-created; subscribers reconnect and their subscriptions are re-checked",
                     extra={"removed_keys": sorted(changed[1]) if changed else [], "roles_changed": roles_changed})
            self._rebind_pubs()

    def _rebind_pubs(self) -> None:
        from bucketwire.security import apply_server

        for ls in self.listeners:
            ls.pub.close(0)
            p = self._make_pub(self._zctx)
            apply_server(p, ls.key, self.cfg.security.zap_domain)
            _bind_retry(p, ls.pub_ep)
            ls.pub = p
        self.pub = self.listeners[0].pub
        self.pubs = [ls.pub for ls in self.listeners]

    def _reload_server_keys(self) -> bool:
        """Re-read [hub] work/publish, the [security] server keys and roles; keep unchanged listeners, open new
        ones. Returns True when the roles changed (live subscriptions must then be decided again).

        Listeners are matched by (endpoints, server public key), so a rotation step that moves the current key
        to `previous_server_secret_key` on its existing endpoints keeps every established connection.
        """
        from bucketwire import config as config_mod
        from bucketwire.config import ConfigError
        from bucketwire.security import load_keypair

        if self.cfg.path is None:
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
        want = [(new.hub.work, new.hub.publish, sec.server_secret_key)]
        if sec.previous_server_secret_key is not None and sec.work_previous and sec.publish_previous:
            want.append((sec.work_previous, sec.publish_previous, sec.previous_server_secret_key))

        def ident(w: str, p: str, key: Any) -> tuple[str, str, bytes]:
            return (w, p, load_keypair(key, secret=True, what="[security] server key")[0])

        try:
            want_ids = [ident(*x) for x in want]
        except ConfigError as e:
            log.error("reload refused; keeping the running configuration", extra={"error": str(e)})
            return False
        have = {ident(ls.work_ep, ls.pub_ep, ls.key): ls for ls in self.listeners}
        keep = [have.get(i) for i in want_ids]
        for i, ls in have.items():
            if i not in want_ids:
                self._poller.unregister(ls.work)
                ls.work.close(0)
                ls.pub.close(0)
                self._sock_of = {k: v for k, v in self._sock_of.items() if v is not ls.work}
                log.info("stopped serving a server key", extra={"work": ls.work_ep, "publish": ls.pub_ep})
        out = []
        for (w, p, key), ls in zip(want, keep, strict=True):
            if ls is None:
                try:
                    ls = self._new_listener(w, p, key)
                except (zmq.ZMQError, ConfigError) as e:
                    log.error("cannot serve a server key", extra={"work": w, "publish": p, "error": str(e)})
                    continue
                self._poller.register(ls.work, zmq.POLLIN)
                log.info("serving a server key", extra={"work": w, "publish": p})
            out.append(ls)
        if not out:
            log.error("reload left no listener; this hub no longer serves ZeroMQ clients")
            return False
        self.listeners = out
        self.work, self.pub = out[0].work, out[0].pub
        self.pubs = [ls.pub for ls in out]
        self.cfg.hub.work, self.cfg.hub.publish = out[0].work_ep, out[0].pub_ep
        roles_changed = sec.roles != self.cfg.security.roles
        self.cfg.security.roles = sec.roles
        self.roles = Roles(sec.roles, self.auth.allowed_names)
        return roles_changed


@dataclass(slots=True)
class _Listener:
    """One work ROUTER + PUB pair served with one server key."""

    work_ep: str
    pub_ep: str
    key: Any
    work: zmq.Socket
    pub: zmq.Socket


def _bind_retry(sock: zmq.Socket, endpoint: str, tries: int = 50) -> None:
    """Bind, retrying briefly: a socket just closed on the same endpoint is released asynchronously."""
    for i in range(tries):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or i == tries - 1:
                raise
            time.sleep(0.02)
