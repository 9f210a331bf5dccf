"""A renewed TLS certificate is served without a hub restart: real hub processes, real certificates (openssl),
renewed the way certbot does it (new files in an archive directory, the configured paths re-pointed), and a client
that reads the serial of the certificate each new connection is served."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
from pathlib import Path

import pytest

from tests.fixtures_hub import Stack, wait_for
from tests.test_ingress_tls import dated_cert, https_metric
from tests.test_security_ingress import _openssl, hub_opts, make_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

GROUPS = '\n[groups.g]\ntopics = ["x"]\nplugins = []\n'


def ce(i: int) -> bytes:
    return json.dumps({"specversion": "1.0", "id": f"e{i}", "source": "test", "type": "t", "topic": "x",
                       "data": {}}).encode()


def issue(pki: Path, name: str, days: int = 2) -> tuple[Path, Path, str]:
    """A new key and a certificate for 127.0.0.1 signed by the test CA: (cert, key, serial as OpenSSL prints it)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", str(days), "-extfile", "san.ext", cwd=pki)
    serial = ssl._ssl._test_decode_cert(str(pki / f"{name}.pem"))["serialNumber"]  # type: ignore[attr-defined]
    return pki / f"{name}.pem", pki / f"{name}.key", serial


class Certbot:
    """`live/cert.pem` and `live/key.pem` are symlinks into `archive/`; a renewal copies the new pair into the
    archive and re-points each link with an atomic rename, as certbot does."""

    def __init__(self, root: Path) -> None:
        self.live, self.archive = root / "live", root / "archive"
        self.live.mkdir(parents=True)
        self.archive.mkdir(parents=True)
        self.n = 0
        self.cert, self.key = self.live / "cert.pem", self.live / "key.pem"

    def renew(self, cert: Path, key: Path | None) -> None:
        """`key` None: the key's link points at a file that is not there (a renewal half lost)."""
        self.n += 1
        for src, link in ((cert, self.cert), (key, self.key)):
            dst = self.archive / f"{link.stem}{self.n}.pem"
            if src is not None:
                shutil.copyfile(src, dst)
            tmp = link.with_suffix(".new")
            tmp.symlink_to(dst)
            os.replace(tmp, link)


def served_serial(s: Stack, ca: Path) -> str | None:
    """The serial of the certificate a new connection is served (None while the hub does not answer)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    c = http.client.HTTPSConnection("127.0.0.1", s.http_port, context=ctx, timeout=5)
    try:
        c.connect()
        assert c.sock is not None
        return str(c.sock.getpeercert()["serialNumber"])  # type: ignore[index, union-attr]
    except OSError:
        return None
    finally:
        c.close()


def post(c: http.client.HTTPSConnection, s: Stack, body: bytes) -> int:
    c.request("POST", "/events", body=body, headers={"Authorization": f"Bearer {s.token}"})
    r = c.getresponse()
    r.read()
    return r.status


def tls_stack(stack_factory, tmp_path: Path, reload_interval: float) -> tuple[Stack, dict[str, Path], Certbot, str]:
    pki = make_pki(tmp_path / "pki")
    bot = Certbot(tmp_path / "le")
    cert, key, serial = issue(pki["ca.pem"].parent, "first")
    bot.renew(cert, key)
    s = stack_factory(GROUPS + f"\n[security]\nreload_interval = {reload_interval}\n")
    hub_opts(s, f'tls_cert = "{bot.cert}"\ntls_key = "{bot.key}"')
    s.hub_proc = s._spawn(["hub"], "hub")
    wait_for(lambda: served_serial(s, pki["ca.pem"]) == serial, 30, "the hub serving its first certificate")
    return s, pki, bot, serial


def not_after(cert: Path) -> float:
    return ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(str(cert))["notAfter"])  # type: ignore[attr-defined]


def hub_log(s: Stack) -> str:
    return s.dump_logs(1_000_000)


def test_sighup_serves_a_renewed_certificate_and_keeps_open_connections(stack_factory, tmp_path: Path) -> None:
    """A certificate renewed every 60-90 days (ACME) needed a hub restart: the pair was read at start only, so the
    hub served the old one until it expired and every webhook then failed the handshake. After `kill -HUP` new
    connections get the renewed certificate, and a keep-alive connection made before goes on, on its session."""
    s, pki, bot, first = tls_stack(stack_factory, tmp_path, reload_interval=3600)  # only SIGHUP reloads here
    old = http.client.HTTPSConnection("127.0.0.1", s.http_port, timeout=10,
                                      context=ssl.create_default_context(cafile=str(pki["ca.pem"])))
    assert post(old, s, ce(1)) == 200
    sock = old.sock
    expiry = "bucketwire_tls_cert_expiry_timestamp_seconds"
    assert https_metric(s, pki["ca.pem"], expiry) == not_after(bot.cert)
    cert, key, second = issue(pki["ca.pem"].parent, "second", days=30)
    assert second != first
    bot.renew(cert, key)
    assert s.hub_proc is not None
    s.hub_proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_serial(s, pki["ca.pem"]) == second, 20, "the renewed certificate served")
    assert https_metric(s, pki["ca.pem"], expiry) == not_after(cert), "the expiry gauge follows the renewal"
    assert post(old, s, ce(2)) == 200, "a connection opened before the reload is still served"
    assert old.sock is sock and old.sock.getpeercert()["serialNumber"] == first  # type: ignore[union-attr]
    old.close()
    assert s.status()["topics"]["x"]["head"] == 2
    lines = [line for line in hub_log(s).splitlines() if str(bot.cert) in line]
    assert len(lines) == 1 and second in lines[0], lines
    assert "Traceback" not in hub_log(s)


def test_a_renewal_is_picked_up_without_a_signal(stack_factory, tmp_path: Path) -> None:
    """certbot's deploy hook is easy to forget: the hub also looks at the files every [security] reload_interval,
    as it does for authorized_keys_dir."""
    s, pki, bot, first = tls_stack(stack_factory, tmp_path, reload_interval=0.5)
    cert, key, second = issue(pki["ca.pem"].parent, "second")
    bot.renew(cert, key)
    wait_for(lambda: served_serial(s, pki["ca.pem"]) == second, 20, "the renewed certificate served")
    assert s.hub_proc is not None and s.hub_proc.poll() is None


@pytest.mark.parametrize("broken", ["key-mismatch", "expired", "not-pem", "missing-key"])
def test_a_renewal_that_does_not_load_keeps_the_old_certificate(stack_factory, tmp_path: Path,
                                                                broken: str) -> None:
    """A bad renewal (a key from another pair, an expired certificate, a file that is not PEM, a link to a file
    that is gone) must not take HTTPS down: the old pair goes on serving, one line says what is wrong with the
    new files and how to fix it, and once they are fixed the new pair is served. The files are looked at every
    reload_interval, and an unchanged bad pair is not said again."""
    s, pki, bot, first = tls_stack(stack_factory, tmp_path, reload_interval=0.3)
    d = pki["ca.pem"].parent
    cert, key, second = issue(d, "second")
    if broken == "key-mismatch":
        bot.renew(cert, pki["server.key"])
    elif broken == "expired":
        bot.renew(*dated_cert(tmp_path / "old", "20200101000000Z", "20200102000000Z"))
    elif broken == "not-pem":
        (d / "junk.pem").write_text("this is not a certificate\n")
        bot.renew(d / "junk.pem", key)
    else:
        bot.renew(cert, None)
    assert s.hub_proc is not None
    s.hub_proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeps serving" in hub_log(s), 20, "the refusal said")
    said = [line for line in hub_log(s).splitlines() if "keeps serving" in line]
    assert len(said) == 1, said
    want = {"key-mismatch": "does not match", "expired": "expired", "not-pem": "cannot load",
            "missing-key": "cannot load"}[broken]
    named = bot.key if broken == "missing-key" else bot.cert  # the file that is wrong
    assert want in said[0] and str(named) in said[0], said[0]
    assert served_serial(s, pki["ca.pem"]) == first, "the old certificate is still served"
    c = http.client.HTTPSConnection("127.0.0.1", s.http_port, timeout=10,
                                    context=ssl.create_default_context(cafile=str(pki["ca.pem"])))
    assert post(c, s, ce(1)) == 200
    c.close()
    bot.renew(cert, key)  # fixed: picked up at the next look, no signal
    wait_for(lambda: served_serial(s, pki["ca.pem"]) == second, 20, "the fixed renewal served")
    said = [line for line in hub_log(s).splitlines() if "keeps serving" in line]
    assert len(said) == 1, said
    assert "Traceback" not in hub_log(s)
    assert s.hub_proc.poll() is None


def test_a_plain_http_hub_has_no_certificate_expiry_gauge(stack_factory) -> None:
    """Present, it would read 0 (expired in 1970) and an alert on it would fire for every plain-HTTP hub."""
    import urllib.request

    s = stack_factory(GROUPS)
    s.start_hub()
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=5) as r:
        page = r.read().decode()
    assert "bucketwire_hub_info" in page and "bucketwire_tls_cert_expiry" not in page
