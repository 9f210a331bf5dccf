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
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from tests.fixtures_hub import wait_for

FD_LIMIT = 256
FLOOD = 3 * FD_LIMIT
FLOODER = """
import select, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
clients = []
for _ in range(n):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00")
    c.setblocking(False)
    c.connect_ex(("127.0.0.1", port))
    clients.append(c)
deadline = time.monotonic() + 60
while any(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 2 for c in clients):  # TCP_SYN_SENT
    if time.monotonic() > deadline:
        print("still connecting after 60 s", flush=True)
        break
    select.select([], [], [], 0.05)
else:
    print("settled", flush=True)
sys.stdin.read()
"""
"""Opens `n` connections to the webhook port without waiting for any, says so once none is still connecting (the
kernel sends a SYN the full accept queue dropped again a second later, then 3, 7...), and holds them until stdin
closes."""


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


def listen_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the socket listening on `port`."""
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        f = line.split()
        if f[1].endswith(f":{port:04X}") and f[3] == "0A":  # LISTEN
            return int(f[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def test_a_connection_flood_keeps_the_hub_within_its_descriptor_budget(stack_factory: Any) -> None:
    """The hub gives the webhook half of its descriptors (a quarter for open connections, a quarter for those on
    their way in or out: ingress.serve) and keeps the other half for ZeroMQ and the journal. A flood faster than
    the hub's loop turns used to take more: asyncio accepted a full queue on every turn, and counted (and made
    room for) each connection two turns later. Sampled from outside, so a peak can slip between two samples;
    test_http_accept.py counts after every turn of a Server."""
    s = stack_factory('[[routes]]\ntopic = "uploads"\n')
    start_hub_with_fd_limit(s)
    pid = s.hub_proc.pid

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    base = fds()
    peak = 0
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            with contextlib.suppress(OSError):
                peak = max(peak, fds())
            time.sleep(0.0005)  # pacing: a sampler, not a deadline

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    flooders: list[subprocess.Popen[bytes]] = []
    try:
        # Two processes (one would share its GIL with the sampler) open nonblocking connections as fast as they
        # can: a client past a full accept queue does not wait (the kernel sends its SYN again a second later),
        # so the queue is full again on every turn of the hub's loop. Each holds them until its stdin closes.
        flooders = [subprocess.Popen([sys.executable, "-c", FLOODER, str(s.http_port), str(FLOOD // 2)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
        for f in flooders:
            assert f.stdout is not None
            said = f.stdout.readline()
            assert said == b"settled\n", said
        wait_for(lambda: listen_queue(s.http_port) == 0, 20, "the hub to take the queued connections")
        wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="http", reason="connections") > 0,
                 20, "connections over the limit to be counted")
        assert s.healthy()
    finally:
        sampling = False
        sampler.join(5)
        for f in flooders:
            f.communicate()
    # + 2: what the journal opens after start (a second handle on its WAL, the write probe's scratch file)
    assert peak - base <= FD_LIMIT // 2 + 2, f"{base} descriptors at start, {peak} during the flood"
    log = s.dump_logs()
    assert "Too many open files" not in log and "Traceback" not in log, log
