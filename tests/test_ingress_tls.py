"""The ingress's TLS against a real hub: a certificate that has expired (or is not valid yet) is said at start in
one line, and a flood of failed handshakes from strangers does not flood the log."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures_hub import Stack, sample_of, wait_for
from tests.test_security_ingress import GROUPS, hub_opts, make_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

CA_CONF = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = p
[p]
commonName = supplied
"""


def dated_cert(d: Path, start: str, end: str) -> tuple[Path, Path]:
    """A self-signed certificate valid from `start` to `end` (YYYYMMDDHHMMSSZ): `openssl ca` is the one openssl
    command that takes both dates."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text(CA_CONF)
    run = {"cwd": d, "check": True, "capture_output": True, "timeout": 60}
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "hub.key", "-out",
                    "hub.csr", "-subj", "/CN=hub"], **run)  # type: ignore[call-overload]
    subprocess.run(["openssl", "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "hub.key", "-in",
                    "hub.csr", "-out", "hub.pem", "-startdate", start, "-enddate", end], **run)  # type: ignore[call-overload]
    return d / "hub.pem", d / "hub.key"


def hub_log(s: Stack) -> str:
    return s.dump_logs(1_000_000)


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_a_certificate_out_of_its_dates_is_said_at_start_in_one_line(stack_factory, tmp_path: Path,
                                                                      when: str) -> None:
    """Every client that checks the hub's certificate (MinIO does) refuses one that has expired, so every webhook
    failed while the hub looked healthy; the only trace was a `TLS handshake failed` per attempt. The hub still
    starts (its ZeroMQ side does not need the certificate), and says so once, with the path, dates and fix."""
    start, end = (("20200101000000Z", "20200102000000Z") if when == "expired"
                  else ("20990101000000Z", "20990102000000Z"))
    cert, key = dated_cert(tmp_path / "pki", start, end)
    s = stack_factory(GROUPS)
    hub_opts(s, f'tls_cert = "{cert}"\ntls_key = "{key}"')
    s.hub_proc = s._spawn(["hub"], "hub")
    wait_for(lambda: s.status()["groups"].get("g") is not None, 30, "the hub serving ZeroMQ")
    lines = [line for line in hub_log(s).splitlines() if str(cert) in line]
    assert len(lines) == 1, hub_log(s)
    word = "expired" if when == "expired" else "not valid before"
    assert word in lines[0] and "tls_cert" in lines[0] and ("2020" in lines[0] or "2099" in lines[0]), lines[0]
    assert "Traceback" not in hub_log(s)
    assert s.hub_proc.poll() is None


def test_a_certificate_in_its_dates_says_nothing(stack_factory, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    s = stack_factory(GROUPS)
    hub_opts(s, f'tls_cert = "{pki["server.pem"]}"\ntls_key = "{pki["server.key"]}"')
    s.hub_proc = s._spawn(["hub"], "hub")
    wait_for(lambda: s.status()["groups"].get("g") is not None, 30, "the hub serving ZeroMQ")
    assert str(pki["server.pem"]) not in hub_log(s)


def https_metric(s: Stack, ca: Path, name: str, **labels: str) -> float:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://127.0.0.1:{s.http_port}/metrics")
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        return sample_of(r.read().decode(), name, labels)


def test_a_flood_of_failed_handshakes_is_counted_not_logged_each(stack_factory, tmp_path: Path) -> None:
    """Anyone who can reach the port can fail a handshake (plain HTTP on the TLS port), and each failure was an
    INFO line: a stranger with a loop filled the disk with them. Every failure is still counted; the line comes
    once per 10 s window, the next one saying how many were left out."""
    pki = make_pki(tmp_path / "pki")
    s = stack_factory(GROUPS)
    hub_opts(s, f'tls_cert = "{pki["server.pem"]}"\ntls_key = "{pki["server.key"]}"')
    s.hub_proc = s._spawn(["hub"], "hub")
    wait_for(lambda: s.status()["groups"].get("g") is not None, 30, "the hub serving ZeroMQ")
    t0 = time.monotonic()
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
            try:
                while c.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    wait_for(lambda: https_metric(s, pki["ca.pem"], "bucketwire_ingress_rejected_total", ingress="http",
                                  reason="tls") >= 100, 30, "100 handshake failures counted")
    windows = int((time.monotonic() - t0) // 10) + 1
    said = [line for line in hub_log(s).splitlines() if "TLS handshake failed" in line]
    assert 1 <= len(said) <= windows, f"{len(said)} lines in {windows} windows of 10 s"
