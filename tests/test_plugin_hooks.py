"""Hooks are called by pluggy's rules: argument subsets, wrappers, unknown hooks refused, tracing, Retry,
per-plugin state, and a plugin's exception kept as itself -- in the harness and in real worker pools."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bucketwire import ConfigError, Context, Event, Retry, hookimpl
from bucketwire import config as config_mod
from bucketwire.testing import PluginHarness
from bucketwire.worker.child import Plugins, WorkerSpec
from tests.fixtures_hub import RECORDER, wait_for

HERE = Path(__file__).parent / "plugins"
WRAPPERS, SUBSET, TYPO, FLAKY = (str(HERE / f"{n}.py") for n in ("wrappers", "subset", "typo", "flaky"))


def ev(topic: str = "t", **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="test.thing", topic=topic, data=data)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bucketwire", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=cwd)


# -- the harness: the worker child's own hook-calling code, in-process ------------------------------------------
class OnlyEvent:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def handle_event(self, event: Event) -> None:
        self.seen.append(event.id)


def test_an_implementation_may_take_a_subset_of_the_arguments() -> None:
    p = OnlyEvent()
    e = ev()
    with PluginHarness(p, name="only") as h:
        h.handle(e)
    assert p.seen == [e.id]


class Named:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.PLUGIN_NAME = name
        self.fail = fail

    @hookimpl
    def handle_event(self, event: Event, ctx: Context) -> None:
        if self.fail:
            raise RuntimeError(f"{ctx.plugin} failed")
        ctx.publish("done", {"by": ctx.plugin, "setting": ctx.settings.get("x")})


class Timing:
    PLUGIN_NAME = "timing"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @hookimpl(wrapper=True)
    def handle_event(self, event: Event, ctx: Context) -> Generator[None, Any, Any]:
        try:
            res = yield
        except Exception as e:
            self.calls.append((ctx.plugin, type(e).__name__))
            raise
        self.calls.append((ctx.plugin, "ok"))
        return res


def test_a_wrapper_wraps_each_plugins_call_and_each_plugin_keeps_its_own_settings() -> None:
    t = Timing()
    h = PluginHarness(Named("a"), Named("b"), t, sections={"b": {"x": 2}}, settings={"x": 1})
    out = h.handle(ev())
    assert sorted((o.data["by"], o.data["setting"]) for o in out) == [("a", 1), ("b", 2)]
    assert sorted(t.calls) == [("a", "ok"), ("b", "ok")]
    t.calls.clear()
    with pytest.raises(RuntimeError, match="bad failed"):
        PluginHarness(Named("bad", fail=True), t).handle(ev())
    assert t.calls == [("bad", "RuntimeError")]


def test_a_wrappers_own_topics_limit_the_calls_it_wraps() -> None:
    """`topics` in a plugin's section limits which events it sees; for a wrapper of handle_event that is which
    calls it wraps. A tracing wrapper given `topics = ["photos"]` wrapped every call of every topic."""
    t = Timing()
    h = PluginHarness(Named("a"), Named("b"), t, sections={"b": {"topics": ["docs", "photos"]},
                                                           "timing": {"topics": ["photos"]}})
    h.handle(ev("photos"))
    assert sorted(t.calls) == [("a", "ok"), ("b", "ok")], "both calls on its topic wrapped"
    t.calls.clear()
    out = h.handle(ev("docs"))
    assert sorted(o.data["by"] for o in out) == ["a", "b"], "the plugins still run on the other topic"
    assert t.calls == [], "unwrapped there"
    out = h.handle(ev("other"))
    assert [o.data["by"] for o in out] == ["a"] and t.calls == []


CALLS: list[tuple[Any, ...]] = []


class Logs:
    """A plain implementation, and one that takes only the event: each logs what it was called with."""

    def __init__(self, name: str) -> None:
        self.PLUGIN_NAME = name

    @hookimpl
    def handle_event(self, event: Event, ctx: Context) -> str:
        CALLS.append((self.PLUGIN_NAME, "plain", event.id, ctx.plugin, ctx.attempt, ctx.event is event,
                      dict(ctx.settings)))
        return "ignored"  # what a handler returns is not its outcome, whatever pluggy's rule gives

    @hookimpl(specname="handle_event", tryfirst=True)
    def first(self, event: Event) -> None:
        CALLS.append((self.PLUGIN_NAME, "first", event.id))


class WrapsNewAndOld:
    """A new-style and an old-style wrapper of handle_event, each logging around the call it wraps."""

    PLUGIN_NAME = "wraps"

    @hookimpl(wrapper=True, specname="handle_event")
    def new(self, event: Event, ctx: Context) -> Generator[None, Any, Any]:
        CALLS.append(("wraps", "new before", event.id, ctx.plugin))
        res = yield
        CALLS.append(("wraps", "new after", event.id, ctx.plugin, res))
        return res

    @hookimpl(hookwrapper=True, specname="handle_event", trylast=True)
    def old(self, ctx: Context) -> Generator[None, Any, None]:
        CALLS.append(("wraps", "old before", ctx.plugin))
        outcome = yield
        CALLS.append(("wraps", "old after", ctx.plugin, outcome.get_result()))


def test_each_plugins_call_is_pluggys_own_call_of_its_caller() -> None:
    """The worker calls each plugin's `handle_event` through pluggy exactly as the plugin's caller called by
    keyword does: the same implementations and wrappers (new and old style, `tryfirst`/`trylast`, a wrapper's own
    `topics`), in the same order, with the same arguments, and pluggy's list of results. Checked against the
    caller itself, for several topics and attempts (PluginRunner.run takes a shortcut into pluggy's call)."""
    h = PluginHarness(Logs("a"), Logs("b"), WrapsNewAndOld(), sections={"b": {"x": 2, "topics": ["docs", "photos"]},
                                                                       "wraps": {"topics": ["photos"]}},
                      settings={"x": 1}, trace=False)
    r = h.runner
    for topic in ("photos", "docs", "other", "photos"):
        for attempt in (1, 3):
            e = ev(topic)
            CALLS.clear()
            r.run(e, attempt)
            got = list(CALLS)
            CALLS.clear()
            wanted = []
            for name, _ in r.handlers:
                if not r.wants(name, e):
                    continue
                out = [w for w, want in r._wrap_topics.items() if topic not in want]
                returned = r.loaded.caller_without("handle_event", name, out)(event=e, ctx=r.ctx(name, e, attempt))
                wanted.append(returned)
            assert got == CALLS, (topic, attempt)
            assert wanted == [["ignored"]] * len(wanted)
            assert len(got) == {"photos": 12, "docs": 4, "other": 2}[topic], got


class WrapsEveryHook:
    """Old-style wrappers around every per-plugin hook: none of them may be skipped."""

    PLUGIN_NAME = "around"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl(hookwrapper=True, specname="validate_settings")
    def v(self) -> Generator[None, Any, None]:
        yield
        self.seen.append("validate_settings")

    @hookimpl(hookwrapper=True, specname="worker_startup")
    def s(self, ctx: Context) -> Generator[None, Any, None]:
        yield
        self.seen.append(f"worker_startup {ctx.plugin}")

    @hookimpl(hookwrapper=True, specname="handle_event")
    def h(self, ctx: Context) -> Generator[None, Any, None]:
        yield
        self.seen.append(f"handle_event {ctx.plugin}")

    @hookimpl(hookwrapper=True, specname="worker_shutdown")
    def d(self, ctx: Context) -> Generator[None, Any, None]:
        yield
        self.seen.append(f"worker_shutdown {ctx.plugin}")


def test_wrappers_run_around_every_hook() -> None:
    w = WrapsEveryHook()
    with PluginHarness(Stateful("one"), w) as h:
        h.handle(ev())
    assert w.seen == ["validate_settings", "worker_startup one", "handle_event one", "worker_shutdown one"]


class Typo:
    PLUGIN_NAME = "typo"

    @hookimpl
    def handle_events(self, event: Event) -> None:
        raise AssertionError("never called")


def test_an_unknown_hook_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ConfigError) as ei:
        PluginHarness(Typo())
    assert str(ei.value) == ("plugin 'typo' implements 'handle_events', which is not a bucketwire hook; "
                             "did you mean 'handle_event'?")


class BadArgs:
    PLUGIN_NAME = "badargs"

    @hookimpl
    def handle_event(self, evnt: Event) -> None:
        raise AssertionError("never called")


class WrapsItself:
    PLUGIN_NAME = "selfwrap"

    @hookimpl
    def handle_event(self, event: Event) -> None:
        pass

    @hookimpl(wrapper=True, specname="handle_event")
    def around(self, event: Event) -> Generator[None, Any, Any]:
        return (yield)


def test_bad_implementations_are_one_line_errors() -> None:
    with pytest.raises(ConfigError) as ei:
        PluginHarness(BadArgs())
    msg = str(ei.value)
    assert msg.startswith("plugin 'badargs': ") and "evnt" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="'selfwrap' both implements and wraps 'handle_event'"):
        PluginHarness(WrapsItself())


class Stateful:
    def __init__(self, name: str) -> None:
        self.PLUGIN_NAME = name

    @hookimpl
    def validate_settings(self, settings: dict[str, Any]) -> None:
        pass

    @hookimpl
    def worker_startup(self, ctx: Context) -> None:
        ctx.state["opened"] = [ctx.plugin]

    @hookimpl
    def handle_event(self, ctx: Context) -> None:
        ctx.state["opened"].append("event")

    @hookimpl
    def worker_shutdown(self, ctx: Context) -> None:
        ctx.state["opened"].append("closed")


def test_ctx_state_is_per_plugin_and_lasts_from_startup_to_shutdown() -> None:
    h = PluginHarness(Stateful("one"), Stateful("two"))
    with h:
        h.handle(ev())
        h.handle(ev())
    assert h.runner.state == {"one": {"opened": ["one", "event", "event", "closed"]},
                              "two": {"opened": ["two", "event", "event", "closed"]}}


class TwoOfEach:
    """A plugin with two implementations of each hook, as pluggy allows (`specname`): one plugin object whose
    functions each do a part of the work."""

    PLUGIN_NAME = "two-of-each"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl(specname="worker_startup")
    def open_client(self, ctx: Context) -> None:
        self.calls.append("open_client")

    @hookimpl(specname="worker_startup")
    def open_log(self, ctx: Context) -> None:
        self.calls.append("open_log")

    @hookimpl(specname="handle_event")
    def count(self, event: Event, ctx: Context) -> None:
        self.calls.append("count")
        ctx.publish("counted", {"by": "count"})

    @hookimpl(specname="handle_event")
    def index(self, event: Event, ctx: Context) -> None:
        self.calls.append("index")
        ctx.publish("indexed", {"by": "index"})

    @hookimpl(specname="worker_shutdown")
    def close_client(self, ctx: Context) -> None:
        self.calls.append("close_client")

    @hookimpl(specname="worker_shutdown")
    def close_log(self, ctx: Context) -> None:
        self.calls.append("close_log")


def test_each_implementation_of_a_plugin_is_called_once_per_hook_call() -> None:
    """pluggy calls each implementation once per hook call. A plugin with two implementations of a hook had its
    plugin caller (which holds both) called once per implementation: every event ran both twice (twice the S3
    writes, its follow-ons sent twice in one ACK), and worker_startup opened everything twice, leaking the first."""
    p = TwoOfEach()
    other = Stateful("other")
    with PluginHarness(p, other) as h:
        assert sorted(p.calls) == ["open_client", "open_log"]
        p.calls.clear()
        out = h.handle(ev())
        assert sorted(p.calls) == ["count", "index"]
        assert sorted(f.topic or "" for f in out) == ["counted", "indexed"]
        p.calls.clear()
    assert sorted(p.calls) == ["close_client", "close_log"]
    assert h.runner.state["other"] == {"opened": ["other", "event", "closed"]}, "the other plugin, once each"


def test_the_harness_applies_topics_like_a_worker() -> None:
    p = OnlyEvent()
    h = PluginHarness(p, name="only", settings={"topics": ["photos"]})
    h.handle(ev("photos"))
    h.handle(ev("videos"))
    assert len(p.seen) == 1


@pytest.mark.parametrize("topics", [5, True, {"photos": 1}, ["photos", 5]])
def test_a_topics_setting_that_is_no_list_of_topic_names_is_one_line(topics: Any) -> None:
    """`topics = 5` (or true, or a table) in a plugin's section was taken as no `topics` at all: the plugin ran on
    every topic of its group, which is what the setting was written to prevent, and nothing said so."""
    with pytest.raises(ConfigError) as ei:
        PluginHarness(OnlyEvent(), name="only", settings={"topics": topics})
    assert str(ei.value) == ("[plugins.only] topics: expected a list of topic names, e.g. topics = [\"photos\"]; "
                             f"got {topics!r}"), ei.value


class Retrying:
    PLUGIN_NAME = "retrying"

    @hookimpl
    def handle_event(self, event: Event) -> None:
        raise Retry(delay=2.5, reason="rate limited")


def test_retry_reaches_the_caller_as_itself_and_refuses_a_bad_delay() -> None:
    with pytest.raises(Retry) as ei:
        PluginHarness(Retrying()).handle(ev())
    assert ei.value.delay == 2.5 and ei.value.reason == "rate limited"
    for bad in (-1, "5", float("nan"), True):
        with pytest.raises(ValueError):
            Retry(delay=bad)  # type: ignore[arg-type]


@pytest.fixture
def trace_lines() -> Iterator[list[logging.LogRecord]]:
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    lg = logging.getLogger("bucketwire.trace")
    h, level = Keep(), lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    yield got
    lg.removeHandler(h)
    lg.setLevel(level)


def test_trace_env_logs_each_hook_call(monkeypatch: pytest.MonkeyPatch, trace_lines: list[logging.LogRecord]) -> None:
    monkeypatch.setenv("BUCKETWIRE_TRACE_PLUGINS", "1")
    e = ev()
    with PluginHarness(Retrying(), Named("a")) as h, pytest.raises(Retry):  # pluggy calls the last first
        h.handle(e)
    calls = [(r.plugin, r.hook, r.event_id, r.outcome) for r in trace_lines]  # type: ignore[attr-defined]
    assert ("a", "handle_event", e.id, "ok") in calls
    assert ("retrying", "handle_event", e.id, "retry") in calls
    assert all(isinstance(r.duration_ms, float) for r in trace_lines)  # type: ignore[attr-defined]
    monkeypatch.delenv("BUCKETWIRE_TRACE_PLUGINS")
    trace_lines.clear()
    PluginHarness(Named("a")).handle(ev())
    assert trace_lines == [], "tracing is off unless asked for"


# -- real worker pools ---------------------------------------------------------------------------------------
GROUP = """
[topics.t]
max_attempts = 3
backoff_base = 0.01
backoff_max = 0.02

[groups.w]
topics = ["t"]
plugins = []
start = "earliest"

[plugins.flaky]
path = "{flaky}"
"""


def test_wrappers_and_argument_subsets_in_a_worker_pool(stack_factory: Any, tmp_path: Path) -> None:
    s = stack_factory(GROUP.format(flaky=tmp_path / "flaky.log"))
    s.start_hub()
    w = s.start_worker("w", 1, "--plugin", WRAPPERS, "--plugin", SUBSET, "--trace-plugins")
    trace, subset = tmp_path / "trace.log", tmp_path / "subset.log"
    with s.client() as c:
        c.publish_events([ev(trace=str(trace), subset=str(subset)) for _ in range(3)])
    wait_for(lambda: trace.exists() and len(trace.read_text().splitlines()) == 12, 20,
             "2 wrappers x 2 plugins x 3 events:\n" + s.dump_logs())
    lines = trace.read_text().splitlines()
    for style in ("new", "old"):
        for plugin in ("recorder", "subset"):
            assert sorted(ln.split()[2] for ln in lines if ln.startswith(f"{style} {plugin} ")) == ["1", "2", "3"]
    assert all(ln.endswith(" ok") for ln in lines)
    assert subset.read_text().split() == ["1", "2", "3"]
    wait_for(lambda: s.dump_logs().count("hook call") >= 6, 10, "trace lines")
    log = s.dump_logs()
    traced = [ln for ln in log.splitlines() if "hook call" in ln and "hook=handle_event" in ln]
    assert any("plugin=subset" in ln and "outcome=ok" in ln and "duration_ms=" in ln and "event_id=" in ln
               and "wrappers=wrappers" in ln for ln in traced), log
    assert w.poll() is None


def test_retry_waits_at_least_its_delay_and_counts_toward_max_attempts(stack_factory: Any, tmp_path: Path) -> None:
    flaky = tmp_path / "flaky.log"
    s = stack_factory(GROUP.format(flaky=flaky))
    s.start_hub()
    s.start_worker("w", 1, "--plugin", FLAKY)
    with s.client() as c:
        c.publish_events([ev(retry=1.0, times=1), ev(retry=0.05)])
    wait_for(lambda: any(r["s"] == 1 for r in s.handled()), 20, "event 1 handled after its retry")
    wait_for(lambda: s.status()["groups"]["w"]["dead_lettered"] == 1, 20, "event 2 dead-lettered")
    attempts: dict[int, list[tuple[int, float]]] = {}
    for ln in flaky.read_text().splitlines():
        seq, a, t = ln.split()
        attempts.setdefault(int(seq), []).append((int(a), float(t)))
    (a1, t1), (a2, t2) = attempts[1]
    assert (a1, a2) == (1, 2)
    assert t2 - t1 >= 1.0, f"the retry came {t2 - t1:.3f}s later; Retry(delay=1.0) asked for at least 1s"
    assert [a for a, _ in attempts[2]] == [1, 2, 3], "Retry counts toward max_attempts = 3"
    with s.client() as c:
        _, bodies = c.fetch("dead-letter", 1)
    dl = json.loads(bodies[0])["data"]
    assert dl["plugin"] == "flaky" and dl["attempts"] == 3
    assert dl["line"] == "bucketwire.Retry: asked to wait (retry in 0.05s)"


def test_a_plugins_exception_reaches_the_dead_letter_as_itself(stack_factory: Any, tmp_path: Path, weed: Any,
                                                                 bucket: str) -> None:
    s = stack_factory(GROUP.format(flaky=tmp_path / "flaky.log") + f"""
[stores.primary]
endpoint = "{weed.s3_endpoint}"
access_key = "{weed.access_key}"
secret_key = "{weed.secret_key}"
""")
    s.start_hub()
    s.start_worker("w", 1, "--plugin", FLAKY)
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:test", type="test.thing", topic="t",
                                data={"get": "gone.jpg", "bucket": bucket}),
                          ev(frozen=True)])
    wait_for(lambda: s.status()["groups"]["w"]["dead_lettered"] == 2, 30, "two dead letters:\n" + s.dump_logs())
    with s.client() as c:
        _, bodies = c.fetch("dead-letter", 1)
    dls = {json.loads(b)["data"]["event"]["data"].get("get", "frozen"): json.loads(b)["data"] for b in bodies}
    s3 = dls["gone.jpg"]
    assert s3["plugin"] == "flaky", s3
    assert s3["line"].startswith("minio.error.S3Error: S3 operation failed; code: NoSuchKey"), s3["line"]
    assert "AttributeError" not in s3["error"]
    frozen = dls["frozen"]
    assert frozen["plugin"] == "flaky" and frozen["line"].endswith("FrozenError: frozen failure"), frozen
    assert "AttributeError" not in frozen["error"]
    log = s.dump_logs()
    assert "plugin=flaky" in log and "NoSuchKey" in log


def test_an_unknown_hook_stops_the_worker_with_one_line(stack_factory: Any) -> None:
    s = stack_factory(GROUP.format(flaky="x"))
    r = run_cli("worker", "-c", str(s.cfg_path), "-g", "w", "--plugin", TYPO, env=s.env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: plugin 'typo' implements 'handle_events', which is not a bucketwire hook; did you mean "
        "'handle_event'?"]


def test_plugin_named_with_plugin_that_is_also_installed_is_one_line(stack_factory: Any, tmp_path: Path) -> None:
    """An installed plugin whose entry-point name differs from its module's name, named again with --plugin."""
    site = tmp_path / "site"
    (site / "my_counter-0.1.dist-info").mkdir(parents=True)
    (site / "my_counter.py").write_text("from bucketwire import hookimpl\n\n@hookimpl\ndef handle_event(event):\n"
                                         "    pass\n")
    (site / "my_counter-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-counter\n"
                                                                "Version: 0.1\n")
    (site / "my_counter-0.1.dist-info" / "entry_points.txt").write_text("[bucketwire]\ncounter = my_counter\n")
    s = stack_factory("""
[groups.c]
topics = ["t"]
plugins = ["counter"]
""")
    env = {**s.env, "PYTHONPATH": os.pathsep.join(filter(None, [s.env.get("PYTHONPATH"), str(site)]))}
    r = run_cli("worker", "-c", str(s.cfg_path), "-g", "c", "--plugin", "my_counter", env=env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: --plugin my_counter: this module is already loaded as the installed plugin 'counter'; drop "
        "--plugin my_counter (installed plugins load by themselves), or list the plugins a group runs with "
        "[groups.NAME] plugins = [...]"]


def test_a_group_not_in_the_config_runs_only_its_plugin_modules(stack_factory: Any) -> None:
    s = stack_factory()
    cfg = config_mod.load(s.cfg_path)
    spec = WorkerSpec(group="csv", topics=["csv"], credit=1, local_plugins=[RECORDER])
    assert Plugins(cfg, spec).loaded.names == ["recorder"], "no installed plugin joins an unconfigured group"
    r = run_cli("worker", "-c", str(s.cfg_path), "-g", "csv", "--topic", "csv", env=s.env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: group 'csv' is not in the config and no --plugin was given, so nothing would handle its events; "
        "add [groups.csv] or pass --plugin MODULE"]


def test_bundled_plugins_keep_their_process_resources_in_ctx_state(tmp_path: Path) -> None:
    import bucketwire_audit as audit

    h = PluginHarness(audit, settings={"dir": str(tmp_path)})
    with h:
        assert isinstance(h.state["log"], audit.AuditLog), "worker_startup opens the log into ctx.state"
        h.handle(ev())
    assert "log" not in h.state, "worker_shutdown closes it and takes it out"
    module_state = [n for n, v in vars(audit).items() if isinstance(v, dict) and n.startswith("_")
                    and not n.startswith("__")]
    assert module_state == [], "no module-level state"


class AsyncHandler:
    @hookimpl
    async def handle_event(self, event: Event) -> None:
        raise AssertionError("never awaited")


class GeneratorHandler:
    @hookimpl
    def handle_event(self, event: Event) -> Iterator[None]:
        yield None
        raise AssertionError("never iterated")


@pytest.mark.parametrize("plugin, what", [(AsyncHandler(), "a coroutine function"),
                                          (GeneratorHandler(), "a generator function")])
def test_a_handler_that_would_never_run_is_refused_at_start(plugin: Any, what: str) -> None:
    """pluggy calls a hook and keeps what it returns: an `async def` or generator handler returns without running
    its body, so every event would be acked with its work never done. Refused when the plugin loads."""
    with pytest.raises(ConfigError) as e:
        PluginHarness(plugin, name="bad")
    assert str(e.value).startswith(f"plugin 'bad': handle_event is {what}"), str(e.value)


def test_an_async_handler_stops_the_worker_with_one_line(stack_factory: Any) -> None:
    s = stack_factory(GROUP.format(flaky="x"))
    r = run_cli("worker", "-c", str(s.cfg_path), "-g", "w", "--plugin", str(HERE / "async_handler.py"), env=s.env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: plugin 'asyncy': handle_event is a coroutine function"), line


class LatePublisher:
    """Keeps its ctx and publishes after handle_event returned, as a callback of its own thread pool would."""

    def __init__(self) -> None:
        self.ctx: Context | None = None

    @hookimpl
    def handle_event(self, event: Event, ctx: Context) -> None:
        self.ctx = ctx


class StartupPublisher:
    @hookimpl
    def worker_startup(self, ctx: Context) -> None:
        ctx.publish("t", {"hello": 1})


def test_a_follow_on_published_outside_its_handler_raises_instead_of_vanishing() -> None:
    """A follow-on travels with its event's ack. Published after the handler returned (the ack is gone) or
    from worker_startup (there is no event), it used to be queued where nobody read it again: lost, silently."""
    p = LatePublisher()
    with PluginHarness(p, name="late") as h:
        assert h.handle(ev()) == []
        assert p.ctx is not None
        with pytest.raises(RuntimeError, match="after handle_event returned"):
            p.ctx.publish("t", {"late": 1})
    # from worker_startup it raises at every start: the pool stops with its line, as the harness does here
    with pytest.raises(ConfigError, match=r"^\[plugins.s\] worker_startup called ctx.publish\(\), which works only "
                       "inside handle_event"), PluginHarness(StartupPublisher(), name="s"):
        pass


class EditsPublished:
    """Publishes two follow-ons, reads them back through ctx.published, then edits it as `how` says."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.seen: list[str] = []

    @hookimpl
    def handle_event(self, event: Event, ctx: Context) -> None:
        ctx.publish("a", {"n": 1})
        ctx.publish("b", {"n": 2})
        self.seen = [fo.topic or "" for fo in ctx.published]
        pub: Any = ctx.published
        if self.how == "append":
            pub.append({"topic": "c"})
        elif self.how == "setitem":
            pub[0] = {"topic": "c"}
        elif self.how == "delitem":
            del pub[0]
        elif self.how == "iadd":
            ctx.published += (ev("c"),)  # type: ignore[misc]
        elif self.how == "assign":
            ctx.published = ()  # type: ignore[misc]


@pytest.mark.parametrize("how", ["append", "setitem", "delitem", "iadd", "assign"])
def test_ctx_published_reads_in_order_and_refuses_edits_with_one_line(how: str) -> None:
    """ctx.published was the context's own list: edited by a plugin, its follow-ons no longer paired with the ids
    ctx.publish derived for them, and the worker child died as the handler returned. It reads the same now, as a
    tuple, and each edit raises in the handler, saying what to call instead."""
    p = EditsPublished(how)
    with PluginHarness(p, name="edits") as h, pytest.raises(TypeError, match=r"^ctx.published is read-only: "
                                                             r"publish follow-ons with ctx.publish\(topic, data\)"):
        h.handle(ev())
    assert p.seen == ["a", "b"]
    assert [fo.topic for fo in PluginHarness(EditsPublished("none"), name="fine").handle(ev())] == ["a", "b"]


class SlowData(dict):  # type: ignore[type-arg]
    """Follow-on data whose reading (ctx.publish looks at its bucket and key) holds the publishing thread until
    the handler's ctx is done: a large follow-on being checked and measured as the handler returns."""

    ctx: Context | None = None
    inside: threading.Event

    def get(self, key: Any, default: Any = None) -> Any:
        self.inside.set()  # the publishing thread is inside ctx.publish, past its check that the handler runs
        deadline = time.monotonic() + 10
        while self.ctx is not None and not self.ctx.done and time.monotonic() < deadline:
            time.sleep(0.001)  # pacing: polling for the handler's end, with a deadline
        return super().get(key, default)


class ThreadPublisher:
    """Publishes from a thread it does not wait for (a thread pool's callback)."""

    PLUGIN_NAME = "thread-publisher"

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.results: list[Any] = []

    @hookimpl
    def handle_event(self, ctx: Context) -> None:
        data = SlowData(n=1)
        data.ctx, data.inside = ctx, threading.Event()

        def publish() -> None:
            try:
                self.results.append(ctx.publish("late", data))
            except RuntimeError as e:
                self.results.append(e)

        t = threading.Thread(target=publish)
        self.threads.append(t)
        t.start()
        data.inside.wait(10)  # the handler returns while the thread is inside ctx.publish


def test_a_follow_on_a_thread_is_publishing_as_the_handler_returns_is_sent_or_refused_never_lost() -> None:
    """A thread inside ctx.publish (past its check that the handler is running) as the handler returns: the
    runner read the follow-ons, found none and went on, and the thread then added its follow-on where nobody read
    it again. ctx.publish returned it as queued, and it was never sent: lost, without a word. The runner waits
    for a publish in progress as the handler returns, so the follow-on goes out with its event."""
    p = ThreadPublisher()
    with PluginHarness(p) as h:
        out = h.handle(ev())
        for t in p.threads:
            t.join(15)
    (res,) = p.results
    assert isinstance(res, Event), res
    assert [f.id for f in out] == [res.id], "ctx.publish returned a follow-on that was never sent"


def test_a_plugin_whose_topics_miss_every_topic_of_its_group_stops_the_worker(stack_factory: Any) -> None:
    """`[plugins.NAME] topics` limits a plugin to some of its group's topics. Misspelt so that it names none of
    them, the plugin was never called and its group acked every event with the work undone."""
    s = stack_factory(GROUP.format(flaky="x").replace('[groups.w]\ntopics = ["t"]\nplugins = []',
                                                      '[groups.w]\ntopics = ["t"]\nplugins = ["thumbnail"]')
                      + '\n[plugins.thumbnail]\ntopics = ["tt"]\n')
    r = run_cli("worker", "-c", str(s.cfg_path), "-g", "w", env=s.env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: [plugins.thumbnail] topics = ['tt']: none is a topic of group 'w'"), line


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


class RaisesUnprintable:
    @hookimpl
    def handle_event(self, event: Event) -> None:
        raise UnprintableError()


def test_tracing_reports_an_exception_whose_str_fails_without_replacing_it() -> None:
    """With --trace-plugins the trace line formatted the plugin's exception with str(): one whose __str__ fails
    replaced it with that RuntimeError, so the event failed (and was dead-lettered) as something else."""
    with PluginHarness(RaisesUnprintable(), name="u", trace=True) as h, pytest.raises(UnprintableError):
        h.handle(ev())


def _helper_that_yields(event: Event) -> Iterator[None]:
    raise AssertionError("never runs: nobody iterates it")
    yield None


async def _async_helper() -> None:
    raise AssertionError("never runs: nobody awaits it")


class ReturnsAGenerator:
    """A plain hook handing back a generator its helper made (a helper written with `yield`, for a progress
    loop, say): the helper's body never runs."""

    @hookimpl
    def handle_event(self, event: Event) -> Iterator[None]:
        return _helper_that_yields(event)


def test_a_handler_that_returns_a_generator_fails_its_event_instead_of_acking_work_never_done() -> None:
    """Returning a coroutine fails the event (its work never ran); a generator is the same mistake one keyword
    away, and its event was acked undone."""
    with PluginHarness(ReturnsAGenerator(), name="gen") as h, pytest.raises(TypeError) as e:
        h.handle(ev())
    assert "generator" in str(e.value) and "never ran" in str(e.value), str(e.value)


class StartupReturnsACoroutine:
    @hookimpl
    def worker_startup(self, ctx: Context) -> Any:
        return _async_helper()  # the connection pool it opens is never opened


class ShutdownReturnsAGenerator:
    @hookimpl
    def worker_shutdown(self, ctx: Context) -> Any:
        return _helper_that_yields(ev())  # what it flushes is never flushed


def test_a_startup_hook_that_returns_a_coroutine_stops_with_one_line() -> None:
    """worker_startup handing back an un-awaited coroutine opened nothing, and the child went on to take events
    with none of what they need (a RuntimeWarning at best); it is the plugin's mistake to fix, said in one line."""
    with pytest.raises(ConfigError) as e, PluginHarness(StartupReturnsACoroutine(), name="st"):
        pass
    line = str(e.value)
    assert line.startswith("plugin 'st': worker_startup returned coroutine") and "await" in line, line


def test_a_shutdown_hook_that_returns_a_generator_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = PluginHarness(ShutdownReturnsAGenerator(), name="sd").start()
    with caplog.at_level(logging.ERROR, logger="bucketwire.worker"):
        h.stop()
    assert any("worker_shutdown" in r.getMessage() and "never ran" in str(r.exc_info[1] if r.exc_info else
                                                                         r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]


class ShutdownExits:
    PLUGIN_NAME = "exits"

    @hookimpl
    def worker_shutdown(self, ctx: Any) -> None:
        sys.exit(3)  # a library's cleanup that ends "the program"

    @hookimpl
    def handle_event(self, event: Any) -> None:
        pass


class ShutdownCloses:
    PLUGIN_NAME = "closes"

    def __init__(self) -> None:
        self.closed = False

    @hookimpl
    def worker_shutdown(self, ctx: Any) -> None:
        self.closed = True

    @hookimpl
    def handle_event(self, event: Any) -> None:
        pass


def test_a_shutdown_hook_that_calls_sys_exit_does_not_keep_the_others_from_closing(
        caplog: pytest.LogCaptureFixture) -> None:
    """The guide promises that one plugin failing in worker_shutdown does not keep the others from closing (their
    logs flushed, their connections closed). A SystemExit went past that, and the plugins after it in the call
    order got no worker_shutdown."""
    closes = ShutdownCloses()
    h = PluginHarness(closes, ShutdownExits()).start()  # the last registered is called first: `exits`
    with caplog.at_level(logging.ERROR, logger="bucketwire.worker"):
        h.stop()
    assert closes.closed, "the plugin after the one that exited got no worker_shutdown"
    assert any(r.getMessage() == "worker_shutdown failed" and getattr(r, "plugin", None) == "exits"
               for r in caplog.records), [r.getMessage() for r in caplog.records]


class YieldsTwice:
    PLUGIN_NAME = "twice"

    @hookimpl(wrapper=True, specname="handle_event")
    def around(self, event: Event) -> Generator[None, Any, Any]:
        res = yield
        yield
        return res


class RaisesAround:
    PLUGIN_NAME = "raiser"

    def __init__(self, when: str) -> None:
        self.when = when

    @hookimpl(wrapper=True, specname="handle_event")
    def around(self, event: Event) -> Generator[None, Any, Any]:
        if self.when == "before":
            raise ValueError("the wrapper's own bug")
        res = yield
        raise ValueError("the wrapper's own bug, after")
        return res


@pytest.mark.parametrize("wrapper", [YieldsTwice(), RaisesAround("before"), RaisesAround("after")],
                         ids=["second yield", "raises before", "raises after"])
def test_a_broken_wrapper_is_blamed_not_the_plugin_it_wraps(wrapper: Any) -> None:
    """The dead letter's `plugin` (and the failure metric) names who failed: a wrapper that yielded twice or
    raised its own error was recorded as a failure of the innocent plugin it wrapped."""
    from bucketwire.worker.plugin_loading import HandlerFailed

    h = PluginHarness(Named("innocent"), wrapper)
    with pytest.raises(HandlerFailed) as ei:
        h.runner.run(ev(), 1)
    assert ei.value.plugin == wrapper.PLUGIN_NAME, str(ei.value.error)


def test_a_plugins_own_error_through_a_wrapper_is_still_the_plugins() -> None:
    from bucketwire.worker.plugin_loading import HandlerFailed

    h = PluginHarness(Named("bad", fail=True), Timing())
    with pytest.raises(HandlerFailed) as ei:
        h.runner.run(ev(), 1)
    assert ei.value.plugin == "bad"


class ForgetsToReturn:
    """A timing wrapper of every hook that yields but does not return what the yield gave it (`yield` where
    `return (yield)` belongs): pluggy makes its return value, None, the result of the call it wraps."""

    PLUGIN_NAME = "forgetful"

    def __init__(self, hooks: tuple[str, ...] = ("validate_settings", "worker_startup", "worker_shutdown")) -> None:
        self.hooks = hooks

    @hookimpl(wrapper=True, specname="validate_settings")
    def around_validate(self, settings: dict[str, Any]) -> Generator[None, Any, Any]:
        res = yield
        return res if "validate_settings" not in self.hooks else None

    @hookimpl(wrapper=True, specname="worker_startup")
    def around_startup(self) -> Generator[None, Any, Any]:
        res = yield
        return res if "worker_startup" not in self.hooks else None

    @hookimpl(wrapper=True, specname="handle_event")
    def around_event(self) -> Generator[None, Any, Any]:
        res = yield
        return res if "handle_event" not in self.hooks else 5

    @hookimpl(wrapper=True, specname="worker_shutdown")
    def around_shutdown(self) -> Generator[None, Any, Any]:
        res = yield
        return res if "worker_shutdown" not in self.hooks else None


class Normalises:
    PLUGIN_NAME = "normalises"

    def __init__(self) -> None:
        self.settings: list[dict[str, Any]] = []

    @hookimpl
    def validate_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"path": "default.log", **settings}

    @hookimpl
    def worker_startup(self, ctx: Context) -> None:
        self.settings.append(ctx.settings)

    @hookimpl
    def handle_event(self, ctx: Context) -> None:
        ctx.publish("done", {"path": ctx.settings["path"]})

    @hookimpl
    def worker_shutdown(self, ctx: Context) -> None:
        pass


@pytest.mark.parametrize("hook", ["validate_settings", "worker_startup"])
def test_a_wrapper_that_does_not_return_the_result_is_one_line_naming_it(hook: str) -> None:
    """A wrapper=True implementation must return the result of the call it wraps. One that only yields (the
    commonest slip) made it None: around validate_settings the plugin's settings were used without its defaults,
    unsaid (every event then failed on a missing key); around worker_startup the pool stopped with `plugin
    'normalises': 'NoneType' object is not iterable`, naming the plugin it wrapped for the wrapper's mistake."""
    with pytest.raises(ConfigError) as ei:
        PluginHarness(Normalises(), ForgetsToReturn((hook,))).start()
    said = str(ei.value)
    assert said.startswith("plugin 'forgetful': its wrapper=True implementation of " + hook), said
    assert "returned None" in said and "return (yield)" in said, said
    assert "\n" not in said


def test_a_wrapper_that_returns_something_else_fails_the_event_naming_the_wrapper(
        caplog: pytest.LogCaptureFixture) -> None:
    """Around handle_event the failure is the event's, blamed on the wrapper (its dead letter's plugin), with
    the line saying how a wrapper ends, not `TypeError: 'int' object is not iterable` charged to the plugin it
    wrapped. Around worker_shutdown it is one error line naming the wrapper, and the other plugins still close."""
    from bucketwire.worker.plugin_loading import HandlerFailed

    h = PluginHarness(Normalises(), ForgetsToReturn(("handle_event", "worker_shutdown"))).start()
    with pytest.raises(HandlerFailed) as ei:
        h.runner.run(ev(), 1)
    assert ei.value.plugin == "forgetful", ei.value.error
    assert "returned an int" in str(ei.value.error) and "return (yield)" in str(ei.value.error), ei.value.error
    with caplog.at_level(logging.ERROR, logger="bucketwire.worker"):
        h.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("plugin 'forgetful': its wrapper=True implementation of worker_shutdown")
               for line in lines), lines
    assert not any(r.exc_info for r in caplog.records), "a traceback through pluggy for the wrapper's mistake"

