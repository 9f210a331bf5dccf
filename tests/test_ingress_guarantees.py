"""Ingress is all or nothing and fails closed: a refused body commits nothing, the topic count is bounded and
costs nothing while idle, NUL bytes are refused, an empty secret stops the hub, /healthz knows when the disk is
full, and a fresh connection is served without waiting for a timer. Real hub processes on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from bucketwire import protocol as P
from bucketwire.client import HubRefused
from bucketwire.envelope import Event
from bucketwire.hub.http_server import Request, Response, Server
from tests import minio_payloads as mp
from tests.fixtures_hub import Stack, wait_for
from tests.test_security_ingress import hub_opts

StackFactory = Callable[..., Stack]
ROUTE = '\n[[routes]]\ntopic = "uploads"\nbucket = "photos"\n\n[groups.g]\ntopics = ["x"]\nplugins = []\n'


def ce(i: int | str, topic: str = "x", **kw: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "test", "type": "t", "topic": topic, "data": {}, **kw}


def head(s: Stack, topic: str) -> int:
    return int(s.status()["topics"].get(topic, {}).get("head", 0))


def metrics(s: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=30) as r:
        text: str = r.read().decode()
    return text


# -- item 7: a 4xx commits nothing ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    pytest.param(ce(2, hops=99), id="hop-limit"),
    pytest.param(ce(2, data={"bucket": "b", "key": "a\x00b"}), id="nul-key"),
    pytest.param(ce(2, data={"bucket": "b\x00c", "key": "k"}), id="nul-bucket"),
    pytest.param(ce(2, topic="x\x00y"), id="nul-topic"),
])
def test_refused_cloudevents_batch_commits_nothing(stack_factory: StackFactory, bad: dict[str, Any]) -> None:
    s = stack_factory(ROUTE)
    s.start_hub()
    assert s.post("/events", json.dumps(ce(0)).encode())[0] == 200
    code, body = s.post("/events", json.dumps([ce(1), bad]).encode())
    assert code == 400, body
    assert "event 1" in body["error"], body
    assert head(s, "x") == 1, "the valid first event of a refused batch must not be committed"
    # and it is new, not a duplicate, when it comes again on its own
    code, body = s.post("/events", json.dumps(ce(1)).encode())
    assert code == 200 and body["accepted"] == 1 and body["duplicates"] == 0, body
    assert "x\x00y" not in s.status()["topics"]


@pytest.mark.parametrize("bucket,key", [("photo\x00s", "a.jpg"), ("photos", "a\x00.jpg")])
def test_minio_nul_in_bucket_or_key_is_refused(stack_factory: StackFactory, bucket: str, key: str) -> None:
    s = stack_factory(ROUTE)
    s.start_hub()
    good = mp.record("s3:ObjectCreated:Put", "photos", "ok.jpg", request_id="R1")
    bad = mp.record("s3:ObjectCreated:Put", bucket, key, request_id="R2")
    code, body = s.post("/minio/events", mp.body(good, bad))
    assert code == 400, body
    assert "NUL" in body["error"], body
    assert head(s, "uploads") == 0
    assert s.post("/minio/events", mp.body(good))[0] == 200
    assert head(s, "uploads") == 1


def test_refused_pub_batch_commits_nothing(stack_factory: StackFactory) -> None:
    s = stack_factory(ROUTE)
    s.start_hub()
    with s.client() as c:
        c.publish_events([Event.from_dict(ce(0))])
        with pytest.raises(HubRefused, match="hop limit"):
            c.publish_events([Event.from_dict(ce(1)), Event.from_dict(ce(2, hops=99))])
        assert c.status()["topics"]["x"]["head"] == 1
        (r,) = c.publish_events([Event.from_dict(ce(1))])
        assert r["seq"] == 2 and not r["duplicate"]


# -- item 10: the topic count is bounded --------------------------------------------------------------------------
def test_topic_count_is_bounded(stack_factory: StackFactory) -> None:
    s = stack_factory(ROUTE)
    hub_opts(s, "max_topics = 3")
    s.start_hub()
    assert s.post("/events", json.dumps([ce(0, "t0"), ce(1, "t1"), ce(2, "t2")]).encode())[0] == 200
    code, body = s.post("/events", json.dumps([ce(3, "t0"), ce(4, "t3")]).encode())
    assert code == 400 and "max_topics" in body["error"], body
    assert head(s, "t0") == 1 and "t3" not in s.status()["topics"]
    # topics the config declares (routes, groups, dead-letter) are never refused
    assert s.post("/events", json.dumps(ce(5, "x")).encode())[0] == 200
    assert s.post("/events", json.dumps(ce(6, "t1")).encode())[0] == 200, "existing topics still take events"
    with s.client() as c, pytest.raises(HubRefused, match="max_topics"):
        c.publish("t4", {"n": 1})
    assert set(s.status()["topics"]) == {"t0", "t1", "t2", "x"}
    assert 'reason="topic_limit"' in metrics(s)


def test_per_event_checks_still_run_after_their_topic_passed(stack_factory: StackFactory) -> None:
    """The hub checks a topic once per request (name, count limit) and every event on its own (hops, NUL in its
    key): an event behind one that passed on the same topic is still refused, with all of its request."""
    s = stack_factory(ROUTE)
    hub_opts(s, "max_topics = 2\nmax_hops = 3")
    s.start_hub()
    assert s.post("/events", json.dumps([ce(0, "t0"), ce(1, "t0"), ce(2, "t0")]).encode())[0] == 200
    code, body = s.post("/events", json.dumps([ce(3, "t0"), ce(4, "t0", hops=4)]).encode())
    assert code == 400 and "hop limit" in body["error"], body
    code, body = s.post("/events", json.dumps([ce(5, "t0"), ce(6, "t0", data={"bucket": "b", "key": "a\0b"})]).encode())
    assert code == 400 and "NUL" in body["error"], body
    with s.client() as c, pytest.raises(HubRefused, match="hop limit"):
        c.publish_events([Event.from_dict(ce(7, "t0")), Event.from_dict(ce(8, "t0", hops=4))])
    assert head(s, "t0") == 3, "nothing of a refused request was committed"


def test_idle_topics_get_no_heartbeats(stack_factory: StackFactory) -> None:
    """Heartbeats go to topics with recent traffic (and the configured ones), not to every topic ever made:
    between two heartbeats of a live topic, none arrives for 200 topics that went quiet."""
    s = stack_factory(ROUTE)
    s.start_hub()
    many = [ce(i, f"quiet-{i}") for i in range(200)]
    assert s.post("/events", json.dumps(many).encode())[0] == 200
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{s.pub_port}")
    try:
        others = 0
        probe_hbs = 0
        n = 0
        deadline = time.monotonic() + 40
        while True:
            assert time.monotonic() < deadline, "quiet topics kept getting heartbeats"
            if not sub.poll(500):
                n += 1  # keep the probe topic live
                assert s.post("/events", json.dumps(ce(f"p{n}", "probe")).encode())[0] == 200
                continue
            topic_b, _, body = sub.recv_multipart()
            topic = P.topic_of(topic_b)
            if body:
                continue
            if topic == "probe":
                if probe_hbs and others == 0:
                    break  # a whole heartbeat interval with no heartbeat for any quiet topic
                probe_hbs += 1
                others = 0
                n += 1
                assert s.post("/events", json.dumps(ce(f"p{n}", "probe")).encode())[0] == 200
            elif topic.startswith("quiet-"):
                others += 1
    finally:
        sub.close(0)


def test_per_topic_metric_series_are_bounded(stack_factory: StackFactory) -> None:
    from bucketwire.hub.metrics import MAX_TOPIC_SERIES

    s = stack_factory(ROUTE)
    hub_opts(s, f"max_topics = {MAX_TOPIC_SERIES + 500}")
    s.start_hub()
    total = MAX_TOPIC_SERIES + 200
    for lo in range(0, total, 500):
        batch = [ce(i, f"t{i}") for i in range(lo, min(total, lo + 500))]
        assert s.post("/events", json.dumps(batch).encode())[0] == 200
    assert len(s.status()["topics"]) == total
    text = metrics(s)
    for name in ("bucketwire_topic_head_seq", "bucketwire_events_received_total"):
        labels = set(re.findall(rf'^{name}{{[^}}]*topic="([^"]*)"', text, re.M))
        assert MAX_TOPIC_SERIES // 2 < len(labels) <= MAX_TOPIC_SERIES + 1, (name, len(labels))
    m = re.search(r'^bucketwire_events_received_total{source="cloudevents",topic="_other"} (\S+)', text, re.M)
    assert m and float(m.group(1)) >= 200, "events on topics past the series limit are still counted"


# -- item 8: an empty secret fails closed -------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["env-empty", "env-blank", "file-empty", "literal-empty", "empty-list"])
def test_hub_with_empty_token_refuses_to_start(tmp_path: Path, how: str) -> None:
    s = Stack(tmp_path)
    secret = tmp_path / "token"
    secret.write_text("\n")
    value = {"env-empty": '"env:BW_EMPTY_TOKEN"', "env-blank": '"env:BW_BLANK_TOKEN"',
             "file-empty": f'"file:{secret}"', "literal-empty": '""', "empty-list": "[]"}[how]
    s.cfg_path.write_text(s.cfg_path.read_text().replace('"env:BW_TEST_TOKEN"', value))
    env = {**s.env, "BW_EMPTY_TOKEN": "", "BW_BLANK_TOKEN": "  \t"}
    p = subprocess.run([sys.executable, "-m", "bucketwire", "hub", "-c", str(s.cfg_path)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth_token" in lines[0] and "empty" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


# -- also: /healthz knows when the journal cannot be written ------------------------------------------------------
def _mount_tmpfs(d: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    d.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                          capture_output=True).returncode == 0


def _fill(disk: Path) -> Path:
    """Fill the filesystem to its last byte with one file, which the test deletes to give the space back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _healthz(s: Stack, token: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{s.http_port}/healthz",
                                 headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def test_healthz_fails_on_a_full_disk_before_any_commit(stack_factory: StackFactory, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("needs root and a tmpfs mount for a real full filesystem")
    s = stack_factory(ROUTE)
    try:
        s.cfg_path.write_text(s.cfg_path.read_text().replace(str(s.dir / "state"), str(disk / "state")))
        s.start_hub()
        assert s.post("/events", json.dumps(ce(0)).encode())[0] == 200
        filler = _fill(disk)
        s.kill_hub()  # the disk filled up under a running hub, which then died; its journal files are in place
        s.hub_proc = s._spawn(["hub"], "hub")
        code, body = wait_for(lambda: (r := _healthz(s))[0] and r, 30, "/healthz to answer")
        assert code == 503, body
        assert body["ok"] is False and "write" in body.get("reason", ""), body
        filler.unlink()
        code, body = wait_for(lambda: (r := _healthz(s))[0] == 200 and r, 30, "/healthz 200 once space is free")
        assert body["ok"] is True
        assert s.post("/events", json.dumps(ce(1)).encode())[0] == 200
    finally:
        s.stop()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_public_healthz_tells_a_stranger_the_status_not_the_journals_error(stack_factory: StackFactory) -> None:
    """With `metrics_public = true` anyone who reaches the port reads /healthz (behind a reverse proxy on the hub's
    host, as a loopback peer). Its journal error named the state directory and the OS error; the revocation
    list's, the list's path. A stranger (no token, or a wrong one) gets the status and a short code; a holder of
    `[hub] auth_token` gets the reason in full. The journal fails for real: its write probe's scratch file is
    made a directory, which no write can open (root writes through any file mode, so chmod would not do)."""
    s = stack_factory(ROUTE)
    hub_opts(s, "metrics_public = true")
    s.env["BUCKETWIRE_PROBE_INTERVAL"] = "0.5"  # the failing probe comes within 0.5 s, not 5
    s.start_hub()
    assert _healthz(s) == (200, {"ok": True, "loop": True, "journal": True})
    state = s.dir / "state"
    blocker = state / ".write-probe"

    def block() -> bool:
        try:
            blocker.mkdir()
            return True
        except FileExistsError:  # the probe's own file, for the moment it exists
            return False

    wait_for(block, 10, "the probe's scratch file made a directory")
    try:
        code, body = wait_for(lambda: (r := _healthz(s))[0] == 503 and r, 20, "/healthz 503 once the probe fails")
        assert body == {"ok": False, "loop": True, "journal": False, "code": "journal_unwritable",
                        "reason": body["reason"]}, body
        for seen in (body, _healthz(s, "wrong-token")[1]):
            text = json.dumps(seen)
            assert str(s.dir) not in text and "directory" not in text.lower(), f"a stranger read: {text}"
        code, told = _healthz(s, s.token)
        assert code == 503 and told["code"] == "journal_unwritable", told
        assert str(state) in told["reason"] and "Is a directory" in told["reason"], told
    finally:
        blocker.rmdir()
    wait_for(lambda: _healthz(s)[0] == 200, 20, "/healthz 200 once the journal can be written")



# -- item 9: no stall on a fresh connection -----------------------------------------------------------------------
class _Ok:
    def head(self, req: Request) -> Response | None:
        return None

    def handle(self, req: Request) -> Response:
        return Response(200, b"{}\n")

    def timed_out(self, req: Request) -> Response:
        return Response(503)


def test_fresh_connections_are_served_by_readiness_alone() -> None:
    """The hub steps the HTTP server when its selector fd is readable (or when its own poll times out). A new
    connection's accept leaves work in asyncio's ready queue after the step that accepted it, with nothing
    readable: driven by readiness alone (the poll never times out here), every fresh connection must still be
    answered."""
    import select

    srv = Server(_Ok(), "127.0.0.1", 0)
    answered: list[bytes] = []
    n = 20

    def client() -> None:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as c:
                c.sendall(b"POST /minio/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                answered.append(data)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    try:
        while len(answered) < n and time.monotonic() < deadline:
            # no timeout-driven turns: only readable I/O (or the 1 s check of the deadline) steps the server
            ready, _, _ = select.select([srv.fileno()], [], [], 1.0)
            if ready:
                srv.step()
        assert len(answered) == n, f"only {len(answered)} of {n} fresh connections were answered"
        assert all(a.startswith(b"HTTP/1.1 200") for a in answered)
    finally:
        srv.close()
        t.join(5)


def test_hub_polls_at_once_while_asyncio_has_ready_callbacks(tmp_path: Path) -> None:
    from bucketwire import config as config_mod
    from bucketwire.hub.loop import Hub

    s = Stack(tmp_path)
    cfg = config_mod.load(s.cfg_path)
    hub = Hub(cfg)
    srv = Server(_Ok(), "127.0.0.1", 0)
    try:
        hub.attach_http(srv)
        assert hub._next_timeout(time.monotonic()) > 0
        srv.loop.call_soon(lambda: None)
        assert hub._next_timeout(time.monotonic()) == 0
        srv.step()
        assert hub._next_timeout(time.monotonic()) > 0
    finally:
        srv.close()
        hub.journal.close()


# -- also: README and code agree on defaults -----------------------------------------------------------------------
def test_readme_hub_defaults_match_the_code() -> None:
    from bucketwire.config import HubConfig

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"^\[hub\]\n(.*?)^\[", text, re.M | re.S)
    assert block, "README has a [hub] configuration reference"
    d = HubConfig()
    checked = 0
    for m in re.finditer(r"^(\w+) = ([0-9.]+)\s", block.group(1), re.M):
        key, value = m.group(1), float(m.group(2))
        if hasattr(d, key) and isinstance(getattr(d, key), int | float) and not isinstance(getattr(d, key), bool):
            assert float(getattr(d, key)) == value, f"README says {key} = {m.group(2)}, the code {getattr(d, key)}"
            checked += 1
    assert checked >= 5


def _publish_cli(s: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bucketwire", "publish", "-c", str(s.cfg_path), *args],
                          capture_output=True, text=True, timeout=60, env=s.env)


@pytest.mark.parametrize("data", ['{"ratio": NaN}', '[Infinity]', '[-Infinity]'])
def test_publish_refuses_data_that_is_not_json_instead_of_committing_null(stack_factory: StackFactory,
                                                                          data: str) -> None:
    """`bucketwire publish t '{"ratio": NaN}'`: Python's reader takes NaN and Infinity, JSON has neither, and the
    event was committed with null in their place (exit 0, the data silently not what was typed)."""
    s = stack_factory(ROUTE)
    s.start_hub()
    r = _publish_cli(s, "x", data)
    assert r.returncode == 2 and "not JSON" in r.stderr and "is not a JSON number" in r.stderr, (r.stdout, r.stderr)
    assert head(s, "x") == 0, "nothing committed"


@pytest.mark.parametrize("depth", [700, 5000])
def test_publish_refuses_data_nested_too_deep_in_one_line(stack_factory: StackFactory, depth: int) -> None:
    """`bucketwire publish t '[[[...]]]'` nested 5,000 deep printed the json module's RecursionError traceback;
    the CLI now says what is wrong in one line, before it sends anything, as the hub would say it."""
    s = stack_factory(ROUTE)
    s.start_hub()
    r = _publish_cli(s, "x", "[" * depth + "]" * depth)
    assert r.returncode == 2 and "nests deeper than 512 levels" in r.stderr, (r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.count("Error") == 1, r.stderr[-2000:]
    assert head(s, "x") == 0, "nothing committed"


def test_an_attribute_too_long_is_named(stack_factory: StackFactory) -> None:
    """A topic of 250 characters is a valid topic, but `publish` makes the type `bucketwire.TOPIC`, 261
    characters: refused as 'envelope id/source/type is too long', naming none of them, for an id, a source and a
    type the user never gave. The line names the attribute, its length and the limit."""
    s = stack_factory(ROUTE)
    s.start_hub()
    topic = "t" * 250
    r = _publish_cli(s, topic, "{}")
    assert r.returncode == 1, r.stdout
    assert "envelope attribute 'type' is 261 characters, over its limit of 256" in r.stderr, r.stderr
    r = _publish_cli(s, topic, "{}", "--type", "long.topic")
    assert r.returncode == 0, r.stderr


# -- JSON nested past what anyone can read --------------------------------------------------------------------
def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


def _deep_bodies() -> list[tuple[str, bytes, dict[str, str]]]:
    """What a sender can nest: a body past what the json module reads at all, one it reads but the hub's checks
    recursed over, and a MinIO record with a deep field (orjson reads 1024 levels)."""
    ok = {k: v for k, v in ce(1).items() if k != "data"}
    rec = mp.record("s3:ObjectCreated:Put", "photos", "deep.jpg", request_id="DEEP")
    rec["x"] = _nested(700)
    binary = {"ce-specversion": "1.0", "ce-id": "b1", "ce-source": "test", "ce-type": "t", "ce-topic": "x",
              "Content-Type": "application/json"}
    return [
        ("/events", b"[" * 5000 + b"]" * 5000, {}),
        ("/events", json.dumps({**ok, "data": _nested(700)}).encode(), {}),
        ("/events", json.dumps([ce(2), {**ok, "id": "e3", "data": _nested(900)}]).encode(),
         {"Content-Type": "application/cloudevents-batch+json"}),
        ("/events", b"[" * 5000 + b"]" * 5000, binary),
        ("/minio/events", json.dumps({"Records": [rec]}).encode(), {}),
        ("/minio/events", b'{"Records": [' + b"[" * 5000 + b"]" * 5000 + b"]}", {}),
        ("/seaweedfs/events", b"[" * 5000 + b"]" * 5000, {}),
    ]


def test_json_nested_too_deep_is_one_clear_400_and_commits_nothing(stack_factory: StackFactory) -> None:
    """A body nesting arrays hundreds deep got `400 cannot parse body: RecursionError` -- a reason that says
    nothing to the sender -- and the hub logged a traceback of ~2,000 lines for each such request, unthrottled,
    from its loop thread. Now it is a 400 naming the nesting and its limit, and the log holds no traceback."""
    s = stack_factory(ROUTE)
    s.start_hub()
    for path, payload, headers in _deep_bodies():
        code, resp = s.post(path, payload, headers=headers)
        assert code == 400, (path, code, resp)
        assert "nest" in resp["error"] and "512" in resp["error"], resp
    assert s.status()["topics"] == {}, "nothing of any of them committed"
    code, resp = s.post("/events", json.dumps(ce(4, data=_nested(200))).encode())
    assert code == 200 and resp["accepted"] == 1, "data nested within the limit is taken"
    log = s.logs[0].read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]


def test_a_publish_nested_too_deep_is_refused_with_its_reason(stack_factory: StackFactory) -> None:
    """Over ZeroMQ a publish nested ~1,000 deep was refused as 'RecursionError: maximum recursion depth exceeded
    while deserializing an object' after a traceback in the hub's log, and one nested 600 deep was committed,
    where the webhook refused it: every way in now refuses the same nesting with the same reason."""
    s = stack_factory(ROUTE)
    s.start_hub()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # so that the client can encode what the hub is to refuse
    try:
        for depth in (600, 3000):
            with s.client() as c, pytest.raises(HubRefused) as info:
                c.publish_events([Event(id="ok", source="test", type="t", data={}, topic="x"),
                                  Event(id=f"deep{depth}", source="test", type="t", data=_nested(depth), topic="x")])
            assert "nest" in str(info.value) and "512" in str(info.value), info.value
    finally:
        sys.setrecursionlimit(limit)
    assert head(s, "x") == 0, "nothing of either batch committed"
    with s.client() as c:
        assert c.publish("x", _nested(200))["seq"] == 1
    log = s.logs[0].read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
