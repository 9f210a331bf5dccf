"""The README's plugin and its test, run as written against a real SeaweedFS: a newcomer copies these first."""

from __future__ import annotations

import re
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
