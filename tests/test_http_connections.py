"""Connections to the webhook port that send nothing (or trickle a request, slowloris) cost the hub a file
descriptor each, before any token is checked. They used to be accepted until the hub's descriptors ran out: then
the ingress accepted nothing (asyncio logged a traceback per attempt), ZeroMQ could not accept a publisher or a
worker, and the journal's write probe failed, so the hub refused every publish as if the disk were full. Anyone
who could reach the port could stop the whole bus.

A real hub process with a low descriptor limit (256, soft and hard, as a service manager may set), and 300 idle
connections from an unauthenticated client: a webhook, a ZeroMQ publish and /healthz must still be answered.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from typing import Any

from tests.fixtures_hub import wait_for

FD_LIMIT = 256


def start_hub_with_fd_limit(s: Any) -> None:
    code = ("import resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
            f"sys.argv = ['bucketwire', 'hub', '-c', {str(s.cfg_path)!r}]; "
            "from bucketwire_start import main; main()")
    log = s.dir / "hub-limited.log"
    s.logs.append(log)
    s.hub_proc = subprocess.Popen([sys.executable, "-c", code], env=s.env, stdout=log.open("wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: s.healthy() or s.hub_proc.poll() is not None, 30, "hub /healthz")
    assert s.hub_proc.poll() is None, s.dump_logs()


def test_idle_connections_past_the_descriptor_limit_do_not_stop_the_hub(stack_factory: Any) -> None:
    s = stack_factory('[[routes]]\ntopic = "uploads"\n')
    start_hub_with_fd_limit(s)
    idle: list[socket.socket] = []
    try:
        for _ in range(FD_LIMIT + 44):
            c = socket.create_connection(("127.0.0.1", s.http_port), timeout=5)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            idle.append(c)
        # the hub has seen every one of them (accepted, or closed one to make room) once this is counted
        wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="http", reason="connections") > 0,
                 20, "connections over the limit to be counted")
        status, body = s.post("/minio/events", b'{"Records": [{"eventName": "s3:ObjectCreated:Put", '
                              b'"eventTime": "2026-11-30T00:00:00.000Z", "s3": {"bucket": {"name": "b"}, '
                              b'"object": {"key": "k.jpg", "size": 1, "eTag": "e"}}}]}')
        assert status == 200, (status, body)
        with s.client(10) as c:
            assert c.publish("uploads", {"n": 1})["seq"] >= 1
        assert s.healthy()
    finally:
        for c in idle:
            with contextlib.suppress(OSError):
                c.close()
    log = s.dump_logs()
    assert "Too many open files" not in log and "Traceback" not in log, log
