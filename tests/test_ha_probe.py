"""The HA setup attacked from outside: a frozen dispatcher, wrong settings, a copied config, dead endpoints in a
client's list, and a cluster that goes away.

Each test is what an operator or a hostile network does to a real 3-node NATS cluster and real hubs and workers:
the zombie leader (a hub frozen past its lease, then resumed) must not move a cursor or keep dispatching; every
wrong setting is refused at start with one line that names what to fix; two hubs given the same `[hub] id` do not
both dispatch; a client whose first endpoint is dead reaches the next; a hub that cannot commit answers 503 and
resumes when the cluster is back, with nothing accepted lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")

from bucketwire import config as config_mod  # noqa: E402
from bucketwire.client import HubClient  # noqa: E402
from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server  # noqa: E402
from bucketwire.envelope import Event  # noqa: E402
from bucketwire.hub.journal import Batch, NewEvent  # noqa: E402
from bucketwire.hub.journal_jetstream import JetStreamError, JetStreamJournal, JetStreamSettings  # noqa: E402
from bucketwire.procutil import free_port  # noqa: E402
from tests.fixtures_backends import check_handled, hub_config  # noqa: E402
from tests.fixtures_hub import Stack, wait_for  # noqa: E402

T = TypeVar("T")

try:
    find_nats_server()
except NatsError as e:  # pragma: no cover - only without the extra
    pytest.skip(str(e), allow_module_level=True)


def _servers(urls: list[str]) -> str:
    return "[" + ", ".join(f'"{u}"' for u in urls) + "]"


def _start_refused(cfg: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `bucketwire hub -c cfg` to its end: (exit code, stderr)."""
    import os

    p = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=45, env={**os.environ, **(env or {})})
    return p.returncode, p.stderr


# -- 2. wrong settings: one line each, no traceback, exit code != 0, naming what to fix ---------------------------
def test_bad_journal_settings_refuse_to_start_with_one_line(tmp_path: Path, cluster: NatsCluster) -> None:
    prefix = "bad" + uuid.uuid4().hex[:8]
    fast = "connect_timeout = 1.0\nrequest_timeout = 2.0\n"
    with (NatsCluster(tmp_path / "auth", size=1, user="bw", password="right") as authed,
          NatsCluster(tmp_path / "plain", size=1, jetstream=False) as plain):
        good = _servers(cluster.urls)
        cases: dict[str, tuple[str, list[str], dict[str, str]]] = {
            "replicas above the cluster size": (
                f'[journal]\nbackend = "jetstream"\nservers = {good}\nreplicas = 5\nprefix = "{prefix}"\n{fast}',
                ["replicas = 5", "at most"], {}),
            "replicas 0": (
                f'[journal]\nbackend = "jetstream"\nservers = {good}\nreplicas = 0\n', ["replicas"], {}),
            "an HTTP server, not NATS": (
                f'[journal]\nbackend = "jetstream"\nservers = ["nats://127.0.0.1:{cluster.nodes[0].http_port}"]\n'
                f'{fast}', ["[journal] servers"], {}),
            "a closed port": (
                f'[journal]\nbackend = "jetstream"\nservers = ["nats://127.0.0.1:{free_port()}"]\n{fast}',
                ["[journal] servers"], {}),
            "a wrong password": (
                f'[journal]\nbackend = "jetstream"\nservers = {_servers(authed.urls)}\nreplicas = 1\n'
                f'user = "bw"\npassword = "wrong"\n{fast}', ["[journal]", "user"], {}),
            "no password at all": (
                f'[journal]\nbackend = "jetstream"\nservers = {_servers(authed.urls)}\nreplicas = 1\n{fast}',
                ["[journal]", "user"], {}),
            "a password from an unset variable": (
                f'[journal]\nbackend = "jetstream"\nservers = {_servers(authed.urls)}\nreplicas = 1\n'
                f'user = "bw"\npassword = "env:BW_PROBE_UNSET"\n{fast}', ["BW_PROBE_UNSET"], {}),
            "a password from an empty variable": (
                f'[journal]\nbackend = "jetstream"\nservers = {_servers(authed.urls)}\nreplicas = 1\n'
                f'user = "bw"\npassword = "env:BW_PROBE_EMPTY"\n{fast}', ["BW_PROBE_EMPTY"],
                {"BW_PROBE_EMPTY": ""}),
            "a server without JetStream": (
                f'[journal]\nbackend = "jetstream"\nservers = {_servers(plain.urls)}\nreplicas = 1\n{fast}',
                ["-js"], {}),
            "a misspelt backend": (
                f'[journal]\nbackend = "jetstrem"\nservers = {good}\n', ["backend", "jetstream"], {}),
            "no servers": (
                '[journal]\nbackend = "jetstream"\nservers = []\n', ["servers"], {}),
        }
        with ThreadPoolExecutor(4) as pool:
            runs = {name: pool.submit(_start_refused, hub_config(tmp_path / f"c{i}", journal), env)
                    for i, (name, (journal, _, env)) in enumerate(cases.items())}
            results = {name: f.result() for name, f in runs.items()}
    problems = []
    for name, (rc, err) in results.items():
        print(f"{name}: {err.strip()}")
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        words = cases[name][1]
        if rc == 0 or "Traceback" in err or len(lines) != 1 or not all(w in lines[0] for w in words):
            problems.append(f"{name}: exit {rc}, wanted one line naming {words}, got:\n{err.strip()[-1500:]}")
    assert not problems, "\n\n".join(problems)


# -- 1. the zombie leader: frozen past its lease, then resumed ----------------------------------------------------
def _settings(cluster: NatsCluster, prefix: str, lease_ttl: float) -> JetStreamSettings:
    return JetStreamSettings(servers=cluster.urls, replicas=3, prefix=prefix, lease_ttl=lease_ttl,
                             connect_timeout=2.0, request_timeout=4.0)


def test_a_resumed_dispatcher_cannot_overwrite_the_new_dispatchers_cursor(cluster: NatsCluster) -> None:
    """A hub frozen between its lease check and its cursor write (a GC pause, a VM freeze) wakes up believing it
    still dispatches; its write is refused by revision, and it must not then write again over the new
    dispatcher's revision: the stored cursor stays the new dispatcher's."""
    s = _settings(cluster, "z" + uuid.uuid4().hex[:8], lease_ttl=1.0)
    a, b = JetStreamJournal(s, "hub-a"), JetStreamJournal(s, "hub-b")
    try:
        wait_for(lambda: "g" in a.lead(["g"], time.monotonic()), 10, "hub a to take the lease")
        a.commit(Batch(cursors={("g", "photos"): 3}))
        # a is frozen from here on: it renews nothing; b takes the lease once it expires and moves the cursor
        wait_for(lambda: "g" in b.lead(["g"], time.monotonic()), 10, "hub b to take the lease")
        b.load_group("g")
        assert b.cursors()[("g", "photos")] == 3
        b.commit(Batch(cursors={("g", "photos"): 7}))
        # a resumes mid-tick: its next cursor write goes out before its next lease round
        with contextlib.suppress(JetStreamError):
            a.commit(Batch(cursors={("g", "photos"): 4}))
        c = JetStreamJournal(s, "hub-c")
        try:
            assert c.cursors()[("g", "photos")] == 7, "the resumed hub overwrote the new dispatcher's cursor"
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_a_resumed_dispatcher_stores_nothing_for_the_group_once_its_lease_lapsed(cluster: NatsCluster) -> None:
    """The same freeze, resumed in the moment after the new dispatcher took the lease and read the cursors but
    before it wrote one: the revision the resumed hub knows is still the stored one, so only its own clock can stop
    its write. It must store no cursor, counter or retry count of the group (the new dispatcher goes on from what
    it read; a retry count the resumed hub purged would give a poison event a fresh round there). Its events are
    still committed: ingress needs no lease."""
    s = _settings(cluster, "y" + uuid.uuid4().hex[:8], lease_ttl=1.0)
    a, b = JetStreamJournal(s, "hub-a"), JetStreamJournal(s, "hub-b")
    try:
        wait_for(lambda: "g" in a.lead(["g"], time.monotonic()), 10, "hub a to take the lease")
        a.commit(Batch(cursors={("g", "photos"): 3}, attempts={("g", "photos", 5): 2}, due={("g", "photos", 5): 1.0},
                       waits={("g", "photos", 5): 7.5}, stats={"g": (1, 0, 0)}))
        wait_for(lambda: "g" in b.lead(["g"], time.monotonic()), 10, "hub b to take the lease")
        b.load_group("g")
        assert b.attempts_of("g") == {("photos", 5): 2}
        assert b.retries_due("g") == {("photos", 5): 1.0} and b.retry_waits("g") == {("photos", 5): 7.5}
        # a resumes mid-tick: the acks its tick gathered before the freeze go out with an event a publisher sent
        out = a.commit(Batch(events=[NewEvent("photos", "bucketwire://test/zombie", "z1", None,
                                              {"id": "z1", "topic": "photos", "seq": None})],
                             cursors={("g", "photos"): 4}, attempts={("g", "photos", 5): 0}, stats={"g": (1, 0, 0)}))
        assert out[0].seq == 1 and not out[0].duplicate
        c = JetStreamJournal(s, "hub-c")
        try:
            c.load_group("g")
            assert c.cursors()[("g", "photos")] == 3, "the resumed hub moved the cursor after its lease lapsed"
            assert c.attempts_of("g") == {("photos", 5): 2}, "the resumed hub reset a retry count"
            assert c.group_stats()["g"] == (1, 0, 0), "the resumed hub wrote the group's counters"
        finally:
            c.close()
        b.commit(Batch(cursors={("g", "photos"): 7}))  # the new dispatcher's writes go through
        assert b.cursors()[("g", "photos")] == 7
    finally:
        a.close()
        b.close()


def test_a_turn_held_up_past_the_lease_hands_out_no_work(tmp_path: Path, cluster: NatsCluster) -> None:
    """A hub's loop asks its leases once, at the start of a turn, then commits and dispatches. A turn held up
    between the two past the lease's end (the commit waiting out a stream's leader election, up to
    request_timeout, twice the default lease_ttl; a GC pause or SIGSTOP right there) must not then hand out the
    group's events: another hub may have taken the group meanwhile and be handing out the same ones. The hold-up
    is made by keeping the loop's thread in the real commit's return for longer than the lease, as a freeze
    there would; nothing renews the lease meanwhile, since only the loop starts lease rounds."""
    import zmq

    from bucketwire import protocol as P
    from bucketwire.envelope import SCHEMA_VERSION
    from bucketwire.hub.loop import Hub

    lease_ttl = 1.0
    cfgp = tmp_path / "bucketwire.toml"
    cfgp.write_text(f"""
[hub]
http = "127.0.0.1:{free_port()}"
publish = "tcp://127.0.0.1:{free_port()}"
work = "tcp://127.0.0.1:{free_port()}"
state_dir = "{tmp_path / 'state'}"

[journal]
backend = "jetstream"
servers = {_servers(cluster.urls)}
replicas = 3
prefix = "w{uuid.uuid4().hex[:8]}"
lease_ttl = {lease_ttl}

[groups.g]
topics = ["x"]
start = "earliest"
""")
    h = Hub(config_mod.load(cfgp))
    h.net.open()
    h._start(None)
    ctx = zmq.Context()
    pub, worker = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for sock in (pub, worker):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(h.cfg.hub.work)
    real_commit = h.journal.commit
    held: list[float] = []

    def commit_then_freeze(batch: Batch) -> Any:
        out = real_commit(batch)
        if batch.events and not held:
            held.append(time.monotonic())
            time.sleep(lease_ttl * 1.5)  # pacing: the freeze under test, past the whole lease
        return out

    def ready() -> None:
        worker.send_multipart([P.READY, json.dumps({"group": "g", "topics": ["x"], "credit": 10,
                                                    "schema": SCHEMA_VERSION, "proto": 3}).encode()])

    def deliveries(wait: float) -> list[int]:
        """What the worker was handed; told to go (the group lost here), it knocks again, as a worker does."""
        seqs = []
        while worker.poll(int(wait * 1000)):
            frames = worker.recv_multipart()
            if frames[0] == P.DELIVER:
                seqs += [int(e["seq"]) for e in json.loads(frames[2])]
            elif frames[0] == P.ERR:
                ready()
            wait = 0.05
        return seqs

    try:
        deadline = time.monotonic() + 20
        while "g" not in h.groups:  # its lease taken on the first turns
            assert time.monotonic() < deadline, "the hub did not take group g"
            h._turn()
        ready()
        while not h.groups["g"].workers:
            assert time.monotonic() < deadline, "the hub did not take group g and its worker"
            h._turn()
        h.journal.commit = commit_then_freeze  # type: ignore[method-assign]
        env = {"specversion": "1.0", "id": "e1", "source": "test", "type": "t", "topic": "x", "data": {}}
        pub.send_multipart([P.PUB, json.dumps({"req": 1, "events": [env]}).encode()])
        while not held:
            assert time.monotonic() < deadline, "the event was not committed"
            h._turn()
        assert deliveries(0.3) == [], "the turn held up past its lease handed out the group's work"
        h.journal.commit = real_commit  # type: ignore[method-assign]
        # Not lost: the hub drops the group, takes its lease again (no other hub wants it) and delivers it.
        got: list[int] = []
        deadline = time.monotonic() + 20
        while not got:
            assert time.monotonic() < deadline, "the event was never delivered once the lease was taken again"
            h._turn()
            got = deliveries(0)
        assert got == [1]
    finally:
        pub.close()
        worker.close()
        h.ops.close()
        h.net.close()
        h.journal.close()
        ctx.term()


class CursorWatch:
    """Every cursor write JetStream *stored* for one prefix, in order (refused writes are never seen): what the
    fencing promise is about."""

    def __init__(self, cluster: NatsCluster, prefix: str) -> None:
        self.docs: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._nc: Any = None
        asyncio.run_coroutine_threadsafe(self._start(cluster.urls, prefix), self._loop).result(20)

    async def _start(self, urls: list[str], prefix: str) -> None:
        import nats
        from nats.js.api import ConsumerConfig, DeliverPolicy

        self._nc = await nats.connect(servers=urls, connect_timeout=5)

        async def on_msg(m: Any) -> None:
            self.docs.append(json.loads(m.data))

        bucket = f"{prefix}_cursors"
        await self._nc.jetstream().subscribe(f"$KV.{bucket}.c.>", cb=on_msg, ordered_consumer=True,
                                             config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _ha_pair(tmp: Path, cluster: NatsCluster, prefix: str, lease_ttl: float, same_id: bool = False
             ) -> tuple[Stack, Stack]:
    """Two hubs on one cluster, two config files; each lists both hubs' endpoints, its own first; one record."""
    journal = f"""
[journal]
backend = "jetstream"
servers = {_servers(cluster.urls)}
replicas = 3
prefix = "{prefix}"
lease_ttl = {lease_ttl}

[groups.g]
topics = ["photos"]
plugins = []
start = "earliest"
"""
    a = Stack(_mk(tmp / "a"), journal)
    b = Stack(_mk(tmp / "b"), journal)
    for me, other in ((a, b), (b, a)):
        me.cfg_path.write_text(me.cfg_path.read_text() + f"""
[client]
work = ["tcp://127.0.0.1:{me.work_port}", "tcp://127.0.0.1:{other.work_port}"]
publish = ["tcp://127.0.0.1:{me.pub_port}", "tcp://127.0.0.1:{other.pub_port}"]
""")
    if same_id:  # the config copied from a and only its ports changed: the id stays a's
        for s in (a, b):
            s.cfg_path.write_text(s.cfg_path.read_text().replace("[hub]\n", '[hub]\nid = "copied-hub"\n', 1))
    b.cfg_path.write_text(b.cfg_path.read_text().replace(str(b.record), str(a.record)))
    b.record = a.record
    for s in (a, b):
        s.cfg = config_mod.load(s.cfg_path)
    return a, b


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _role(s: Stack, group: str = "g") -> str | None:
    try:
        return str(s.status()["dispatch"][group]["role"])
    except Exception:  # noqa: BLE001 - a hub starting, frozen or dying has no role to report
        return None


def test_a_frozen_dispatcher_is_fenced_when_it_resumes(tmp_path: Path, cluster: NatsCluster) -> None:
    """SIGSTOP the dispatching hub past lease_ttl while events flow: the standby takes over no sooner than the
    lease allows and dispatches; on SIGCONT the resumed hub stores no cursor, stops dispatching the group and
    sends workers on; the group ends with 0 lost, duplicates bounded by what was in flight, per-object order."""
    lease_ttl, n, keys = 3.0, 400, 20
    prefix = "zz" + uuid.uuid4().hex[:8]
    a, b = _ha_pair(tmp_path, cluster, prefix, lease_ttl)
    watch: CursorWatch | None = None
    try:
        a.start_hub()
        wait_for(lambda: _role(a) == "dispatching", 20, "hub a to dispatch g")
        b.start_hub()
        a.start_worker("g", 2, wait=False)
        wait_for(lambda: a.status()["groups"]["g"]["workers"] >= 2, 30, "the pool at hub a")
        watch = CursorWatch(cluster, prefix)
        ids = [f"z-{i}" for i in range(n)]
        errors: list[str] = []

        def publish() -> None:
            with HubClient(b.cfg, timeout=30) as c:  # through the standby, which stays up throughout
                for lo in range(0, n, 20):
                    evs = [Event(id=i, source="bucketwire://test/zombie", type="t", topic="photos",
                                 data={"bucket": "b", "key": f"k{int(i.split('-')[1]) % keys}", "sleep": 0.005})
                           for i in ids[lo:lo + 20]]
                    try:
                        c.publish_events(evs)
                    except Exception as e:  # noqa: BLE001 - reported by the test
                        errors.append(f"{type(e).__name__}: {e}")
                        return

        pub = threading.Thread(target=publish)
        pub.start()
        wait_for(lambda: len(a.handled()) >= n // 4, 60, "a quarter handled")
        assert a.hub_proc is not None
        a.hub_proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            wait_for(lambda: _role(b) == "dispatching", lease_ttl + 20, "hub b to take over")
            took = time.monotonic() - frozen_at
            print(f"\nfrozen dispatcher: lease_ttl {lease_ttl} s, standby took over after {took:.2f} s")
            # The lease was renewed at most lease_ttl / 3 before the freeze: taking it sooner than the rest of
            # its life would mean two dispatchers.
            assert took >= lease_ttl * 2 / 3, took
            handled_at_takeover = len(a.handled())
            wait_for(lambda: len(a.handled()) > handled_at_takeover + 20, 60, "hub b to dispatch")
            stored_before = len(watch.docs)
        finally:
            a.hub_proc.send_signal(signal.SIGCONT)
        wait_for(lambda: "stopped dispatching group" in a.dump_logs(), 20, "the resumed hub to drop the group")
        assert _role(a) == "standby"
        pub.join(120)
        assert not errors, errors
        wait_for(lambda: {h["id"] for h in a.handled()} >= set(ids), 120, f"all {n} handled")
        wait_for(lambda: b.status()["groups"]["g"]["lag"] == 0, 30, "every event acked at hub b")
        assert a.status()["groups"].get("g") is None  # nothing dispatched, no workers kept at the resumed hub
        dups = check_handled(a, ids, max_dups=2 * 16 + 40)
        print(f"frozen dispatcher: {n} events, 0 lost, {dups} duplicates")
        late = [d for d in watch.docs[stored_before:] if d.get("hub") == a.cfg.hub.id]
        assert not late, f"the resumed hub moved a cursor: {late[:3]}"
        assert any(d.get("hub") == b.cfg.hub.id for d in watch.docs), "hub b never stored a cursor"
    finally:
        if watch is not None:
            watch.close()
        if a.hub_proc is not None and a.hub_proc.poll() is None:
            a.hub_proc.send_signal(signal.SIGCONT)
        a.stop()
        b.stop()


# -- 3. a copied config: two hubs with one [hub] id ----------------------------------------------------------------
def test_a_second_hub_with_the_same_id_refuses_to_start(tmp_path: Path, cluster: NatsCluster) -> None:
    """An operator copies a hub's config, changes its ports and forgets `[hub] id`: the copy must not run beside
    the original (it would take the original's events for its own and skip them, and name itself as the
    dispatcher). It refuses to start with one line naming `[hub] id`; the original keeps dispatching; once the
    original is gone for good, the same config starts."""
    a, b = _ha_pair(tmp_path, cluster, "id" + uuid.uuid4().hex[:8], lease_ttl=2.0, same_id=True)
    try:
        a.start_hub()
        wait_for(lambda: _role(a) == "dispatching", 20, "hub a to dispatch g")
        rc, err = _start_refused(b.cfg_path, b.env)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc != 0 and "Traceback" not in err, err
        assert len(lines) == 1 and "[hub] id" in lines[0] and "copied-hub" in lines[0], err
        assert _role(a) == "dispatching"
        a.kill_hub()  # a crash leaves its presence behind for at most lease_ttl: the copy then starts
        b.start_hub()
        wait_for(lambda: _role(b) == "dispatching", 20, "hub b to dispatch g")
    finally:
        a.stop()
        b.stop()


# -- 4. clients with endpoint lists whose first hub is dead ---------------------------------------------------------
def test_clients_skip_a_dead_first_endpoint(tmp_path: Path) -> None:
    """`[client] work` / `publish` list a hub that is down (connection refused) first: a worker pool, publish,
    status, tail, replay and dlq all reach the live hub after it, without anyone editing the config."""
    live = Stack(_mk(tmp_path / "live"), '\n[groups.g]\ntopics = ["photos"]\nplugins = []\nstart = "earliest"\n')
    dead_work, dead_pub = free_port(), free_port()  # nothing listens there: connections are refused
    cfg = tmp_path / "client.toml"
    cfg.write_text(live.cfg_path.read_text() + f"""
[client]
work = ["tcp://127.0.0.1:{dead_work}", "tcp://127.0.0.1:{live.work_port}"]
publish = ["tcp://127.0.0.1:{dead_pub}", "tcp://127.0.0.1:{live.pub_port}"]
timeout = 15
""")
    env = live.env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(cfg)], capture_output=True,
                              text=True, timeout=60, env=env)

    tail: subprocess.Popen[str] | None = None
    try:
        live.start_hub()
        live.start_worker("g", 1, wait=False, cfg_path=cfg)
        tail = subprocess.Popen([sys.executable, "-m", "bucketwire", "tail", "photos", "--from-seq", "1", "-c",
                                 str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        with ThreadPoolExecutor(3) as pool:
            pub = pool.submit(cli, "publish", "photos", '{"bucket": "b", "key": "k1"}', "--id", "p1")
            st = pool.submit(cli, "status", "--json")
            dl = pool.submit(cli, "dlq", "list")
            for name, f in (("publish", pub), ("status", st), ("dlq list", dl)):
                r = f.result()
                assert r.returncode == 0, f"{name}: {r.stderr.strip()[-800:]}"
        assert '"g"' in st.result().stdout
        wait_for(lambda: {h["id"] for h in live.handled()} >= {"p1"}, 30, "the pool to handle p1")
        assert tail.stdout is not None
        printed: list[str] = []
        threading.Thread(target=lambda: printed.extend(tail.stdout or []), daemon=True).start()
        wait_for(lambda: printed, 30, "tail to print the event")
        assert json.loads(printed[0])["id"] == "p1"
        r = cli("replay", "-g", "g", "--from-seq", "1", "--timeout", "30")
        assert r.returncode == 0, r.stderr.strip()[-800:]
        wait_for(lambda: sum(h["id"] == "p1" for h in live.handled()) >= 2, 30, "p1 handled again after replay")
    finally:
        if tail is not None:
            tail.kill()
            tail.wait(10)
        live.stop()


# -- 5. the whole cluster down for a while ---------------------------------------------------------------------
def _healthz(s: Stack) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_a_cluster_outage_answers_503_then_resumes_with_nothing_lost(tmp_path: Path) -> None:
    """All three NATS nodes killed: webhooks and publishes get 503 / a refusal with one line, /healthz says why;
    the nodes restarted: publishes are accepted again and every event accepted before and after is handled."""
    with NatsCluster(tmp_path / "nats", size=3) as cluster:
        s = Stack(_mk(tmp_path / "hub"), f"""
[journal]
backend = "jetstream"
servers = {_servers(cluster.urls)}
replicas = 3
prefix = "out"
lease_ttl = 2.0
connect_timeout = 1.0
request_timeout = 2.0

[groups.g]
topics = ["photos"]
plugins = []
start = "earliest"
""")
        try:
            s.start_hub()
            wait_for(lambda: _role(s) == "dispatching", 20, "the hub to dispatch g")
            s.start_worker("g", 1)
            before = [f"b{i}" for i in range(30)]
            with s.client() as c:  # accepted: stored on a quorum; slow handlers leave most unhandled at the outage
                c.publish_events([Event(id=i, source="bucketwire://test/outage", type="t", topic="photos",
                                        data={"bucket": "b", "key": f"k{n % 5}", "sleep": 0.1})
                                  for n, i in enumerate(before)])
            for i in range(3):
                cluster.kill(i)
            code, body = 0, {}

            def refused() -> bool:
                nonlocal code, body
                code, body = s.post("/events", json.dumps({"specversion": "1.0", "id": "w1", "source": "test",
                                                           "type": "t", "topic": "photos", "data": {}}).encode())
                return code == 503

            wait_for(refused, 30, "a webhook to be refused with 503")
            assert "\n" not in str(body.get("error", "")) and "journal" in str(body.get("error", "")), body
            h_code, h_doc = wait_for(lambda: (h := _healthz(s))[0] == 503 and h, 30, "/healthz to answer 503")
            assert "NATS" in str(h_doc.get("reason", "")), h_doc  # why, in the journal's words
            p = subprocess.run([sys.executable, "-m", "bucketwire", "publish", "photos", '{"key": "x"}', "--id",
                                "refused", "--timeout", "5", "-c", str(s.cfg_path)], capture_output=True, text=True,
                               timeout=60, env=s.env)
            err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
            assert p.returncode != 0 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
            cluster.start()  # every node back on its ports and store
            wait_for(lambda: _healthz(s)[0] == 200, 60, "/healthz to answer 200 again")
            wait_for(lambda: s.post("/events", json.dumps({"specversion": "1.0", "id": "w2", "source": "test",
                                                           "type": "t", "topic": "photos",
                                                           "data": {"bucket": "b", "key": "w"}}).encode())[0] == 200,
                     30, "a webhook to be accepted again")
            with s.client(30) as c:
                c.publish("photos", {"bucket": "b", "key": "k-after"}, id="after")
            want = {*before, "w2", "after"}
            wait_for(lambda: {h["id"] for h in s.handled()} >= want, 90, "every accepted event handled")
            lost = want - {h["id"] for h in s.handled()}
            assert not lost and "refused" not in {h["id"] for h in s.handled()}
            assert s.hub_proc is not None and s.hub_proc.poll() is None, "the hub exited"
        except AssertionError:
            print(s.dump_logs())
            raise
        finally:
            s.stop()


def _cli(s: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(s.cfg_path)], env=s.env,
                          capture_output=True, text=True, timeout=60)


def test_dlq_retry_and_purge_through_the_standby_hub(tmp_path: Path, cluster: NatsCluster) -> None:
    """`dlq retry` asked of the hub that does not dispatch the failed event's group (the standby first in the
    operator's [client] list, as after a failover) retries it, rather than refuse it as a group that "no longer
    consumes" its topic, and the dispatcher delivers the retry; `dlq purge` through the standby works too."""
    from tests.test_ha import dispatcher, two_hubs

    a, b = two_hubs(tmp_path, cluster, '\n[topics.photos]\nmax_attempts = 1\n')
    try:
        a.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
        b.start_hub()
        a.start_worker("g", 1, wait=False)
        wait_for(lambda: a.status()["groups"]["g"]["workers"] >= 1, 30, "the worker at the dispatcher")
        with a.client() as c:  # each fails its first attempt: a retry (attempt 1 again) fails and dead-letters too
            c.publish("photos", {"bucket": "b", "key": "k1", "fail": 1}, id="retry-me")
            c.publish("photos", {"bucket": "b", "key": "k2", "fail": 1}, id="purge-me")
        wait_for(lambda: a.status()["groups"]["g"]["dead_lettered"] == 2, 30, "two dead letters")
        assert b.status()["dispatch"]["g"]["role"] == "standby"
        r = _cli(b, "dlq", "retry", "retry-me")  # b's config lists b first
        assert r.returncode == 0 and "retried 1" in r.stdout, r.stdout + r.stderr
        # The retry, committed by the standby, reached the dispatcher's worker: it failed there and came back.
        wait_for(lambda: a.status()["groups"]["g"]["dead_lettered"] == 3, 30, "the retry handled (and failed)")
        r = _cli(b, "dlq", "purge", "--all")
        assert r.returncode == 0 and "purged 2" in r.stdout, r.stdout + r.stderr
        r = _cli(b, "dlq", "list")
        assert r.returncode == 0 and "no dead letters waiting" in r.stdout, r.stdout + r.stderr
    finally:
        a.stop()
        b.stop()


def _on_cluster(cluster: NatsCluster, act: Callable[[Any], Awaitable[T]]) -> T:
    """Run `act(jetstream context)` on a connection of its own to the cluster, as an operator's tool would."""
    import nats

    async def run() -> T:
        nc = await nats.connect(servers=cluster.urls, connect_timeout=5)
        try:
            return await act(nc.jetstream(timeout=10))
        finally:
            await nc.close()

    return asyncio.run(run())


def _adhoc_seen_by_both(a: Stack, b: Stack) -> tuple[Stack, Stack]:
    """Start both hubs (a dispatching g) and a pool of an ad-hoc group `adhoc` (no hub's config names it) through
    each hub's config (its own hub first in [client] work: its workers knock there, and that hub then wants
    adhoc); once both hubs know the group, stop the pools. Returns (the hub that dispatches adhoc, the other one).

    One pool through b's config alone left it to timing: when b took the lease before its worker tried a, a never
    heard of adhoc."""
    from tests.test_ha import dispatcher

    a.start_hub()
    wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
    b.start_hub()
    pools = []
    for s in (b, a):
        pool_cfg = s.dir / "pool.toml"
        pool_cfg.write_text(s.cfg_path.read_text() + '\n[groups.adhoc]\ntopics = ["photos"]\nplugins = []\n')
        pools.append(s.start_worker("adhoc", 1, wait=False, cfg_path=pool_cfg))
    d = wait_for(lambda: next((s for s in (a, b) if s.status()["groups"].get("adhoc", {}).get("workers") == 2),
                              None), 30, "both pools at the hub that dispatches adhoc")
    o = b if d is a else a
    assert "adhoc" in o.status()["dispatch"], "the other hub never heard of adhoc: nothing to probe"
    for pool in pools:
        pool.send_signal(signal.SIGTERM)
    for pool in pools:
        assert pool.wait(30) == 0
    wait_for(lambda: d.status()["groups"]["adhoc"]["workers"] == 0, 10, "the pools gone")
    return d, o


def _kv_revision(cluster: NatsCluster, bucket: str, key: str) -> int:
    """The revision of one KV entry now (0 when absent)."""
    async def read(js: Any) -> int:
        try:
            return int((await (await js.key_value(bucket)).get(key)).revision or 0)
        except Exception:  # noqa: BLE001 - absent or deleted
            return 0

    return _on_cluster(cluster, read)


def test_a_removed_group_stays_removed_on_every_hub(tmp_path: Path, cluster: NatsCluster) -> None:
    """`group rm` on the dispatcher forgets an ad-hoc group on the whole cluster: the other hub, which also had
    the group's worker knock (and sent it on), does not take the released lease and bring the group back
    (stalled in `status` again, its cursors made anew from its `start`)."""
    from bucketwire.hub.journal_jetstream import token
    from tests.test_ha import two_hubs

    a, b = two_hubs(tmp_path, cluster)
    try:
        d, o = _adhoc_seen_by_both(a, b)
        r = _cli(d, "group", "rm", "adhoc")
        assert r.returncode == 0 and "removed group adhoc" in r.stdout, r.stdout + r.stderr
        # The released lease is free at once; each lease round of o renews its presence key and takes every free
        # lease it wants: two rounds after the removal, a hub that still wanted adhoc has taken it.
        bucket, presence = f"{o.cfg.journal.prefix}_leases", f"h.{token(o.cfg.hub.id)}"
        rev = _kv_revision(cluster, bucket, presence)
        wait_for(lambda: _kv_revision(cluster, bucket, presence) >= rev + 2, 20, "two lease rounds of the other hub")
        for s in (a, b):
            st = s.status()
            assert "adhoc" not in st["groups"], f"{s.cfg.hub.id} brought group adhoc back"
        assert _kv_revision(cluster, bucket, f"g.{token('adhoc')}") == 0, "adhoc's lease was taken again"
        # A pool started after the removal makes a new group of that name, through either hub.
        b.start_worker("adhoc", 1, wait=False, cfg_path=b.dir / "pool.toml")
        wait_for(lambda: any(s.status()["groups"].get("adhoc", {}).get("workers") for s in (a, b)), 30,
                 "a new group adhoc with the new pool")
    finally:
        a.stop()
        b.stop()


def test_operator_commands_for_a_group_the_asked_hub_never_saw(tmp_path: Path, cluster: NatsCluster) -> None:
    """`replay` and `group rm` of an ad-hoc group sent to a hub that never had its workers knock (started after
    they joined the dispatcher) reach the dispatcher, as for a configured group, instead of ending in "unknown
    group": the hub knows from the leases who dispatches it."""
    from tests.test_ha import dispatcher, two_hubs

    a, b = two_hubs(tmp_path, cluster)
    try:
        a.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
        pool_cfg = a.dir / "pool.toml"
        pool_cfg.write_text(a.cfg_path.read_text() + '\n[groups.adhoc]\ntopics = ["photos"]\nplugins = []\n')
        pool = a.start_worker("adhoc", 1, cfg_path=pool_cfg)
        b.start_hub()
        wait_for(lambda: b.status()["hub"].get("leases_age") is not None, 20, "hub b to read the leases")
        r = _cli(b, "replay", "--group", "adhoc", "--from-seq", "1", "--no-wait")
        assert r.returncode == 0, r.stdout + r.stderr
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
        wait_for(lambda: a.status()["groups"]["adhoc"]["workers"] == 0, 10, "the pool gone")
        r = _cli(b, "group", "rm", "adhoc")
        assert r.returncode == 0 and "removed group adhoc" in r.stdout, r.stdout + r.stderr
        assert "adhoc" not in a.status()["groups"]
    finally:
        a.stop()
        b.stop()


# -- 6. a cluster that has lost its quorum: the operator's commands ----------------------------------------------
def _timed_cli(s: Stack, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(s.cfg_path)], env=s.env,
                       capture_output=True, text=True, timeout=90)
    return r, time.monotonic() - t0


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed on stderr (asserted: exit != 0, one line, no traceback)."""
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


COMMANDS = (["group", "rm", "adhoc"], ["replay", "-g", "g", "--from-seq", "1", "--no-wait"],
            ["dlq", "retry", "retry-me"], ["dlq", "purge", "purge-me"], ["status"])


def test_operator_commands_while_the_cluster_has_lost_quorum(tmp_path: Path, cluster: NatsCluster) -> None:
    """Two of the three NATS nodes killed: each operator command through either hub is refused at once with one
    line naming the lost quorum and what to do (they waited for a dispatcher that could not come, then said "no
    answer from the hub ... is `bucketwire hub` running?"; `status` said nothing and exited 0); nothing of them
    is done meanwhile or later; with the nodes back the same commands work, the retry is committed once."""
    from tests.test_ha import dispatcher, two_hubs

    a, b = two_hubs(tmp_path, cluster, '\n[topics.photos]\nmax_attempts = 1\n')
    for s in (a, b):  # the refusals of dlq's commits come after request_timeout: short, so the test is
        s.cfg_path.write_text(s.cfg_path.read_text().replace(
            "lease_ttl = 2.0\n", "lease_ttl = 2.0\nrequest_timeout = 2.0\nconnect_timeout = 1.0\n", 1))
        s.cfg = config_mod.load(s.cfg_path)
    down: list[int] = []
    try:
        a.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
        b.start_hub()
        a.start_worker("g", 1, wait=False)
        pool_cfg = a.dir / "pool.toml"
        pool_cfg.write_text(a.cfg_path.read_text() + '\n[groups.adhoc]\ntopics = ["other"]\nplugins = []\n')
        pool = a.start_worker("adhoc", 1, wait=False, cfg_path=pool_cfg)
        wait_for(lambda: a.status()["groups"]["g"]["workers"] >= 1, 30, "the worker at the dispatcher")
        with a.client() as c:  # each fails its only attempt: two dead letters
            c.publish("photos", {"bucket": "b", "key": "k1", "fail": 1}, id="retry-me")
            c.publish("photos", {"bucket": "b", "key": "k2", "fail": 1}, id="purge-me")
        wait_for(lambda: a.status()["groups"]["g"]["dead_lettered"] == 2, 30, "two dead letters")
        at = wait_for(lambda: next((s for s in (a, b) if s.status()["groups"].get("adhoc", {}).get("workers")),
                                   None), 30, "the adhoc pool at the hub that dispatches adhoc")
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
        wait_for(lambda: at.status()["groups"]["adhoc"]["workers"] == 0, 10, "the adhoc pool gone")
        cursor = a.status()["groups"]["g"]["topics"]["photos"]["cursor"]
        for i in (1, 2):
            cluster.kill(i)
            down.append(i)
        for s in (a, b):
            wait_for(lambda s=s: s.status()["hub"].get("journal_error"), 30, "the hub to notice the lost quorum")
        with ThreadPoolExecutor(3) as workers:
            runs = {(s.cfg.hub.id, " ".join(args)): workers.submit(_timed_cli, s, *args)
                    for s in (a, b) for args in COMMANDS}
            for (hub, cmd), f in runs.items():
                line = _one_line(f.result()[0])
                assert "quorum" in line, f"{hub} {cmd}: {line}"
        for s in (a, b):
            assert "dispatching" not in json.dumps(s.status()["dispatch"])  # no hub dispatches meanwhile
        code, body = a.post("/events", json.dumps({"specversion": "1.0", "id": "w1", "source": "test",
                                                   "type": "t", "topic": "photos", "data": {}}).encode())
        assert code == 503, body
        for i in down:
            cluster.restart(i)
        down = []
        d = wait_for(lambda: dispatcher(a, b), 30, "a hub to dispatch g again")
        for s in (a, b):
            wait_for(lambda s=s: not s.status()["hub"].get("journal_error"), 30, "the hub to see the quorum back")
        # The refused replay (from seq 1) never moved the cursor back, and the refused removal left the group whole.
        # (The webhook refused with 503 may still be stored once the nodes are back, and handled: README.)
        assert d.status()["groups"]["g"]["topics"]["photos"]["cursor"] >= cursor
        assert "adhoc" in b.status()["dispatch"]

        def appends() -> bool:
            """The hubs see the quorum back before each stream has elected its leader again (a CI run's `dlq retry`
            could not append to photos within 2 s): an operator would wait for the bus to take events."""
            try:
                with b.client(5) as c:
                    c.publish("photos", {"bucket": "b", "key": "k2"}, id=f"probe-{uuid.uuid4()}")
                return True
            except Exception:
                return False

        wait_for(appends, 30, "photos to take events again")
        results = {}
        for args in COMMANDS:
            r, _ = _timed_cli(b, *args)
            results["".join(args[:2])] = r
            assert r.returncode == 0, f"{' '.join(args)}: {r.stdout}{r.stderr}"
        assert "removed group adhoc" in results["grouprm"].stdout
        assert "retried 1" in results["dlqretry"].stdout and "purged 1" in results["dlqpurge"].stdout
        with b.client() as c:
            _, bodies = c.fetch("photos", 1)
        retries = [e for e in map(json.loads, bodies) if str(e.get("source", "")).startswith("bucketwire://hub/retry")]
        assert len(retries) == 1, retries
    finally:
        for i in down:
            cluster.restart(i)
        a.stop()
        b.stop()


def test_dlq_retry_of_an_adhoc_group_through_a_hub_that_never_saw_it(tmp_path: Path, cluster: NatsCluster) -> None:
    """`dlq retry` of an ad-hoc group's dead letter sent to a hub its workers never reached (started after they
    joined the other) retries it: the hub reads the group's topics from its cursors in the cluster, instead of
    refusing the group as one that "no longer consumes" the topic; the dispatcher delivers the retry."""
    from tests.test_ha import dispatcher, two_hubs

    a, b = two_hubs(tmp_path, cluster, '\n[topics.photos]\nmax_attempts = 1\n')
    try:
        a.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
        pool_cfg = a.dir / "pool.toml"
        pool_cfg.write_text(a.cfg_path.read_text() + '\n[groups.adhoc]\ntopics = ["photos"]\nplugins = []\n')
        a.start_worker("adhoc", 1, cfg_path=pool_cfg)
        wait_for(lambda: a.status()["groups"].get("adhoc", {}).get("workers"), 30, "the adhoc pool at hub a")
        with a.client() as c:  # fails its only attempt in both groups (g has no workers: only adhoc handles it)
            c.publish("photos", {"bucket": "b", "key": "k1", "fail": 1}, id="retry-me")
        wait_for(lambda: a.status()["groups"]["adhoc"]["dead_lettered"] == 1, 30, "adhoc's dead letter")
        b.start_hub()
        assert "adhoc" not in b.status()["dispatch"], "hub b heard of adhoc: nothing to probe"
        r = _cli(b, "dlq", "retry", "--group", "adhoc", "--all")
        assert r.returncode == 0 and "retried 1" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: a.status()["groups"]["adhoc"]["dead_lettered"] == 2, 30, "the retry handled (and failed)")
    finally:
        a.stop()
        b.stop()


def _kv_last_seq(cluster: NatsCluster, bucket: str, key: str) -> int:
    """The stream seq of the last message of one KV key, delete and purge markers included (0: none left)."""
    async def read(js: Any) -> int:
        try:
            return int((await js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{key}")).seq or 0)
        except Exception:  # noqa: BLE001 - nothing left under the key
            return 0

    return _on_cluster(cluster, read)


def test_a_removed_group_stays_removed_past_the_markers_life(tmp_path: Path, cluster: NatsCluster) -> None:
    """The other hub, which wanted the ad-hoc group for a worker that knocked there, is frozen across the `group
    rm` and beyond the removal marker's life (the lease bucket's TTL, lease_ttl): when it resumes it does not take
    the free lease and bring the group back (nobody asked for it since its removal)."""
    from bucketwire.hub.journal_jetstream import token
    from tests.test_ha import two_hubs

    a, b = two_hubs(tmp_path, cluster)
    o = None
    try:
        d, o = _adhoc_seen_by_both(a, b)
        assert o.hub_proc is not None
        o.hub_proc.send_signal(signal.SIGSTOP)
        r = _cli(d, "group", "rm", "adhoc")
        assert r.returncode == 0 and "removed group adhoc" in r.stdout, r.stdout + r.stderr
        bucket, lease = f"{o.cfg.journal.prefix}_leases", f"g.{token('adhoc')}"
        wait_for(lambda: _kv_last_seq(cluster, bucket, lease) == 0, 30, "the removal marker to expire")
        o.hub_proc.send_signal(signal.SIGCONT)
        presence = f"h.{token(o.cfg.hub.id)}"
        seen = [wait_for(lambda: _kv_last_seq(cluster, bucket, presence), 20, "the resumed hub's presence")]
        for _ in range(2):  # two lease rounds of the resumed hub: one that still wanted adhoc has taken it
            seen.append(wait_for(lambda: (n := _kv_last_seq(cluster, bucket, presence)) > seen[-1] and n, 20,
                                 "a lease round of the resumed hub"))
        for s in (a, b):
            assert "adhoc" not in s.status()["groups"], f"{s.cfg.hub.id} brought group adhoc back"
        assert _kv_revision(cluster, bucket, lease) == 0, "adhoc's lease is held again"
    finally:
        if o is not None and o.hub_proc is not None and o.hub_proc.poll() is None:
            o.hub_proc.send_signal(signal.SIGCONT)
        a.stop()
        b.stop()


# -- 7. operator commands cut off half-way: nothing lost, a re-run finishes them ----------------------------------
def _update_stream(cluster: NatsCluster, stream: str, **changes: Any) -> None:
    """Change one stream's config on the cluster (what an outage of that stream alone looks like to a writer)."""
    import dataclasses

    async def update(js: Any) -> None:
        info = await js.stream_info(stream)
        await js.update_stream(dataclasses.replace(info.config, **changes))

    _on_cluster(cluster, update)


def _fast_journal(s: Stack) -> None:
    s.cfg_path.write_text(s.cfg_path.read_text().replace(
        "lease_ttl = 2.0\n", "lease_ttl = 2.0\nrequest_timeout = 2.0\nconnect_timeout = 1.0\n", 1))
    s.cfg = config_mod.load(s.cfg_path)


def test_dlq_retry_whose_retry_is_not_stored_leaves_the_dead_letter_waiting(tmp_path: Path,
                                                                           cluster: NatsCluster) -> None:
    """The retried event and the dead letter's "handled" marker go to two streams. The retry's stream takes no
    write (no stream listens on its subject: what a writer sees of a stream without a leader) while the marker's
    does: the command fails with one line and the dead letter is still waiting, not marked handled with no
    retry anywhere (a lost event). Once the stream takes writes again, `dlq retry` retries it exactly once. The
    marker's stream failing instead leaves the dead letter waiting with its retry stored, which a second run
    retries again (a duplicate of the stored one within duplicate_window)."""
    from bucketwire.hub.journal_jetstream import token
    from tests.test_ha import two_hubs

    a, _ = two_hubs(tmp_path, cluster, '\n[topics.photos]\nmax_attempts = 1\n')
    _fast_journal(a)
    stream = photos = f"{a.cfg.journal.prefix}_ev_{token('photos')}"
    marker_subject = ""
    parked = False
    try:
        a.start_hub()
        wait_for(lambda: _role(a) == "dispatching", 20, "hub a to dispatch g")
        a.start_worker("g", 1, wait=False)
        wait_for(lambda: a.status()["groups"]["g"]["workers"] >= 1, 30, "the worker")
        with a.client() as c:
            c.publish("photos", {"bucket": "b", "key": "k1", "fail": 1}, id="retry-me")
        wait_for(lambda: a.status()["groups"]["g"]["dead_lettered"] == 1, 30, "the dead letter")
        _update_stream(cluster, stream, subjects=[f"{a.cfg.journal.prefix}.parked"])
        parked = True
        r = _cli(a, "dlq", "retry", "retry-me")
        line = _one_line(r)
        print(f"\nretry refused: {line}")
        listed = _cli(a, "dlq", "list", "--json")
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1, (
            f"the dead letter is not waiting any more, and no retry was stored: {listed.stdout}{listed.stderr}")
        _update_stream(cluster, stream, subjects=[f"{a.cfg.journal.prefix}.ev.{token('photos')}"])
        parked = False
        r = _cli(a, "dlq", "retry", "retry-me")
        assert r.returncode == 0 and "retried 1" in r.stdout, r.stdout + r.stderr
        with a.client() as c:
            _, bodies = c.fetch("photos", 1)
        retries = [e for e in map(json.loads, bodies) if str(e.get("source", "")).startswith("bucketwire://hub/retry")]
        assert len(retries) == 1, retries
        # While the stream took no write hub a's commits failed, and it may have let g's lease go meanwhile: g is
        # missing from its status until it takes the lease back.
        wait_for(lambda: a.status()["groups"].get("g", {}).get("dead_lettered") == 2, 30,
                 "the retry handled (and failed)")
        listed = _cli(a, "dlq", "list")  # the retry's own dead letter waits; the first one is handled
        assert "dead-letter:1 " not in listed.stdout and "dead-letter:2 " in listed.stdout, listed.stdout
        # The other way round: the retry stored, its marker's stream takes no write. The dead letter stays
        # waiting; a second run retries it again, answered as a duplicate of the stored retry (README).
        marker_stream = f"{a.cfg.journal.prefix}_ev_{token('dead-letter.handled')}"
        marker_subject = f"{a.cfg.journal.prefix}.ev.{token('dead-letter.handled')}"
        _update_stream(cluster, marker_stream, subjects=[f"{a.cfg.journal.prefix}.parked"])
        stream, parked = marker_stream, True
        line = _one_line(_cli(a, "dlq", "retry", "dead-letter:2"))
        assert "retried event(s) were stored" in line and "stay listed" in line, line
        listed = _cli(a, "dlq", "list")
        assert "dead-letter:2 " in listed.stdout and "waiting" in listed.stdout, listed.stdout
        _update_stream(cluster, marker_stream, subjects=[marker_subject])
        parked = False
        r = _cli(a, "dlq", "retry", "dead-letter:2")
        assert r.returncode == 0 and "retried 1" in r.stdout, r.stdout + r.stderr
        with a.client() as c:
            _, bodies = c.fetch("photos", 1)
        retries = [e for e in map(json.loads, bodies) if str(e.get("source", "")).startswith("bucketwire://hub/retry")]
        assert len(retries) == 2, retries  # one per dead letter: the second run's retry was a duplicate
        assert "dead-letter:2 " not in _cli(a, "dlq", "list").stdout
    finally:
        if parked:
            subject = marker_subject if stream != photos else f"{a.cfg.journal.prefix}.ev.{token('photos')}"
            _update_stream(cluster, stream, subjects=[subject])
        a.stop()


def test_group_rm_cut_off_after_its_first_write_is_a_removal_a_rerun_finishes(tmp_path: Path,
                                                                              cluster: NatsCluster) -> None:
    """`group rm` stores the group's removal record, then purges its cursors. The purges are refused (the cursor
    bucket takes no purge: what a cluster failing between two writes looks like to the second): the command
    fails with one line, and the group is removed all the same on every hub, not half there (gone from the
    cluster's record, still dispatched by the hub that was asked). A new group of that name starts afresh, not
    from the old cursor left behind. `group rm` again, through the other hub, deletes what was left; once more,
    it says the group is removed (idempotent) instead of "unknown group"."""
    from bucketwire.hub.journal_jetstream import token
    from tests.test_ha import dispatcher, two_hubs

    a, b = two_hubs(tmp_path, cluster)
    for s in (a, b):
        _fast_journal(s)
    bucket = f"{a.cfg.journal.prefix}_cursors"
    cursor = f"c.{token('adhoc')}.{token('photos')}"
    broken = False
    try:
        a.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
        b.start_hub()
        pool_cfg = a.dir / "pool.toml"
        pool_cfg.write_text(a.cfg_path.read_text()
                            + '\n[groups.adhoc]\ntopics = ["photos"]\nplugins = []\nstart = "earliest"\n')
        pool = a.start_worker("adhoc", 1, wait=False, cfg_path=pool_cfg)
        d = wait_for(lambda: next((s for s in (a, b) if s.status()["groups"].get("adhoc", {}).get("workers")), None),
                     30, "the adhoc pool at the hub that dispatches adhoc")
        o = b if d is a else a
        with a.client() as c:
            c.publish("photos", {"bucket": "b", "key": "k1"}, id="e1")
        wait_for(lambda: _kv_revision(cluster, bucket, cursor), 30, "adhoc's cursor stored")
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
        wait_for(lambda: d.status()["groups"]["adhoc"]["workers"] == 0, 10, "the pool gone")
        _update_stream(cluster, f"KV_{bucket}", allow_rollup_hdrs=False)
        broken = True
        line = _one_line(_cli(d, "group", "rm", "adhoc"))
        print(f"\nhalf-done removal: {line}")
        assert "removed" in line and "group rm adhoc" in line, line
        assert _kv_revision(cluster, bucket, cursor), "the cursor is gone: the removal was not cut off half-way"
        for s in (a, b):
            assert "adhoc" not in s.status()["groups"], f"{s.cfg.hub.id} still has group adhoc"
        # A new group of that name, made while the old cursor is still stored, starts from its own `start`. The
        # old group may have handled e1 more than once (at least once: a worker moved between the hubs under
        # load has its ack dropped and the event redelivered), so the new group's run is what comes after.
        before = sum(h["id"] == "e1" for h in a.handled())
        pool = d.start_worker("adhoc", 1, wait=False, cfg_path=pool_cfg)
        wait_for(lambda: sum(h["id"] == "e1" for h in a.handled()) > before, 30, "e1 handled by the new group")
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
        # The new group is dispatched by whichever hub took its lease: under load its pool once went back and forth
        # between the hubs until the other one took it.
        d = wait_for(lambda: next((s for s in (a, b) if s.status()["groups"].get("adhoc", {}).get("workers") == 0),
                                  None), 10, "the new pool gone")
        o = b if d is a else a
        _one_line(_cli(d, "group", "rm", "adhoc"))  # cut off half-way again: its cursor is left
        _update_stream(cluster, f"KV_{bucket}", allow_rollup_hdrs=True)
        broken = False
        r = _cli(o, "group", "rm", "adhoc")  # through the hub that never dispatched it
        assert r.returncode == 0 and "removed group adhoc" in r.stdout and "deleted the 1 cursor" in r.stdout, (
            r.stdout + r.stderr)
        assert _kv_revision(cluster, bucket, cursor) == 0, "the cursor was left"
        for s in (o, d):  # again, through either hub: the group is removed, nothing else to do
            r = _cli(s, "group", "rm", "adhoc")
            assert r.returncode == 0 and "removed group adhoc" in r.stdout, r.stdout + r.stderr
    finally:
        if broken:
            _update_stream(cluster, f"KV_{bucket}", allow_rollup_hdrs=True)
        a.stop()
        b.stop()


def _stream_config(cluster: NatsCluster, stream: str) -> Any:
    async def read(js: Any) -> Any:
        return (await js.stream_info(stream)).config

    return _on_cluster(cluster, read)


def test_a_journal_made_with_other_settings_is_named_not_silently_used(tmp_path: Path, cluster: NatsCluster,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A hub started on a journal that hubs with other `[journal]` settings made: a changed `lease_ttl` or
    `replicas` is refused at start with one line naming the setting, the value on the cluster and what to do (both
    read 'stream name already in use with a different configuration; check ... limits and [journal] replicas',
    lease_ttl not named); a changed `duplicate_window` or retention is applied to the existing topic streams (it
    was ignored for them: the README's dedupe window silently stayed the old one); a prefix under which the
    cluster holds no journal while it holds another's is said in one warning line, not started silently."""
    import logging

    prefix = "cfg" + uuid.uuid4().hex[:8]
    base = dict(servers=cluster.urls, replicas=3, prefix=prefix, lease_ttl=5.0, connect_timeout=2.0,
                request_timeout=4.0, start_timeout=5.0)
    j = JetStreamJournal(JetStreamSettings(**base), "hub-a")  # type: ignore[arg-type]
    try:
        j.commit(Batch(events=[NewEvent("photos", "s", "e1", None, {"id": "e1", "topic": "photos", "seq": None})]))
    finally:
        j.close()
    fast = "connect_timeout = 2.0\nrequest_timeout = 4.0\nstart_timeout = 5.0\n"
    cases = {
        "lease_ttl": (f"replicas = 3\nlease_ttl = 3.0\n{fast}", ["lease_ttl = 3", "5 s", "every hub"]),
        "replicas": (f"replicas = 1\nlease_ttl = 5.0\n{fast}", ["replicas = 1", "3 replicas"]),
    }
    problems = []
    for name, (tail, words) in cases.items():
        cfg = hub_config(tmp_path / name, f'[journal]\nbackend = "jetstream"\nservers = {_servers(cluster.urls)}\n'
                                          f'prefix = "{prefix}"\n{tail}')
        rc, err = _start_refused(cfg)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        print(f"{name}: {err.strip()}")
        if rc == 0 or "Traceback" in err or len(lines) != 1 or not all(w in lines[0] for w in words):
            problems.append(f"{name}: exit {rc}, wanted one line naming {words}, got:\n{err.strip()[-1500:]}")
    assert not problems, "\n\n".join(problems)
    # Settings a hub may change: applied to the streams that exist, with one line each.
    with caplog.at_level(logging.INFO, logger="bucketwire.journal"):
        j = JetStreamJournal(JetStreamSettings(**{**base, "duplicate_window": 1200.0,  # type: ignore[arg-type]
                                                  "max_age": 86400.0}), "hub-a")
        j.close()
    cfg = _stream_config(cluster, f"{prefix}_ev_photos")
    assert (cfg.duplicate_window, cfg.max_age) == (1200.0, 86400.0), (cfg.duplicate_window, cfg.max_age)
    assert any("duplicate_window" in r.getMessage() or "duplicate_window" in str(r.__dict__) for r in caplog.records)
    # A prefix with no journal on a cluster that holds one: a warning naming the prefixes found.
    caplog.clear()
    other = "new" + uuid.uuid4().hex[:8]
    with caplog.at_level(logging.WARNING, logger="bucketwire.journal"):
        j = JetStreamJournal(JetStreamSettings(**{**base, "prefix": other}), "hub-b")  # type: ignore[arg-type]
        j.close()
    said = [str(r.__dict__) for r in caplog.records if "prefix" in r.getMessage()]
    assert said and any(prefix in s for s in said), [r.getMessage() for r in caplog.records]
    # ... and none when the prefix has its journal already.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bucketwire.journal"):
        j = JetStreamJournal(JetStreamSettings(**base), "hub-a")  # type: ignore[arg-type]
        j.close()
    assert not [r for r in caplog.records if "prefix" in r.getMessage()]


def test_a_renewal_whose_answer_was_lost_does_not_cost_the_lease(cluster: NatsCluster) -> None:
    """A lease renewal that JetStream stored but whose answer never came (the lease bucket's leader killed right
    after it stored it: the hub counts it as unanswered) leaves the bucket at a revision the hub does not know.
    Its next renewal, naming the old one, was refused and taken for a loss to another hub: the hub stopped
    dispatching, and since the entry was its own and alive no hub could take the group until it expired, then
    everything in flight was delivered again. The stored renewal is made here as the lost one was: this hub's
    own lease value, written over the revision it holds, its answer never read by the hub."""
    prefix = "r" + uuid.uuid4().hex[:8]
    s = _settings(cluster, prefix, lease_ttl=3.0)
    a, b = JetStreamJournal(s, "hub-a"), JetStreamJournal(s, "hub-b")
    try:
        wait_for(lambda: "g" in a.lead(["g"], time.monotonic()), 10, "hub a to take the lease")
        rev = a._leases["g"][0]

        async def landed(js: Any) -> int:
            ack = await js.publish(f"$KV.{prefix}_leases.g.g", a._lease_value,
                                   headers={"Nats-Expected-Last-Subject-Sequence": str(rev)})
            return int(ack.seq)

        stored = _on_cluster(cluster, landed)
        a._next_lease_round = 0
        assert a.lead(["g"], time.monotonic()) == {"g"}, "a renewal of its own that landed cost hub a the lease"
        wait_for(lambda: a._leasing is None and a._leases.get("g", (0, 0.0))[0] > stored, 10,
                 "hub a to renew over the revision its lost answer named")
        assert b.lead(["g"], time.monotonic()) == set()
        assert b.leaders()["g"] == "hub-a"
    finally:
        a.close()
        b.close()


def test_a_stranded_lease_leader_is_a_lost_quorum_not_another_hub(tmp_path: Path, cluster: NatsCluster) -> None:
    """The two NATS nodes that do not lead the lease bucket killed: its leader, alone, still takes the hubs'
    renewals but cannot commit them, and refuses the next renewal of a key whose last one is still in flight
    ("wrong last sequence", 10164) until it steps down. That is no answer from the cluster: each hub says the
    quorum is lost (status, /healthz), and neither says another hub uses its id or took its lease (both did, with
    the quorum reported only once the stranded leader gave up)."""
    from tests.test_ha import dispatcher, two_hubs

    a, b = two_hubs(tmp_path, cluster)
    prefix = a.cfg.journal.prefix
    down: list[int] = []
    try:
        a.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "hub a to take group g")
        b.start_hub()
        wait_for(lambda: "g" in b.status()["dispatch"], 20, "hub b to see group g")

        async def leader(js: Any) -> str:
            return str((await js.stream_info(f"KV_{prefix}_leases")).cluster.leader)

        lead = _on_cluster(cluster, leader)
        down = [i for i, n in enumerate(cluster.nodes) if n.name != lead]
        assert len(down) == 2, (lead, [n.name for n in cluster.nodes])
        for i in down:
            cluster.kill(i)
        for s in (a, b):
            err = wait_for(lambda s=s: s.status()["hub"].get("journal_error"), 60, "the hub to notice the lost quorum")
            assert "quorum" in err, err
            code, body = _healthz(s)
            assert code == 503 and "quorum" in json.dumps(body), (code, body)
        logs = "".join(p.read_text(errors="replace") for s in (a, b) for p in s.logs)
        assert "another running hub uses this" not in logs, logs
        assert "lost the dispatch lease to another hub" not in logs, logs
    finally:
        for i in down:
            cluster.restart(i)
        a.stop()
        b.stop()
