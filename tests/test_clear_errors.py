"""Mistakes an operator makes on day two, each answered with one line that says what is wrong and how to fix it:
real hub and worker processes, real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures_hub import Stack

GROUPS = '\n[groups.g]\ntopics = ["x"]\nplugins = []\n'


def run(s: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(s.cfg_path)], env=s.env,
                          capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The error a command stopped with: it must be its only line on stderr (no traceback, no log noise)."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_worker_metrics_port_taken_names_the_flag(stack_factory: Callable[..., Stack]) -> None:
    """The line said `is the port taken?` and no more: not which setting gave the address, so an operator with
    `[groups.g] metrics` in the config looked for a flag they never passed, and one with two pools on a host did
    not learn how to give the second its own port."""
    s = stack_factory(GROUPS)
    with taken_port() as t:
        port = t.getsockname()[1]
        line = one_line(run(s, "worker", "--group", "g", "--metrics", f"127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in line and "already in use" in line, line
    assert "--metrics HOST:PORT" in line, line


def test_worker_metrics_port_taken_from_the_config_names_the_setting(stack_factory: Callable[..., Stack],
                                                                      tmp_path: Path) -> None:
    with taken_port() as t:
        port = t.getsockname()[1]
        s = stack_factory(f'\n[groups.g]\ntopics = ["x"]\nplugins = []\nmetrics = "127.0.0.1:{port}"\n')
        line = one_line(run(s, "worker", "--group", "g"))
    assert f"127.0.0.1:{port}" in line and "[groups.g] metrics" in line and "--metrics" in line, line


def doctor_lines(tmp: Path, body: str) -> tuple[int, list[str], str]:
    p = tmp / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp / "state"}"\nauth_token = "t"\n' + body + GROUPS)
    p.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "bucketwire", "doctor", "-q", "-c", str(p)], capture_output=True,
                       text=True, timeout=60)
    return r.returncode, r.stdout.splitlines(), r.stdout + r.stderr


def test_doctor_against_stores_with_wrong_settings(weed, tmp_path: Path) -> None:
    """Real SeaweedFS: a wrong secret, an unknown key, secure = true against plain HTTP, a store that is not
    there. Each was `unreachable or refused (HTTPConnectionPool(host=..., port=...): Max retries exceeded with
    url: / (Caused by NewConnectionError("HTTPConnection(host=...` cut off before the cause, with one fix for all
    of them; now one line each says which setting is wrong."""
    from bucketwire.procutil import free_port

    ep = weed.s3_endpoint
    stores = {
        "secret": (f'endpoint = "{ep}"\naccess_key = "{weed.access_key}"\nsecret_key = "not-the-secret"',
                   ("refused secret_key", "SignatureDoesNotMatch"), "secret_key"),
        "key": (f'endpoint = "{ep}"\naccess_key = "nobody"\nsecret_key = "x"', ("no access key 'nobody'",),
                "access_key"),
        "tls": (f'endpoint = "{ep}"\nsecure = true\naccess_key = "{weed.access_key}"\n'
                f'secret_key = "{weed.secret_key}"', ("TLS handshake failed",), "secure = false"),
        "down": (f'endpoint = "127.0.0.1:{free_port()}"\naccess_key = "a"\nsecret_key = "b"',
                 ("cannot connect (Connection refused)",), "start the store"),
    }
    body = "".join(f"[stores.{n}]\n{t}\n" for n, (t, _, _) in stores.items())
    code, lines, out = doctor_lines(tmp_path, body)
    assert code == 1 and "Traceback" not in out, out
    for name, (_, words, fix) in stores.items():
        said = [line for line in lines if f"[stores.{name}]" in line]
        assert len(said) == 1 and said[0].startswith("ERROR"), out
        what, _, how = said[0].partition(" -- fix: ")
        assert all(w in what for w in words) and fix in how, said[0]


def test_doctor_and_operator_commands_against_a_hub_that_is_down(stack_factory: Callable[..., Stack]) -> None:
    """The hub's HTTP line read `not reachable from here (<urlopen error [Errno 111] Connection refused>)`; the
    commands an operator reaches for first say in one line that no hub answers, and where they looked."""
    s = stack_factory(GROUPS + "\n[client]\ntimeout = 2\n")  # each command gives up after 2 s, not 10
    r = run(s, "doctor", "-q")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    http = [line for line in r.stdout.splitlines() if "[hub] http" in line]
    assert len(http) == 1 and "not reachable from here (Connection refused)" in http[0], r.stdout
    for args in (["status"], ["dlq", "list", "--group", "g"]):
        line = one_line(run(s, *args))
        assert "no answer from the hub" in line and f"127.0.0.1:{s.work_port}" in line, line


def test_a_reload_with_a_broken_config_keeps_the_running_one_and_says_why(stack_factory: Callable[..., Stack],
                                                                          tmp_path: Path) -> None:
    """SIGHUP re-reads the config (CURVE listeners, keys, roles). A config broken while editing must change
    nothing: the hub goes on serving with what it runs, and one line says why the reload was refused."""
    import signal

    from tests.fixtures_hub import wait_for
    from tests.test_security import secure_stack

    s, _ = secure_stack(stack_factory, tmp_path)
    s.start_hub()
    good = s.cfg_path.read_text()
    misspelt = good.replace("[security]", "[security]\nreload_intervall = 1", 1)
    for broken, why in ((good + "\n[hub\n", "invalid TOML"), (misspelt, "reload_intervall")):
        s.cfg_path.write_text(broken)
        before = s.logs[-1].read_text().count("reload refused")
        assert s.hub_proc is not None
        s.hub_proc.send_signal(signal.SIGHUP)
        wait_for(lambda n=before: s.logs[-1].read_text().count("reload refused") > n, 20, "the refusal said")
        said = [line for line in s.logs[-1].read_text().splitlines() if "reload refused" in line][before:]
        assert len(said) == 1 and why in said[0] and "keeping the running configuration" in said[0], said
        assert s.status()["groups"].get("g") is not None, "still serving with the running config"
    assert "Traceback" not in s.dump_logs(1_000_000)


def test_doctor_against_nats_that_refuses_the_credentials(tmp_path: Path) -> None:
    """A real nats-server with a token; the config's token is another. Doctor said `not reachable (nats:
    'Authorization Violation') -- fix: start nats-server (with -js) there, or fix [journal] servers`: the server
    was up and the servers right, and the operator was sent to the wrong place."""
    import pytest

    from bucketwire.devstack.nats import find_nats_server
    from bucketwire.procutil import free_port
    from tests.fixtures_hub import wait_for

    try:
        binary = find_nats_server()
    except Exception as e:  # the nats extra is not installed
        pytest.skip(str(e))
    port = free_port()
    log = (tmp_path / "nats.log").open("wb")
    srv = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "--auth", "right-token", "-sd",
                            str(tmp_path / "js")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 20, "nats-server listening")
        code, lines, out = doctor_lines(tmp_path, f'[journal]\nbackend = "jetstream"\nreplicas = 1\n'
                                                  f'servers = ["nats://127.0.0.1:{port}"]\ntoken = "wrong-token"\n')
    finally:
        srv.terminate()
        srv.wait(10)
        log.close()
    said = [line for line in lines if "[journal] server" in line]
    assert code == 1 and len(said) == 1 and "Traceback" not in out, out
    what, _, fix = said[0].partition(" -- fix: ")
    assert "refused the credentials" in what and "not reachable" not in what, said[0]
    assert "token" in fix and "start nats-server" not in fix, said[0]
