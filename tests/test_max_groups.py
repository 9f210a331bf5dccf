"""Groups the config does not name (a `worker --group NAME --topic T` run) are bounded by `[hub] max_groups`: each
group costs every turn of the hub's loop (its retries, refills and dispatch are looked at), and such a group is
made by any key allowed to join groups and kept in the journal. 1,000 of them made every event wait ~1.5 ms more
in the loop; 60,000 (a script READYing names in a loop) would stop it."""

from __future__ import annotations

from collections.abc import Callable

from tests.fixtures_hub import Stack, wait_for

CONFIGURED = """
[groups.keep]
topics = ["k"]
plugins = []
"""


def test_a_group_past_max_groups_is_refused_in_one_line_and_configured_groups_never(
        stack_factory: Callable[..., Stack]) -> None:
    s = stack_factory(CONFIGURED)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                                         "heartbeat_timeout = 1.5\nmax_groups = 2\n"))
    s.start_hub()
    s.start_worker("adhoc1", 1, "--topic", "a1")
    s.start_worker("adhoc2", 1, "--topic", "a2")
    third = s.start_worker("adhoc3", 1, "--topic", "a3", wait=False)
    code = third.wait(60)
    log = s.dump_logs()
    assert code != 0, log
    assert "max_groups" in log and "adhoc3" in log, log
    assert "Traceback" not in log, log
    st = s.status()["groups"]
    assert "adhoc3" not in st and {"adhoc1", "adhoc2", "keep"} <= st.keys(), st
    s.start_worker("keep", 1)  # a configured group is never refused
    with s.client() as c:
        c.publish("a1", {"n": 1})
    wait_for(lambda: any(r["t"] == "a1" and r["g"] == "adhoc1" for r in s.handled()), 30,
             "the ad-hoc groups still work")
