"""`bucketwire doctor` reads the dates of every certificate the config names, and whether each key matches its
certificate: an expired HTTPS certificate took every webhook down while doctor said all was well. Real
certificates made with openssl; doctor run as the operator runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_ingress_tls import dated_cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

DAY = 86400


def stamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t))


def doctor(tmp: Path, hub_lines: str, extra: str = "") -> subprocess.CompletedProcess[str]:
    p = tmp / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp / "state"}"\nauth_token = "t"\n{hub_lines}\n'
                 '[groups.a]\ntopics = ["jobs"]\nplugins = []\n' + extra)
    return subprocess.run([sys.executable, "-m", "bucketwire", "doctor", "--offline", "-c", str(p)],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())


def tls_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in r.stdout.splitlines() if "tls_" in line]


CASES = {
    # name: (not before, not after relative to now in days, level, words, exit code)
    "expired": (-30, -1, "ERROR", "expired on", 1),
    "not-yet-valid": (3, 90, "ERROR", "not valid before", 1),
    "expires-soon": (-80, 5, "WARN", "expires in 4 days", 0),
    "fine": (-1, 60, "ok", "valid until", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_certificate_dates_one_line_each(tmp_path: Path, case: str) -> None:
    before, after, level, words, code = CASES[case]
    now = time.time()
    cert, key = dated_cert(tmp_path / "pki", stamp(now + before * DAY), stamp(now + after * DAY - 3600))
    r = doctor(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"')
    assert "Traceback" not in r.stdout + r.stderr
    lines = tls_lines(r)
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(level) and words in lines[0] and str(cert) in lines[0], lines[0]
    if level != "ok":
        assert "fix:" in lines[0], lines[0]
    assert r.returncode == code, r.stdout + r.stderr


def test_a_key_that_does_not_match_its_certificate_is_an_error(tmp_path: Path) -> None:
    now = time.time()
    cert, _ = dated_cert(tmp_path / "one", stamp(now - DAY), stamp(now + 60 * DAY))
    _, other_key = dated_cert(tmp_path / "two", stamp(now - DAY), stamp(now + 60 * DAY))
    r = doctor(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{other_key}"')
    lines = tls_lines(r)
    assert len(lines) == 1 and lines[0].startswith("ERROR") and "does not match" in lines[0], r.stdout
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr


def test_a_missing_certificate_file_is_one_error_line(tmp_path: Path) -> None:
    r = doctor(tmp_path, f'tls_cert = "{tmp_path / "gone.pem"}"\ntls_key = "{tmp_path / "gone.key"}"')
    lines = tls_lines(r)
    assert len(lines) == 1 and lines[0].startswith("ERROR") and "gone.pem" in lines[0], r.stdout
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr


def test_ca_and_nats_client_certificates_are_checked_too(tmp_path: Path) -> None:
    """tls_client_ca (the CA that signs webhook clients' certificates) and [journal]'s NATS client certificate
    expire as well, and take the ingress or the journal down when they do."""
    now = time.time()
    hub_cert, hub_key = dated_cert(tmp_path / "hub", stamp(now - DAY), stamp(now + 60 * DAY))
    ca, _ = dated_cert(tmp_path / "ca", stamp(now - 400 * DAY), stamp(now - DAY))
    nats_cert, nats_key = dated_cert(tmp_path / "nats", stamp(now - 80 * DAY), stamp(now + 3 * DAY))
    r = doctor(tmp_path, f'tls_cert = "{hub_cert}"\ntls_key = "{hub_key}"\ntls_client_ca = "{ca}"',
               f'\n[journal]\ntls_cert = "{nats_cert}"\ntls_key = "{nats_key}"\n')
    lines = tls_lines(r)
    assert len(lines) == 3, r.stdout
    by = {next(p for p in (hub_cert, ca, nats_cert) if str(p) in line): line for line in lines}
    assert by[hub_cert].startswith("ok")
    assert by[ca].startswith("ERROR") and "tls_client_ca" in by[ca] and "expired" in by[ca]
    assert by[nats_cert].startswith("WARN") and "[journal] tls_cert" in by[nats_cert]
    assert r.returncode == 1


def test_doctor_says_when_this_host_does_not_trust_the_served_certificate(stack_factory, tmp_path: Path) -> None:
    """The hub serves a certificate of a private CA this host does not trust: doctor said `not reachable from
    here (<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] ...>)` of a hub that was up and answering."""
    from tests.fixtures_hub import wait_for
    from tests.test_security_ingress import GROUPS, hub_opts, make_pki

    pki = make_pki(tmp_path / "pki")
    s = stack_factory(GROUPS)
    hub_opts(s, f'tls_cert = "{pki["server.pem"]}"\ntls_key = "{pki["server.key"]}"')
    s.hub_proc = s._spawn(["hub"], "hub")
    wait_for(lambda: s.status()["groups"].get("g") is not None, 30, "the hub serving")
    r = subprocess.run([sys.executable, "-m", "bucketwire", "doctor", "-q", "-c", str(s.cfg_path)], env=s.env,
                       capture_output=True, text=True, timeout=60)
    said = [line for line in r.stdout.splitlines() if "[hub] http" in line]
    assert len(said) == 1 and said[0].startswith("WARN"), r.stdout
    assert "does not trust the certificate it serves" in said[0] and "urlopen" not in said[0], said[0]
