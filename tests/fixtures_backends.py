"""The README's guarantees, run against both journal backends.

A test that takes `hub_stack` instead of `stack_factory` runs twice: `[sqlite]` with the embedded journal, and
`[jetstream]` with `[journal] backend = "jetstream"` on a real 3-node NATS JetStream cluster. The cluster is
started once per session (a few seconds) and shared: each test gets its own stream and KV `prefix`, so tests
never see each other's events, cursors or leases, and its streams and buckets are deleted after it, so the
cluster does not grow with the suite. Without nats-server or nats-py the jetstream runs are skipped with the
install hint, and the sqlite runs go on.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bucketwire import config as config_mod
from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server
from bucketwire.procutil import free_port
from tests.fixtures_hub import Stack, wait_for

BACKENDS = ["sqlite", "jetstream"]


def _running_cluster(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[NatsCluster]:
    pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")
    try:
        find_nats_server()
    except NatsError as e:
        pytest.skip(str(e))
    with NatsCluster(tmp_path_factory.mktemp(name), size=3) as c:
        yield c


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One real 3-node JetStream cluster on loopback for every jetstream run of the session."""
    yield from _running_cluster(tmp_path_factory, "nats-guarantees")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A 3-node cluster of the test module's own: for tests that kill and restart nodes, which would disturb
    every other test on the shared `nats_cluster`."""
    yield from _running_cluster(tmp_path_factory, "nats")


def hub_config(tmp: Path, tables: str) -> Path:
    """A hub config in `tmp` on free loopback ports, with `tables` (a `[journal]`, groups) after `[hub]`: for tests
    that start a hub by hand to watch it refuse or fail."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "hub.toml"
    cfg.write_text(f"""
[hub]
http = "127.0.0.1:{free_port()}"
work = "tcp://127.0.0.1:{free_port()}"
publish = "tcp://127.0.0.1:{free_port()}"
state_dir = "{tmp / 'state'}"
""" + tables)
    cfg.chmod(0o600)  # a literal password in a world-readable file is warned about, rightly; not what is tested
    return cfg


def check_handled(s: Stack, ids: list[str], max_dups: int) -> int:
    """Group g of `s` handled every one of `ids`, at most `max_dups` twice, and each object's events in order;
    returns the duplicates."""
    rec = [h for h in s.handled() if h["g"] == "g"]
    counts = Counter(h["id"] for h in rec)
    assert not set(ids) - set(counts), f"lost: {sorted(set(ids) - set(counts))[:10]}"
    dups = sum(n - 1 for n in counts.values())
    assert dups <= max_dups, dups
    per_key: dict[str, list[int]] = {}
    for h in rec:
        per_key.setdefault(h["key"], []).append(h["s"])
    for key, seqs in per_key.items():
        firsts = list(dict.fromkeys(seqs))
        assert firsts == sorted(firsts), f"object {key}: handled out of order {firsts[:20]}"
    return dups


def journal_table(cluster: NatsCluster, prefix: str, lease_ttl: float = 3.0) -> str:
    """`[journal]` for one test. A short lease, so a restarted hub takes its groups back in seconds; not shorter,
    so a hub loop slowed by a busy machine still renews in time (a lost and retaken lease redelivers what was in
    flight, which tests that count deliveries exactly would take for a bug)."""
    servers = ", ".join(f'"{u}"' for u in cluster.urls)
    return f"""
[journal]
backend = "jetstream"
servers = [{servers}]
replicas = 3
prefix = "{prefix}"
lease_ttl = {lease_ttl}
"""


class BackendStack(Stack):
    """A `Stack` whose journal is `backend`; with jetstream, `start_hub` returns once the hub dispatches every
    group its config names (it takes their leases on its first turns), as a sqlite hub does from the start."""

    def __init__(self, tmp: Path, extra: str = "", backend: str = "sqlite", journal: str = "", **kw: Any) -> None:
        super().__init__(tmp, extra, **kw)
        self.backend = backend
        if journal:
            self.cfg_path.write_text(self.cfg_path.read_text() + journal)
            self.cfg = config_mod.load(self.cfg_path)

    def start_hub(self) -> None:
        super().start_hub()
        if self.backend != "jetstream":
            return
        wanted = set(config_mod.load(self.cfg_path).groups)

        def leading() -> bool:
            roles = {g: d["role"] for g, d in self.status().get("dispatch", {}).items()}
            return all(roles.get(g) == "dispatching" for g in wanted)

        try:
            wait_for(leading, 30, "the hub to take its groups' dispatch leases")
        except AssertionError:
            raise AssertionError("hub did not take its groups:\n" + self.dump_logs()) from None


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def hub_stack(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., BackendStack]]:
    """Like `stack_factory`, with the journal of `backend`; every stack of one test shares one prefix."""
    cluster: NatsCluster | None = request.getfixturevalue("nats_cluster") if backend == "jetstream" else None
    prefix = "t" + uuid.uuid4().hex[:12]
    made: list[BackendStack] = []

    def make(extra: str = "", **kw: Any) -> BackendStack:
        d = tmp_path / f"stack{len(made)}"
        d.mkdir(parents=True, exist_ok=True)
        journal = journal_table(cluster, prefix) if cluster is not None else ""
        s = BackendStack(d, extra, backend=backend, journal=journal, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
    if cluster is not None:
        asyncio.run(_drop_prefix(cluster, prefix))


async def _drop_prefix(cluster: NatsCluster, prefix: str) -> None:
    """Delete the streams and KV buckets of one test's prefix (the cluster outlives the test)."""
    import nats

    nc = await nats.connect(servers=cluster.urls, connect_timeout=5)
    try:
        resp = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": 0}).encode(), timeout=10)
        names = json.loads(resp.data).get("streams") or []
        for name in names:
            if name.startswith((f"{prefix}_", f"KV_{prefix}_")):
                await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=10)
    finally:
        await nc.close()
