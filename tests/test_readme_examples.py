"""The README's plugin and its test, run as written against a real SeaweedFS: a newcomer copies these first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(first_line: str) -> str:
    m = re.search(r"```python\n(" + re.escape(first_line) + r"\n.*?)```", README.read_text(), re.DOTALL)
    assert m, f"README has no python block starting with {first_line!r}"
    return m.group(1)


def test_readme_plugin_test_runs_as_written(weed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = types.ModuleType("my_counter")
    exec(compile(_block("# my_counter.py"), "README:my_counter.py", "exec"), plugin.__dict__)
    monkeypatch.setitem(sys.modules, "my_counter", plugin)
    src = _block("# test_my_counter.py")
    # Only the server's address and credentials differ from the README's.
    for old, new in (('"127.0.0.1:8333"', repr(weed.s3_endpoint)),
                     ('access_key="minioadmin"', f"access_key={weed.access_key!r}"),
                     ('secret_key="minioadmin"', f"secret_key={weed.secret_key!r}")):
        assert old in src
        src = src.replace(old, new)
    ns: dict[str, Any] = {"__name__": "test_my_counter"}
    exec(compile(src, "README:test_my_counter.py", "exec"), ns)
    ns["test_counts_rows"]()


def test_make_test_lints_the_project_and_not_a_newcomers_own_files(tmp_path: Path) -> None:
    """The README's plugin is run from the checkout (`--plugin my_counter.py -c .bucketwire-dev/...`), so that is
    where a newcomer saves it, half-written; `make test` then failed in `ruff check .` on their file before any
    test ran. The lint covers the project's own directories, and still fails on an error in one of them."""
    root = README.parent
    copy = tmp_path / "checkout"
    skip = shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", ".*_cache", ".bucketwire-dev")
    shutil.copytree(root, copy, ignore=skip)
    (copy / "my_counter.py").write_text(_block("# my_counter.py") + "import os  # a newcomer's work in progress\n")
    venv = Path(sys.executable).parent.parent
    dry = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=copy, capture_output=True, text=True,
                         timeout=60)
    [lint] = [line for line in dry.stdout.splitlines() if "ruff check" in line]

    def ruff() -> subprocess.CompletedProcess[str]:
        return subprocess.run(lint, shell=True, cwd=copy, capture_output=True, text=True, timeout=120)

    r = ruff()
    assert r.returncode == 0, r.stdout + r.stderr
    (copy / "framework" / "bucketwire" / "lint_probe.py").write_text("import os\n")
    r = ruff()
    assert r.returncode == 1 and "lint_probe.py" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("doc", ["README.md", "docs/plugins.md"])
def test_the_venv_is_activated_before_the_first_bare_command(doc: str) -> None:
    """`make dev` puts bucketwire, pip and pytest in .venv/bin, and nothing said so: the README's next command,
    `bucketwire worker ... --plugin my_counter.py`, was `command not found` in a newcomer's shell, and
    docs/plugins.md's `pip install -e './csv-counter[test]' && pytest csv-counter` reached the system's pip."""
    text = (README.parent / doc).read_text()
    code = re.sub(r"(?s)```.*?```", lambda m: m.group(0).replace("\n", "\n`"), text)  # block lines as spans
    bare = re.search(r"`(?:bucketwire|pip|pytest) [a-z-]", code)
    assert bare, doc
    activate = code.find(". .venv/bin/activate")
    assert 0 <= activate < bare.start(), (
        f"{doc}: the first bare command ({code[bare.start():bare.start() + 40]!r}) comes before "
        "`. .venv/bin/activate`")
