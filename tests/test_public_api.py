"""Bundled plugins use only the public API of `bucketwire`, exactly as a third-party plugin would."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bucketwire

ROOT = Path(__file__).parent.parent
PLUGIN_FILES = sorted((ROOT / "plugins").rglob("*.py"))


def private_imports(path: Path) -> list[str]:
    """Every import of bucketwire that is not a name from `bucketwire.__all__` (bucketwire.testing is for tests)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bucketwire":
            if node.module != "bucketwire":
                bad.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
            else:
                bad += [f"{path.name}:{node.lineno}: {a.name}" for a in node.names if a.name not in bucketwire.__all__]
        elif isinstance(node, ast.Import):
            bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.startswith("bucketwire.")]
    return bad


def test_there_are_plugin_files():
    assert len(PLUGIN_FILES) >= 3


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bundled_plugin_imports_only_the_public_api(path):
    assert private_imports(path) == []


def test_bundled_plugins_are_registered_through_entry_points():
    from bucketwire.worker.plugin_loading import discover

    eps = discover()
    assert {"thumbnail", "audit", "replication"} <= set(eps)
    assert eps["thumbnail"].value == "bucketwire_thumbnail"


@pytest.mark.parametrize("exc", [
    bucketwire.PluginError("failed"), bucketwire.PermanentError("bad input"),
    bucketwire.Retry(delay=2.5, reason="429 from the service"), bucketwire.FollowOnTooLarge("too big"),
], ids=lambda e: type(e).__name__)
def test_the_public_exceptions_survive_pickling(exc: Exception) -> None:
    """A plugin that runs its work in a process pool gets its exceptions back pickled: `Retry(3, "y")` came back
    as a ValueError (pickle calls the class with the message, which `Retry` took for its delay)."""
    import pickle

    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert f"{type(back).__module__}.{type(back).__qualname__}" == f"bucketwire.{type(exc).__name__}"
    if isinstance(exc, bucketwire.Retry):
        assert isinstance(back, bucketwire.Retry) and (back.delay, back.reason) == (exc.delay, exc.reason)
