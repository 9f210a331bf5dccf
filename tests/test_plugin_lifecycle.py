"""Every hook through a real worker pool: settings validation, startup, events, drain, shutdown, commands."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bucketwire import hookimpl
from bucketwire.cli import cli
from tests.fixtures_hub import free_port, wait_for
from tests.plugins import lifecycle

PLUGIN = str(Path(__file__).parent / "plugins" / "lifecycle.py")


def cfg(path: Path, mode: str = "ok") -> str:
    return f"""
[groups.life]
topics = ["t"]
plugins = []
start = "earliest"

[plugins.lifecycle]
path = "{path}"
mode = "{mode}"
"""


def test_startup_events_and_shutdown_in_every_child(stack_factory, tmp_path):
    out = tmp_path / "life.log"
    s = stack_factory(cfg(out))
    s.start_hub()
    w = s.start_worker("life", 2, "--plugin", PLUGIN)
    with s.client() as c:
        for i in range(6):
            c.publish("t", {"i": i})
    wait_for(lambda: out.exists() and out.read_text().count(" event ") == 6, 20, "6 events")
    w.send_signal(signal.SIGTERM)
    assert w.wait(20) == 0
    lines = out.read_text().splitlines()
    pids = {ln.split()[0] for ln in lines}
    assert len(pids) == 2
    for pid in pids:
        mine = [ln.split(" ", 1)[1] for ln in lines if ln.startswith(pid + " ")]
        assert mine[0] == "startup mode=ok" and mine[-1] == "shutdown"
    # drained workers say goodbye; the hub reads the BYE on its own loop turn, after the pool has exited
    wait_for(lambda: s.status()["groups"]["life"]["workers"] == 0, 10, "the hub to process the workers' BYE")


def test_a_worker_startup_that_runs_long_is_reported_while_it_runs(stack_factory, tmp_path):
    """A `worker_startup` that hangs (a database that does not answer) kept the child from taking events with
    nothing in the log: the pool looked stalled for no reason. Past heartbeat_timeout it is said, naming the
    plugin, and the child joins once it returns."""
    release = tmp_path / "release"
    s = stack_factory(cfg(tmp_path / "life.log") + f'hold = "{release}"\n')
    s.start_hub()
    s.start_worker("life", 1, "--plugin", PLUGIN, wait=False)
    log = s.logs[-1]
    line = wait_for(lambda: next((ln for ln in log.read_text().splitlines()
                                  if "worker_startup is still running" in ln), None), 20, "the slow startup reported")
    assert "lifecycle" in line, line
    assert s.status()["groups"].get("life", {}).get("workers", 0) == 0
    release.touch()
    wait_for(lambda: s.status()["groups"].get("life", {}).get("workers", 0) == 1, 20, "the child joining after it")


SLOW_IMPORT = """
import os
import time

from bucketwire import hookimpl

end = time.monotonic() + 60
while not os.path.exists({release!r}) and time.monotonic() < end:  # a server asked at import, not answering
    time.sleep(0.02)  # pacing: polling for the test's release file, with a deadline


@hookimpl
def handle_event(event):
    pass
"""


def test_a_plugin_import_that_runs_long_is_reported_while_it_runs(stack_factory, tmp_path):
    """A plugin module that connects to a server as it is imported, and waits: the pool printed nothing at all
    (not even 'worker pool started'), a start that looked hung for no reason. Past heartbeat_timeout it is said,
    naming the module, and again as long again passes; the pool starts once the import returns."""
    release = tmp_path / "release"
    plugin = tmp_path / "slowimport.py"
    plugin.write_text(SLOW_IMPORT.format(release=str(release)))
    s = stack_factory("")
    s.start_hub()
    s.start_worker("slow", 1, "--topic", "t", "--plugin", str(plugin), wait=False)
    log = s.logs[-1]
    said = wait_for(lambda: [ln for ln in log.read_text().splitlines() if "still importing" in ln][1:], 20,
                    "the slow import reported twice")
    assert f"--plugin {plugin}" in said[0] and "seconds=" in said[0], said
    assert s.status()["groups"].get("slow", {}).get("workers", 0) == 0
    release.touch()
    wait_for(lambda: s.status()["groups"].get("slow", {}).get("workers", 0) == 1, 20, "the pool to start after it")


def test_invalid_plugin_settings_stop_the_pool_with_one_line(stack_factory, tmp_path):
    s = stack_factory(cfg(tmp_path / "x.log", mode="shouty"))
    r = subprocess.run([sys.executable, "-m", "bucketwire", "worker", "-c", str(s.cfg_path), "-g", "life",
                        "--plugin", PLUGIN], capture_output=True, text=True, timeout=60, env=s.env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "[plugins.lifecycle] mode: must be 'ok' or 'loud', got 'shouty'" in r.stderr


def test_plugin_not_installed_is_named(stack_factory, tmp_path):
    s = stack_factory("[groups.g]\ntopics = ['t']\nplugins = ['no-such-plugin']\n")
    r = subprocess.run([sys.executable, "-m", "bucketwire", "worker", "-c", str(s.cfg_path), "-g", "g"],
                       capture_output=True, text=True, timeout=60, env=s.env)
    assert r.returncode == 1 and "'no-such-plugin' is named in the config but not installed" in r.stderr


def test_register_commands_and_plugins_listing():
    lifecycle.register_commands(cli=cli)
    r = CliRunner().invoke(cli, ["lifecycle-hello"])
    assert r.exit_code == 0 and r.output.strip() == "hello from a plugin"
    r = CliRunner().invoke(cli, ["plugins", "--plugin", PLUGIN])
    assert r.exit_code == 0, r.output
    listed = {p["name"]: p["hooks"] for p in json.loads(r.output)}
    assert listed["lifecycle"] == sorted(["handle_event", "register_commands", "validate_settings", "worker_shutdown",
                                          "worker_startup"])


STARTUP = """
import os
from bucketwire import hookimpl

@hookimpl
def worker_startup(ctx):
    {body}

@hookimpl
def handle_event(event):
    pass
"""


def test_a_failing_worker_startup_logs_its_traceback_once_and_sums_up_the_repeats(stack_factory, tmp_path):
    """A `worker_startup` that raises (a server not up yet) stops its child, and the pool restarts it with
    backoff. Every restart logged the whole traceback again (two children: two a second at first, then one per
    child every few seconds for as long as the server was down), burying everything else in the pool's log, and
    the backoff started over every minute. Now the first failure is one line naming the plugin and the error,
    with its traceback once; each identical one after is one line counting it, the backoff keeps growing while
    the failures go on, and the pool says when the plugin starts again."""
    counter, release = tmp_path / "attempts", tmp_path / "db-up"
    plugin = tmp_path / "dbdown.py"
    plugin.write_text(STARTUP.format(body=f"open({str(counter)!r}, 'a').write('x')\n    "
                                          f"if not os.path.exists({str(release)!r}):\n        "
                                          "raise ConnectionError('database not up yet')"))
    s = stack_factory("")
    s.start_hub()
    port = free_port()
    w = s.start_worker("db", 2, "--topic", "t", "--plugin", str(plugin), "--metrics", f"127.0.0.1:{port}",
                       wait=False)

    def failing() -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = re.search(r'^bucketwire_worker_startup_failing\{group="db"\} (\S+)$', r.read().decode(), re.M)
        return float(m[1]) if m else None

    wait_for(lambda: counter.exists() and len(counter.read_text()) >= 6, 30, "six startup attempts")
    assert failing() == 2.0  # the pool's /metrics: both children's last start failed
    # status shows the failing pool (its group looked like one nobody runs: "start `bucketwire worker`")
    (fp,) = wait_for(lambda: [p for p in s.status().get("failing_starts", {}).get("db", []) if p["count"] >= 3],
                     30, "status to show the failing pool")
    assert fp["plugin"] == "dbdown" and fp["pid"] == w.pid, fp
    assert fp["line"].startswith("ConnectionError: database not up yet (") and "dbdown.py, line " in fp["line"], fp
    r = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(s.cfg_path)], capture_output=True,
                       text=True, timeout=60, env=s.env)
    assert (f"! group db: the pool on {fp['host']} (pid {w.pid}) cannot start its workers: worker_startup of plugin "
            "'dbdown' failed ") in r.stdout, r.stdout + r.stderr
    release.write_text("")
    wait_for(lambda: s.status()["groups"].get("db", {}).get("workers", 0) == 2, 40, "both children started")
    wait_for(lambda: "failing_starts" not in s.status(), 20, "status to stop showing the failing pool")
    assert failing() == 0.0
    w.send_signal(signal.SIGTERM)
    assert w.wait(20) == 0
    text = s.logs[-1].read_text()
    failures = len(counter.read_text()) - 2  # the two that started
    first = "worker_startup of plugin 'dbdown' failed: ConnectionError: database not up yet"
    assert text.count(first) == 1 and text.count("Traceback") == 1, text
    # the traceback is the plugin's own frames: not the framework's and pluggy's that called it
    assert 'dbdown.py", line' in text and "_multicall" not in text and "child.py" not in text, text
    assert text.index(first) < text.index("Traceback") < text.index("failed again"), text
    again = [ln for ln in text.splitlines() if "worker_startup of plugin 'dbdown' failed again" in ln]
    assert len(again) == failures - 1 and "(2 times)" in again[0] and f"({failures} times)" in again[-1], text
    assert all("restarting the child in" in ln for ln in again), again
    # each slot's wait doubles with its failures in a row (it fell back as the crashes of the last minute did)
    for slot in ("slot=0", "slot=1"):
        waits = [float(ln.split("restarting the child in ")[1].split(" s")[0]) for ln in again if ln.endswith(slot)]
        assert all(b == a * 2 for a, b in zip(waits, waits[1:], strict=False)), (slot, waits)
    assert "worker child died" not in text and "Process bucketwire-worker" not in text, text
    assert "worker_startup of plugin 'dbdown' succeeded after" in text, text


POOL = """
import sys
from bucketwire import config, logs
from bucketwire.worker.supervisor import make_spec, run_pool
logs.setup("text", 0)
cfg = config.load(sys.argv[1])
sys.exit(run_pool(cfg, make_spec(cfg, "db", ["t"], [sys.argv[2]]), 1, restart_backoff=(120.0, 120.0)))
"""


def test_sighup_starts_a_child_waiting_out_a_failed_startup_at_once(stack_factory, tmp_path):
    """An author whose worker_startup failed fixes the plugin and sends the pool SIGHUP, as the guide says, to
    load it again. A child waiting out its restart backoff (up to 30 s) was left waiting: the reload went to
    live children only, and the pool went on saying nothing until the wait was over. It is started at once."""
    plugin = tmp_path / "dbdown.py"
    plugin.write_text(STARTUP.format(body="raise ConnectionError('database not up yet')"))
    s = stack_factory("")
    s.start_hub()
    log = tmp_path / "pool.log"
    with log.open("wb") as out:
        w = subprocess.Popen([sys.executable, "-c", POOL, str(s.cfg_path), str(plugin)], env=s.env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "restarted in 120 s" in log.read_text(), 30, "the first failed startup")
        plugin.write_text(STARTUP.format(body="pass"))
        w.send_signal(signal.SIGHUP)
        # the child would otherwise wait out the 120 s backoff
        wait_for(lambda: s.status()["groups"].get("db", {}).get("workers", 0) == 1, 60, "the fixed child to join")
        wait_for(lambda: "worker_startup of plugin 'dbdown' succeeded after 1 failed attempt(s)" in log.read_text(),
                 10, "the pool to say the plugin started")
    finally:
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0, log.read_text()


@pytest.mark.parametrize("body", ["sys.exit(2)", "sys.exit(0)", "raise KeyboardInterrupt('planned')"])
def test_a_worker_startup_that_raises_a_base_exception_is_a_failed_startup(stack_factory, tmp_path, body):
    """sys.exit() (a library's CLI code) or KeyboardInterrupt out of `worker_startup` is that plugin's failed
    startup, like any exception: logged with its name and traceback once, the child restarted with backoff. It
    left the child as its exit code: sys.exit(2) stopped the whole pool as a 'configuration error' naming no
    plugin and no cause, sys.exit(0) restarted it naming none, KeyboardInterrupt printed multiprocessing's
    traceback."""
    counter = tmp_path / "attempts"
    plugin = tmp_path / "quits.py"
    plugin.write_text("import sys\n" + STARTUP.format(body=f"open({str(counter)!r}, 'a').write('x')\n    {body}"))
    s = stack_factory("")
    s.start_hub()
    w = s.start_worker("q", 1, "--topic", "t", "--plugin", str(plugin), wait=False)
    # the third attempt starts once the second failure was said
    wait_for(lambda: (counter.exists() and len(counter.read_text()) >= 3) or w.poll() is not None, 30,
             "three startup attempts")
    assert w.poll() is None, s.dump_logs()
    w.send_signal(signal.SIGTERM)
    assert w.wait(20) == 0
    text = s.logs[-1].read_text()
    assert text.count("worker_startup of plugin 'quits' failed: ") == 1 and text.count("Traceback") == 1, text
    assert "worker_startup of plugin 'quits' failed again (2 times)" in text, text
    # a pool that stopped says its report is over: status showed it for 90 s after
    wait_for(lambda: "failing_starts" not in s.status(), 10, "status to forget the stopped pool")
    assert "Process bucketwire-worker" not in text and "configuration error" not in text, text


def test_ctx_publish_in_worker_startup_stops_the_pool_with_one_line(stack_factory, tmp_path):
    """ctx.publish() has no event to travel with in worker_startup and raises every time: the child was
    restarted with backoff for good, two tracebacks per attempt, a pool that never took an event."""
    plugin = tmp_path / "early.py"
    plugin.write_text(STARTUP.format(body="ctx.publish('hello', {'pid': os.getpid()})"))
    s = stack_factory("")
    r = subprocess.run([sys.executable, "-m", "bucketwire", "worker", "-c", str(s.cfg_path), "-g", "early",
                        "--topic", "t", "--plugin", str(plugin)], capture_output=True, text=True, timeout=60,
                       env=s.env)
    assert r.returncode == 2, r.stderr  # a child's configuration error, as for a ConfigError raised there
    assert "Traceback" not in r.stderr, r.stderr
    assert ("[plugins.early] worker_startup called ctx.publish(), which works only inside handle_event (a "
            "follow-on is committed with the ack of the event that caused it); publish from handle_event, or "
            "send other events with bucketwire.client.HubClient") in r.stderr, r.stderr


class Commands:
    """A plugin adding one command under a name given per instance."""

    def __init__(self, name: str, command: str) -> None:
        self.PLUGIN_NAME, self.command = name, command

    @hookimpl
    def register_commands(self, cli):
        @cli.command(name=self.command)
        def cmd():
            """Say which plugin this is."""
            click.echo(f"from {self.PLUGIN_NAME}")


def test_a_plugin_command_cannot_take_a_builtin_or_another_plugins_name():
    """A plugin command named `status` replaced the built-in in `bucketwire --help` ("status  Say hello from
    ...") while `bucketwire status` still ran the built-in; of two plugins adding `export`, one silently won.
    Each is one warning line now, and the command already there stays."""
    from bucketwire.cli import add_plugin_commands
    from bucketwire.worker.plugin_loading import load

    group = click.Group(commands=[click.Command("status", callback=lambda: click.echo("built-in"))])
    loaded = load(entry_points=False, objects=[("first", Commands("first", "export")),
                                               ("second", Commands("second", "export")),
                                               ("third", Commands("third", "status")),
                                               ("fourth", Commands("fourth", "fourth-cmd"))])
    warnings = add_plugin_commands(group, loaded)
    assert CliRunner().invoke(group, ["status"]).output == "built-in\n"
    assert CliRunner().invoke(group, ["fourth-cmd"]).output == "from fourth\n"
    # pluggy calls the last registered first
    assert CliRunner().invoke(group, ["export"]).output == "from second\n"
    assert warnings == [
        "plugin 'third' adds a command 'status', which is bucketwire's own; it is not added: give it another name",
        "plugin 'first' adds a command 'export', which is plugin 'second''s; it is not added: give it another name",
    ], warnings


class ExitsOnRegister:
    """A plugin whose register_commands ends 'the program' (it ran a CLI of its own, which exits)."""

    PLUGIN_NAME = "exits"

    @hookimpl
    def register_commands(self, cli):
        sys.exit(0)


def test_a_register_commands_that_calls_sys_exit_is_one_warning_line_and_the_cli_keeps_working():
    """The guide: a plugin whose registration fails is one warning line and the CLI keeps working. A sys.exit(0)
    there went past that: every command that loads plugins (`--help`, `plugins`, a plugin's own command) ended
    at once, silently, with exit code 0, and the other plugins' commands were never added."""
    from bucketwire.cli import add_plugin_commands
    from bucketwire.worker.plugin_loading import load

    group = click.Group()
    loaded = load(entry_points=False, objects=[("other", Commands("other", "other-cmd")), ("exits", ExitsOnRegister())])
    warnings = add_plugin_commands(group, loaded)
    assert warnings == ["plugin 'exits' failed to register commands: SystemExit: 0"], warnings
    assert CliRunner().invoke(group, ["other-cmd"]).output == "from other\n"


PART = """
from bucketwire import ConfigError, hookimpl

PLUGIN_NAME = {name!r}

def _log(line):
    with open({log!r}, "a") as f:
        f.write(line + "\\n")

@hookimpl
def worker_startup(ctx):
    _log("startup {name}")
    if {fail!r} == "raise":
        raise ConnectionError("database not up yet")
    if {fail!r} == "config":
        raise ConfigError("url: the server refused it")

@hookimpl
def worker_shutdown(ctx):
    _log("shutdown {name}")

@hookimpl
def handle_event(event):
    pass
"""


def _attempts(log: Path) -> list[list[str]]:
    """The log's lines cut into startup attempts (each begins where a 'startup' follows a 'shutdown')."""
    out: list[list[str]] = []
    for ln in log.read_text().splitlines():
        if not out or (ln.startswith("startup") and out[-1][-1].startswith("shutdown")):
            out.append([])
        out[-1].append(ln)
    return out


@pytest.mark.parametrize("fail", ["raise", "config"])
def test_a_worker_startup_that_fails_part_way_shuts_down_those_already_started(stack_factory, tmp_path, fail):
    """Plugins whose worker_startup had run got no worker_shutdown when a later one raised: what they opened
    (connections, files, threads) leaked at every restart. They get it, in reverse order; the failing one and
    those never started do not."""
    log = tmp_path / "parts.log"
    specs = []
    for name in ("p1", "p2", "p3", "p4"):
        f = tmp_path / f"{name}.py"
        f.write_text(PART.format(name=name, log=str(log), fail=fail if name == "p3" else ""))
        specs += ["--plugin", str(f)]
    s = stack_factory("")
    s.start_hub()
    w = s.start_worker("parts", 1, "--topic", "t", *specs, wait=False)
    if fail == "raise":  # restarted with backoff: every attempt closes what it opened
        wait_for(lambda: log.exists() and log.read_text().count("startup p3") >= 2, 30, "two startup attempts")
        w.send_signal(signal.SIGTERM)
        assert w.wait(20) == 0
    else:  # the pool stops with the line
        assert w.wait(30) == 2
    attempts = _attempts(log)
    first = attempts[0][:attempts[0].index("startup p3") + 1 + sum(1 for ln in attempts[0] if "shutdown" in ln)]
    started = [ln.split()[1] for ln in first if ln.startswith("startup")]
    assert started[-1] == "p3" and len(started) >= 2, first  # p3 is not the first called, so something leaked
    before = started[:-1]
    assert first == [f"startup {n}" for n in started] + [f"shutdown {n}" for n in reversed(before)], attempts
    if fail == "raise":
        assert attempts[1][:len(started)] == first[:len(started)], attempts
