"""The HA setup attacked from outside: a frozen dispatcher, wrong settings, a copied config, dead endpoints in a
client's list, and a cluster that goes away.

Each test is what an operator or a hostile network does to a real 3-node NATS cluster and real hubs and workers:
the zombie leader (a hub frozen past its lease, then resumed) must not move a cursor or keep dispatching; every
wrong setting is refused at start with one line that names what to fix; two hubs given the same `[hub] id` do not
both dispatch; a client whose first endpoint is dead reaches the next; a hub that cannot commit answers 503 and
resumes when the cluster is back, with nothing accepted lost.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")

from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server  # noqa: E402
from bucketwire.hub.journal import Batch  # noqa: E402
from bucketwire.hub.journal_jetstream import JetStreamError, JetStreamJournal, JetStreamSettings  # noqa: E402
from bucketwire.procutil import free_port  # noqa: E402
from tests.fixtures_hub import wait_for  # noqa: E402

try:
    find_nats_server()
except NatsError as e:  # pragma: no cover - only without the extra
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats"), size=3) as c:
        yield c


def _servers(urls: list[str]) -> str:
    return "[" + ", ".join(f'"{u}"' for u in urls) + "]"


def _hub_config(tmp: Path, journal: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "hub.toml"
    cfg.write_text(f"""
[hub]
http = "127.0.0.1:{free_port()}"
work = "tcp://127.0.0.1:{free_port()}"
publish = "tcp://127.0.0.1:{free_port()}"
state_dir = "{tmp / 'state'}"
""" + journal)
    cfg.chmod(0o600)  # a literal password in a world-readable file is warned about, rightly; not what is tested
    return cfg


def _start_refused(cfg: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `bucketwire hub -c cfg` to its end: (exit code, stderr)."""
    import os

    p = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, **(env or {})})
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
            runs = {name: pool.submit(_start_refused, _hub_config(tmp_path / f"c{i}", journal), env)
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
