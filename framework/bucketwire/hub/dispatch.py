"""Consumer-group state: who holds which event, what is ready, what waits, and the durable cursor.

Pure bookkeeping with no sockets, so the delivery rules can be tested directly:

* every group sees every event of its topics; within a group an event is in flight at one worker at a time;
* events for the same `bucket/key` are never in flight twice in a group: a later event for an object waits
  (in `blocked`) until the earlier one is acked or dead-lettered, retries included, so per-object order holds;
* the durable cursor is the contiguous watermark of acked seqs; acks above a gap wait in memory;
* memory is bounded: at most `max_buffer` events and `max_buffer_bytes` of envelopes per group are loaded (one
  event alone may be larger, so none stalls its group); the rest stay in the journal.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import msgspec

from bucketwire.config import TopicConfig
from bucketwire.envelope import HUB_SOURCE

Key = tuple[str, int]

TARGET_MARK = b'"targetgroup"'
_NONE_ABOVE: frozenset[int] = frozenset()
DEFAULT_BUFFER_BYTES = 128 << 20
FIRST_READ_GUESS = 1 << 20
"""How large a refill assumes events are before it has read any: its first read takes no more rows than would fit
the byte budget at this size (about `max_event_bytes`), so a backlog of large events is not read 1,000 at once."""
MAX_RETRY_DELAY = 86_400.0
"""The longest `Retry(delay=...)` honoured: a day. Retries wait in the hub's memory (with jetstream the time
each is due is also kept in the KV bucket, so the next dispatcher waits it out too)."""


def not_for_group(body: bytes, group: str) -> bool:
    """True when the envelope is a retried dead letter meant for another group (`targetgroup` extension).

    `bucketwire dlq retry` re-publishes the original event on its topic, where every group of the topic sees it;
    only the group that failed it should handle it again, the others skip it like an acked event. The cheap byte
    search keeps ordinary events from being parsed.
    """
    if TARGET_MARK not in body:
        return False
    try:
        doc = json.loads(body)
        tg, source = doc.get("targetgroup"), doc.get("source")
    except (ValueError, AttributeError):
        return False
    # Only the hub's own retries steer delivery: an envelope from anywhere else that carries the extension (an old
    # journal entry from before ingress refused it) is delivered to every group like any other event.
    return isinstance(tg, str) and tg != group and isinstance(source, str) and source.startswith(HUB_SOURCE)


class Item(msgspec.Struct):
    """A loaded event of a group (one per event on the hub's path: a msgspec Struct, see `journal.NewEvent`)."""

    topic: str
    seq: int
    objkey: str | None
    body: bytes
    attempts: int = 0
    error: str | None = None
    first_dispatch: float = 0.0
    batch: int = 0  # which DELIVER to its worker carried it (WorkerState.batches then): a refused one is charged

    @property
    def key(self) -> Key:
        return (self.topic, self.seq)


@dataclass(slots=True)
class WorkerState:
    ident: bytes
    group: str
    topics: frozenset[str]
    credit: int
    last_seen: float
    last_sent: float = 0.0
    host: str = ""
    pid: int = 0
    user: str | None = None  # the CURVE key that admitted it; only that key may report its death (GONE)
    ranges: bool = False  # its READY said proto >= 2: it reads DELIVER's "r" and may ack in ranges
    joined: bool = False  # its READY said proto >= 3: it reads a DELIVER's envelopes as one frame ("j")
    reachable: bool = True  # False after a DELIVER could not be sent, until it is heard from again
    running: tuple[Key, float, float] | None = None  # from its heartbeat: (event, started, handler_timeout)
    # Insertion order is delivery order, which is the order its child works in: the first key is the event
    # it is running (or has just finished and not yet acked).
    inflight: dict[Key, Item] = field(default_factory=dict)
    served: bool = False  # it has been handed events: an idle one that has is warm (`GroupState._dispatch_order`)
    plugins: tuple[str, ...] | None = None  # what its READY said it runs (None: an older worker, not compared)
    setup: str = ""  # digest of those plugins' settings
    # Known only from its supervisor's report (RUNNING) of an event a dispatcher before this one handed it and
    # its handler still runs: it holds that event and gets nothing (credit 0) until it joins (READY) itself, and
    # is given up by `pinned_until` whatever it reports (its handler_timeout and heartbeat_timeout, from the
    # first report this hub had).
    reported: bool = False
    pinned_until: float = 0.0
    batches: int = 0  # DELIVERs sent to it: numbers its events' batches (`Item.batch`)
    handed_at: float = 0.0  # when its last DELIVER was sent (monotonic)
    quick: bool = False  # its last batch was acked within HAND_OFF_QUICK of its DELIVER (hub/loop.py)
    # It sent an outcome for an event it held: it works through what it is handed, so when it vanishes the oldest
    # event it holds is the likely culprit. One that never did (a flapping worker, a peer that takes batches and
    # goes silent) is charged nothing for what it held (`GroupState.worker_gone`).
    ran: bool = False

    @property
    def free(self) -> int:
        return self.credit - len(self.inflight) if self.reachable else 0


@dataclass(slots=True)
class DeadLetter:
    item: Item
    group: str
    error: str
    line: str
    plugin: str | None


def encode_ranges(seqs: set[int]) -> str:
    """{3, 4, 5, 9} -> "3-5,9": the acked-above-the-watermark set, compact because gaps are few."""
    out: list[str] = []
    it = iter(sorted(seqs))
    for first in it:
        last = first
        for s in it:
            if s == last + 1:
                last = s
                continue
            out.append(f"{first}-{last}" if last > first else str(first))
            first = last = s
        out.append(f"{first}-{last}" if last > first else str(first))
    return ",".join(out)


DEPARTED_MAX = 100_000
"""At most this many events of given-up workers wait for a late ACK at once (each is an event already loaded)."""


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Ascending seqs as runs of consecutive ones: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def decode_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


class GroupState:
    def __init__(
        self,
        name: str,
        topics: list[str],
        cursors: dict[str, int],
        topic_cfg: Callable[[str], TopicConfig],
        *,
        max_buffer: int = 10_000,
        max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        above: dict[str, set[int]] | None = None,
        on_retention_skip: Callable[[str, str, int, int], int] | None = None,
    ) -> None:
        """`on_retention_skip(group, topic, first seq, count)`: events this group had not consumed were gone from
        the journal (retention dropped them, or a restore of an older backup lost them) when it came to read them;
        it goes on past them. Said to the operator (log, metric) by whoever is given it, which returns how many of
        them the restore lost: counted here alone, nobody saw it."""
        self.name = name
        self.on_retention_skip = on_retention_skip
        self.topics: list[str] = list(dict.fromkeys(topics))
        self.topic_cfg = topic_cfg
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self.acked: dict[str, int] = dict(cursors)
        self.acked_above: dict[str, set[int]] = {t: set((above or {}).get(t, ())) for t in self.topics}
        self.read_pos: dict[str, int] = {t: cursors[t] + 1 for t in self.topics}
        self.ready: deque[Item] = deque()
        self.blocked: dict[str, deque[Item]] = {}
        self.holder: dict[str, Key] = {}
        self.inflight: dict[Key, tuple[Item, bytes]] = {}
        # Events a worker held when the hub gave it up (heartbeat timeout, its death notice), until when its late
        # ACK still counts for them (see `worker_gone`): key -> (item, that worker, until, monotonic).
        self.departed: dict[Key, tuple[Item, bytes, float]] = {}
        self.retry: list[tuple[float, int, Item]] = []
        self.workers: OrderedDict[bytes, WorkerState] = OrderedDict()
        self.loaded = 0
        self.loaded_bytes = 0  # the bodies of the `loaded` events, together
        # The smallest event a load stopped at because it did not fit the byte budget (0: none did). Until acks make
        # room for it, `wants_refill` says no: else every loop turn would read rows from the journal to drop them.
        self.short = 0
        self.row_guess = FIRST_READ_GUESS  # mean body of the last refill read: sizes the next one
        self.dirty: set[str] = set()
        self.delta = [0, 0, 0]  # dead_lettered, retried, redelivered since the last commit
        # Attempt counts kept in the journal, so a restart or a failover does not restart max_attempts:
        # `charged` is what the next commit writes (0: delete), `stored` what the journal holds, `seed` what a
        # new dispatcher loaded and gives to each event as it is loaded.
        self.charged: dict[Key, int] = {}
        self.stored: set[Key] = set()
        self.seed: dict[Key, int] = {}
        # ... and when each charged retry is due (monotonic): `due` goes with `charged`, `seed_due` with `seed`.
        self.due: dict[Key, tuple[float, float]] = {}
        """key -> (when, how long it was scheduled to wait): both are stored (hub/journal.py, `retry_waits`)."""
        self.seed_due: dict[Key, float] = {}
        self.totals = [0, 0, 0]
        self.skipped_by_retention = 0
        self.skipped_by_topic: dict[str, int] = {}  # since this dispatcher started (status)
        self.skipped_by_restore = 0  # seqs a journal restored from an older backup lost (status)
        self.restore_by_topic: dict[str, int] = {}
        self.setups_told: set[frozenset[tuple[tuple[str, ...], str]]] = set()  # plugin-set pairs logged once
        self._tie = itertools.count()
        self.replays: dict[str, int] = {}  # topic -> from_seq, waiting for that topic's in-flight events to finish
        # Until then nothing is handed out: a hub that has just started, or taken the group over, with events not
        # acked waits for the previous dispatcher's workers to report what they still run (`pin`).
        self.settle_until = 0.0

    def plugin_sets(self) -> dict[tuple[tuple[str, ...], str], list[WorkerState]]:
        """The group's workers by the plugins they run (and those plugins' settings digest). More than one key:
        its pools differ, and each event reaches only the set of the worker it is handed to."""
        sets: dict[tuple[tuple[str, ...], str], list[WorkerState]] = {}
        for w in self.workers.values():
            if w.plugins is not None:
                sets.setdefault((w.plugins, w.setup), []).append(w)
        return sets

    # -- membership ------------------------------------------------------------------------------------------
    def add_topic(self, topic: str, start_after: int) -> None:
        if topic in self.read_pos:
            return
        self.topics.append(topic)
        self.acked[topic] = start_after
        self.acked_above[topic] = set()
        self.read_pos[topic] = start_after + 1
        self.dirty.add(topic)
        self.short = 0  # its events may fit where another topic's did not

    # -- loading ---------------------------------------------------------------------------------------------
    def is_done(self, topic: str, seq: int) -> bool:
        return seq <= self.acked.get(topic, 0) or seq in self.acked_above.get(topic, ())

    def offer(self, topic: str, first_seq: int, items: list[tuple[int, str | None, bytes]],
              steerable: bool = True) -> None:
        """Take freshly committed events straight from the commit, when this group is caught up on `topic`.

        `steerable` False: the caller knows none of them is a `dlq retry` meant for one group (the commit holds no
        event the hub made itself, `Hub._staged`), so no body is searched for the mark (a byte search of the whole
        envelope, ~0.35 us each).

        Events past the byte budget are left in the journal, where a later `refill` reads them, like a commit past
        the count is; the count is checked for the whole run, the bytes per event (an add and a compare)."""
        if (self.read_pos.get(topic) != first_seq or self.loaded + len(items) > self.max_buffer
                or topic in self.replays):
            return
        seed, ready, name = self.seed, self.ready, self.name
        size, cap = self.loaded_bytes, self.max_buffer_bytes
        for seq, objkey, body in items:
            if steerable and TARGET_MARK in body and not_for_group(body, name):  # the byte test inline
                self._mark_acked(topic, seq)
                continue
            size += len(body)
            if size > cap and self.loaded:
                self._stop_at(len(body))
                size -= len(body)
                self.read_pos[topic] = seq
                break
            it = Item(topic, seq, objkey, body, seed.pop((topic, seq), 0) if seed else 0)
            if not self.seed_due or not self._wait_out(it):
                ready.append(it)
            self.loaded += 1
        else:
            self.read_pos[topic] = items[-1][0] + 1
        self.loaded_bytes = size

    def _stop_at(self, size: int) -> None:
        self.short = min(self.short, size) if self.short else size

    def wants_refill(self, heads: dict[str, int]) -> bool:
        if self.loaded >= self.max_buffer:
            return False
        if self.short and self.loaded and self.loaded_bytes + self.short > self.max_buffer_bytes:
            return False
        return any(self.read_pos[t] <= heads.get(t, 0) and t not in self.replays for t in self.topics)

    def refill(self, heads: dict[str, int], read: Callable[[str, int, int], list[tuple[int, str | None, bytes]]],
               first_seq: Callable[[str], int | None]) -> None:
        cap = self.max_buffer_bytes
        self.short = 0
        for t in self.topics:
            if t in self.replays:
                continue
            head = heads.get(t, 0)
            full = False
            while not full and self.loaded < self.max_buffer and self.read_pos[t] <= head:
                room = cap - self.loaded_bytes
                if room <= 0 and self.loaded:
                    self._stop_at(1)
                    break
                # Rows past the budget are read only to be left: read about as many as fit, by the last read's mean.
                want = min(1000, self.max_buffer - self.loaded, max(1, room // self.row_guess))
                rows = read(t, self.read_pos[t], want)
                if rows:
                    self.row_guess = max(1, sum(len(r[2]) for r in rows) // len(rows))
                if not rows or rows[0][0] > self.read_pos[t]:
                    # Retention removed events this group had not consumed yet: skip past them, loudly.
                    first = rows[0][0] if rows else (first_seq(t) or head + 1)
                    if first <= self.read_pos[t]:
                        # Nothing from read_pos on, yet rows below it: the head is ahead of what the journal can
                        # serve yet (a commit not written, a backend behind its head notice), nothing was dropped.
                        # Taking the first seq for a gap went back to it and loaded every event again.
                        break
                    lost = first - self.read_pos[t]
                    if lost > 0:
                        gone = (self.on_retention_skip(self.name, t, self.read_pos[t], lost)
                                if self.on_retention_skip is not None else 0)
                        self.skipped_by_retention += lost - gone
                        if lost > gone:
                            self.skipped_by_topic[t] = self.skipped_by_topic.get(t, 0) + lost - gone
                        if gone:
                            self.skipped_by_restore += gone
                            self.restore_by_topic[t] = self.restore_by_topic.get(t, 0) + gone
                    for s in range(self.read_pos[t], first):
                        self._mark_acked(t, s)
                    self.read_pos[t] = first
                    if not rows:
                        continue
                for seq, objkey, body in rows:
                    if not_for_group(body, self.name):
                        self._mark_acked(t, seq)
                    elif not self.is_done(t, seq):
                        if self.loaded and self.loaded_bytes + len(body) > cap:
                            self._stop_at(len(body))
                            self.read_pos[t] = seq  # it waits in the journal for room
                            full = True
                            break
                        it = Item(t, seq, objkey, body, self.seed.pop((t, seq), 0))
                        if not self.seed_due or not self._wait_out(it):
                            self.ready.append(it)
                        self.loaded += 1
                        self.loaded_bytes += len(body)
                else:
                    self.read_pos[t] = rows[-1][0] + 1

    def _wait_out(self, it: Item) -> bool:
        """A loaded event whose retry the previous dispatcher had scheduled waits for it here too (True), holding
        its object so nothing later for it overtakes; False when none was scheduled."""
        due = self.seed_due.pop(it.key, None)
        if due is None:
            return False
        if it.objkey is not None:
            self.holder.setdefault(it.objkey, it.key)
        heapq.heappush(self.retry, (due, next(self._tie), it))
        return True

    # -- dispatch --------------------------------------------------------------------------------------------
    def _dispatch_order(self) -> list[WorkerState]:
        """Idle workers first, the one used last first among them (then those never used); then the busy ones
        with credit, least recently used first (`workers` is kept in order of use).

        An idle worker before a busy one: an event never waits behind a long handler while another worker has
        nothing to do. The warm one first among the idle: at a modest rate one worker takes event after event
        and the others sleep. A process woken every millisecond runs its Python about three times faster than one
        woken every two (cold caches after an idle CPU), which at 1,000 events/s was the difference between
        taking turns and not. Under load no worker is idle and the order is least recently used, as before."""
        free = [w for w in self.workers.values() if w.free > 0]
        if len(free) < 2:
            return free
        warm = [w for w in reversed(free) if not w.inflight and w.served]
        return (warm + [w for w in free if not w.inflight and not w.served]  # never used: in the order they joined
                + [w for w in free if w.inflight])

    def dispatch(self, batch_max: int, now: float) -> list[tuple[WorkerState, list[Item]]]:
        """Hand ready events to workers with credit, in `_dispatch_order`, up to `batch_max` each."""
        out: list[tuple[WorkerState, list[Item]]] = []
        if not self.ready:
            return out
        # The per-event loop reads the group's tables through locals and builds each event's key once.
        ready, holder, inflight, replays = self.ready, self.holder, self.inflight, self.replays
        acked, acked_above = self.acked, self.acked_above
        for w in self._dispatch_order():
            take: list[Item] = []
            n = min(w.free, batch_max)
            passed: list[Item] = []
            topics, held, ident = w.topics, w.inflight, w.ident
            # What an event's topic decides (its watermark, its acked-above set, a pending replay, whether this
            # worker takes it), read once per run of one topic: nothing in this loop changes them.
            last: str | None = None
            floor, replaying, mine = 0, False, False
            above: AbstractSet[int] = _NONE_ABOVE
            while ready and len(take) < n:
                it = ready.popleft()
                topic, seq, objkey = it.topic, it.seq, it.objkey
                if topic != last:
                    last = topic
                    floor, above = acked.get(topic, 0), acked_above.get(topic, _NONE_ABOVE)
                    replaying, mine = bool(replays) and topic in replays, topic in topics
                if seq <= floor or seq in above or replaying:  # done (`is_done`), or its topic replays
                    self._finish(it)  # a replay reloads the topic from the journal once it is applied
                    continue
                key = (topic, seq)
                if objkey is not None:
                    h = holder.get(objkey)
                    if h is not None and h != key:
                        self.blocked.setdefault(objkey, deque()).append(it)
                        continue
                if not mine:
                    passed.append(it)
                    if len(passed) > 4 * batch_max:
                        break
                    continue
                if objkey is not None:
                    holder[objkey] = key
                it.attempts += 1
                if not it.first_dispatch:
                    it.first_dispatch = now
                inflight[key] = (it, ident)
                held[key] = it
                take.append(it)
            self.ready.extendleft(reversed(passed))
            if take:
                out.append((w, take))
                w.served = True
                self.workers.move_to_end(w.ident)
            if not self.ready:
                break
        return out

    def pin(self, w: WorkerState, key: Key, now: float) -> str | None:
        """Hold the loaded event `key` as in flight with `w`, a worker a dispatcher before this one handed it to
        and whose handler still runs it (its supervisor's report): it is not handed out again until `w` reports
        its outcome, dies or is given up, and no later event of its object overtakes it. Returns why not, or None.

        Only an event this group has loaded, not done and handed to nobody here can be held: one in flight with
        another worker here already runs again (too late to hold), and one not loaded yet cannot be named."""
        topic, seq = key
        if topic not in self.acked:
            return f"topic {topic[:64]!r} is not consumed by group {self.name!r}"
        if self.is_done(topic, seq):
            return "the event is acked already"
        entry = self.inflight.get(key)
        if entry is not None:
            return None if entry[1] == w.ident else "the event is in flight with another worker here"
        if seq >= self.read_pos.get(topic, 1):
            return "not loaded"
        it = self._unqueue(key)
        if it is None:
            return "the event is not waiting here"
        if it.objkey is not None:
            h = self.holder.get(it.objkey)
            if h is None or h not in self.inflight:
                self.holder[it.objkey] = key  # later events of its object wait (`dispatch` parks them in blocked)
        it.attempts += 1
        if not it.first_dispatch:
            it.first_dispatch = now
        self.inflight[key] = (it, w.ident)
        w.inflight[key] = it
        return None

    def _unqueue(self, key: Key) -> Item | None:
        """Take the loaded, waiting event `key` out of `ready`, `blocked` or `retry`; None if it is in none."""
        for i, it in enumerate(self.ready):
            if it.key == key:
                del self.ready[i]
                return it
        for ok, q in self.blocked.items():
            for i, it in enumerate(q):
                if it.key == key:
                    del q[i]
                    if not q:
                        del self.blocked[ok]
                    return it
        for i, (_, _, it) in enumerate(self.retry):
            if it.key == key:
                self.retry.pop(i)
                heapq.heapify(self.retry)
                return it
        return None

    # -- outcomes --------------------------------------------------------------------------------------------
    def _mark_acked(self, topic: str, seq: int) -> None:
        if self.replays and topic in self.replays:
            return  # the cursor already stands where the replay puts it (`request_replay`)
        above = self.acked_above[topic]
        above.add(seq)
        w = self.acked[topic]
        while w + 1 in above:
            w += 1
            above.discard(w)
        self.acked[topic] = w
        # Acks above a gap are persisted too (as ranges), so a hub crash while one slow or orphaned event holds
        # the watermark does not redeliver everything acked after it.
        self.dirty.add(topic)

    def _release(self, it: Item) -> None:
        if it.objkey is None or self.holder.get(it.objkey) != it.key:
            return
        waiting = self.blocked.get(it.objkey)
        if waiting:
            nxt = waiting.popleft()
            if not waiting:
                del self.blocked[it.objkey]
            self.holder[it.objkey] = nxt.key  # reserve: nothing later for this object may overtake it
            self.ready.appendleft(nxt)
        else:
            del self.holder[it.objkey]

    def _finish(self, it: Item) -> None:
        self.loaded -= 1
        self.loaded_bytes -= len(it.body)
        self._release(it)

    def _take_inflight(self, key: Key) -> Item | None:
        entry = self.inflight.pop(key, None)
        if entry is None:
            return None
        it, ident = entry
        w = self.workers.get(ident)
        if w is not None:
            w.inflight.pop(key, None)
        return it

    def ack(self, topic: str, seq: int) -> bool:
        """Mark done; False when it was already done (a duplicate ack after a redelivery)."""
        if self.replays and topic in self.replays:
            return self._ack_replaying((topic, seq))
        if topic not in self.acked or self.is_done(topic, seq):
            self._take_inflight((topic, seq))
            return False
        it = self._take_inflight((topic, seq))
        self._mark_acked(topic, seq)
        if it is not None:
            self._finish(it)
        self._uncharge((topic, seq))
        return True

    def held_by(self, key: Key, owner: bytes) -> Item | None:
        """The event `key` if it is in flight with the worker `owner` (only it may report its outcome), else None."""
        entry = self.inflight.get(key)
        return entry[0] if entry is not None and entry[1] == owner else None

    def done_by(self, key: Key, owner: bytes, now: float) -> Item | None:
        """The event `key` if `owner` may report it done: it is in flight with `owner`, or `owner` held it when
        the hub gave it up less than its grace ago (`worker_gone`); else None."""
        held = self.held_by(key, owner)
        if held is not None:
            return held
        gone = self.departed.get(key)
        if gone is not None and gone[1] == owner and now < gone[2]:
            return gone[0]
        return None

    def ack_range_of(self, owner: bytes, topic: str, first: int, last: int, now: float = 0.0) -> tuple[int, int]:
        """`ack_range` of the seqs of first..last in flight with the worker `owner`, whose ACK this is; returns how
        many were not done before, and how many were skipped because `owner` does not hold them (and they are not
        done: a duplicate after a redelivery is neither).

        A seq of the range it was not handed (another worker's event, or one loaded and handed to nobody yet) is
        left alone, or a peer holding the group's key could finish other workers' events, or make the group skip
        events nobody ran. What `owner` held when the hub gave it up counts within the grace (`done_by`)."""
        took = 0
        if topic in self.acked and not (self.replays and topic in self.replays):
            # The common ACK, a worker acking what it holds: acked in the same pass that checks it holds them, up to
            # the first seq it does not (a second pass over the range to check first cost ~0.3 us per event).
            took, first = self._ack_seqs(topic, first, last, owner)
            if first > last:
                return took, 0
        inflight, departed = self.inflight, self.departed
        mine: list[int] = []
        foreign = 0
        done_to, done_above = self.acked.get(topic, 0), self.acked_above.get(topic, _NONE_ABOVE)
        for s in range(first, last + 1):
            e = inflight.get((topic, s))
            if (e is not None and e[1] == owner) or (departed and self.done_by((topic, s), owner, now) is not None):
                mine.append(s)
            elif s > done_to and s not in done_above:
                foreign += 1
        return took + sum(self.ack_range(topic, a, b) for a, b in _runs(mine)), foreign

    def ack_range(self, topic: str, first: int, last: int) -> int:
        """`ack` for every seq of first..last (an ACK's compact form); returns how many were not done before.

        One pass with the watermark, the acked-above set and the in-flight table in locals: per event a pop from
        the in-flight table and its worker's, where `ack` makes a dozen calls. The outcome is the same as calling
        `ack` for each seq in order."""
        if self.replays and topic in self.replays:
            return sum(self._ack_replaying((topic, s)) for s in range(first, last + 1))
        if topic not in self.acked:
            for s in range(first, last + 1):
                self._take_inflight((topic, s))
            return 0
        return self._ack_seqs(topic, first, last)[0]

    def _ack_seqs(self, topic: str, first: int, last: int, owner: bytes | None = None) -> tuple[int, int]:
        """`ack_range`'s pass, for a topic the group reads and does not replay: (how many were not done before, the
        seq after the last one acked). With `owner` it stops at the first seq not in flight with that worker."""
        inflight, workers, holders, blocked = self.inflight, self.workers, self.holder, self.blocked
        above = self.acked_above[topic]
        w = self.acked[topic]
        charged = bool(self.charged or self.stored)
        fresh = finished = freed = 0
        worker_ident, worker = b"", None
        end = last + 1
        for s in range(first, end):
            key = (topic, s)
            if owner is None:
                entry = inflight.pop(key, None)
            else:
                entry = inflight.get(key)
                if entry is None or entry[1] != owner:
                    end = s
                    break
                del inflight[key]
            if entry is not None:
                it, ident = entry
                if ident != worker_ident:
                    worker_ident, worker = ident, workers.get(ident)
                if worker is not None:
                    worker.inflight.pop(key, None)
            if s <= w or s in above:
                continue  # done before: a duplicate ack after a redelivery
            fresh += 1
            if s == w + 1:
                w = s
            else:
                above.add(s)
            if entry is not None:
                finished += 1
                freed += len(it.body)
                objkey = it.objkey
                if objkey is not None and holders.get(objkey) == key:
                    if objkey in blocked:
                        self._release(it)  # the next event for the object takes its place
                    else:
                        del holders[objkey]
            if charged:
                self._uncharge(key)
        self.loaded -= finished
        self.loaded_bytes -= freed
        if fresh:
            while w + 1 in above:
                w += 1
                above.discard(w)
            self.acked[topic] = w
            self.dirty.add(topic)
        return fresh, end

    def _ack_replaying(self, key: Key) -> bool:
        """An ack of an event of a topic whose replay waits for its in-flight events: the event is finished (its
        work was done: its follow-ons are committed) and the cursor, which already stands where the replay puts
        it, stays there. False for one not in flight (a duplicate ack)."""
        it = self._take_inflight(key)
        if it is None:
            return False
        self._finish(it)
        self._uncharge(key)
        return True

    def _uncharge(self, key: Key) -> None:
        if key in self.stored or key in self.charged:
            self.charged[key] = 0
            self.stored.discard(key)

    def fail(
        self, topic: str, seq: int, error: str, line: str, plugin: str | None, permanent: bool, now: float,
        delay: float | None = None,
    ) -> DeadLetter | None:
        """A handler raised. Schedule a retry with backoff, or return the dead letter to publish.

        `delay` is a plugin's `Retry(delay=...)`: the retry waits at least that long (capped at MAX_RETRY_DELAY),
        and it still counts as an attempt."""
        # (A topic whose replay waits: its cursor stands where the replay puts it, so `is_done` says nothing of
        # the events still in flight; they are charged as any other, and the replay drops their retries.)
        if topic not in self.acked or (self.is_done(topic, seq) and not (self.replays and topic in self.replays)):
            self._take_inflight((topic, seq))
            return None
        it = self._take_inflight((topic, seq))
        if it is None:
            return None  # a stale failure for an event that is already elsewhere; its holder decides
        return self._charge(it, error, line, plugin, permanent, now, delay)

    def _charge(self, it: Item, error: str, line: str, plugin: str | None, permanent: bool, now: float,
                delay: float | None = None) -> DeadLetter | None:
        """The attempt `it` just used failed: back off and retry, or dead-letter it once its attempts are spent."""
        it.error = error
        cfg = self.topic_cfg(it.topic)
        if permanent or it.attempts >= cfg.max_attempts:
            return self._dead(it, error, line, plugin)
        wait = min(cfg.backoff_max, cfg.backoff_base * (2 ** (it.attempts - 1)))
        wait = random.uniform(wait / 2, wait)  # "equal jitter": spread retries, keep a floor
        if delay is not None:
            wait = max(wait, min(delay, MAX_RETRY_DELAY))
        heapq.heappush(self.retry, (now + wait, next(self._tie), it))
        self.charged[it.key] = it.attempts
        self.due[it.key] = (now + wait, wait)
        self.stored.add(it.key)
        self.delta[1] += 1
        self.totals[1] += 1
        return None

    def _dead(self, it: Item, error: str, line: str, plugin: str | None) -> DeadLetter:
        self._uncharge(it.key)
        self._mark_acked(it.topic, it.seq)
        self._finish(it)
        self.delta[0] += 1
        self.totals[0] += 1
        return DeadLetter(it, self.name, error, line, plugin)

    def due_retries(self, now: float) -> None:
        due = []
        while self.retry and self.retry[0][0] <= now:
            due.append(heapq.heappop(self.retry)[2])
        self.ready.extendleft(reversed(due))

    def next_retry_at(self) -> float | None:
        return self.retry[0][0] if self.retry else None

    def worker_gone(self, ident: bytes, *, lost: bool = False, died: tuple[Key | None, str] | None = None,
                    requeue: set[Key] | None = None, refused: bool = False, now: float = 0.0,
                    grace: float = 0.0) -> list[DeadLetter]:
        """Put a departed worker's in-flight events back at the front, in seq order; returns the dead letters.

        An attempt is charged only on evidence that the event was worked on; a departure by itself is none. A
        worker that takes a batch and leaves (BYE, silence) without running anything -- a crash-looping or
        flapping pool, a peer replaying READY/BYE with a group's key -- used to add an attempt to every event it
        was handed, and after `max_attempts` such cycles innocent events were dead letters no handler had failed.
        Who pays, by what is known of the departure:

        * `died` = (key, reason): its supervisor saw the child die and read which event's handler was running
          (None: none was). That event alone is charged, as a failed attempt with `reason` (backoff, then the
          dead-letter topic), so a poison event cannot take the innocent events queued with it down with it.
        * `died` = (key, reason): its supervisor saw the child die and read which event's handler was running
          (None: none was). That event alone is charged, as a failed attempt with `reason` (backoff, then the
          dead-letter topic), so a poison event cannot take the innocent events queued with it down with it.
          With none running, the oldest event it held is charged (a handler that returned may have broken its
          process for later, which died at its next send): a death is evidence, a departure is not.
        * `lost` (heartbeat timeout: the host or its supervisor vanished): the event its last heartbeat said was
          running, if it holds it; else, if it ever sent an outcome (`WorkerState.ran`: it works through its
          events in delivery order), the oldest event it held, the one it was most likely on. An event that takes
          whole hosts down still ends as a dead letter. A worker that never said it ran anything is charged nothing.
        * `refused` (its BYE says it could not read a DELIVER): the events of the earliest batch it holds that the
          BYE's `requeue` does not name (the one it refused; what came after was never read) are charged, so a
          batch that always arrives broken ends in the dead-letter topic instead of going round for ever.
        * everything else goes back uncharged: a BYE's `requeue` (never started), what it held but never reported
          (sent after it stopped reading), a worker that re-registered.

        For `grace` seconds the worker's ACK still counts for the events it held (`done_by`): a worker given up on
        for silence (a stall, a congested link) may have done them, the one charged as a guess too (unless that
        charge dead-lettered it), and its ACK may come after its supervisor's death notice (two connections), for
        all but the event that notice says was running. Without it, each ran again on the next worker. Only its
        own events: a peer cannot finish what it never held.
        """
        w = self.workers.pop(ident, None)
        if w is None:
            return []
        charge: set[Key] = set()
        reason = line = ""
        if died is not None:
            reason = line = died[1]
            named = died[0]
            if named is None:
                # No handler was running, yet the child died holding events: a handler that returned may have
                # broken its process for later (closed its descriptors: ZeroMQ aborts at the next send). Charging
                # nothing, that event came back on its first attempt for good, killing each child that took it,
                # and the events behind it waited for ever. The oldest it held is charged: redelivered at the
                # front, a poison is the oldest each time.
                named = next(iter(w.inflight), None)
            if named is not None:
                charge.add(named)
        elif lost:
            shown = w.running[0] if w.running is not None else None
            oldest = next(iter(w.inflight), None)
            if shown is not None and shown in w.inflight:
                charge.add(shown)
                reason = "worker lost (no heartbeat) while its last heartbeat said this event's handler was running"
            elif oldest is not None and (w.ran or w.reported):  # a report is its pool's word that it runs it
                charge.add(oldest)
                reason = "worker lost (no heartbeat) while this was the oldest event it held"
            line = "worker lost"
        elif refused:
            unread = [k for k in w.inflight if requeue is None or k not in requeue]
            if unread:
                first = w.inflight[unread[0]].batch
                charge.update(k for k in unread if w.inflight[k].batch == first)
            reason = "the worker could not read the DELIVER that carried this event and gave the batch back"
            line = "DELIVER refused by the worker"
        dead: list[DeadLetter] = []
        back: list[Item] = []
        retried = 0
        if self.departed:
            self.departed = {k: v for k, v in self.departed.items() if v[2] > now}
        for key in sorted(w.inflight):
            it = self._take_inflight(key)
            if it is None:
                continue
            if grace > 0 and (died is None or key not in charge) and len(self.departed) < DEPARTED_MAX:
                self.departed[key] = (it, ident, now + grace)
            if key in charge:
                dl = self._charge(it, reason, line, None, False, now)
                if dl is not None:
                    dead.append(dl)
                    self.departed.pop(key, None)  # dead-lettered: a late ACK cannot take that back
                else:
                    retried += 1  # redelivered too, after its backoff
                continue
            it.attempts -= 1
            back.append(it)
        self.ready.extendleft(reversed(back))
        self.delta[2] += len(back) + retried
        self.totals[2] += len(back) + retried
        return dead

    def undeliver(self, w: WorkerState, items: list[Item]) -> None:
        """A DELIVER that could not be sent: those events go back uncharged, and the worker gets no more until it
        is heard from. Its other events stay with it: if it is dead, its supervisor's GONE or the heartbeat
        timeout says who pays, which dropping it here (everything uncharged) would not."""
        for it in items:
            self._take_inflight(it.key)
            it.attempts -= 1
        self.ready.extendleft(reversed(items))
        w.reachable = False

    def take_dirty(self) -> tuple[dict[str, int], tuple[int, int, int]]:
        cur = {t: self.acked[t] for t in self.dirty}
        return cur, (self.delta[0], self.delta[1], self.delta[2])

    def committed(self) -> None:
        self.dirty.clear()
        self.delta = [0, 0, 0]
        self.charged.clear()
        self.due.clear()

    def oldest_unacked_age(self, now: float) -> float:
        starts = [it.first_dispatch for it, _ in self.inflight.values() if it.first_dispatch]
        starts += [it.first_dispatch for _, _, it in self.retry if it.first_dispatch]
        return max(0.0, now - min(starts)) if starts else 0.0

    # -- replay (operator rewinds or skips a topic's cursor) ----------------------------------------------------
    def request_replay(self, topic: str, from_seq: int) -> bool:
        """Move `topic`'s cursor so delivery restarts at `from_seq`; True when applied at once.

        Events of the topic still in flight must finish first (their acks must not mark replayed events done),
        so until then the topic is paused: nothing of it is loaded or dispatched. `apply_replays` finishes it.
        """
        if topic not in self.read_pos:
            raise KeyError(topic)
        self.replays[topic] = from_seq = max(1, from_seq)
        if topic in self.apply_replays():
            return True
        # Waiting: the cursor moves now and is stored with the next cursor write, so a hub stopped or killed
        # before the in-flight events finish still replays (it was held only here, and a restart forgot the
        # operator's act). Their acks no longer move it (`_ack_replaying`); the topic stays paused until then.
        self.acked[topic] = from_seq - 1
        self.acked_above[topic] = set()
        self.dirty.add(topic)
        for key in [k for k in (*self.stored, *self.charged) if k[0] == topic and k not in self.inflight]:
            self._uncharge(key)  # attempt counts go with it, as `_drop_topic` does when the replay is applied
            self.due.pop(key, None)
        return False

    def apply_replays(self) -> list[str]:
        """Apply pending replays whose topic has nothing in flight; returns the topics applied."""
        done: list[str] = []
        for t, from_seq in list(self.replays.items()):
            if any(k[0] == t for k in self.inflight):
                continue
            self._drop_topic(t)
            self.acked[t] = from_seq - 1  # (again, for a replay that waited: nothing moved it meanwhile)
            self.acked_above[t] = set()
            self.read_pos[t] = from_seq
            self.dirty.add(t)
            del self.replays[t]
            done.append(t)
        return done

    def _drop_topic(self, t: str) -> None:
        """Forget every loaded, waiting or retrying event of `t` (nothing of it is in flight)."""
        self.ready = deque(it for it in self.ready if it.topic != t)
        for ok in list(self.blocked):
            q = deque(it for it in self.blocked[ok] if it.topic != t)
            if q:
                self.blocked[ok] = q
            else:
                del self.blocked[ok]
        self.retry = [e for e in self.retry if e[2].topic != t]
        heapq.heapify(self.retry)
        # A replay hands its events out as if for the first time: attempts start afresh, and the counts the
        # journal holds for the topic's events go with the next commit (else a restart would bring them back).
        for key in [k for k in (*self.stored, *self.charged) if k[0] == t]:
            self._uncharge(key)
            self.due.pop(key, None)
        if self.seed:
            self.seed = {k: n for k, n in self.seed.items() if k[0] != t}
            self.seed_due = {k: d for k, d in self.seed_due.items() if k[0] != t}
        for ok, key in list(self.holder.items()):
            if key[0] != t:
                continue
            del self.holder[ok]  # a reservation of a dropped event: pass it to the next waiting event, if any
            waiting = self.blocked.get(ok)
            if waiting:
                nxt = waiting.popleft()
                if not waiting:
                    del self.blocked[ok]
                self.holder[ok] = nxt.key
                self.ready.appendleft(nxt)
        loaded = [*self.ready, *(it for q in self.blocked.values() for it in q), *(e[2] for e in self.retry),
                  *(it for it, _ in self.inflight.values())]
        self.loaded = len(loaded)
        self.loaded_bytes = sum(len(it.body) for it in loaded)
        self.short = 0
