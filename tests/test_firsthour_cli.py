"""A new user's first mistakes on the command line, each one line and a non-zero exit, never a loop or a
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_listen_with_an_invalid_bucket_name_is_one_line(tmp_path: Path) -> None:
    """`--bucket b` (a name S3 refuses) used to retry with backoff forever ("listen on b failed (invalid bucket
    name b); reconnecting in 16.0s"): no retry can make the name valid."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hub]\nwork = "tcp://127.0.0.1:9"\n[stores.m]\nendpoint = "127.0.0.1:9"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "listen", "-c", str(cfg), "--store", "m", "--bucket",
                        "b"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ("Error: --bucket b: invalid bucket name b; S3 bucket names are 3 to 63 characters: "
                        "lower-case letters, digits, '.' and '-'\n"), r.stderr


def test_a_misspelt_plugin_section_is_said_when_the_pool_starts(tmp_path: Path) -> None:
    """`[plugins.countr]` beside a pool running `counter`: the pool ran the plugin with its defaults and said
    nothing, so the settings the user wrote were silently not used."""
    import signal
    import time

    (tmp_path / "counter.py").write_text("from bucketwire import hookimpl\n\n@hookimpl\n"
                                         "def handle_event(event):\n    pass\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hub]\nwork = "tcp://127.0.0.1:9"\n[groups.g]\ntopics = ["t"]\nplugins = []\n'
                   '[plugins.countr]\nlimit = 3\n[plugins.thumbnail]\nsizes = [64]\n')
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", "worker", "-c", str(cfg), "--group", "g", "-n", "1",
                          "--plugin", str(tmp_path / "counter.py")], stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("worker pool started" in ln for ln in lines):
            line = p.stderr.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert "worker pool started" in text, text
        assert ("[plugins.countr] names no plugin this pool runs (it runs: counter); did you mean "
                "[plugins.counter]? its settings are not used") in text, text
        assert "thumbnail" not in text, "a section of a plugin other pools run is not this pool's business"
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)


def test_the_documented_run_it_command_starts_a_pool(tmp_path: Path) -> None:
    """README's "Run it: `bucketwire worker -c CONFIG --group csv --plugin my_counter.py`" (and docs/plugins.md's
    copy) stopped at "no [groups.csv] section ...; add it or pass --topic": a group not in the config needs its
    topics on the command line."""
    import re
    import shlex
    import signal

    root = Path(__file__).resolve().parent.parent
    found = {m for f in ("README.md", "docs/plugins.md")
             for m in re.findall(r"`(bucketwire worker -c CONFIG --group csv [^`]*my_counter\.py)`",
                                 (root / f).read_text())}
    assert len(found) == 1, found
    (tmp_path / "my_counter.py").write_text("from bucketwire import hookimpl\n\n@hookimpl\n"
                                            "def handle_event(event):\n    pass\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hub]\nwork = "tcp://127.0.0.1:9"\n')
    argv = [a.replace("CONFIG", str(cfg)) for a in shlex.split(found.pop())[1:]]
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", *argv], cwd=tmp_path, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        assert p.stderr is not None
        first = p.stderr.readline()
        assert "worker pool started" in first, first + p.stderr.read()
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)


def test_worker_help_says_what_topic_does_for_a_group_not_in_the_config() -> None:
    """`--topic` read "Serve only these topics of the group.": for a group the config does not name (the
    documented way to run a one-file plugin) it is where the group's topics come from, and the user reading
    --help had no way to know that a group not in the config needs it."""
    r = subprocess.run([sys.executable, "-m", "bucketwire", "worker", "--help"], capture_output=True, text=True,
                       timeout=30)
    text = " ".join(r.stdout.split())
    assert "-t, --topic TEXT Serve only these topics of the group; a group not in the config consumes these" in text, \
        r.stdout
