"""Talking to the hub from outside: publish with acknowledgement, replay, status, and a gap-free tail.

Publishing retries on a fresh socket until the overall timeout, re-sending the same envelopes (same ids), so a
lost reply or a restarting hub never turns into a lost or doubled event: the journal deduplicates on
(source, id).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from bucketwire import protocol as P
from bucketwire import security, zmtp
from bucketwire.config import Config
from bucketwire.envelope import Event, new_event_id, parse_seq
from bucketwire.zmtp import LocalDealer


class HubUnavailable(Exception):
    """The hub did not answer in time; one line says where we looked and what to check."""


class HubRefused(Exception):
    """The hub answered but refused the request (bad envelope, hop limit, journal down).

    `permanent`: the hub said the same request would be refused again (PUBNACK `retry: false`, an ERR that is
    `fatal` or says it could not read the request, a request too large to send): a publisher that retries it
    waits for ever. False when the refusal may pass (the hub's journal cannot write just now) or the hub did not
    say (one from before PUBNACK's `retry`)."""

    def __init__(self, error: str, *, permanent: bool = False) -> None:
        super().__init__(error)
        self.permanent = permanent


class EventTooLarge(HubRefused):
    """The hub refused the request because event `index` is over its per-event limit ([hub] max_event_bytes);
    nothing of the request was committed, and sending that event again can never succeed."""

    def __init__(self, error: str, index: int) -> None:
        super().__init__(error, permanent=True)
        self.index = index


class HubClient:
    def __init__(self, cfg: Config, *, timeout: float | None = None, context: zmq.Context[Any] | None = None) -> None:
        self.cfg = cfg
        # With several hubs ([client] work as a list) requests go to one; a silent one sends us to the next, and a
        # hub that does not dispatch the group asked about names the one that does (ERR with `moved`).
        self.endpoints = cfg.client.work_endpoints
        self.endpoint = self.endpoints[0]
        self.timeout = cfg.client.timeout if timeout is None else timeout
        self.zctx = context or zmq.Context.instance()
        self._req = itertools.count(1)
        self.sock: zmq.Socket[Any] | LocalDealer | None = None
        security.check_key_files(cfg.security)  # a bad key file fails here, in one line
        self.keys = security.client_keys(cfg)  # None without CURVE
        # With CURVE, a monitor on the socket sees a handshake the hub refused: the key, not the hub, is then
        # what to fix, and the timeout's line says so (a refused key otherwise looks like a hub that is down).
        self.mon: zmq.Socket[Any] | None = None
        self._poller: zmq.Poller | None = None  # the socket and its monitor, while there is a monitor
        self.handshake_failed = 0  # the last zmq.EVENT_HANDSHAKE_FAILED_* seen, 0: none

    def _socket(self) -> zmq.Socket[Any] | LocalDealer:
        if self.sock is None:
            local = zmtp.dealer(self.endpoint, b"c-" + uuid.uuid4().bytes)
            if local is not None:  # the hub's local socket ([hub] local): no CURVE there, the OS account admits
                self.sock = local
                return local
            s = self.zctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, b"c-" + uuid.uuid4().bytes)
            security.apply_client(s, self.cfg, self.keys)
            if self.keys is not None:
                self.mon = s.get_monitor_socket(HANDSHAKE_FAILED)
                self._poller = zmq.Poller()
                self._poller.register(s, zmq.POLLIN)
                self._poller.register(self.mon, zmq.POLLIN)
            s.connect(self.endpoint)
            self.sock = s
        return self.sock

    def _reset(self) -> None:
        if self.sock is not None:
            self._read_monitor()
            if self.mon is not None and isinstance(self.sock, zmq.Socket):
                self.sock.disable_monitor()
                self.mon.close(0)
                self.mon = None
                self._poller = None
            self.sock.close(0)
            self.sock = None

    def _read_monitor(self) -> None:
        while self.mon is not None and self.mon.poll(0):
            self.handshake_failed = recv_monitor_message(self.mon)["event"]

    def _wait(self, s: zmq.Socket[Any] | LocalDealer, left: float) -> bool | None:
        """Wait up to `left` seconds for a reply on `s`: True when one is there. With CURVE the socket's monitor is
        watched too, and a handshake the hub refused (its ZAP handler said no: the key is not listed, or revoked)
        ends the wait at once with None: waiting on could only end in the same line after [client] timeout."""
        if self._poller is None:
            return bool(s.poll(int(left * 1000) + 1))
        ready = dict(self._poller.poll(int(left * 1000) + 1))
        if self.mon in ready:
            self._read_monitor()
            if self.handshake_failed == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return None
        return s in ready

    def _unavailable(self) -> HubUnavailable:
        self._read_monitor()
        if self.handshake_failed:
            return HubUnavailable(handshake_failure(self.cfg, self.endpoint, self.handshake_failed, "client"))
        if isinstance(self.sock, LocalDealer) and self.sock.error:
            return HubUnavailable(
                f"cannot connect to the hub's local socket {self.endpoint} ({self.sock.error}); is `bucketwire hub` "
                "running with [hub] local set to it, and is [client] work right?")
        return HubUnavailable(
            f"no answer from the hub at {self.endpoint} within {self.timeout:g}s; "
            "is `bucketwire hub` running and is [client] work / [hub] work right?"
        )

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: bytes, hdr: dict[str, Any], want: set[bytes], timeout: float | None = None,
                attempt_timeout: float = P.ATTEMPT_TIMEOUT) -> tuple[bytes, dict[str, Any], list[bytes]]:
        """Send and wait for the matching reply, re-sending on a new socket after each silent attempt."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        req = next(self._req)
        frame = P.enc({**hdr, "req": req})
        if len(frame) > P.MAX_HEADER:
            raise HubRefused(f"request of {len(frame)} bytes is over the {P.MAX_HEADER >> 20} MiB one message to the "
                             "hub may carry (the hub refuses it whole); send its events in several calls",
                             permanent=True)
        refused: set[str] = set()  # the endpoints whose hub refused this client's key
        while True:
            s = self._socket()
            until = min(deadline, time.monotonic() + attempt_timeout)
            try:
                # Our DEALER is never made to wait on a write (a hub that reads nothing would hold the request past
                # its timeout): what the socket does not take now is written as its poll below waits.
                s.send_multipart([cmd, frame], zmq.NOBLOCK)
            except zmq.Again:
                # Nowhere to queue it: the local socket with no hub on it, or a ZeroMQ DEALER whose peer refused it
                # at the handshake (a socket type that does not pair: [client] work at the hub's publish port),
                # which libzmq never connects again; a blocking send waited there for ever. A new socket soon.
                until = min(until, time.monotonic() + LocalDealer.RECONNECT)
            moved = False
            while not moved and (left := until - time.monotonic()) > 0:
                got = self._wait(s, left)
                if got is None:  # the key refused: said at once once every hub listed refused it, else the next
                    refused.add(self.endpoint)
                    if refused >= set(self.endpoints):
                        raise self._unavailable()
                    break
                if not got:
                    continue
                frames = s.recv_multipart()
                self.handshake_failed = 0  # the hub answers: a refusal seen before (a key since added) is over
                if len(frames) < 2:
                    continue
                if frames[0] == P.ERR:
                    err = P.decode(frames[1], P.Err)
                    if err.fatal:
                        raise HubRefused(err.error or "refused", permanent=True)
                    if err.moved:
                        self.move(err.moved)
                        moved = True
                    elif err.moved is not None:  # no hub dispatches it this moment: wait this attempt out
                        until = min(deadline, time.monotonic() + 0.2)
                    elif not err.reready:
                        # The hub could not read the request (a header it refuses): that is its answer. Waiting
                        # on ended as 'no answer from the hub' after the timeout, the request sent again meanwhile.
                        raise HubRefused(err.error or "refused", permanent=True)
                    continue
                reply = P.header(frames[1])
                if frames[0] in want and reply.get("req") == req:
                    return frames[0], reply, frames[2:]
            if time.monotonic() >= deadline:
                raise self._unavailable()
            if not moved:  # silent: the next hub of the list (the same one when there is only one)
                self.move("")

    def move(self, endpoint: str) -> None:
        """Talk to `endpoint` from now on, or to the next endpoint of the list when it is empty."""
        if not endpoint:
            i = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else -1
            endpoint = self.endpoints[(i + 1) % len(self.endpoints)]
        self.endpoint = endpoint
        self._reset()

    def publish_events(self, events: list[Event], timeout: float | None = None) -> list[dict[str, Any]]:
        """Commit events (routed by the hub when `topic` is None); returns one result per event."""
        payload = {"events": [e.to_dict() for e in events]}
        for d in payload["events"]:
            d.pop("seq", None)
        cmd, reply, _ = self.request(P.PUB, payload, {P.PUBACK, P.PUBNACK}, timeout)
        if cmd == P.PUBNACK:
            try:
                nack = P.read_pubnack(reply)
            except P.ProtocolError as e:  # not a refusal this client can read: it says nothing of a retry
                raise HubRefused(f"{reply.get('error', 'refused')} ({e})") from None
            big = nack.too_large
            if big is not None and 0 <= big < len(events):
                raise EventTooLarge(nack.error or "too large", big)
            raise HubRefused(nack.error or "refused", permanent=not nack.retry)
        results = reply.get("results", [])
        bad = [r for r in results if r.get("error")]
        if bad:
            raise HubRefused(bad[0]["error"])
        return cast(list[dict[str, Any]], results)  # the hub's JSON answer

    def publish(self, topic: str, data: Any, *, type: str | None = None, subject: str | None = None,  # noqa: A002
                source: str | None = None, id: str | None = None, timeout: float | None = None) -> dict[str, Any]:  # noqa: A002
        ev = Event(
            id=id or new_event_id(),
            source=source or f"bucketwire://publish/{socket.gethostname()}/{os.getpid()}",
            type=type or f"bucketwire.{topic}",
            subject=subject,
            data=data,
            topic=topic,
        )
        return self.publish_events([ev], timeout)[0]

    def fetch(self, topic: str, from_seq: int, limit: int = 1000, timeout: float | None = None
              ) -> tuple[dict[str, Any], list[bytes]]:
        _, meta, bodies = self.request(P.FETCH, {"topic": topic, "from": from_seq, "limit": limit}, {P.EVENTS},
                                       timeout)
        return meta, bodies

    def status(self, timeout: float | None = None, topics: list[str] | None = None) -> dict[str, Any]:
        """`topics`: list only these in `topics`."""
        try:
            _, st, _ = self.request(P.STATUS, {} if topics is None else {"topics": topics}, {P.STATUSR}, timeout)
        except HubRefused as e:
            if topics is None or "topics" not in str(e):
                raise
            # A hub from before the filter refuses the field: ask for every topic and keep those asked for.
            _, st, _ = self.request(P.STATUS, {}, {P.STATUSR}, timeout)
            asked = set(topics)
            st["topics"] = {t: v for t, v in st.get("topics", {}).items() if t in asked}
        st.pop("req", None)
        return st


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
"""What a CURVE client hears when the hub refuses its key (AUTH: the ZAP handler said no) or cannot read its
handshake (the others: mostly a server_public_key that is not the hub's)."""


def handshake_failure(cfg: Config, endpoint: str, event: int, who: str) -> str:
    """The line for a CURVE handshake the hub refused (`event`: a HANDSHAKE_FAILED monitor event)."""
    sec = cfg.security
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        # The hub's ZAP answer is the same for a key it never had and one revoked with its file still in place,
        # so name both: telling the owner of a revoked key to copy a file that is already there sends them
        # looking in the wrong place.
        return (f"the hub at {endpoint} refused this {who}'s CURVE key ([security] client_secret_key "
                f"{sec.client_secret_key}): it is not in the hub's authorized_keys_dir, or it was revoked "
                "(`bucketwire keys list -c HUB_CONFIG` marks revoked keys); copy its public key file into "
                "authorized_keys_dir (read within reload_interval, at once on kill -HUP), `keys unrevoke` it, or "
                "use a key the hub admitted")
    return (f"the CURVE handshake with the hub at {endpoint} failed; check that [security] server_public_key "
            f"({sec.server_public_key}) is that hub's public key and that the hub runs with [security] curve = true")


RECONNECT_MAX = 5.0
"""Longest wait between two attempts to reach a hub that went away (the waits double from 0.1 s up to this)."""


def follow(cfg: Config, topics: list[str] | None = None, from_seq: int | None = None,
           stop: Callable[[], bool] | None = None, idle: float = 0.2,
           on_hub: Callable[[str, dict[str, int]], None] | None = None,
           on_gap: Callable[[str, int, int], None] | None = None,
           on_start: Callable[[dict[str, Any]], None] | None = None) -> Iterator[tuple[str, int, bytes]]:
    """Yield (topic, seq, envelope) from `from_seq` on, then live, with no gap and no duplicate at the seam.

    The zguide "Clone" pattern: subscribe first and buffer, replay from the journal up to the head, then
    continue from the live stream, fetching any gap the lossy PUB socket left (seen via seq or heartbeats).
    With `from_seq=None` the stream starts at the current head (live only).

    A hub that goes away (its connection drops, or its heartbeats stop for `heartbeat_timeout`) is waited for,
    not given up on: a restart is the ordinary case, and the journal still holds what was committed meanwhile.
    `on_hub("lost", next_seqs)` and `on_hub("resumed", next_seqs)` report it (`next_seqs`: the next seq wanted
    per topic); once the hub answers again the stream goes on from those seqs, so the seam has no gap and
    no duplicate either. Only the first contact fails at once (HubUnavailable), as every other command does.

    The one gap it cannot fill: events retention dropped before they were read (a `from_seq` older than the
    journal keeps, a follower that fell behind). `on_gap(topic, first, last)` names those seqs as it goes past
    them, so a reader can tell a gap from a topic that never had those events.

    `on_start(status)`: the hub's status the start was read from, once it is (everything published after
    it is yielded), e.g. to say which asked-for topics the hub does not have yet.
    """
    security.check_key_files(cfg.security)
    zctx: zmq.Context[Any] = zmq.Context.instance()
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.RECONNECT_IVL, 100)
    sub.setsockopt(zmq.RECONNECT_IVL_MAX, int(RECONNECT_MAX * 1000))
    wanted = set(topics or [])
    for t in wanted or {""}:
        sub.setsockopt(zmq.SUBSCRIBE, P.topic_frame(t) if t else b"")
    security.apply_client(sub, cfg)
    # The connection's ups and downs: a dropped TCP connection is the quickest sign of a hub that died.
    mon = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    for ep in cfg.client.publish_endpoints:  # every hub fans out every topic; seqs drop the repeats
        sub.connect(ep)
    client = HubClient(cfg)
    silent_limit = max(cfg.hub.heartbeat_timeout, 3 * cfg.hub.heartbeat_interval)
    nxt: dict[str, int] = {}
    try:
        st = client.status(topics=sorted(wanted) if wanted else None)
        heads = {t: v["head"] for t, v in st["topics"].items()}
        for t in wanted or set(heads):
            nxt[t] = from_seq if from_seq is not None else heads.get(t, 0) + 1
        if on_start is not None:
            on_start(st)

        def catch_up(t: str, upto: int | None) -> Iterator[tuple[str, int, bytes]]:
            while upto is None or nxt[t] <= upto:
                meta, bodies = client.fetch(t, nxt[t])
                if not bodies:
                    if meta.get("next", nxt[t]) > nxt[t]:  # retention removed the start: say so, move on
                        if on_gap is not None:
                            on_gap(t, nxt[t], meta["next"] - 1)
                        nxt[t] = meta["next"]
                        continue
                    return
                for b in bodies:
                    seq = parse_seq(json.loads(b)["seq"])
                    if seq >= nxt[t]:
                        if seq > nxt[t] and on_gap is not None:  # retention removed these: say so
                            on_gap(t, nxt[t], seq - 1)
                        nxt[t] = seq + 1
                        yield t, seq, b
                if upto is None and meta.get("head", 0) < nxt[t]:
                    return

        def resume() -> Iterator[tuple[str, int, bytes]]:
            """The hub answers again: every topic from its next seq, topics new since we started from 1."""
            st = client.status(timeout=2, topics=sorted(wanted) if wanted else None)
            heads = {t: v["head"] for t, v in st.get("topics", {}).items()}
            for t in heads:
                if t not in nxt and (not wanted or t in wanted):
                    nxt[t] = 1
            for t in sorted(nxt):
                yield from catch_up(t, None)

        def stopped() -> bool:
            return stop is not None and stop()

        for t in sorted(nxt):
            yield from catch_up(t, None)
        down = False
        last_rx = time.monotonic()
        heard_heartbeat = False
        backoff, retry_at = 0.1, 0.0
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while not stopped():
            ready = dict(poller.poll(int(idle * 1000)))
            now = time.monotonic()
            lost = False
            if mon in ready:
                ev = recv_monitor_message(mon)["event"]
                if ev == zmq.EVENT_DISCONNECTED:
                    lost = True
                elif down:
                    retry_at = 0.0  # connected again: ask at once
            if not down and not lost and heard_heartbeat and now - last_rx > silent_limit:
                # Silence need not be a dead hub: it heartbeats a topic the config does not name only for a
                # while after its last commit (HEARTBEAT_TURNS), so a follow-on topic gone quiet is silent too.
                # Ask the hub; only one that does not answer is lost. Until the next heartbeat, silence is
                # what an idle topic sounds like, as for a tail started on one (a dropped connection still counts).
                try:
                    yield from resume()
                except (HubUnavailable, HubRefused):
                    lost = True
                else:
                    heard_heartbeat, last_rx = False, time.monotonic()
                    continue
            if not down and lost:
                down, backoff, retry_at = True, 0.1, now + 0.1
                if on_hub:
                    on_hub("lost", dict(nxt))
            if down:
                if sub in ready:
                    sub.recv_multipart()  # the journal has it: resume() fetches from the next seq
                if now < retry_at:
                    continue
                try:
                    yield from resume()
                except (HubUnavailable, HubRefused):
                    backoff = min(RECONNECT_MAX, backoff * 2)
                    retry_at = time.monotonic() + backoff
                    continue
                down, last_rx = False, time.monotonic()
                if on_hub:
                    on_hub("resumed", dict(nxt))
                continue
            if sub not in ready:
                continue
            topic_b, seq_b, body = sub.recv_multipart()
            last_rx = now
            t = P.topic_of(topic_b)
            if wanted and t not in wanted:
                continue
            seq = int(seq_b)
            if t not in nxt:
                # Not among the heads read at the start: a topic made since, so all of it is new. Taken from this
                # frame's seq, a large first event (fanned out as its head frame) or those the slow joiner missed
                # before it were skipped.
                nxt[t] = 1
            try:
                if not body:  # heartbeat: [topic, head, b""]
                    heard_heartbeat = True
                    if seq >= nxt[t]:
                        yield from catch_up(t, seq)
                    continue
                if seq < nxt[t]:
                    continue
                if seq > nxt[t]:
                    yield from catch_up(t, seq - 1)
            except (HubUnavailable, HubRefused):
                continue  # the hub went away mid-fetch: the monitor or the silence says so next
            if seq == nxt[t]:
                nxt[t] = seq + 1
                yield t, seq, body
    finally:
        client.close()
        with contextlib.suppress(zmq.ZMQError):
            sub.disable_monitor()
        mon.close(0)
        sub.close(0)
