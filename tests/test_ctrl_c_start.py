"""Ctrl+C in the first moments of `bucketwire hub` / `worker` / `dev`, while Python is still importing bucketwire and
before the command has put in its own SIGINT handler. That used to print a KeyboardInterrupt traceback (or click's
"Aborted!" and exit 1): the first thing a user sees after a mistyped command they stop at once.

The signal is sent to the process group (what a terminal's Ctrl+C does) when the process reports, through
PYTHONPROFILEIMPORTTIME, that it has finished importing a given module: a point inside the import phase that does
not depend on the machine's speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bucketwire.procutil import free_port

BUCKETWIRE = str(Path(sys.executable).parent / "bucketwire")


def write_config(tmp: Path) -> Path:
    cfg = tmp / "bucketwire.toml"
    cfg.write_text(f"""
[hub]
http = "127.0.0.1:{free_port()}"
publish = "tcp://127.0.0.1:{free_port()}"
work = "tcp://127.0.0.1:{free_port()}"
state_dir = "{tmp / 'state'}"

[groups.g]
topics = ["a"]
plugins = []
""")
    return cfg


def _sigint_as_in_a_terminal() -> None:
    """A terminal's foreground command starts with SIGINT at its default. A test run started from a background job
    (`make test &`, nohup, some CI runners) hands down SIGINT *ignored*, which survives exec: Python then installs
    no handler, the Ctrl+C below is never seen, and each test hung until its 120 s timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when_imported(args: list[str], module: str, cwd: Path) -> tuple[int, str]:
    """Start the console script, send SIGINT to its group once `module` has been imported; (exit code, output
    without the import-time lines)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([BUCKETWIRE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, env=env,
                         start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
    assert p.stderr is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        for raw in p.stderr:
            line = raw.decode(errors="replace")
            seen.append(line)
            if line.startswith("import time:") and line.rstrip().endswith(f" {module}"):
                os.killpg(p.pid, signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(seen[-20:])
        else:
            raise AssertionError(f"{module} was never imported:\n" + "".join(seen[-20:]))
        rest = p.stderr.read().decode(errors="replace")
        code = p.wait(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    text = "".join(line for line in (*seen, *rest.splitlines(keepends=True)) if not line.startswith("import time:"))
    return code, text


@pytest.mark.parametrize("command", [["hub"], ["worker", "--group", "g"], ["dev", "--state-dir", "dev-state"]],
                         ids=["hub", "worker", "dev"])
def test_ctrl_c_while_importing_exits_quietly_with_130(tmp_path: Path, command: list[str]) -> None:
    cfg = write_config(tmp_path)
    args = command if command[0] == "dev" else [*command, "-c", str(cfg)]
    code, text = interrupt_when_imported(args, "bucketwire.envelope", tmp_path)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "Aborted" not in text, text
    assert code == 130, (code, text)


def test_ctrl_c_after_the_imports_before_the_hub_runs_is_quiet(tmp_path: Path) -> None:
    """Past the imports the hub opens its journal and binds its sockets before its own handler is in: click turned
    the KeyboardInterrupt into 'Aborted!' and exit 1. Interrupted there it is 130; if the signal lands once the hub
    runs, the hub stops as asked (0). Either way nothing but the hub's own lines."""
    cfg = write_config(tmp_path)
    code, text = interrupt_when_imported(["hub", "-c", str(cfg)], "bucketwire.hub.ingress", tmp_path)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "Aborted" not in text, text
    assert code in (130, 0), (code, text)


STALL = """
import os, sys, time
if "--multiprocessing-fork" in sys.argv:  # a worker child of multiprocessing's spawn, not the pool itself
    sys.stderr.write(f"a worker child is importing: {os.getpid()}\\n")
    sys.stderr.flush()
    time.sleep(1)  # pacing: still importing when the Ctrl+C comes
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _catches_sigint(pid: int) -> bool:
    """Whether the process has a handler of its own for SIGINT (SigCgt in /proc: the worker child's, once in)."""
    try:
        caught = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGINT - 1) & 1)


def test_ctrl_c_while_the_worker_children_import_is_quiet(tmp_path: Path) -> None:
    """Ctrl+C just after `worker pool started`, while its children (multiprocessing's spawn) were still importing
    bucketwire: the terminal's SIGINT reached every child before its own handler was in, and each printed a
    KeyboardInterrupt traceback (or `Fatal Python error: init_import_site`). A sitecustomize holds each child in
    its imports; the SIGINT reaches one child there alone (so that nothing else ends it before it could print),
    which goes on to take its own handler, then the whole pool, which stops as asked."""
    cfg = write_config(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STALL)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen([BUCKETWIRE, "worker", "--group", "g", "-n", "1", "-c", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True,
                         preexec_fn=_sigint_as_in_a_terminal)
    assert p.stdout is not None
    seen: list[str] = []
    try:
        for raw in p.stdout:
            seen.append(raw.decode(errors="replace"))
            if seen[-1].startswith("a worker child is importing: "):
                child = int(seen[-1].rsplit(" ", 1)[1])
                os.kill(child, signal.SIGINT)
                break
        else:
            raise AssertionError("no worker child started:\n" + "".join(seen))
        deadline = time.monotonic() + 30
        while not _catches_sigint(child) and not _gone(child):
            assert time.monotonic() < deadline, "the child neither went nor took its handler"
            time.sleep(0.05)  # pacing: the poll interval of a wait with a deadline
        os.killpg(p.pid, signal.SIGINT)  # the whole group, as a terminal does: the pool stops
        text = "".join(seen) + p.stdout.read().decode(errors="replace")
        code = p.wait(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    for bad in ("Traceback", "KeyboardInterrupt", "Fatal Python error"):
        assert bad not in text, text
    assert [ln for ln in text.splitlines() if "worker child" in ln and "importing" not in ln] == [], text  # no death
    assert text.count("a worker child is importing") == 1, text  # nor a restart
    assert "worker pool stopped" in text, text
    assert code in (0, 130), (code, text)
