"""Consumer groups against real hub and worker processes: balance, order, fan-out, retries, follow-ons, tail.

Tests taking `hub_stack` run once per journal backend (tests/fixtures_backends.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections import defaultdict

import pytest

from bucketwire import Event
from bucketwire.client import HubRefused
from tests.fixtures_hub import wait_for

GROUPS = """
[topics.jobs]
max_attempts = 3
backoff_base = 0.1
backoff_max = 1.0

[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"

[groups.b]
topics = ["jobs"]
plugins = []
start = "earliest"

[groups.f]
topics = ["follow"]
plugins = []
start = "earliest"
"""


def obj_event(key: str, n: int, **data) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject=key, topic="jobs",
                 data={"bucket": "b", "key": key, "n": n, **data})


def test_balance_per_object_order_and_fan_out(hub_stack):
    s = hub_stack(GROUPS)
    s.start_hub()
    s.start_worker("a", 2)
    s.start_worker("b", 1)
    keys = [f"obj-{k}" for k in range(6)]
    events = [obj_event(keys[i % len(keys)], i, sleep=0.01) for i in range(120)]
    with s.client() as c:
        for i in range(0, len(events), 10):
            c.publish_events(events[i:i + 10])
    wait_for(lambda: len(s.handled()) >= 240, 60, "both groups to handle all events")
    rows = s.handled()
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["g"]].append(r)
    # fan-out: each group sees every event exactly once (no failures, no kills)
    for g in ("a", "b"):
        assert sorted(r["s"] for r in by_group[g]) == list(range(1, 121)), g
    # balance: both children of group a did a fair share
    pids = defaultdict(int)
    for r in by_group["a"]:
        pids[r["pid"]] += 1
    assert len(pids) == 2 and min(pids.values()) >= 20, pids
    # per-object order: for each key, handled in seq order and never two at once
    for g in ("a", "b"):
        per_key = defaultdict(list)
        for r in by_group[g]:
            per_key[r["key"]].append(r)
        for key, rs in per_key.items():
            rs.sort(key=lambda r: r["t0"])
            assert [r["s"] for r in rs] == sorted(r["s"] for r in rs), (g, key)
            for prev, nxt in zip(rs, rs[1:], strict=False):
                assert prev["ts"] <= nxt["t0"], f"{g}/{key}: seq {prev['s']} and {nxt['s']} overlapped"
    st = s.status()["groups"]
    assert st["a"]["lag"] == 0 and st["b"]["lag"] == 0


def test_retry_with_backoff_then_dead_letter(hub_stack):
    s = hub_stack(GROUPS)
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([obj_event("flaky", 0, fail=2), obj_event("doomed", 1, fail=99),
                          obj_event("broken", 2, permanent=True)])
    wait_for(lambda: s.status()["groups"]["a"]["dead_lettered"] == 2, 30, "two dead letters")
    wait_for(lambda: any(r["key"] == "flaky" for r in s.handled()), 10, "flaky event to succeed")
    flaky = [r for r in s.handled() if r["key"] == "flaky"]
    assert [r["a"] for r in flaky] == [3], "succeeded on the third attempt"
    with s.client() as c:
        _, bodies = c.fetch("dead-letter", 1)
    dls = {json.loads(b)["data"]["event"]["data"]["key"]: json.loads(b) for b in bodies}
    assert set(dls) == {"doomed", "broken"}
    doomed = dls["doomed"]["data"]
    assert doomed["attempts"] == 3 and doomed["group"] == "a" and doomed["topic"] == "jobs"
    assert doomed["line"] == "RuntimeError: planned failure 3" and "Traceback" in doomed["error"]
    assert doomed["plugin"] == "recorder"
    assert dls["broken"]["data"]["attempts"] == 1, "PermanentError skips the retries"
    assert "planned permanent failure" in dls["broken"]["data"]["line"]
    # the name a plugin raised it by, not the private module it is defined in (bucketwire.context)
    assert dls["broken"]["data"]["line"].startswith("bucketwire.PermanentError: "), dls["broken"]["data"]["line"]
    assert "bucketwire.context" not in json.dumps(dls["broken"]["data"]), dls["broken"]["data"]
    assert dls["doomed"]["causationid"] == doomed["event"]["id"]
    st = s.status()["groups"]["a"]
    assert st["lag"] == 0 and st["inflight"] == 0, "the originals are acked, not stuck"
    assert st["retried"] >= 4


@pytest.mark.parametrize("backend", ["jetstream"], indirect=True)
def test_a_retrys_backoff_wait_survives_a_failover(hub_stack):
    """With jetstream a failed event's attempt count and the time its retry is due live in the KV bucket: the hub
    that takes the group over (here the same hub, restarted after a SIGKILL) waits out the backoff too, rather
    than retrying at once. (With sqlite both live in the hub's memory: see the README's known limits.)"""
    s = hub_stack(GROUPS.replace("backoff_base = 0.1\nbackoff_max = 1.0", "backoff_base = 3600\nbackoff_max = 3600"))
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([obj_event("later", 0, fail=1)])
        wait_for(lambda: s.status()["groups"]["a"]["retrying"] == 1, 20, "the first attempt failed, the retry waits")
        c.publish_events([obj_event("marker", 1)])  # answered once committed: the failed attempt was committed before
    s.kill_hub()
    s.start_hub()
    with s.client() as c:
        c.publish_events([obj_event("after", 2)])  # handled behind the retry, had it been delivered at once
    wait_for(lambda: any(r["key"] == "after" for r in s.handled()), 30, "the new dispatcher to deliver")

    def settled() -> bool:  # the handler records "after" a moment before its ack reaches the hub
        st = s.status()["groups"]["a"]
        return st["inflight"] == 0 and st["retrying"] == 1

    wait_for(settled, 20, "the ack of 'after', with the retry still waiting")
    st = s.status()["groups"]["a"]
    assert not [r for r in s.handled() if r["key"] == "later"], "retried at once after the failover"
    assert (st["retrying"], st["inflight"], st["lag"]) == (1, 0, 3), st


def test_acks_above_the_cursor_gap_survive_a_hub_crash(hub_stack):
    """One slow event holds the cursor while later events are acked; after a hub SIGKILL those later events are
    not delivered again, because out-of-order acks are committed with the cursor."""
    s = hub_stack(GROUPS)
    s.start_hub()
    s.start_worker("a", 2, "--credit", "1")  # credit 1: the busy child must not hoard fast events
    release = s.dir / "release-slow"  # the slow event holds the cursor at 0 until the test has seen the gap
    with s.client() as c:
        c.publish_events([obj_event("slow", 0, hold=str(release))])
        wait_for(lambda: s.status()["groups"]["a"]["inflight"] == 1, 10, "the slow event taken by a child")
        c.publish_events([obj_event(f"fast-{i}", i, follow=2) for i in range(1, 21)])
    wait_for(lambda: len([r for r in s.handled() if r["key"].startswith("fast")]) == 20, 30, "fast events")
    wait_for(lambda: s.status()["topics"].get("follow", {}).get("head") == 40, 10, "40 follow-ons")
    assert s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 0, "the slow event still holds the cursor"
    s.kill_hub()
    s.start_hub()
    release.touch()
    wait_for(lambda: len([r for r in s.handled() if r["key"] == "slow"]) >= 1, 30, "slow event handled")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 30, "group a caught up")
    fast = [r for r in s.handled() if r["g"] == "a" and r["key"].startswith("fast")]
    assert len(fast) == 20, "acked events above the gap were not redelivered after the crash"
    assert s.status()["topics"]["follow"]["head"] == 40


def test_follow_ons_exactly_once_when_an_event_is_handled_twice(hub_stack):
    """A worker frozen mid-event (SIGSTOP: a GC pause, a partition) is declared lost; another worker handles
    the event and publishes its follow-ons; the frozen one resumes and acks the same follow-ons again.
    They are committed once."""
    import os
    import signal

    s = hub_stack(GROUPS)
    s.start_hub()
    w = s.start_worker("a", 1, "--credit", "1")
    frozen = s.child_pids(w)[0]
    with s.client() as c:
        c.publish_events([obj_event("twice", 0, sleep=1.0, follow=3, mark_start=True)])
    started = s.record.parent / (s.record.name + ".started")
    # Freeze only once the handler runs: an event still queued in the child is dropped when it wakes up
    # (its I/O thread sees the hub went silent, reconnects and discards unstarted work), which is correct.
    wait_for(lambda: started.exists() and started.read_text().startswith(f"{frozen} "), 20, "handler started")
    os.kill(frozen, signal.SIGSTOP)
    try:
        s.start_worker("a", 1, "--credit", "1", wait=False)
        wait_for(lambda: s.status()["groups"]["a"]["redelivered"] >= 1, 20, "redelivery to the second worker")
        wait_for(lambda: any(r["pid"] != frozen for r in s.handled()), 20, "second worker handled it")
    finally:
        os.kill(frozen, signal.SIGCONT)
    wait_for(lambda: len(s.handled()) == 2, 20, "the frozen worker to finish too")
    # its ack (with the same three follow-ons) reaches the hub, which counts it as an ack for a done event
    wait_for(lambda: s.metric("bucketwire_acked_again_total", group="a") >= 1, 20, "the second ack at the hub")
    assert {r["pid"] for r in s.handled()} == {frozen, s.handled()[0]["pid"]} and len(s.handled()) == 2
    st = s.status()
    assert st["topics"]["follow"]["head"] == 3, "three follow-ons, committed once"
    with s.client() as c:
        _, bodies = c.fetch("follow", 1)
    fos = [json.loads(b) for b in bodies]
    assert len({f["id"] for f in fos}) == 3
    assert all(f["hops"] == 1 and f["causationid"] for f in fos)


def test_events_of_two_sources_sharing_an_id_each_keep_their_follow_ons(hub_stack):
    """CloudEvents ids are unique per source only, and the journal keeps both events. Their follow-ons were
    named from the cause's id (and time, group, plugin) without its source, so the second event's follow-ons got
    the first one's ids and the journal dropped them as repeats: a `thumbnail-ready` lost."""
    s = hub_stack(GROUPS)
    s.start_hub()
    s.start_worker("a", 1)
    shared, t = uuid.uuid4().hex, "2026-11-30T10:00:00.000Z"
    events = [Event(id=shared, source=src, type="s3:ObjectCreated:Put", subject=f"{src}-k", topic="jobs",
                    time=t, data={"bucket": "b", "key": f"{src}-k", "follow": 2})
              for src in ("urn:store-one", "urn:store-two")]
    with s.client() as c:
        c.publish_events(events)
    wait_for(lambda: len(s.handled()) == 2, 20, "both events handled")
    wait_for(lambda: s.status()["topics"].get("follow", {}).get("head", 0) >= 4, 20,
             "two follow-ons of each event committed")
    with s.client() as c:
        _, bodies = c.fetch("follow", 1)
    fos = [json.loads(b) for b in bodies]
    assert sorted(int(f["data"]["cause_seq"]) for f in fos) == [1, 1, 2, 2], fos
    assert len({f["id"] for f in fos}) == 4


def test_hop_limit_refuses_a_follow_on_past_max_hops(hub_stack):
    """A follow-on one hop past `max_hops` is not committed: it becomes a refused dead letter, which `dlq retry`
    will not turn into an event; a follow-on at the limit goes through, and the causing events are acked."""
    s = hub_stack(GROUPS)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("heartbeat_timeout = 1.5",
                                                         "heartbeat_timeout = 1.5\nmax_hops = 2"))
    s.start_hub()
    s.start_worker("a", 1)

    def ev(key: str, hops: int) -> Event:
        return Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject=key, topic="jobs",
                     data={"bucket": "b", "key": key, "follow": 1}, hops=hops)

    with s.client() as c:
        c.publish_events([ev("at-limit", 1), ev("past-limit", 2)])
    wait_for(lambda: s.metric("bucketwire_hop_limit_total") == 1, 20, "one follow-on refused by the hop limit")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 20, "both causing events acked")
    with s.client() as c:
        _, follow = c.fetch("follow", 1)
        _, dead = c.fetch("dead-letter", 1)
    assert [json.loads(b)["hops"] for b in follow] == [2], "only the follow-on at the limit is committed"
    assert len(dead) == 1
    dl = json.loads(dead[0])
    assert dl["data"]["refused"] is True and dl["data"]["line"] == "hop limit"
    assert dl["data"]["event"]["hops"] == 3 and dl["data"]["event"]["data"]["cause_seq"] == 2
    p = subprocess.run([sys.executable, "-m", "bucketwire", "dlq", "retry", dl["id"], "-c", str(s.cfg_path)],
                       env=s.env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "a refused follow-on stays refused" in p.stderr, p.stderr
    assert s.status()["topics"]["jobs"]["head"] == 2, "nothing was retried into the topic"


def test_a_plugin_resetting_hops_does_not_get_past_the_hop_limit(hub_stack):
    """The hub counts a follow-on's hops from the event it handed out, not from what the worker says: a plugin
    that set `hops = 0` on the event `ctx.publish` returned made every follow-on look new, and a loop of
    thumbnails of thumbnails went on for ever."""
    s = hub_stack(GROUPS)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("heartbeat_timeout = 1.5",
                                                         "heartbeat_timeout = 1.5\nmax_hops = 2"))
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject="k",
                                topic="jobs", data={"bucket": "b", "key": "k", "follow_reset_hops": True}, hops=2)])
    wait_for(lambda: s.metric("bucketwire_hop_limit_total") == 1, 20, "the follow-on refused by the hop limit")
    with s.client() as c:
        _, follow = c.fetch("follow", 1)
    assert follow == [], "nothing past the limit is committed"

@pytest.mark.parametrize("forge", [False, True])
def test_a_plugin_consuming_its_own_output_is_stopped_by_the_descendant_budget(hub_stack, forge: bool):
    """`max_hops` bounds how deep follow-ons go, not how wide: a plugin that consumes the topic it publishes to,
    three follow-ons per event, made 3^max_hops events from one upload. The hub stamps every follow-on with the
    upload it descends from (`rootsource`, `rootid`: a plugin's own values are replaced) and commits at most
    `max_descendants` of them per upload; the rest are refused dead letters. Another upload has a budget of its
    own."""
    s = hub_stack(GROUPS)
    s.cfg_path.write_text(s.cfg_path.read_text().replace(
        "heartbeat_timeout = 1.5", "heartbeat_timeout = 1.5\nmax_hops = 50\nmax_descendants = 30"))
    s.start_hub()
    s.start_worker("a", 1)
    roots = [Event(id=f"upload-{n}", source="urn:test", type="s3:ObjectCreated:Put", subject=f"u{n}", topic="jobs",
                   data={"bucket": "b", "key": f"u{n}", "fan": 3, "fan_forge": forge}) for n in (1, 2)]
    with s.client() as c:
        c.publish_events(roots[:1])
    wait_for(lambda: s.metric("bucketwire_descendant_limit_total") >= 1, 30, "follow-ons refused by the budget")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 30, "every committed event handled")
    assert s.status()["topics"]["jobs"]["head"] == 1 + 30, "the upload and 30 descendants, no more"
    with s.client() as c:
        c.publish_events(roots[1:])
    wait_for(lambda: s.status()["topics"]["jobs"]["head"] == 2 + 60, 30, "the second upload's own 30")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 30, "every committed event handled")
    assert s.status()["topics"]["jobs"]["head"] == 2 + 60
    with s.client() as c:
        _, bodies = c.fetch("jobs", 1, 100)
        _, dead = c.fetch("dead-letter", 1, 1000)
    evs = [json.loads(b) for b in bodies]
    by_root: dict[tuple[str, str], int] = {}
    for e in evs:
        if e["id"].startswith("upload-"):
            assert "rootid" not in e and "rootsource" not in e, "an upload is its own root"
            continue
        by_root[(e["rootsource"], e["rootid"])] = by_root.get((e["rootsource"], e["rootid"]), 0) + 1
    assert by_root == {("urn:test", "upload-1"): 30, ("urn:test", "upload-2"): 30}
    dls = [json.loads(b) for b in dead]
    assert dls and all(d["data"]["line"] == "descendant limit" and d["data"]["refused"] for d in dls)
    assert {d["data"]["event"]["rootid"] for d in dls} <= {"upload-1", "upload-2"}
    assert "max_descendants" in dls[0]["data"]["error"]


def test_a_publisher_cannot_name_the_upload_an_event_descends_from(hub_stack):
    """`rootsource` and `rootid` are the hub's: a publisher naming another's upload would spend that upload's
    descendant budget with its own events' follow-ons."""
    s = hub_stack(GROUPS)
    s.start_hub()
    ev = Event(id="forger", source="urn:test", type="s3:ObjectCreated:Put", subject="k", topic="jobs",
               data={"bucket": "b", "key": "k"}, extensions={"rootsource": "urn:test", "rootid": "upload-1"})
    with s.client() as c, pytest.raises(HubRefused, match="rootid|rootsource"):
        c.publish_events([ev])
    assert "jobs" not in s.status()["topics"]


def test_worker_killed_mid_event_is_redelivered(stack_factory):
    s = stack_factory(GROUPS)
    s.start_hub()
    w = s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([obj_event("victim", 0, sleep=30)])
    wait_for(lambda: s.status()["groups"]["a"]["inflight"] == 1, 10, "event in flight")
    import os
    import signal
    for pid in s.child_pids(w):
        os.kill(pid, signal.SIGKILL)
    # The supervisor tells the hub the child died running it and restarts the child; the hub redelivers the
    # event (attempt 2) to the replacement.
    st = wait_for(lambda: (g := s.status()["groups"]["a"])["redelivered"] >= 1 and g["inflight"] == 1 and g, 15,
                  "redelivery")
    assert st["lag"] == 1 and st["workers"] == 1
    os.killpg(w.pid, signal.SIGKILL)  # its handler sleeps 30 s: a drain at teardown would wait 15 s for nothing


def test_tail_from_seq_has_no_gap_or_duplicate_at_the_seam(stack_factory):
    s = stack_factory(GROUPS)
    s.start_hub()
    with s.client() as c:
        for i in range(0, 50, 10):
            c.publish_events([obj_event(f"k{j}", j) for j in range(i, i + 10)])
    tail = subprocess.Popen([sys.executable, "-m", "bucketwire", "tail", "-c", str(s.cfg_path), "jobs",
                             "--from-seq", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=s.env)
    lines: list[dict] = []

    def reader() -> None:
        for line in tail.stdout:
            lines.append(json.loads(line))

    threading.Thread(target=reader, daemon=True).start()
    with s.client() as c:
        for i in range(50, 300, 5):  # keep publishing while tail replays and switches to live
            c.publish_events([obj_event(f"k{j}", j) for j in range(i, i + 5)])
        wait_for(lambda: len(lines) >= 300, 30, "tail to print 300 lines")
        # A last event: the tail prints in order, so a duplicate or a stray line would come before it.
        c.publish_events([obj_event("k300", 300)])
    try:
        wait_for(lambda: any(int(e["seq"]) == 301 for e in lines), 30, "tail to print the last event")
    finally:
        tail.terminate()
        tail.wait(10)
    assert [int(e["seq"]) for e in lines] == list(range(1, 302))
    assert [e["data"]["n"] for e in lines] == list(range(301))


def test_new_group_starts_at_head_or_earliest(stack_factory):
    s = stack_factory(GROUPS)
    s.start_hub()
    with s.client() as c:
        c.publish_events([obj_event(f"old-{i}", i) for i in range(5)])
    # The hub has never heard of these groups: they are created by the workers' READY.
    with s.cfg_path.open("a") as f:
        f.write("\n[groups.late]\ntopics = ['jobs']\nplugins = []\n[groups.early]\ntopics = ['jobs']\nplugins = []\n")
    s.start_worker("late", 1, "--topic", "jobs")
    s.start_worker("early", 1, "--topic", "jobs", "--start", "earliest")
    with s.client() as c:
        c.publish_events([obj_event(f"new-{i}", i) for i in range(5, 8)])
    # A last event handled by both groups: each pool is one child handling in order, so anything either group
    # would wrongly handle from before comes before it.
    with s.client() as c:
        c.publish_events([obj_event("last", 8)])
    wait_for(lambda: {r["g"] for r in s.handled() if r["s"] == 9} >= {"late", "early"}, 20, "both new groups")
    got = defaultdict(list)
    for r in s.handled():
        got[r["g"]].append(r["s"])
    assert sorted(got["late"]) == [6, 7, 8, 9], "a new group starts at the head by default"
    assert sorted(got["early"]) == list(range(1, 10)), "--start earliest consumes the history"


def test_supervisor_restarts_a_crashed_child(stack_factory):
    import os
    import signal

    s = stack_factory(GROUPS)
    s.start_hub()
    w = s.start_worker("a", 2)
    before = set(s.child_pids(w))
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(set(s.child_pids(w)) - {victim}) == 2, 20, "a replacement child")
    wait_for(lambda: s.status()["groups"]["a"]["workers"] == 2, 20, "the replacement to join")
    with s.client() as c:
        c.publish_events([obj_event(f"k{i}", i) for i in range(10)])
    wait_for(lambda: len([r for r in s.handled() if r["g"] == "a"]) == 10, 20, "events handled after restart")
    assert victim not in {r["pid"] for r in s.handled()}


def test_webhook_2xx_survives_hub_kill(hub_stack):
    """Every event answered 2xx is in the journal after a SIGKILL of the hub mid-stream."""
    from tests.minio_payloads import body, record

    s = hub_stack("[[routes]]\nevents = ['s3:*']\ntopic = 'jobs'\n")
    s.start_hub()
    ok_ids: list[str] = []
    stop = threading.Event()

    def poster() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                code, resp = s.post("/minio/events", body(record("s3:ObjectCreated:Put", "b", f"k{i}",
                                                                 request_id=f"kill-{i}")))
            except OSError:
                continue
            if code == 200:
                ok_ids.extend(e["id"] for e in resp["events"])

    threads = [threading.Thread(target=poster) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(ok_ids) >= 150, 30, "150 accepted events")
    s.kill_hub()
    stop.set()
    for t in threads:
        t.join()
    s.start_hub()
    with s.client() as c:
        ids = set()
        nxt = 1
        while True:
            meta, bodies = c.fetch("jobs", nxt)
            if not bodies:
                break
            ids.update(json.loads(b)["id"] for b in bodies)
            nxt = meta["next"]
    missing = set(ok_ids) - ids
    assert not missing, f"{len(missing)} events answered 2xx are gone after the kill"
