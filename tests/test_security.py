"""CURVE on every socket, the client-key allow-list, roles, and key rotation -- against real hub processes.

Every test runs the real `bucketwire hub` and `bucketwire worker` processes on loopback. Keys are generated with
the same code as `bucketwire keys generate`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from bucketwire import config as config_mod
from bucketwire import security
from bucketwire.client import HubClient, HubRefused, HubUnavailable
from bucketwire.config import ConfigError
from tests.fixtures_hub import Stack, free_port, wait_for

GROUPS = """
[groups.g]
topics = ["x"]
plugins = []
start = "earliest"
"""


def make_keys(d: Path, *names: str) -> dict[str, Path]:
    """Generate keypairs in d/keys; return name -> secret file. 'hub' is the server; others are clients."""
    kd = d / "keys"
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        _, sec = security.generate(n, kd)
        out[n] = sec
    return out


def authorize(d: Path, name: str) -> None:
    (d / "authorized" / f"{name}.key").write_bytes((d / "keys" / f"{name}.key").read_bytes())


def revoke(d: Path, name: str) -> None:
    (d / "authorized" / f"{name}.key").unlink()


def security_toml(d: Path, client: str = "admin", server: str = "hub", roles: str = "", extra: str = "") -> str:
    return f"""
[security]
curve = true
server_secret_key = "{d / 'keys' / (server + '.key_secret')}"
authorized_keys_dir = "{d / 'authorized'}"
client_secret_key = "{d / 'keys' / (client + '.key_secret')}"
server_public_key = "{d / 'keys' / (server + '.key')}"
reload_interval = 0.5
{extra}
{roles}
"""


def secure_stack(stack_factory, tmp_path: Path, *, authorized=("admin",), roles: str = "", groups: str = GROUPS,
                 clients=("admin", "intruder", "limited", "other")) -> tuple[Stack, Path]:
    d = tmp_path / "sec"
    make_keys(d, "hub", *clients)
    for n in authorized:
        authorize(d, n)
    s = stack_factory(groups + security_toml(d, roles=roles))
    return s, d


def client_config(s: Stack, d: Path, name: str, server: str = "hub", work: int | None = None,
                  pub: int | None = None) -> Path:
    """A copy of the stack's config file whose client side uses key `name` (and optionally other ports)."""
    text = s.cfg_path.read_text()
    text = text.replace(f"keys/admin.key_secret", f"keys/{name}.key_secret")  # noqa: F541
    text = re.sub(r'server_public_key = "[^"]*"', f'server_public_key = "{d / "keys" / (server + ".key")}"', text)
    client = ""
    if work or pub:
        client = f'\n[client]\nwork = "tcp://127.0.0.1:{work or s.work_port}"\n' \
                 f'publish = "tcp://127.0.0.1:{pub or s.pub_port}"\n'
    p = s.dir / f"client-{name}-{server}-{work}.toml"
    p.write_text(text + client)
    return p


def cfg_for(path: Path) -> config_mod.Config:
    return config_mod.load(path, warn=False)


def sub_socket(cfg: config_mod.Config, topic: str = "") -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, topic.encode() + b"\0" if topic else b"")
    security.apply_client(s, cfg)
    s.connect(cfg.client.publish)
    return s


def spy_socket(cfg: config_mod.Config) -> tuple[zmq.Socket, zmq.Socket]:
    """A SUB to everything with a monitor attached before it connects, so its handshake outcome is seen."""
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    mon = s.get_monitor_socket()
    security.apply_client(s, cfg)
    s.connect(cfg.client.publish)
    return s, mon


HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH}


def wait_handshake_refused(mon: zmq.Socket, timeout: float = 15) -> None:
    """The positive signal that a socket is shut out: its own monitor reports the failed handshake."""
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if mon.poll(int(left * 1000) + 1) and recv_monitor_message(mon)["event"] in HANDSHAKE_FAILED:
            return
    raise AssertionError("the handshake was not refused")


def wait_live(sub: zmq.Socket, c: HubClient, timeout: float = 15) -> None:
    """Block until `sub` demonstrably receives: publish a probe to its own topic and wait for its heartbeat.
    The probe lands in topic `live-probe`, which no test asserts on."""
    c.publish("live-probe", {})
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000) + 1) and sub.recv_multipart()[0] == b"live-probe\0":
            return
    raise AssertionError("the subscriber never received the probe topic's heartbeat")


def recv_until(sock: zmq.Socket, n: int, timeout: float = 15) -> list[list[bytes]]:
    """The first `n` events (heartbeats and probes skipped) on `sock`, waiting up to `timeout`."""
    out: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            m = sock.recv_multipart()
            if m[2] and m[0] != b"live-probe\0":
                out.append(m)
    assert len(out) == n, f"received {len(out)} of {n} events"
    return out


def recv_events(sock: zmq.Socket, seconds: float) -> list[list[bytes]]:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            m = sock.recv_multipart()
            if m[2]:  # skip heartbeats
                out.append(m)
    return out


# -- config and keys ---------------------------------------------------------------------------------------------
def test_config_does_not_import_security(tmp_path):
    """`config` parses; key files are loaded where they are used. A config naming missing key files still loads
    (nothing is checked at parse time), and loading it never imports `security`: the two modules are acyclic."""
    cfgp = tmp_path / "c.toml"
    cfgp.write_text(security_toml(tmp_path, client="nobody"))
    code = ("import sys; from bucketwire import config; c = config.load(sys.argv[1]); "
            "assert c.security.curve; print(sorted(m for m in sys.modules if m.startswith('bucketwire')))")
    r = subprocess.run([sys.executable, "-c", code, str(cfgp)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "bucketwire.security" not in r.stdout
    src = (Path(config_mod.__file__)).read_text()
    assert "bucketwire.security" not in src and "from bucketwire import security" not in src


def test_missing_key_file_is_one_clear_line(tmp_path):
    make_keys(tmp_path, "hub")
    cfgp = tmp_path / "c.toml"
    cfgp.write_text(security_toml(tmp_path, client="nobody"))
    cfg = config_mod.load(cfgp)
    with pytest.raises(ConfigError) as e:
        HubClient(cfg)  # client creation: the keys are loaded where they are used
    msg = str(e.value)
    assert "nobody.key_secret" in msg and "bucketwire keys generate" in msg and "\n" not in msg
    for cmd in (["hub"], ["worker", "--group", "g", "--topic", "x"], ["publish", "x", "{}"]):
        r = subprocess.run([sys.executable, "-m", "bucketwire", *cmd, "-c", str(cfgp)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0, cmd
        assert "nobody.key_secret" in r.stderr and "bucketwire keys generate" in r.stderr, (cmd, r.stderr)
        assert "Traceback" not in r.stderr, (cmd, r.stderr)


def test_unreadable_or_wrong_key_file(tmp_path):
    make_keys(tmp_path, "hub", "admin")
    cfgp = tmp_path / "c.toml"
    # the public file where a secret is needed
    cfgp.write_text(security_toml(tmp_path).replace("admin.key_secret", "admin.key"))
    with pytest.raises(ConfigError, match="holds no secret key"):
        security.check_key_files(config_mod.load(cfgp).security)
    (tmp_path / "keys" / "junk.key_secret").write_text("hello\n")
    cfgp.write_text(security_toml(tmp_path, client="junk"))
    with pytest.raises(ConfigError, match="not a ZeroMQ certificate"):
        HubClient(config_mod.load(cfgp))


def test_curve_unavailable_is_one_line(tmp_path, monkeypatch):
    make_keys(tmp_path, "hub", "admin")
    cfgp = tmp_path / "c.toml"
    cfgp.write_text(security_toml(tmp_path))
    real = zmq.has
    monkeypatch.setattr(zmq, "has", lambda cap: False if cap == "curve" else real(cap))
    cfg = config_mod.load(cfgp)
    with pytest.raises(ConfigError, match="without CURVE"):
        HubClient(cfg)


def test_keys_cli_generate_and_list(tmp_path):
    d = tmp_path / "k"
    r = subprocess.run([sys.executable, "-m", "bucketwire", "keys", "generate", "w1", "--dir", str(d)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    sec = (d / "w1.key_secret")
    assert sec.stat().st_mode & 0o777 == 0o600
    secret = re.search(rb'secret-key = "(.*)"', sec.read_bytes()).group(1).decode()
    r = subprocess.run([sys.executable, "-m", "bucketwire", "keys", "list", "--dir", str(d), "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert {x["kind"] for x in rows} == {"public", "secret"}
    assert secret not in r.stdout and secret not in r.stderr + (tmp_path / "x").as_posix()
    r = subprocess.run([sys.executable, "-m", "bucketwire", "keys", "generate", "w1", "--dir", str(d)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "already exists" in r.stderr


# -- CURVE admission -------------------------------------------------------------------------------------------
def test_unlisted_keys_get_nothing_listed_keys_work(stack_factory, tmp_path):
    s, d = secure_stack(stack_factory, tmp_path)
    s.start_hub()
    intruder = cfg_for(client_config(s, d, "intruder"))
    # no key at all: a plain (NULL) client
    plain = copy.copy(s.cfg)
    plain.security = config_mod.SecurityConfig()
    spies = [spy_socket(intruder), spy_socket(plain)]
    mine = sub_socket(s.cfg)
    with s.client() as c:
        wait_live(mine, c)
        assert c.publish("x", {"k": "first"})["seq"] == 1
    assert len(recv_until(mine, 1)) == 1, "a listed subscriber receives"
    for spy, mon in spies:
        wait_handshake_refused(mon)
        assert recv_events(spy, 0.2) == [], "an unlisted subscriber receives nothing"
        spy.disable_monitor()
        mon.close(0)
        spy.close()
    for cfg in (intruder, plain):
        with HubClient(cfg, timeout=1.5) as c, pytest.raises(HubUnavailable):
            c.publish("x", {"k": "injected"})
    # an unlisted worker gets no work: wait until the hub has refused its handshake, then look
    failed = {"socket": "work", "event": "handshake_failed"}
    before = s.metric("bucketwire_zmq_connection_events_total", **failed)
    w = s.start_worker("g", 1, wait=False, cfg_path=client_config(s, d, "intruder"))
    wait_for(lambda: s.metric("bucketwire_zmq_connection_events_total", **failed) > before, 20,
             "the hub to refuse the unlisted worker's handshake")
    assert s.status()["groups"]["g"]["workers"] == 0
    # ... and the pool says why, naming the fix (it used to say only that the hub was silent)
    wait_for(lambda: "refused this worker's CURVE key" in s.logs[-1].read_text(), 20, "the worker's line")
    assert "authorized_keys_dir" in s.logs[-1].read_text()
    assert s.handled() == []
    assert s.status()["topics"]["x"]["head"] == 1, "nothing was injected"
    w.send_signal(signal.SIGTERM)
    w.wait(15)
    s.start_worker("g", 1)
    wait_for(lambda: len(s.handled()) == 1, 15, "the listed worker handles the event")
    mine.close()


def test_roles_limit_publish_subscribe_and_groups(stack_factory, tmp_path):
    roles = """
[security.roles.limited]
publish = ["x", "ok-*"]
groups = ["g"]
subscribe = ["ok-*"]
"""
    groups = GROUPS + '\n[groups.h]\ntopics = ["x"]\nplugins = []\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles, groups=groups)
    s.start_hub()
    lim = cfg_for(client_config(s, d, "limited"))
    with HubClient(lim, timeout=5) as c:
        assert c.publish("ok-1", {"a": 1})["seq"] == 1
        for _ in range(30):  # refused every time, logged once: a key cannot fill the hub's log
            with pytest.raises(HubRefused, match="may not publish"):
                c.publish("secret", {"a": 1})
        meta, bodies = c.fetch("ok-1", 1)
        assert len(bodies) == 1
        with pytest.raises(HubRefused, match="may not read"):
            c.fetch("x", 1)
    with s.client() as c:  # admin has no role: unrestricted
        c.publish("secret", {"a": 2})
    assert "secret" in s.status()["topics"]
    assert s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="forbidden") == 31  # and the fetch
    hub_log = next(p for p in s.logs if p.name.startswith("hub-"))
    assert hub_log.read_text().count("publish refused by role") == 1
    # a group the role does not allow: the worker is refused (fatal), never joins, and the pool exits with 2
    w = s.start_worker("h", 1, wait=False, cfg_path=client_config(s, d, "limited"))
    assert w.wait(30) == 2, s.dump_logs()
    assert s.status()["groups"]["h"]["workers"] == 0
    # an allowed group works, but follow-ons to a topic the role does not allow are dead-lettered with the reason
    s.start_worker("g", 1, cfg_path=client_config(s, d, "limited"))
    with s.client() as c:
        c.publish("x", {"follow": 1})
    wait_for(lambda: s.status()["topics"].get("dead-letter", {}).get("head", 0) >= 1, 15, "dead letter")
    with s.client() as c:
        _, bodies = c.fetch("dead-letter", 1)
    dl = json.loads(bodies[0])
    assert "may not publish to topic 'follow'" in dl["data"]["error"]
    assert "follow" not in s.status()["topics"]
    # ... naming the plugin that published it and the fix: the dead letter said neither (plugin null, only the key
    # and topic), and the hub's line did not name the plugin, so its author could not tell it was theirs
    assert dl["data"]["plugin"] == "recorder", dl["data"]
    assert dl["data"]["error"] == (
        "follow-on of plugin 'recorder' in group 'g': key 'limited' may not publish to topic 'follow' "
        "([security.roles]); add 'follow' to [security.roles.limited] publish in the hub's config, or publish to a "
        "topic the role allows"), dl["data"]
    line = next(ln for ln in hub_log.read_text().splitlines() if "follow-on refused by role" in ln)
    assert "plugin=recorder" in line and "group=g" in line and "topic=follow" in line, line


class Tap:
    """A TCP proxy on loopback that records every byte in both directions."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.srv = socket.create_server(("127.0.0.1", self.port))
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.srv.settimeout(0.2)
        while not self.stop:
            try:
                a, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    def _pipe(self, x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                with self.lock:
                    self.buf += data
                y.sendall(data)
        except OSError:
            pass
        finally:
            for z in (x, y):
                try:
                    z.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop = True
        self.srv.close()


@pytest.mark.parametrize("curve", [True, False])
def test_wire_is_not_plaintext(stack_factory, tmp_path, curve):
    marker = "photos/very-distinctive-key-7f3a9c.jpg"
    if curve:
        s, d = secure_stack(stack_factory, tmp_path)
    else:
        s = stack_factory(GROUPS)
    s.start_hub()
    wtap, ptap = Tap(s.work_port), Tap(s.pub_port)
    cfg = copy.copy(s.cfg)
    cfg.client = config_mod.ClientConfig(publish=f"tcp://127.0.0.1:{ptap.port}",
                                         work=f"tcp://127.0.0.1:{wtap.port}")
    sub = sub_socket(cfg)
    with HubClient(cfg, timeout=5) as c:
        wait_live(sub, c)
        c.publish("x", {"key": marker}, subject=marker)
        _, bodies = c.fetch("x", 1)
    assert marker.encode() in bodies[0]
    got = recv_until(sub, 1)
    assert marker.encode() in got[0][2]
    sub.close()
    wtap.close()
    ptap.close()
    seen = marker.encode() in bytes(wtap.buf) or marker.encode() in bytes(ptap.buf)
    assert len(wtap.buf) > 0 and len(ptap.buf) > 0
    assert seen is (not curve), "CURVE hides the payload; without it the key is on the wire"


# -- rotation ----------------------------------------------------------------------------------------------------
class Publisher(threading.Thread):
    """Publishes numbered events as fast as the hub commits them, switching config when told."""

    def __init__(self, cfg: config_mod.Config, topic: str = "x") -> None:
        super().__init__(daemon=True)
        self.cfg, self.topic = cfg, topic
        self.sent: list[int] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            cfg = self.cfg
            try:
                with HubClient(cfg, timeout=10) as c:
                    c.publish(self.topic, {"n": i}, id=f"ev-{i}")
                self.sent.append(i)
                i += 1
            except Exception as e:  # recorded; the test asserts there are none
                self.errors.append(repr(e))
            time.sleep(0.01)  # pacing: a steady stream across the rotation, not a flood


def handled_ns(s: Stack) -> set[int]:
    return {h["data"]["n"] for h in s.handled() if "n" in h["data"]}


def test_client_key_rotation_without_restart(stack_factory, tmp_path):
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"))
    s.start_hub()
    hub_pid = s.hub_proc.pid
    old_cfg = client_config(s, d, "limited")
    new_cfg = client_config(s, d, "other")
    old_worker = s.start_worker("g", 1, cfg_path=old_cfg)
    pub = Publisher(cfg_for(old_cfg))
    pub.start()
    wait_for(lambda: len(pub.sent) >= 20, 20, "events flowing with the old key")
    # 1. add the new key: admitted without a restart (periodic check of the directory)
    authorize(d, "other")
    s.start_worker("g", 1, cfg_path=new_cfg, wait=False)
    wait_for(lambda: s.status()["groups"]["g"]["workers"] == 2, 20, "the new-key worker joins")
    pub.cfg = cfg_for(new_cfg)  # overlap: both keys work
    n = len(pub.sent)
    wait_for(lambda: len(pub.sent) >= max(60, n + 3), 20, "events flowing with the new key")
    # 2. remove the old key (SIGHUP for an immediate reload): the old worker is refused on its next message
    revoke(d, "limited")
    s.hub_proc.send_signal(signal.SIGHUP)
    wait_for(lambda: s.status()["groups"]["g"]["workers"] == 1, 20, "the old-key worker is dropped")
    n_before = len(pub.sent)
    wait_for(lambda: len(pub.sent) >= n_before + 30, 20, "events keep flowing")
    pub.halt.set()
    pub.join(15)
    assert pub.errors == []
    with HubClient(cfg_for(old_cfg), timeout=1.5) as c, pytest.raises((HubUnavailable, HubRefused)):
        c.publish("x", {"late": 1})
    sent = set(pub.sent)
    wait_for(lambda: sent <= handled_ns(s), 30, "every event handled")
    assert s.hub_proc.pid == hub_pid and s.hub_proc.poll() is None, "no hub restart"
    assert s.status()["groups"]["g"]["lag"] == 0
    old_worker.send_signal(signal.SIGTERM)


def test_server_key_rotation_without_restart(stack_factory, tmp_path):
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), clients=("admin", "limited"))
    security.generate("hub2", d / "keys")
    s.start_hub()
    hub_pid = s.hub_proc.pid
    old_cfg = client_config(s, d, "limited")
    old_worker = s.start_worker("g", 1, cfg_path=old_cfg)
    pub = Publisher(cfg_for(old_cfg))
    pub.start()
    wait_for(lambda: len(pub.sent) >= 20, 20, "events flowing with the old server key")
    # Step 1: the current key moves to previous_* on its existing endpoints, the new key gets new endpoints.
    w2, p2 = free_port(), free_port()
    text = s.cfg_path.read_text()
    text = text.replace(f"tcp://127.0.0.1:{s.work_port}", f"tcp://127.0.0.1:{w2}")
    text = text.replace(f"tcp://127.0.0.1:{s.pub_port}", f"tcp://127.0.0.1:{p2}")
    text = text.replace("keys/hub.key_secret", "keys/hub2.key_secret").replace("keys/hub.key\"", "keys/hub2.key\"")
    text = text.replace("reload_interval = 0.5", f'reload_interval = 0.5\nprevious_server_secret_key = '
                        f'"{d / "keys" / "hub.key_secret"}"\nwork_previous = "tcp://127.0.0.1:{s.work_port}"\n'
                        f'publish_previous = "tcp://127.0.0.1:{s.pub_port}"')
    s.cfg_path.write_text(text)
    s.hub_proc.send_signal(signal.SIGHUP)
    new_cfg = client_config(s, d, "limited", server="hub2", work=w2, pub=p2)
    nc = cfg_for(new_cfg)
    wait_for(lambda: _status_ok(nc), 20, "the new server key is served")
    # subscribers on both keys see the same events
    sub_old, sub_new = sub_socket(cfg_for(old_cfg)), sub_socket(nc)
    # Step 2: clients move to the new key (new worker first, then the old one leaves, then the publisher)
    s.start_worker("g", 1, cfg_path=new_cfg, wait=False)
    wait_for(lambda: _status(nc)["groups"]["g"]["workers"] == 2, 20, "the new-key worker joins")
    got_old, got_new = recv_events(sub_old, 1.0), recv_events(sub_new, 0.2)
    assert got_old and got_new
    old_worker.send_signal(signal.SIGTERM)
    old_worker.wait(20)
    pub.cfg = nc
    n = len(pub.sent)
    wait_for(lambda: len(pub.sent) >= n + 30, 20, "events flowing with the new key")
    assert _status(nc)["groups"]["g"]["workers"] == 1
    # Step 3: stop serving the old key
    text = s.cfg_path.read_text()
    text = re.sub(r"previous_server_secret_key = .*\n|work_previous = .*\n|publish_previous = .*\n", "", text)
    s.cfg_path.write_text(text)
    s.hub_proc.send_signal(signal.SIGHUP)
    n = len(pub.sent)
    wait_for(lambda: len(pub.sent) >= n + 30, 20, "events keep flowing")
    pub.halt.set()
    pub.join(15)
    assert pub.errors == []
    with HubClient(cfg_for(old_cfg), timeout=1.5) as c, pytest.raises(HubUnavailable):
        c.status()
    sent = set(pub.sent)
    wait_for(lambda: sent <= handled_ns(s), 30, "every event handled")
    assert s.hub_proc.pid == hub_pid and s.hub_proc.poll() is None, "no hub restart"
    sub_old.close()
    sub_new.close()


def _status(cfg: config_mod.Config) -> dict:
    with HubClient(cfg, timeout=3) as c:
        return c.status()


def _status_ok(cfg: config_mod.Config) -> bool:
    try:
        _status(cfg)
        return True
    except HubUnavailable:
        return False


def test_literal_secret_in_world_readable_config_warns(tmp_path, caplog):
    p = tmp_path / "c.toml"
    p.write_text('[hub]\nauth_token = "literal-secret"\n')
    os.chmod(p, 0o644)
    with caplog.at_level("WARNING", logger="bucketwire.config"):
        config_mod.load(p)
    assert any("world-readable" in r.getMessage() for r in caplog.records)
    assert not any("literal-secret" in r.getMessage() for r in caplog.records), "the secret itself is not logged"
    caplog.clear()
    os.chmod(p, 0o600)
    with caplog.at_level("WARNING", logger="bucketwire.config"):
        config_mod.load(p)
    assert not any("world-readable" in r.getMessage() for r in caplog.records)
    p.write_text('[hub]\nauth_token = "env:SOME_TOKEN"\n')
    os.chmod(p, 0o644)
    os.environ["SOME_TOKEN"] = "x"
    with caplog.at_level("WARNING", logger="bucketwire.config"):
        config_mod.load(p)
    assert not any("world-readable" in r.getMessage() for r in caplog.records)


def test_role_limits_live_subscriptions_on_the_pub_socket(stack_factory, tmp_path):
    """The hub decides each subscription (XPUB, manual mode) by the key that asked: a limited key gets only
    its topics, even when it subscribes to everything; topic frames are NUL-terminated so "ok" != "ok-more"."""
    roles = "\n[security.roles.limited]\nsubscribe = [\"ok\"]\n"
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles)
    s.start_hub()
    lim = cfg_for(client_config(s, d, "limited"))
    everything = sub_socket(lim, "")
    forbidden = sub_socket(lim, "secret")
    allowed = sub_socket(lim, "ok")
    admin_all = sub_socket(s.cfg, "")
    # Positive signals that every subscription was decided: the hub counts the two it refuses, and a topic's
    # heartbeat reaches the two it applies.
    wait_for(lambda: s.metric("bucketwire_ingress_rejected_total", ingress="zmq", reason="forbidden") >= 2, 20,
             "the hub to refuse the two subscriptions the role does not allow")
    with s.client() as c:
        wait_live(admin_all, c)
        c.publish("ok", {"t": "probe"})
        wait_for(lambda: allowed.poll(100) and allowed.recv_multipart()[0] == b"ok\0", 20, "ok on the allowed SUB")
        while allowed.poll(0):
            allowed.recv_multipart()
        recv_until(admin_all, 1)
        for t in ("ok", "secret", "ok-more", "ok"):
            c.publish(t, {"t": t})
    got = {"allowed": [m[0] for m in recv_until(allowed, 2)], "admin": [m[0] for m in recv_until(admin_all, 4)]}
    # the last event published has arrived: whatever the refused subscriptions would have let through is there now
    got.update({name: [m[0] for m in recv_events(sock, 0.2)]
                for name, sock in (("everything", everything), ("forbidden", forbidden))})
    assert got["everything"] == [] and got["forbidden"] == []
    assert got["allowed"] == [b"ok\0", b"ok\0"], "only the exact topic, not ok-more"
    assert sorted(got["admin"]) == sorted([b"ok\0", b"secret\0", b"ok-more\0", b"ok\0"])
    for sock in (everything, forbidden, allowed, admin_all):
        sock.close()



def test_a_client_with_a_key_the_hub_refuses_is_told_so(stack_factory, tmp_path):
    """A client key missing from the hub's allow-list, or a wrong server_public_key, is the usual mistake of a
    rotation. The hub is running and reachable: the one line every command prints (`Error: ...`) must say the
    key is the problem, not ask whether the hub runs."""
    s, d = secure_stack(stack_factory, tmp_path)
    s.start_hub()
    # The refused key is told as soon as the socket's monitor sees the refusal, not after the timeout: 100 s here,
    # under the test's own 120 s guard. A wrong server key is told after the timeout, as before.
    for name, server, want, timeout in (("intruder", "hub", "refused this client's CURVE key", 100.0),
                                        ("admin", "other", "CURVE handshake with the hub at", 1.0)):
        with HubClient(cfg_for(client_config(s, d, name, server=server)), timeout=timeout) as c, \
                pytest.raises(HubUnavailable) as e:
            c.status()
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert ("authorized_keys_dir" if name == "intruder" else "server_public_key") in str(e.value), str(e.value)


def test_a_ready_cannot_add_topics_its_group_or_role_does_not_have(stack_factory, tmp_path):
    """A worker key may work for group g, which the hub's config gives topic x, and may read nothing else. A
    READY naming another topic for g (a hostile worker, or a worker host whose config drifted) used to add that
    topic to g for good, and the hub delivered its events; so did a READY for a group the config does not have.
    Both are refused with a fatal ERR naming the topic; a READY for g's own topic is served."""
    roles = """
[security.roles.limited]
groups = ["g", "dyn"]
subscribe = ["ok-*"]
"""
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles)
    s.start_hub()
    with s.client() as c:
        c.publish("secret", {"a": 1})
        c.publish("x", {"a": 2})
    lim = cfg_for(client_config(s, d, "limited"))

    def ready(group: str, topics: list[str]) -> tuple[bytes, dict]:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.apply_client(sock, lim)
        sock.connect(lim.client.work)
        try:
            sock.send_multipart([b"READY", json.dumps({"group": group, "topics": topics, "credit": 4, "proto": 3,
                                                       "schema": 1, "start": "earliest"}).encode()])
            assert sock.poll(10_000), "no answer to READY"
            frames = sock.recv_multipart()
            return frames[0], json.loads(frames[1])
        finally:
            sock.close()

    for group, topics in (("g", ["x", "secret"]), ("dyn", ["secret"])):
        cmd, hdr = ready(group, topics)
        assert cmd == b"ERR" and hdr["fatal"] and "'secret'" in hdr["error"], (cmd, hdr)
    cmd, hdr = ready("g", ["x"])
    assert cmd == b"DELIVER", (cmd, hdr)
    assert "secret" not in s.status()["groups"]["g"].get("topics", ["x"])


def _limited_and_admin(stack_factory, tmp_path, limited: str = ""):
    """A CURVE hub with groups g and h (topic 'secret') and keys admin, `limited` (role: group g, plus the
    `limited` lines) and other (an admin role), started."""
    roles = f"""
[security.roles.limited]
groups = ["g"]
{limited}
[security.roles.other]
admin = true
"""
    groups = GROUPS + '\n[groups.h]\ntopics = ["secret"]\nplugins = []\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited", "other"), roles=roles,
                        groups=groups)
    s.start_hub()
    return s, d


def test_status_shows_a_role_only_its_groups_and_topics(stack_factory, tmp_path):
    """STATUS was answered in full to every admitted key: a key limited to group g and to reading 'ok-*' saw
    every group, every topic, and the object key of every long-running handler. Now it sees its groups (with
    their topics) and the topics it may read; a key without a role, or an admin, sees everything."""
    s, d = _limited_and_admin(stack_factory, tmp_path, 'subscribe = ["ok-*"]\n')
    with s.client() as c:
        for t in ("x", "secret", "ok-1"):
            c.publish(t, {"a": 1})
        full = c.status()
    assert set(full["groups"]) == {"g", "h"} and {"x", "secret", "ok-1"} <= set(full["topics"])
    with HubClient(cfg_for(client_config(s, d, "limited")), timeout=5) as c:
        st = c.status()
    assert set(st["groups"]) == {"g"}, st["groups"].keys()
    assert set(st["topics"]) == {"x", "ok-1"}, st["topics"].keys()
    with HubClient(cfg_for(client_config(s, d, "other")), timeout=5) as c:
        assert set(c.status()["groups"]) == {"g", "h"}, "an admin sees every group"


def test_a_pool_that_cannot_start_is_shown_to_the_keys_of_its_group_only(stack_factory, tmp_path):
    """A pool's supervisor reports its children's failing worker_startup (STARTFAIL) for `status`. A key may
    report only for a group it may join (a report is a peer's claim: another group's pool is not its to speak
    for), and a key limited to its groups sees only their reports, as with the rest of status."""
    s, d = _limited_and_admin(stack_factory, tmp_path)

    def report(key: str, *groups_: str) -> None:
        cfg = cfg_for(client_config(s, d, key))
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        security.apply_client(sock, cfg)
        sock.connect(cfg.client.work)
        for g in groups_:  # in order on one connection: the last shown means the ones before were read
            sock.send_multipart([b"STARTFAIL", json.dumps({"g": g, "host": key, "pid": 7, "plugin": "db",
                                                           "line": "ConnectionError: down", "count": 3}).encode()])
        sock.close()

    report("limited", "h", "g")  # h: not a group its key may join
    report("admin", "h")  # a key without a role may join any group
    wait_for(lambda: set(s.status().get("failing_starts", {})) == {"g", "h"}, 15, "the two reports")
    full = s.status()["failing_starts"]
    assert [p["host"] for p in full["h"]] == ["admin"] and [p["host"] for p in full["g"]] == ["limited"], full
    with HubClient(cfg_for(client_config(s, d, "limited")), timeout=5) as c:
        assert set(c.status()["failing_starts"]) == {"g"}
    with HubClient(cfg_for(client_config(s, d, "other")), timeout=5) as c:
        assert set(c.status()["failing_starts"]) == {"g", "h"}, "an admin sees every group's"


def _routing_stack(stack_factory, tmp_path, roles):
    """A CURVE hub (keys "admin" and "limited", `roles`) that routes ObjectCreated events without a topic to
    "routed-secret" and any other to default_topic "secret": what a role must be checked against."""
    routes = '\n[[routes]]\ntopic = "routed-secret"\nevents = ["s3:ObjectCreated:*"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles,
                        groups=GROUPS + routes)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("[hub]\n", '[hub]\ndefault_topic = "secret"\n', 1))
    s.start_hub()
    return s, d


def test_a_role_is_checked_against_the_topic_the_hub_routes_to(stack_factory, tmp_path):
    """An event with no topic is committed to what routing gives it ([[routes]], else default_topic): the role
    is decided on that topic, not on the empty one the publisher sent, and nothing of a refused request commits."""
    roles = """
[security.roles.limited]
publish = ["ok"]
groups = ["g"]
subscribe = ["ok"]
"""
    s, d = _routing_stack(stack_factory, tmp_path, roles)
    from bucketwire.envelope import Event
    lim = cfg_for(client_config(s, d, "limited"))

    def ev(typ: str, n: int) -> Event:
        return Event(id=f"e-{typ}-{n}", source="bucketwire://publish/t", type=typ, topic=None,
                     data={"bucket": "b", "key": f"k{n}"})

    with HubClient(lim, timeout=5) as c:
        assert c.publish("ok", {"a": 1})["seq"] == 1
        with pytest.raises(HubRefused, match="may not publish to topic 'secret'"):
            c.publish_events([ev("t.other", 1)])
        with pytest.raises(HubRefused, match="may not publish to topic 'routed-secret'"):
            c.publish_events([ev("s3:ObjectCreated:Put", 2)])
        # one allowed event with one routed to a refused topic: the whole request is refused
        ok = Event(id="e-ok", source="bucketwire://publish/t", type="t", topic="ok", data={})
        with pytest.raises(HubRefused, match="may not publish to topic 'secret'"):
            c.publish_events([ok, ev("t.other", 3)])
    topics = s.status()["topics"]
    assert "secret" not in topics and "routed-secret" not in topics, topics
    assert topics["ok"]["head"] == 1, topics
    with s.client() as c:  # no role: routing to the default topic works
        c.publish_events([ev("t.other", 4)])
    assert s.status()["topics"]["secret"]["head"] == 1


def test_a_topicless_follow_on_is_never_routed_past_the_role(stack_factory, tmp_path):
    """A follow-on travels in an ACK with the topic its plugin gave it; ctx.publish needs one, but a worker
    speaking the protocol itself can send one without. The hub does not route it (to default_topic or by
    [[routes]], where the role would be checked too late): its event fails with the reason and nothing of the
    follow-on is committed."""
    from bucketwire import protocol as P
    from bucketwire.envelope import SCHEMA_VERSION

    roles = '\n[security.roles.limited]\npublish = ["ok"]\ngroups = ["g"]\nsubscribe = ["x"]\n'
    s, d = _routing_stack(stack_factory, tmp_path, roles)
    lim = cfg_for(client_config(s, d, "limited"))
    w = zmq.Context.instance().socket(zmq.DEALER)
    w.setsockopt(zmq.LINGER, 0)
    security.apply_client(w, lim)
    w.connect(lim.client.work)
    try:
        w.send_multipart([P.READY, P.enc(P.Ready(group="g", topics=["x"], credit=1, proto=1,
                                                  schema=SCHEMA_VERSION, host="test", pid=1, start="earliest"))])
        wait_for(lambda: s.status()["groups"]["g"]["workers"] == 1, 15, "the raw worker to join")
        with s.client() as c:
            c.publish("x", {"bucket": "b", "key": "k"})
        frames: list[bytes] = []
        deadline = time.monotonic() + 15
        while (left := deadline - time.monotonic()) > 0 and w.poll(int(left * 1000) + 1):
            frames = w.recv_multipart()
            if frames[0] == P.DELIVER:
                break
        assert frames and frames[0] == P.DELIVER, frames[:1]
        ev = json.loads(frames[2])
        fos = [{"specversion": "1.0", "id": f"fo-{i}", "source": "x", "type": "s3:ObjectCreated:Put",
                "data": {"bucket": "b", "key": f"f{i}"}, **extra} for i, extra in enumerate([{}, {"topic": ""}])]
        w.send_multipart([P.ACK, P.enc({"g": "g", "results": [{"t": "x", "s": int(ev["seq"]), "ok": True,
                                                                "f": fos}]})])
        wait_for(lambda: s.status()["topics"].get("dead-letter", {}).get("head", 0) >= 1, 15, "the dead letter")
    finally:
        w.close()
    with s.client() as c:
        dl = json.loads(c.fetch("dead-letter", 1)[1][0])
    assert "has no topic" in dl["data"]["error"], dl["data"]
    topics = s.status()["topics"]
    assert "secret" not in topics and "routed-secret" not in topics and "ok" not in topics, topics
