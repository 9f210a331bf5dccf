"""Run the test suite with a $TMPDIR of its own, then fail if it left anything behind.

    python .ci/suite.py [PYTEST ARGS...]        (what `make test` runs)

Why: temp files nobody removes pile up silently. One machine's /tmp held 56 GB of them (a SeaweedFS leveldb dir and
glog file per `weed` start, a directory per `bench bus` round) before anyone looked. Every process the suite starts
inherits this $TMPDIR, so after pytest returns:

- no process may still carry it in its environment (a hub, pool, weed or nats-server that outlived its test);
  they are listed, then killed so one failed run does not leave them running;
- the directory may hold nothing but pytest's own `pytest-of-<user>` (tmp_path, which pytest prunes itself).

The directory is removed when the run passes; when it fails its path is printed (the failing tests' tmp_path is
in it). The check itself costs well under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE = float(os.environ.get("BUCKETWIRE_SUITE_GRACE", "15"))
"""Seconds processes get to finish exiting after pytest returns (a pool's children drain after their parent)."""


def survivors(tmpdir: str) -> dict[int, str]:
    """Live processes whose environment has TMPDIR at or under `tmpdir`: started by the suite, pid -> command."""
    needle = b"TMPDIR=" + os.fsencode(tmpdir)
    found: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            continue  # exited; its parent (if it is ours, listed too) has not reaped it
        if any(v == needle or v.startswith(needle + b"/") for v in env):
            found[int(d.name)] = cmd[:200]
    return found


def main(args: list[str]) -> int:
    tmpdir = tempfile.mkdtemp(prefix="bucketwire-suite-")
    pytest = str(Path(sys.executable).with_name("pytest"))
    # Ctrl+C reaches pytest too (one foreground process group): it stops and tears its fixtures down. This
    # process waits for that and then checks as usual; it used to raise KeyboardInterrupt here, SIGKILL pytest
    # mid-teardown and skip the checks below, leaving a session's `weed` running and this TMPDIR behind. A Python
    # handler (not SIG_IGN) so pytest, exec'd, gets the default action.
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    rc = subprocess.Popen([pytest, *args], env={**os.environ, "TMPDIR": tmpdir}).wait()
    problems = []

    deadline = time.monotonic() + GRACE
    left = survivors(tmpdir)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)  # pacing a poll with a deadline
        left = survivors(tmpdir)
    if left:
        problems.append(f"{len(left)} process(es) the suite started outlived it (killed now):")
        problems += [f"  {pid} {cmd}" for pid, cmd in sorted(left.items())]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously: gone when this says so
        while survivors(tmpdir) and time.monotonic() < deadline:
            time.sleep(0.05)

    stray = sorted(e for e in os.listdir(tmpdir) if not e.startswith("pytest-of-"))
    if stray:
        problems.append(f"the suite left {len(stray)} entr{'y' if len(stray) == 1 else 'ies'} in its TMPDIR "
                        "(something it starts writes outside the directories it was given, or does not clean up):")
        problems += [f"  {tmpdir}/{e}" for e in stray[:50]]

    for line in problems:
        print(f"suite: {line}", file=sys.stderr)
    if interrupted and not problems:  # nothing to look at: a stopped run's tmp_paths are no failure's
        shutil.rmtree(tmpdir, ignore_errors=True)
        print("suite: interrupted", file=sys.stderr)
        return 130
    if rc == 0 and not problems:
        shutil.rmtree(tmpdir, ignore_errors=True)
        return 0
    print(f"suite: its TMPDIR is kept for a look: {tmpdir}", file=sys.stderr)
    return 130 if interrupted else rc or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
