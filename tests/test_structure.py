"""The package's shape: properties a refactor can silently break and no behaviour test would notice.

No import cycle in the framework (a cycle makes import order matter and hides which wing depends on which), the
journal's SQL stays inside hub/journal.py (so a second backend can stand behind the `JournalAPI` interface), and
both backends satisfy that interface method by method.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from bucketwire.hub import journal, journal_jetstream

ROOT = Path(__file__).resolve().parent.parent / "framework"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted((ROOT / "bucketwire").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the framework modules it imports at module level (TYPE_CHECKING and function-local imports are
    not edges: they cannot make an import-time cycle)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in tree.body:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_framework() -> None:
    graph = import_graph()
    assert "bucketwire.hub.loop" in graph and graph["bucketwire.hub.loop"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_only_the_journal_runs_sql_on_its_connection() -> None:
    offenders = []
    for p in sorted((ROOT / "bucketwire").rglob("*.py")):
        if p.name == "journal.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ".journal.db." in line or ".journal._db." in line:
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _api_methods() -> dict[str, inspect.Signature]:
    api = journal.JournalAPI
    return {n: inspect.signature(getattr(api, n)) for n in dir(api)
            if not n.startswith("_") and callable(getattr(api, n))}


def test_both_journal_backends_satisfy_the_interface() -> None:
    methods = _api_methods()
    assert {"commit", "read", "first_seq", "first_seq_since", "forget_group", "probe", "close"} <= set(methods)
    assert "heads" in journal.JournalAPI.__annotations__
    for backend in (journal.Journal, journal_jetstream.JetStreamJournal):
        for name, sig in methods.items():
            impl = getattr(backend, name, None)
            assert impl is not None, f"{backend.__name__} lacks {name}"
            have = list(inspect.signature(impl).parameters)
            assert have[: len(sig.parameters)] == list(sig.parameters), (backend.__name__, name, have)


def test_the_hub_and_worker_commands_start_without_loading_plugins_or_minio() -> None:
    """Every hub, worker and CLI process the suite (or an operator's script) starts paid ~0.4 s of CPU importing
    minio and Pillow: the CLI loaded every installed plugin to register plugin commands, and two modules imported
    minio for an annotation. A built-in command needs neither; `bucketwire audit ...` (a plugin's) still works,
    see tests/test_audit.py::test_real_cli_has_the_command."""
    import subprocess
    import sys

    for cmd in ("hub", "worker", "status"):
        p = subprocess.run([sys.executable, "-X", "importtime", "-m", "bucketwire", cmd, "--help"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
        heavy = sorted({line.rsplit("|", 1)[-1].strip().split(".")[0] for line in p.stderr.splitlines()
                        if line.startswith("import time:")} & {"minio", "PIL", "bucketwire_replication",
                                                               "bucketwire_thumbnail"})
        assert not heavy, f"`bucketwire {cmd}` imports {heavy}"
