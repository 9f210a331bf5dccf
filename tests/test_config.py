from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucketwire import ConfigError
from bucketwire import config as config_mod


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ('[hub]\nhttp = "nope"', '[hub] http: expected HOST:PORT like "127.0.0.1:9000", got "nope"'),
    ('[hub]\nhttp = "127.0.0.1:70000"', '[hub] http: expected HOST:PORT like "127.0.0.1:9000", got "127.0.0.1:70000"'),
    ('[hub]\nwork = "127.0.0.1:5"',
     '[hub] work: expected a ZeroMQ endpoint like "tcp://127.0.0.1:5557" (or "ipc://PATH", a Unix socket), '
     'got "127.0.0.1:5"'),
    ('[client]\nwork = "unix:/run/hub.sock"', '(or "ipc://PATH", a Unix socket), got "unix:/run/hub.sock"'),
    ('[hub]\ndurability = "sometimes"', '[hub] durability: expected one of "fsync", "os", got "sometimes"'),
    ('[hub]\nheartbeat_timeout = 0.5\nheartbeat_interval = 1', "[hub] heartbeat_timeout: must be larger"),
    ('[hub]\nheartbeat_interval = true', "[hub] heartbeat_interval: expected a number > 0, got true"),
    ('[hub]\nauth_token = "env:BW_DOES_NOT_EXIST"',
     "[hub] auth_token: environment variable BW_DOES_NOT_EXIST is not set; export it"),
    ('[hub]\ntls_cert = "c.pem"', "[hub] tls_key: set both tls_cert and tls_key"),
    ("[[routes]]\nbucket = 'x'", '[routes[0]] topic: required, e.g. topic = "bucket-update"'),
    ("[[routes]]\ntopic = 't'\n[[routes]]\ntopic = ''", '[routes[1]] topic: expected a non-empty string, got ""'),
    ("[groups.g]\nplugins = []", '[groups.g] topics: required, e.g. topics = ["bucket-update"]'),
    ('[journal]\nbackend = "jetstream"', '[journal] servers: backend = "jetstream" needs the NATS servers'),
    ('[journal]\nbackend = "etcd"', '[journal] backend: expected one of "jetstream", "sqlite", got "etcd"'),
    ('[journal]\nservers = ["127.0.0.1:4222"]', """[journal] servers: '127.0.0.1:4222' is not like"""),
    ('[journal]\npassword = "x"', "[journal] password: set both user and password"),
    ('[client]\nwork = ["tcp://127.0.0.1:1", "http://x"]', "[client] work[1]: expected a ZeroMQ endpoint"),
    ('[client]\nwork = []', "[client] work: is an empty list"),
    ("[groups.g]\ntopics = []", "[groups.g] topics: expected a non-empty list of non-empty strings, got []"),
    ("[groups.g]\ntopics = ['a']\nstart = 'middle'",
     '[groups.g] start: expected one of "earliest", "latest", got "middle"'),
    ("[groups.x]\ntopics = ['a']\ncredit = 'ten'", '[groups.x] credit: expected an integer ≥ 1, got "ten"'),
    ("[topics.t]\nmax_attempts = 0", "[topics.t] max_attempts: expected an integer ≥ 1, got 0"),
    ("[topics.t]\nhandler_timeout = 0", "[topics.t] handler_timeout: expected a number > 0, got 0"),
    ("[groups.g]\ntopics = ['a']\nhandler_timeout = 'long'",
     '[groups.g] handler_timeout: expected a number > 0, got "long"'),
    ("[stores.s]\naccess_key = 'a'", '[stores.s] endpoint: required, e.g. endpoint = "127.0.0.1:8333"'),
    ("[security]\nreload_interval = 0", "[security] reload_interval: expected a number > 0, got 0"),
    ("[security.roles.r]\npublish = ['a', 1]", "[security.roles.r] publish[1]: expected a non-empty string, got 1"),
    ("[hub]\ndead_letter = ''", '[hub] dead_letter: expected a non-empty string, got ""'),
    ("[topics.jobs]\ndead_letter = 'jobs'", "[topics.jobs] dead_letter: is the topic itself; its events would be "
                                           "dropped instead of dead-lettered"),
    ("[hub\n", "invalid TOML"),
    # a path key given another type, or a NUL byte, raised NotImplementedError (or ValueError at hub start)
    ("[hub]\nstate_dir = 5", "[hub] state_dir: expected a path, got 5"),
    ('[hub]\nstate_dir = "a\\u0000b"', '[hub] state_dir: expected a path, got "a\\u0000b"'),
    ("[hub]\ntls_cert = true", "[hub] tls_cert: expected a path, got true"),
    ("[journal]\ncreds = ['x.creds']", '[journal] creds: expected a path, got ["x.creds"]'),
    ("[security]\nauthorized_keys_dir = {a = 1}", "[security] authorized_keys_dir: expected a path, got a table"),
    ("routes = 5", "routes: expected a list of tables, got 5"),
])
def test_config_errors_name_file_key_and_fix(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert str(e.value).startswith(f"{p}: ")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


_WRONG = ['5', '1.5', 'true', '"x"', '[1]', '{a = 1}', '[]', '""', '-1', '["a", 2]', '[[1]]', '1e400', 'nan',
          '"a\\u0000b"', '"env:BW_DOES_NOT_EXIST"']
_TABLES = {"hub": config_mod.HubConfig, "client": config_mod.ClientConfig, "journal": config_mod.JournalConfig,
           "security": config_mod.SecurityConfig, "topics.t": config_mod.TopicConfig,
           "groups.g": config_mod.GroupConfig, "stores.s": config_mod.StoreConfig,
           "security.roles.r": config_mod.RoleConfig, "dev": config_mod.DevConfig}


@pytest.mark.parametrize("table", sorted(_TABLES))
def test_every_key_given_a_wrong_value_is_one_line(tmp_path: Path, table: str) -> None:
    """Every key of every table, given each kind of TOML value: loading either works or is one ConfigError line.
    A path key given a number (`state_dir = 5`) printed msgspec's NotImplementedError traceback instead."""
    cls = _TABLES[table]
    required = {"groups.g": 'topics = ["a"]\n', "stores.s": 'endpoint = "h:1"\n'}.get(table, "")
    names = [n for n in cls.__struct_encode_fields__ if not n.startswith("__") and n != "name"]
    assert names
    for key in names:
        for value in _WRONG:
            text = f"[{table}]\n{'' if required.startswith(key + ' ') else required}{key} = {value}\n"
            p = write(tmp_path, text)
            try:
                config_mod.load(p, warn=False)
            except ConfigError as e:
                assert str(e).startswith(f"{p}: ") and "\n" not in str(e), text
            except Exception as e:  # noqa: BLE001 - anything else is the bug this test is for
                pytest.fail(f"{text!r}: {type(e).__name__}: {e}")


@pytest.mark.parametrize("text,where", [
    ("wat = 1", "wat"),
    ("[wat]\n", "wat"),
    ("[hub]\ntypo = 1", "[hub] typo"),
    ("[client]\ntypo = 1", "[client] typo"),
    ("[[routes]]\ntopic = 't'\ntypo = 1", "[routes[0]] typo"),
    ("[topics.t]\ntypo = 1", "[topics.t] typo"),
    ('[topics."a.b"]\ntypo = 1', '[topics."a.b"] typo'),
    ("[groups.g]\ntopics = ['a']\ntypo = 1", "[groups.g] typo"),
    ("[stores.s]\nendpoint = 'h:1'\ntypo = 1", "[stores.s] typo"),
    ("[security]\ntypo = 1", "[security] typo"),
    ("[security.roles.r]\ntypo = 1", "[security.roles.r] typo"),
])
def test_unknown_keys_are_refused_at_every_level(tmp_path: Path, text: str, where: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert str(e.value) == f"{p}: {where}: unknown key; check the spelling against the configuration reference " \
                           "in README.md"


@pytest.mark.parametrize("text,line", [
    ("[hub]\nheartbeat_intervall = 1", "[hub] heartbeat_intervall: unknown key; did you mean heartbeat_interval?"),
    ("[hubb]\nhttp = '127.0.0.1:9000'", "hubb: unknown key; did you mean [hub]?"),
    ("[[route]]\ntopic = 't'", "route: unknown key; did you mean [[routes]]?"),
    ("[group.g]\ntopics = ['a']", "group: unknown key; did you mean [groups.NAME]?"),
    ("[plugin.thumbnail]\nsizes = [1]", "plugin: unknown key; did you mean [plugins.NAME]?"),
    ("[groups.g]\ntopics = ['a']\nplugin = ['x']", "[groups.g] plugin: unknown key; did you mean plugins?"),
    ("[security]\nauthorised_keys_dir = 'k'", "[security] authorised_keys_dir: unknown key; did you mean "
                                               "authorized_keys_dir?"),
])
def test_a_misspelt_key_or_table_names_the_one_meant(tmp_path: Path, text: str, line: str) -> None:
    """A newcomer's typo in a key or a section name said only "unknown key; check the spelling against the
    configuration reference in README.md", leaving them to find the right spelling in a long reference."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert str(e.value) == f"{p}: {line}"


def test_the_name_of_a_table_is_not_a_key(tmp_path: Path) -> None:
    p = write(tmp_path, "[groups.g]\nname = 'other'\ntopics = ['a']")
    with pytest.raises(ConfigError, match=r"\[groups.g\] name: unknown key; the table's own name \('g'\) is its name"):
        config_mod.load(p)


def test_secret_values_are_never_echoed_in_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "[stores.s]\nendpoint = 'h:1'\nsecret_key = ['AKIA-VERY-SECRET']")
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert "[stores.s] secret_key: expected a string, got a list" in str(e.value)
    assert "AKIA" not in str(e.value)


def test_defaults_and_lone_strings(tmp_path: Path) -> None:
    p = write(tmp_path, """
[hub]
publish = "tcp://0.0.0.0:7001"
retention_days = 2
retention_mb = 1
[groups.g]
topics = "jobs"
[[routes]]
topic = "t"
events = "s3:ObjectCreated:*"
[stores.s]
endpoint = "https://s3.example:443"
""")
    cfg = config_mod.load(p)
    g = cfg.groups["g"]
    assert (g.name, g.topics, g.credit, g.processes, g.start, g.plugins) == ("g", ["jobs"], 16, 2, "latest", None)
    assert cfg.routes[0].events == ["s3:ObjectCreated:*"]
    assert cfg.client.publish == "tcp://127.0.0.1:7001" and cfg.client.work == cfg.hub.work
    assert cfg.hub.retention_age == 2 * 86400 and cfg.hub.retention_bytes == 1 << 20
    assert cfg.hub.state_dir == tmp_path / "state" / "hub", "the default path is relative to the config file too"
    assert cfg.stores["s"].secure and cfg.stores["s"].endpoint == "s3.example:443"


def test_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket paths fit a Unix socket's 107 bytes (pytest's tmp_path may not)."""
    d = Path(tempfile.mkdtemp(prefix="bwc-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_relative_ipc_endpoint_is_relative_to_the_config_file(short_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's example `[hub] local = "ipc://./state/hub/hub.sock"` is a relative path, and relative paths
    are relative to the config file; an `ipc://` one was left to each process's working directory, so the hub bound
    its socket (making the directories) wherever it was started and a client started elsewhere found none."""
    tmp_path = short_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = write(tmp_path, """
[hub]
local = "ipc://./state/hub/hub.sock"
work = "ipc://run/work.sock"
publish = "ipc:///abs/pub.sock"
[client]
work = ["ipc://./state/hub/hub.sock", "tcp://127.0.0.1:5557", "ipc://@abstract-name"]
publish = "ipc://run/pub.sock"
""")
    cfg = config_mod.load(p)
    assert cfg.hub.local == f"ipc://{tmp_path}/state/hub/hub.sock"
    assert cfg.hub.work == f"ipc://{tmp_path}/run/work.sock" and cfg.hub.advertise == cfg.hub.work
    assert cfg.hub.publish == "ipc:///abs/pub.sock", "an absolute path is kept as written"
    assert cfg.client.work == cfg.hub.local
    assert cfg.client.work_endpoints == [cfg.hub.local, "tcp://127.0.0.1:5557", "ipc://@abstract-name"], \
        "tcp:// and Linux's abstract names (@) are not paths"
    assert cfg.client.publish_endpoints == [f"ipc://{tmp_path}/run/pub.sock"]
    assert cfg.client.publish == cfg.client.publish_endpoints[0]
    default = config_mod.load(write(tmp_path, '[hub]\nwork = "ipc://w.sock"\n'))
    assert default.client.work_endpoints == [f"ipc://{tmp_path}/w.sock"], "the client's default is the hub's own"


@pytest.mark.parametrize("text, needle", [('[hub]\nhttp = "nope"', "[hub] http"),
                                          ("[hub]\nstate_dir = 5", "[hub] state_dir: expected a path, got 5")])
def test_cli_prints_one_line_not_a_traceback(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "bucketwire", "status", "-c", str(p)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert needle in r.stderr


@pytest.mark.parametrize("flag, needle", [("nonsense", "is not HOST:PORT"), ("127.0.0.1:99999", "is not HOST:PORT"),
                                          ("--drain-timeout=-1", "-1")])
def test_bad_worker_flags_are_one_line(tmp_path: Path, flag: str, needle: str) -> None:
    """`worker --metrics` is read by the pool, not the config schema: a bad one printed a traceback."""
    rec = tmp_path / "rec.jsonl"
    p = write(tmp_path, f'[groups.g]\ntopics = ["t"]\nplugins = []\n[plugins.recorder]\npath = "{rec}"\n')
    args = [flag] if flag.startswith("--") else ["--metrics", flag]
    r = subprocess.run([sys.executable, "-m", "bucketwire", "worker", "-c", str(p), "-g", "g", "--plugin",
                        str(Path(__file__).parent / "plugins" / "recorder.py"), *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr.strip().splitlines()[-1], r.stderr


def test_publish_to_a_missing_hub_fails_with_a_clear_line(tmp_path: Path) -> None:
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


def test_client_endpoints_may_be_lists(tmp_path: Path) -> None:
    """Several hubs: `[client] work` / `publish` as lists; the first is also the single endpoint older code reads."""
    p = write(tmp_path, '[client]\nwork = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]\n'
                        'publish = "tcp://127.0.0.1:7003"\n')
    cfg = config_mod.load(p)
    assert cfg.client.work_endpoints == ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]
    assert cfg.client.work == "tcp://127.0.0.1:7001"
    assert cfg.client.publish_endpoints == ["tcp://127.0.0.1:7003"]
    assert cfg.journal.backend == "sqlite" and cfg.hub.id.endswith(":5557")


def test_a_lone_secret_string_is_named_without_a_list_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auth_token = "env:X"` (the README's line) with X unset said `[hub] auth_token[0]: ...`, an index of a list
    the user never wrote."""
    monkeypatch.delenv("BW_NOT_SET_ANYWHERE", raising=False)
    p = write(tmp_path, '[hub]\nauth_token = "env:BW_NOT_SET_ANYWHERE"\n')
    with pytest.raises(ConfigError) as ei:
        config_mod.load(p)
    assert str(ei.value) == (f"{p}: [hub] auth_token: environment variable BW_NOT_SET_ANYWHERE is not set; export it "
                             "or write the value in the file")
    p = write(tmp_path, '[hub]\nauth_token = ["ok", "env:BW_NOT_SET_ANYWHERE"]\n')
    with pytest.raises(ConfigError, match=r"\[hub\] auth_token\[1\]: environment variable BW_NOT_SET_ANYWHERE"):
        config_mod.load(p)


@pytest.mark.parametrize("args", [["status"], ["dlq", "list"], ["replay", "--group", "g", "--since", "1h"],
                                  ["group", "rm", "g"]])
def test_operator_commands_wait_as_long_as_client_timeout_says(tmp_path: Path, args: list[str]) -> None:
    """`[client] timeout` is how long a client waits for the hub (a slow link, a hub busy with a big commit):
    `status` waited a fixed 5 s, `dlq`, `replay` and `group rm` 10 s, whatever it said."""
    p = write(tmp_path, '[hub]\nwork = "tcp://127.0.0.1:9"\n[client]\ntimeout = 1.5\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no answer from the hub at tcp://127.0.0.1:9 within 1.5s" in r.stderr, r.stderr
