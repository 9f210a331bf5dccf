"""`doctor` on the JetStream backend, against a real 3-node cluster and two real hubs.

What an operator needs from it: which NATS server is down (one line each), whether the topic streams' copies are
current, which hub dispatches each group -- and an error, not silence, when no hub does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")

from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server  # noqa: E402
from tests.fixtures_hub import Stack, wait_for  # noqa: E402
from tests.test_ha import dispatcher, two_hubs  # noqa: E402

try:
    find_nats_server()
except NatsError as e:  # pragma: no cover - only without the extra
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats"), size=3) as c:
        yield c


def doctor(s: Stack) -> tuple[int, list[str]]:
    p = subprocess.run([sys.executable, "-m", "bucketwire", "doctor", "-c", str(s.cfg_path)], capture_output=True,
                       text=True, timeout=60, env=s.env)
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p.returncode, p.stdout.splitlines()


def wait_report(cond: Callable[[], list[str] | None], timeout: float, what: str, seen: list[str]) -> list[str]:
    """`wait_for`, failing with the last report doctor printed."""
    try:
        got: list[str] = wait_for(cond, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the last report:\n" + "\n".join(seen)) from None
    return got


def test_doctor_reports_servers_streams_leaders_and_a_dead_node(tmp_path: Path, cluster: NatsCluster) -> None:
    a, b = two_hubs(tmp_path, cluster)
    try:
        # No hub yet: the group has no leader, which is an error with its fix.
        rc, lines = doctor(a)
        assert rc == 1
        assert [ln for ln in lines if ln.startswith("ERROR") and "no hub leads group g" in ln
                and "-- fix:" in ln], lines
        for url in cluster.urls:
            assert [ln for ln in lines if ln.startswith("ok") and url in ln and "reachable" in ln], (url, lines)

        a.start_hub()
        b.start_hub()
        wait_for(lambda: dispatcher(a, b), 20, "a dispatcher for group g")
        with a.client() as c:
            c.publish("photos", {"bucket": "b", "key": "k"}, id="e1")

        def healthy() -> list[str] | None:
            """The whole report of a healthy cluster. Read until it holds: the leases here live 2 s, so on a
            loaded machine the group can change hands (and be led by nobody for a moment) between two reads,
            and a replica acknowledges the first write a moment after the leader."""
            rc, lines = doctor(b)
            lead = dispatcher(a, b)
            ok = (lead is not None and not [ln for ln in lines if "no hub leads" in ln]
                  and [ln for ln in lines if ln.startswith("ok") and f"group g: hub {lead.cfg.hub.id} leads" in ln]
                  and [ln for ln in lines if ln.startswith("ok") and "topic 'photos'" in ln and "current" in ln]
                  and [ln for ln in lines if ln.startswith("ok") and "group g:" in ln and "not yet acked" in ln])
            seen[:] = lines
            return lines if ok else None

        seen: list[str] = []
        wait_report(healthy, 30, "the report of a healthy cluster", seen)

        # One NATS node down: its own error line, and the stream replica it held is reported offline.
        cluster.kill(2)
        down = cluster.urls[2]

        def after_kill() -> list[str] | None:
            """Read until the report shows the dead node, the replica it held, and a hub leading: when the node
            held the lease bucket's leader, the lease is unavailable until a new one is elected and may pass to
            the other hub, with a moment where nobody leads (which doctor rightly reports as an error)."""
            rc, lines = doctor(a)
            replica = [ln for ln in lines if ln.startswith("WARN") and "topic 'photos'" in ln
                       and ("offline" in ln or "behind" in ln)]
            errs = [ln for ln in lines if ln.startswith("ERROR")]
            leads = [ln for ln in lines if ln.startswith("ok") and "group g: hub" in ln and "leads" in ln]
            seen[:] = lines
            return lines if rc == 1 and replica and leads and len(errs) == 1 else None

        lines = wait_report(after_kill, 30, "doctor to see the dead node, its stream replica and a leading hub", seen)
        errs = [ln for ln in lines if ln.startswith("ERROR")]
        assert "[journal] server" in errs[0] and down in errs[0] and "not reachable" in errs[0], lines
        assert "-- fix:" in errs[0], lines
    finally:
        a.stop()
        b.stop()
