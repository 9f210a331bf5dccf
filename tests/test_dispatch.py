"""The delivery rules of a consumer group, without sockets."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketwire.config import TopicConfig
from bucketwire.hub.dispatch import GroupState, WorkerState


def group(max_attempts=3):
    g = GroupState("g", ["t"], {"t": 0}, lambda t: TopicConfig(max_attempts=max_attempts, backoff_base=1))
    return g


def add_worker(g, name, credit=10):
    w = WorkerState(name.encode(), "g", frozenset(["t"]), credit, 0.0)
    g.workers[w.ident] = w
    return w


def load(g, keys):
    g.offer("t", 1, [(i + 1, k, b"{}") for i, k in enumerate(keys)])


def test_same_object_never_in_flight_twice_and_order_kept():
    g = group()
    add_worker(g, "w1")
    add_worker(g, "w2")
    load(g, ["b/x", "b/y", "b/x", "b/x", None])
    sent = g.dispatch(10, 0.0)
    keys = [it.seq for _, items in sent for it in items]
    assert keys == [1, 2, 5], "seq 3 and 4 wait behind seq 1 (same object)"
    assert g.ack("t", 1)
    sent = g.dispatch(10, 0.0)
    assert [it.seq for _, items in sent for it in items] == [3]
    g.ack("t", 3)
    assert [it.seq for _, items in g.dispatch(10, 0.0) for it in items] == [4]


def test_lru_batches_and_credit():
    g = group()
    w1, w2 = add_worker(g, "w1", credit=2), add_worker(g, "w2", credit=2)
    load(g, [None] * 5)
    sent = g.dispatch(10, 0.0)
    assert [(w.ident, len(items)) for w, items in sent] == [(b"w1", 2), (b"w2", 2)]
    assert w1.free == 0 and w2.free == 0 and len(g.ready) == 1
    g.ack("t", 1)
    assert [(w.ident, [i.seq for i in items]) for w, items in g.dispatch(10, 0.0)] == [(b"w1", [5])]


def _one(g: GroupState, seq: int) -> bytes:
    """Offer event `seq` alone and dispatch it; the worker it went to."""
    g.offer("t", seq, [(seq, None, b"{}")])
    sent = g.dispatch(10, 0.0)
    assert [it.seq for _, items in sent for it in items] == [seq]
    return sent[0][0].ident


def test_an_idle_worker_is_chosen_over_a_busy_one_that_still_has_credit() -> None:
    """An event must not wait behind a long handler while another worker has nothing to do. Least recently used
    alone handed event 3 to the worker still running event 1, because it had credit left."""
    g = group()
    add_worker(g, "w1")
    add_worker(g, "w2")
    slow = _one(g, 1)
    quick = _one(g, 2)
    assert quick != slow, "a worker with an event in hand is not the first choice while another is idle"
    g.ack("t", 2)  # the quick one is idle again; the slow one still runs event 1
    assert _one(g, 3) == quick
    assert g.workers[slow].inflight.keys() == {("t", 1)}


def test_at_a_modest_rate_the_warm_worker_takes_event_after_event() -> None:
    """Each event done before the next arrives: the worker that ran the last one runs the next (its process is
    awake and its caches warm), the others sleep. Taking turns woke every worker for every n-th event."""
    g = group()
    for name in ("w1", "w2", "w3"):
        add_worker(g, name)
    used = []
    for seq in range(1, 9):
        used.append(_one(g, seq))
        g.ack("t", seq)
    assert len(set(used)) == 1, used


def test_under_load_busy_workers_take_turns_least_recently_used_first() -> None:
    """No worker idle: the order is least recently used, so the load spreads as before."""
    g = group()
    w1, w2, w3 = (add_worker(g, n, credit=3) for n in ("w1", "w2", "w3"))
    load(g, [None] * 3)
    assert [(w.ident, len(items)) for w, items in g.dispatch(1, 0.0)] == [(b"w1", 1), (b"w2", 1), (b"w3", 1)]
    g.offer("t", 4, [(4, None, b"{}"), (5, None, b"{}")])
    assert [w.ident for w, _ in g.dispatch(1, 0.0)] == [b"w1", b"w2"]
    assert all(w.inflight for w in (w1, w2, w3))


def test_cursor_is_the_contiguous_watermark():
    g = group()
    add_worker(g, "w")
    load(g, [None] * 4)
    g.dispatch(10, 0.0)
    g.ack("t", 2)
    g.ack("t", 4)
    assert g.acked["t"] == 0
    g.ack("t", 1)
    assert g.acked["t"] == 2
    assert not g.ack("t", 2), "a repeated ack is recognised"
    g.ack("t", 3)
    assert g.acked["t"] == 4


def test_retry_keeps_the_object_held_then_dead_letters():
    g = group(max_attempts=2)
    add_worker(g, "w")
    load(g, ["b/x", "b/x"])
    g.dispatch(10, 0.0)
    assert g.fail("t", 1, "boom", "E: boom", "p", False, now=0.0) is None
    assert [it.seq for _, items in g.dispatch(10, 0.1) for it in items] == [], "seq 2 waits for seq 1's retry"
    g.due_retries(100.0)
    assert [(it.seq, it.attempts) for _, items in g.dispatch(10, 100.0) for it in items] == [(1, 2)]
    dl = g.fail("t", 1, "boom", "E: boom", "p", False, now=100.0)
    assert dl is not None and dl.item.attempts == 2 and dl.plugin == "p"
    assert g.acked["t"] == 1
    assert [it.seq for _, items in g.dispatch(10, 100.0) for it in items] == [2]


def test_a_retry_scheduled_by_the_previous_dispatcher_is_waited_out_holding_its_object():
    """A new dispatcher (jetstream failover) loads an event whose retry the old one had scheduled: it waits until
    then, at its next attempt, and a later event for the same object waits behind it."""
    g = group()
    add_worker(g, "w")
    g.seed, g.seed_due = {("t", 1): 1}, {("t", 1): 50.0}
    load(g, ["b/x", "b/x", "b/y"])
    assert [it.seq for _, items in g.dispatch(10, 0.0) for it in items] == [3], "seq 2 waits behind seq 1"
    assert g.next_retry_at() == 50.0
    g.due_retries(49.0)
    assert g.dispatch(10, 49.0) == []
    g.due_retries(50.0)
    assert [(it.seq, it.attempts) for _, items in g.dispatch(10, 50.0) for it in items] == [(1, 2)]
    g.ack("t", 1)
    assert [it.seq for _, items in g.dispatch(10, 50.0) for it in items] == [2]


def test_who_pays_when_a_worker_goes():
    """A drain or an undeliverable batch charges nothing; a death reported by the supervisor charges exactly the
    running event; a heartbeat loss charges only the event the worker was seen running, else the oldest it held if
    it ever sent an outcome, else nothing; a BYE charges only the refused batch it names with `refused`."""
    g = group(max_attempts=2)
    add_worker(g, "w")
    load(g, [None, None, None])
    g.dispatch(10, 0.0)
    assert g.worker_gone(b"w", requeue={("t", 1), ("t", 2), ("t", 3)}) == []
    assert [it.attempts for it in g.ready] == [0, 0, 0]
    add_worker(g, "w2")
    g.dispatch(10, 0.0)
    assert g.worker_gone(b"w2", died=(("t", 2), "worker child died (SIGABRT)"), now=0.0) == []
    assert [(it.seq, it.attempts) for it in g.ready] == [(1, 0), (3, 0)], "only seq 2 is charged, and backs off"
    assert [(it.seq, it.attempts, it.error) for _, _, it in g.retry] == [(2, 1, "worker child died (SIGABRT)")]
    g.due_retries(100.0)
    add_worker(g, "w3")
    assert [it.seq for _, items in g.dispatch(10, 100.0) for it in items] == [2, 1, 3], "delivery order"
    assert g.worker_gone(b"w3", lost=True, now=100.0) == []
    assert [(it.seq, it.attempts) for it in g.ready] == [(1, 0), (2, 1), (3, 0)], "silent, never ran: no charge"
    add_worker(g, "w4").ran = True  # it sent an outcome once: it works through its events in order
    assert [it.seq for _, items in g.dispatch(10, 100.0) for it in items] == [1, 2, 3]
    assert g.worker_gone(b"w4", lost=True, now=100.0) == []
    assert [(it.seq, it.attempts) for _, _, it in g.retry] == [(1, 1)], "the oldest delivered is the one charged"
    assert [(it.seq, it.attempts) for it in g.ready] == [(2, 1), (3, 0)]
    w5 = add_worker(g, "w5")
    assert [it.seq for _, items in g.dispatch(10, 100.0) for it in items] == [2, 3]
    w5.running = (("t", 2), 100.0, 60.0)  # its heartbeat named 2: that one pays, with no outcome sent
    dead = g.worker_gone(b"w5", lost=True, now=100.0)
    assert [(d.item.seq, d.line) for d in dead] == [(2, "worker lost")], "its second attempt: a dead letter"
    assert [(it.seq, it.attempts) for it in g.ready] == [(3, 0)]


def test_a_bye_charges_only_the_batch_it_says_it_could_not_read():
    g = group(max_attempts=3)
    load(g, [None] * 5)

    def two_delivers(name: str) -> None:
        """1-2 in one DELIVER, 3-5 in the next (numbered as the hub numbers them when it sends them)."""
        add_worker(g, name)
        for n, size in ((1, 2), (2, 10)):
            ((_, items),) = g.dispatch(size, 0.0)
            for it in items:
                it.batch = n

    two_delivers("w")
    assert g.worker_gone(b"w", requeue=set(), now=0.0) == [], "a plain BYE naming nothing"
    assert [(it.seq, it.attempts) for it in g.ready] == [(q, 0) for q in range(1, 6)], "charges nothing"
    two_delivers("w2")
    assert g.worker_gone(b"w2", requeue={("t", 1)}, refused=True, now=0.0) == []
    assert [(it.seq, it.attempts) for _, _, it in g.retry] == [(2, 1)], "the earliest batch outside requeue"
    assert [(it.seq, it.attempts) for it in g.ready] == [(1, 0), (3, 0), (4, 0), (5, 0)]


def test_an_undeliverable_batch_goes_back_uncharged_and_the_worker_gets_no_more():
    g = group()
    w = add_worker(g, "w")
    load(g, [None, None])
    ((_, items),) = g.dispatch(10, 0.0)
    g.undeliver(w, items)
    assert [(it.seq, it.attempts) for it in g.ready] == [(1, 0), (2, 0)] and not g.inflight
    assert g.dispatch(10, 0.0) == [], "an unreachable worker has no credit until it is heard from"
    w.reachable = True
    assert [it.seq for _, items in g.dispatch(10, 0.0) for it in items] == [1, 2]


def test_a_requested_retry_delay_is_a_floor_and_still_an_attempt():
    g = group(max_attempts=2)
    add_worker(g, "w")
    load(g, ["b/x"])
    g.dispatch(10, 0.0)
    assert g.fail("t", 1, "wait", "Retry: wait", "p", False, now=0.0, delay=30.0) is None
    g.due_retries(29.9)
    assert [it.seq for _, items in g.dispatch(10, 29.9) for it in items] == [], "not before the asked delay"
    g.due_retries(30.0)
    assert [(it.seq, it.attempts) for _, items in g.dispatch(10, 30.0) for it in items] == [(1, 2)]
    dl = g.fail("t", 1, "wait", "Retry: wait", "p", False, now=30.0, delay=30.0)
    assert dl is not None and dl.item.attempts == 2, "a Retry counts toward max_attempts"


def test_only_the_hubs_own_retries_steer_delivery() -> None:
    """`targetgroup` narrows delivery only on an envelope the hub wrote (a `dlq retry`); the same extension on any
    other envelope (a journal entry from before ingress refused it) must not hide the event from other groups."""
    from bucketwire.hub.dispatch import not_for_group

    hub_retry = b'{"source":"bucketwire://hub/retry/a","id":"r1","targetgroup":"a"}'
    forged = b'{"source":"urn:outsider","id":"x1","targetgroup":"a"}'
    assert not_for_group(hub_retry, "b") and not not_for_group(hub_retry, "a")
    assert not not_for_group(forged, "b") and not not_for_group(forged, "a")


def _snapshot(g: GroupState) -> dict:
    return {
        "acked": dict(g.acked), "above": {t: sorted(s) for t, s in g.acked_above.items()},
        "inflight": sorted(g.inflight), "workers": {i: list(w.inflight) for i, w in g.workers.items()},
        "holder": dict(g.holder), "blocked": {k: [it.key for it in q] for k, q in g.blocked.items()},
        "ready": [it.key for it in g.ready], "loaded": g.loaded, "dirty": sorted(g.dirty),
        "charged": dict(g.charged), "stored": sorted(g.stored),
    }


def _range_histories(compare: Callable[[random.Random, GroupState, GroupState, int, int], None],
                     grace: float = 0.0) -> None:
    """Random histories, seeded, played on two groups alike (loads, failures, redeliveries, dispatches); at each of
    their acks `compare(rnd, by_range, by_seq, first, last)` acks the range on one group its way and on the other
    seq by seq, and the two groups must then be the same (`_snapshot`). `grace`: how long a redelivered worker's
    acks still count (`worker_gone`)."""
    for seed in range(300):
        rnd = random.Random(seed)
        pair = []
        c1, c2 = rnd.randint(1, 30), rnd.randint(1, 30)
        for _ in range(2):
            g = group(max_attempts=3)
            add_worker(g, "w1", credit=c1)
            add_worker(g, "w2", credit=c2)
            pair.append(g)
        keys = [rnd.choice([None, "b/x", "b/y", "b/z", "b/w"]) for _ in range(40)]
        for g in pair:
            load(g, keys)
            g.stored = {("t", s) for s in range(1, 41) if seed % 3 == 0 and s % 7 == 0}
        ops = []
        for _ in range(rnd.randint(1, 8)):
            kind = rnd.random()
            if kind < 0.15:
                ops.append(("fail", rnd.randint(1, 40)))
            elif kind < 0.25:
                ops.append(("redeliver", None))
            else:
                first = rnd.randint(1, 45)
                ops.append(("ack", first, first + rnd.randint(0, 12)))
        by_range, by_seq = pair
        for n, op in enumerate(ops):
            batch = rnd.randint(1, 16)
            for g in pair:
                random.seed(seed * 100 + n)  # the same backoff jitter for both
                if op[0] == "fail":
                    g.fail("t", op[1], "boom", "E: boom", "p", False, now=0.0)
                    g.due_retries(1e9)
                elif op[0] == "redeliver":
                    g.worker_gone(b"w1", lost=True, now=0.0, grace=grace)
                    add_worker(g, "w1", credit=10)
                g.dispatch(batch, 0.0)
            if op[0] == "ack":
                compare(rnd, by_range, by_seq, op[1], op[2])
            assert _snapshot(by_range) == _snapshot(by_seq), (seed, op)


def test_acking_a_range_is_acking_each_seq_in_order() -> None:
    """The ACK's compact form (`ack_range`) must leave a group exactly as acking each seq of the range one by one
    does: the watermark, acks above a gap, who holds each object and what waits behind it, in-flight tables,
    charged attempts, duplicates after a redelivery, seqs never delivered."""

    def compare(rnd: random.Random, by_range: GroupState, by_seq: GroupState, first: int, last: int) -> None:
        got = by_range.ack_range("t", first, last)
        want = sum(by_seq.ack("t", s) for s in range(first, last + 1))
        assert got == want, (first, last)

    _range_histories(compare)


@pytest.mark.parametrize("grace", [0.0, 10.0])
def test_a_workers_ack_range_acks_only_what_it_holds_seq_by_seq(grace: float) -> None:
    """A worker's ranges (`ack_range_of`) ack exactly the seqs it holds, or held when the hub gave it up less than
    `grace` ago (`done_by`), as acking each of them alone in order does, and count as foreign exactly those of
    the others not done: another worker's events, events loaded and handed to nobody, seqs never loaded. A range
    that starts with the worker's own events and then runs into another's must stop acking there (a shortcut that
    acks a whole range once its first seqs are the sender's would finish other workers' events)."""

    def compare(rnd: random.Random, by_range: GroupState, by_seq: GroupState, first: int, last: int) -> None:
        owner = rnd.choice([b"w1", b"w2"])
        got = by_range.ack_range_of(owner, "t", first, last, 1.0)
        mine = [s for s in range(first, last + 1) if by_seq.done_by(("t", s), owner, 1.0) is not None]
        foreign = sum(1 for s in range(first, last + 1) if s not in mine and not by_seq.is_done("t", s))
        assert got == (sum(by_seq.ack("t", s) for s in mine), foreign), (owner, first, last)

    _range_histories(compare, grace)


def test_a_range_for_a_topic_the_group_does_not_read_acks_nothing() -> None:
    g = group()
    add_worker(g, "w")
    load(g, [None, None])
    g.dispatch(10, 0.0)
    assert g.ack_range("other", 1, 2) == 0
    assert g.acked == {"t": 0} and len(g.inflight) == 2


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seqs=st.sets(st.integers(1, 60), min_size=1))
def test_a_commit_is_offered_in_the_runs_its_seqs_make(seqs: set[int]) -> None:
    """`contiguous` cuts a topic's committed events where a seq is missing (only a run without holes may be
    offered); its shortcut for a run with none must give exactly the runs the loop gives."""
    from bucketwire.hub.loop import contiguous

    items = [(s, None, b"%d" % s) for s in sorted(seqs)]
    runs: list[list[tuple[int, None, bytes]]] = []
    for it in items:
        if runs and runs[-1][-1][0] + 1 == it[0]:
            runs[-1].append(it)
        else:
            runs.append([it])
    assert contiguous(items) == runs  # type: ignore[arg-type]


def test_a_replay_starts_its_events_attempts_afresh_and_forgets_their_stored_counts():
    """A failed event's count is kept in the journal (a restart goes on from it). A replay hands the topic's events
    out as if for the first time, so the count goes too: left behind, a restart would bring it back."""
    g = group(max_attempts=5)
    add_worker(g, "w1")
    load(g, [None, None])
    g.dispatch(10, 0.0)
    assert g.fail("t", 1, "boom", "boom", None, False, 0.0) is None
    assert g.charged == {("t", 1): 1}  # what the next commit stores
    g.committed()
    assert g.ack("t", 2)
    assert g.request_replay("t", 1)  # nothing in flight: applied at once
    assert g.charged == {("t", 1): 0} and not g.stored, "the next commit deletes the stored count"
    assert not g.retry


# -- the buffer's byte budget ------------------------------------------------------------------------------------
class _Journal:
    """One topic's committed events, as `refill` reads them (retention may drop a prefix)."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, str | None, bytes]] = {}
        self.head = 0
        self.first = 1

    def append(self, objkey: str | None, size: int) -> tuple[int, str | None, bytes]:
        self.head += 1
        row = (self.head, objkey, b"x" * size)
        self.rows[self.head] = row
        return row

    def read(self, topic: str, frm: int, n: int) -> list[tuple[int, str | None, bytes]]:
        return [self.rows[s] for s in range(max(frm, self.first), self.head + 1)][:n]

    def first_seq(self, topic: str) -> int | None:
        return self.first if self.first <= self.head else None

    def heads(self) -> dict[str, int]:
        return {"t": self.head}


def _budget_group(budget: int, max_attempts: int = 3) -> GroupState:
    return GroupState("g", ["t"], {"t": 0}, lambda t: TopicConfig(max_attempts=max_attempts, backoff_base=1),
                      max_buffer_bytes=budget)


def _loaded_items(g: GroupState) -> list:
    return [*g.ready, *(it for q in g.blocked.values() for it in q), *(e[2] for e in g.retry),
            *(it for it, _ in g.inflight.values())]


def test_a_groups_loaded_events_are_bounded_in_bytes_and_the_rest_wait_in_the_journal() -> None:
    """Ten 300-byte events, a 1,000-byte budget: three are loaded, whether offered from the commit or read by a
    refill; the others are read as acks make room, in order."""
    j = _Journal()
    g = _budget_group(1000)
    add_worker(g, "w")
    rows = [j.append(None, 300) for _ in range(10)]
    g.offer("t", 1, rows)
    assert (g.loaded, g.loaded_bytes) == (3, 900) and g.read_pos["t"] == 4
    assert not g.wants_refill(j.heads()), "nothing more fits: no journal read per loop turn"
    assert [it.seq for _, items in g.dispatch(10, 0.0) for it in items] == [1, 2, 3]
    g.ack("t", 1)
    assert g.wants_refill(j.heads())
    g.refill(j.heads(), j.read, j.first_seq)
    assert (g.loaded, g.loaded_bytes, g.read_pos["t"]) == (3, 900, 5)
    assert g.ack_range("t", 2, 3) == 2 and g.loaded_bytes == 300
    g.refill(j.heads(), j.read, j.first_seq)
    assert [it.seq for it in g.ready] == [4, 5, 6] and g.loaded_bytes == 900


def test_an_event_larger_than_the_budget_is_loaded_alone() -> None:
    j = _Journal()
    g = _budget_group(1000)
    add_worker(g, "w")
    g.offer("t", 1, [j.append(None, 100), j.append(None, 5000), j.append(None, 100)])
    assert [it.seq for it in g.ready] == [1], "the large one waits until it can be alone"
    g.dispatch(10, 0.0)
    g.ack("t", 1)
    g.refill(j.heads(), j.read, j.first_seq)
    assert [it.seq for it in g.ready] == [2] and g.loaded_bytes == 5000, "alone, over the budget: still loaded"
    assert not g.wants_refill(j.heads())
    g.dispatch(10, 0.0)
    g.ack("t", 2)
    g.refill(j.heads(), j.read, j.first_seq)
    assert [it.seq for it in g.ready] == [3]


def test_the_byte_count_stays_exact_and_nothing_is_lost_or_reordered_through_random_histories() -> None:
    """Offers, refills, dispatches, acks (single and ranges), failures (retried and dead-lettered), worker loss,
    undeliverable batches, replays and retention, in random order against a small byte budget. After every step
    the group's byte count is the sum of its loaded events' bodies and the budget holds (one event may be over it
    alone); an event is handed out only when every earlier event for its object is done; at the end every event
    owed was handed out and the group drains. Seeded; BUCKETWIRE_DISPATCH_SEEDS for more."""
    import os

    for seed in range(int(os.environ.get("BUCKETWIRE_DISPATCH_SEEDS", "150"))):
        _random_history(seed)


def _random_history(seed: int) -> None:

    rnd = random.Random(seed)
    budget = rnd.choice([600, 1000, 2500])
    j = _Journal()
    g = _budget_group(budget, max_attempts=rnd.randint(1, 3))
    by_key: dict[str, list[int]] = {}
    owed: set[int] = set()
    now = 0.0
    names = ["w1", "w2"]
    for n in names:
        add_worker(g, n, credit=rnd.randint(1, 6))

    def check(step: str) -> None:
        items = _loaded_items(g)
        assert g.loaded == len(items), (seed, step)
        assert g.loaded_bytes == sum(len(it.body) for it in items), (seed, step)
        assert g.loaded_bytes <= budget or g.loaded == 1, (seed, step, g.loaded_bytes)

    def dispatch() -> None:
        for _, sent in g.dispatch(rnd.randint(1, 4), now):
            for it in sent:
                if it.objkey is not None:
                    earlier = [s for s in by_key[it.objkey] if s < it.seq]
                    assert all(g.is_done("t", s) for s in earlier), (seed, it.key, "overtook")
                owed.discard(it.seq)

    def applied(topics: list[str], from_seq: int) -> None:
        if topics:
            owed.clear()
            owed.update(range(max(from_seq, j.first), j.head + 1))

    pending_replay = 0
    for _ in range(rnd.randint(20, 80)):
        op = rnd.random()
        now += rnd.choice([0.0, 0.5, 5.0])
        if op < 0.2:
            rows = []
            for _ in range(rnd.randint(1, 5)):
                size = rnd.choice([10, 100, 300, 700]) if rnd.random() > 0.05 else budget + 50
                key = rnd.choice([None, "b/x", "b/y", "b/z"])
                rows.append(j.append(key, size))
                if key is not None:
                    by_key.setdefault(key, []).append(j.head)
                owed.add(j.head)
            g.offer("t", rows[0][0], rows)
        elif op < 0.35:
            if g.wants_refill(j.heads()):
                g.refill(j.heads(), j.read, j.first_seq)
        elif op < 0.55:
            dispatch()
        elif op < 0.75 and g.inflight:
            key = rnd.choice(sorted(g.inflight))
            if rnd.random() < 0.5:
                g.ack(*key)
            else:
                last = key[1]  # a worker acks what it was handed: a run of its in-flight events
                while ("t", last + 1) in g.inflight and last < key[1] + 3:
                    last += 1
                g.ack_range("t", key[1], last)
        elif op < 0.82 and g.inflight:
            key = rnd.choice(sorted(g.inflight))
            g.fail(*key, "boom", "E: boom", "p", rnd.random() < 0.2, now)
        elif op < 0.86:
            g.due_retries(now)
        elif op < 0.9:
            name = rnd.choice(names)
            how = rnd.randrange(3)
            w = g.workers.get(name.encode())
            held = list(w.inflight) if w else []
            if how == 0:
                g.worker_gone(name.encode(), lost=True, now=now)
            elif how == 1:
                g.worker_gone(name.encode(), died=(held[0] if held else None, "died"), now=now)
            else:
                g.worker_gone(name.encode(), requeue=set(held[1:]), now=now)
            add_worker(g, name, credit=rnd.randint(1, 6))
        elif op < 0.92:
            w = g.workers[rnd.choice(names).encode()]
            if w.inflight:
                g.undeliver(w, [w.inflight[k] for k in list(w.inflight)[-1:]])
                w.reachable = True
        elif op < 0.95 and not g.replays:
            pending_replay = rnd.randint(1, j.head + 1)
            applied(["t"] if g.request_replay("t", pending_replay) else [], pending_replay)
        elif op < 0.97 and j.head:
            cut = rnd.randint(j.first, j.head)
            for s in range(j.first, cut):
                if s >= g.read_pos["t"]:
                    owed.discard(s)  # gone before this group read it: skipped, loudly
            j.first = cut
        if g.replays:
            applied(g.apply_replays(), pending_replay)
        check(f"op {op:.2f}")
    for _ in range(2000):  # drain
        now += 100.0
        g.due_retries(now)
        if g.replays:
            applied(g.apply_replays(), pending_replay)
        if g.wants_refill(j.heads()):
            g.refill(j.heads(), j.read, j.first_seq)
        dispatch()
        for key in sorted(g.inflight):
            g.ack(*key)
        check("drain")
        if g.acked["t"] == j.head and not g.loaded and not g.replays:
            break
    assert g.acked["t"] == j.head and g.loaded == 0 and g.loaded_bytes == 0, (seed, "did not drain")
    assert not owed, (seed, sorted(owed), "never handed out")


def _reported(g: GroupState, name: str) -> WorkerState:
    """A worker known only from its supervisor's report (hub/reports.py): no credit, holds what it is pinned."""
    w = WorkerState(name.encode(), "g", frozenset(["t"]), 0, 0.0, reported=True)
    g.workers[w.ident] = w
    return w


def test_a_reported_run_is_held_with_its_object_until_its_outcome() -> None:
    """A new dispatcher pins the event a previous dispatcher's worker still runs: no free worker gets it, nor a
    later event of its object, until the reporting worker's ack (which counts: it is the holder)."""
    g = group()
    add_worker(g, "w1")
    ghost = _reported(g, "ghost")
    load(g, ["b/x", "b/x", "b/y"])
    assert g.pin(ghost, ("t", 1), 0.0) is None
    sent = g.dispatch(10, 0.0)
    assert [it.seq for _, items in sent for it in items] == [3], "seq 1 is held, seq 2 waits behind it"
    assert g.held_by(("t", 1), b"ghost") is not None and g.held_by(("t", 1), b"w1") is None
    assert g.ack("t", 1)
    assert [it.seq for _, items in g.dispatch(10, 0.0) for it in items] == [2]


def test_a_report_cannot_pin_what_is_done_elsewhere_or_not_loaded() -> None:
    g = group()
    add_worker(g, "w1")
    ghost = _reported(g, "ghost")
    load(g, [None, None, None])
    assert [it.seq for _, items in g.dispatch(1, 0.0) for it in items] == [1]
    assert g.ack("t", 1)
    g.dispatch(1, 0.0)  # seq 2 to w1
    assert g.pin(ghost, ("t", 1), 0.0) == "the event is acked already"
    assert g.pin(ghost, ("t", 2), 0.0) == "the event is in flight with another worker here"
    assert g.pin(ghost, ("t", 4), 0.0) == "not loaded"
    assert g.pin(ghost, ("u", 3), 0.0) is not None
    assert not ghost.inflight and len(g.inflight) == 1


def test_a_reported_run_given_up_is_charged_and_one_that_ended_is_not() -> None:
    """Given up for silence (lost) it is charged as a lost worker's oldest event; ended, it goes back uncharged.
    A retry the previous dispatcher scheduled for it is taken off the heap while the run holds it."""
    g = group()
    add_worker(g, "w1", credit=0)
    load(g, ["b/x", "b/y"])
    g.seed_due = {}
    ghost = _reported(g, "ghost")
    assert g.pin(ghost, ("t", 1), 0.0) is None
    g.worker_gone(b"ghost", lost=True, now=1.0)
    assert g.charged == {("t", 1): 1} and len(g.retry) == 1
    ghost2 = _reported(g, "ghost2")
    assert g.pin(ghost2, ("t", 1), 1.0) is None, "pinned out of the retry heap"
    assert not g.retry
    ghost3 = _reported(g, "ghost3")
    assert g.pin(ghost3, ("t", 2), 1.0) is None
    g.worker_gone(b"ghost3", lost=False, now=2.0)
    it = next(i for i in g.ready if i.seq == 2)
    assert it.attempts == 0, "an ended run goes back uncharged"


def test_a_read_that_finds_nothing_below_the_head_never_rewinds_the_group() -> None:
    """A journal can hold a topic's head before it can serve the rows under it (a commit not written yet, a
    backend behind its head notice). Such a read found nothing, and the group took the topic's first seq for a
    retention gap ahead of it: it went back to the first event, loaded every event again (handed out twice) and
    counted a negative skip. Nothing ahead was dropped, so the group waits and reads again."""
    j = _Journal()
    g = _budget_group(1 << 20)
    add_worker(g, "w")
    g.offer("t", 1, [j.append(None, 10) for _ in range(3)])
    assert g.read_pos["t"] == 4
    for _ in range(3):
        j.append(None, 10)
    visible = j.head
    j.head += 2  # seqs 7 and 8: committed (the head says so), not readable yet
    j.read = lambda t, frm, n: [j.rows[s] for s in range(max(frm, j.first), visible + 1)][:n]  # type: ignore[method-assign]
    g.refill({"t": j.head}, j.read, j.first_seq)
    assert [it.seq for it in g.ready] == [1, 2, 3, 4, 5, 6]
    assert g.read_pos["t"] == 7
    for _ in range(3):  # asked again, turn after turn, while the rows stay out of reach
        g.refill({"t": j.head}, j.read, j.first_seq)
    assert [it.seq for it in g.ready] == [1, 2, 3, 4, 5, 6], "nothing loaded twice"
    assert g.read_pos["t"] == 7 and g.skipped_by_retention == 0
    j.rows[7], j.rows[8] = (7, None, b"y"), (8, None, b"y")
    visible = j.head
    g.refill({"t": j.head}, j.read, j.first_seq)
    assert [it.seq for it in g.ready] == [1, 2, 3, 4, 5, 6, 7, 8] and g.skipped_by_retention == 0


def _state(g: GroupState) -> dict:
    """`_snapshot` and the rest a pass over an ACK touches, orders included: the in-flight tables in their order
    (a worker's first key is the event it runs), who holds which object in order, the loaded bytes, the retries."""
    snap = _snapshot(g)
    snap.update(inflight_order=[(k, e[1]) for k, e in g.inflight.items()], holder_order=list(g.holder.items()),
                loaded_bytes=g.loaded_bytes, read_pos=dict(g.read_pos), departed=sorted(g.departed),
                retry=[(it.key, it.attempts) for _, _, it in sorted(g.retry, key=lambda r: r[:2])])
    return snap


def _bus_history(seed: int) -> int:
    """One seeded history for the test below, played on two groups alike; returns how many ACKs changed a group."""
    hits = 0
    rnd = random.Random(seed)
    shape = seed % 4  # 0: each event its own object (the bench), 1: none, 2: a few shared, 3: mixed
    pair = [group(max_attempts=3) for _ in range(2)]
    credits = [rnd.randint(1, 40) for _ in range(3)]
    n = 0

    def publish(count: int) -> None:
        nonlocal n
        rows = []
        for _ in range(count):
            n += 1
            objkey = (f"b/{n}" if shape == 0 else None if shape == 1 else rnd.choice(["b/x", "b/y", "b/z"])
                      if shape == 2 else rnd.choice([None, f"b/{n}", "b/x"]))
            rows.append((n, objkey, b"x" * rnd.randint(1, 50)))
        for g in pair:
            g.offer("t", rows[0][0], rows)

    for g in pair:
        for i, c in enumerate(credits):
            add_worker(g, f"w{i}", credit=c)
    publish(rnd.randint(20, 80))
    if seed % 5 == 0:
        for g in pair:
            g.stored = {("t", s) for s in range(1, n + 1) if s % 6 == 0}
    a, b = pair
    for step in range(rnd.randint(5, 25)):
        batch = rnd.randint(1, 32)
        for g in pair:
            g.dispatch(batch, 0.0)
        assert _state(a) == _state(b), (seed, step, "dispatch")
        kind = rnd.random()
        if kind < 0.08:
            s = rnd.randint(1, n)
            for g in pair:
                random.seed(seed * 1000 + step)  # the same backoff jitter for both
                g.fail("t", s, "boom", "E: boom", "p", False, now=0.0)
                g.due_retries(1e9)
        elif kind < 0.13:
            victim, grace, credit = rnd.choice([b"w0", b"w1", b"w2"]), rnd.choice([0.0, 10.0]), rnd.randint(1, 40)
            for g in pair:
                g.worker_gone(victim, lost=True, now=0.0, grace=grace)
                add_worker(g, victim.decode(), credit=credit)
        elif kind < 0.2:
            publish(rnd.randint(1, 30))
        else:
            owner = rnd.choice([b"w0", b"w1", b"w2"])
            held = sorted(s for t, s in a.workers[owner].inflight) if owner in a.workers else []
            if held and rnd.random() < 0.8:
                i = rnd.randrange(len(held))
                first, last = held[i], held[min(len(held) - 1, i + rnd.randint(0, 40))]
                if rnd.random() < 0.25:  # onto seqs it does not hold, or past the last loaded
                    first, last = max(1, first + rnd.randint(-5, 5)), last + rnd.randint(-3, 8)
            else:
                first = rnd.randint(1, n + 3)
                last = first + rnd.randint(0, 20)
            if last < first:
                continue
            before = _state(a)
            got = a.ack_range_of(owner, "t", first, last, 1.0)
            mine = [s for s in range(first, last + 1) if b.done_by(("t", s), owner, 1.0) is not None]
            foreign = sum(1 for s in range(first, last + 1) if s not in mine and not b.is_done("t", s))
            want = (sum(b.ack("t", s) for s in mine), foreign)
            assert got == want, (seed, step, owner, first, last)
            hits += _state(a) != before
        assert _state(a) == _state(b), (seed, step, kind)
    return hits


def test_a_workers_ack_of_what_it_holds_leaves_the_group_as_acking_each_seq_does() -> None:
    """Histories shaped like a loaded bus (the common ACK: a worker acking a run of seqs it holds, each event its own
    object, or none, or a few objects shared with events waiting behind them), with the uncommon mixed in: runs
    shifted onto another worker's events or past what was loaded, acks repeated after a redelivery, acks out of
    order above a gap, failures and charged attempts. Each ACK (`ack_range_of`) must leave the group exactly as
    acking each seq the worker may report done, one by one in order, does, and return the same counts."""
    assert sum(_bus_history(seed) for seed in range(300)) > 1000
