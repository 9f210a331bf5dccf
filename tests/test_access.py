"""Access control as an attacker probes it: only what a key's role allows, always -- against real hub processes.

Every test here once passed against the hub it attacks (see each docstring for how). They run real `bucketwire hub`
and `bucketwire worker` processes with CURVE on loopback; keys come from the same code as `bucketwire keys`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bucketwire import Event, security
from bucketwire.client import HubClient, HubRefused, HubUnavailable
from bucketwire.envelope import follow_on_id, stable_id, unsent_of
from tests.fixtures_hub import Stack, wait_for
from tests.test_security import GROUPS, cfg_for, client_config, revoke, secure_stack, sub_socket

TWO_GROUPS = GROUPS + '\n[groups.h]\ntopics = ["x"]\nplugins = []\nstart = "earliest"\n'


def metric(s: Stack, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                return smp.value
    return None


def refused(cfg_path: Path) -> bool:
    """True once the hub no longer serves this client key (handshake refused, or refused on the work socket)."""
    try:
        with HubClient(cfg_for(cfg_path), timeout=1.0) as c:
            c.status()
        return False
    except (HubUnavailable, HubRefused):
        return True


def drain(sock: zmq.Socket, until: float) -> list[bytes]:
    """Topic frames of the events (not heartbeats) that reach `sock` before the deadline."""
    out = []
    while (left := until - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            m = sock.recv_multipart()
            if m[2]:
                out.append(m[0])
    return out


def probe_until_witnessed(s: Stack, witness: zmq.Socket, watched: zmq.Socket, count: int = 5) -> list[bytes]:
    """Publish `secret` then `ok` pairs until the witness (an unrestricted key, subscribed to `ok`) has seen
    `count` of them, collecting what the watched socket receives meanwhile. The witness's subscriptions go through
    the same fan-out socket, so once it has seen several rounds the watched socket has had every chance too."""
    got: list[bytes] = []
    seen = 0
    deadline = time.monotonic() + 30
    with s.client() as c:
        while seen < count:
            assert time.monotonic() < deadline, "the witness subscriber never received the probes"
            c.publish("secret", {"probe": seen})
            c.publish("ok", {"probe": seen})
            seen += len([t for t in drain(witness, time.monotonic() + 0.3) if t == b"ok\0"])
            got += drain(watched, time.monotonic() + 0.01)
    got += drain(watched, time.monotonic() + 0.5)
    return got


# -- 1. a malformed key file does not freeze the allow-list ------------------------------------------------------
def test_bad_key_file_is_skipped_and_removal_still_takes_effect(stack_factory, tmp_path):
    """Before: one bare Z85 key in `notes.key` made the ZAP reload fail and keep the old key set, so a removed key
    kept its connections, re-subscribed under an unknown identity, and an unknown identity was unrestricted: its
    `""` subscription received `secret`, which its role never allowed."""
    roles = '\n[security.roles.limited]\nsubscribe = ["ok"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited", "other"), roles=roles)
    s.start_hub()
    lim_path = client_config(s, d, "limited")
    watched = sub_socket(cfg_for(lim_path), "")
    watched.setsockopt(zmq.SUBSCRIBE, b"ok\0")
    witness = sub_socket(cfg_for(client_config(s, d, "other")), "ok")
    # the limited key is live: it receives `ok` (and never `secret`)
    before = probe_until_witnessed(s, witness, watched, 2)
    assert b"ok\0" in before and b"secret\0" not in before

    z85_public = (d / "keys" / "other.key").read_text().split('public-key = "')[1][:40]
    (d / "authorized" / "notes.key").write_text(z85_public + "\n")
    revoke(d, "limited")
    wait_for(lambda: refused(lim_path), 20, "the removed key is refused within the reload interval")
    after = probe_until_witnessed(s, witness, watched)
    assert after == [], "a removed key receives nothing more, whatever else sits in the directory"

    # the bad file is reported, not silently ignored
    wait_for(lambda: metric(s, "bucketwire_authorized_keys_invalid") == 1, 10, "the invalid-key-file gauge")
    log = s.dump_logs()
    assert "notes.key" in log and "authorized_keys_dir" in log
    r = subprocess.run([sys.executable, "-m", "bucketwire", "doctor", "--offline", "-c", str(s.cfg_path)],
                       env=s.env, capture_output=True, text=True, timeout=60)
    assert "notes.key" in r.stdout + r.stderr and "Traceback" not in r.stderr
    # and the good keys still work
    assert not refused(s.cfg_path)
    witness.close()
    watched.close()


# -- 2. narrowing a role reaches live subscriptions --------------------------------------------------------------
def test_narrowed_role_applies_to_live_subscriptions(stack_factory, tmp_path):
    """Before: after the role lost `secret` and the hub got SIGHUP, FETCH was refused but the subscription the hub
    had already applied kept delivering `secret`."""
    roles = '\n[security.roles.limited]\nsubscribe = ["ok", "secret"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited", "other"), roles=roles)
    s.start_hub()
    lim = cfg_for(client_config(s, d, "limited"))
    watched = sub_socket(lim, "secret")
    watched.setsockopt(zmq.SUBSCRIBE, b"ok\0")
    witness = sub_socket(cfg_for(client_config(s, d, "other")), "ok")
    before = probe_until_witnessed(s, witness, watched, 2)
    assert b"secret\0" in before, "the role allows `secret` at first"

    s.cfg_path.write_text(s.cfg_path.read_text().replace('subscribe = ["ok", "secret"]', 'subscribe = ["ok"]'))
    lim = cfg_for(client_config(s, d, "limited"))
    s.hub_proc.send_signal(signal.SIGHUP)

    def fetch_refused() -> bool:
        try:
            with HubClient(lim, timeout=3) as c:
                c.fetch("secret", 1)
            return False
        except HubRefused:
            return True

    wait_for(fetch_refused, 20, "the narrowed role is in force (FETCH refused)")
    after = probe_until_witnessed(s, witness, watched)
    assert b"secret\0" not in after, "the live subscription lost `secret` with the role"
    assert b"ok\0" in after, "what the role still allows keeps flowing"
    witness.close()
    watched.close()


# -- 3. moving a cursor is an operator's act ---------------------------------------------------------------------
def test_replay_obeys_roles_and_refuses_to_skip_past_the_head(stack_factory, tmp_path):
    """Before: any admitted key could REPLAY any group, and `--from-seq` far past the head silently made the group
    skip every future event."""
    roles = """
[security.roles.limited]
groups = ["g"]
publish = ["x"]
[security.roles.ops]
admin = true
"""
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited", "ops"), roles=roles,
                        groups=TWO_GROUPS, clients=("admin", "limited", "ops"))
    s.start_hub()
    with s.client() as c:
        for i in range(3):
            c.publish("x", {"i": i})

    def replay(who: str, *args: str) -> subprocess.CompletedProcess:
        cfgp = s.cfg_path if who == "admin" else client_config(s, d, who)
        return subprocess.run([sys.executable, "-m", "bucketwire", "replay", "-c", str(cfgp), "--no-wait", *args],
                              env=s.env, capture_output=True, text=True, timeout=60)

    def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
        assert r.returncode != 0, r.stderr
        assert text in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
            r.stderr

    one_line_error(replay("limited", "--group", "h", "--from-seq", "1"), "may not")
    assert replay("limited", "--group", "g", "--from-seq", "1").returncode == 0, "its own group is fine"
    assert replay("ops", "--group", "h", "--from-seq", "1").returncode == 0, "admin = true may replay any group"
    for who in ("ops", "admin"):
        one_line_error(replay(who, "--group", "h", "--from-seq", "100"), "beyond")
        one_line_error(replay(who, "--group", "h", "--since", "2999-01-01T00:00:00Z"), "future")
    assert replay("ops", "--group", "h", "--from-seq", "4").returncode == 0, "head + 1 (skip what is there) is fine"
    # nothing refused moved a cursor: the next event still reaches both groups
    with s.client() as c:
        c.publish("x", {"i": 3})
    s.start_worker("g", 1)
    s.start_worker("h", 1)
    wait_for(lambda: {(h["g"], h["data"].get("i")) for h in s.handled()} >= {("g", 3), ("h", 3)}, 20,
             "both groups handle the next event")


# -- 4. a publisher cannot steer delivery ------------------------------------------------------------------------
def test_publisher_cannot_set_delivery_steering_extensions(stack_factory, tmp_path):
    """Before: an event published with `targetgroup = "g"` (over ZeroMQ or HTTP) was committed, and every other
    group of the topic silently skipped it."""
    s, _ = secure_stack(stack_factory, tmp_path, groups=TWO_GROUPS)
    s.start_hub()
    ev = Event(id="steer-1", source="test", type="t", topic="x", data={"steer": 1}, extensions={"targetgroup": "g"})
    with s.client() as c, pytest.raises(HubRefused, match="targetgroup"):
        c.publish_events([ev])
    body = json.dumps({**ev.to_dict(), "id": "steer-2"}).encode()
    code, resp = s.post("/events", body)
    assert 400 <= code < 500 and "targetgroup" in json.dumps(resp), (code, resp)
    # what `dlq retry` stamps is the hub's too: a forged retrydeadletter would make `dlq show` history lie
    forged = Event(id="steer-3", source="test", type="t", topic="x", data={}, extensions={"retrydeadletter": "dl"})
    with s.client() as c, pytest.raises(HubRefused, match="retrydeadletter"):
        c.publish_events([forged])
    assert "x" not in s.status()["topics"], "nothing was committed"
    with s.client() as c:
        c.publish("x", {"plain": 1})
    s.start_worker("g", 1)
    s.start_worker("h", 1)
    wait_for(lambda: {h["g"] for h in s.handled()} == {"g", "h"}, 20, "both groups handle the plain event")
    assert [h["data"] for h in s.handled()] == [{"plain": 1}] * 2


# -- 5. a publisher cannot squat on the hub's ids ----------------------------------------------------------------
def test_publisher_cannot_squat_on_dead_letter_or_follow_on_ids(stack_factory, tmp_path):
    """Before: a key allowed only topic `x` pre-published the predictable ids of a group's follow-on and dead
    letter; the journal's (source, id) dedupe then dropped the real ones, the hub still logged "dead-lettered", and
    `dlq list` stayed empty."""
    roles = '\n[security.roles.limited]\npublish = ["x"]\nsubscribe = ["x"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles)
    s.start_hub()
    lim = cfg_for(client_config(s, d, "limited"))
    victim_dead = Event(id="victim-dead", source="test", type="t", topic="x", data={"permanent": True})
    victim_follow = Event(id="victim-follow", source="test", type="t", topic="x", data={"follow": 1})
    # What today's hub would derive once the victims are seqs 3 and 4 (after the two squatters at 1 and 2).
    squats = [
        Event(id=stable_id("dead-letter", "g", "test", "victim-dead", 3), source="bucketwire://hub/dead-letter/g",
              type="t", topic="x", data={}),
        Event(id=follow_on_id("victim-follow", "g", "recorder", 0, "follow"), source="bucketwire://g/recorder",
              type="t", topic="x", data={}),
    ]
    with HubClient(lim, timeout=5) as c:
        for sq in squats:
            try:
                c.publish_events([sq])
            except HubRefused as e:
                assert "reserved" in str(e) or "bucketwire://hub/" in str(e)
        c.publish_events([victim_dead])
        c.publish_events([victim_follow])
    s.start_worker("g", 1)
    wait_for(lambda: s.status()["topics"].get("follow", {}).get("head", 0) >= 1, 20,
             "the group's follow-on is committed")
    r = subprocess.run([sys.executable, "-m", "bucketwire", "dlq", "list", "--json", "-c", str(s.cfg_path)],
                       env=s.env, capture_output=True, text=True, timeout=60)
    dls = [json.loads(x) for x in r.stdout.splitlines()]
    assert [dl["event"]["data"]["event"]["id"] for dl in dls] == ["victim-dead"], r.stdout + r.stderr
    # hub-derived sources are refused from outside, on every ingress path
    reserved = Event(id="r1", source="bucketwire://hub/anything", type="t", topic="x", data={})
    with HubClient(lim, timeout=5) as c, pytest.raises(HubRefused, match="reserved"):
        c.publish_events([reserved])
    code, resp = s.post("/events", reserved.to_json())
    assert 400 <= code < 500 and "reserved" in json.dumps(resp), (code, resp)


# -- 6. a refused follow-on stays refused ------------------------------------------------------------------------
def test_dlq_retry_never_turns_a_refused_follow_on_into_an_event(stack_factory, tmp_path):
    """Before: `dlq retry` re-published a follow-on that the role had refused onto the *causing* event's topic,
    where the group then handled it as a source event."""
    roles = '\n[security.roles.limited]\npublish = ["x"]\ngroups = ["g"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles)
    s.start_hub()
    s.start_worker("g", 1, cfg_path=client_config(s, d, "limited"))
    with s.client() as c:
        c.publish("x", {"follow": 1})
    wait_for(lambda: s.status()["topics"].get("dead-letter", {}).get("head", 0) >= 1, 20, "the refused follow-on")
    r = subprocess.run([sys.executable, "-m", "bucketwire", "dlq", "retry", "--all", "-c", str(s.cfg_path)],
                       env=s.env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr
    assert "refused" in r.stdout + r.stderr, r.stdout + r.stderr
    with s.client() as c:
        c.publish("x", {"marker": 1})
    wait_for(lambda: any(h["data"] == {"marker": 1} for h in s.handled()), 20, "the marker is handled")
    assert [h["data"] for h in s.handled()] == [{"follow": 1}, {"marker": 1}], "the follow-on never ran in g"
    assert "follow" not in s.status()["topics"]


def test_a_suppressed_dead_letter_is_never_reported_as_recorded(stack_factory, tmp_path):
    """A journal from before the hub reserved its sources may already hold a squatted dead-letter id. Before: the
    hub logged "event dead-lettered" and counted it while the journal dropped it as a duplicate; now the log and
    the metrics say what the commit did."""
    from bucketwire.hub.journal import Batch, Journal, NewEvent

    s, _ = secure_stack(stack_factory, tmp_path)
    squat = Event(id=stable_id("dead-letter", "g", "test", "victim", 2), source="bucketwire://hub/dead-letter/g",
                  type="t", topic="x", data={})
    j = Journal(s.cfg.hub.state_dir / "journal.db")

    j.commit(Batch(events=[NewEvent("x", squat.source, squat.id, None, unsent_of(squat, "x"))]))
    j.close()
    s.start_hub()
    with s.client() as c:
        assert c.publish("x", {"permanent": True}, source="test", id="victim")["seq"] == 2
    s.start_worker("g", 1)
    wait_for(lambda: metric(s, "bucketwire_events_duplicate_total", source="dead-letter") == 1, 20,
             "the dead letter counted as a duplicate")
    assert not metric(s, "bucketwire_dead_lettered_total", group="g"), "not counted as dead-lettered"
    log = s.dump_logs()
    assert "dead letter not recorded" in log and "event dead-lettered" not in log


def test_unknown_or_missing_identity_is_denied_everything():
    """The role check itself: with CURVE (an allow-list in force) an identity outside it -- a removed key's name,
    the empty User-Id the authenticator gives a key it cannot name, no User-Id at all -- is denied, never
    unrestricted. Before: Roles treated every identity without a role entry as unrestricted."""
    from bucketwire.config import RoleConfig

    roles = security.Roles({"lim": RoleConfig("lim", subscribe=["ok"], groups=["g"])},
                           admitted=frozenset({"lim", "admin"}))
    for who in ("gone", "", None):
        assert not roles.allows(who, "subscribe", "secret")
        assert not roles.allows(who, "publish", "x")
        assert not roles.may_operate(who, "g")
    assert roles.allows("admin", "subscribe", "secret") and roles.may_operate("admin", "h")
    assert roles.allows("lim", "subscribe", "ok") and not roles.allows("lim", "subscribe", "secret")
    assert roles.may_operate("lim", "g") and not roles.may_operate("lim", "h")
    without_curve = security.Roles({}, admitted=None)
    assert without_curve.allows(None, "publish", "x"), "roles do not apply without CURVE"


def test_dlq_list_by_a_key_with_a_role_reads_no_topic_it_may_not_read(stack_factory, tmp_path):
    """`dlq` looks into the topics groups consume for old dead-letter topics. A key with a role sees its groups'
    topics in `status` whether or not it may read them: reading one was refused, and the hub logged the operator's
    `dlq list` as a forbidden request. The hub's status names those topics (`unreadable`), and they are skipped."""
    roles = '\n[security.roles.limited]\ngroups = ["g"]\nsubscribe = ["dead-letter*"]\n'
    s, d = secure_stack(stack_factory, tmp_path, authorized=("admin", "limited"), roles=roles)
    s.start_hub()
    with s.client() as c:
        c.publish("x", {"a": 1})
    lim = client_config(s, d, "limited")
    with HubClient(cfg_for(lim), timeout=5) as c:
        assert c.status()["unreadable"] == ["x"]
    r = subprocess.run([sys.executable, "-m", "bucketwire", "dlq", "list", "-c", str(lim)], env=s.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no dead letters" in r.stdout, r.stdout + r.stderr
    with s.client() as c:  # a request after the dlq's: its log lines are written by now
        c.status()
    assert "refused by role" not in s.dump_logs()
    assert not metric(s, "bucketwire_ingress_rejected_total", reason="forbidden")
