"""Nothing is lost: 20,000 events through two groups while worker children are SIGKILLed at random and the
hub is killed with SIGKILL once mid-stream and restarted. Set BUCKETWIRE_SOAK_EVENTS for a longer run."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

from bucketwire import Event
from tests.fixtures_hub import wait_for

N = int(os.environ.get("BUCKETWIRE_SOAK_EVENTS", "20000"))
CREDIT = 16

CFG = f"""
[groups.g1]
topics = ["load"]
plugins = []
start = "earliest"
credit = {CREDIT}

[groups.g2]
topics = ["load"]
plugins = []
start = "earliest"
credit = {CREDIT}
"""


@pytest.mark.timeout(300)  # waits up to 180 s for both groups to catch up
def test_no_event_lost_across_worker_and_hub_kills(stack_factory):
    s = stack_factory(CFG)
    s.start_hub()
    pools = {"g1": s.start_worker("g1", 2), "g2": s.start_worker("g2", 2)}
    rng = random.Random(1234)
    published = threading.Event()
    errors: list[BaseException] = []

    def publisher() -> None:
        try:
            with s.client(timeout=60) as c:
                for i in range(0, N, 100):
                    c.publish_events([
                        Event(id=f"ev-{n}", source="urn:soak", type="s3:ObjectCreated:Put", topic="load",
                              data={"bucket": "b", "key": f"k{n % 500}", "n": n})
                        for n in range(i, min(N, i + 100))
                    ])
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            published.set()

    t = threading.Thread(target=publisher)
    t.start()
    child_kills = 0
    hub_killed = False
    while not published.is_set():
        time.sleep(rng.uniform(0.05, 0.3))  # pacing: random intervals between injected faults
        head = s.status()["topics"].get("load", {}).get("head", 0) if s.healthy() else 0
        if not hub_killed and head >= N * 0.4:
            s.kill_hub()
            time.sleep(0.5)  # pacing: the hub stays down a while, so publishers and workers retry
            s.start_hub()
            hub_killed = True
            continue
        pool = pools[rng.choice(["g1", "g2"])]
        pids = s.child_pids(pool)
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)
            child_kills += 1
    t.join()
    assert not errors, errors
    assert hub_killed and child_kills >= 3

    def done() -> bool:
        st = s.status()
        return all(st["groups"][g]["lag"] == 0 for g in ("g1", "g2"))

    wait_for(done, 180, "both groups to catch up")
    st = s.status()
    assert st["topics"]["load"]["head"] == N, "every published event committed exactly once"
    rows = s.handled()
    for g in ("g1", "g2"):
        seen = Counter(r["data"]["n"] for r in rows if r["g"] == g)
        missing = set(range(N)) - set(seen)
        assert not missing, f"{g} never handled {len(missing)} events, e.g. {sorted(missing)[:5]}"
        dups = sum(c - 1 for c in seen.values())
        # What can repeat: what was in flight at each child kill, plus at the hub kill what was in flight or
        # acked above the cursor's gap in each group.
        bound = (child_kills + 2 * 2) * CREDIT * 2
        print(f"{g}: {N} events, {dups} duplicates (bound {bound}), {child_kills} child kills, 1 hub kill")
        assert dups <= bound, f"{g}: {dups} duplicates exceeds the in-flight bound {bound}"
    assert len({r["id"] for r in rows}) == N
