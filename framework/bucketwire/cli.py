"""The `bucketwire` command. Expected failures (bad config, hub down, port taken) are one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from bucketwire import logs
from bucketwire.commands._common import config_option, load_config, reader_gone
from bucketwire.config import ConfigError
from bucketwire.procutil import on_stop_signals, stop_when_orphaned


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the exceptions a user can cause into one clear line."""
    from bucketwire.client import HubRefused, HubUnavailable
    from bucketwire.hub.journal import JournalError

    @wraps(fn)
    def inner(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except (ConfigError, HubUnavailable, HubRefused, JournalError, OSError) as e:
            if reader_gone(e):
                raise  # click ends quietly: `status | head -1` once head has what it wanted is no error
            raise click.ClickException(str(e)) from None

    return inner




@click.group()
@click.version_option(package_name="bucketwire")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log line format on stderr.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for per-event lines).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, log_format: str, verbose: int, quiet: bool) -> None:
    """bucketwire: object-storage events into work."""
    verbosity = -1 if quiet else verbose
    logs.setup(log_format, verbosity)
    ctx.obj = {"log_format": log_format, "verbosity": verbosity}



@cli.command()
@config_option
@friendly
def hub(config_path: str | None) -> None:
    """Run the hub: webhook ingress, journal, fan-out and consumer groups."""
    from bucketwire.hub.ingress import serve
    from bucketwire.hub.loop import Hub

    cfg = load_config(config_path)
    h = Hub(cfg)
    srv = serve(h, cfg.hub.http)
    if not cfg.hub.auth_tokens:
        click.echo("warning: [hub] auth_token is not set; webhook ingress accepts unauthenticated requests",
                   err=True)
    on_stop_signals(h.stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: h.request_reload())  # re-read keys: docs/security.md
    try:
        h.run()
    finally:
        srv.close()


@cli.command()
@config_option
@click.option("--group", "-g", required=True, help="Consumer group this pool joins.")
@click.option("--topic", "-t", "topics", multiple=True,
              help="Serve only these topics of the group; a group not in the config consumes these (required then).")
@click.option("--processes", "-n", type=click.IntRange(1, 512), help="Child processes (default: group's setting).")
@click.option("--plugin", "-p", "local_plugins", multiple=True, help="Also load this module or .py file.")
@click.option("--credit", type=click.IntRange(1, 10_000), help="Events in flight per child (default: group's).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to finish on SIGTERM.")
@click.option("--metrics", expose_value=False, callback=lambda c, p, v: c.meta.__setitem__("bw_metrics", v),
              help="Serve the pool's Prometheus metrics on HOST:PORT (default: [groups.G] metrics).")
@click.option("--start", type=click.Choice(["latest", "earliest"]),
              help="Where a group new to the hub starts: at the head (default) or the oldest retained event.")
@click.option("--trace-plugins", is_flag=True, help="Log every hook call: plugin, hook, event id, duration, "
              "outcome (same as BUCKETWIRE_TRACE_PLUGINS=1).")
@click.pass_context
@friendly
def worker(ctx: click.Context, config_path: str | None, group: str, topics: tuple[str, ...],
           processes: int | None, local_plugins: tuple[str, ...], credit: int | None, drain_timeout: float,
           start: str | None, trace_plugins: bool) -> None:
    """Run a worker pool for one consumer group."""
    from bucketwire.worker.plugin_loading import TRACE_ENV
    from bucketwire.worker.supervisor import default_processes, make_spec, run_pool

    if trace_plugins:
        os.environ[TRACE_ENV] = "1"  # the children inherit it

    cfg = load_config(config_path)
    from bucketwire.security import check_key_files, client_keys

    check_key_files(cfg.security)  # a bad key file is one line here, not a crash in every child
    client_keys(cfg)
    spec = make_spec(cfg, group, list(topics), list(local_plugins), credit, start)
    flag = ctx.meta.get("bw_metrics")
    code = run_pool(cfg, spec, processes or default_processes(cfg, group), log_format=ctx.obj["log_format"],
                    verbosity=ctx.obj["verbosity"], drain_timeout=drain_timeout,
                    metrics=flag or getattr(cfg.groups.get(group), "metrics", None),
                    metrics_setting="--metrics" if flag else f"[groups.{group}] metrics")
    sys.exit(code)


@cli.command()
@config_option
@click.argument("topic")
@click.argument("data_json")
@click.option("--type", "type_", help="CloudEvents type (default bucketwire.TOPIC).")
@click.option("--subject", help="CloudEvents subject.")
@click.option("--id", "event_id", help="Event id (default: random); the same id twice is committed once.")
@click.option("--timeout", type=float, help="Seconds to wait for the hub's commit.")
@friendly
def publish(config_path: str | None, topic: str, data_json: str, type_: str | None, subject: str | None,
            event_id: str | None, timeout: float | None) -> None:
    """Publish one event; returns after the hub committed it."""
    from bucketwire.client import HubClient
    from bucketwire.envelope import NESTING_REFUSAL, too_deep

    cfg = load_config(config_path)
    try:
        data = json.loads(data_json, parse_constant=_not_json)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="DATA_JSON") from None
    except RecursionError:  # deeper than the json module reads; said as the hub says it of every way in
        raise click.BadParameter(NESTING_REFUSAL, param_hint="DATA_JSON") from None
    if too_deep([data]):  # the envelope holds the data one level down; the client could not even encode some
        raise click.BadParameter(NESTING_REFUSAL, param_hint="DATA_JSON")
    with HubClient(cfg, timeout=timeout) as c:
        res = c.publish(topic, data, type=type_, subject=subject, id=event_id)
    click.echo(json.dumps(res))


def _not_json(name: str) -> Any:
    """NaN and Infinity, which Python's reader takes and JSON has not: committed, they became null."""
    raise ValueError(f"{name} is not a JSON number")


@cli.command()
@config_option
@click.argument("topics", nargs=-1)
@click.option("--from-seq", type=click.IntRange(1), help="Replay from this seq (per topic), then follow live.")
@friendly
def tail(config_path: str | None, topics: tuple[str, ...], from_seq: int | None) -> None:
    """Print envelopes as JSON lines: replay from the journal, then follow live with no gap.

    If the hub goes away, one line on stderr says so and tail waits for it; when it is back, tail goes on from
    the last seq it printed (no gap, no duplicate) and says so. Events retention dropped before tail read them
    are the one gap: a line on stderr names their seqs. Ctrl+C stops it.
    """
    from bucketwire.client import follow

    cfg = load_config(config_path)
    stop = threading.Event()
    out = sys.stdout

    def on_hub(state: str, next_seqs: dict[str, int]) -> None:
        where = ", ".join(f"{t} after seq {n - 1}" for t, n in sorted(next_seqs.items())) or "no events yet"
        if state == "lost":
            click.echo(f"tail: lost the hub at {' '.join(cfg.client.publish_endpoints)}; waiting for it to come back "
                       f"(will resume: {where})", err=True)
        else:
            click.echo(f"tail: hub is back; resumed ({where})", err=True)

    def on_gap(topic: str, first: int, last: int) -> None:
        seqs = f"seq {first}" if first == last else f"seqs {first}-{last}"
        click.echo(f"tail: {topic} {seqs} no longer in the journal (retention dropped them); going on from seq "
                   f"{last + 1}", err=True)

    def on_start(st: dict[str, Any]) -> None:
        # Only now is there a line in hand to finish: a Ctrl+C while the first request waited for a silent hub was
        # kept until [client] timeout, then said 'no answer from the hub'. Until here it ends tail at once (130).
        on_stop_signals(stop.set)
        _say_unknown_topics(cfg, topics, st)

    try:
        for _t, _s, body in follow(cfg, list(topics) or None, from_seq, stop=stop.is_set, on_hub=on_hub,
                                   on_gap=on_gap, on_start=on_start):
            out.write(body.decode("utf-8", "replace") + "\n")
            out.flush()
    except BrokenPipeError:
        pass


def _say_unknown_topics(cfg: Any, topics: tuple[str, ...], st: dict[str, Any]) -> None:
    """A topic the hub has never had (a typo: `thumbnail-redy`) looks to tail like a quiet one, and tail printed
    nothing, forever. One line names the hub's topics; tail still waits, since the topic may yet come. `st`:
    the status tail's start was read from, so what is published after the line is printed."""
    from bucketwire.client import HubClient, HubRefused, HubUnavailable

    named = {*cfg.topics, *(t for g in cfg.groups.values() for t in g.topics), *(r.topic for r in cfg.routes),
             cfg.hub.dead_letter, *(t.dead_letter for t in cfg.topics.values() if t.dead_letter)}
    asked = [t for t in topics if t not in named]  # the config's topics exist before their first event
    missing = [t for t in asked if t not in st.get("topics", {})]
    if not missing:
        return
    try:
        with HubClient(cfg, timeout=5) as c:
            have = sorted(named | set(c.status().get("topics", {})))
    except (HubUnavailable, HubRefused, OSError):
        return  # follow says what it finds of the hub
    listed = ", ".join(have[:20]) + (f", ... ({len(have)} in all)" if len(have) > 20 else "") if have else "none"
    for t in missing:
        click.echo(f"tail: the hub has no topic '{t}' yet (its topics: {listed}); waiting for its first event",
                   err=True)


@cli.command(name="plugins")
@config_option
@click.option("--plugin", "-p", "local_plugins", multiple=True, help="Also load this module or .py file.")
@friendly
def plugins_cmd(config_path: str | None, local_plugins: tuple[str, ...]) -> None:
    """List discovered plugins and the hooks each implements (with -c: once their settings there pass)."""
    from bucketwire.commands.doctor import check_plugin_settings
    from bucketwire.worker import plugin_loading as loader

    loaded = loader.load(None, list(local_plugins))
    if config_path:
        # The settings checks doctor and a worker run: a section the pool would refuse at start passed here.
        cfg = load_config(config_path)
        installed = set(loaded.names) if not local_plugins else set(loader.load(None, []).names)
        bad = [f.what for f in check_plugin_settings(cfg, installed, local_plugins) if f.level == "error"]
        if bad:
            more = f" ({len(bad) - 1} more: run bucketwire doctor -c {config_path})" if len(bad) > 1 else ""
            raise ConfigError(bad[0] + more)
    out = []
    for name in loaded.names:
        plugin = loaded.pm.get_plugin(name)
        hooks = sorted(h.name for h in loaded.pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "module": getattr(plugin, "__name__", repr(plugin)), "hooks": hooks})
    click.echo(json.dumps(out, indent=2))


from bucketwire.commands import dev as _dev  # noqa: E402
from bucketwire.commands import doctor as _doctor  # noqa: E402 - commands register after `cli` exists
from bucketwire.commands import keys as _keys  # noqa: E402
from bucketwire.commands import listen as _listen  # noqa: E402
from bucketwire.commands import ops as _ops  # noqa: E402
from bucketwire.commands import plugin_new as _plugin_new  # noqa: E402
from bucketwire.commands import seaweed_source as _seaweed_source  # noqa: E402

cli.add_command(_dev.dev)
cli.add_command(_keys.keys)
cli.add_command(_listen.listen)
cli.add_command(_ops.status)  # status, replay, dlq: commands/ops.py
cli.add_command(_ops.replay)
cli.add_command(_ops.group)
cli.add_command(_ops.dlq)
cli.add_command(_doctor.doctor)
cli.add_command(_plugin_new.plugin)
cli.add_command(_seaweed_source.seaweed_source)


def _add_builtin_groups() -> None:
    from bucketwire.commands.bench import bench

    cli.add_command(bench)


def _register_plugin_commands() -> None:
    """Let installed plugins add subcommands (`bucketwire audit verify`, ...)."""
    from bucketwire.worker import plugin_loading as loader

    try:
        loaded = loader.load(None, [])
    except ConfigError as e:
        click.echo(f"warning: {e}", err=True)
        return
    for line in add_plugin_commands(cli, loaded):
        click.echo(f"warning: {line}", err=True)


def add_plugin_commands(group: click.Group, loaded: Any) -> list[str]:
    """Each plugin's `register_commands`, in pluggy's order; returns a line for each command not added.

    A command may not take a name already taken, by bucketwire or by a plugin called before: click's
    `add_command` replaces silently, so a plugin's `status` stood in `--help` for the built-in (which still ran,
    as built-in commands load no plugins), and of two plugins' `export` one silently won."""
    from bucketwire.worker.plugin_loading import PLUGIN_FAILURES, said_of

    owner: dict[str, str | None] = dict.fromkeys(group.commands)  # None: bucketwire's own
    lines = []
    for name, caller in loaded.callers("register_commands"):
        before = dict(group.commands)
        try:
            caller(cli=group)
        except PLUGIN_FAILURES as e:  # a broken plugin must not break the CLI (a sys.exit() ended it)
            lines.append(f"plugin {name!r} failed to register commands: {said_of(e)}")
        for cmd, obj in list(group.commands.items()):
            if before.get(cmd) is obj:
                continue
            if cmd in before:
                group.commands[cmd] = before[cmd]
                holder = "bucketwire's own" if owner[cmd] is None else f"plugin {owner[cmd]!r}'s"
                lines.append(f"plugin {name!r} adds a command {cmd!r}, which is {holder}; it is not added: give it "
                             "another name")
            else:
                owner[cmd] = name
    return lines


def _names_a_builtin(argv: list[str]) -> bool:
    """True when the first word of `argv` is one of bucketwire's own commands. Registering plugin commands loads
    every installed plugin (the bundled ones import minio and Pillow: ~0.4 s), which `hub`, `worker` or `status`
    never use; anything else (`--help`, a plugin's command, an option before the command) still loads them."""
    return bool(argv) and not argv[0].startswith("-") and argv[0] in cli.commands


def main() -> None:
    stop_when_orphaned()
    _add_builtin_groups()
    if not _names_a_builtin(sys.argv[1:]):
        _register_plugin_commands()
    cli()
