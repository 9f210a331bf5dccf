"""A new user's first mistakes on the command line, each one line and a non-zero exit, never a loop or a
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_listen_with_an_invalid_bucket_name_is_one_line(tmp_path: Path) -> None:
    """`--bucket b` (a name S3 refuses) used to retry with backoff forever ("listen on b failed (invalid bucket
    name b); reconnecting in 16.0s"): no retry can make the name valid."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hub]\nwork = "tcp://127.0.0.1:9"\n[stores.m]\nendpoint = "127.0.0.1:9"\n')
    r = subprocess.run([sys.executable, "-m", "bucketwire", "listen", "-c", str(cfg), "--store", "m", "--bucket",
                        "b"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ("Error: --bucket b: invalid bucket name b; S3 bucket names are 3 to 63 characters: "
                        "lower-case letters, digits, '.' and '-'\n"), r.stderr
