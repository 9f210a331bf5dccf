"""A plugin author's first mistakes, each one line at worker start (here through `bucketwire plugins --plugin`,
which loads plugins exactly as a worker does) instead of a traceback or a pool that acks every event undone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bucketwire import ConfigError, hookimpl
from bucketwire.cli import cli
from bucketwire.testing import PluginHarness


def load_file(tmp_path: Path, name: str, source: str) -> Any:
    f = tmp_path / f"{name}.py"
    f.write_text(source)
    return CliRunner().invoke(cli, ["plugins", "--plugin", str(f)])


def one_line_error(r: Any) -> str:
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.output.count("\n") == 1 and r.output.startswith("Error: "), r.output
    return str(r.output)


@pytest.mark.parametrize(("source", "expected"), [
    ("import os\n\nraise RuntimeError('no PLUGIN_DB set')\n", "RuntimeError: no PLUGIN_DB set ({}, line 3)"),
    ("from bucketwire import hookimpl\n\n@hookimpl(firstresult=True)\ndef handle_event(event):\n    pass\n",
     "TypeError: HookimplMarker.__call__() got an unexpected keyword argument 'firstresult' ({}, line 3)"),
    ("def handle_event(event:\n", "SyntaxError: '(' was never closed ({}, line 1)"),
    # a module that ends the process as it is imported (a script's `if not KEY: sys.exit(...)` kept in the plugin)
    ("import sys\n\nsys.exit(0)\n", "SystemExit: 0 ({}, line 3)"),
    ("import sys\n\nsys.exit('set PLUGIN_DB')\n", "SystemExit: set PLUGIN_DB ({}, line 3)"),
])
def test_a_plugin_file_that_fails_to_import_is_one_line_naming_the_line(tmp_path: Path, source: str,
                                                                          expected: str) -> None:
    """These were a traceback through click's and bucketwire's frames. A module calling sys.exit(0) ended the
    worker (and `plugins`, `doctor`) silently with exit code 0, a pool that 'stopped successfully' at once."""
    out = one_line_error(load_file(tmp_path, "broken", source))
    path = tmp_path / "broken.py"
    assert f"--plugin {path}: importing it failed: {expected.format(path)}" in out, out


@pytest.mark.parametrize("source", [
    # @hookimpl forgotten
    "def handle_event(event, ctx):\n    ctx.publish('seen', {})\n",
    # another project's marker (pytest's, or pluggy's own with the wrong name)
    "import pluggy\nhookimpl = pluggy.HookimplMarker('bucket-wire')\n\n"
    "@hookimpl\ndef handle_event(event, ctx):\n    ctx.publish('seen', {})\n",
    # one hook marked, the handler not
    "from bucketwire import hookimpl\n\n@hookimpl\ndef validate_settings(settings):\n    return settings\n\n"
    "def handle_event(event, ctx):\n    ctx.publish('seen', {})\n",
])
def test_a_handler_not_marked_hookimpl_is_refused(tmp_path: Path, source: str) -> None:
    """Such a plugin loaded without a word, and a worker running it acked every event with nothing done."""
    out = one_line_error(load_file(tmp_path, "unmarked", source))
    assert "plugin 'unmarked': handle_event is not marked @hookimpl" in out, out
    assert "from bucketwire import hookimpl" in out, out


def test_a_plugin_with_no_hooks_at_all_is_refused() -> None:
    class Nothing:
        PLUGIN_NAME = "nothing"

        def handle_events(self, event: Any) -> None:
            pass

    with pytest.raises(ConfigError, match="^plugin 'nothing' implements no bucketwire hook; mark its hook "):
        PluginHarness(Nothing())

    class Marked:
        PLUGIN_NAME = "marked"

        @hookimpl
        def handle_event(self, event: Any) -> None:
            pass

    PluginHarness(Marked())  # the same with the marker loads


def test_the_scaffold_refuses_a_setting_of_the_wrong_type_in_one_line_naming_it(tmp_path: Path) -> None:
    """`suffix = 5` passed the scaffold's validate_settings, and every event then failed on `endswith(5)`."""
    import importlib.util

    from bucketwire.commands.plugin_new import scaffold

    root = scaffold("csv-counter", tmp_path)
    spec = importlib.util.spec_from_file_location("bucketwire_csv_counter_t", root / "bucketwire_csv_counter"
                                                  / "__init__.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ConfigError) as ei:
        PluginHarness(mod, settings={"suffix": 5})
    assert str(ei.value) == "[plugins.csv-counter] suffix: expected a string such as '.csv', got 5"
    assert PluginHarness(mod, settings={"suffix": ".csv"}).settings == {"suffix": ".csv"}


EDITED = """
from bucketwire import hookimpl

@hookimpl
def handle_event(event, ctx):
    with open({out!r}, "a") as f:
        f.write("v{v} " + str(event.data["n"]) + "\\n")
"""


def test_sighup_restarts_the_children_so_an_edited_plugin_is_loaded_again(stack_factory: Any, tmp_path: Path
                                                                            ) -> None:
    """After editing a plugin its author sends the pool SIGHUP, as for the hub (which re-reads its keys). The pool
    died of it (exit 129) without draining; now each child drains and is replaced by one that imports the
    plugin afresh, and the pool goes on."""
    import signal

    from tests.fixtures_hub import wait_for

    s = stack_factory()
    s.start_hub()
    out, plug = tmp_path / "handled.txt", tmp_path / "editme.py"
    plug.write_text(EDITED.format(out=str(out), v=1))
    w = s.start_worker("ed", 1, "--topic", "in", "--plugin", str(plug))
    log = s.logs[-1]
    with s.client() as c:
        c.publish("in", {"n": 1})
    wait_for(lambda: out.exists() and out.read_text() == "v1 1\n", 30, "v1 to handle event 1")
    plug.write_text(EDITED.format(out=str(out), v=2))
    w.send_signal(signal.SIGHUP)
    wait_for(lambda: "restarted to load the plugins again" in log.read_text() or w.poll() is not None, 30,
             "the reload")
    assert w.poll() is None, s.dump_logs()
    with s.client() as c:
        c.publish("in", {"n": 2})
    wait_for(lambda: out.read_text().count("\n") == 2, 30, "event 2 to be handled")
    assert out.read_text() == "v1 1\nv2 2\n"
    assert "worker child died" not in log.read_text()


def test_a_hookimpl_with_a_misspelt_argument_names_the_hooks_arguments(tmp_path: Path) -> None:
    """pluggy's own text ("hookimpl definition: ... Argument(s) {'evnt'} are declared in the hookimpl but can not
    be found in the hookspec") named neither the arguments the hook has nor the fix."""
    out = one_line_error(load_file(tmp_path, "typoarg", "from bucketwire import hookimpl\n\n@hookimpl\n"
                                   "def handle_event(evnt, ctx):\n    pass\n"))
    assert out == ("Error: plugin 'typoarg': handle_event(evnt, ctx): the hook has no argument 'evnt'; its "
                   "arguments are handle_event(event, ctx), and an implementation takes any of them by name\n"), out


def test_a_module_name_for_a_file_in_the_current_directory_says_to_pass_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--plugin my_counter` beside my_counter.py: the `bucketwire` script does not put the current directory
    on sys.path, so the module is not found; the line said only "is it installed or on PYTHONPATH?"."""
    (tmp_path / "beside_me.py").write_text("from bucketwire import hookimpl\n\n@hookimpl\n"
                                           "def handle_event(event):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    out = one_line_error(CliRunner().invoke(cli, ["plugins", "--plugin", "beside_me"]))
    assert "--plugin beside_me: cannot import" in out and "pass --plugin beside_me.py" in out, out


def test_an_installed_plugins_name_given_to_plugin_says_which_module_to_pass() -> None:
    """`--plugin csv-counter`, the name `bucketwire plugins` lists for an installed plugin: the line said
    "No module named 'csv-counter'; is it installed or on PYTHONPATH?" of a plugin that is installed."""
    out = one_line_error(CliRunner().invoke(cli, ["plugins", "--plugin", "thumbnail"]))
    assert "--plugin thumbnail:" in out and "installed plugin" in out and "--plugin bucketwire_thumbnail" in out, out
    assert 'plugins = ["thumbnail"]' in out and "is it installed" not in out, out


@pytest.mark.parametrize(("topic", "data", "why"), [
    ("a\0b", {}, "topic names must be 1 to 255 characters without NUL bytes"),
    ("t" * 256, {}, "topic names must be 1 to 255 characters without NUL bytes"),
    ("ok", {"bucket": "b", "key": "a\0b"}, "bucket name or object key contains a NUL byte"),
])
def test_ctx_publish_refuses_what_the_hub_would_refuse(topic: str, data: dict[str, Any], why: str) -> None:
    """The README: "ctx.publish() checks each follow-on as the hub will and raises for one it would refuse".
    A topic with a NUL byte, one over 255 characters and a NUL in data's bucket/key passed it, to be refused at the
    hub together with the whole ack they came in."""
    from bucketwire import Event

    class Pub:
        PLUGIN_NAME = "pub"

        @hookimpl
        def handle_event(self, ctx: Any) -> None:
            ctx.publish(topic, data)

    with PluginHarness(Pub()) as h, pytest.raises(ValueError) as ei:
        h.handle(Event(id="e1", source="t", type="s3:ObjectCreated:Put", data={"bucket": "b", "key": "k"}))
    assert why in str(ei.value) and "would be refused by the hub" in str(ei.value), ei.value


@pytest.mark.parametrize(("grow", "raised", "why"), [
    ({"pad": "x" * 2_000_000}, "FollowOnTooLarge", "its envelope is now 20"),
    ({"seen": {"a", "b"}}, "ValueError", "Object of type set is not JSON serializable"),
])
def test_a_follow_on_whose_data_changes_after_ctx_publish_fails_its_event_in_the_harness(
        grow: dict[str, Any], raised: str, why: str) -> None:
    """ctx.publish measures and encodes the data it is given, but that dict stays the plugin's, which may go on
    filling it. The harness returned such a follow-on as published (a set in it, or 2 MB over max_event_bytes)
    where a pool sent it on: the set as a list, the 2 MB one to a dead letter of the hub's with its event acked,
    and one past 64 MiB in an ACK the hub refused whole. Now both fail the event, in the harness as in a pool."""
    from bucketwire import Event

    class Grower:
        PLUGIN_NAME = "grower"

        @hookimpl
        def handle_event(self, ctx: Any) -> None:
            data: dict[str, Any] = {"n": 1}
            ctx.publish("grown", data)
            data.update(grow)

    with PluginHarness(Grower()) as h, pytest.raises(ValueError) as ei:
        h.handle(Event(id="e1", source="t", type="s3:ObjectCreated:Put", data={"bucket": "b", "key": "k"}))
    assert type(ei.value).__name__ == raised, ei.value
    assert why in str(ei.value) and "changed after ctx.publish" in str(ei.value), ei.value


def test_a_setting_validate_settings_reads_but_the_config_lacks_is_named() -> None:
    """`settings["path"]` in validate_settings with no `path` in [plugins.NAME] said `[plugins.logger] 'path'`."""

    class Logger:
        PLUGIN_NAME = "logger"

        @hookimpl
        def validate_settings(self, settings: dict[str, Any]) -> None:
            if not settings["path"].endswith(".log"):
                raise ConfigError("path: expected a .log file")

    with pytest.raises(ConfigError) as ei:
        PluginHarness(Logger())
    assert str(ei.value) == ("[plugins.logger] path: required, and missing; add path = ... to the [plugins.logger] "
                             "section of the config")


def test_a_setting_worker_startup_reads_but_the_config_lacks_is_named() -> None:
    """`ctx.settings["path"]` in worker_startup with no `path` in [plugins.NAME]: a KeyError, which the pool took for
    a crash and restarted the child with backoff, forever; it is the user's config to fix (one line, exit 2)."""

    class Opener:
        PLUGIN_NAME = "opener"

        @hookimpl
        def worker_startup(self, ctx: Any) -> None:
            ctx.state["fh"] = ctx.settings["path"]

    with pytest.raises(ConfigError) as ei, PluginHarness(Opener()):
        pass
    assert str(ei.value) == ("[plugins.opener] path: required, and missing; add path = ... to the [plugins.opener] "
                             "section of the config")


PYDANTIC_TEXT = ("1 validation error for Settings\nsize\n  Input should be a valid integer [type=int_type, "
                 "input_value='x', input_type=str]\n    For further information visit "
                 "https://errors.pydantic.dev/2.14/v/int_type")


class ValidationError(ValueError):
    """What a settings class (pydantic's BaseModel) raises: a ValueError whose text is several lines."""


def test_a_settings_class_error_of_several_lines_is_one_line() -> None:
    """A plugin validating its section with a settings class (pydantic: `Settings(**settings)`) raises its
    ValidationError, a ValueError of four lines: the worker printed them as they came, the one-line error four
    lines long. Its lines are joined into one, every word kept."""

    class Modelled:
        PLUGIN_NAME = "modelled"

        @hookimpl
        def validate_settings(self, settings: dict[str, Any]) -> None:
            raise ValidationError(PYDANTIC_TEXT)

    with pytest.raises(ConfigError) as ei:
        PluginHarness(Modelled(), settings={"size": "x"})
    line = str(ei.value)
    assert "\n" not in line, line
    assert line == ("[plugins.modelled] 1 validation error for Settings; size; Input should be a valid integer "
                    "[type=int_type, input_value='x', input_type=str]; For further information visit "
                    "https://errors.pydantic.dev/2.14/v/int_type"), line


BAD_VALIDATION = '''
from bucketwire import hookimpl

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")

@hookimpl
def validate_settings(settings):
    if settings.get("how") == "assert":
        assert isinstance(settings.get("size"), int), "size: expected an integer"
    if settings.get("how") == "lookup":
        raise LookupError("size")
    if settings.get("how") == "exit":
        import sys
        sys.exit(0)
    raise Unprintable()

@hookimpl
def handle_event(event):
    pass
'''


@pytest.mark.parametrize(("how", "said"), [
    ("assert", "AssertionError: size: expected an integer"),
    ("lookup", "LookupError: size"),
    ("unprintable", "Unprintable"),
    ("exit", "SystemExit: 0"),
])
def test_validate_settings_raising_another_exception_is_one_line(stack_factory: Any, tmp_path: Path, how: str,
                                                                 said: str) -> None:
    """The hook's docs say to raise ConfigError or ValueError; an `assert` (or any other exception, one whose
    str() fails too) printed a traceback of pluggy's frames and the plugin's at every worker start. The settings
    are the operator's to fix: one line naming the plugin and what it raised. A sys.exit(0) there ended the worker
    silently with exit code 0."""
    import subprocess
    import sys

    f = tmp_path / "strict.py"
    f.write_text(BAD_VALIDATION)
    s = stack_factory(f'\n[plugins.strict]\nhow = "{how}"\nsize = "x"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "worker", "-c", str(s.cfg_path), "--group", "g",
                        "--topic", "t", "--plugin", str(f)], capture_output=True, text=True, timeout=60, env=s.env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: [plugins.strict] validate_settings raised ") and said in line, line


SAME_NAME = "from bucketwire import hookimpl\n\nPLUGIN_NAME = 'same'\n\n@hookimpl\ndef handle_event(event):\n    pass\n"


def test_two_plugin_modules_with_one_name_are_one_line_naming_both(tmp_path: Path) -> None:
    """Two `--plugin` files with the same PLUGIN_NAME (a copied plugin whose name was not changed) were refused
    as 'already loaded (installed)', with the advice to leave it out of [groups.NAME] plugins: neither is
    installed, and the group may not be in the config at all."""
    (tmp_path / "one.py").write_text(SAME_NAME)
    (tmp_path / "two.py").write_text(SAME_NAME)
    one, two = str(tmp_path / "one.py"), str(tmp_path / "two.py")
    out = one_line_error(CliRunner().invoke(cli, ["plugins", "--plugin", one, "--plugin", two]))
    assert out == (f"Error: --plugin {two}: its plugin name 'same' is taken by --plugin {one}; give one of "
                   "them another PLUGIN_NAME\n"), out
    out = one_line_error(CliRunner().invoke(cli, ["plugins", "--plugin", one, "--plugin", one]))
    assert out == f"Error: --plugin {one} is given twice; give it once\n", out


def test_an_installed_plugins_name_taken_by_a_plugin_module_still_says_installed(tmp_path: Path) -> None:
    (tmp_path / "clone.py").write_text(SAME_NAME.replace("'same'", "'thumbnail'"))
    out = one_line_error(CliRunner().invoke(cli, ["plugins", "--plugin", str(tmp_path / "clone.py")]))
    assert "a plugin named 'thumbnail' is already loaded (installed: bucketwire_thumbnail)" in out, out


def test_the_harness_given_two_plugins_with_one_name_says_so() -> None:
    class One:
        PLUGIN_NAME = "same"

        @hookimpl
        def handle_event(self, event: Any) -> None:
            pass

    class Two(One):
        pass

    with pytest.raises(ConfigError) as ei:
        PluginHarness(One(), Two())
    assert str(ei.value) == ("plugin 'same': two plugins given to the harness are named 'same'; give one another "
                             "PLUGIN_NAME"), ei.value
    one = One()
    with pytest.raises(ConfigError) as ei:
        PluginHarness(one, one)
    assert str(ei.value) == "plugin 'same': this plugin is given to the harness twice; give it once", ei.value


def test_an_optionalhook_of_a_name_that_is_no_hook_is_refused(tmp_path: Path) -> None:
    """pluggy's `optionalhook=True` exempts an implementation from the unknown-hook check, for hooks a later
    plugin may specify; no plugin adds bucketwire hooks, so such an implementation is never called. A misspelt one
    loaded without a word (a handler beside it, or alone: a pool that acked every event undone)."""
    out = one_line_error(load_file(tmp_path, "opt", "from bucketwire import hookimpl\n\n@hookimpl\n"
                                   "def handle_event(event):\n    pass\n\n@hookimpl(optionalhook=True)\n"
                                   "def worker_startp(ctx):\n    pass\n"))
    assert out == ("Error: plugin 'opt' implements 'worker_startp', which is not a bucketwire hook; did you mean "
                   "'worker_startup'? (optionalhook=True does not change that: no plugin adds bucketwire hooks)\n"), out


def test_validate_settings_returning_something_else_than_a_dict_names_what_it_returned() -> None:
    """The line said only "must return a dict or None", not what the hook handed back (a list, or the tuple of a
    trailing comma), which is where its author has to look."""
    class BadReturn:
        PLUGIN_NAME = "badret"

        @hookimpl
        def validate_settings(self, settings: dict[str, Any]) -> Any:
            return settings, None

        @hookimpl
        def handle_event(self, event: Any) -> None:
            pass

    with pytest.raises(ConfigError) as ei:
        PluginHarness(BadReturn())
    assert str(ei.value) == ("plugin 'badret': validate_settings must return a dict (the settings, defaults filled "
                             "in) or None (to keep them); it returned a tuple"), ei.value


@pytest.mark.parametrize(("marker", "option"), [("wrapper=True", "wrapper=True"),
                                                ("hookwrapper=True", "hookwrapper=True")])
def test_a_wrapper_that_does_not_yield_is_one_line_saying_how_a_wrapper_is_written(tmp_path: Path, marker: str,
                                                                                   option: str) -> None:
    """pluggy's text came through whole, naming the plugin twice ("plugin 'w': Plugin 'w' for hook ... hookimpl
    definition: handle_event(event, ctx) Declared as ...") and saying nothing of how to write one."""
    out = one_line_error(load_file(tmp_path, "w", f"from bucketwire import hookimpl\n\n@hookimpl({marker})\n"
                                   "def handle_event(event, ctx):\n    return None\n"))
    assert out == (f"Error: plugin 'w': handle_event is marked {option} but does not yield; a wrapper is a generator "
                   "that yields once where the wrapped call runs (result = yield; return result), see "
                   "'Wrappers' in docs/plugins.md\n"), out


@pytest.mark.parametrize("body", ["    res = yield\n    return\n", "    return None\n"])
def test_an_async_def_wrapper_is_one_line_saying_it_must_be_a_plain_generator(tmp_path: Path, body: str) -> None:
    """An `async def` wrapper that yields (an async generator) was refused as one that "does not yield", which it
    plainly does: its author was sent looking for a missing yield. It is said for what it is."""
    out = one_line_error(load_file(tmp_path, "w", "from bucketwire import hookimpl\n\n@hookimpl(wrapper=True)\n"
                                   f"async def handle_event(event, ctx):\n{body}"))
    assert out == ("Error: plugin 'w': handle_event is marked wrapper=True but is an async def; pluggy runs a "
                   "wrapper as a plain generator (def, not async def) that yields once where the wrapped call runs "
                   "(result = yield; return result): run async code inside it with asyncio.run()\n"), out


def test_pluggys_own_refusal_names_the_plugin_once() -> None:
    """pluggy's text begins "Plugin '<name>' for hook '<hook>' hookimpl definition:", after the worker's own
    "plugin '<name>':" prefix: the plugin named twice, the hook three times."""
    class Both:
        PLUGIN_NAME = "both"

        @hookimpl(wrapper=True, hookwrapper=True)
        def handle_event(self, event: Any) -> Any:
            return (yield)

    with pytest.raises(ConfigError) as ei:
        PluginHarness(Both())
    assert str(ei.value) == ("plugin 'both': handle_event(event): The wrapper=True and hookwrapper=True options are "
                             "mutually exclusive"), ei.value


@pytest.mark.parametrize("data, culprit", [({"tags": {"a", "b"}}, "set"), ({"raw": b"\x00\x01"}, "bytes")])
def test_data_json_cannot_hold_is_refused_by_ctx_publish_naming_the_topic(data: dict[str, Any], culprit: str) -> None:
    """A follow-on's data goes to the hub as JSON. A set in it raised json's bare "Object of type set is not JSON
    serializable" from deep inside the envelope's encoder, naming neither the follow-on nor what to do."""
    from bucketwire import Event

    class Tagger:
        PLUGIN_NAME = "tagger"

        @hookimpl
        def handle_event(self, ctx: Any) -> None:
            ctx.publish("tagged", data)

    with PluginHarness(Tagger()) as h, pytest.raises(TypeError) as ei:
        h.handle(Event(id="e1", source="t", type="s3:ObjectCreated:Put", data={"bucket": "b", "key": "k"}))
    line = str(ei.value)
    assert "follow-on to topic 'tagged'" in line and "JSON" in line and culprit in line, line
    assert "\n" not in line, line
