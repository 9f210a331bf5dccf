"""One string where a list is expected: the config's own rule (a list of one) holds in the bundled plugins'
settings too, and `bucketwire plugins -c CONFIG` runs the plugins' settings checks doctor and the worker run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bucketwire_replication
import bucketwire_thumbnail
from bucketwire import ConfigError
from bucketwire import config as config_mod
from tests.test_doctor import offline


def _load(tmp: Path, body: str) -> config_mod.Config:
    p = tmp / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp / "state"}"\n' + body)
    return config_mod.load(p, warn=False)


def test_the_config_takes_one_string_as_a_list_of_one(tmp_path: Path) -> None:
    """The rule the plugins follow: `topics = "photos"` is `["photos"]` wherever the schema wants a list."""
    cfg = _load(tmp_path, '\n[groups.g]\ntopics = "photos"\nplugins = []\n')
    assert cfg.groups["g"].topics == ["photos"]


@pytest.mark.parametrize(("module", "extra"), [
    (bucketwire_thumbnail, {}),
    (bucketwire_replication, {"target_store": "backup", "target_bucket": "replica"}),
])
def test_bundled_plugins_take_one_bucket_as_a_string(module: Any, extra: dict[str, Any]) -> None:
    """Both refused `buckets = "photos"` (`expected a list of bucket names`), which the config takes everywhere."""
    assert module.validate_settings({**extra, "buckets": "photos"})["buckets"] == ["photos"]
    assert module.validate_settings({**extra, "buckets": ["a", "b"]})["buckets"] == ["a", "b"]
    assert module.validate_settings(dict(extra))["buckets"] is None
    for bad in (5, [""], ["a", 5], ""):
        with pytest.raises(ConfigError, match=r"^buckets: expected "):
            module.validate_settings({**extra, "buckets": bad})


def test_thumbnail_takes_one_input_format_as_a_string() -> None:
    one = bucketwire_thumbnail.validate_settings({"input_formats": "png"})["input_formats"]
    assert one == bucketwire_thumbnail.validate_settings({"input_formats": ["png"]})["input_formats"] == ["PNG"]
    with pytest.raises(ConfigError, match=r"^input_formats: expected "):
        bucketwire_thumbnail.validate_settings({"input_formats": 3})


def test_string_list_is_the_configs_rule_for_plugin_authors() -> None:
    from bucketwire import string_list

    assert string_list("photos", "buckets", "bucket names") == ["photos"]
    assert string_list(["a", "b"], "buckets", "bucket names") == ["a", "b"]
    with pytest.raises(ConfigError) as e:
        string_list([1], "buckets", "bucket names")
    assert str(e.value) == ('buckets: expected a list of bucket names (one may be given as a string), '
                            'e.g. buckets = ["photos"] or buckets = "photos"; got [1]')


def test_doctor_accepts_one_bucket_as_a_string(tmp_path: Path) -> None:
    body = ('\n[groups.t]\ntopics = ["jobs"]\nplugins = ["thumbnail"]\n\n[plugins.thumbnail]\nbuckets = "photos"\n')
    assert offline(tmp_path, body) == []


def test_plugins_command_reports_the_settings_line_doctor_and_the_worker_report(tmp_path: Path) -> None:
    """`bucketwire plugins -c CONFIG` loaded the config and listed the plugins, silent on a section the worker
    (and doctor) refuse; it says the same line now, and exits 1."""
    p = tmp_path / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp_path / "state"}"\n'
                 '\n[groups.t]\ntopics = ["jobs"]\nplugins = ["thumbnail"]\n\n[plugins.thumbnail]\nsizes = [0]\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "plugins", "-c", str(p)], capture_output=True, text=True,
                       timeout=60)
    line = ("[plugins.thumbnail] sizes: expected a list of integers 1..16384 (longest edge), e.g. [256, 1024]; "
            "got [0]")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == f"Error: {line}\n" and r.stdout == "", r.stdout + r.stderr
    assert any(e.startswith(f"ERROR {line} -- fix:") for e in offline(tmp_path, p.read_text().split("\n", 2)[2]))
    p.write_text(p.read_text().replace("sizes = [0]", 'sizes = [64]\nbuckets = "photos"'))
    r = subprocess.run([sys.executable, "-m", "bucketwire", "plugins", "-c", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and '"thumbnail"' in r.stdout, r.stdout + r.stderr


def test_plugins_command_checks_the_settings_of_a_plugin_loaded_with_dash_plugin(tmp_path: Path) -> None:
    """A plugin an author runs with `worker --plugin my_plugin.py` (not installed) had its section checked by the
    worker at start but not by `bucketwire plugins -c CONFIG --plugin my_plugin.py`, which said nothing and
    exited 0 for a section the worker then refused."""
    mod = tmp_path / "my_plugin.py"
    mod.write_text(
        "from bucketwire import ConfigError, hookimpl\n\n"
        "@hookimpl\n"
        "def validate_settings(settings):\n"
        "    if not isinstance(settings.get('limit', 1), int):\n"
        "        raise ConfigError(f\"limit: expected an integer, got {settings['limit']!r}\")\n"
        "    return settings\n\n"
        "@hookimpl\n"
        "def handle_event(event, ctx):\n"
        "    pass\n")
    p = tmp_path / "c.toml"
    p.write_text(f'[hub]\nstate_dir = "{tmp_path / "state"}"\n'
                 '\n[groups.t]\ntopics = ["jobs"]\nplugins = []\n\n[plugins.my_plugin]\nlimit = "ten"\n')
    args = [sys.executable, "-m", "bucketwire", "plugins", "-c", str(p), "--plugin", str(mod)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == "Error: [plugins.my_plugin] limit: expected an integer, got 'ten'\n", r.stderr
    doctor = [sys.executable, "-m", "bucketwire", "doctor", "--offline", "-q", "-c", str(p), "--plugin", str(mod)]
    r = subprocess.run(doctor, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR [plugins.my_plugin] limit: expected an integer, got 'ten' -- fix:" in r.stdout, r.stdout
    assert "configures a plugin that is not installed" not in r.stdout, "it is loaded with --plugin"
    p.write_text(p.read_text().replace('limit = "ten"', "limit = 10"))
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and '"my_plugin"' in r.stdout, r.stdout + r.stderr
    r = subprocess.run(doctor, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "ERROR" not in r.stdout and "my_plugin" not in r.stdout, r.stdout
