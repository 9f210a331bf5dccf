"""Shared fixtures live in small modules; this file registers them and decides how many processes run the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_hub", "tests.fixtures_backends"]

SUITE_PROCESSES = 2


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): the whole suite in SUITE_PROCESSES processes, since most of its time is
    spent waiting on real hubs, workers, SeaweedFS and NATS, not computing; a run of chosen files or tests in
    this process (0), where two workers would only add their start-up and each its own SeaweedFS.
    BUCKETWIRE_TEST_PROCESSES=N overrides either (0: one process; `-n N` on the command line does too)."""
    forced = os.environ.get("BUCKETWIRE_TEST_PROCESSES")
    if forced is not None:
        return int(forced)
    here = Path(__file__).parent.resolve()
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS or any(
        Path(a).resolve() == here for a in config.args)
    return SUITE_PROCESSES if whole else 0
