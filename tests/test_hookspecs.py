"""datasette's habit: every hook has documentation with an example and at least one test that uses it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from bucketwire import hookspecs

HOOKS = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "bucketwire_spec")]
TESTS = "\n".join(p.read_text() for p in Path(__file__).parent.rglob("*.py"))
README = (Path(__file__).parent.parent / "README.md")


def test_there_are_hooks():
    assert {"handle_event", "validate_settings", "worker_startup", "worker_shutdown", "register_commands"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_an_example(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 80 and "@hookimpl" in doc, f"{hook} needs a docstring with an example"
    assert f"`{hook}" in README.read_text(), f"README.md must document {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    assert f"def {hook}(" in TESTS.replace("def test_", ""), f"no test plugin implements {hook}"
