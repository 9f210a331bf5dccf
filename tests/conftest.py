"""Shared fixtures live in small modules; this file registers them and decides how many processes run the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_hub", "tests.fixtures_backends"]

SUITE_PROCESSES = 3
"""On the 2-core machine the suite is run on, 2 processes kept the CPU half busy (user+sys 599 s in 580 s of wall
time): each waits on real processes most of its time. 3 processes: 425 s, 131% CPU, the same tests passing."""


def _share_ports() -> None:
    """Each test process takes its own share of the ports `free_port` hands out (procutil.free_port), inherited
    by the hubs, pools and stacks it starts."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and count.isdigit() and int(count) > 1:
        os.environ["BUCKETWIRE_PORT_SHARE"] = f"{int(worker[2:]) % int(count)}/{count}"


_share_ports()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): the whole suite in SUITE_PROCESSES processes, since most of its time is
    spent waiting on real hubs, workers, SeaweedFS and NATS, not computing; a run of chosen files or tests in
    this process (0), where more workers would only add their start-up and each its own SeaweedFS.
    BUCKETWIRE_TEST_PROCESSES=N overrides either (0: one process; `-n N` on the command line does too)."""
    forced = os.environ.get("BUCKETWIRE_TEST_PROCESSES")
    if forced is not None:
        return int(forced)
    here = Path(__file__).parent.resolve()
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS or any(
        Path(a).resolve() == here for a in config.args)
    return SUITE_PROCESSES if whole else 0


# Modules whose tests take the longest (--durations of a whole run), longest first. xdist hands tests out in
# collection order (after groups of several, such as "dev-demo"), so a long test collected last runs while the other
# process has nothing left to do: these go first, and the short ones fill in at the end. Order within a module is
# kept. A module missing from the list only runs in its usual place.
SLOW_FIRST = ("test_bench.py", "test_ha_probe.py", "test_ha_crash.py", "test_doctor_cluster.py",
              "test_journal_jetstream.py", "test_revoke.py", "test_plugin_new.py", "test_tail.py",
              "test_nats_cluster.py", "test_ha.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report carries the logs of the hubs and workers it started (the last lines of each):
    a failure that shows once under a loaded CI run is then read from the report, not guessed at."""
    from tests.fixtures_hub import STACKS

    if call.when == "setup":
        STACKS.clear()
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call" and STACKS:
        report.sections.append(("hub and worker logs", "\n".join(
            f"=== {s.dir}\n{s.dump_logs(6000)}" for s in STACKS if s.logs)))
    if call.when == "teardown":
        STACKS.clear()
