"""Hostile object keys against the bundled plugins: nothing in an event (keys with `..`, absolute paths, NUL
bytes, over-long names, odd Unicode, hostile ids) escapes the audit directory or the replication target prefix.

Complements tests/test_audit.py (fixed hostile keys) and tests/test_replication.py (target_key table) with
property-based inputs and the audit plugin's copy-to-store key.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bucketwire_audit as audit
import bucketwire_replication as repl
from bucketwire import PermanentError
from bucketwire.config import StoreConfig
from bucketwire.context import Stores
from bucketwire.envelope import EnvelopeError, Event, valid_unicode
from bucketwire.testing import PluginHarness
from tests.test_fuzz import EXAMPLES, TRICKY

N = min(EXAMPLES, 300) if EXAMPLES <= 150 else EXAMPLES
PROPS = settings(max_examples=N, deadline=None, derandomize=EXAMPLES <= 150,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SEGMENT = st.one_of(st.sampled_from(["..", ".", "", "a", "..a", "a..", "...", "\x00", "%2e%2e", "\\..\\"]),
                    st.text(max_size=12))
HOSTILE_KEY = st.one_of(
    st.lists(SEGMENT, min_size=1, max_size=8).map("/".join),
    TRICKY,
    st.text(min_size=1000, max_size=1200),
    st.text(max_size=30),
)


@PROPS
@given(prefix=st.sampled_from(["", "replica/", "a/b/"]), key=HOSTILE_KEY)
def test_replication_target_key_stays_under_the_prefix(prefix: str, key: str) -> None:
    try:
        out = repl.target_key(prefix, key)
    except PermanentError:
        return
    assert out == prefix + key and out.startswith(prefix)
    assert "\x00" not in out
    assert len(out.encode("utf-8", "surrogatepass")) <= repl.MAX_KEY_BYTES
    # What a path-normalising server would store it as: still under the prefix.
    norm = posixpath.normpath("/" + out)
    assert norm.startswith("/" + prefix.rstrip("/")), (prefix, key, norm)
    assert ".." not in out.split("/") and not out.startswith("/")


def ev(i: int, key: str, ident: str | None = None, **extra: Any) -> Event:
    return Event(
        id=ident or f"evt-{i}", source=extra.pop("source", "test"), type="s3:ObjectCreated:Put", subject=key,
        topic="t", seq=i,
        data={"bucket": extra.pop("bucket", "photos"), "key": key, "size": 1, "etag": "e", "version_id": "",
              "store": "primary", "content_type": "", "user_metadata": {}, "records": [], **extra},
    )


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_audit_hostile_keys_ids_and_buckets_stay_in_the_log(tmp_path: Path) -> None:
    root = tmp_path / "jail"
    logdir = root / "logs"
    counter = iter(range(1, 10**9))

    @PROPS
    @given(key=HOSTILE_KEY, ident=st.one_of(st.none(), HOSTILE_KEY.filter(lambda s: 0 < len(s) <= 256)),
           bucket=HOSTILE_KEY)
    def run(key: str, ident: str | None, bucket: str) -> None:
        # Through the envelope reader, as in a worker: invalid Unicode is refused there, before any plugin.
        try:
            event = Event.from_dict(json.loads(ev(next(counter), key, ident, bucket=bucket).to_json()))
        except EnvelopeError:
            assert not valid_unicode([key, ident, bucket])
            return
        with PluginHarness(audit, settings={"dir": str(logdir)}) as h:
            h.handle(event)

    run()
    files = [f for f in files_under(root) if not f.endswith(("-wal", "-shm"))]
    assert set(files) <= {"logs/audit.log", "logs/audit.log.index.sqlite", "logs/audit.log.lock"} | {
        f for f in files if f.startswith("logs/audit.log.")}, files
    assert all(f.startswith("logs/") and "/" not in f[5:] for f in files), files
    for line in (logdir / "audit.log").read_text().splitlines():
        rec = json.loads(line)
        assert len(rec["key"] or "") <= audit.MAX_KEY_FIELD + 20


class RecordingStore:
    """Stands in for minio.Minio: records where the plugin would write."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, str]] = []

    def put_object(self, bucket: str, key: str, data: Any, length: int, **kw: Any) -> None:
        self.puts.append((bucket, key))


class FakeStores(Stores):
    def __init__(self) -> None:
        super().__init__({"archive": StoreConfig(name="archive", endpoint="127.0.0.1:1")}, "archive")
        self.client = RecordingStore()

    def get(self, name: str | None = None) -> Any:
        return self.client


def test_audit_copy_keys_stay_under_the_prefix(tmp_path: Path) -> None:
    stores = FakeStores()
    keys = ["../../escape", "/etc/passwd", "a\x00b", "x" * 5000, "..", "\u202e.gpj", "%2e%2e/%2e%2e/x"]
    with PluginHarness(audit, settings={"dir": str(tmp_path / "logs"), "store": "archive", "bucket": "audit",
                                        "prefix": "audit/"}, stores=stores) as h:
        for i, k in enumerate(keys):
            h.handle(ev(i, k, ident=k[:256] or "x"))
    assert len(stores.client.puts) == len(keys)
    for bucket, key in stores.client.puts:
        assert bucket == "audit"
        assert key.startswith("audit/") and "/" not in key[len("audit/"):] and ".." not in key
        assert len(key) < 64 and key.isascii()


@pytest.mark.parametrize("prefix", ["../up/", "/abs/", "a/../../b/", "nul\x00/"])
def test_replication_refuses_escaping_prefixes(prefix: str) -> None:
    from bucketwire.config import ConfigError

    with pytest.raises(ConfigError, match="prefix"):
        repl.validate_settings({"target_store": "b", "target_bucket": "x", "prefix": prefix})


@pytest.mark.parametrize("prefix", ["../up/", "a/../../b/", "nul\x00/"])
def test_audit_refuses_escaping_prefixes(prefix: str) -> None:
    from bucketwire.config import ConfigError

    with pytest.raises(ConfigError, match="prefix"):
        audit.validate_settings({"dir": "/tmp/x", "store": "s", "bucket": "b", "prefix": prefix})
