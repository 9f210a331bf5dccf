from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bucketwire import ConfigError
from bucketwire import config as config_mod


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ('[hub]\nhttp = "nope"', "hub.http: 'nope' is not HOST:PORT"),
    ('[hub]\nwork = "127.0.0.1:5"', "hub.work: '127.0.0.1:5' is not a ZeroMQ endpoint"),
    ('[hub]\ndurability = "sometimes"', "hub.durability: must be 'os' or 'fsync'"),
    ('[hub]\nheartbeat_timeout = 0.5\nheartbeat_interval = 1', "hub.heartbeat_timeout: must be larger"),
    ('[hub]\nauth_token = "env:BW_DOES_NOT_EXIST"', "environment variable BW_DOES_NOT_EXIST is not set"),
    ('[hub]\ntypo = 1', "hub.typo: unknown key"),
    ("[[routes]]\nbucket = 'x'", "routes[0].topic: every route needs a topic"),
    ("[groups.g]\nplugins = []", "groups.g.topics: a group needs at least one topic"),
    ("[groups.g]\ntopics = ['a']\nstart = 'middle'", "groups.g.start: must be 'latest' or 'earliest'"),
    ("[topics.t]\nmax_attempts = 0", "topics.t.max_attempts: must be greater than 0"),
    ("[topics.t]\nhandler_timeout = 0", "topics.t.handler_timeout: must be greater than 0"),
    ("[groups.g]\ntopics = ['a']\nhandler_timeout = 'long'", "groups.g.handler_timeout: expected float"),
    ("[stores.s]\naccess_key = 'a'", "stores.s.endpoint: a store needs an endpoint"),
    ("[hub\n", "invalid TOML"),
    ("[wat]\n", "wat: unknown key"),
])
def test_config_errors_name_file_key_and_fix(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert str(e.value).startswith(str(p))
    assert needle in str(e.value)


def test_secrets_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BW_T", "tok-env")
    secret = tmp_path / "s3secret"
    secret.write_text("from-file\n")
    p = write(tmp_path, f"""
[hub]
auth_token = ["env:BW_T", "literal"]
state_dir = "st"
[stores.s]
endpoint = "http://127.0.0.1:1"
secret_key = "file:{secret}"
""")
    cfg = config_mod.load(p)
    assert cfg.hub.auth_tokens == ["tok-env", "literal"]
    assert cfg.stores["s"].secret_key == "from-file" and cfg.stores["s"].endpoint == "127.0.0.1:1"
    assert cfg.hub.state_dir == tmp_path / "st", "relative paths are relative to the config file"
    assert cfg.hub.default_store == "s"


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    p = write(tmp_path, '[hub]\nhttp = "nope"')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(p)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "hub.http" in r.stderr


def test_publish_to_a_missing_hub_fails_with_a_clear_line(tmp_path):
    p = write(tmp_path, '[hub]\nwork = "tcp://127.0.0.1:9"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "publish", "-c", str(p), "--timeout", "1", "t", "{}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no answer from the hub at tcp://127.0.0.1:9" in r.stderr


@pytest.mark.parametrize("text", [
    '[hub]\nauth_token = "env:BW_EMPTY"',
    '[hub]\nauth_token = ["env:BW_TEST_OK", "file:{empty}"]',
    '[hub]\nauth_token = "  "',
    '[stores.s]\nendpoint = "127.0.0.1:1"\naccess_key = "env:BW_EMPTY"',
    '[stores.s]\nendpoint = "127.0.0.1:1"\nsecret_key = "file:{empty}"',
    '[plugins.p]\npassword = "env:BW_EMPTY"',
])
def test_a_secret_that_resolves_to_empty_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """An env:/file: secret that resolves to nothing is a deployment mistake; for auth_token, running on with an
    empty token would mean accepting anyone."""
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    monkeypatch.setenv("BW_EMPTY", "")
    monkeypatch.setenv("BW_TEST_OK", "fine")
    p = write(tmp_path, text.format(empty=empty))
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert "empty" in str(e.value) and "\n" not in str(e.value)


def test_literal_empty_store_keys_mean_anonymous(tmp_path: Path) -> None:
    """Only a reference (env:/file:) must resolve to something: a store written with no keys is anonymous."""
    p = write(tmp_path, '[stores.s]\nendpoint = "127.0.0.1:1"\naccess_key = ""\nsecret_key = ""')
    assert config_mod.load(p).stores["s"].access_key == ""


def test_handler_timeout_topic_then_group_then_default(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, """
[topics.big]
handler_timeout = 3600
[topics.small]
max_attempts = 2
[groups.g]
topics = ["big", "small", "other"]
handler_timeout = 60.5
[groups.h]
topics = ["small"]
"""))
    assert cfg.handler_timeout("g", "big") == 3600.0, "the topic's own setting wins"
    assert cfg.handler_timeout("g", "small") == 60.5 and cfg.handler_timeout("g", "other") == 60.5
    assert cfg.handler_timeout("h", "small") == config_mod.DEFAULT_HANDLER_TIMEOUT == 300.0
