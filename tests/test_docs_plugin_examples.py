"""Every Python example of docs/plugins.md, and the README's fixture test, run as written: a plugin author copies
them before reading anything else. Fragments that continue an earlier example (`@hookimpl` without its import,
the body of a handler) get only that context added. A new example in the guide fails the count test until it is
run here too."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from bucketwire import ConfigError
from bucketwire.testing import PluginHarness
from bucketwire.worker.plugin_loading import load

ROOT = Path(__file__).resolve().parent.parent
GUIDE = [m.group(1) for m in re.finditer(r"```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(), re.S)]
README = (ROOT / "README.md").read_text()


def block(first_line: str, source: list[str] | None = None) -> str:
    found = [b for b in (GUIDE if source is None else source) if b.startswith(first_line)]
    assert len(found) == 1, f"expected one python block starting {first_line!r}, found {len(found)}"
    return found[0]


def hook_block(hook: str) -> str:
    found = [b for b in GUIDE if f"\ndef {hook}(" in "\n" + b and "wrapper=True" not in b and "S3Error" not in b]
    assert len(found) == 1, f"expected one example of {hook}, found {len(found)}"
    return found[0]


def module(name: str, *sources: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    src = "\n\n".join(sources)
    if "@hookimpl" in src and "import hookimpl" not in src and "hookimpl, " not in src:
        src = "from bucketwire import hookimpl\n\n" + src  # the guide's first example imports it
    exec(compile(src, f"docs/plugins.md:{name}", "exec"), mod.__dict__)
    return mod


USED = 9  # examples run below; the guide has this many python blocks


def test_every_example_of_the_guide_is_run_here() -> None:
    assert len(GUIDE) == USED, "docs/plugins.md has a python example this file does not run yet"


def test_validate_settings_example() -> None:
    mod = module("csv-counter", hook_block("validate_settings"))
    assert PluginHarness(mod).settings == {"path": "csv-counter.log"}
    with pytest.raises(ConfigError, match=r"^\[plugins.csv-counter\] path: expected the file to log to"):
        PluginHarness(mod, settings={"path": 5})
    with pytest.raises(ConfigError, match=r"^\[plugins.csv-counter\] pth: unknown setting; known: path"):
        PluginHarness(mod, settings={"pth": "x.log"})


def test_the_hook_examples_pasted_into_one_plugin_make_one_that_starts(
        tmp_path: Path, bucketwire_store: Any, plugin_harness: Any, make_event: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An author who writes the plugin as the guide says, each hook's example in one module, got one that could
    never start: `worker_startup` opened `ctx.settings["path"]` (`path: required, and missing`), and the
    `validate_settings` beside it refused that key (`path: unknown setting; known: output_bucket, sizes`)."""
    src = [hook_block(h) for h in ("validate_settings", "worker_startup", "handle_event", "worker_shutdown",
                                   "register_commands")]
    mod = module("csv_counter", *src)
    monkeypatch.chdir(tmp_path)  # a relative default path is the worker's working directory's
    bucketwire_store.put("in/a b.csv", b"x\ny\n")
    for settings in ({}, {"path": str(tmp_path / "counts.log")}):
        h = plugin_harness(mod, settings=settings)
        assert not h.state["out"].closed
        [out] = h.handle(make_event(bucketwire_store.bucket, "in/a b.csv", size=4))
        assert out.data["rows"] == 2
    with pytest.raises(ConfigError, match=r"^\[plugins.csv_counter\] path: expected the file to log to"):
        PluginHarness(mod, settings={"path": ""})


def test_worker_startup_and_shutdown_examples(tmp_path: Path) -> None:
    mod = module("outfile", hook_block("worker_startup"), hook_block("worker_shutdown"))
    with PluginHarness(mod, settings={"path": str(tmp_path / "out.log")}) as h:
        out = h.state["out"]
        assert not out.closed
    assert out.closed and "out" not in h.state


def test_register_commands_example() -> None:
    mod = module("hello", hook_block("register_commands"))
    group = click.Group()
    for _name, caller in load(entry_points=False, objects=[("hello", mod)]).callers("register_commands"):
        caller(cli=group)
    assert CliRunner().invoke(group, ["hello"]).output == "hello\n"


def test_handle_event_wrapper_and_s3_examples(bucketwire_store: Any, plugin_harness: Any, make_event: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    counter = module("csv_counter", hook_block("handle_event"))
    timing = module("timing", block("import time"))
    gone = module("gone", block("from minio.error import S3Error"))
    body = block("resp = ctx.store().get_object(event.bucket, event.key)")
    closing = module("closing", "from bucketwire import hookimpl\n\n@hookimpl\ndef handle_event(event, ctx):\n"
                     + textwrap.indent(body, "    ") + "    ctx.publish('read', {'bytes': len(data)})\n")
    bucketwire_store.put("in/a b.csv", b"x\ny\n")
    caplog.set_level(logging.INFO)
    [out] = plugin_harness(counter, timing).handle(make_event(bucketwire_store.bucket, "in/a b.csv", size=4))
    assert out.data == {"bucket": bucketwire_store.bucket, "key": "in/a b.csv", "rows": 2}
    assert [getattr(r, "plugin", None) for r in caplog.records if r.getMessage() == "handled"] == ["csv_counter"]
    assert plugin_harness(gone).handle(make_event(bucketwire_store.bucket, "never/uploaded.csv")) == []
    assert any(r.getMessage() == "object gone before it was handled" for r in caplog.records)
    [read] = plugin_harness(closing).handle(make_event(bucketwire_store.bucket, "in/a b.csv", size=4))
    assert read.data == {"bytes": 4}


@pytest.mark.parametrize("where", ["docs/plugins.md", "README.md"])
def test_the_fixture_test_example(where: str, bucketwire_store: Any, plugin_harness: Any, make_event: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    readme_plugin = [m.group(1) for m in re.finditer(r"```python\n(# my_counter.py\n.*?)```", README, re.S)]
    monkeypatch.setitem(sys.modules, "my_counter", module("my_counter", *readme_plugin))
    blocks = GUIDE if where == "docs/plugins.md" else re.findall(r"```python\n(.*?)```", README, re.S)
    ns: dict[str, Any] = {"__name__": "test_my_counter"}
    exec(compile(block("import my_counter", blocks), f"{where}:test", "exec"), ns)
    ns["test_counts_rows"](bucketwire_store, plugin_harness, make_event)
