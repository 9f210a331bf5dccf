"""The JetStream journal under the crashes an operator's machines have: the NATS node that leads a stream killed
while events flow, every node killed at once, a node whose disk was replaced.

The promise under test (README "Guarantees", "What can repeat"): every event a hub PUBACKed is handled at least
once, per object in order, and what is handled twice is bounded by what was in flight at each fault. The
publishers here act as real senders do: a refused or unanswered batch is sent again until it is acknowledged,
and only what was acknowledged is owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")

from bucketwire.client import HubClient, HubRefused, HubUnavailable  # noqa: E402
from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server  # noqa: E402
from bucketwire.envelope import Event  # noqa: E402
from tests.fixtures_backends import check_handled  # noqa: E402
from tests.fixtures_hub import Stack, wait_for  # noqa: E402
from tests.test_ha import dispatcher, two_hubs  # noqa: E402

try:
    find_nats_server()
except NatsError as e:  # pragma: no cover - only without the extra
    pytest.skip(str(e), allow_module_level=True)

KEYS = 20


def _leader(cluster: NatsCluster, stream: str) -> int:
    """The index of the node that leads `stream` now (asked until one does)."""
    import nats

    async def ask() -> str | None:
        nc = await nats.connect(servers=[n.url for n in cluster.nodes if n.proc is not None], connect_timeout=2)
        try:
            return str((await nc.jetstream(timeout=2.0).stream_info(stream)).cluster.leader)
        except Exception:  # noqa: BLE001 - no leader this moment: asked again
            return None
        finally:
            await nc.close()

    name = wait_for(lambda: asyncio.run(ask()), 30, f"a leader for {stream}")
    return next(i for i, n in enumerate(cluster.nodes) if n.name == name)


def _holds_every_stream(cluster: NatsCluster, node: int) -> bool:
    """Whether `node` leads, or is a current replica of, every stream of the cluster (a node started with an
    empty data directory catches up stream by stream)."""
    import nats

    name = cluster.nodes[node].name

    async def ask() -> bool:
        nc = await nats.connect(servers=[n.url for n in cluster.nodes if n.proc is not None], connect_timeout=2)
        try:
            infos = await nc.jetstream(timeout=2.0).streams_info()
            return bool(infos) and all(
                i.cluster is not None and (i.cluster.leader == name or any(
                    r.name == name and r.current and not r.offline for r in i.cluster.replicas or []))
                for i in infos)
        except Exception:  # noqa: BLE001 - a stream without a leader this moment: asked again
            return False
        finally:
            await nc.close()

    return asyncio.run(ask())


class Publisher:
    """Sends `ids` in batches through `s`, each batch again until the hub acknowledges it (as MinIO and the
    client do); `acked` is what the hubs owe. Gives up on a batch only after `patience` seconds of refusals."""

    def __init__(self, s: Stack, ids: list[str], patience: float = 60.0, pause: float = 0.1) -> None:
        self.s, self.ids, self.patience, self.pause = s, ids, patience, pause
        self.acked: list[str] = []
        self.refusals: list[str] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with HubClient(self.s.cfg, timeout=5) as c:
            for lo in range(0, len(self.ids), 20):
                batch = self.ids[lo:lo + 20]
                evs = [Event(id=i, source="bucketwire://test/crash", type="t", topic="photos",
                             data={"bucket": "b", "key": f"k{int(i.split('-')[1]) % KEYS}", "sleep": 0.002})
                       for i in batch]
                until = time.monotonic() + self.patience
                while True:
                    try:
                        c.publish_events(evs)
                        self.acked += batch
                        break
                    except (HubRefused, HubUnavailable) as e:
                        if "unavailable" not in str(e) and "no answer" not in str(e):
                            self.errors.append(f"{type(e).__name__}: {e}")
                            return
                        self.refusals.append(str(e))
                        if time.monotonic() > until:
                            self.errors.append(f"refused for {self.patience} s: {e}")
                            return
                        time.sleep(0.2)  # pacing: a sender's back-off before it sends again
                time.sleep(self.pause)  # pacing: a steady stream, so the faults land while it flows

    def start(self) -> Publisher:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(180)
        assert not self.thread.is_alive(), "the publisher did not finish"
        assert not self.errors, self.errors


def _pair(tmp: Path, cluster: NatsCluster) -> tuple[Stack, Stack, str]:
    a, b = two_hubs(tmp, cluster)
    prefix = next(line.split('"')[1] for line in a.cfg_path.read_text().splitlines()
                  if line.startswith("prefix"))
    return a, b, prefix


def _start(a: Stack, b: Stack, pool_at: Stack | None, processes: int) -> Stack:
    """Both hubs up (a first, so it takes the group's lease), then a pool of `processes` started from `pool_at`'s
    config (None: the dispatcher's) and joined at the dispatcher, which is returned."""
    a.start_hub()
    first: Stack = wait_for(lambda: dispatcher(a, b), 20, "a dispatcher for group g")
    b.start_hub()
    (pool_at or first).start_worker("g", processes, wait=False)
    wait_for(lambda: first.status()["groups"]["g"]["workers"] >= processes, 30, "the pool at the dispatcher")
    return first


def _handled_ids(a: Stack) -> set[str]:
    return {h["id"] for h in a.handled()}


def _acked(pubs: list[Publisher]) -> int:
    return sum(len(p.acked) for p in pubs)


@pytest.mark.parametrize("victim", ["events", "cursors", "leases"])
def test_killing_a_streams_leader_mid_stream_loses_nothing_acknowledged(tmp_path: Path, cluster: NatsCluster,
                                                                        victim: str) -> None:
    """SIGKILL the node leading the topic's stream (appends), the cursor bucket (acks) or the lease bucket while
    two publishers publish through both hubs and a pool acks at the dispatcher; the node comes back later. Every
    acknowledged event is handled, per object in order, and duplicates stay within what was in flight."""
    n = 1200
    a, b, prefix = _pair(tmp_path, cluster)
    try:
        _start(a, b, a, 2)
        ids = [f"ev-{i}" for i in range(n)]
        pubs = [Publisher(s, ids[k::2]).start() for k, s in enumerate((a, b))]
        stream = {"events": f"{prefix}_ev_photos", "cursors": f"KV_{prefix}_cursors",
                  "leases": f"KV_{prefix}_leases"}[victim]
        wait_for(lambda: _acked(pubs) >= n // 4, 60, "a quarter acknowledged")
        node = _leader(cluster, stream)
        cluster.kill(node)
        killed_at, handled_at = _acked(pubs), len(_handled_ids(a))
        wait_for(lambda: _acked(pubs) >= killed_at + n // 4, 60, "a quarter more acknowledged with the node down")
        wait_for(lambda: len(_handled_ids(a)) > handled_at + n // 8, 60, "events handled with the node down")
        cluster.restart(node)
        for p in pubs:
            p.join()
        acked = [i for p in pubs for i in p.acked]
        assert sorted(acked) == sorted(ids)
        wait_for(lambda: _handled_ids(a) >= set(acked), 90, f"all {n} acknowledged events handled")
        refusals = sum(len(p.refusals) for p in pubs)
        # In flight at the fault: 2 children x credit 16; a lost lease gives them back once more.
        dups = check_handled(a, acked, 2 * 2 * 16 + 20)
        print(f"\nleader of {victim} killed: {n} events, 0 lost, {dups} duplicates, {refusals} refused sends")
    finally:
        a.stop()
        b.stop()
        _restart_dead(cluster)


def _restart_all(cluster: NatsCluster) -> None:
    for i in range(len(cluster.nodes)):
        cluster.restart(i, ready=False)
    cluster.wait_ready(60)


def _restart_dead(cluster: NatsCluster) -> None:
    """After a test (passed or not): every node up again, so the module's next test starts on a whole cluster."""
    dead = [i for i, nd in enumerate(cluster.nodes) if nd.proc is None]
    for i in dead:
        cluster.restart(i, ready=False)
    if dead:
        cluster.wait_ready(60)


def test_every_node_killed_and_restarted_mid_stream_loses_nothing_acknowledged(tmp_path: Path,
                                                                              cluster: NatsCluster) -> None:
    """SIGKILL all three NATS nodes at once while events flow, start them again on the same data directories: the
    hubs recover without an operator (senders get 503 meanwhile and send again), and every acknowledged event is
    handled."""
    n = 1000
    a, b, prefix = _pair(tmp_path, cluster)
    try:
        _start(a, b, a, 2)
        ids = [f"ev-{i}" for i in range(n)]
        pubs = [Publisher(s, ids[k::2], patience=90).start() for k, s in enumerate((a, b))]
        wait_for(lambda: _acked(pubs) >= n // 3, 60, "a third acknowledged")
        for i in range(len(cluster.nodes)):
            cluster.kill(i)
        time.sleep(2)  # pacing: an outage long enough for every lease to lapse (lease_ttl 2 s)
        _restart_all(cluster)
        for p in pubs:
            p.join()
        acked = [i for p in pubs for i in p.acked]
        assert sorted(acked) == sorted(ids)
        wait_for(lambda: _handled_ids(a) >= set(acked), 90, f"all {n} acknowledged events handled")
        dups = check_handled(a, acked, 2 * 2 * 16 + 20)
        refusals = sum(len(p.refusals) for p in pubs)
        print(f"\nevery node killed: {n} events, 0 lost, {dups} duplicates, {refusals} refused sends")
    finally:
        a.stop()
        b.stop()
        _restart_dead(cluster)


def _read_or_none(read: Callable[[], list[str]]) -> list[str] | None:
    """`read()`, or None when the cluster says it is unavailable for the moment (a 503, a timeout)."""
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import ServiceUnavailableError

    try:
        return read()
    except (ServiceUnavailableError, NatsTimeout, TimeoutError):
        return None


def _stored_ids(cluster: NatsCluster, stream: str) -> list[str]:
    """The event ids of every message in `stream`, read from its leader."""
    import json

    import nats

    async def read() -> list[str]:
        nc = await nats.connect(servers=[nd.url for nd in cluster.nodes if nd.proc is not None], connect_timeout=2)
        try:
            js = nc.jetstream(timeout=5.0)
            deadline = time.monotonic() + 30
            while True:  # a stream without a leader answers its info with an empty state: not what it holds
                with contextlib.suppress(Exception):
                    info = await js.stream_info(stream)
                    if info.cluster is not None and info.cluster.leader:
                        break
                assert time.monotonic() < deadline, f"{stream}: no leader"
                await asyncio.sleep(0.2)  # pacing: waiting for the stream's leader election
            last = info.state.last_seq
            out = []
            for seq in range(1, last + 1):
                out.append(str(json.loads((await js.get_msg(stream, seq)).data)["id"]))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_node_whose_data_directory_was_wiped_rejoins_and_holds_its_share(tmp_path: Path,
                                                                           cluster: NatsCluster) -> None:
    """The node leading the topic's stream dies and its disk is replaced (data directory wiped); it is started
    again empty and rejoins. Then another node dies: the streams' quorum now needs the wiped node's copy. Every
    acknowledged event is still stored and handled."""
    n = 800
    a, b, prefix = _pair(tmp_path, cluster)
    stream = f"{prefix}_ev_photos"
    try:
        _start(a, b, a, 2)
        ids = [f"ev-{i}" for i in range(n)]
        pubs = [Publisher(s, ids[k::2]).start() for k, s in enumerate((a, b))]
        wait_for(lambda: _acked(pubs) >= n // 4, 60, "a quarter acknowledged")
        wiped = _leader(cluster, stream)
        cluster.kill(wiped)
        shutil.rmtree(cluster.nodes[wiped].store)
        cluster.restart(wiped)
        wait_for(lambda: _acked(pubs) >= n // 2, 60, "half acknowledged")
        # Before the next node dies the wiped one must hold its copy: killed while it still caught up (a suite run
        # did so), the streams had no quorum for over a minute and a publisher gave up.
        wait_for(lambda: _holds_every_stream(cluster, wiped), 60, "the wiped node caught up on every stream")
        other = (wiped + 1) % len(cluster.nodes)
        cluster.kill(other)
        for p in pubs:
            p.join()
        acked = [i for p in pubs for i in p.acked]
        assert sorted(acked) == sorted(ids)
        wait_for(lambda: _handled_ids(a) >= set(acked), 90, f"all {n} acknowledged events handled")
        # With one node down the cluster answers 503 now and then while its meta leader moves: read again then.
        stored = wait_for(lambda: _read_or_none(lambda: _stored_ids(cluster, stream)), 60, "the stream read back")
        assert not set(acked) - set(stored), f"acknowledged but not stored: {sorted(set(acked) - set(stored))[:10]}"
        assert len(stored) == len(set(stored)), "an event stored twice"
        dups = check_handled(a, acked, 3 * 2 * 16 + 20)
        print(f"\nwiped node rejoined: {n} events, 0 lost, {dups} duplicates")
    finally:
        a.stop()
        b.stop()
        _restart_dead(cluster)


def test_an_event_still_running_on_a_dead_dispatchers_worker_is_not_run_twice_at_once(tmp_path: Path,
                                                                                       cluster: NatsCluster) -> None:
    """The dispatcher is SIGKILLed while a worker runs a long handler (a large thumbnail): the handler goes on.
    The next dispatcher must not hand that event (or a later one of its object) to another worker while it still
    runs: README "Per-object order" says two events of an object are never in flight at once in a group. The
    worker's supervisor reports the run to every hub of its list (hub/reports.py); the next dispatcher holds it."""
    a, b, _ = _pair(tmp_path, cluster)
    release = tmp_path / "release"
    try:
        first = _start(a, b, None, 1)
        with first.client() as c:
            c.publish("photos", {"bucket": "b", "key": "big.jpg", "hold": str(release), "mark_start": True},
                      id="long")
        started = Path(str(a.record) + ".started")

        def runs() -> int:
            return len(started.read_text().splitlines()) if started.exists() else 0

        wait_for(lambda: runs() == 1, 30, "the long handler to start")
        first.kill_hub()
        other = b if first is a else a
        wait_for(lambda: dispatcher(a, b) is other, 30, "the standby to take over")
        other.start_worker("g", 2, wait=False)  # more workers, as the next host or an autoscaler brings
        with other.client() as c:
            c.publish("photos", {"bucket": "b", "key": "big.jpg"}, id="later")  # same object: waits behind it
            c.publish("photos", {"bucket": "b", "key": "small.jpg"}, id="after")
        # "after" comes behind "long" in the topic: once it is handled, the new dispatcher has handed out all
        # it would; a second run of "long" shows sooner.
        wait_for(lambda: runs() >= 2 or "after" in _handled_ids(a), 60, "the next event handled, or a second run")
        assert runs() == 1, "the event was run again while its first run still held it"
        assert "later" not in _handled_ids(a), "a later event of the object ran while an earlier one still ran"
        held = other.status()["groups"]["g"]["long_running"]
        assert [(r["seq"], r["key"]) for r in held] == [(1, "b/big.jpg")], held
        release.touch()
        # Its ACK went to the dead hub; the supervisor says the run ended: "long" goes back (uncharged) and the
        # later event of its object runs after it.
        wait_for(lambda: {"long", "later"} <= _handled_ids(a), 60, "the long event and the later one handled")
        ids = [h["id"] for h in a.handled()]
        assert ids.index("long") < ids.index("later"), ids
    finally:
        release.touch()
        a.stop()
        b.stop()
