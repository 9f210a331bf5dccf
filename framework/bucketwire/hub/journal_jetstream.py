"""The hub's journal on a NATS JetStream cluster: the same operations as the SQLite journal, held by JetStream.

Why it is shaped this way:

* **One stream per topic.** The envelope promises a per-topic `seq` that starts at 1 and has no holes; a stream's
  own sequence is exactly that, so no hub has to hand out numbers. Streams are created on first use with the
  configured replicas and retention limits (`max_topics` keeps their number bounded).
* **Optimistic concurrency instead of an election for writes.** Every hub accepts ingress. A hub renders each
  envelope with the seq it expects (head + 1, + 2, ...) and publishes it with `Nats-Expected-Last-Sequence`, so
  JetStream stores it only if nobody else appended first; the publishes of a batch are pipelined on one
  connection, so a batch costs one round trip, not one per event. When another hub got in first the rest of the
  chain is refused ("wrong last sequence"), and the hub re-reads the head and renders again. A commit is answered
  only once JetStream's PubAck says the event is stored on a quorum of replicas.
* **Deduplication by JetStream.** Each event carries `Nats-Msg-Id` derived from (`source`, `id`), so the same
  notification sent twice, to the same hub or to two hubs, is stored once within the stream's
  `duplicate_window`; the PubAck of a duplicate names the original seq.
* **Cursors and counters in a KV bucket, fenced by revision.** Only the hub that dispatches a group writes its
  cursors, and every write names the revision it last saw (`Nats-Expected-Last-Subject-Sequence`), so a hub that
  lost the group's lease cannot move a cursor behind the new dispatcher's back: its write is refused.
* **Other hubs' events by notice and catch-up, not by a consumer.** A consumer on every topic stream would hand
  each hub back every event it committed itself; instead a committing hub sends one small head notice per
  topic per commit, and a hub that hears of (or polls, or sees in its own PubAcks) a head beyond what it has
  seen reads the missing range with batched direct gets (see `follow`).

The hub's loop thread is synchronous; the nats client is asyncio. The client runs on a private event loop in a
background thread and each operation is one `run_coroutine_threadsafe` hop, which keeps the loop code identical
for both backends.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bucketwire.envelope import render
from bucketwire.hub.journal import Appended, Batch, JournalError, NewEvent, RemovalUnfinished
from bucketwire.security import RevokedView, key_of_hex

log = logging.getLogger("bucketwire.journal")

T = TypeVar("T")

STREAM_NOT_FOUND = 10059
"""JetStream's error code for a request naming a stream (or KV bucket) that does not exist."""
WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a publish whose expected last sequence did not match."""
SUBJECT_IN_FLIGHT = 10164
"""JetStream's "wrong last sequence" without a sequence: a replicated stream's leader refuses a write that names the
last revision of a subject while an earlier write of that subject is still in flight (proposed, not committed).
It says nothing of the revision: while a quorum is lost that earlier write is this hub's own renewal, stranded on
a leader that cannot commit it (see `_undecided`)."""
IN_PROCESS = "duplicate message id is in process"
READ_BATCH = 1000
READ_HEDGE = 0.2
"""Seconds a read waits for an answer before it sends its request again (see `_read_rows`): a replica answers a
direct get in milliseconds, and one that is frozen never does."""
FEED_POLL = 1.0
"""Seconds between polls of the topic streams' heads: how late, at worst, an event another hub committed (and
whose notice was lost) reaches this hub's subscribers and dispatch."""
_NEWLINES = {13: " ", 10: " "}
"""Header values lose their line breaks, as nats-py's `publish` does: a raw one would end the header block."""


class JetStreamError(JournalError):
    """JetStream refused or could not be reached; the message says what to check."""


class JetStreamSettingsError(JetStreamError):
    """The journal on the cluster was made with `[journal]` settings this hub does not have: no wait changes it."""


@dataclass(frozen=True)
class JetStreamSettings:
    """`[journal] backend = "jetstream"`: where the cluster is and how streams are made."""

    servers: list[str]
    replicas: int = 3
    prefix: str = "bucketwire"
    duplicate_window: float = 600.0
    max_age: float = 7 * 86400.0
    max_bytes: int = -1
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 10.0
    lease_ttl: float = 5.0
    """Seconds a group's dispatch lease lives without renewal: how long a standby waits before it takes over."""
    start_timeout: float = 30.0
    """Seconds the start waits for the cluster to place the hub's KV buckets while the failure is a passing one
    (a node just (re)started, no meta leader yet): see `_ensure_kv`."""


def token(name: str) -> str:
    """A topic or group name as one NATS subject token / stream-name part: itself when it is plain, otherwise
    a reversible base32 form behind `__`, so `photos` stays readable and `a.b c` cannot add subject levels."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) and not name.startswith("__"):
        return name
    return "__" + base64.b32encode(name.encode()).decode().rstrip("=").lower()


def untoken(tok: str) -> str:
    if not tok.startswith("__"):
        return tok
    raw = tok[2:].upper()
    return base64.b32decode(raw + "=" * (-len(raw) % 8)).decode()


def auth_options(s: JetStreamSettings) -> dict[str, Any]:
    """nats-py connect options for `[journal]` credentials and TLS: the hub and `doctor` connect the same way."""
    opts: dict[str, Any] = {}
    if s.user is not None:
        opts["user"], opts["password"] = s.user, s.password
    if s.token is not None:
        opts["token"] = s.token
    if s.creds is not None:
        opts["user_credentials"] = s.creds
    if s.tls_ca or s.tls_cert:
        import ssl

        ctx = ssl.create_default_context(cafile=s.tls_ca)
        if s.tls_cert:
            ctx.load_cert_chain(s.tls_cert, s.tls_key)
        opts["tls"] = ctx
    return opts


def revoked_bucket(s: JetStreamSettings) -> Any:
    """The KV bucket of revoked client keys (`keys revoke`), created by every hub and by the command alike: the
    same config on both sides, so whichever comes first the other binds to it instead of being refused."""
    from nats.js.api import KeyValueConfig

    return KeyValueConfig(bucket=f"{token(s.prefix)}_revoked", history=1, replicas=s.replicas)


def msg_id(source: str, eid: str) -> str:
    """Nats-Msg-Id for (source, id): a digest, so any length and any characters fit the header."""
    return hashlib.sha256(f"{source}\0{eid}".encode()).hexdigest()[:40]


async def stream_list(nc: Any, timeout: float, missing: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
    """Every stream's info as the JetStream API returns it, page by page (the hub at start, `doctor`).

    `missing`: given, gets the names of the streams the cluster knows but whose info it could not gather in time
    (their leader is gone and no new one is elected yet): a clustered listing leaves them out of `streams`."""
    offset = 0
    while True:
        resp = await nc.request("$JS.API.STREAM.LIST", json.dumps({"offset": offset}).encode(), timeout=timeout)
        doc = json.loads(resp.data)
        if "error" in doc:
            raise JetStreamError(f"cannot list streams: {doc['error'].get('description')}")
        if missing is not None:
            missing += [str(m) for m in doc.get("missing") or []]
        streams = doc.get("streams") or []
        for s in streams:
            yield s
        offset += len(streams)
        if not streams or offset >= int(doc.get("total", 0)):
            return


async def kv_latest(nc: Any, bucket: str, timeout: float, keys: str = ">",
                    missing_ok: bool = False) -> dict[str, tuple[bytes, int]]:
    """key -> (value, revision) of every live key of a KV bucket that matches `keys`, read from the
    bucket's stream leader. Never from a replica (a direct get or a watcher may answer from one that has
    not caught up, and a cursor read stale makes every later write refused), and never "empty" because a
    request failed: an error is raised, since an unread cursor would look like a group that starts at 1.
    `missing_ok`: a bucket that does not exist yet (no hub ever started) reads as empty."""
    from nats.js.errors import NotFoundError

    js = nc.jetstream(timeout=timeout)
    stream = f"KV_{bucket}"
    pre = f"$KV.{bucket}."
    subjects: list[str] = []
    offset = 0
    while True:
        req = json.dumps({"subjects_filter": f"{pre}{keys}", "offset": offset}).encode()
        try:
            resp = await nc.request(f"$JS.API.STREAM.INFO.{stream}", req, timeout=timeout)
        except Exception as err:
            raise JetStreamError(f"cannot list the keys of {bucket!r}: {type(err).__name__} {err}") from None
        doc = json.loads(resp.data)
        if "error" in doc:
            if missing_ok and doc["error"].get("err_code") == STREAM_NOT_FOUND:
                return {}
            raise JetStreamError(f"cannot list the keys of {bucket!r}: {doc['error'].get('description')}")
        page = list(((doc.get("state") or {}).get("subjects") or {}).keys())
        subjects += page
        offset += len(page)
        if not page or offset >= int(doc.get("total", 0)):
            break
    out: dict[str, tuple[bytes, int]] = {}
    for subject in subjects:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:  # expired or purged between the listing and the read
            continue
        except Exception as err:
            raise JetStreamError(f"cannot read {subject!r}: {type(err).__name__} {err}") from None
        if msg.data and (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
            out[subject[len(pre):]] = (bytes(msg.data), int(msg.seq or 0))
    return out


def _removal_floor(stats: tuple[bytes, int] | None) -> int:
    """The revision of a group's removal record (its stats key with a `removed` note; 0: none): the group's keys
    older than it are what the removal left (see `JetStreamJournal.forget_group`)."""
    if stats is None:
        return 0
    try:
        doc = json.loads(stats[0])
    except ValueError:
        return 0
    return stats[1] if isinstance(doc, dict) and doc.get("removed") else 0


@dataclass
class _Chain:
    """The events of one topic in one commit, in order, with what became of each."""

    topic: str
    events: list[tuple[int, NewEvent]]  # (index in the batch, event)
    done: dict[int, Appended] = field(default_factory=dict)
    stored: int = 0  # the highest seq this commit stored (0: only duplicates)


class _Replies:
    """Pipelined request/reply on one inbox: publish now, await the answer later (PubAcks, KV writes).

    nats-py's `publish_async` raises inside its callback when the server answers with an error, which leaves the
    caller's future pending forever; a refusal is an ordinary answer here, so this small dispatcher is ours.
    """

    def __init__(self, nc: Any, fast: bool = True) -> None:
        """`fast`: reach into the client for the two hot paths below when it looks as expected; False keeps to
        nats-py's public API only (what a client of another shape gets, and what the tests check still works)."""
        self.nc = nc
        self.fast = fast
        self.prefix = ""
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.n = 0

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox()
        sub = await self.nc.subscribe(self.prefix + ".*", cb=self._on_reply)
        if self.fast:
            self._take_replies_first(getattr(sub, "_id", None))

    def _take_replies_first(self, sid: int | None) -> None:
        """Answer the reply inbox's messages straight from the client's protocol parser.

        Through a subscription each PubAck becomes a message object with parsed headers, goes through a queue
        and wakes a task before `_on_reply` reads its few bytes of JSON: more Python than the rest of the
        answer's handling, once per event. Only our inbox's sid is taken; everything else goes on to the
        client as before. A client whose parser hook does not look as expected keeps the subscription path."""
        nc = self.nc
        original = getattr(nc, "_process_msg", None)
        try:
            params = list(inspect.signature(original).parameters) if original is not None else []
        except (TypeError, ValueError):
            params = []
        if sid is None or params != ["sid", "subject", "reply", "data", "headers"] or not hasattr(nc, "stats"):
            return

        async def process(sid_: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            if sid_ != sid:
                await original(sid_, subject, reply, data, headers)  # type: ignore[misc]
                return
            nc.stats["in_msgs"] += 1
            nc.stats["in_bytes"] += len(data)
            status = headers[9:12].decode() if headers and headers.startswith(b"NATS/1.0 ") else None
            self._resolve(subject.rsplit(b".", 1)[1].decode(), data, status)

        nc._process_msg = process

    async def _on_reply(self, m: Any) -> None:
        self._resolve(m.subject.rsplit(".", 1)[1], m.data, m.headers.get("Status") if m.headers else None)

    def _resolve(self, tok: str, data: bytes, status: str | None) -> None:
        fut = self.pending.pop(tok, None)
        if fut is None or fut.done():
            return
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"error": {"code": 500, "description": "unreadable reply"}}
        if not doc and status == "503":
            doc = {"error": {"code": 503, "description": "no responders (stream unavailable)"}}
        fut.set_result(doc if isinstance(doc, dict) else {})

    async def send(self, subject: str, data: bytes, headers: dict[str, str]) -> asyncio.Future[dict[str, Any]]:
        self.n += 1
        tok = str(self.n)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[tok] = fut
        await self.nc.publish(subject, data, reply=f"{self.prefix}.{tok}", headers=headers)
        return fut

    async def send_many(self, subject: str, items: list[tuple[bytes, dict[str, str]]]
                        ) -> list[asyncio.Future[dict[str, Any]]]:
        """`send` for a whole chain in one write: the HPUB frames are built here and handed to the client's
        outgoing buffer at once. nats-py's `publish` costs about as much Python per message as rendering the
        event (subject and header validation, an await chain, a flusher kick each), and a commit pipelines
        hundreds of them while the hub's loop waits. Falls back to `publish` on a client without that buffer."""
        if not items:
            return []
        nc = self.nc
        limit = int(nc.max_payload)
        built: list[tuple[bytes, bytes]] = []
        for data, headers in items:
            text = "NATS/1.0\r\n"
            for k, v in headers.items():
                v = v.strip()
                if "\n" in v or "\r" in v:
                    v = v.translate(_NEWLINES)
                text += f"{k}: {v}\r\n"
            hdr = (text + "\r\n").encode()
            if len(hdr) + len(data) > limit:  # the server would close the connection over it
                raise JetStreamError(f"an event of {len(data)} bytes exceeds the NATS servers' max_payload of "
                                     f"{limit} bytes; raise max_payload in the nats-server config or send smaller "
                                     "events")
            built.append((hdr, data))
        if not (self.fast and hasattr(nc, "_send_command") and hasattr(nc, "_flush_pending")) or not nc.is_connected:
            return [await self.send(subject, data, headers) for data, headers in items]
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[dict[str, Any]]] = []
        frames: list[bytes] = []
        subj = subject.encode()
        prefix = self.prefix.encode()
        n = self.n
        for hdr, data in built:
            n += 1
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self.pending[str(n)] = fut
            futs.append(fut)
            frames.append(b"HPUB %s %s.%d %d %d\r\n%s%s\r\n"
                          % (subj, prefix, n, len(hdr), len(hdr) + len(data), hdr, data))
        self.n = n
        await nc._send_command(b"".join(frames))
        await nc._flush_pending()
        return futs

    async def answers(self, futs: list[asyncio.Future[dict[str, Any]]], timeout: float
                      ) -> list[dict[str, Any]]:
        """The replies to `futs`, with a 408 error for each that did not come within `timeout` (one deadline
        for all: a request sent to a node that died is never answered). The caller retries; message-id dedupe
        and revision checks make a retry of a write that did land safe."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if futs and not futs[-1].done():
            # Replies to one connection's requests come in order, so the last one is nearly always the last to
            # come: waiting on it alone spares a done-callback per request.
            await asyncio.wait([futs[-1]], timeout=timeout)
        waiting = [f for f in futs if not f.done()]
        if waiting and loop.time() < deadline:
            await asyncio.wait(waiting, timeout=deadline - loop.time())
        return [f.result() if f.done() and not f.cancelled() else
                {"error": {"code": 408, "description": "no answer (a NATS node may have gone)"}} for f in futs]


class JetStreamJournal:
    """A `Journal` whose events, dedupe, cursors and counters live in JetStream (see the module docstring)."""

    client_internals = True
    """Take PubAcks from, and hand a commit's frames to, nats-py's protocol layer (`_Replies`), when the client
    looks as expected; a subclass sets False to run on the public API alone."""

    def __init__(self, settings: JetStreamSettings, hub_id: str, advertise: str = "") -> None:
        self.settings = settings
        self.hub_id = hub_id
        # What a lease says about its holder: its name, and where clients reach it (the ERR that moves a worker
        # to the dispatcher names this endpoint).
        self._lease_value = json.dumps({"hub": hub_id, "work": advertise}).encode()
        self.prefix = token(settings.prefix)
        self.heads: dict[str, int] = {}
        self._streams: set[str] = set()
        self._cursor_rev: dict[str, int] = {}
        self._cursors: dict[tuple[str, str], tuple[int, str]] = {}
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._stats_rev: dict[str, int] = {}
        self._attempts: dict[str, dict[tuple[str, int], int]] = {}  # group -> (topic, seq) -> attempts used
        self._due: dict[str, dict[tuple[str, int], float]] = {}  # group -> (topic, seq) -> unix time retry is due
        self._waits: dict[str, dict[tuple[str, int], float]] = {}  # group -> (topic, seq) -> its scheduled wait
        self._leases: dict[str, tuple[int, float]] = {}  # group -> (revision, valid until, monotonic)
        # Every group this hub has taken a lease of: their keys are written only while the lease holds (see
        # `_lapsed`). A journal that never leases (one hub, tools) writes as before.
        self._leased: set[str] = set()
        self._next_lease_round = 0.0
        self._leasing: asyncio.Task[None] | None = None  # a lease round on the client's thread (see lead)
        # `group rm` gives a lease back with a PURGE marker, not a DEL: the other hubs must not take it for a want
        # from before the removal (see _take_released). group -> seq of the marker this hub has reported.
        self._removal_seen: dict[str, int] = {}
        self._removals: set[str] = set()  # reported by a lease round, not yet taken by `removed_groups`
        # That marker lives lease_ttl (the lease bucket's TTL); `group rm` also leaves a lasting record in the group's
        # stats key (see forget_group): group -> its revision as `load_group` read it, and the one this hub has
        # seen (its own removal, or one `unseen_removal` reported).
        self._removed_rev: dict[str, int] = {}
        self._removed_seen: dict[str, int] = {}
        self._removals_lock = threading.Lock()
        # This hub's presence key: one running hub per `[hub] id` (see _claim_id).
        self._presence_key = f"h.{token(hub_id)}"
        self._presence_value = json.dumps({"hub": hub_id, "work": advertise, "host": socket.gethostname(),
                                           "pid": os.getpid(), "nonce": uuid.uuid4().hex}).encode()
        self._presence_rev = 0
        self._id_clash = False
        self._answered_at: float | None = None  # monotonic: when the lease bucket last answered (cluster_problem)
        self._remote: deque[Appended] = deque()
        self._fed: dict[str, int] = {}  # topic -> every seq up to this is this hub's own or in _remote already
        self._catching: set[str] = set()
        self._again: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._following = False
        self._wake: Callable[[], None] | None = None
        # New topics' stream creations, run on the client's thread (see create_streams): the tasks, until when
        # each retries, who to tell when it ends, and why the last one failed.
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._create_until: dict[str, float] = {}
        self._created_cbs: dict[str, list[Callable[[], None]]] = {}
        self._stream_failed: dict[str, tuple[str, bool]] = {}
        # The topic streams' bytes as of the last listing (see size_bytes), and whether one is under way.
        self._size = 0
        self._sizing = False
        # Who holds each dispatch lease as of the last reading (see read_lease_holders), when that answer came
        # (monotonic; None before the first), and whether a reading is under way.
        self._holders: dict[str, tuple[str, str]] = {}
        self._holders_at: float | None = None
        self._reading_holders = False
        # The cluster's revocation list (see read_revoked): Z85 keys of the last reading that answered, why the
        # readings fail since one did not (None: the last one answered), and whether a reading is under way.
        self._revoked: frozenset[bytes] = frozenset()
        self._revoked_error: str | None = None
        self._reading_revoked = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bucketwire-jetstream", daemon=True)
        self._thread.start()
        self.nc: Any = None
        self.js: Any = None
        try:
            # Beyond what the start steps wait for themselves (start_timeout, the presence wait), so their own
            # one-line errors, which say what to fix, come before this generic one.
            budget = (settings.connect_timeout * (1 + len(settings.servers)) + 2 * settings.request_timeout
                      + settings.start_timeout + settings.lease_ttl * 1.5 + 1.0)
            self._run(self._connect(), budget)
        except BaseException:
            self.close()
            raise

    # -- plumbing --------------------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout or self.settings.request_timeout)
        except TimeoutError:
            fut.cancel()
            raise JetStreamError(f"JetStream did not answer within {timeout or self.settings.request_timeout:.0f} s "
                                 f"(servers {', '.join(self.settings.servers)}); is a quorum of the cluster up?"
                                 ) from None
        except JournalError:
            raise
        except Exception as e:  # the client's own errors (no responders, reconnecting): a JournalError like any
            raise JetStreamError(f"JetStream request failed ({type(e).__name__}: {e}); "
                                 "is a quorum of the cluster up?") from None

    async def _answer(self, fut: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        """A reply, or a 408 error when none came in a quarter of request_timeout: a request sent to a node that
        died is never answered, and waiting for it would block the hub's loop (and its lease renewals) for good.
        The caller retries; message-id dedupe and revision checks make a retry of a write that did land safe."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.settings.request_timeout / 4)
        except TimeoutError:
            return {"error": {"code": 408, "description": "no answer (a NATS node may have gone)"}}

    async def _connect(self) -> None:
        import nats
        from nats.errors import NoServersError

        s = self.settings
        opts: dict[str, Any] = {"servers": s.servers, "connect_timeout": s.connect_timeout,
                                "max_reconnect_attempts": -1, "reconnect_time_wait": 0.2,
                                "allow_reconnect": True, "name": f"bucketwire-hub-{self.hub_id}"}
        opts.update(auth_options(s))
        seen: list[str] = []

        async def quiet(e: Exception) -> None:  # reconnect attempts are the client's business, not the log's
            seen.append(str(e))
            log.debug("NATS connection error", extra={"error": str(e)})

        opts["error_cb"] = quiet
        try:
            self.nc = await asyncio.wait_for(nats.connect(**opts), s.connect_timeout * max(1, len(s.servers)))
        except (NoServersError, OSError, TimeoutError) as e:
            # The client retries a refused login like a dead server, so a wrong password would read as
            # "unreachable"; what the servers said while it retried tells the two apart.
            if any("authorization" in m.lower() or "authentication" in m.lower() for m in seen):
                raise JetStreamError(f"NATS at {', '.join(s.servers)} refused the credentials; check [journal] "
                                     "user and password (or token, creds) against the server's") from None
            why = str(e) or (seen[-1] if seen else "") or type(e).__name__
            raise JetStreamError(f"cannot reach NATS at {', '.join(s.servers)} ({why}); "
                                 "check [journal] servers and that nats-server runs with -js") from None
        except Exception as e:  # auth failures and the like: one line, never a traceback
            raise JetStreamError(f"NATS refused the connection ({type(e).__name__}: {e}); "
                                 "check [journal] credentials and TLS settings") from None
        self.js = self.nc.jetstream(timeout=s.request_timeout)
        self._replies = _Replies(self.nc, self.client_internals)
        await self._replies.start()
        # One deadline for every start step that waits out a cluster that cannot answer yet (a node just
        # (re)started, leaders being elected): a slow cluster delays the start by at most start_timeout in all.
        deadline = asyncio.get_running_loop().time() + s.start_timeout
        await self._ensure_kv(deadline)
        await self._claim_id(deadline)
        await self._load_state(deadline)
        # Said once the start succeeded (a start refused for another reason says only that, in one line), and
        # asked of a cluster that has just answered every read: it adds no wait to a start that waits already.
        others = [] if self._streams or self._cursors else await self._other_journals()
        if others:
            log.warning(f"the journal under [journal] prefix {self.prefix!r} is empty (no topic, no cursor) while the "
                        f"NATS cluster holds {len(others)} under other prefixes; if this hub should join one of "
                        "those, set its prefix", extra={"prefix": self.prefix, "found": sorted(others)[:20]})

    def _stream(self, topic: str) -> str:
        return f"{self.prefix}_ev_{token(topic)}"

    def _subject(self, topic: str) -> str:
        return f"{self.prefix}.ev.{token(topic)}"

    @property
    def _kv_cursors(self) -> str:
        return f"{self.prefix}_cursors"

    @property
    def _kv_leases(self) -> str:
        return f"{self.prefix}_leases"

    async def _ensure_kv(self, deadline: float) -> None:
        """Create (or bind) the cursor and lease buckets, waiting out a cluster that cannot place them yet.

        Right after a nats-server node starts or restarts, and while the cluster has no meta leader, the meta
        leader cannot place a replicated bucket: it places only on peers whose statistics it has had since their
        route came up ("no suitable peers for placement, peer offline"), and a leaderless cluster answers
        "temporarily unavailable" or not at all. A hub started together with its cluster (a rolling restart,
        compose bringing all up at once) lands in that window; refusing to start there, with a line about
        `replicas`, would send the operator after a setting that is right. So those answers are retried up to
        `start_timeout`; what no wait can change (no JetStream at all, more replicas than the cluster has
        servers) fails at once. Start-up only: the per-event commit path must answer at once, never wait here.
        """
        from nats.js.api import KeyValueConfig

        s = self.settings
        buckets = [KeyValueConfig(bucket=self._kv_cursors, history=1, replicas=s.replicas),
                   KeyValueConfig(bucket=self._kv_leases, history=1, ttl=s.lease_ttl, replicas=s.replicas),
                   revoked_bucket(s)]
        loop = asyncio.get_running_loop()
        next_note = loop.time() + 2.0
        for cfg in buckets:
            while True:
                left = deadline - loop.time()
                try:
                    await asyncio.wait_for(self.js.create_key_value(cfg), max(0.5, min(s.request_timeout, left)))
                    break
                except Exception as e:  # noqa: BLE001 - sorted into passing and final below
                    why = self._passing_placement_error(e)
                    if why is None:
                        if "already in use" in str(e):
                            raise await self._kv_clash(cfg, e) from None
                        raise self._placement_error(cfg.bucket, e) from None
                    log.debug("cannot place a KV bucket yet", extra={"bucket": cfg.bucket, "reason": why})
                if loop.time() >= deadline:
                    raise JetStreamError(
                        f"the NATS cluster at {', '.join(s.servers)} could not place the KV bucket {cfg.bucket!r} "
                        f"with {s.replicas} replicas within [journal] start_timeout = {s.start_timeout:g} s "
                        f"({why}); start every JetStream node of the cluster and check that they route to each "
                        "other (the meta leader must see each one), or raise start_timeout") from None
                if loop.time() >= next_note:
                    log.info("waiting for the NATS cluster to place the hub's KV buckets",
                             extra={"bucket": cfg.bucket, "replicas": s.replicas, "reason": why,
                                    "gives_up_in": round(deadline - loop.time(), 1)})
                    next_note = loop.time() + 5.0
                await asyncio.sleep(0.1)  # pacing: the meta leader hears from a (re)started node within a second

    async def _kv_clash(self, want: Any, e: Exception) -> JetStreamError:
        """What differs between a KV bucket on the cluster and the one these settings make ("stream name already
        in use with a different configuration" says neither), as one line naming the setting and the fix."""
        s = self.settings
        where = ", ".join(s.servers)
        try:
            have = (await self.js.stream_info(f"KV_{want.bucket}")).config
        except Exception:  # noqa: BLE001 - the generic line below still says which bucket
            return self._placement_error(want.bucket, e)
        if have.num_replicas != want.replicas:
            return JetStreamSettingsError(
                f"[journal] replicas = {want.replicas} but the journal's KV bucket {want.bucket!r} on the NATS "
                f"cluster at {where} has {have.num_replicas} replicas (made by hubs with another replicas setting); "
                f"set replicas = {have.num_replicas}, or stop every hub and change the replicas of the buckets "
                f"KV_{self.prefix}_* and streams {self.prefix}_ev_* on the cluster (nats stream edit NAME --replicas "
                f"{want.replicas})")
        if want.ttl and abs(float(have.max_age or 0) - float(want.ttl)) > 1e-3:
            return JetStreamSettingsError(
                f"[journal] lease_ttl = {s.lease_ttl:g} s but the lease bucket {want.bucket!r} on the NATS cluster at "
                f"{where} expires leases after {float(have.max_age or 0):g} s (made by hubs with another lease_ttl); "
                f"every hub must use the bucket's: set lease_ttl = {float(have.max_age or 0):g}, or stop every hub "
                f"and delete the bucket (nats kv del {want.bucket}) so the first to start makes it anew")
        return self._placement_error(want.bucket, e)

    async def _other_journals(self) -> list[str]:
        """The prefixes of the other journals on the cluster, asked when this hub's holds no topic and no cursor: a
        mistyped or forgotten `[journal] prefix` would start an empty journal beside the real one,
        and the groups would start afresh with nothing said. Best effort: never stops the start."""
        try:
            found: list[str] = []
            offset = 0
            while True:
                resp = await self.nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode(),
                                             timeout=min(2.0, self.settings.request_timeout))
                page = json.loads(resp.data)
                names = page.get("streams") or []
                found += [n[3:-len("_cursors")] for n in names if n.startswith("KV_") and n.endswith("_cursors")
                          and n != f"KV_{self._kv_cursors}"]
                offset += len(names)
                if not names or offset >= int(page.get("total", 0)):
                    return found
        except Exception as e:  # noqa: BLE001 - a note, not a step of the start
            log.debug("could not look for other journals", extra={"error": f"{type(e).__name__}: {e}"})
            return []

    @staticmethod
    def _passing_placement_error(e: Exception) -> str | None:
        """What the cluster said, when it is an answer that waiting changes (a node not yet known to the meta
        leader, no meta leader, no answer in time); None for a final one."""
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.errors import APIError, ServiceUnavailableError

        if isinstance(e, TimeoutError | NatsTimeout):
            return "no answer in time"
        if isinstance(e, ServiceUnavailableError):
            # With an error code it is JetStream saying it has no meta leader yet; without one it is "no
            # responders": no server runs JetStream, which no wait changes.
            return f"{e.description or 'JetStream temporarily unavailable'}" if e.err_code else None
        if isinstance(e, APIError) and "no suitable peers" in str(e.description) and "peer offline" in \
                str(e.description):
            # "offline" is the reason nats-server adds when a peer it knows has not reported to the leader; with
            # more replicas than servers the same error comes without any reason.
            return str(e.description)
        return None

    def _placement_error(self, bucket: str, e: Exception) -> JetStreamError:
        from nats.js.errors import APIError, ServiceUnavailableError

        s = self.settings
        if isinstance(e, ServiceUnavailableError):
            return JetStreamError(f"JetStream does not answer at {', '.join(s.servers)}: run nats-server with -js "
                                  "(JetStream enabled), and a quorum of its cluster")
        desc = str(e.description) if isinstance(e, APIError) else f"{type(e).__name__}: {e}"
        if "no suitable peers" in desc:
            return JetStreamError(f"[journal] replicas = {s.replicas} but the NATS cluster at {', '.join(s.servers)} "
                                  "has fewer JetStream servers to place them on; set replicas to at most its "
                                  "number of servers")
        return JetStreamError(f"cannot create the KV bucket {bucket!r} ({desc}); check the NATS account's "
                              "JetStream limits and [journal] replicas")

    async def _load_state(self, deadline: float) -> None:
        """Heads of every topic stream, and every cursor and counter with its revision, read whole or not at all.

        A hub that ran with a head it did not read would take a topic for empty: a new group starting at
        "latest" would get its whole history, and the group that has events waiting in it would not see them
        until the next one came. So a read that fails or comes back incomplete (a stream whose leader died
        is left out of the listing until a new one is elected, a KV bucket that has no leader yet) is retried
        until the start deadline, then the start fails with one line."""
        s = self.settings
        loop = asyncio.get_running_loop()
        next_note = loop.time() + 2.0
        while True:
            left = deadline - loop.time()
            try:
                # One attempt may run past the deadline by up to request_timeout: a cluster that answers slowly
                # but answers is not given up on mid-read.
                await asyncio.wait_for(self._read_state(), max(s.request_timeout, left))
                return
            except Exception as e:  # noqa: BLE001 - sorted into passing and final below
                why = self._passing_read_error(e)
                if why is None:
                    raise
            if loop.time() >= deadline:
                raise JetStreamError(
                    f"could not read every topic's head and every cursor from the NATS cluster at "
                    f"{', '.join(s.servers)} within [journal] start_timeout = {s.start_timeout:g} s ({why}); start "
                    "every JetStream node of the cluster and check that they route to each other (each stream "
                    "needs a leader, elected by a quorum of its replicas), or raise start_timeout") from None
            log.debug("cannot read the journal's state yet", extra={"reason": why})
            if loop.time() >= next_note:
                log.info("waiting for the NATS cluster to answer for the journal's streams",
                         extra={"reason": why, "gives_up_in": round(deadline - loop.time(), 1)})
                next_note = loop.time() + 5.0
            await asyncio.sleep(0.2)  # pacing: a stream leader election takes a few seconds

    @staticmethod
    def _passing_read_error(e: Exception) -> str | None:
        """Why a read at start failed, when waiting may change it; None for an error no wait changes (a bug's
        exception, a malformed answer), which the start reports at once."""
        from nats.errors import Error as NatsError

        if isinstance(e, JetStreamSettingsError):
            return None
        if isinstance(e, TimeoutError):
            return "no answer in time"
        if isinstance(e, JetStreamError | NatsError):
            return str(e) or type(e).__name__
        return None

    async def _read_state(self) -> None:
        want = f"{self.prefix}_ev_"
        missing: list[str] = []
        streams: set[str] = set()
        heads: dict[str, int] = {}
        async for info in self._stream_infos(missing):
            name = info.config.name
            if name.startswith(want):
                topic = untoken(name[len(want):])
                streams.add(topic)
                heads[topic] = int(info.state.last_seq)
                await self._in_line(topic, info.config)
        ours = sorted(untoken(m[len(want):]) for m in missing if m.startswith(want))
        if ours:
            raise JetStreamError(f"no leader answers for the stream of topic {ours[0]!r}"
                                 + (f" and {len(ours) - 1} more" if len(ours) > 1 else ""))
        cursors: dict[tuple[str, str], tuple[int, str]] = {}
        cursor_rev: dict[str, int] = {}
        stats: dict[str, tuple[int, int, int]] = {}
        stats_rev: dict[str, int] = {}
        for key, (value, revision) in (await self._latest(self._kv_cursors)).items():
            if key.startswith("a."):
                continue  # attempt counts: read by load_group when the group is taken
            doc = json.loads(value)
            if key.startswith("stats."):
                stats[doc["group"]] = (int(doc["dead_lettered"]), int(doc["retried"]), int(doc["redelivered"]))
                stats_rev[doc["group"]] = revision
            else:
                cursors[(doc["group"], doc["topic"])] = (int(doc["acked"]), str(doc.get("above", "")))
                cursor_rev[key] = revision
        # Read with the rest of the state, so a hub that could not read it does not start: one that started
        # without it would admit every revoked key until its first periodic reading.
        revoked = await self._read_revoked_keys()
        self._streams |= streams
        self._revoked = revoked
        self.heads.update(heads)
        self._cursors.update(cursors)
        self._cursor_rev.update(cursor_rev)
        self._stats.update(stats)
        self._stats_rev.update(stats_rev)

    async def _in_line(self, topic: str, have: Any) -> None:
        """Bring an existing topic stream in line with `[journal]`: a stream is made with the settings of the hub
        that sent the topic's first event, and binding to it kept those for good (a raised `duplicate_window`,
        which the README's ingress dedupe promises, or a changed retention never reached the topics that
        existed). Replicas are not moved behind the operator's back: a difference stops the start."""
        import dataclasses

        s = self.settings
        name = have.name
        if have.num_replicas != s.replicas:
            raise JetStreamSettingsError(
                f"[journal] replicas = {s.replicas} but the stream {name!r} of topic {topic!r} on the NATS cluster "
                f"has {have.num_replicas} replicas; set replicas = {have.num_replicas}, or stop every hub and "
                f"change the replicas of the journal's streams (nats stream edit {name} --replicas {s.replicas})")
        want = {"duplicate_window": float(s.duplicate_window), "max_age": float(s.max_age),
                "max_bytes": int(s.max_bytes)}
        seen = {"duplicate_window": float(have.duplicate_window or 0), "max_age": float(have.max_age or 0),
                "max_bytes": int(have.max_bytes if have.max_bytes is not None else -1)}
        changes = {k: v for k, v in want.items() if abs(float(seen[k]) - float(v)) > 1e-3}
        if not changes:
            return
        await asyncio.wait_for(self.js.update_stream(dataclasses.replace(have, **changes)), s.request_timeout)
        log.info("brought a topic's stream in line with [journal]",
                 extra={"stream": name, **{k: f"{seen[k]:g} -> {v:g}" for k, v in changes.items()}})

    async def _latest(self, bucket: str, keys: str = ">") -> dict[str, tuple[bytes, int]]:
        return await kv_latest(self.nc, bucket, self.settings.request_timeout, keys)

    async def _stream_infos(self, missing: list[str] | None = None) -> Any:
        from nats.js.api import StreamInfo

        async for raw in stream_list(self.nc, self.settings.request_timeout, missing):
            yield StreamInfo.from_response(raw)

    def stream_ready(self, topics: set[str]) -> bool:
        """Whether every topic of `topics` has its stream, so a commit of their events waits for no creation.
        Asked by the hub's loop once per request (a set test), never per event."""
        return topics <= self._streams

    def create_streams(self, topics: Iterable[str], until: float, done: Callable[[], None], wait: float = 0.0
                       ) -> None:
        """Create the streams of `topics` on the client's thread: the hub's loop keeps serving every other topic
        meantime. Each topic's creation is one task, shared by every caller; it retries what waiting may change
        (no meta leader, a new stream electing its leader, a node not yet known to the meta leader) until `until`
        (monotonic; a later `until` extends a running one), then records why it failed (`stream_failure`).
        `done` is called from the client's thread whenever one of them ends. `wait`: seconds to wait for the
        creations this call starts (none for one already under way), for a caller that would rather have the
        stream in this turn when the cluster answers at once."""
        topics = list(topics)
        if wait <= 0:
            self._loop.call_soon_threadsafe(lambda: [self._start_creating(t, until, done) for t in topics])
            return

        async def start_and_wait() -> None:
            new = {t for t in topics if t not in self._creating and t not in self._streams}
            tasks = {t: self._start_creating(t, until, done) for t in topics}
            started = [task for t, task in tasks.items() if t in new]
            if started:
                await asyncio.wait(started, timeout=wait)

        try:
            self._run(start_and_wait(), wait + 1.0)
        except JetStreamError as e:  # the creations go on; the caller sees the streams missing still
            log.debug("waiting for new streams failed", extra={"error": str(e)})

    def stream_failure(self, topic: str) -> tuple[str, bool] | None:
        """Why the last creation of `topic`'s stream failed, and whether waiting cannot change it (final); None
        while it is being created or once it is."""
        return self._stream_failed.get(topic)

    def stream_wait_error(self, topic: str) -> str:
        """What a request that waited its whole request_timeout for `topic`'s stream is told."""
        why = self._stream_failed.get(topic)
        return why[0] if why is not None else self._not_created(topic, "")

    def _not_created(self, topic: str, why: str) -> str:
        s = self.settings
        return (f"the NATS cluster did not create the stream {self._stream(topic)!r} of topic {topic!r} with "
                f"{s.replicas} replicas within [journal] request_timeout = {s.request_timeout:g} s"
                + (f" ({why})" if why else "") + "; start every JetStream node of the cluster and check that they "
                "route to each other (a new stream needs a meta leader and a quorum of its replicas), then send again")

    def _start_creating(self, topic: str, until: float, done: Callable[[], None] | None) -> asyncio.Task[None]:
        self._create_until[topic] = max(self._create_until.get(topic, 0.0), until)
        if done is not None:
            self._created_cbs.setdefault(topic, []).append(done)
        task = self._creating.get(topic)
        if task is None:
            self._stream_failed.pop(topic, None)
            task = self._creating[topic] = asyncio.get_running_loop().create_task(self._create_stream(topic))
        return task

    async def _create_stream(self, topic: str) -> None:
        """Create (or bind) `topic`'s stream and read its head; see `create_streams`."""
        from nats.js.api import StorageType, StreamConfig

        s = self.settings
        name = self._stream(topic)
        cfg = StreamConfig(name=name, subjects=[self._subject(topic)], num_replicas=s.replicas,
                           storage=StorageType.FILE, duplicate_window=s.duplicate_window, max_age=s.max_age,
                           max_bytes=s.max_bytes, allow_direct=True, description=f"bucketwire topic {topic}")
        why = "no answer"
        # One attempt waits a quarter of request_timeout: a request the meta leader never answers (it froze or
        # died) is sent again, so a cluster that recovers meanwhile creates the stream before the deadline.
        attempt = max(0.25, s.request_timeout / 4)
        try:
            while (left := self._create_until[topic] - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self.js.add_stream(cfg), min(left, attempt))
                except Exception as e:  # noqa: BLE001 - sorted into passing and final below
                    if "already in use" not in str(e):  # another hub created it a moment ago: ours too
                        passing = self._passing_placement_error(e)
                        if passing is None:
                            desc = str(getattr(e, "description", "") or "") or f"{type(e).__name__}: {e}"
                            self._stream_failed[topic] = (
                                f"cannot create the stream {name!r} of topic {topic!r} ({desc}); check [journal] "
                                "replicas against the cluster's number of JetStream servers, and the NATS "
                                "account's JetStream limits", True)
                            log.error("cannot create a topic's stream", extra={"topic": topic, "error": desc})
                            return
                        why = passing
                        await asyncio.sleep(0.1)  # pacing: waiting for the meta leader to be able to place it
                        continue
                try:  # the head, asked of the new stream's leader (elected a moment after the creation)
                    info = await asyncio.wait_for(self.js.stream_info(name), min(max(0.01, left), attempt))
                except Exception as e:  # noqa: BLE001 - no leader yet: asked again until the deadline
                    why = f"no leader yet ({type(e).__name__})"
                    await asyncio.sleep(0.05)  # pacing: waiting for the stream's leader
                    continue
                self.heads[topic] = max(self.heads.get(topic, 0), int(info.state.last_seq))
                self._streams.add(topic)
                self._track(topic, 0, self.heads[topic])  # new to this hub: what another hub stored in it is new
                return
            self._stream_failed[topic] = (self._not_created(topic, why), False)
            log.warning("cannot create a topic's stream yet", extra={"topic": topic, "reason": why})
        finally:
            self._creating.pop(topic, None)
            self._create_until.pop(topic, None)
            for cb in self._created_cbs.pop(topic, []):
                cb()

    async def _ensure_stream(self, topic: str) -> None:
        """For a commit that names a topic without its stream (the hub's loop never sends one; see
        `create_streams`): wait for the shared creation, up to request_timeout."""
        if topic in self._streams:
            return
        await asyncio.shield(self._start_creating(topic, time.monotonic() + self.settings.request_timeout, None))
        if topic not in self._streams:
            why = self._stream_failed.get(topic)
            raise JetStreamError(why[0] if why else f"the stream of topic {topic!r} was not created")

    async def _head(self, topic: str, deadline: float | None = None) -> int:
        """The stream's last seq, asked of its leader; retried while the stream elects one (a failover), until
        `deadline` (the event loop's time; default request_timeout from now)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.settings.request_timeout
        while True:
            try:
                info = await asyncio.wait_for(self.js.stream_info(self._stream(topic)),
                                              max(0.01, deadline - loop.time()))
                return int(info.state.last_seq)
            except Exception as e:
                if loop.time() >= deadline:
                    why = str(e) or "no answer from its leader"  # a wait_for timeout says nothing itself
                    raise JetStreamError(f"stream for topic {topic!r} unavailable ({why}); is a quorum of the NATS "
                                         "cluster up?") from None
                await asyncio.sleep(0.05)  # pacing: waiting for the stream's leader

    # -- the one write path ----------------------------------------------------------------------------------
    def settle(self, now: float | None = None) -> float | None:
        """Nothing to finish: a commit is whole in the cluster when `commit` returns."""
        return None

    def commit(self, batch: Batch) -> list[Appended]:
        """Append events (deduplicated, per-topic seqs with no holes) and move cursors; returns one Appended per
        event in batch order. Raises JournalError when JetStream did not store everything; what it did store
        stays stored, and a retry of the same events is answered as duplicates."""
        if self.nc is not None and not self.nc.is_connected:
            # Known down (the client is reconnecting): refuse now, so senders get 503 at once instead of after
            # request_timeout with the hub's loop blocked meanwhile.
            raise JetStreamError(f"not connected to NATS ({', '.join(self.settings.servers)}); "
                                 "is a quorum of the cluster up?")
        # The hub's loop waits here, every topic with it: request_timeout in all, however many rounds the appends
        # take (a stream without a leader answers nothing: its appends, then its head, each waited up to that).
        return self._run(self._commit(batch), self.settings.request_timeout)

    async def _commit(self, batch: Batch) -> list[Appended]:
        chains: dict[str, _Chain] = {}
        for i, ev in enumerate(batch.events):
            chains.setdefault(ev.topic, _Chain(ev.topic, [])).events.append((i, ev))
        for topic in chains:
            await self._ensure_stream(topic)
        appends = [self._append_chain(c) for c in chains.values()]
        try:
            if batch.stats:  # counters are written as sums: only once the appends are stored, as before
                await asyncio.gather(*appends)
                await self._write_cursors(batch)
            else:
                # Cursors and retry counts are absolute values about events committed earlier, so they need not
                # wait for this batch's appends (a failed commit writes them again): both go out at once and the
                # commit costs one round trip, not two.
                results = await asyncio.gather(self._write_cursors(batch), *appends, return_exceptions=True)
                for r in results[1:] + results[:1]:  # an append's failure first: it is what the publishers hear
                    if isinstance(r, BaseException):
                        raise r
        finally:
            for c in chains.values():  # every writer tells what it stored, also when the commit failed later
                if c.stored:
                    await self._notify(c.topic, c.stored)
        out: list[Appended] = [None] * len(batch.events)  # type: ignore[list-item]
        for c in chains.values():
            for i, a in c.done.items():
                out[i] = a
        return out

    async def _append_chain(self, chain: _Chain) -> None:
        todo = list(chain.events)
        seen: dict[str, Appended] = {}
        loop = asyncio.get_running_loop()
        # A little before `commit`'s own limit, so a chain that cannot be stored fails with what went wrong.
        rt = self.settings.request_timeout
        deadline = loop.time() + rt * 0.95
        while True:
            head = self.heads.get(chain.topic, 0)
            sent: list[tuple[int, NewEvent, int, bytes, str]] = []
            expect = head
            later: list[tuple[int, NewEvent]] = []
            in_round: set[str] = set()
            items: list[tuple[bytes, dict[str, str]]] = []
            for i, ev in todo:
                mid = msg_id(ev.source, ev.id)
                if mid in seen:  # the same event twice in one batch: the second is a duplicate of the first
                    prev = seen[mid]
                    chain.done[i] = Appended(prev.topic, prev.seq, prev.body, prev.objkey, duplicate=True)
                    continue
                if mid in in_round:  # its twin is in flight: settle it next round, as a duplicate
                    later.append((i, ev))
                    continue
                in_round.add(mid)
                seq = expect + 1
                body = render(ev.envelope, seq)
                headers = {"Nats-Msg-Id": mid, "Nats-Expected-Last-Sequence": str(expect), "Bw-Hub": self.hub_id}
                if ev.objkey is not None:
                    headers["Bw-Objkey"] = ev.objkey
                items.append((body, headers))
                sent.append((i, ev, seq, body, mid))
                expect = seq
            # No flush (PING/PONG) first: the answers themselves say the publishes arrived.
            futs = await self._replies.send_many(self._subject(chain.topic), items)
            try:
                docs = await self._replies.answers(futs, max(0.01, min(rt / 4, deadline - loop.time())))
            finally:  # also when the commit is given up (cancelled) while it waits
                for f in futs:
                    if not f.done():
                        self._late(chain.topic, f)
            retry: list[tuple[int, NewEvent]] = later
            unavailable = False
            for (i, ev, _seq, body, mid), doc in zip(sent, docs, strict=True):
                err = doc.get("error")
                if err is None:
                    stored = int(doc["seq"])
                    if doc.get("duplicate"):
                        a = Appended(chain.topic, stored, b"", ev.objkey, duplicate=True)
                    else:
                        a = Appended(chain.topic, stored, body, ev.objkey)
                        self.heads[chain.topic] = max(self.heads.get(chain.topic, 0), stored)
                        chain.stored = max(chain.stored, stored)
                    self._own(chain.topic, stored, a.duplicate)
                    chain.done[i] = a
                    seen[mid] = a
                elif err.get("err_code") == WRONG_LAST_SEQUENCE or IN_PROCESS in str(err.get("description")):
                    retry.append((i, ev))  # another hub appended first, or is storing the same id right now
                elif err.get("code") in (503, 408):
                    retry.append((i, ev))  # the stream has no leader this moment (just created, or failing over)
                    unavailable = True
                else:
                    raise JetStreamError(f"JetStream refused an event for topic {chain.topic!r}: "
                                         f"{err.get('description', err)}")
            if not retry:
                return
            todo = sorted(x for x in retry if x[0] not in chain.done)
            if unavailable:
                await asyncio.sleep(0.05)  # pacing: a stream leader election takes a moment
            if loop.time() >= deadline:
                break
            self.heads[chain.topic] = await self._head(chain.topic, deadline)
        raise JetStreamError(f"topic {chain.topic!r}: could not append within {rt:g} s (other hubs kept appending "
                             "first, or the stream had no leader); is a quorum up?")

    def _late(self, topic: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        """An append nobody waits for any more (its commit gave up, or sent it again) may still be stored when the
        stream's leader answers: then this hub's head moves to it, so the groups read the event from the journal
        (a commit that failed is not offered), and the next commit expects the right last seq."""
        def settle(f: asyncio.Future[dict[str, Any]]) -> None:
            if f.cancelled():
                return
            doc = f.result()
            if doc.get("error") is not None or "seq" not in doc:
                return
            seq, duplicate = int(doc["seq"]), bool(doc.get("duplicate"))
            if not duplicate and seq > self.heads.get(topic, 0):
                self.heads[topic] = seq
                if self._wake is not None:
                    self._wake()
            self._own(topic, seq, duplicate)

        fut.add_done_callback(settle)

    def _cursor_key(self, group: str, topic: str) -> str:
        return f"c.{token(group)}.{token(topic)}"

    async def _check_attempt(self, key: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        doc = await self._answer(fut)
        if "error" in doc:
            raise JetStreamError(f"cannot store the attempt count {key!r}: {doc['error'].get('description', '')}")

    async def _write_cursors(self, batch: Batch) -> None:
        tries: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        writes: list[tuple[str, bytes, int, Any]] = []
        lapsed = {g for g, _ in batch.cursors} | set(batch.stats) | {g for g, _, _ in batch.attempts}
        lapsed = {g for g in lapsed if self._lapsed(g)}
        if lapsed:
            # Gathered before the lease lapsed (a freeze mid-turn, a turn held up by a slow commit): another hub
            # may have taken the group and read its keys at the revisions this hub knows, so the revision check
            # would let these writes through over its back. The new dispatcher redelivers what they would have
            # acked (README "What can repeat"); the hub drops the group on its next look at its leases.
            log.warning("not storing the acks of a group whose dispatch lease lapsed",
                        extra={"groups": sorted(lapsed), "hub": self.hub_id})
            batch = Batch(cursors={k: v for k, v in batch.cursors.items() if k[0] not in lapsed},
                          above={k: v for k, v in batch.above.items() if k[0] not in lapsed},
                          stats={k: v for k, v in batch.stats.items() if k not in lapsed},
                          attempts={k: v for k, v in batch.attempts.items() if k[0] not in lapsed},
                          due={k: v for k, v in batch.due.items() if k[0] not in lapsed},
                          waits={k: v for k, v in batch.waits.items() if k[0] not in lapsed})
        for (g, t), acked in batch.cursors.items():
            above = batch.above.get((g, t), "")
            key = self._cursor_key(g, t)
            doc = {"group": g, "topic": t, "acked": acked, "above": above, "hub": self.hub_id}
            writes.append((key, json.dumps(doc).encode(), self._cursor_rev.get(key, 0), ("c", g, t, acked, above)))
        for g, (d, r, x) in batch.stats.items():
            key = f"stats.{token(g)}"
            old = self._stats.get(g, (0, 0, 0))
            new = (old[0] + d, old[1] + r, old[2] + x)
            doc2 = {"group": g, "dead_lettered": new[0], "retried": new[1], "redelivered": new[2]}
            writes.append((key, json.dumps(doc2).encode(), self._stats_rev.get(g, 0), ("s", g, new)))
        for (g, t, q), n in batch.attempts.items():
            # Written only on failure, deleted on ack: only the lease holder writes them, so no revision check.
            key = f"a.{token(g)}.{token(t)}.{q}"
            doc3 = {"group": g, "topic": t, "seq": q, "attempts": n, "due": batch.due.get((g, t, q), 0.0),
                    "wait": batch.waits.get((g, t, q), 0.0)}
            fut3 = await self._replies.send(f"$KV.{self._kv_cursors}.{key}", json.dumps(doc3).encode() if n else b"",
                                            {} if n else {"KV-Operation": "PURGE", "Nats-Rollup": "sub"})
            tries.append((key, fut3))
        if not writes:
            await self.nc.flush()
            for key, f3 in tries:
                await self._check_attempt(key, f3)
            return
        futs: list[asyncio.Future[dict[str, Any]]] = []
        for key, data, rev, _ in writes:
            futs.append(await self._replies.send(f"$KV.{self._kv_cursors}.{key}", data,
                                                 {"Nats-Expected-Last-Subject-Sequence": str(rev)}))
        refused = []
        answers = await self._replies.answers(futs, self.settings.request_timeout / 4)
        for (key, data, _, what), answer in zip(writes, answers, strict=True):
            if "error" in answer and self._holds(what[1]):
                answer = await self._rewrite(key, data, what[1])
            if "error" in answer:
                refused.append((key, answer["error"].get("description", "")))
                continue
            rev = int(answer["seq"])
            if what[0] == "c":
                _, g, t, acked, above = what
                self._cursor_rev[key] = rev
                self._cursors[(g, t)] = (acked, above)
            else:
                _, g, new = what
                self._stats_rev[g] = rev
                self._stats[g] = new
        for key, f3 in tries:
            await self._check_attempt(key, f3)
        if refused:
            raise JetStreamError(f"another hub moved {refused[0][0]!r} ({refused[0][1]}); this hub no longer "
                                 "dispatches that group")

    def load_group(self, group: str) -> None:
        """Re-read one group's cursors and counters (with their revisions) from the bucket: what a hub does when
        it takes the group's lease, since the previous dispatcher moved them since this hub last looked.

        Keys older than a removal record (`forget_group`) are what a `group rm` cut off half-way left: not the
        group's (a group made anew under that name starts afresh), and deleted here, the removal finished by the
        hub that holds the lease (best effort: left, they are still not read)."""
        async def load() -> None:
            mine = f"c.{token(group)}."
            tries = f"a.{token(group)}."
            stats = f"stats.{token(group)}"
            found = await self._latest(self._kv_cursors, f"{mine}>")
            found.update(await self._latest(self._kv_cursors, f"{tries}>"))
            found.update(await self._latest(self._kv_cursors, stats))
            self._attempts[group] = {}
            self._due[group] = {}
            self._waits[group] = {}
            for k in [k for k in self._cursors if k[0] == group]:
                self._cursors.pop(k, None)
            self._stats.pop(group, None)
            self._removed_rev.pop(group, None)
            floor = _removal_floor(found.get(stats))
            left: list[str] = []
            for key, (value, revision) in found.items():
                if not (key.startswith((mine, tries)) or key == stats):
                    continue
                doc = json.loads(value)
                if key == stats:
                    self._stats[group] = (int(doc["dead_lettered"]), int(doc["retried"]), int(doc["redelivered"]))
                    self._stats_rev[group] = revision
                    if doc.get("removed"):
                        self._removed_rev[group] = revision
                elif revision < floor:
                    left.append(key)
                    if key.startswith(mine):
                        self._cursor_rev[key] = revision  # written over by the new group's first cursor
                elif key.startswith(tries):
                    self._attempts[group][(str(doc["topic"]), int(doc["seq"]))] = int(doc["attempts"])
                    self._due[group][(str(doc["topic"]), int(doc["seq"]))] = float(doc.get("due", 0.0))
                    if float(doc.get("wait", 0.0)) > 0:  # a hub that predates it stored none
                        self._waits[group][(str(doc["topic"]), int(doc["seq"]))] = float(doc["wait"])
                else:
                    self._cursors[(group, doc["topic"])] = (int(doc["acked"]), str(doc.get("above", "")))
                    self._cursor_rev[key] = revision
            if left:
                try:  # within a quarter of request_timeout: the load itself must not fail for it
                    await asyncio.wait_for(self._purge(group, left), self.settings.request_timeout / 4)
                except (JetStreamError, TimeoutError) as e:
                    log.warning("cannot delete what a removal of the group left; not read",
                                extra={"group": group, "error": str(e) or "no answer"})

        self._run(load())

    def attempts_of(self, group: str) -> dict[tuple[str, int], int]:
        """Attempts used by events of `group` that failed and are not yet acked or dead-lettered, as of the
        last `load_group`."""
        return dict(self._attempts.get(group, {}))

    def retries_due(self, group: str) -> dict[tuple[str, int], float]:
        """When (unix time) the next attempt of each of those events is due, as of the last `load_group`."""
        return dict(self._due.get(group, {}))

    def retry_waits(self, group: str) -> dict[tuple[str, int], float]:
        """How long each of those retries was scheduled to wait, where its writer said, as of the last
        `load_group`."""
        return dict(self._waits.get(group, {}))

    def forget_group(self, group: str) -> None:
        """Delete a removed group's cursors, counters and retry attempt counts, so a new group of that name starts
        afresh (a left-over count would start an event at a later attempt, or dead-letter it early).

        The counters are not deleted but zeroed with a `removed` note: a lasting record of the removal, which the
        lease bucket's marker (see `release`) is not past lease_ttl. A hub that wanted the group from before (a
        worker knocked there, then the hub was frozen or cut off past the marker's life) finds it when it takes
        the free lease (`unseen_removal`) and lets it go. Hubs of earlier versions read the key as zero counters;
        the new group's first counter write replaces it.

        Several writes, in an order any prefix of which is safe: the record first, then the purges. Keys older
        than the record are a removed group's leftovers to every reader (`load_group`, `stored_topics`), so once
        the record is stored the group is removed whatever keys remain: RemovalUnfinished says so, and
        `finish_removal` (`group rm` again, through any hub) deletes the rest. A record not stored: nothing done.
        """
        async def record() -> int:
            kv = await self.js.key_value(self._kv_cursors)
            note = {"group": group, "dead_lettered": 0, "retried": 0, "redelivered": 0,
                    "removed": {"hub": self.hub_id, "at": time.time()}}
            return int(await kv.put(f"stats.{token(group)}", json.dumps(note).encode()))

        try:
            rev = self._run(record())
        except Exception as e:  # noqa: BLE001 - JetStreamError, or the client's own: nothing was written
            raise JetStreamError(f"cannot store the removal of group {group!r} ({e})") from None
        self._removed_seen[group] = self._removed_rev[group] = self._stats_rev[group] = rev
        self._attempts.pop(group, None)
        self._due.pop(group, None)
        self._waits.pop(group, None)
        for k in [k for k in self._cursors if k[0] == group]:
            self._cursors.pop(k, None)
        self._stats.pop(group, None)
        self._finish(group)

    def finish_removal(self, group: str) -> int | None:
        """See `JournalAPI.finish_removal`: the removal record is the group's stats key with a `removed` note."""
        stats = f"stats.{token(group)}"
        if not _removal_floor(self._run(self._latest(self._kv_cursors, stats)).get(stats)):
            return None
        return self._finish(group)

    def _finish(self, group: str) -> int:
        """Purge every cursor and attempt count of a group whose removal is stored; how many there were."""
        async def purge() -> int:
            keys = list(await self._latest(self._kv_cursors, f"c.{token(group)}.>"))
            keys += list(await self._latest(self._kv_cursors, f"a.{token(group)}.>"))
            await self._purge(group, keys)
            return len(keys)

        try:
            # Each purge waits up to a quarter of request_timeout: the listings and a few purges in one budget.
            return self._run(purge(), self.settings.request_timeout * 2)
        except JournalError as e:
            raise RemovalUnfinished(f"group {group!r} is removed, but not all of its cursors could be deleted "
                                    f"({e})") from None

    async def _purge(self, group: str, keys: list[str]) -> None:
        kv = await self.js.key_value(self._kv_cursors)
        for key in keys:
            try:
                await asyncio.wait_for(kv.purge(key), self.settings.request_timeout / 4)
            except Exception as e:  # noqa: BLE001 - the rest would most likely fail alike: stop at the first
                desc = str(getattr(e, "description", "") or "") or str(e) or type(e).__name__
                raise JetStreamError(f"cannot remove {key!r} of group {group!r}: {desc}") from None
            self._cursor_rev.pop(key, None)

    def unseen_removal(self, group: str) -> bool:
        """Whether the `load_group` just made found a `group rm` of `group` this hub has not seen before (it was
        frozen, down or cut off when it happened, past the lease marker's life). Reported once: a want made
        after that (a worker's READY) is for a new group of that name."""
        rev = self._removed_rev.get(group)
        if rev is None or self._removed_seen.get(group) == rev:
            return False
        self._removed_seen[group] = rev
        return True

    def stored_topics(self, group: str) -> set[str]:
        """The topics `group` has a cursor of in the cluster, read now (up to request_timeout): what a hub that never
        saw an ad-hoc group's workers knows of it. `group rm` purges the cursors, so a removed group has none, and
        a group made anew under that name has only the topics its new workers named."""
        return set(self.stored_cursors(group))

    def stored_cursors(self, group: str) -> dict[str, int]:
        """See `JournalAPI.stored_cursors`: the group's cursor keys newer than its removal record, if any (older:
        a half-done removal's leftovers)."""
        async def read() -> dict[str, tuple[bytes, int]]:
            found = await self._latest(self._kv_cursors, f"c.{token(group)}.>")
            stats = f"stats.{token(group)}"
            floor = _removal_floor((await self._latest(self._kv_cursors, stats)).get(stats))
            return {k: v for k, v in found.items() if v[1] > floor}

        docs = [json.loads(value) for value, _ in self._run(read()).values()]
        return {str(d["topic"]): int(d["acked"]) for d in docs}

    def probe(self) -> str | None:
        """Whether a commit could be stored now: None, or why not (for /healthz)."""
        if self.nc is None or not self.nc.is_connected:
            return f"not connected to NATS ({', '.join(self.settings.servers)})"
        return None

    def _holds(self, group: str) -> bool:
        """Whether this hub's lease of `group` is still good by its own clock, as `lead` counts it. A hub frozen
        between its lease round and a cursor write (a GC pause, a stopped VM) wakes up with the lease still in
        `_leases`; only the clock says another hub may have taken it meanwhile."""
        return self.holds(group, time.monotonic())

    def holds(self, group: str, now: float) -> bool:
        """`_holds` at the loop's `now` (monotonic): whether it may still hand out the group's work. `lead`
        answers once per turn; a turn held up past the lease's end (a commit waiting out a stream's election,
        a freeze) asks again before it dispatches."""
        lease = self._leases.get(group)
        return lease is not None and now < lease[1] - self.settings.lease_ttl / 5

    def _lapsed(self, group: str) -> bool:
        """A group this hub took a lease of and no longer holds by its own clock: its keys are not written."""
        return group in self._leased and not self._holds(group)

    async def _rewrite(self, key: str, data: bytes, group: str) -> dict[str, Any]:
        """A cursor write of a group this hub holds the lease of was refused: its last write did land, but the
        answer was lost (a NATS node died mid-request), so the revision it knows is stale. Only the lease holder
        writes the group's keys, so it writes again over the revision stored now; without this every later
        write would be refused and the cursor would stay behind until the next failover redelivered it all."""
        try:
            last = await self.js.get_last_msg(f"KV_{self._kv_cursors}", f"$KV.{self._kv_cursors}.{key}")
            rev = int(last.seq)
        except Exception:  # no entry at all: create it
            rev = 0
        if not self._holds(group):
            # The read above can wait out the bucket's election, seconds in which the lease may lapse and another
            # hub take the group: written now, over the revision it may have just read, this would pass.
            return {"error": {"code": 409, "description": "the dispatch lease lapsed while reading the revision"}}
        fut = await self._replies.send(f"$KV.{self._kv_cursors}.{key}", data,
                                       {"Nats-Expected-Last-Subject-Sequence": str(rev)})
        await self.nc.flush()
        return await self._answer(fut)

    # -- reads -----------------------------------------------------------------------------------------------
    def cursors(self) -> dict[tuple[str, str], int]:
        return {k: v[0] for k, v in self._cursors.items()}

    def cursor_above(self) -> dict[tuple[str, str], str]:
        return {k: v[1] for k, v in self._cursors.items() if v[1]}

    def group_stats(self) -> dict[str, tuple[int, int, int]]:
        return dict(self._stats)

    def read(self, topic: str, from_seq: int, limit: int) -> list[tuple[int, str | None, bytes]]:
        """Up to `limit` events from `from_seq` on, in order. Starts at `from_seq` unless retention removed it:
        a replica that has not caught up yet is asked again rather than believed, so a slow follower can never
        look like retention and make a group skip events."""
        if topic not in self._streams:
            return []
        rows = self._run(self._read_from(topic, max(1, from_seq), limit))
        return [(seq, objkey, body) for seq, _, objkey, body in rows]

    async def _read_from(self, topic: str, from_seq: int, limit: int) -> list[tuple[int, str, str | None, bytes]]:
        """(seq, committing hub, objkey, body) rows; see `read`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        while True:
            rows = await self._read_rows(topic, {"seq": from_seq}, limit)
            if rows and rows[0][0] == from_seq:
                return rows
            first, last = await self._bounds(topic)
            if from_seq > last:
                return []
            if from_seq < first:  # retention removed the start: what is left, from the first kept event
                return rows if rows and rows[0][0] == first else await self._read_rows(topic, {"seq": first}, limit)
            if loop.time() > deadline:
                raise JetStreamError(f"topic {topic!r}: seq {from_seq} is stored but no replica served it")
            await asyncio.sleep(0.02)  # pacing: the replica that answered is catching up

    async def _bounds(self, topic: str) -> tuple[int, int]:
        """(first, last) seq held by the stream, from its leader."""
        info = await self.js.stream_info(self._stream(topic))
        return int(info.state.first_seq), int(info.state.last_seq)

    def first_seq(self, topic: str) -> int | None:
        if topic not in self._streams:
            return None
        first, last = self._run(self._bounds(topic))
        return first if last >= first and last > 0 else None

    def first_seq_since(self, topic: str, since: float) -> int | None:
        """The first seq stored at or after unix time `since` (for `replay --since`), or None."""
        if topic not in self._streams:
            return None
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since)) + f".{int((since % 1) * 1e9):09d}Z"
        rows = self._run(self._read(topic, {"start_time": start}, 1))
        return rows[0][0] if rows else None

    async def _read(self, topic: str, where: dict[str, Any], limit: int) -> list[tuple[int, str | None, bytes]]:
        return [(seq, objkey, body) for seq, _, objkey, body in await self._read_rows(topic, where, limit)]

    async def _read_rows(self, topic: str, where: dict[str, Any], limit: int
                         ) -> list[tuple[int, str, str | None, bytes]]:
        """Batched direct get: up to `limit` stored messages in one request, answered by any replica.

        A request that goes to a replica that does not answer (frozen, or dying) is never answered, and waiting
        for it held the hub's loop (a group catching up, `fetch`, `dlq retry`) for request_timeout, then failed.
        So the request is sent again every READ_HEDGE seconds while none is answered, each a new chance that a
        live replica takes it; the first whole answer is used, up to request_timeout."""
        loop = asyncio.get_running_loop()
        rt = self.settings.request_timeout
        deadline = loop.time() + rt
        tries: set[asyncio.Task[list[tuple[int, str, str | None, bytes]] | None]] = set()
        try:
            while (left := deadline - loop.time()) > 0:
                tries.add(loop.create_task(self._direct_get(topic, where, limit, left)))
                done, tries = await asyncio.wait(tries, timeout=min(READ_HEDGE, left),
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    rows = task.result()
                    if rows is not None:
                        return rows
        finally:
            for task in tries:
                task.cancel()
        raise JetStreamError(f"topic {topic!r}: no replica answered a read within {rt:g} s; is a quorum of the "
                             "NATS cluster up?")

    async def _direct_get(self, topic: str, where: dict[str, Any], limit: int, timeout: float
                          ) -> list[tuple[int, str, str | None, bytes]] | None:
        """One batched direct get; None when it was not answered whole within `timeout`."""
        out: list[tuple[int, str, str | None, bytes]] = []
        done = asyncio.Event()
        inbox = self.nc.new_inbox()

        async def on_msg(m: Any) -> None:
            h = m.headers or {}
            if not m.data and h.get("Status"):
                done.set()
                return
            out.append((int(h["Nats-Sequence"]), h.get("Bw-Hub", ""), h.get("Bw-Objkey"), bytes(m.data)))

        sub = await self.nc.subscribe(inbox, cb=on_msg)
        try:
            req = dict(where, batch=max(1, min(limit, READ_BATCH)))
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self._stream(topic)}", json.dumps(req).encode(), reply=inbox)
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            return None
        finally:
            await sub.unsubscribe()
        return out

    def event_room(self) -> int | None:
        """max_payload less the headers `_append_chain` adds at their longest (the object key is counted by the
        caller): an event within this never fails `send_many`'s check."""
        fixed = (len("NATS/1.0\r\n\r\n") + len("Nats-Msg-Id: \r\n") + 40
                 + len("Nats-Expected-Last-Sequence: \r\n") + 20 + len(f"Bw-Hub: {self.hub_id}\r\n".encode())
                 + len("Bw-Objkey: \r\n"))
        return int(self.nc.max_payload) - fixed

    def size_bytes(self) -> int:
        """The topic streams' bytes as of the last listing, and a new listing started on the client's thread.

        The hub's loop asks every few seconds (the `journal_bytes` gauge, `status`). Listing the streams is a
        request to the meta leader: while the cluster has none (it died, it froze), waiting for the answer would
        hold the loop, and every topic's publishes and acks with it, for up to request_timeout each time. So the
        figure may be one listing old; 0 until the first listing is in, and a listing that fails keeps the last."""
        if not self._sizing:
            self._sizing = True
            self._loop.call_soon_threadsafe(lambda: self._spawn(self._list_size()))
        return self._size

    async def _list_size(self) -> None:
        try:
            n = 0
            async for info in self._stream_infos():
                if info.config.name.startswith(f"{self.prefix}_ev_"):
                    n += int(info.state.bytes)
            self._size = n
        except Exception as e:  # noqa: BLE001 - the cluster does not answer now: the next call lists again
            log.debug("cannot list the streams' sizes", extra={"error": str(e)})
        finally:
            self._sizing = False

    def enforce_retention(self, max_age: float, max_bytes: int, chunk: int = 5000) -> int:
        """JetStream applies each stream's `max_age`/`max_bytes` itself; nothing to do from the hub."""
        return 0

    # -- one running hub per [hub] id ---------------------------------------------------------------------
    async def _claim_id(self, deadline: float) -> None:
        """Refuse to run beside a live hub with the same `[hub] id` (a copied config whose id was not changed).

        The id is what leases, the feed of other hubs' commits and `status` know a hub by: two hubs sharing one
        would each skip the other's events as their own and both name themselves the dispatcher. So each hub
        keeps a presence key in the lease bucket, renewed with its leases and expiring `lease_ttl` after the
        last renewal. At start the key must be free. One that is taken but not renewed is what a crashed hub
        left: it expires within `lease_ttl`, and the start waits that out; one renewed meanwhile is a live hub.

        A bucket that does not answer (its leader died and a new one is being elected: 408/503) is no sign of
        another hub: that is waited out up to the start `deadline`, and then said as what it is.
        """
        from nats.js.errors import NotFoundError

        s = self.settings
        subject = f"$KV.{self._kv_leases}.{self._presence_key}"
        loop = asyncio.get_running_loop()
        taken_until = loop.time() + s.lease_ttl * 1.5 + 1.0  # a crashed hub's key has expired by then
        seen: int | None = None
        holder = ""
        while True:
            fut = await self._replies.send(subject, self._presence_value, {"Nats-Expected-Last-Subject-Sequence": "0"})
            doc = await self._answer(fut)
            if "error" not in doc:
                self._presence_rev = int(doc["seq"])
                self._answered_at = time.monotonic()
                return
            why: str | None = None
            if doc["error"].get("code") in (408, 503):
                why = str(doc["error"].get("description") or "no answer")
            else:
                try:
                    last = await self.js.get_last_msg(f"KV_{self._kv_leases}", subject)
                except NotFoundError:
                    continue  # expired between the two requests: create it now
                except Exception as e:
                    why = self._passing_read_error(e)
                    if why is None:
                        raise JetStreamError(f"cannot read the presence of hub {self.hub_id!r}: {e}") from None
            if why is not None:
                if loop.time() > deadline:
                    raise JetStreamError(
                        f"the NATS cluster at {', '.join(s.servers)} did not answer for the KV bucket "
                        f"{self._kv_leases!r} within [journal] start_timeout = {s.start_timeout:g} s ({why}); start "
                        "every JetStream node of the cluster and check that they route to each other, or raise "
                        "start_timeout")
                await asyncio.sleep(0.2)  # pacing: the bucket's leader election takes a few seconds
                continue
            if (last.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                fut = await self._replies.send(subject, self._presence_value,
                                               {"Nats-Expected-Last-Subject-Sequence": str(last.seq)})
                doc = await self._answer(fut)
                if "error" not in doc:
                    self._presence_rev = int(doc["seq"])
                    return
                continue
            try:
                other = json.loads(last.data)
                holder = f" (pid {other.get('pid')} on {other.get('host')}, work {other.get('work')})"
            except (ValueError, AttributeError):
                holder = ""
            if seen is not None and int(last.seq) != seen:
                break  # renewed while we watched: a live hub
            seen = int(last.seq)
            if loop.time() > taken_until:
                break
            await asyncio.sleep(min(0.2, s.lease_ttl / 10))  # pacing: waiting for a crashed hub's key
        raise JetStreamError(f"[hub] id {self.hub_id!r} is already used by a running hub{holder}; give each hub "
                             "its own [hub] id (or stop the other one)")

    @staticmethod
    def _undecided(doc: dict[str, Any]) -> bool:
        """A conditional write's answer that decides nothing: no answer (408), no stream leader (503), or a write
        of the same key still in flight on the leader (SUBJECT_IN_FLIGHT). Not a refusal by revision, and not an
        answer from a cluster that can commit: a leader left alone by a lost quorum refuses each renewal so while
        the first one waits for a quorum that is not coming."""
        err = doc.get("error")
        return err is not None and (err.get("code") in (408, 503) or err.get("err_code") == SUBJECT_IN_FLIGHT)

    async def _renew_presence(self) -> None:
        """Part of each lease round. A refused renewal means the key changed: this hub was frozen past
        `lease_ttl` and it expired (take it again), or a hub with the same id took it meanwhile (dispatch
        nothing while that one runs). An undecided one (`_undecided`) is neither, and no answer either."""
        subject = f"$KV.{self._kv_leases}.{self._presence_key}"
        fut = await self._replies.send(subject, self._presence_value,
                                       {"Nats-Expected-Last-Subject-Sequence": str(self._presence_rev)})
        doc = await self._answer(fut)
        if "error" in doc and not self._undecided(doc):
            fut = await self._replies.send(subject, self._presence_value, {"Nats-Expected-Last-Subject-Sequence": "0"})
            doc = await self._answer(fut)
        if self._undecided(doc):
            return
        self._answered_at = time.monotonic()
        if "error" not in doc:
            if self._id_clash:
                log.info("no other hub uses this [hub] id any more; dispatching again", extra={"hub": self.hub_id})
            self._presence_rev, self._id_clash = int(doc["seq"]), False
        else:
            if not self._id_clash:
                log.error("another running hub uses this [hub] id; this hub dispatches nothing until it is gone "
                          "(give each hub its own [hub] id)", extra={"hub": self.hub_id})
            self._id_clash = True

    def cluster_problem(self, now: float) -> str | None:
        """Why the cluster cannot serve this hub now (None: the lease bucket answered a round within `lease_ttl`).

        Each lease round renews this hub's presence key, every third of `lease_ttl`; when no renewal has been
        answered for longer than `lease_ttl`, every lease has lapsed and no hub can dispatch, take a group, move
        a cursor or commit (a quorum of the nodes is down or cut off). The connection alone does not show it: the
        node this hub talks to may be up and alone. Operator commands that need a dispatcher say this instead
        of waiting for one."""
        at = self._answered_at
        if at is None or now - at <= self.settings.lease_ttl:
            return None
        return (f"the NATS cluster has not answered this hub for {now - at:.0f} s (servers "
                f"{', '.join(self.settings.servers)}; a quorum of its nodes is down or cut off)")

    # -- dispatch leadership -------------------------------------------------------------------------------
    def lead(self, groups: Iterable[str], now: float, wait: bool = True) -> set[str]:
        """The groups this hub may dispatch right now; takes free leases and renews held ones every third of
        `lease_ttl`. `wait=False` (the hub's loop) runs the round on the client's thread and answers from the
        rounds that came back: a round asks the lease bucket's stream leader, and while that does not answer
        (frozen, or dead and no new leader yet) a round on the loop held every topic for a quarter of
        request_timeout per group (up to lease_ttl / 2), every third of lease_ttl. The loop is woken when a
        round ends.

        A lease is a KV entry that expires `lease_ttl` after its last write. It is taken with "create" (refused
        while another hub's entry lives) and renewed with an update that names the revision this hub last wrote,
        so two hubs can never both renew it. A hub counts a lease as held only until `lease_ttl` minus a margin
        after it *sent* its last successful renewal: it stops dispatching before the entry can expire and a
        standby can take it, even when it cannot reach the cluster to hear that it lost.
        """
        wanted = list(groups)
        if now >= self._next_lease_round and self._leasing is None:
            self._next_lease_round = now + self.settings.lease_ttl / 3
            if wait:
                try:
                    self._run(self._lease_round(wanted, now), self.settings.lease_ttl / 2)
                except JetStreamError as e:
                    log.warning("cannot renew dispatch leases", extra={"error": str(e)})
            else:
                self._loop.call_soon_threadsafe(self._start_lease_round, wanted, now)
        if self._id_clash:
            return set()
        # Read while a round on the client's thread may change `_leases`: one lookup per group, each atomic.
        return {g for g in wanted if self.holds(g, now)}

    def _start_lease_round(self, groups: list[str], sent: float) -> None:
        """On the client's thread: one lease round, bounded like `lead`'s own; see `lead`. `sent` is the loop's
        time before the round was asked for: a lease counts from no later than its renewal was sent."""
        async def round_() -> None:
            try:
                await asyncio.wait_for(self._lease_round(groups, sent), self.settings.lease_ttl / 2)
            except Exception as e:  # noqa: BLE001 - the next round tries again; the leases expire by the clock
                log.warning("cannot renew dispatch leases", extra={"error": f"{type(e).__name__}: {e}".rstrip(": ")})
            finally:
                self._leasing = None
                if self._wake is not None:
                    self._wake()

        task = asyncio.get_running_loop().create_task(round_())
        self._leasing = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lease_round(self, groups: list[str], sent: float) -> None:
        presence = asyncio.ensure_future(self._renew_presence())  # alongside the leases: one round trip for all
        if self._id_clash:
            await presence
            return
        futs = []
        for g in groups:
            rev = self._leases.get(g, (0, 0.0))[0]
            futs.append((g, rev, await self._replies.send(f"$KV.{self._kv_leases}.g.{token(g)}", self._lease_value,
                                                          {"Nats-Expected-Last-Subject-Sequence": str(rev)})))
        await self.nc.flush()
        for g, rev, fut in futs:
            doc = await self._answer(fut)
            if "error" not in doc:
                if not rev:
                    log.info("took the dispatch lease", extra={"group": g, "hub": self.hub_id})
                self._leases[g] = (int(doc["seq"]), sent + self.settings.lease_ttl)
                self._leased.add(g)
            elif self._undecided(doc):
                # No answer (unknown whether it landed), no stream leader (a NATS node went and the lease bucket is
                # electing one) or an earlier renewal still in flight (a leader without its quorum): not a
                # refusal. The lease counts as held until it would expire, no longer, and the next round renews
                # it with the same revision once a leader answers.
                pass
            elif rev:
                if not await self._renew_own(g, sent):
                    log.warning("lost the dispatch lease to another hub", extra={"group": g, "hub": self.hub_id})
                    self._leases.pop(g, None)
            else:
                await self._take_released(g, sent)
        await presence

    async def _renew_own(self, g: str, sent: float) -> bool:
        """A renewal refused because the entry moved past the revision this hub knows: when what moved it is this
        hub's own lease value, it is an earlier renewal that landed but whose answer was lost (the bucket's leader
        died right after storing it), and the lease never left this hub; renew over it. Taken for a loss, the
        group went undispatched until this hub's own entry expired, then all it had in flight went again.
        Another hub's value, a delete or purge marker, or no answer: a loss, as before."""
        subject = f"$KV.{self._kv_leases}.g.{token(g)}"
        try:
            last = await self.js.get_last_msg(f"KV_{self._kv_leases}", subject)
        except Exception:  # noqa: BLE001 - cannot tell: counted as lost, the safe side
            return False
        if (last.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or bytes(last.data or b"") != self._lease_value:
            return False
        fut = await self._replies.send(subject, self._lease_value,
                                       {"Nats-Expected-Last-Subject-Sequence": str(last.seq)})
        doc = await self._answer(fut)
        if "error" in doc:
            return False
        self._leases[g] = (int(doc["seq"]), sent + self.settings.lease_ttl)  # stored after `sent`: counts from it
        log.info("renewed the dispatch lease over a renewal whose answer was lost", extra={"group": g,
                                                                                         "hub": self.hub_id})
        return True

    async def _take_released(self, g: str, sent: float) -> None:
        """A lease given back with `release` leaves a delete marker, not an empty key: take it over the marker."""
        subject = f"$KV.{self._kv_leases}.g.{token(g)}"
        try:
            last = await self.js.get_last_msg(f"KV_{self._kv_leases}", subject)
        except Exception:  # expired in the meantime: the next round's create takes it
            return
        op = (last.headers or {}).get("KV-Operation")
        if op not in ("DEL", "PURGE"):
            return  # a live lease of another hub
        if op == "PURGE" and self._removal_seen.get(g) != last.seq:
            # Removed with `group rm` on its dispatcher. This hub may want it only because a worker knocked here
            # before the removal: taking it would bring the group back. The hub drops that want (removed_groups);
            # a worker that READYs after that wants a new group of that name, and the next round takes it.
            self._removal_seen[g] = last.seq
            with self._removals_lock:
                self._removals.add(g)
            log.info("not taking the lease of a removed group", extra={"group": g, "hub": self.hub_id})
            return
        fut = await self._replies.send(subject, self._lease_value,
                                       {"Nats-Expected-Last-Subject-Sequence": str(last.seq)})
        doc = await self._answer(fut)
        if "error" not in doc:
            log.info("took the dispatch lease", extra={"group": g, "hub": self.hub_id})
            self._leases[g] = (int(doc["seq"]), sent + self.settings.lease_ttl)
            self._leased.add(g)

    def release(self, groups: Iterable[str], removed: bool = False) -> None:
        """Give leases back at a clean stop, so a standby takes over at once instead of after `lease_ttl`.
        `removed`: the groups were removed (`group rm`), so no other hub takes them for what it wanted before."""
        async def drop() -> None:
            if self._leasing is not None:  # a round under way would renew what is given back: it ends first
                await asyncio.wait([self._leasing], timeout=self.settings.lease_ttl / 2)
            kv = await self.js.key_value(self._kv_leases)
            for g in list(groups):
                if removed and g in self._leases:
                    try:
                        ack = await self.js.publish(
                            f"$KV.{self._kv_leases}.g.{token(g)}", b"",
                            headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub",
                                     "Nats-Expected-Last-Subject-Sequence": str(self._leases[g][0])})
                        self._removal_seen[g] = ack.seq  # its own marker: a later READY here wants a new group
                    except Exception as e:  # taken or expired meanwhile: the next dispatcher has it
                        log.warning("could not mark the removed group's lease", extra={"group": g, "error": str(e)})
                    self._leases.pop(g, None)
                elif g in self._leases:
                    try:
                        await kv.delete(f"g.{token(g)}", last=self._leases[g][0])
                    except Exception as e:  # already taken or expired: nothing to give back
                        log.debug("lease release failed", extra={"group": g, "error": str(e)})
                    self._leases.pop(g, None)

        try:
            self._run(drop(), 5)
        except JetStreamError as e:
            log.debug("lease release failed", extra={"error": str(e)})

    def removed_groups(self) -> set[str]:
        """The groups whose lease a round found removed by `group rm` since the last call: the hub stops wanting
        them (unless its config defines them)."""
        with self._removals_lock:
            out, self._removals = self._removals, set()
        return out

    def leaders(self) -> dict[str, str]:
        """Which hub holds each group's lease now (for status and doctor)."""
        return {g: v[0] for g, v in self.lease_holders().items()}

    def lease_holders(self) -> dict[str, tuple[str, str]]:
        """group -> (hub id, its advertised work endpoint) of every live lease, read now (the caller waits up to
        request_timeout: the hub's loop uses `read_lease_holders` instead)."""
        return self._run(self._read_holders())

    async def _read_holders(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for k, (value, _) in (await self._latest(self._kv_leases, "g.>")).items():
            try:
                doc = json.loads(value)
                out[untoken(k[2:])] = (str(doc["hub"]), str(doc.get("work", "")))
            except (ValueError, KeyError, TypeError):  # a bare hub name
                out[untoken(k[2:])] = (value.decode(errors="replace"), "")
        return out

    def read_lease_holders(self) -> None:
        """Start reading who holds each lease on the client's thread, unless a reading is under way; its answer
        is `lease_holders_seen`'s.

        The hub's loop asks for it for `status` and to send a worker to the dispatching hub. The reading is a
        request to the lease bucket's stream leader: while it does not answer (frozen, or dead and a new leader
        not yet elected) a reading on the loop held every topic's publishes and acks for up to request_timeout
        each time."""
        if not self._reading_holders:
            self._reading_holders = True
            self._loop.call_soon_threadsafe(lambda: self._spawn(self._refresh_holders()))

    async def _refresh_holders(self) -> None:
        try:
            self._holders = await self._read_holders()
            self._holders_at = time.monotonic()
        except Exception as e:  # noqa: BLE001 - the bucket does not answer now: the next reading asks again
            log.debug("cannot read dispatch leases", extra={"error": str(e)})
        finally:
            self._reading_holders = False

    def lease_holders_seen(self) -> tuple[dict[str, tuple[str, str]], float | None]:
        """(group -> (hub id, endpoint) as of the last reading that answered, when it answered (monotonic; None:
        none has yet)): what `read_lease_holders` last learnt, never waited for."""
        return self._holders, self._holders_at

    # -- revoked client keys ---------------------------------------------------------------------------------
    async def _read_revoked_keys(self) -> frozenset[bytes]:
        keys = (key_of_hex(k) for k in await self._latest(revoked_bucket(self.settings).bucket))
        return frozenset(k for k in keys if k is not None)  # None: a key `keys revoke` did not write

    def read_revoked(self, done: Callable[[], None]) -> None:
        """Start reading the cluster's revocation list on the client's thread, unless a reading is under way;
        `done` is called (from that thread) when it has ended. Never on the hub's loop: the bucket's leader may
        be gone for seconds, and the loop would hold every publish and ack that long."""
        if not self._reading_revoked:
            self._reading_revoked = True
            self._loop.call_soon_threadsafe(lambda: self._spawn(self._refresh_revoked(done)))

    async def _refresh_revoked(self, done: Callable[[], None]) -> None:
        try:
            self._revoked = await self._read_revoked_keys()
            if self._revoked_error is not None:
                log.info("the revocation list is readable again", extra={"revoked": len(self._revoked)})
            self._revoked_error = None
        except Exception as e:  # noqa: BLE001 - the list read last stays in force; the next reading asks again
            why = f"cannot read the revocation list from the NATS cluster ({str(e) or type(e).__name__})"
            if self._revoked_error is None:
                log.warning("cannot read the revocation list; keeping the last one read (revoked keys stay "
                            "refused, keys revoked since are not seen yet)", extra={"error": why})
            self._revoked_error = why
        finally:
            self._reading_revoked = False
            done()

    def revoked_seen(self) -> RevokedView:
        """The keys of the last reading that answered, and why readings fail since (None: they do not)."""
        return RevokedView(self._revoked, self._revoked_error)

    # -- what other hubs commit ------------------------------------------------------------------------------
    def _notice_subject(self, topic: str) -> str:
        return f"{self.prefix}.fed.{token(topic)}"

    def follow(self, wake: Callable[[], None]) -> None:
        """Start receiving events that other hubs commit (every topic stream, new ones too); `wake` is called
        from the client's thread whenever some are waiting in `take_remote`.

        Not a consumer on each stream: that would hand this hub every event it committed itself, one message
        each to parse and drop, on the commit's critical path (a third of the hub's CPU per event in `bench
        bus`). Instead a hub that commits sends one small notice per topic per commit ("head is now N"), and
        a hub that hears of a head beyond what it has seen reads the missing range from the stream (batched
        direct gets) and keeps the events other hubs committed, in order. The notice is only a hint: a hub
        that died between its PubAck and its notice, or a notice lost in a reconnect, is caught up by a poll
        of the streams' heads every `FEED_POLL` seconds, and a gap in this hub's own PubAcks (another hub
        appended in between) is caught up at once."""
        self._wake = wake
        self._run(self._follow_all())

    async def _follow_all(self) -> None:
        await self.nc.subscribe("$JS.EVENT.ADVISORY.STREAM.CREATED.*", cb=self._on_created)
        await self.nc.subscribe(f"{self.prefix}.fed.*", cb=self._on_notice)
        heads = await self._stream_heads()
        try:  # once before the loop starts, so its first `status` names the dispatchers; never holds the start
            await asyncio.wait_for(self._refresh_holders(), self.settings.request_timeout / 4)
        except TimeoutError:
            log.debug("cannot read dispatch leases yet")
        self._following = True
        for topic, last in heads.items():
            self._streams.add(topic)
            self._track(topic, self.heads.get(topic, 0), last)  # from here on; what came before is history
        self._spawn(self._poll())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stream_heads(self) -> dict[str, int]:
        want = f"{self.prefix}_ev_"
        return {untoken(info.config.name[len(want):]): int(info.state.last_seq)
                async for info in self._stream_infos() if info.config.name.startswith(want)}

    def _track(self, topic: str, start: int, head: int) -> None:
        """Follow `topic` from after `start` (kept if already followed), catching up if `head` is beyond."""
        if not self._following:
            return
        fed = self._fed.setdefault(topic, start)
        if head > fed:
            self._catch(topic)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(FEED_POLL)
            try:
                heads = await self._stream_heads()
            except Exception as e:  # the cluster is unreachable this moment: the next round asks again
                log.debug("cannot poll the topic streams' heads", extra={"error": str(e)})
                continue
            for topic, last in heads.items():
                self._streams.add(topic)
                self._track(topic, 0, last)  # a stream this hub has not seen yet: every event in it is new

    async def _on_created(self, m: Any) -> None:
        name = m.subject.rsplit(".", 1)[1]
        if not name.startswith(f"{self.prefix}_ev_"):
            return
        topic = untoken(name[len(f"{self.prefix}_ev_"):])
        self._streams.add(topic)
        self._track(topic, 0, 0)

    async def _on_notice(self, m: Any) -> None:
        try:
            seq, hub = m.data.decode().split(" ", 1)
            head = int(seq)
            topic = untoken(m.subject.rsplit(".", 1)[1])
        except ValueError:  # not a notice of ours (UnicodeDecodeError and binascii.Error are ValueErrors)
            return
        if hub != self.hub_id:
            self._track(topic, 0, head)  # the topic counts as existing once its events are read (_catch_up)

    async def _notify(self, topic: str, head: int) -> None:
        """Tell the other hubs that `topic` holds events up to `head` (see `follow`); best effort."""
        try:
            await self.nc.publish(self._notice_subject(topic), f"{head} {self.hub_id}".encode())
        except Exception as e:  # a reconnect in progress: the other hubs' polls find the events
            log.debug("cannot send the head notice", extra={"topic": topic, "error": str(e)})

    def _own(self, topic: str, seq: int, duplicate: bool) -> None:
        """This hub's PubAck named `seq`: the feed moves past an event this hub stored right after the last one
        it has seen, and catches up on anything else (what other hubs stored in between, or the original of a
        duplicate, which may be another hub's)."""
        fed = self._fed.get(topic)
        if fed is None or seq <= fed:
            return
        if seq == fed + 1 and not duplicate:
            self._fed[topic] = seq
        else:
            self._catch(topic)

    def _catch(self, topic: str) -> None:
        if topic in self._catching:
            self._again.add(topic)  # the running catch-up reads on to the new head
        else:
            self._catching.add(topic)
            self._spawn(self._catch_up(topic))

    async def _catch_up(self, topic: str) -> None:
        """Read `topic` from after the last seq this hub has seen up to the stream's head; keep what other hubs
        committed, in seq order. One at a time per topic, so `_remote` stays in order."""
        try:
            while True:
                self._again.discard(topic)
                rows = await self._read_from(topic, self._fed[topic] + 1, READ_BATCH)
                if rows:
                    self._streams.add(topic)
                fed = self._fed[topic]
                woke = False
                for seq, hub, objkey, body in rows:
                    if seq <= fed:
                        continue
                    fed = seq
                    if hub != self.hub_id:  # this hub's own commits it fanned out already
                        self._remote.append(Appended(topic, seq, body, objkey))
                        woke = True
                self._fed[topic] = fed
                if woke and self._wake is not None:
                    self._wake()
                if len(rows) < READ_BATCH and topic not in self._again:
                    return
        except Exception as e:  # unreachable or failing over: the next notice, own gap or poll tries again
            log.debug("cannot read what other hubs committed", extra={"topic": topic, "error": str(e)})
        finally:
            self._catching.discard(topic)

    def take_remote(self) -> list[Appended]:
        """Events other hubs committed since the last call, each topic in seq order; moves `heads`."""
        out: list[Appended] = []
        while self._remote:
            a = self._remote.popleft()
            out.append(a)
            if a.seq > self.heads.get(a.topic, 0):
                self.heads[a.topic] = a.seq
        return out

    restored: dict[str, object] | None = None  # a stream is not restored from a file behind the hub's back

    def lost_to_restore(self, topic: str, first: int, count: int) -> int:
        return 0

    def close(self) -> None:
        if self.nc is not None:
            async def shut() -> None:
                if self._presence_rev:  # a clean stop frees the id at once; a crash leaves it for lease_ttl
                    try:
                        kv = await self.js.key_value(self._kv_leases)
                        await kv.delete(self._presence_key, last=self._presence_rev)
                    except Exception as e:  # taken over or expired: nothing to give back
                        log.debug("presence release failed", extra={"error": str(e)})
                self._following = False
                tasks = [*self._tasks, *self._creating.values()]
                for task in tasks:  # the poll, catch-ups and stream creations stop before the loop goes
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.nc.close()

            try:
                self._run(shut(), 5)
            except Exception as e:  # closing must not raise over whatever made us close
                log.debug("closing the NATS connection failed", extra={"error": str(e)})
            self.nc = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()
