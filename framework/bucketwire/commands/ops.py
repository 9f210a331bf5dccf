"""Operator commands: `status` (table, --json, --watch), `replay`, `group rm` and `dlq list|show|retry|purge`.

Dead letters are ordinary events on a dead-letter topic, so the journal already keeps them durably and in
order. What is new here is their *handled* state: `retry` and `purge` ask the hub (the DLQ command) to commit a
marker event (`bucketwire.dead-letter.handled`) on the topic `<dead-letter topic>.handled`, with an id derived
from the dead letter's id. That keeps the state in the hub's journal (no second database, works from any host
that can reach the hub), makes both commands idempotent (the journal deduplicates the marker, so running `retry`
twice re-delivers once), and leaves an audit trail of who did what.

The hub, not this command, builds the retried event from the dead letter in its journal: the original event on
its original topic with extensions of the types CloudEvents allows: `targetgroup` (only the group that
dead-lettered it handles it; other groups of the topic skip it), `retries` (an integer: how often it was
dead-lettered before), `retryof` and `retrysource` (the first event's id and source) and `retrydeadletter` (the
dead letter it was retried from). If it fails again, its new dead letter holds it with those extensions, so the
history is a chain of dead letters that `dlq show` follows back. Retries, markers and `targetgroup` are hub-only, so no
publisher can forge or steer them; a follow-on the hub refused (role, hop limit) is never retried. The retried
event and its marker are committed in one transaction.

`dlq list --json` and `dlq show` print `{"dead_letter": {...state...}, "event": <the dead letter's envelope>}`:
the envelope stays a valid CloudEvent and the tool's own state sits beside it, not inside it.
"""

from __future__ import annotations

import getpass
import json
import re
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click

from bucketwire import protocol as P
from bucketwire.commands._common import config_option, load_config, reader_gone
from bucketwire.config import Config, ConfigError
from bucketwire.envelope import HUB_SOURCE, RESERVED_SOURCES, EnvelopeError, parse_seq
from bucketwire.hub.ops import DEAD_TYPE, HANDLED_SUFFIX, HANDLED_TYPE
from bucketwire.procutil import on_stop_signals


def _errors(fn: Any) -> Any:
    """One-line errors for what an operator can cause (hub down, bad config), like the core commands."""
    from functools import wraps

    from bucketwire.client import HubRefused, HubUnavailable

    @wraps(fn)
    def inner(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except (ConfigError, HubUnavailable, HubRefused, OSError, EnvelopeError) as e:
            if reader_gone(e):
                raise  # `dlq show ... | head`: click ends quietly
            raise click.ClickException(str(e)) from None

    return inner


# -- small parsers -----------------------------------------------------------------------------------------------
_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d' -> seconds."""
    m = _DUR.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration; write e.g. 90s, 15m, 2h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_time(text: str) -> float:
    """An ISO-8601 time ('2024-05-01T10:00:00Z', local time without a zone) or an age ('15m' = 15 minutes ago)."""
    if _DUR.match(text):
        return time.time() - parse_duration(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an ISO time (2024-05-01T10:00:00Z) nor an age (15m)") from None
    return dt.timestamp()


def _event_time(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


LEASES_STALE = 3.0
"""Seconds after which `status` says the leases it shows are old: the hub reads them every second."""


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    if s < 86400:
        return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"
    return f"{s // 86400:.0f}d{s % 86400 // 3600:02.0f}h"


def fmt_bytes(n: int) -> str:
    f = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if f < 1024 or unit == "GB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{f:.1f} TB"


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# -- status ------------------------------------------------------------------------------------------------------
def _configured_groups(config_path: str | None) -> set[str] | None:
    """The groups the config defines, or None when it cannot be read (then the hints stay as they were)."""
    from bucketwire import config as config_mod

    try:
        return set(config_mod.load(config_path).groups)
    except Exception:  # a hint must never break status
        return None


TOPIC_ROWS = 50
"""Topics `status` shows in its table when there are more: those a group consumes, then the busiest."""


def render_status(st: dict[str, Any], config_path: str | None = None) -> str:
    """The `kafka-consumer-groups --describe` view: where events pile up and why, at a glance. The commands in
    its hints name `config_path`, so they run pasted as printed."""
    import shlex

    c = f"-c {shlex.quote(config_path)} " if config_path else ""
    h = st.get("hub", {})
    journal = "ok" if h.get("journal_ok", True) else "FAILING (ingress answers 503)"
    lines = [
        f"hub {h.get('version', '?')} (schema {h.get('schema', '?')})  up {fmt_age(h.get('uptime'))}  "
        f"journal {journal}, {fmt_bytes(int(h.get('journal_bytes', 0)))}  "
        f"ingress pending {h.get('ingress_pending', 0)}",
        "",
    ]
    rows: list[tuple[str, ...]] = [("GROUP", "STATE", "TOPIC", "CURSOR", "HEAD", "LAG", "INFLIGHT", "WORKERS",
                                    "CREDIT", "RETRYING", "DEAD", "OLDEST-UNACKED")]
    consumers: dict[str, list[str]] = {}
    for g, gs in sorted(st.get("groups", {}).items()):
        credit = f"{gs.get('credit', 0) - gs.get('credit_free', 0)}/{gs.get('credit', 0)}"
        for t, ts in sorted(gs["topics"].items()):
            consumers.setdefault(t, []).append(g)
            state = gs.get("state", "")
            if t in gs.get("replaying", {}):
                state = "replaying"
            rows.append((g, state, t, str(ts["cursor"]), str(ts["head"]), str(ts["lag"]), str(gs["inflight"]),
                         str(gs["workers"]), credit, str(gs["retrying"]), str(gs["dead_lettered"]),
                         fmt_age(gs.get("oldest_unacked_age")) if gs.get("oldest_unacked_age") else "-"))
    lines.append(table(rows) if len(rows) > 1 else "no consumer groups")
    lines.append("")
    # With several hubs (jetstream) one hub dispatches each group; the table above lists only this hub's, so
    # say who has the others: where their workers go and which hub's status and logs to read.
    dispatch = st.get("dispatch") or {}
    if dispatch:
        # The other hubs' leases are as the hub last read them (off its loop, every second): None = not yet.
        age = h.get("leases_age", 0.0)
        nobody = "unknown (leases not read yet)" if age is None else "nobody (lease free)"
        drows: list[tuple[str, ...]] = [("GROUP", "DISPATCHED-BY", "ENDPOINT", "THIS-HUB")]
        for g, d in sorted(dispatch.items()):
            drows.append((g, d.get("leader") or nobody, d.get("endpoint") or "-",
                          "dispatching" if d.get("role") == "dispatching" else "standby"))
        note = (f"; other hubs' leases as read {fmt_age(age)} ago (the NATS lease bucket does not answer now)"
                if age is not None and age >= LEASES_STALE else "")
        lines += [f"this hub: {h.get('id', '?')}{note}", table(drows), ""]
    trows: list[tuple[str, ...]] = [("TOPIC", "HEAD", "RATE/S", "CONSUMED-BY")]
    topics = st.get("topics", {})
    shown = sorted(topics)
    if len(shown) > TOPIC_ROWS:  # a table of 60,000 lines helps nobody: the consumed and the busiest ones
        shown = sorted(sorted(topics, key=lambda t: (t not in consumers, -topics[t].get("rate", 0.0), t))[:TOPIC_ROWS])
    for t in shown:
        ts = topics[t]
        trows.append((t, str(ts["head"]), f"{ts.get('rate', 0.0):.1f}", ",".join(consumers.get(t, [])) or "-"))
    lines.append(table(trows) if len(trows) > 1 else "no topics yet")
    if len(shown) < len(topics):
        lines.append(f"... and {len(topics) - len(shown):,} more topics (status --json lists every one)")
    hints = []
    restored = h.get("restored")
    if isinstance(restored, dict) and restored.get("line"):  # said once at the hub's start; kept until its stop
        hints.append(f"! {restored['line']} (since the hub started)")
    configured = _configured_groups(config_path)
    failing = st.get("failing_starts") or {}
    for g, pools in sorted(failing.items()):
        for fp in pools:
            # a pool is running: "start `bucketwire worker`" (below) would send the operator the wrong way
            hints.append(f"! group {g}: the pool on {fp.get('host')} (pid {fp.get('pid')}) cannot start its "
                         f"workers: worker_startup of plugin {fp.get('plugin')!r} failed {fp.get('count')} time(s) in "
                         f"a row: {fp.get('line')}; it retries in {fp.get('retry_in')} s; that pool's log has the "
                         "traceback")
    for g, gs in sorted(st.get("groups", {}).items()):
        s = gs.get("state")
        if s == "stalled" and g not in failing:
            # A group the config does not name runs only --plugin modules on --topic topics: without them the
            # printed command is refused, so it names them.
            extra = "" if configured is None or g in configured else "".join(
                f" --topic {shlex.quote(t)}" for t in sorted(gs.get("topics", {}))) + " --plugin MODULE"
            hints.append(f"! group {g}: {gs['lag']} events waiting and no workers: "
                         f"start `bucketwire worker {c}--group {g}{extra}`")
        elif s == "saturated":
            hints.append(f"! group {g}: all worker credit in use, work waits: add workers/processes or raise credit")
        if gs.get("plugin_sets"):
            sets = "; ".join(f"[{', '.join(ps['plugins']) or '-'}] settings {ps['settings']} on "
                             f"{', '.join(ps['workers'][:3])}{' ...' if len(ps['workers']) > 3 else ''}"
                             for ps in gs["plugin_sets"])
            hints.append(f"! group {g}: its pools run different plugins or plugin settings (each event reaches one "
                         f"of them): {sets}")
        for t, ts in sorted(gs["topics"].items()):
            if ts.get("skipped_by_restore"):
                hints.append(f"! group {g}: {ts['skipped_by_restore']} seqs of {t} were lost when journal.db was "
                             "restored from an older backup, before it consumed them (since the hub started)")
            if ts.get("skipped_by_retention"):
                hints.append(f"! group {g}: {ts['skipped_by_retention']} events of {t} were dropped by retention "
                             "before it consumed them (since the hub started): raise [hub] retention_days / "
                             "retention_mb, or keep its workers running")
        if gs.get("dead_lettered"):
            # a count since the journal began, retried and purged ones too: `dlq list` knows which still wait
            hints.append(f"  group {g}: {gs['dead_lettered']} dead-lettered so far; those still waiting: "
                         f"`bucketwire dlq list {c}--group {g}`")
        for r in gs.get("long_running", []):
            # The events queued behind it in its child wait; past handler_timeout its child is killed.
            # A hub from before `run` was checked sent a NaN age or timeout as null: shown as "-", not a traceback.
            age, limit = (v if isinstance(v, int | float) else None for v in (r.get("age"), r.get("timeout")))
            mark = "!" if age is not None and limit is not None and age >= limit / 2 else " "
            hints.append(f"{mark} group {g}: handler running for {fmt_age(age)} (handler_timeout "
                         f"{'-' if limit is None else f'{limit:g}s'}) on {r['topic']}:{r['seq']} "
                         f"{r.get('key') or '-'} id {r.get('id')} "
                         + ("(a worker of the previous dispatcher, as its pool reports)" if r.get("reported") else
                            f"(attempt {r.get('attempt')}, {r.get('host')} pid {r.get('pid')})"))
    if h.get("journal_error"):
        hints.append(f"! {h['journal_error']}: start the stopped NATS nodes; the hubs recover by themselves")
    elif not h.get("journal_ok", True):
        hints.append("! journal cannot commit (disk full?): free space under [hub] state_dir; it recovers by itself")
    if hints:
        lines += ["", *hints]
    return "\n".join(lines)


@click.command(name="status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", "-w", "watch", type=float, is_flag=False, flag_value=2.0, default=None,
              help="Refresh in place every N seconds (default 2) until Ctrl+C.")
@_errors
def status(config_path: str | None, as_json: bool, watch: float | None) -> None:
    """Per group: state, cursor, head, lag, in-flight, workers, credit, retries, dead letters, oldest unacked;
    per topic: head and rate."""
    from bucketwire.client import HubClient, HubUnavailable

    cfg = load_config(config_path)
    stop = threading.Event()
    tty = sys.stdout.isatty()
    with HubClient(cfg) as c:  # [client] timeout
        armed = False
        text = ""
        answered = time.time()  # when the hub last answered
        down = False  # a --watch that had its answers, and the hub has stopped answering
        while True:
            try:
                st = c.status()
            except HubUnavailable as e:
                # A watch is what an operator keeps open while restarting the hub: it ended at the first refresh
                # the hub missed, where `tail` waits. The first answer must still come (a wrong endpoint is one
                # line, as without --watch); after that an outage is said once, and asked about every interval.
                if not (watch and armed):
                    raise
                if not down or tty:
                    down = True
                    line = (f"{time.strftime('%H:%M:%S')}  hub not answering (its last answer at "
                            f"{time.strftime('%H:%M:%S', time.localtime(answered))}): {e}; asking again every "
                            f"{watch:g}s (Ctrl+C to stop)")
                    if tty:
                        sys.stdout.write(f"\x1b[H\x1b[2J{line}\n\nits last answer:\n{text}\n")
                        sys.stdout.flush()
                    else:
                        click.echo(line + "\n")
                if stop.wait(watch):
                    return
                continue
            if down and not tty:
                click.echo(f"{time.strftime('%H:%M:%S')}  hub back, after {time.time() - answered:.0f}s without an "
                           "answer\n")
            down, answered = False, time.time()
            if watch and not armed:
                # Once the hub answered: a Ctrl+C while the first request waited for a silent hub was kept until
                # [client] timeout, then said 'no answer from the hub'; before this it ends the command at once.
                on_stop_signals(stop.set)
                armed = True
            text = json.dumps(st, indent=2) if as_json else render_status(st, config_path)
            if watch and tty:
                sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S") + f"  every {watch:g}s\n" + text + "\n")
                sys.stdout.flush()
            else:
                click.echo(text)
            if not watch and st.get("hub", {}).get("journal_error"):
                # What the hub said about the cluster, as the exit code of a health check: one line on stderr.
                raise click.ClickException(f"{st['hub']['journal_error']}; ingress answers 503 and no group is "
                                           "dispatched until a quorum is back: start the stopped NATS nodes")
            if not watch or stop.wait(watch):
                return
            if not tty:
                click.echo("")


# -- replay ------------------------------------------------------------------------------------------------------
@click.command(name="replay")
@config_option
@click.option("--group", "-g", required=True, help="Consumer group whose cursor moves.")
@click.option("--topic", "-t", "topics", multiple=True, help="Only these topics of the group (default: all).")
@click.option("--from-seq", type=click.IntRange(1), help="Deliver again from this seq on (per topic).")
@click.option("--since", "since", help="Deliver again from the first event committed at/after this time "
                                       "(ISO time, or an age like 15m).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Show progress until the group caught up.")
@click.option("--timeout", type=float, default=0, help="Stop waiting after this many seconds (0 = until done).")
@_errors
def replay(config_path: str | None, group: str, topics: tuple[str, ...], from_seq: int | None, since: str | None,
           wait: bool, timeout: float) -> None:
    """Rewind (or skip forward) a group's cursor so it receives events again from a seq or a time.

    In-flight events of the topic finish first; then the cursor moves and is persisted, and the group's
    workers receive every event from that point, in order.
    """
    from bucketwire.client import HubClient

    if (from_seq is None) == (since is None):
        raise click.UsageError("give exactly one of --from-seq N or --since TIME")
    cfg = load_config(config_path)
    hdr: dict[str, Any] = {"group": group, "topics": list(topics) or None}
    if from_seq is not None:
        hdr["from_seq"] = from_seq
    else:
        hdr["since"] = parse_time(since or "")
    with HubClient(cfg) as c:  # [client] timeout
        _, reply, _ = c.request(P.REPLAY, hdr, {P.REPLAYR})
        if reply.get("error"):
            raise click.ClickException(reply["error"])
        res: dict[str, Any] = reply["topics"]
        for t, r in sorted(res.items()):
            state = "pending (in-flight events finish first)" if r["pending"] else "applied"
            gone = int(r.get("dropped") or 0)  # below the oldest event the journal holds: not delivered again
            gap = (f"; seqs {r['from'] - gone}-{r['from'] - 1} were dropped by retention" if gone > 1 else
                   f"; seq {r['from'] - 1} was dropped by retention" if gone == 1 else "")
            click.echo(f"{group}/{t}: cursor {r['cursor_was']} -> {r['from'] - 1}, {r['events']} event(s) to "
                       f"deliver again (head {r['head']}{gap}); {state}", err=True)
        total = sum(r["events"] for r in res.values())
        if not wait or total == 0:
            return
        goal = {t: r["head"] for t, r in res.items()}
        stop = threading.Event()
        on_stop_signals(stop.set)
        deadline = time.monotonic() + timeout if timeout else None
        with click.progressbar(length=total, label=f"replaying {group}", file=sys.stderr) as bar:
            shown, told = 0, False
            while not stop.is_set():
                g = c.status()["groups"].get(group, {})
                gs = g.get("topics", {})
                if not told and not g.get("workers"):
                    # Nothing moves the cursor until a worker comes: without this line the bar's label was all
                    # there was to see, forever, and the wait looked like a hung hub.
                    told = True
                    click.echo(f"\nno worker of group '{group}' is connected: the replay stands and is delivered "
                               f"when one joins (`bucketwire worker -c CONFIG --group {group}`, with --topic and "
                               "--plugin if the config does not name the group); waiting for it here until the "
                               "group caught up (Ctrl+C stops waiting, or use --no-wait)", err=True)
                done = sum(max(0, min(gs[t]["cursor"], goal[t]) - (res[t]["from"] - 1)) for t in goal if t in gs)
                done = min(done, total)
                bar.update(done - shown)
                shown = done
                if done >= total:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise click.ClickException(f"replay still running after {timeout:g}s ({done}/{total}); "
                                               f"watch it with `bucketwire status --watch`")
                stop.wait(0.25)


# -- group rm ----------------------------------------------------------------------------------------------------
@click.group(name="group")
def group() -> None:
    """Consumer groups the hub knows."""


@group.command(name="rm")
@config_option
@click.argument("name")
@click.option("--force", is_flag=True, help="With jetstream: remove a group the cluster holds cursors of though no "
              "hub dispatches it (once no hub's config names it).")
@_errors
def group_rm(config_path: str | None, name: str, force: bool) -> None:
    """Remove a group that is no longer used: its cursors and counters go, and status stops showing it.

    Only a group that is not in the config (one a worker made with `worker --group NAME --topic T`, or one taken
    out of the config) and has no connected workers; the hub refuses anything else with the reason. With
    jetstream, one no hub dispatches needs --force: a stopped hub's config may still name it. Its events stay in
    the journal.
    """
    from bucketwire.client import HubClient

    cfg = load_config(config_path)
    if name in cfg.groups:  # a hub started with this config makes it again, from its `start`
        raise click.ClickException(
            f"group {name!r} is configured in [groups.{name}] of {cfg.path or 'the config'}; remove that section "
            "from the config and restart the hub instead (a hub started with it would make the group again); "
            "nothing was removed")
    with HubClient(cfg) as c:  # [client] timeout
        _, reply, _ = c.request(P.GROUPRM, {"group": name, "force": force}, {P.GROUPRMR})
    if reply.get("error"):
        raise click.ClickException(reply["error"])
    if reply.get("already"):
        left = int(reply.get("left") or 0)
        click.echo(f"removed group {reply['group']} (removed before"
                   + (f"; deleted the {left} cursor(s) it had left)" if left else ")"))
        return
    lag = int(reply.get("lag") or 0)
    click.echo(f"removed group {reply['group']} (topics: {', '.join(reply.get('topics') or []) or 'none'}; "
               f"{lag} event(s) it had not acked)")


# -- dead letters ------------------------------------------------------------------------------------------------
def dead_letter_topics(cfg: Config) -> list[str]:
    names = {cfg.hub.dead_letter}
    for t in list(cfg.topics) + [t for g in cfg.groups.values() for t in g.topics]:
        names.add(cfg.dead_letter_for(t))
    return sorted(names)


PROBE_TOPICS = 1000
"""Topics the config does not name as dead-letter topics that the dlq commands look into (one read of the first
event each) for dead letters: a hub with tens of thousands of topics (one per object) is not read whole."""


def held_dead_letter_topics(client: Any, named: list[str]) -> tuple[list[str], int]:
    """Dead-letter topics the journal holds that `named` (the config's) leaves out, and how many topics were not
    looked into (past PROBE_TOPICS). A `dead_letter` renamed in the config leaves the dead letters of the old
    name in the journal: retryable and purgeable as any, but invisible to commands that read only the new name.
    A topic is one when a `dlq retry|purge` marked one of its dead letters (`<topic>.handled`), or when its first
    event is a dead letter the hub wrote. Topics no group consumes are looked into first, then those groups
    consume (an old dead-letter topic an alerting group still reads, with no markers, was found only by an
    operator who knew its name for --dlq-topic); not those the hub says the key may not read (`unreadable`: a key
    with a role sees its groups' topics in `status` whether or not it may read them, and a read refused is logged
    by the hub as a forbidden request)."""
    from bucketwire.client import HubRefused

    st = client.status()
    topics = set(st.get("topics", {}))
    consumed = {t for g in st.get("groups", {}).values() for t in g.get("topics", {})}
    skip = set(named) | {t + HANDLED_SUFFIX for t in named}
    found = {t[:-len(HANDLED_SUFFIX)] for t in topics - skip if t.endswith(HANDLED_SUFFIX)} & topics - set(named)
    cand = {t for t in topics - skip - found if not t.endswith(HANDLED_SUFFIX)} - set(st.get("unreadable", ()))
    rest = sorted(cand - consumed) + sorted(cand & consumed)
    for t in rest[:PROBE_TOPICS]:
        try:
            _, bodies = client.fetch(t, 1, 1)
        except HubRefused:  # a topic this key may not read ([security.roles]): not its dead letters either
            continue
        if bodies and _is_dead_letter(json.loads(bodies[0])):
            found.add(t)
    return sorted(found), max(0, len(rest) - PROBE_TOPICS)


def _is_dead_letter(ev: dict[str, Any]) -> bool:
    """Written by the hub as a dead letter (a publisher cannot use the hub's sources)."""
    return (ev.get("type") == DEAD_TYPE and isinstance(ev.get("data"), dict)
            and str(ev.get("source", "")).startswith(f"{HUB_SOURCE}dead-letter/"))


def read_topic(client: Any, topic: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Every envelope of a topic still in the journal, oldest first."""
    out: list[dict[str, Any]] = []
    nxt = 1
    while True:
        meta, bodies = client.fetch(topic, nxt)
        if not bodies:
            if meta.get("next", nxt) > nxt:
                nxt = meta["next"]
                continue
            return out
        for b in bodies:
            d = json.loads(b)
            out.append(d)
            nxt = parse_seq(d["seq"]) + 1
        if limit is not None and len(out) >= limit:
            return out


@dataclass(slots=True)
class DeadLetter:
    """A dead letter as the dlq commands see it: its envelope (untouched) and its handled state."""

    event: dict[str, Any]
    topic: str
    seq: int
    action: str | None = None
    at: str | None = None
    by: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.event["id"])

    @property
    def data(self) -> dict[str, Any]:
        d = self.event.get("data")
        return d if isinstance(d, dict) else {}

    @property
    def original(self) -> dict[str, Any]:
        o = self.data.get("event")
        return o if isinstance(o, dict) else {}

    @property
    def handled(self) -> bool:
        return self.action is not None

    def failure(self) -> dict[str, Any]:
        """This dead-lettering as one history entry."""
        d = self.data
        return {"deadletter": self.id, "dlseq": self.seq, "group": d.get("group"), "seq": d.get("seq"),
                "attempts": d.get("attempts"), "error": d.get("line"), "plugin": d.get("plugin"),
                "at": self.event.get("time")}

    def record(self) -> dict[str, Any]:
        """The JSON form of `dlq list --json` / `dlq show`: the envelope beside the tool's state, never inside it."""
        return {"dead_letter": {"topic": self.topic, "seq": self.seq, "handled": self.handled,
                                "action": self.action, "at": self.at, "by": self.by, "history": self.history},
                "event": self.event}


def load_dead_letters(client: Any, dl_topics: list[str]) -> list[DeadLetter]:
    """Dead letters with their handled state and the history of earlier dead-letterings of the same event."""
    out: list[DeadLetter] = []
    for dlt in dl_topics:
        handled: dict[str, dict[str, Any]] = {}
        for m in read_topic(client, dlt + HANDLED_SUFFIX):
            d = m.get("data") or {}
            # Only markers the hub wrote count (older versions wrote them as bucketwire://cli/dlq; both sources
            # are refused from publishers), so nobody can hide a dead letter by publishing a marker.
            if (m.get("type") == HANDLED_TYPE and str(m.get("source", "")).startswith(RESERVED_SOURCES)
                    and isinstance(d, dict) and d.get("deadletter")):
                handled.setdefault(d["deadletter"], d)
        for ev in read_topic(client, dlt):
            if not _is_dead_letter(ev):
                continue
            h = handled.get(ev["id"], {})
            out.append(DeadLetter(ev, dlt, parse_seq(ev["seq"]), h.get("action"), h.get("at"), h.get("by")))
    by_id = {dl.id: dl for dl in out}
    for dl in out:
        dl.history = _history(dl, by_id)
    # Oldest first across dead-letter topics too (as `dlq list` says): read topic by topic, the list went by
    # topic name. Sorted by the dead letter's time, its topic and seq keeping the order of one topic's.
    out.sort(key=lambda dl: (_event_time(dl.event.get("time")) or 0.0, dl.topic, dl.seq))
    return out


def _history(dl: DeadLetter, by_id: dict[str, DeadLetter]) -> list[dict[str, Any]]:
    """Earlier dead-letterings of this event, oldest first: follow `retrydeadletter` back through the dead letters
    still in the journal. Envelopes retried before `retries` became a count carry the list themselves."""
    chain: list[dict[str, Any]] = []
    o = dl.original
    seen = {dl.id}
    while isinstance(o.get("retrydeadletter"), str) and o["retrydeadletter"] in by_id:
        prev = by_id[o["retrydeadletter"]]
        if prev.id in seen:
            break
        seen.add(prev.id)
        chain.append(prev.failure())
        o = prev.original
    old = o.get("retries")
    return (list(old) if isinstance(old, list) else []) + chain[::-1]


def select(dls: list[DeadLetter], ids: tuple[str, ...], topic: str | None, group: str | None,
           older: float | None, newer: float | None, include_handled: bool) -> list[DeadLetter]:
    now = time.time()
    out = []
    for dl in dls:
        d = dl.data
        if not include_handled and dl.handled:
            continue
        if ids and not any(_matches_id(dl, i) for i in ids):
            continue
        if topic and d.get("topic") != topic:
            continue
        if group and d.get("group") != group:
            continue
        t = _event_time(dl.event.get("time"))
        age = now - t if t is not None else None
        if older is not None and (age is None or age < older):
            continue
        if newer is not None and (age is None or age > newer):
            continue
        out.append(dl)
    return out


def _matches_id(dl: DeadLetter, ident: str) -> bool:
    """An id is the dead letter's seq on its topic (`7` or `dead-letter:7`), its id or a prefix of at least 6
    characters, or the original event's id."""
    topic, _, seq = ident.rpartition(":")
    if seq.isdigit() and (not topic or topic == dl.topic) and dl.seq == int(seq):
        return True
    return (len(ident) >= 6 and dl.id.startswith(ident)) or dl.original.get("id") == ident


def _ambiguous(ident: str, dls: list[DeadLetter]) -> list[DeadLetter]:
    """The dead letters `ident` names when it names several that are not one failed event's: a bare seq held by
    more than one dead-letter topic (a topic with a `dead_letter` of its own), or an id prefix shared by several.
    Empty when it is not ambiguous. An original event's id names every group's dead letter of that event, which
    is meant (one event, retried to each group that failed it)."""
    hits = [dl for dl in dls if _matches_id(dl, ident)]
    if len(hits) < 2 or all(dl.original.get("id") == ident for dl in hits):
        return []
    return hits


def _dlq_options(fn: Any) -> Any:
    for opt in reversed([
        config_option,
        click.option("--topic", "-t", help="Only dead letters of this original topic."),
        click.option("--group", "-g", help="Only dead letters of this group."),
        click.option("--older-than", "older", help="Only dead letters older than this age (e.g. 1h)."),
        click.option("--newer-than", "newer", help="Only dead letters newer than this age (e.g. 15m)."),
        click.option("--dlq-topic", "dlq_topics", multiple=True,
                     help="Dead-letter topic(s) to read (default: every one the config names)."),
    ]):
        fn = opt(fn)
    return fn


def _load(config_path: str | None, dlq_topics: tuple[str, ...]) -> tuple[Config, Any, list[DeadLetter]]:
    from bucketwire.client import HubClient

    cfg = load_config(config_path)
    client = HubClient(cfg)  # [client] timeout
    if dlq_topics:
        return cfg, client, load_dead_letters(client, list(dlq_topics))
    named = dead_letter_topics(cfg)
    held, unchecked = held_dead_letter_topics(client, named)
    if held:
        click.echo(f"also reading dead-letter topic(s) the config no longer names: {', '.join(held)} (a renamed "
                   "dead_letter; their dead letters are listed, retried and purged like the others)", err=True)
    if unchecked:
        click.echo(f"{unchecked} topic(s) not looked into for dead letters (more than {PROBE_TOPICS}); name an old "
                   "dead-letter topic with --dlq-topic", err=True)
    return cfg, client, load_dead_letters(client, named + held)


def _ages(older: str | None, newer: str | None) -> tuple[float | None, float | None]:
    return (parse_duration(older) if older else None, parse_duration(newer) if newer else None)


@click.group(name="dlq")
def dlq() -> None:
    """Dead letters: list, show, retry (re-deliver to the group that failed them) and purge."""


@dlq.command(name="list")
@_dlq_options
@click.argument("ids", nargs=-1)
@click.option("--all", "include_handled", is_flag=True, help="Include dead letters already retried or purged.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_errors
def dlq_list(config_path: str | None, topic: str | None, group: str | None, older: str | None, newer: str | None,
             dlq_topics: tuple[str, ...], ids: tuple[str, ...], include_handled: bool, as_json: bool) -> None:
    """List dead letters (unhandled ones unless --all), oldest first."""
    o, n = _ages(older, newer)
    _, client, dls = _load(config_path, dlq_topics)
    client.close()
    sel = select(dls, ids, topic, group, o, n, include_handled)
    if as_json:
        for dl in sel:
            click.echo(json.dumps(dl.record()))
        return
    if not sel:
        click.echo("no dead letters" + ("" if include_handled else " waiting (use --all to include handled ones)"))
        return
    now = time.time()
    rows: list[tuple[str, ...]] = [("DLQ:SEQ", "AGE", "GROUP", "TOPIC:SEQ", "ATTEMPTS", "PLUGIN", "STATUS", "ID",
                                    "ERROR")]
    for dl in sel:
        d = dl.data
        t = _event_time(dl.event.get("time"))
        st = dl.action or "waiting"
        rows.append((f"{dl.topic}:{dl.seq}", fmt_age(now - t if t else None), str(d.get("group")),
                     f"{d.get('topic')}:{d.get('seq')}", str(d.get("attempts")), str(d.get("plugin") or "-"), st,
                     dl.id[:12], str(d.get("line") or d.get("error") or "")[:80]))
    click.echo(table(rows))
    c = f" -c {shlex.quote(config_path)}" if config_path else ""  # the hints run pasted as printed
    click.echo(f"\n{len(sel)} dead letter(s); `bucketwire dlq show{c} ID`, `bucketwire dlq retry{c} ID...`, "
               f"`bucketwire dlq purge{c} ID...`", err=True)


@dlq.command(name="show")
@_dlq_options
@click.argument("ids", nargs=-1, required=True)
@_errors
def dlq_show(config_path: str | None, topic: str | None, group: str | None, older: str | None, newer: str | None,
             dlq_topics: tuple[str, ...], ids: tuple[str, ...]) -> None:
    """Print dead letters in full (error with traceback, original envelope, handled state, earlier failures) as
    JSON: {"dead_letter": {...}, "event": {...}} per dead letter."""
    o, n = _ages(older, newer)
    _, client, dls = _load(config_path, dlq_topics)
    client.close()
    sel = select(dls, ids, topic, group, o, n, True)
    if not sel:
        raise click.ClickException(f"no dead letter matches {' '.join(ids)}; see `bucketwire dlq list --all`")
    for dl in sel:
        click.echo(json.dumps(dl.record(), indent=2))


def _act(config_path: str | None, topic: str | None, group: str | None, older: str | None, newer: str | None,
         dlq_topics: tuple[str, ...], ids: tuple[str, ...], everything: bool, action: str) -> None:
    if not (ids or topic or group or older or newer or everything):
        raise click.UsageError(f"say which dead letters to {action}: IDs, a filter (--topic/--group/--older-than/"
                               "--newer-than) or --all")
    o, n = _ages(older, newer)
    _, client, dls = _load(config_path, dlq_topics)
    try:
        sel = select(dls, ids, topic, group, o, n, False)
        # Each id must name a waiting dead letter: a typo (or one retried already) said "nothing to retry" with
        # exit 0 before, which a script takes for success. Checked before anything is done.
        missing = [i for i in ids if not any(_matches_id(dl, i) for dl in sel)]
        if missing:
            handled = all(any(_matches_id(dl, i) for dl in dls) for i in missing)
            raise click.ClickException(
                f"no waiting dead letter matches {' '.join(missing)}; nothing was "
                + ("retried" if action == "retry" else "purged")
                + (" (already retried or purged: `bucketwire dlq list --all`)" if handled
                   else " (see `bucketwire dlq list`)"))
        # `7` with seq 7 on two dead-letter topics named both, and both were retried or purged where the
        # operator meant one (the list shows each as DLQ-TOPIC:SEQ). Refused, like a typo, before anything is done.
        for ident in ids:
            several = _ambiguous(ident, sel)
            if several:
                names = ", ".join(f"{dl.topic}:{dl.seq} ({dl.id[:12]})" for dl in several)
                raise click.ClickException(
                    f"{ident} names {len(several)} waiting dead letters: {names}; nothing was "
                    + ("retried" if action == "retry" else "purged")
                    + ": name one as DLQ-TOPIC:SEQ or by its id (the DLQ:SEQ and ID columns of `bucketwire dlq "
                    "list`), or give them all")
        if not sel:
            click.echo(f"nothing to {action}: no waiting dead letter matches", err=True)
            return
        done, errors = 0, []
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        # A bar on a terminal only: piped, its label alone is a line before any error (one line is the rule).
        with click.progressbar(length=len(sel), label=f"{action} dead letters", file=sys.stderr,
                               hidden=not sys.stderr.isatty()) as bar:
            for i in range(0, len(sel), 100):
                chunk = sel[i:i + 100]
                items = [{"topic": dl.topic, "seq": dl.seq} for dl in chunk]
                # The hub commits the retried events, then (once they are stored) their markers: a dead letter is
                # never marked handled without its retry; a failure in between leaves it waiting, retried again.
                _, reply, _ = client.request(P.DLQ, {"action": action, "items": items, "by": by}, {P.DLQR})
                if reply.get("error"):
                    raise click.ClickException(str(reply["error"]))
                for r in reply.get("results", []):
                    if r.get("error"):
                        errors.append(str(r["error"]))
                    else:
                        done += 1
                bar.update(len(chunk))
        verb = "retried" if action == "retry" else "purged"
        click.echo(f"{verb} {done} dead letter(s)")
        for e in errors:
            click.echo(f"refused: {e}", err=True)
        if errors:
            raise click.ClickException(f"{len(errors)} dead letter(s) not {verb}; see the lines above")
    finally:
        client.close()


@dlq.command(name="retry")
@_dlq_options
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every waiting dead letter (with filters: every match).")
@_errors
def dlq_retry(config_path: str | None, topic: str | None, group: str | None, older: str | None, newer: str | None,
              dlq_topics: tuple[str, ...], ids: tuple[str, ...], everything: bool) -> None:
    """Deliver dead letters' original events again, to the group that failed them only.

    The retried event carries `retries` (how often it was dead-lettered before) and `retrydeadletter` (the dead
    letter it came from); if it fails again, `dlq show` lists every earlier failure.
    """
    _act(config_path, topic, group, older, newer, dlq_topics, ids, everything, "retry")


@dlq.command(name="purge")
@_dlq_options
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every waiting dead letter (with filters: every match).")
@_errors
def dlq_purge(config_path: str | None, topic: str | None, group: str | None, older: str | None, newer: str | None,
              dlq_topics: tuple[str, ...], ids: tuple[str, ...], everything: bool) -> None:
    """Mark dead letters handled without retrying them (they stay in the journal until retention, hidden from
    `dlq list` unless --all)."""
    _act(config_path, topic, group, older, newer, dlq_topics, ids, everything, "purge")
