"""The worker child's per-event loop (`Child._work`, `handle`, the running record) run in-process on a batch in
hand: what the supervisor reads while each handler runs, what is acked and when, what is logged, and where a stop
ends the batch. Guards performance.md change 26 (the loop's per-event bookkeeping cut), and passes on the code
before it."""

from __future__ import annotations

import logging
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from bucketwire import Context, Event, hookimpl
from bucketwire.context import Stores
from bucketwire.worker import child as CH
from bucketwire.worker import plugin_loading as PL
from bucketwire.worker.running import RunningSlot

TIMEOUTS = {"a": 30.0, "b": 7.5}


class Recorder:
    """A plugin that notes, as its handler runs, the running record the supervisor would read and the clock."""

    def __init__(self, slot: RunningSlot, fail: set[int] = frozenset(), stop_at: int | None = None,
                 child: Any = None) -> None:
        self.slot, self.fail, self.stop_at, self.child = slot, fail, stop_at, child
        self.seen: list[tuple[Any, float, float]] = []  # (record, clock at the handler's start, at its return)

    @hookimpl
    def handle_event(self, event: Event, ctx: Context) -> None:
        t0 = time.monotonic()
        record = self.slot.read()
        if event.seq == self.stop_at:
            self.child.signals.stopped = True
        failed = event.seq in self.fail
        self.seen.append((record, t0, time.monotonic()))
        if failed:
            raise ValueError(f"no {event.seq}")


def make_child(rec_of: Any) -> tuple[Any, Recorder, list[bytes]]:
    slot = RunningSlot.private()
    child: Any = CH.Child.__new__(CH.Child)
    rec = rec_of(slot, child)
    loaded = PL.load([], [], entry_points=False, objects=[("rec", rec)])
    plugins: Any = CH.Plugins.__new__(CH.Plugins)
    PL.PluginRunner.__init__(plugins, loaded, {"rec": {}}, Stores({}), "g")
    plugins.metered, plugins.exhausted = False, None
    sent: list[bytes] = []
    signals = SimpleNamespace(stopped=False, keep=lambda during: None)
    child.plugins, child.slot, child.signals = plugins, slot, signals
    child.stopping = lambda: signals.stopped or plugins.exhausted is not None
    child.queue, child.acks, child.oks, child.ranges, child.refused = deque(), [], [], True, False
    child.timeouts = {}
    child.cfg = SimpleNamespace(handler_timeout=lambda group, topic: TIMEOUTS[topic])
    child.spec = SimpleNamespace(group="g", heartbeat_interval=60.0, heartbeat_timeout=120.0)
    child.dealer = SimpleNamespace(send_multipart=lambda frames, flags=0: sent.append(frames[1]))
    child.last_flush = child.last_hub = child.last_sent = child.now = time.monotonic()
    return child, rec, sent


def batch(n: int) -> list[tuple[int, Any, bool]]:
    """`n` events in hand as the typed read builds them, two topics in runs, with a refused envelope (no id) and
    one whose seq is unreadable among them."""
    items: list[tuple[int, Any, bool]] = []
    for i in range(n):
        topic = "a" if (i // 5) % 2 == 0 else "b"
        items.append((1 + i % 3, Event(id=f"e{i}", source="t", type="x", data={"i": i}, topic=topic, seq=i + 1,
                                       time="2026-12-02T16:00:00Z"), True))
    if n <= 12:
        return items
    items[10] = (1, {"specversion": "1.0", "source": "t", "type": "x", "topic": "a", "seq": "11"}, True)
    items[12] = (1, {"specversion": "1.0", "id": "x", "source": "t", "type": "x", "topic": "a", "seq": "x"}, True)
    return items


def test_the_running_record_names_each_event_from_after_the_last_handler_to_its_own(caplog: Any) -> None:
    child, rec, _ = make_child(lambda slot, child: Recorder(slot))
    items = batch(150)
    child.queue.extend(items)
    child._work()
    handled = [raw for _, raw, _ in items if type(raw) is Event]
    assert len(rec.seen) == len(handled)
    previous_end = 0.0
    for ev, (record, t0, t1) in zip(handled, rec.seen, strict=True):
        assert record is not None
        assert (record.topic, record.seq, record.timeout) == (ev.topic, ev.seq, TIMEOUTS[ev.topic])
        # started after the previous event's handler returned, before this one's ran: the timeout counts this
        # handler's time and nothing earlier
        assert previous_end <= record.started <= t0
        previous_end = t1
    assert child.slot.read() is None  # nothing running between batches


def _acked(frames: list[bytes]) -> tuple[list[int], dict[int, str]]:
    oks: list[int] = []
    failed: dict[int | None, str] = {}
    for f in frames:
        ack = msgspec.json.decode(f)
        assert ack["g"] == "g"
        for runs in ack.get("ok", {}).values():
            for first, last in runs:
                oks.extend(range(first, last + 1))
        for r in ack.get("results", []):
            assert not r["ok"]
            failed[r["s"]] = r["line"]
    return oks, failed


def test_every_outcome_is_acked_once_in_acks_of_at_most_ack_every() -> None:
    child, _, sent = make_child(lambda slot, child: Recorder(slot, fail={3, 77, 140}))
    child.queue.extend(batch(150))
    child._work()
    oks, failed = _acked(sent)
    assert sorted(oks + [s for s in failed if s is not None]) == [s for s in range(1, 151) if s != 13]
    assert set(failed) == {3, 11, None, 77, 140}  # 13's seq is unreadable: refused without one
    assert failed[77] == "ValueError: no 77"
    assert all(len(_acked([f])[0]) + len(_acked([f])[1]) <= CH.ACK_EVERY for f in sent)
    assert len(sent) >= -(-149 // CH.ACK_EVERY)


def test_debug_logs_each_handled_event() -> None:
    child, _, _ = make_child(lambda slot, child: Recorder(slot, fail={2}))
    child.queue.extend(batch(20))
    got: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = got.append  # type: ignore[method-assign]
    log = logging.getLogger("bucketwire.events")
    log.addHandler(handler)
    old = log.level
    try:
        log.setLevel(logging.DEBUG)
        child._work()
        log.setLevel(logging.INFO)
        child.queue.extend(batch(5))
        child._work()
    finally:
        log.setLevel(old)
        log.removeHandler(handler)
    assert [(r.getMessage(), r.topic, r.seq, r.attempt, r.follow_ons) for r in got] == [  # type: ignore[attr-defined]
        ("event handled", ev.topic, ev.seq, attempt, 0)
        for attempt, ev, _ in batch(20) if type(ev) is Event and ev.seq != 2]


@pytest.mark.parametrize("how", ["signal", "exhausted"])
def test_a_stop_ends_the_batch_after_the_event_in_hand(how: str) -> None:
    def recorder(slot: RunningSlot, child: Any) -> Recorder:
        return Recorder(slot, stop_at=30 if how == "signal" else None, child=child)
    child, rec, sent = make_child(recorder)
    items = batch(100)
    if how == "exhausted":
        child.plugins.exhausted = None
        orig = child.plugins.run

        def run(event: Event, attempt: int) -> list[Event]:
            out = orig(event, attempt)
            if event.seq == 30:
                child.plugins.exhausted = "out of memory"
            return out
        child.plugins.run = run
    child.queue.extend(items)
    child._work()
    assert [r.seq for r, _, _ in rec.seen][-1] == 30
    assert len(child.queue) == 70
    oks, failed = _acked(sent)
    assert max(oks + [s for s in failed if s is not None]) == 30


def test_each_context_has_its_own_follow_ons_and_ids() -> None:
    """A Context is made per plugin per event; its follow-ons and the counts their ids derive from are its own,
    however many were made before it and whether they published or not."""
    def ctx(i: int) -> Context:
        ev = Event(id=f"c{i}", source="t", type="x", data={}, topic="a", seq=i, time="2026-12-02T16:00:00Z")
        return Context("p", "g", {}, Stores({}), logging.getLogger("t"), ev, 1, {}, None)
    quiet, first, second = ctx(1), ctx(2), ctx(2)
    ids = [first.publish("out", {"n": n}).id for n in range(3)]
    assert len(set(ids)) == 3
    assert [second.publish("out", {"n": n}).id for n in range(3)] == ids  # a redelivery makes the same ids
    assert list(quiet.published) == [] and [e.id for e in first.published] == ids
    assert [e.data for e in second.published] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert ctx(3).published == ()


def test_a_child_takes_a_small_deliver_off_the_local_socket_in_one_read(tmp_path: Any) -> None:
    """At a modest rate each DELIVER is one small message: the child reads it, sees the read took all there was
    (`LocalDealer.more`) and goes to its handler without a second `recv` (which would fail, ~15 us before every
    handler). Two messages that came in one read are both taken."""
    import select

    import zmq

    from bucketwire import protocol as P
    from bucketwire.zmtp import LocalRouter
    from tests.test_local_socket import CountingSocket

    path = str(tmp_path / "w.sock")
    router = LocalRouter(path, 1 << 20)
    child, _, _ = make_child(lambda slot, child: Recorder(slot))
    child.endpoint, child.poller, child.ready = f"ipc://{path}", zmq.Poller(), b"{}"
    child.detour = CH.Detour()
    dealer = child._connect()
    try:
        got: list[list[bytes]] = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            dealer.readable()  # writes the greeting and READY
            select.select([router.fileno()], [], [], 0.05)
            while (m := router.receive()) is not None:
                got.append(m)
        ident = got[0][0]
        assert got[0][1] == P.READY

        counted = CountingSocket(dealer.st.sock)
        dealer.st.sock = counted

        def deliver(*seqs: int) -> list[bytes]:
            bodies = [msgspec.json.encode({"specversion": "1.0", "id": f"e{s}", "source": "t", "type": "x",
                                           "time": "2026-12-03T17:00:00Z", "topic": "a", "seq": str(s),
                                           "data": {"i": s}}) for s in seqs]
            return [ident, P.DELIVER, P.enc({"a": [1] * len(seqs), "r": True, "j": True}), P.joined(bodies)]

        assert router.send(deliver(1))
        assert select.select([child.poll_key], [], [], 10)[0]
        child._receive(True)
        assert [e.seq for _, e, _ in child.queue] == [1]
        assert counted.recvs == 1
        child.queue.clear()
        assert router.send(deliver(2)) and router.send(deliver(3))
        assert not router.by_ident[ident].out  # both written into the socket: one read takes them
        assert select.select([child.poll_key], [], [], 10)[0]
        child._receive(True)
        assert [e.seq for _, e, _ in child.queue] == [2, 3]
        assert counted.recvs == 2
    finally:
        dealer.close()
        router.close()
