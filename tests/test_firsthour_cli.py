"""A new user's first mistakes on the command line, each one line and a non-zero exit, never a loop or a
traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


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


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    if isinstance(cmd, click.Group):
        return [x for name, sub in cmd.commands.items() for x in _commands(sub, (*path, name))]
    return [(path, cmd)]


def test_every_option_of_every_command_is_in_the_readme_and_its_help() -> None:
    """The README's CLI block is where a newcomer looks first: `dev --config` and `--s3-port`, `publish
    --timeout`, `replay --no-wait`/`--timeout`, `doctor -q` and seaweed-source's `--state`, `--since` ... were
    missing from it. Each option of each built-in command is named on its command's lines there (long or short
    form), each has help text, and no option the block names is one the command lacks."""
    from bucketwire.cli import cli

    block = re.search(r"^## CLI\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert block
    lines: dict[tuple[str, ...], str] = {}
    last: list[tuple[str, ...]] = []
    shared: list[tuple[str, list[tuple[str, ...]]]] = []  # each line and the commands it is about
    for line in block.group(1).splitlines():
        code = line.split("#")[0]
        m = re.match(r"bucketwire\s+([a-z-]+)", code)
        if m:  # a group's line names its subcommands (`dlq list|show|retry|purge`, `keys generate ... | list`)
            top = cli.commands.get(m.group(1))
            subs = [w for w in re.findall(r"[a-z-]+", code) if isinstance(top, click.Group) and w in top.commands]
            last = [(m.group(1), w) for w in subs] or [(m.group(1),)]
        elif not code.startswith(" "):
            last = []
        for key in last:  # a continuation line (indented) belongs to the command above it
            lines[key] = lines.get(key, "") + " " + code
        if last:
            shared.append((code, last))
    missing, stale, bare = [], [], []
    for path, cmd in _commands(cli):
        if path[0] in ("bench", "audit") or not cmd.params:  # bench: its own section; audit: a plugin's
            continue
        text = lines.get(path, "")
        named = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                if not named & {*p.opts, *p.secondary_opts}:
                    missing.append(f"{' '.join(path)} {p.opts[-1]}")
                if not p.help:
                    bare.append(f"{' '.join(path)} {p.opts[-1]}")
    cmds = dict(_commands(cli))
    for code, paths in shared:  # a line naming several commands (`dlq list|show|...`) may name any one's options
        known = {o for path in paths if path in cmds for p in cmds[path].params
                 for o in (*p.opts, *getattr(p, "secondary_opts", []))}
        stale += [f"{code.strip()}: {o}" for o in set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", code)) - known
                  if o != "--help" and paths[0][0] not in ("bench", "audit")]
    assert missing == [], f"options the README's CLI block does not name: {missing}"
    assert bare == [], f"options without help text: {bare}"
    assert stale == [], f"options the README names that the command does not have: {stale}"


def _to_a_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe nobody reads any more: `bucketwire status | head -1` once head has its line."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "bucketwire", *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(w)


def test_output_piped_into_a_reader_that_stopped_is_no_error(stack_factory) -> None:  # type: ignore[no-untyped-def]
    """`bucketwire status | head -1`, `dlq show ... | head`: the commands that turn an OSError into one line
    printed `Error: [Errno 32] Broken pipe` for the reader having what it wanted; click's own commands, and `tail`,
    end quietly. A real error still says itself."""
    s = stack_factory()
    s.start_hub()
    for args in (["plugins"], ["status", "-c", str(s.cfg_path)], ["status", "-c", str(s.cfg_path), "--json"]):
        p = _to_a_closed_pipe(args)
        assert p.stderr == "" and p.returncode != 0, (args, p.returncode, p.stderr)
    p = _to_a_closed_pipe(["status", "-c", str(s.dir / "missing.toml")])
    assert p.stderr.startswith("Error: ") and "missing.toml: file not found" in p.stderr, p.stderr


def test_ctrl_c_while_tail_or_status_watch_waits_for_a_silent_hub_stops_it(tmp_path: Path) -> None:
    """`tail` and `status --watch` put in their own Ctrl+C handler (stop after the line in hand) before they had
    reached the hub: a Ctrl+C while the first request waited was kept until [client] timeout ran out, and then
    said `Error: no answer from the hub at ... within 5s` and exit 1, as if the user had not asked to stop. Until
    the hub answers there is nothing to finish: it ends as a Ctrl+C does before a command is ready, 130, quietly.
    The 'hub' here accepts connections and says nothing, so the command is inside its request when asked."""
    import os
    import signal
    import socket

    for args in (["tail", "photos"], ["status", "--watch", "1"]):
        lsn = socket.socket()  # one per command: tail connects twice (work and publish), and its second waits
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(8)
        port = lsn.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[hub]\nwork = "tcp://127.0.0.1:{port}"\npublish = "tcp://127.0.0.1:{port}"\n'
                       '[client]\ntimeout = 5\n')
        p = subprocess.Popen([sys.executable, "-m", "bucketwire", *args, "-c", str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            lsn.settimeout(30)
            conn, _ = lsn.accept()  # the command is connected, waiting for its first answer
            os.killpg(p.pid, signal.SIGINT)
            out, err = p.communicate(timeout=60)
            conn.close()
        finally:
            lsn.close()
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        assert (p.returncode, err) == (130, ""), (args, p.returncode, err)
