"""Operations against real hub and worker processes: metrics, status, dead-letter tools, replay, backpressure."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bucketwire import Event
from tests.cloudevents_check import assert_cloudevent
from tests.fixtures_hub import Stack, free_port, wait_for

OPS_PLUGIN = str(Path(__file__).parent / "plugins" / "ops_plugin.py")


def ops_config(tmp: Path, groups: dict[str, dict[str, Any]], slow_groups: tuple[str, ...] = (),
               max_attempts: int = 2) -> str:
    out = f"""
[topics.jobs]
max_attempts = {max_attempts}
backoff_base = 0.05
backoff_max = 0.1

[plugins.opsplug]
path = "{tmp / 'ops.jsonl'}"
fail_flag = "{tmp / 'fail.flag'}"
slow_groups = {json.dumps(list(slow_groups))}
slow = 0.2
"""
    for g, extra in groups.items():
        out += f'\n[groups.{g}]\ntopics = ["jobs"]\nplugins = []\nstart = "earliest"\n'
        for k, v in extra.items():
            out += f"{k} = {json.dumps(v)}\n"
    return out


def records(s: Stack) -> list[dict[str, Any]]:
    p = s.dir / "ops.jsonl"
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def start_worker(s: Stack, group: str, processes: int = 1, *extra: str) -> subprocess.Popen:
    return s.start_worker(group, processes, "--plugin", OPS_PLUGIN, *extra)


def cli(s: Stack, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "bucketwire", *args, "-c", str(s.cfg_path)], env=s.env,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def publish(s: Stack, n: int, **data: Any) -> list[dict]:
    evs = [Event(id=uuid.uuid4().hex, source="urn:ops-test", type="test.job", topic="jobs",
                 data={"n": i, **data}) for i in range(n)]
    out = []
    with s.client() as c:
        for i in range(0, n, 50):
            out += c.publish_events(evs[i:i + 50])
    return out


def metrics(url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def hub_metrics(s: Stack) -> dict[tuple[str, tuple], float]:
    return metrics(f"http://127.0.0.1:{s.http_port}/metrics", s.token)


def value(m: dict, name: str, default: float | None = 0.0, **labels: str) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))), default)


def test_metrics_after_known_workload(hub_stack):
    s = hub_stack()
    wport = free_port()
    s.cfg_path.write_text(s.cfg_path.read_text() + ops_config(s.dir, {"a": {"metrics": f"127.0.0.1:{wport}"}}))
    s.start_hub()
    start_worker(s, "a", 2)
    publish(s, 18)
    publish(s, 2, permanent=True)  # the recorder plugin raises PermanentError: dead-lettered at once
    wait_for(lambda: len(records(s)) >= 18, 30, "18 handled")
    # gauges are refreshed by the hub loop every heartbeat, without anyone asking for status

    def settled() -> dict | None:
        m = hub_metrics(s)
        ok = (value(m, "bucketwire_group_cursor_seq", group="a", topic="jobs") == 20
              and value(m, "bucketwire_group_lag", None, group="a", topic="jobs") == 0
              and value(m, "bucketwire_dead_lettered_total", group="a") == 2)
        return m if ok else None

    m = wait_for(settled, 20, "lag 0 and 2 dead letters in the hub metrics")
    assert value(m, "bucketwire_events_received_total", source="zmq", topic="jobs") == 20
    assert value(m, "bucketwire_events_received_total", source="zmq", topic="dead-letter") == 0
    assert value(m, "bucketwire_group_cursor_seq", group="a", topic="jobs") == 20
    assert value(m, "bucketwire_topic_head_seq", topic="jobs") == 20
    assert value(m, "bucketwire_topic_head_seq", topic="dead-letter") == 2
    assert value(m, "bucketwire_acked_total", group="a") == 18
    assert value(m, "bucketwire_journal_commits_total") >= 1
    assert value(m, "bucketwire_journal_commit_seconds_count") == value(m, "bucketwire_journal_commits_total")
    assert value(m, "bucketwire_journal_available") == 1
    assert value(m, "bucketwire_group_workers", group="a") == 2
    assert value(m, "bucketwire_group_credit", group="a") == 32
    assert value(m, "bucketwire_dispatch_batches_total", group="a") >= 1
    assert value(m, "bucketwire_zmq_connection_events_total", socket="work", event="accepted") >= 3
    assert value(m, "bucketwire_zmq_peers", socket="work") >= 2
    # the worker supervisor's own endpoint aggregates its children (prometheus multiprocess mode)
    def worker_settled() -> dict | None:
        w = metrics(f"http://127.0.0.1:{wport}/metrics")
        ok = value(w, "bucketwire_worker_events_total", group="a", topic="jobs", outcome="ok") == 18
        return w if ok else None

    w = wait_for(worker_settled, 20, "worker metrics")
    assert value(w, "bucketwire_worker_events_total", group="a", topic="jobs", outcome="failed") == 2
    # one observation per call of the plugin's handler (it also runs for the two that the recorder then fails)
    assert value(w, "bucketwire_worker_handler_seconds_count", group="a", plugin="opsplug") == len(records(s))
    assert value(w, "bucketwire_worker_handler_seconds_count", group="a", plugin="recorder") == 20
    assert value(w, "bucketwire_worker_hook_errors_total", group="a", plugin="recorder") == 2
    assert value(w, "bucketwire_worker_children", group="a") == 2
    assert value(w, "bucketwire_worker_credit", group="a") == 32
    # the same numbers in `status --json` and the text table, with the backend and who dispatches the group
    st = json.loads(cli(s, "status", "--json").stdout)
    assert st["hub"]["backend"] == s.backend
    assert st["groups"]["a"]["topics"]["jobs"] == {"cursor": 20, "head": 20, "lag": 0}
    assert (st["groups"]["a"]["dead_lettered"], st["groups"]["a"]["workers"]) == (2, 2)
    text = cli(s, "status").stdout
    assert re.search(r"^a\s+idle\s+jobs\s+20\s+20\s+0\s+0\s+2\s", text, re.M), text
    assert (f"group a: 2 dead-lettered so far; those still waiting: `bucketwire dlq list -c {s.cfg_path} "
            "--group a`") in text
    if s.backend == "jetstream":
        assert st["dispatch"]["a"] == {"leader": s.cfg.hub.id, "endpoint": s.cfg.hub.advertise,
                                       "role": "dispatching"}
        row = rf"^a\s+{re.escape(s.cfg.hub.id)}\s+{re.escape(s.cfg.hub.advertise)}\s+dispatching$"
        assert re.search(row, text, re.M) and f"this hub: {s.cfg.hub.id}" in text, text
    else:
        assert "dispatch" not in st and "DISPATCHED-BY" not in text


def test_status_json_with_a_stopped_worker(stack_factory):
    s = stack_factory()
    s.cfg_path.write_text(s.cfg_path.read_text() + ops_config(s.dir, {"a": {"credit": 4}}, slow_groups=("a",)))
    s.start_hub()
    w = start_worker(s, "a", 1)
    publish(s, 10)
    wait_for(lambda: s.status()["groups"]["a"]["inflight"] >= 4, 10, "events in flight")
    os.killpg(w.pid, signal.SIGKILL)
    w.wait(5)
    publish(s, 5)
    st = json.loads(cli(s, "status", "--json").stdout)
    g = st["groups"]["a"]
    assert g["topics"]["jobs"]["head"] == 15 and g["lag"] >= 11
    if g["workers"] == 1:  # until the heartbeat timeout, the silent worker keeps what it held (no race on timing)
        assert g["inflight"] >= 4
    after = wait_for(lambda: (lambda x: x if x["workers"] == 0 else None)(
        json.loads(cli(s, "status", "--json").stdout)["groups"]["a"]), 10, "the worker to be declared lost")
    assert after["inflight"] == 0 and after["redelivered"] >= 4
    assert after["lag"] >= g["lag"]
    st = wait_for(lambda: (lambda x: x if x["groups"]["a"]["state"] == "stalled" else None)(
        json.loads(cli(s, "status", "--json").stdout)), 10, "state stalled")
    publish(s, 5)
    st2 = json.loads(cli(s, "status", "--json").stdout)
    assert st2["groups"]["a"]["lag"] == st["groups"]["a"]["lag"] + 5  # lag keeps growing with no workers
    assert st2["topics"]["jobs"]["head"] == 20
    table = cli(s, "status").stdout
    assert "stalled" in table and f"bucketwire worker -c {s.cfg_path} --group a" in table
    # a new worker drains the backlog, redelivered events included (without the 0.2 s per event that kept
    # events in flight above: its own config leaves group a out of slow_groups, or draining 20 takes 4 s)
    quick = s.dir / "quick.toml"
    quick.write_text(s.cfg_path.read_text().replace('slow_groups = ["a"]', "slow_groups = []"))
    assert quick.read_text() != s.cfg_path.read_text()
    s.start_worker("a", 1, "--plugin", OPS_PLUGIN, cfg_path=quick)
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 30, "lag back to 0")


def test_dlq_list_retry_purge(hub_stack):
    s = hub_stack()
    s.cfg_path.write_text(s.cfg_path.read_text() + ops_config(s.dir, {"a": {}, "b": {}}))
    flag = s.dir / "fail.flag"
    flag.write_text("x")
    s.start_hub()
    start_worker(s, "a", 1)
    start_worker(s, "b", 1)
    first = publish(s, 1, flaky="a", which="retry-me")[0]
    publish(s, 1, flaky="a", which="purge-me")
    wait_for(lambda: s.status()["groups"]["a"]["dead_lettered"] == 2, 20, "two dead letters in group a")
    wait_for(lambda: len([r for r in records(s) if r["g"] == "b"]) == 2, 20, "group b handled both")
    listed = dlq_json(s)
    assert [d["event"]["data"]["group"] for d in listed] == ["a", "a"]
    listed.sort(key=lambda d: d["event"]["data"]["event"]["id"] != first["id"])  # the retry-me one first
    dl1 = listed[0]["event"]
    assert dl1["data"]["attempts"] == 2 and "flaky" in dl1["data"]["line"]
    listing = cli(s, "dlq", "list")
    table = listing.stdout
    assert "jobs:1" in table and "jobs:2" in table and "waiting" in table
    # its hint runs pasted as printed: it named no config (`Error: no config file given`)
    assert f"`bucketwire dlq show -c {s.cfg_path} ID`" in listing.stderr, listing.stderr
    shown = json.loads(cli(s, "dlq", "show", dl1["id"][:10]).stdout)
    assert set(shown) == {"dead_letter", "event"} and shown["dead_letter"]["history"] == []
    assert_cloudevent(shown["event"])
    assert shown["event"]["data"]["event"]["id"] == first["id"]
    # retried while the plugin still fails: a second dead letter, for the retried event
    assert "retried 1" in cli(s, "dlq", "retry", first["id"]).stdout  # by the original event's id
    again = wait_for(lambda: [d for d in dlq_json(s) if d["event"]["data"]["event"].get("retryof") == first["id"]],
                     20, "the retried event to be dead-lettered again")[0]
    assert again["event"]["data"]["event"]["retries"] == 1
    assert again["dead_letter"]["history"] == [{
        "deadletter": dl1["id"], "dlseq": int(dl1["seq"]), "group": "a", "seq": 1, "attempts": 2,
        "error": dl1["data"]["line"], "plugin": "opsplug", "at": dl1["time"]}]
    flag.unlink()
    assert "retried 1" in cli(s, "dlq", "retry", again["event"]["id"]).stdout
    retried = wait_for(lambda: [x for x in records(s) if x["g"] == "a"], 20, "group a handled the retry")
    assert len(retried) == 1 and retried[0]["data"]["which"] == "retry-me"
    ext = retried[0]["ext"]
    assert (ext["targetgroup"], ext["retryof"], ext["retries"], ext["retrydeadletter"]) == (
        "a", first["id"], 2, again["event"]["id"])
    with s.client() as c:  # the retried event as it sits in the journal is a valid CloudEvent
        _, bodies = c.fetch("jobs", retried[0]["s"])
    ce = assert_cloudevent(bodies[0])
    assert ce.get_extension("retries") == 2 and ce.get_extension("retrydeadletter") == again["event"]["id"]
    # purge the other one by its seq on the dead-letter topic
    assert "purged 1" in cli(s, "dlq", "purge", str(listed[1]["dead_letter"]["seq"])).stdout
    assert "no dead letters waiting" in cli(s, "dlq", "list").stdout
    everything = dlq_json(s, "--all")
    assert sorted(d["dead_letter"]["action"] for d in everything) == ["purged", "retried", "retried"]
    # idempotent: nothing is waiting, and group b never saw the retried event
    assert "nothing to retry" in cli(s, "dlq", "retry", "--all").stderr
    # An id that names no waiting dead letter (a typo, or one handled already) is an error, and nothing is done:
    # it said "nothing to retry" and exited 0, so a script took a typo for success.
    typo = cli(s, "dlq", "retry", "no-such-dead-letter", check=False)
    assert typo.returncode == 1 and "no waiting dead letter matches no-such-dead-letter" in typo.stderr, typo
    twice = cli(s, "dlq", "purge", first["id"], check=False)
    assert twice.returncode == 1 and "nothing was purged (already retried or purged" in twice.stderr, twice
    wait_for(lambda: s.status()["groups"]["b"]["lag"] == 0, 10, "group b skipped the retry")
    assert len([x for x in records(s) if x["g"] == "b"]) == 2
    assert cli(s, "dlq", "purge", check=False).returncode != 0  # purge needs a selection


def dlq_json(s: Stack, *args: str) -> list[dict[str, Any]]:
    """`dlq list --json`, each line checked: the dead letter's envelope is a CloudEvent, the state beside it."""
    out = [json.loads(x) for x in cli(s, "dlq", "list", "--json", *args).stdout.splitlines()]
    for rec in out:
        assert set(rec) == {"dead_letter", "event"}
        assert_cloudevent(rec["event"])
    return out


def test_replay_from_seq_redelivers_exactly_from_there(hub_stack):
    s = hub_stack()
    s.cfg_path.write_text(s.cfg_path.read_text() + ops_config(s.dir, {"a": {}, "b": {}}))
    s.start_hub()
    start_worker(s, "a", 1)
    start_worker(s, "b", 1)
    publish(s, 10)
    wait_for(lambda: len(records(s)) == 20, 20, "both groups handled 10")
    # handled is not yet acked: the replay's "cursor 10 -> 3" needs group a's last ack committed first
    wait_for(lambda: s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 10, 20, "group a's acks committed")
    r = cli(s, "replay", "--group", "a", "--from-seq", "4", "--timeout", "30")
    assert "cursor 10 -> 3" in r.stderr
    wait_for(lambda: len(records(s)) >= 27, 20, "7 redelivered")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 10, "group a caught up")
    recs = records(s)
    again = [x["s"] for x in recs[20:]]
    assert sorted(again) == list(range(4, 11)) and {x["g"] for x in recs[20:]} == {"a"}
    assert s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 10
    # --since: from the first event committed at or after a time; the events before it are not delivered again
    mark = time.time()
    publish(s, 3)
    wait_for(lambda: len(records(s)) == 33, 20, "both groups handled the 3 new events")
    wait_for(lambda: s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 13, 20, "group a's acks committed")
    since = datetime.fromtimestamp(mark, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    r = cli(s, "replay", "--group", "a", "--since", since, "--timeout", "30")
    assert "cursor 13 -> 10" in r.stderr
    wait_for(lambda: len(records(s)) >= 36, 20, "3 redelivered")
    wait_for(lambda: s.status()["groups"]["a"]["lag"] == 0, 10, "group a caught up again")
    assert sorted(x["s"] for x in records(s)[33:]) == [11, 12, 13] and {x["g"] for x in records(s)[33:]} == {"a"}
    r = cli(s, "replay", "--group", "nope", "--from-seq", "1", check=False)
    assert r.returncode != 0 and "unknown group" in r.stderr


def test_slow_group_does_not_slow_fast_group_or_ingress(stack_factory):
    s = stack_factory()
    s.cfg_path.write_text(s.cfg_path.read_text() + ops_config(
        s.dir, {"fast": {"credit": 16}, "slow": {"credit": 1}}, slow_groups=("slow",)))
    s.start_hub()
    start_worker(s, "fast", 1)
    start_worker(s, "slow", 1)
    res = publish(s, 300)
    assert len(res) == 300 and all(r["seq"] for r in res)  # ingress committed everything
    wait_for(lambda: Counter(r["g"] for r in records(s))["fast"] == 300, 30, "fast group handled all 300")
    by = Counter(r["g"] for r in records(s))
    assert by["slow"] < 150, by  # 0.2 s per event: the slow group is far behind, and nobody waited for it
    st = s.status()
    assert st["groups"]["fast"]["lag"] == 0
    assert st["groups"]["slow"]["lag"] >= 150
    assert st["groups"]["slow"]["credit_free"] == 0
    st = wait_for(lambda: (lambda x: x if x["groups"]["slow"]["state"] == "saturated" else None)(s.status()), 10,
                  "slow group reported saturated")
    m = hub_metrics(s)
    assert value(m, "bucketwire_group_state", group="slow", state="saturated") == 1
    assert value(m, "bucketwire_group_lag", group="slow", topic="jobs") >= 100


def test_journal_full_answers_503_and_recovers(stack_factory):
    """A full journal answers 503 and changes nothing; once space returns the hub commits again by itself, with
    no restart. Here space returns the way a running hub frees it: its retention (`retention_mb`, smaller than the
    "disk") drops the oldest events, run at once when commits fail rather than at its next minute."""
    s = stack_factory()
    s.env["BUCKETWIRE_JOURNAL_MAX_PAGES"] = "60"  # a "disk" of 60 pages (240 KiB)
    s.env["BUCKETWIRE_RETENTION_WHILE_FAILING"] = "0.5"  # the retention run that frees space: within 0.5 s, not 5
    s.cfg_path.write_text(s.cfg_path.read_text().replace("heartbeat_timeout = 1.5\n",
                                                         "heartbeat_timeout = 1.5\nretention_mb = 0.1\n"))
    s.start_hub()
    blob = "x" * 3000
    codes = []
    for i in range(200):
        ev = {"specversion": "1.0", "id": f"e{i}", "source": "urn:full", "type": "test.big", "topic": "big",
              "data": {"blob": blob}}
        code, _ = s.post("/events", json.dumps(ev).encode(), headers={"Content-Type": "application/json"})
        codes.append(code)
        if code == 503:
            break
    assert codes[0] == 200 and codes[-1] == 503, codes
    m = hub_metrics(s)
    assert value(m, "bucketwire_journal_commit_failures_total") >= 1
    assert value(m, "bucketwire_retention_dropped_total") in (None, 0), "retention ran before the journal was full"
    ev = {"specversion": "1.0", "id": "after", "source": "urn:full", "type": "test.big", "topic": "big",
          "data": {"blob": blob}}  # as large as the event that found the journal full
    answers = []

    def commits() -> bool:
        code, body = s.post("/events", json.dumps(ev).encode(), headers={"Content-Type": "application/json"})
        answers.append((code, body))
        return code == 200

    wait_for(commits, 20, "the hub to commit again once retention freed space")
    assert s.status()["hub"]["journal_ok"] is True
    assert value(hub_metrics(s), "bucketwire_retention_dropped_total") >= 1
    wait_for(s.healthy, 15, "/healthz to answer 200 again (its write probe runs every 5 s)")
    assert all(code == 503 for code, _ in answers[:-1]), answers


def test_status_text_names_each_groups_dispatcher_on_a_standby() -> None:
    """On a hub that dispatches nothing (jetstream, another hub holds the leases) the text status says who does."""
    from bucketwire.commands.ops import render_status

    text = render_status({"hub": {"id": "hubB", "backend": "jetstream"}, "groups": {}, "topics": {},
                          "dispatch": {"g": {"leader": "hubA", "endpoint": "tcp://10.0.0.1:5556", "role": "standby"},
                                       "h": {"leader": None, "endpoint": None, "role": "standby"}}})
    assert "this hub: hubB" in text
    assert re.search(r"^g\s+hubA\s+tcp://10\.0\.0\.1:5556\s+standby$", text, re.M), text
    assert re.search(r"^h\s+nobody \(lease free\)\s+-\s+standby$", text, re.M), text
    assert "DISPATCHED-BY" not in render_status({"hub": {}, "groups": {}, "topics": {}})


def test_status_text_says_how_old_its_reading_of_the_leases_is() -> None:
    """The hub reads the leases every second off its loop and answers status with the last reading: the text says
    when that reading is stale (the lease bucket does not answer), and `unknown` before the first one."""
    from bucketwire.commands.ops import render_status

    def text(age: float | None) -> str:
        return render_status({"hub": {"id": "hubB", "backend": "jetstream", "leases_age": age}, "groups": {},
                              "topics": {}, "dispatch": {"h": {"leader": None, "endpoint": None, "role": "standby"}}})

    assert "leases as read" not in text(0.4) and re.search(r"^h\s+nobody \(lease free\)", text(0.4), re.M)
    stale = text(12.5)
    assert "this hub: hubB; other hubs' leases as read 12s ago (the NATS lease bucket does not answer now)" in stale
    assert re.search(r"^h\s+unknown \(leases not read yet\)\s+-\s+standby$", text(None), re.M), text(None)


def test_status_hints_are_commands_that_run_as_printed() -> None:
    """`status -c CONFIG` said "start `bucketwire worker --group g`": pasted, that stops at "no config file given"."""
    from bucketwire.commands.ops import render_status

    st = {"hub": {}, "topics": {"t": {"head": 5}},
          "groups": {"g": {"state": "stalled", "lag": 5, "dead_lettered": 2, "topics": {}}}}
    text = render_status(st, config_path="/etc/my bw.toml")
    assert "start `bucketwire worker -c '/etc/my bw.toml' --group g`" in text, text
    assert "`bucketwire dlq list -c '/etc/my bw.toml' --group g`" in text, text


def test_replay_of_a_group_with_no_worker_says_what_it_waits_for(stack_factory):
    """`replay` waits (with a progress bar) until the group caught up; with no worker of the group connected that
    was forever, under the bar's label alone: a new user took the hub for hung. It now says in one line that no
    worker is connected and that the replay stands, and finishes once a worker has caught up."""
    s = stack_factory()
    s.start_hub()
    w = s.start_worker("adhoc", 1, "--topic", "jobs")
    publish(s, 3)
    wait_for(lambda: s.status()["groups"]["adhoc"]["topics"]["jobs"]["cursor"] == 3, 20, "the acks committed")
    w.send_signal(signal.SIGTERM)
    assert w.wait(20) == 0
    wait_for(lambda: s.status()["groups"]["adhoc"]["workers"] == 0, 20, "the worker gone")
    err = s.dir / "replay.err"
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", "replay", "-c", str(s.cfg_path), "--group", "adhoc",
                          "--from-seq", "1"], env=s.env, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    try:
        wait_for(lambda: "no worker of group 'adhoc' is connected" in err.read_text(), 20, "the replay to say why")
        s.start_worker("adhoc", 1, "--topic", "jobs")
        assert p.wait(30) == 0, err.read_text()
    finally:
        if p.poll() is None:
            p.kill()
    lines = [x for x in err.read_text().splitlines() if "no worker" in x]
    assert len(lines) == 1 and "--no-wait" in lines[0] and "Traceback" not in err.read_text(), err.read_text()


def test_status_hint_for_a_stalled_group_not_in_the_config_runs_as_printed(stack_factory):
    """`! group G: ... start `bucketwire worker -c CONFIG --group G`` for a group a worker made with --topic: that
    command, pasted, is refused (`group 'G' is not in the config and no --plugin was given`)."""
    s = stack_factory()
    s.start_hub()
    w = s.start_worker("adhoc", 1, "--topic", "jobs")
    w.send_signal(signal.SIGTERM)
    assert w.wait(20) == 0
    publish(s, 1)
    wait_for(lambda: s.status()["groups"]["adhoc"]["state"] == "stalled", 20, "the group to stall")
    hint = next(x for x in cli(s, "status").stdout.splitlines() if x.startswith("! group adhoc"))
    assert "--group adhoc --topic jobs --plugin" in hint, hint


def test_status_text_with_tens_of_thousands_of_topics_shows_the_consumed_and_busiest_and_counts_the_rest() -> None:
    """It printed a table row per topic: 60,000 lines for a hub with 60,000 topics."""
    from bucketwire.commands.ops import TOPIC_ROWS, render_status

    topics = {f"t{i:05d}": {"head": 1, "rate": 0.0} for i in range(60_000)}
    topics["t59999"]["rate"] = 9.5  # the busiest, last by name
    group = {"topics": {"t30000": {"cursor": 1, "head": 1, "lag": 0}}, "inflight": 0, "workers": 1,
             "retrying": 0, "dead_lettered": 0, "state": "idle"}
    text = render_status({"hub": {}, "groups": {"g": group}, "topics": topics})
    rows = [ln for ln in text.splitlines() if re.match(r"^t\d{5}\s", ln)]
    assert len(rows) == TOPIC_ROWS, len(rows)
    assert rows[0].startswith("t00000") and any(r.startswith("t30000") for r in rows), "consumed topics shown"
    assert any(r.startswith("t59999") and "9.5" in r for r in rows), "the busiest shown"
    assert f"and {60_000 - TOPIC_ROWS:,} more topics (status --json lists every one)" in text


def test_a_replay_waiting_for_in_flight_events_survives_a_hub_restart(stack_factory, tmp_path):
    """A replay of a topic with an event in flight waits for it (`pending`, status `replaying`), and `replay
    --no-wait` returns at once: the operator's act was recorded only in the hub's memory, so a hub restart in
    that window (an upgrade, a crash; a handler may hold it for handler_timeout) forgot it, and the group never
    handled those events again. The new cursor is stored at once; the hub still waits for the in-flight events
    before it hands the topic out again."""
    s = stack_factory('[groups.a]\ntopics = ["jobs"]\nplugins = []\nstart = "earliest"\n')
    s.start_hub()
    s.start_worker("a", 1)

    def job(key: str, **data: Any) -> Event:
        return Event(id=uuid.uuid4().hex, source="urn:t", type="s3:ObjectCreated:Put", topic="jobs",
                     data={"bucket": "b", "key": key, **data})

    with s.client() as c:
        c.publish_events([job(f"k{i}") for i in range(3)])
    wait_for(lambda: s.status()["groups"]["a"]["topics"]["jobs"]["cursor"] == 3, 20, "the three acked and stored")
    release = tmp_path / "release"
    with s.client() as c:
        c.publish_events([job("slow", mark_start=True, hold=str(release))])
    started = s.record.with_name(s.record.name + ".started")
    wait_for(lambda: started.exists() and started.read_text().strip(), 20, "the slow handler to start")
    r = cli(s, "replay", "--group", "a", "--from-seq", "1", "--no-wait")
    assert "pending" in r.stderr, r.stderr
    s.kill_hub(signal.SIGTERM)  # a clean stop: it writes every pending ack before it exits
    s.start_hub()
    release.touch()
    wait_for(lambda: sorted(r["key"] for r in s.handled() if r["key"].startswith("k")) == ["k0", "k0", "k1", "k1",
                                                                                         "k2", "k2"]
             and s.status()["groups"]["a"]["lag"] == 0, 30, "the replay to deliver k0-k2 again")


def test_status_text_reads_a_long_running_handler_without_its_numbers() -> None:
    """A hub from before heartbeats' `run` numbers were checked reported a NaN age or timeout as null, and the
    text status died on it with a traceback (`None >= float`) for every operator. It shows `-` instead."""
    from bucketwire.commands.ops import render_status

    run = {"id": "e1", "topic": "x", "seq": 1, "key": "b/k", "age": None, "timeout": None, "attempt": 1,
           "host": "h", "pid": 1}
    g = {"topics": {"x": {"cursor": 0, "head": 1, "lag": 1}}, "lag": 1, "inflight": 1, "workers": 1,
         "retrying": 0, "dead_lettered": 0, "long_running": [run]}
    text = render_status({"hub": {}, "groups": {"g": g}, "topics": {}})
    assert "handler running for - (handler_timeout -) on x:1" in text, text


def test_a_dead_letter_seq_that_two_dead_letter_topics_hold_is_refused_not_acted_on_twice(stack_factory):
    """With a topic of its own dead-letter topic, seq 1 exists on two of them: `dlq purge 1` purged (and `retry 1`
    retried) both, where the operator meant one, and said `purged 2` as success. Now an ID that names dead
    letters on more than one dead-letter topic is refused in one line naming them, nothing done; `TOPIC:SEQ` from
    the list picks one. The list is oldest first across dead-letter topics, as it says (it went topic by topic)."""
    s = stack_factory("""
[topics.jobs]
max_attempts = 1

[topics.other]
max_attempts = 1
dead_letter = "dl-other"

[plugins.opsplug]
path = "S_DIR/ops.jsonl"
fail_flag = "S_DIR/fail.flag"

[groups.a]
topics = ["jobs", "other"]
plugins = []
start = "earliest"
""")
    s.cfg_path.write_text(s.cfg_path.read_text().replace("S_DIR", str(s.dir)))
    (s.dir / "fail.flag").write_text("x")
    s.start_hub()
    start_worker(s, "a", 1)
    with s.client() as c:
        c.publish("other", {"flaky": "a", "which": "older"})  # dl-other:1, the older dead letter
        wait_for(lambda: s.status()["groups"]["a"]["dead_lettered"] == 1, 20, "the first dead letter")
        c.publish("jobs", {"flaky": "a", "which": "newer"})  # dead-letter:1
    wait_for(lambda: s.status()["groups"]["a"]["dead_lettered"] == 2, 20, "two dead letters")
    listed = dlq_json(s)
    assert [(d["dead_letter"]["topic"], d["dead_letter"]["seq"]) for d in listed] == [
        ("dl-other", 1), ("dead-letter", 1)], "oldest first, across dead-letter topics"
    for action in ("purge", "retry"):
        p = cli(s, "dlq", action, "1", check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (action, p.returncode, p.stdout, p.stderr)
        assert "dead-letter:1" in lines[0] and "dl-other:1" in lines[0] and "Traceback" not in p.stderr, lines
        assert [d["dead_letter"]["handled"] for d in dlq_json(s, "--all")] == [False, False], "nothing done"
    assert "purged 1" in cli(s, "dlq", "purge", "dl-other:1").stdout
    left = dlq_json(s)
    assert [(d["dead_letter"]["topic"], d["dead_letter"]["seq"]) for d in left] == [("dead-letter", 1)]
    # one waiting dead letter left with seq 1: the bare seq names it alone now
    assert "purged 1" in cli(s, "dlq", "purge", "1").stdout
    assert dlq_json(s) == []


@pytest.mark.parametrize("consumed", [False, True], ids=["unconsumed", "consumed"])
def test_dead_letters_of_a_renamed_dead_letter_topic_stay_listed_and_retryable(hub_stack: Any,
                                                                                consumed: bool) -> None:
    """`[hub] dead_letter` renamed in the config: the dead letters already on the old topic stay in the journal,
    but `dlq list` read only the topics the config names ("no dead letters waiting") and `dlq retry ID` said no
    waiting dead letter matches. Now the dlq commands also read the dead-letter topics the journal holds, and say
    in one line which ones the config no longer names. `consumed`: a group (an alerting one, say) still consumes
    the old topic, and no dead letter of it was ever retried or purged (no `.handled` markers): topics groups
    consume were skipped, so its dead letters were found only by an operator who passed `--dlq-topic` with the
    old name. Now consumed topics are looked into too (those the key may read)."""
    alerts = '\n[groups.alerts]\ntopics = ["dead-letter"]\nplugins = []\nstart = "earliest"\n' if consumed else ""
    s = hub_stack(ops_config(Path("S_DIR"), {"a": {}}, max_attempts=1) + alerts)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("S_DIR", str(s.dir)))
    (s.dir / "fail.flag").write_text("x")
    s.start_hub()
    start_worker(s, "a", 1)
    publish(s, 1, flaky="a", which="old-dl")
    wait_for(lambda: s.status()["groups"]["a"]["dead_lettered"] == 1, 20, "one dead letter")
    s.kill_hub(signal.SIGTERM)
    s.cfg_path.write_text(s.cfg_path.read_text().replace("[hub]\n", '[hub]\ndead_letter = "dlq-v2"\n', 1))
    s.start_hub()
    assert ("dead-letter" in s.status()["groups"].get("alerts", {}).get("topics", {})) == consumed
    listing = cli(s, "dlq", "list")
    assert "dead-letter:1" in listing.stdout and "waiting" in listing.stdout, listing.stdout + listing.stderr
    note = [line for line in listing.stderr.splitlines() if "no longer names" in line]
    assert len(note) == 1 and "dead-letter" in note[0], listing.stderr
    (s.dir / "fail.flag").unlink()
    assert "retried 1" in cli(s, "dlq", "retry", "dead-letter:1").stdout
    wait_for(lambda: [r for r in records(s) if r["g"] == "a"], 20, "group a handled the retried event")
    assert dlq_json(s) == [] and len(dlq_json(s, "--all")) == 1


def test_status_watch_rides_out_a_hub_restart(stack_factory: Any, tmp_path: Path) -> None:
    """`status --watch` is the dashboard an operator keeps open while restarting the hub: it ended at the first
    refresh the hub missed (`Error: no answer from the hub`, exit 1) and had to be started again, where `tail`
    waits. It says once that the hub does not answer, keeps asking every interval, and goes on when it is back."""
    s = stack_factory("[client]\ntimeout = 2\n")  # a refresh the hub misses is given up after 2 s, not 10
    s.start_hub()
    out = tmp_path / "watch.out"
    p = subprocess.Popen([sys.executable, "-m", "bucketwire", "status", "--watch", "0.3", "-c", str(s.cfg_path)],
                         env=s.env, stdout=out.open("w"), stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        wait_for(lambda: "journal ok" in out.read_text(), 30, "the first status")
        s.kill_hub()
        wait_for(lambda: "not answering" in out.read_text() or p.poll() is not None, 60, "the outage said")
        assert p.poll() is None, out.read_text()
        said = out.read_text()
        assert said.count("not answering") == 1, said  # once, not once a refresh
        s.start_hub()
        mark = len(said)
        wait_for(lambda: "hub " in out.read_text()[mark:] and "back" in out.read_text()[mark:], 60,
                 "a fresh status after the restart:\n" + out.read_text()[mark:])
        assert p.poll() is None, out.read_text()
    finally:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(30)
    assert p.returncode == 0, (p.returncode, out.read_text()[-2000:])
