"""Fixtures that start a real SeaweedFS S3 server on loopback.

One `weed mini` per test session (it takes a few seconds to boot), and a fresh bucket per test so tests never
see each other's objects. Tests that need `weed` are skipped with the install hint when the binary is
missing, so a checkout without the `seaweedfs` extra still runs the unit tests.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucketwire.devstack.seaweedfs import WeedError, WeedServer, find_weed

_counter = itertools.count(1)


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[WeedServer]:
    try:
        find_weed()
    except WeedError as e:
        pytest.skip(str(e))
    server = WeedServer(tmp_path_factory.mktemp(name))
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop(timeout=0)  # its files are the session's to throw away: SIGKILL, not a 2-5 s graceful stop


@pytest.fixture(scope="session")
def bucketwire_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """bucketwire's pytest plugin's session server, stopped as `_serve` stops one: the plugin's own fixture stops it
    gracefully, which took 2-10 s (its full timeout after a large object) at the end of every test process."""
    yield from _serve(tmp_path_factory, "bucketwire-s3")


@pytest.fixture(scope="session")
def weed(bucketwire_s3: WeedServer) -> WeedServer:
    """A started SeaweedFS shared by the whole session (the one bucketwire's pytest plugin serves to plugin
    authors' tests, so the suite runs one server, not two)."""
    return bucketwire_s3


@pytest.fixture(scope="session")
def weed2(tmp_path_factory: pytest.TempPathFactory, weed: WeedServer) -> Iterator[WeedServer]:
    """A second, independent SeaweedFS: the remote end for replication across stores."""
    yield from _serve(tmp_path_factory, "weed2")


@pytest.fixture
def bucket(weed: WeedServer) -> Iterator[str]:
    """A new, uniquely named, empty bucket on the session's SeaweedFS."""
    name = f"t{os.getpid()}-{next(_counter)}"
    weed.client().make_bucket(name)
    yield name


def weed_data_dir(server: WeedServer) -> Path:
    """Where a server keeps its files (for tests that inspect the log)."""
    return server.data_dir
