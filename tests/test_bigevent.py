"""An event too large to commit is refused alone, on every ingress path and on both journal backends.

Before [hub] max_event_bytes, an event beyond the NATS servers' max_payload failed the whole jetstream commit it
shared with innocent events (all answered 503, and a retrying sender poisoned every batch it landed in); a
follow-on or dead letter that could not commit wedged the hub, as it is carried into every later commit. Real hub
and worker processes; the recorder plugin (tests/plugins/recorder.py) fails or publishes big follow-ons on request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from typing import Any

from bucketwire import Event
from bucketwire.client import EventTooLarge
from bucketwire.config import DEFAULT_MAX_EVENT_BYTES
from bucketwire.envelope import envelope_bytes
from tests.fixtures_hub import Stack, wait_for

CFG = """
[topics.jobs]
max_attempts = 2
backoff_base = 0.05
backoff_max = 0.1

[groups.a]
topics = ["jobs"]
plugins = []
start = "earliest"
credit = 16
"""
LIMIT = DEFAULT_MAX_EVENT_BYTES
BEYOND_NATS = 1_200_000
"""Larger than the NATS servers' default max_payload (1 MiB): what used to fail a whole jetstream commit."""


def job(key: str, pad: int = 0, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="urn:test", type="s3:ObjectCreated:Put", subject=key, topic="jobs",
                 data={"bucket": "b", "key": key, **({"pad": "x" * pad} if pad else {}), **data})


def sized(key: str, size: int, **data: Any) -> Event:
    """A job whose committed envelope is exactly `size` bytes (seq counted at its longest)."""
    ev = job(key, pad=1, **data)
    ev.data["pad"] = "x" * (1 + size - envelope_bytes(ev, "jobs"))
    assert envelope_bytes(ev, "jobs") == size
    return ev


def dead_letters(s: Stack) -> list[tuple[int, dict[str, Any]]]:
    with s.client() as c:
        _, bodies = c.fetch("dead-letter", 1)
    return [(len(b), json.loads(b)) for b in bodies]


def handled_keys(s: Stack) -> set[str]:
    return {r["key"] for r in s.handled()}


def test_an_oversized_event_is_refused_alone_on_webhooks_and_pub(hub_stack: Any) -> None:
    """A webhook request holding one event over the limit is answered 413 naming it, and nothing of it is
    committed; a PUB gets a PUBNACK naming its index. Meanwhile a sender keeps re-publishing an event beyond
    max_payload (as a retrying source would) while small webhooks flow: every small one is answered 200 and
    handled, and the hub stays healthy."""
    s = hub_stack(CFG)
    s.start_hub()
    s.start_worker("a", 1)
    over = sized("over", LIMIT + 1)
    batch = [job("in-refused-request-0"), over, job("in-refused-request-2")]
    code, body = s.post("/events", json.dumps([e.to_dict() for e in batch]).encode(),
                        headers={"Content-Type": "application/cloudevents-batch+json"})
    assert code == 413, body
    assert "event 1" in body["error"] and "max_event_bytes" in body["error"], body
    at_limit = sized("at-limit", LIMIT)
    code, body = s.post("/events", at_limit.to_json(), headers={"Content-Type": "application/cloudevents+json"})
    assert code == 200, body

    stop = threading.Event()
    nacks: list[int] = []

    def hammer() -> None:
        with s.client() as c:
            while not stop.is_set():
                try:
                    c.publish_events([job("pub-small"), job("beyond-nats", pad=BEYOND_NATS)])
                except EventTooLarge as e:
                    nacks.append(e.index)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_for(lambda: len(nacks) >= 1, 20, "the first PUBNACK for the big event")
        codes = []
        for i in range(20):
            code, body = s.post("/events", job(f"small-{i}").to_json(),
                                headers={"Content-Type": "application/cloudevents+json"})
            codes.append((code, body.get("error")))
    finally:
        stop.set()
        t.join(30)
    assert codes == [(200, None)] * 20, codes
    assert set(nacks) == {1}, "the PUBNACK names the big event's index"
    want = {f"small-{i}" for i in range(20)} | {"at-limit"}
    wait_for(lambda: want <= handled_keys(s), 30, "every small event handled")
    assert not handled_keys(s) & {"over", "in-refused-request-0", "in-refused-request-2", "pub-small",
                                  "beyond-nats"}, "nothing of a refused request was committed"
    assert s.healthy()
    assert s.metric("bucketwire_ingress_rejected_total", ingress="cloudevents", reason="too_large") == 1


def test_an_oversized_follow_on_fails_its_cause_not_the_hub(hub_stack: Any) -> None:
    """A plugin publishing a follow-on over the limit gets FollowOnTooLarge from ctx.publish; its event is
    retried and dead-lettered as for any failure. A worker configured with a larger limit than the hub's gets
    its big follow-on refused by the hub (dead-lettered as a refused follow-on, the cause acked). Either way
    the hub keeps committing: a later event is handled."""
    s = hub_stack(CFG)
    s.start_hub()
    s.start_worker("a", 1)
    with s.client() as c:
        c.publish_events([job("big-follow", follow_bytes=BEYOND_NATS)])
    wait_for(lambda: dead_letters(s), 30, "the cause to be dead-lettered")
    (_, dl), = dead_letters(s)
    assert dl["data"]["event"]["data"]["key"] == "big-follow"
    assert dl["data"]["attempts"] == 2, "retried like any failure"
    assert "FollowOnTooLarge" in dl["data"]["line"] and "max_event_bytes" in dl["data"]["line"], dl["data"]["line"]

    lax = s.dir / "lax-worker.toml"  # the worker's config lets it through: the hub is the last line
    lax.write_text(s.cfg_path.read_text().replace("[hub]\n", "[hub]\nmax_event_bytes = 2000000\n", 1))
    s.start_worker("a", 1, cfg_path=lax)
    for w in s.workers[:1]:
        w.terminate()
        w.wait(20)
    wait_for(lambda: s.status()["groups"]["a"]["workers"] == 1, 20, "only the lax worker in group a")
    with s.client() as c:
        c.publish_events([job("backstop", follow_bytes=BEYOND_NATS)])
    wait_for(lambda: len(dead_letters(s)) == 2, 30, "the hub to dead-letter the refused follow-on")
    _, refused = dead_letters(s)[1]
    assert refused["data"]["refused"] is True and refused["data"]["line"] == "too large", refused["data"]
    assert "max_event_bytes" in refused["data"]["error"]
    with s.client() as c:
        c.publish_events([job("after")])
    wait_for(lambda: {"backstop", "after"} <= handled_keys(s), 30, "the cause acked and a later event handled")
    assert s.healthy()


def test_a_near_limit_event_yields_a_dead_letter_that_commits(hub_stack: Any) -> None:
    """A dead letter carries the failed event; for one near the limit that would not fit, so the carried
    envelope gives way to a marker with its attributes (the original stays at the dead letter's topic/seq).
    The dead letter commits, stays within the limit, and the hub goes on. `dlq retry` reads such an original
    from the journal; a retry its extensions would take over the limit is refused with the reason."""
    s = hub_stack(CFG)
    s.start_hub()
    s.start_worker("a", 1)
    # Both too near the limit for a dead letter to carry them: its other fields and its error (the handler's
    # traceback, shorter since the child calls a plugin without pluggy's frames in between) take more room.
    near, mid = sized("near", LIMIT - 100, permanent=True), sized("mid", LIMIT - 500, permanent=True)
    with s.client() as c:
        c.publish_events([near])
        c.publish_events([mid])
    wait_for(lambda: len(dead_letters(s)) == 2, 30, "two dead letters")
    for (n, dl), ev in zip(dead_letters(s), (near, mid), strict=True):
        assert n <= LIMIT, f"dead letter of {n} bytes is over the limit"
        carried = dl["data"]["event"]
        assert "omitted" in carried and carried["id"] == ev.id and carried["bytes"] >= envelope_bytes(ev, "jobs") - 20
        assert dl["data"]["topic"] == "jobs" and isinstance(dl["data"]["seq"], int)
    r = subprocess.run([sys.executable, "-m", "bucketwire", "dlq", "retry", "--all", "-c", str(s.cfg_path)],
                       env=s.env, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "max_event_bytes" in out, out
    wait_for(lambda: len(dead_letters(s)) == 3, 30, "the retried mid event dead-lettered again")
    n, again = dead_letters(s)[2]
    first_seq = dead_letters(s)[1][1]["data"]["seq"]
    assert n <= LIMIT and again["data"]["seq"] > first_seq, "a new event: the retry, read from the journal"
    assert again["data"]["event"]["id"] != mid.id and again["data"]["event"]["bytes"] > envelope_bytes(mid, "jobs")
    with s.client() as c:
        c.publish_events([job("after")])
    wait_for(lambda: "after" in handled_keys(s), 30, "a later event handled")


def test_a_source_drops_an_oversized_event_and_publishes_the_rest(hub_stack: Any) -> None:
    """Sources retry until the hub commits; an event that can never commit would wedge them. It is dropped with
    an error line, and the rest of its batch is committed."""
    from bucketwire.sources import publish_until_acked

    s = hub_stack(CFG)
    s.start_hub()
    events = [job("src-0"), job("src-big", pad=BEYOND_NATS), job("src-2")]
    give_up = threading.Event()
    timer = threading.Timer(20, give_up.set)  # a wedged source would retry forever
    timer.start()
    with s.client() as c:
        res = publish_until_acked(c.publish_events, events, give_up, base=0.05)
        timer.cancel()
        assert res is not None, "the source was still retrying after 20 s"
        assert [r["id"] for r in res] == [e.id for e in events]
        assert "too large" in res[1]["error"] and not res[0].get("error") and not res[2].get("error"), res
        _, bodies = c.fetch("jobs", 1)
    assert [json.loads(b)["data"]["key"] for b in bodies] == ["src-0", "src-2"]


def test_a_limit_above_what_the_journal_stores_is_capped_and_said_once(hub_stack: Any, backend: str) -> None:
    """[hub] max_event_bytes above what the NATS servers take: one warning line at start, and the hub refuses
    (413) what the journal could not store rather than failing commits. With sqlite the configured limit holds."""
    s = hub_stack(CFG)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("[hub]\n", "[hub]\nmax_event_bytes = 2000000\n", 1))
    s.start_hub()
    ev = job("between", pad=BEYOND_NATS)
    logs = s.dump_logs()
    warned = [line for line in logs.splitlines() if "max_event_bytes = 2000000 is more than" in line]
    if backend == "jetstream":
        assert len(warned) == 1, logs
        with s.client() as c:
            try:
                c.publish_events([ev])
                raise AssertionError("an event beyond max_payload was accepted")
            except EventTooLarge as e:
                assert "max_payload" in str(e), e
            c.publish_events([job("small")])
    else:
        assert not warned, logs
        with s.client() as c:
            c.publish_events([ev])
    assert s.healthy()
