"""The delivery rules of a consumer group, without sockets."""

from __future__ import annotations

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
    running event; a heartbeat loss charges only the oldest event the worker held."""
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
    dead = g.worker_gone(b"w3", lost=True, now=100.0)
    assert [(d.item.seq, d.line) for d in dead] == [(2, "worker lost")], "the oldest delivered is the one charged"
    assert [(it.seq, it.attempts) for it in g.ready] == [(1, 0), (3, 0)]


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


def test_acking_a_range_is_acking_each_seq_in_order() -> None:
    """The ACK's compact form (`ack_range`) must leave a group exactly as acking each seq of the range one by one
    does: the watermark, acks above a gap, who holds each object and what waits behind it, in-flight tables,
    charged attempts, duplicates after a redelivery, seqs never delivered. Random histories, seeded."""
    import random

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
                    g.worker_gone(b"w1", lost=True, now=0.0)
                    add_worker(g, "w1", credit=10)
                g.dispatch(batch, 0.0)
            if op[0] == "ack":
                _, first, last = op
                got = by_range.ack_range("t", first, last)
                want = sum(by_seq.ack("t", s) for s in range(first, last + 1))
                assert got == want, (seed, op)
            assert _snapshot(by_range) == _snapshot(by_seq), (seed, op)


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
