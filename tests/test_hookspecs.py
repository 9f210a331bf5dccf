"""datasette's habit: every hook is documented under a heading with its exact signature, with an example, and
is implemented by a plugin that a test runs."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pluggy
import pytest

from bucketwire import hookspecs

ROOT = Path(__file__).parent.parent
HOOKS = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "bucketwire_spec")]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()
TESTS = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))


def signature(hook: str) -> str:
    return f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"


def test_there_are_hooks() -> None:
    assert set(HOOKS) == set(hookspecs.HOOKS)
    assert {"handle_event", "validate_settings", "worker_startup", "worker_shutdown", "register_commands"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_heading_with_its_signature_in_the_guide(hook: str) -> None:
    heading = f"### `{signature(hook)}`"
    assert heading in GUIDE.splitlines(), f"docs/plugins.md needs the heading {heading}"
    section = GUIDE.split(heading, 1)[1].split("\n### ", 1)[0]
    assert "```python" in section and "@hookimpl" in section, f"{heading} needs an example"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_has_an_example_and_the_readme_lists_it(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 80 and "@hookimpl" in doc, f"{hook} needs a docstring with an example"
    assert f"`{signature(hook)}`" in (ROOT / "README.md").read_text(), f"README.md's hook table must list {hook}"


def _module(path: Path) -> ModuleType:
    if path.stem == "__init__":
        return importlib.import_module(path.parent.name)  # a bundled plugin, installed
    return importlib.import_module(f"tests.plugins.{path.stem}")


def _used_by_a_test(path: Path) -> bool:
    """A test names the plugin module (a path to a test plugin, or an import of a bundled one)."""
    name = path.stem if path.stem != "__init__" else path.parent.name
    return bool(re.search(rf"""["']{re.escape(name)}(\.py)?["']|import {re.escape(name)}\b""", TESTS))


def implementers() -> dict[str, list[str]]:
    paths = sorted((ROOT / "tests" / "plugins").glob("*.py")) + sorted((ROOT / "plugins").glob("*/__init__.py"))
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    out: dict[str, list[str]] = {h: [] for h in HOOKS}
    for p in paths:
        if p.stem == "__init__" and p.parent.name == "plugins":
            continue
        if not _used_by_a_test(p):
            continue
        mod = _module(p)
        pm.register(mod, name=str(p))
        for caller in pm.get_hookcallers(mod) or []:
            if caller.name in out:
                out[caller.name].append(str(p.relative_to(ROOT)))
    return out


IMPLEMENTERS = implementers()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_a_plugin_a_test_runs(hook: str) -> None:
    assert IMPLEMENTERS[hook], f"no plugin used by a test implements {hook}; add one to tests/plugins and a test"
