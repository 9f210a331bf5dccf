"""Hardened HTTP ingress: bearer-token rotation, TLS (+ client certificates), slow clients cut off, /metrics and
/healthz for loopback peers only. Real hub processes on loopback; the non-loopback peer runs in a private
network namespace."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bucketwire import config as config_mod
from tests.fixtures_hub import Stack, wait_for

GROUPS = '\n[groups.g]\ntopics = ["x"]\nplugins = []\n'
CE = json.dumps({"specversion": "1.0", "id": "e1", "source": "test", "type": "t", "topic": "x", "data": {}}).encode()


def hub_opts(s: Stack, lines: str) -> None:
    """Add settings to the stack's [hub] table (extra TOML can only add new tables)."""
    text = s.cfg_path.read_text()
    s.cfg_path.write_text(text.replace("heartbeat_timeout = 1.5\n", "heartbeat_timeout = 1.5\n" + lines + "\n", 1))
    s.cfg = config_mod.load(s.cfg_path)


def test_token_list_rotation(stack_factory, tmp_path):
    s = stack_factory(GROUPS)
    (tmp_path / "new-token").write_text("new-token-value\n")
    text = s.cfg_path.read_text().replace(
        'auth_token = "env:BW_TEST_TOKEN"', f'auth_token = ["env:BW_TEST_TOKEN", "file:{tmp_path / "new-token"}"]')
    s.cfg_path.write_text(text)
    s.start_hub()
    assert s.post("/events", CE)[0] == 200, "the old token works"
    assert s.post("/events", CE.replace(b"e1", b"e2"), token="new-token-value")[0] == 200, "and so does the new one"
    for bad in ("", "new-token-valu", "new-token-value2", "Test-token", "x" * 10_000):
        assert s.post("/events", CE.replace(b"e1", b"e3"), token=bad)[0] == 401, bad
    # a NUL is not a legal header character: the parser refuses the request before the token is looked at
    assert s.post("/events", CE.replace(b"e1", b"e3"), token="test-token\x00")[0] == 400
    code, _ = s.post("/events", CE.replace(b"e1", b"e4"), token="", headers={"Authorization": "Basic dGVzdA=="})
    assert code == 401
    assert s.status()["topics"]["x"]["head"] == 2


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_client_certificates(stack_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    s = stack_factory(GROUPS)
    hub_opts(s, f'tls_cert = "{pki["server.pem"]}"\ntls_key = "{pki["server.key"]}"\n'
                f'tls_client_ca = "{pki["ca.pem"]}"\nhttp_read_timeout = 2.0')
    s.hub_proc = s._spawn(["hub"], "hub")

    def https(cert: bool) -> int:
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        if cert:
            ctx.load_cert_chain(pki["client.pem"], pki["client.key"])
        c = http.client.HTTPSConnection("127.0.0.1", s.http_port, context=ctx, timeout=5)
        try:
            c.request("POST", "/events", body=CE, headers={"Authorization": f"Bearer {s.token}"})
            return c.getresponse().status
        finally:
            c.close()

    deadline = time.monotonic() + 20
    while True:
        try:
            assert https(True) == 200
            break
        except (ConnectionRefusedError, ConnectionResetError):
            assert time.monotonic() < deadline
            time.sleep(0.1)  # pacing: retry interval while the hub starts listening
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        https(False)  # no client certificate: refused in the handshake
    # plain HTTP on the TLS port gets nothing useful and does not disturb the server
    with socket.create_connection(("127.0.0.1", s.http_port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = raw.recv(100)
        except ConnectionResetError:
            got = b""
        assert b"200" not in got
    assert https(True) == 200, "still serving"


def test_tls_settings_must_come_in_pairs(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[hub]\ntls_cert = "x.pem"\n')
    with pytest.raises(config_mod.ConfigError, match="tls_key"):
        config_mod.load(p)


def test_slow_clients_are_cut_off_and_others_served(stack_factory):
    s = stack_factory(GROUPS)
    hub_opts(s, "http_read_timeout = 1.0\nhttp_idle_timeout = 0.6")
    s.start_hub()
    cut_after: list[float] = []
    trickling: list[int] = []

    def slowloris(head: bytes) -> None:
        c = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
        t0 = time.monotonic()
        try:
            c.sendall(head)
            trickling.append(1)
            for _ in range(60):  # one byte every 0.3 s: each read completes well inside the per-read timeout
                c.sendall(b"X")
                time.sleep(0.3)  # pacing: the trickle of a slow client
        except OSError:
            pass
        cut_after.append(time.monotonic() - t0)
        c.close()

    heads = [b"POST /events HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"GET /healthz HTTP/1.1\r\nHo",
             b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nAuthorization: Bearer test-token\r\n\r\n"]
    threads = [threading.Thread(target=slowloris, args=(heads[i % 3],)) for i in range(30)]
    for t in threads:
        t.start()
    wait_for(lambda: len(trickling) == 30, 20, "all slow clients connected and sending")
    t0 = time.monotonic()
    assert s.post("/events", CE)[0] == 200, "a normal client is served while 30 slow ones trickle"
    assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join(30)
    assert len(cut_after) == 30
    assert max(cut_after) < 5, cut_after  # cut at ~1 s (+ watchdog tick), not after 60 * 0.3 s
    assert s.healthy()


NETNS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, urllib.request, urllib.error
    from bucketwire import config
    from bucketwire.hub.loop import Hub
    from bucketwire.hub.ingress import serve
    cfg = config.parse(config.tomllib.loads(sys.argv[1]), "netns.toml")
    hub = Hub(cfg)
    srv = serve(hub, cfg.hub.http)
    threading.Thread(target=hub.run, daemon=True).start()
    hub.ready.wait(10)
    out = {}
    for host in ("127.0.0.1", "10.99.0.1"):
        for path in ("/metrics", "/healthz"):
            try:
                with urllib.request.urlopen(f"http://{host}:9100{path}", timeout=5) as r:
                    out[f"{host}{path}"] = r.status
            except urllib.error.HTTPError as e:
                out[f"{host}{path}"] = e.code
    hub.stop()
    print(json.dumps(out))
""")


@pytest.mark.parametrize("public", [False, True])
def test_metrics_loopback_only_unless_public(tmp_path, public):
    """In a private network namespace the hub listens on 0.0.0.0 and is reached from a non-loopback address."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (network namespaces)")
    toml = textwrap.dedent(f"""
        [hub]
        http = "0.0.0.0:9100"
        publish = "tcp://127.0.0.1:9101"
        work = "tcp://127.0.0.1:9102"
        state_dir = "{tmp_path / 'state'}"
        metrics_public = {str(public).lower()}
    """)
    cmd = ("ip link set lo up && ip addr add 10.99.0.1/32 dev lo && "
           f"exec {sys.executable} -c \"$SCRIPT\" \"$TOML\"")
    env = {**os.environ, "SCRIPT": NETNS_SCRIPT, "TOML": toml}
    r = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=60, env=env)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("network namespaces not permitted here")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["127.0.0.1/metrics"] == 200 and got["127.0.0.1/healthz"] == 200
    want = 200 if public else 403
    assert got["10.99.0.1/metrics"] == want and got["10.99.0.1/healthz"] == want


def test_a_refused_token_is_logged_once_per_window_without_the_token(stack_factory):
    """A MinIO whose `auth_token` is stale gets 401 for every event and keeps them in its queue_dir; the hub's log
    said nothing of it (only a counter moved), so nothing there told the operator why events stopped arriving.
    Now a 401 is one warning naming the peer and what was wrong -- never the token sent, nor the one expected --
    and a sender retrying in a loop still gets one line per 10 s."""
    s = stack_factory(GROUPS)
    s.start_hub()
    wrong = "stale-token-0123456789abcdef"
    for tok in (wrong, wrong, ""):
        code, resp = s.post("/events", CE, token=tok)
        assert code == 401, resp
    for header in ("Basic dXNlcjpwdw==", "stale-token-sent-bare", "Stale-token-with-a-space x"):
        code, resp = s.post("/events", CE, headers={"Authorization": header}, token="")
        assert code == 401, resp
    log = s.logs[0].read_text()
    lines = [ln for ln in log.splitlines() if "bearer token" in ln]
    assert len(lines) == 1, log  # the hub writes its line before it answers: all four are in by now
    assert "peer=127.0.0.1" in lines[0] and "matches none of the 1 configured token" in lines[0], lines[0]
    for secret in (wrong, s.token, "dXNlcjpwdw", "stale-token", "Stale-token"):
        assert secret not in log, (secret, log)
    assert s.status()["topics"] == {}, "nothing committed"
