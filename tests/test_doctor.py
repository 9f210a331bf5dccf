"""`bucketwire doctor`: each misconfiguration it must catch, one test each, plus a healthy system."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zmq.auth

from bucketwire import config as config_mod
from bucketwire.commands.doctor import check_versions, run_checks
from tests.fixtures_hub import free_port

GROUP = '\n[groups.a]\ntopics = ["jobs"]\nplugins = []\n'


def doctor(s, *extra: str) -> subprocess.CompletedProcess:
    """`doctor` as a user runs it. One that has not ended after 60 s is made to print where each of its threads
    waits (faulthandler, on SIGABRT) before the test fails: one CI run saw it hang here once, and could not say
    where."""
    args = [sys.executable, "-X", "faulthandler", "-m", "bucketwire", "doctor", "-c", str(s.cfg_path), *extra]
    p = subprocess.Popen(args, env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        out, err = p.communicate(timeout=10)
        pytest.fail(f"doctor did not end within 60 s; where it waited:\n{err[-6000:]}\nstdout:\n{out[-2000:]}")
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def offline(tmp: Path, body: str) -> list[str]:
    p = tmp / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp / "state"}"\n' + body)
    return [f.line() for f in run_checks(config_mod.load(p), live=False) if f.level == "error"]


def test_healthy_system_exits_zero(stack_factory):
    s = stack_factory(GROUP + '\n[[routes]]\nevents = ["s3:ObjectCreated:*"]\ntopic = "jobs"\n')
    s.start_hub()
    s.start_worker("a", 1)
    r = doctor(s)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ROUTER socket answers" in r.stdout and "PUB socket answers" in r.stdout
    assert "agree: schema 1" in r.stdout


def test_work_endpoint_pointing_at_the_pub_port(stack_factory):
    s = stack_factory(GROUP)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("[hub]", f'[client]\nwork = "tcp://127.0.0.1:{s.pub_port}"\n'
                                                                  "\n[hub]", 1))
    s.start_hub()
    r = doctor(s)
    assert r.returncode == 1
    assert "[client] work" in r.stdout and "PUB socket" in r.stdout and "hub's ROUTER" in r.stdout


def test_a_client_whose_work_endpoint_is_a_pub_socket_times_out_instead_of_hanging() -> None:
    """[client] work at a PUB (XPUB) socket: libzmq drops the DEALER's connection at the handshake (the socket types
    do not pair) and never connects again. A blocking send that came after that failure waited for ever (CI saw
    `doctor` hang in test_work_endpoint_pointing_at_the_pub_port, whose send usually wins the race); here the
    request goes after the handshake has failed, every time. In a subprocess: a hang must not hold pytest."""
    ctx = zmq.Context.instance()
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    code = f"""
import sys, time
import zmq
from bucketwire import config
from bucketwire.client import HubClient, HubUnavailable
c = HubClient(config.parse({{"client": {{"work": "tcp://127.0.0.1:{port}"}}}}), timeout=1.5)
s = c._socket()
assert s.get(zmq.EVENTS) & zmq.POLLOUT, "a DEALER takes a message before it is connected"
deadline = time.monotonic() + 10
while s.get(zmq.EVENTS) & zmq.POLLOUT:  # until the handshake has failed: no connection left to queue on
    assert time.monotonic() < deadline, "the XPUB never refused the DEALER"
    time.sleep(0.001)
try:
    c.status()
except HubUnavailable as e:
    print(e)
    sys.exit(3)
"""
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    finally:
        xpub.close()
    assert p.returncode == 3, p.stdout + p.stderr
    assert f"no answer from the hub at tcp://127.0.0.1:{port}" in p.stdout, p.stdout


def test_hub_down_is_an_error(stack_factory):
    s = stack_factory(GROUP)
    r = doctor(s)
    assert r.returncode == 1 and "cannot connect" in r.stdout and "start `bucketwire hub`" in r.stdout


def test_schema_versions_that_disagree():
    f = check_versions({"hub": {"schema": 99, "version": "9.9"}})
    assert f[0].level == "error" and "schema 99" in f[0].what and "same bucketwire version" in f[0].fix
    assert check_versions({"hub": {"schema": 1}})[0].level == "ok"


class _FakeS3(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # ListBuckets: just "photos"
        body = (b'<?xml version="1.0" encoding="UTF-8"?><ListAllMyBucketsResult xmlns="http://s3.amazonaws.com/'
                b'doc/2006-03-01/"><Owner><ID>x</ID></Owner><Buckets><Bucket><Name>photos</Name><CreationDate>'
                b"2024-01-01T00:00:00.000Z</CreationDate></Bucket></Buckets></ListAllMyBucketsResult>")
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def fake_s3() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeS3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_store_unreachable(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp_path}"\n[stores.primary]\nendpoint = "127.0.0.1:{free_port()}"\n'
                 'access_key = "a"\nsecret_key = "b"\n' + GROUP)
    from bucketwire.commands.doctor import check_stores

    errs = [f.line() for f in check_stores(config_mod.load(p)) if f.level == "error"]
    assert len(errs) == 1 and "[stores.primary]" in errs[0] and "cannot connect (Connection refused)" in errs[0]


def test_bucket_missing(tmp_path, fake_s3):
    from bucketwire.commands.doctor import check_stores

    p = tmp_path / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp_path}"\n[stores.primary]\nendpoint = "127.0.0.1:{fake_s3}"\n'
                 'access_key = "a"\nsecret_key = "b"\n'
                 '[plugins.thumbnail]\noutput_bucket = "thumbnails"\nbuckets = ["photos"]\n')
    findings = check_stores(config_mod.load(p))
    errs = [f.line() for f in findings if f.level == "error"]
    assert len(errs) == 1, errs
    assert "output_bucket" in errs[0] and "'thumbnails' does not exist" in errs[0] and "mc mb" in errs[0]


def test_plugin_named_but_not_installed(tmp_path):
    errs = offline(tmp_path, '[groups.a]\ntopics = ["jobs"]\nplugins = ["thumbnail", "thumbnial"]\n')
    assert len(errs) == 1 and "'thumbnial', which is not installed" in errs[0]


def test_curve_keys_that_do_not_belong_together(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(keys, "other")
    zmq.auth.create_certificates(keys, "client")
    (tmp_path / "authorized").mkdir()
    errs = offline(tmp_path, GROUP + f"""
[security]
curve = true
server_secret_key = "{keys / 'server.key_secret'}"
server_public_key = "{keys / 'other.key'}"
client_secret_key = "{keys / 'client.key_secret'}"
authorized_keys_dir = "{tmp_path / 'authorized'}"
""")
    assert any("server_public_key does not belong to server_secret_key" in e for e in errs), errs
    assert any("not in authorized_keys_dir" in e for e in errs), errs


def test_curve_key_file_missing(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(GROUP + f'\n[security]\ncurve = true\nserver_secret_key = "{tmp_path / "nope"}"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "doctor", "--offline", "-c", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "ERROR config:" in r.stdout and "does not exist" in r.stdout
    assert "keys generate" in r.stdout


def test_route_shadowed_by_an_earlier_broader_route(tmp_path):
    errs = offline(tmp_path, GROUP + """
[[routes]]
events = ["s3:ObjectCreated:*"]
topic = "jobs"

[[routes]]
events = ["s3:ObjectCreated:Put"]
bucket = "photos"
suffix = ".jpg"
topic = "jobs"
""")
    assert len(errs) == 1 and "routes[1]" in errs[0] and "can never match" in errs[0]


def test_events_glob_matching_no_s3_event(tmp_path):
    errs = offline(tmp_path, GROUP + '\n[[routes]]\nevents = ["s3:ObjectCreate:*"]\ntopic = "jobs"\n')
    assert len(errs) == 1 and "'s3:ObjectCreate:*' matches no S3 event name" in errs[0]


def test_topic_no_group_consumes(tmp_path):
    errs = offline(tmp_path, GROUP + '\n[[routes]]\nevents = ["s3:ObjectCreated:*"]\ntopic = "uploads"\n')
    assert any("topic 'uploads' gets routed events but no group consumes it" in e for e in errs), errs
    # a [topics.T] dead_letter naming T itself is refused when the config loads (tests/test_config.py)


@pytest.mark.parametrize("kind", [zmq.ROUTER, zmq.XPUB])
def test_a_curve_socket_is_recognised_by_its_greeting(kind):
    """The probe reads the peer's greeting before it sends its own mechanism: a CURVE peer closes the connection
    on a NULL greeting before its own greeting has left, and doctor reported every endpoint of a CURVE hub as
    'no ZeroMQ greeting' (an error) where it should say the socket answers with CURVE."""
    from bucketwire.commands.doctor import zmtp_probe

    ctx = zmq.Context()
    try:
        public, secret = zmq.curve_keypair()
        s = ctx.socket(kind)
        s.curve_server, s.curve_secretkey, s.curve_publickey = True, secret, public
        port = s.bind_to_random_port("tcp://127.0.0.1")
        plain = ctx.socket(kind)
        plain_port = plain.bind_to_random_port("tcp://127.0.0.1")
        for _ in range(3):
            assert zmtp_probe(f"tcp://127.0.0.1:{port}") == {"mechanism": "CURVE", "version": "3.1"}
        got = zmtp_probe(f"tcp://127.0.0.1:{plain_port}")
        assert got["mechanism"] == "NULL" and got["socket_type"] == ("ROUTER" if kind == zmq.ROUTER else "XPUB")
    finally:
        ctx.destroy(linger=0)


def test_a_hub_without_an_auth_token_is_warned_about(tmp_path):
    """The hub warns at start when `[hub] auth_token` is absent (its webhook takes events from anyone); doctor,
    where an operator checks a config, said nothing of it."""
    p = tmp_path / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp_path / "state"}"\n' + GROUP)
    warns = [f.line() for f in run_checks(config_mod.load(p), live=False) if f.level == "warn"]
    assert any("auth_token" in w and "unauthenticated" in w for w in warns), warns
    p.write_text(f'[hub]\nstate_dir = "{tmp_path / "state"}"\nauth_token = "s3cret-token"\n' + GROUP)
    warns = [f.line() for f in run_checks(config_mod.load(p), live=False) if f.level == "warn"]
    assert not any("auth_token" in w for w in warns), warns


def test_plugin_settings_a_worker_would_refuse_are_an_error(tmp_path):
    """doctor said nothing of `sizes = [0]` in [plugins.thumbnail], and of a misspelt key there: the config
    passed, and the pool running the plugin stopped at start with the line doctor could have given."""
    body = ('\n[groups.t]\ntopics = ["jobs"]\nplugins = ["thumbnail"]\n\n[plugins.thumbnail]\nsizes = [0]\n'
            '\n[plugins.replication]\ntarget_bucket = "b"\n')  # no group runs replication: not this config's
    errors = offline(tmp_path, body)
    assert [e for e in errors if "[plugins." in e] == [
        "ERROR [plugins.thumbnail] sizes: expected a list of integers 1..16384 (longest edge), e.g. [256, 1024]; "
        "got [0] -- fix: a worker running the plugin stops at start with this line; correct the [plugins.thumbnail] "
        "section"], errors
    # a group without `plugins` runs every installed plugin, so each one's section is checked
    body = '\n[groups.t]\ntopics = ["jobs"]\n\n[plugins.replication]\ntarget_bucket = "b"\ntypo = 1\n'
    errors = offline(tmp_path, body)
    assert [e for e in errors if e.startswith("ERROR [plugins.replication] typo: unknown")], errors
    assert [e for e in errors if e.startswith("ERROR [plugins.audit] path: set exactly one of")], errors
    # the framework's own `topics` key: of the wrong type, or naming none of a group's topics
    body = '\n[groups.t]\ntopics = ["jobs"]\nplugins = ["thumbnail"]\n\n[plugins.thumbnail]\ntopics = %s\n'
    assert offline(tmp_path, body % "5") == [
        'ERROR [plugins.thumbnail] topics: expected a list of topic names, e.g. topics = ["photos"]; got 5 -- fix: '
        "a worker running the plugin stops at start with this line; correct the [plugins.thumbnail] section"]
    [err] = offline(tmp_path, body % '["job"]')
    assert err.startswith("ERROR [plugins.thumbnail] topics = ['job']: none is a topic of group 't' (jobs)"), err
    assert offline(tmp_path, '\n[groups.t]\ntopics = ["jobs"]\nplugins = ["thumbnail"]\n\n'
                             '[plugins.thumbnail]\nsizes = [64]\ntopics = ["jobs"]\n') == [], \
        "valid settings are no finding"
