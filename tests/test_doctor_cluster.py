"""`doctor` on the JetStream backend, against a real 3-node cluster and two real hubs.

What an operator needs from it: which NATS server is down (one line each), whether the topic streams' copies are
current, which hub dispatches each group -- and an error, not silence, when no hub does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
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
        lead = wait_for(lambda: dispatcher(a, b), 20, "a dispatcher for group g")
        with a.client() as c:
            c.publish("photos", {"bucket": "b", "key": "k"}, id="e1")
        rc, lines = doctor(b)
        assert not [ln for ln in lines if "no hub leads" in ln], lines
        assert [ln for ln in lines if ln.startswith("ok") and f"group g: hub {lead.cfg.hub.id} leads" in ln], lines
        assert [ln for ln in lines if ln.startswith("ok") and "topic 'photos'" in ln and "current" in ln], lines
        assert [ln for ln in lines if ln.startswith("ok") and "group g:" in ln and "not yet acked" in ln], lines

        # One NATS node down: its own error line, and the stream replica it held is reported offline.
        cluster.kill(2)
        down = cluster.urls[2]

        def after_kill() -> list[str] | None:
            rc, lines = doctor(a)
            replica = [ln for ln in lines if ln.startswith("WARN") and "topic 'photos'" in ln
                       and ("offline" in ln or "behind" in ln)]
            return lines if rc == 1 and replica else None

        lines = wait_for(after_kill, 30, "doctor to see the stream replica on the dead node")
        errs = [ln for ln in lines if ln.startswith("ERROR") and "[journal] server" in ln]
        assert len(errs) == 1 and down in errs[0] and "not reachable" in errs[0] and "-- fix:" in errs[0], lines
        assert [ln for ln in lines if ln.startswith("ok") and "group g: hub" in ln and "leads" in ln], lines
    finally:
        a.stop()
        b.stop()
