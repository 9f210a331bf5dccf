"""With the JetStream journal, a topic whose stream cannot be created yet must not stall the hub for everyone.

The first event of a new topic creates the topic's stream. While the cluster cannot create it (here: its meta
leader is frozen, so nobody answers stream creation until it resumes or the others elect a new one), that topic's
events wait off the hub's loop and are committed once the stream is there, or refused at `request_timeout` with a
reason that names the stream. Every other topic's publishes are committed and answered meanwhile, and /healthz
answers. Checked by the order of answers, never by how long anything took.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="the nats extra is not installed (pip install -e '.[nats]')")

from bucketwire.client import HubRefused, HubUnavailable  # noqa: E402
from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server  # noqa: E402
from tests.fixtures_backends import BackendStack, journal_table  # noqa: E402
from tests.fixtures_hub import wait_for  # noqa: E402

try:
    find_nats_server()
except NatsError as e:  # pragma: no cover - only without the extra
    pytest.skip(str(e), allow_module_level=True)

PREFIX = "nt"
TIMEOUT = 3.0  # [journal] request_timeout: how long a new topic's events wait for its stream


def ce(eid: str, topic: str) -> bytes:
    return json.dumps({"specversion": "1.0", "id": eid, "source": "urn:nt", "type": "t", "topic": topic,
                       "data": {"n": eid}}).encode()


def _js(cluster: NatsCluster, subject: str, body: bytes = b"") -> dict[str, Any]:
    """One JetStream API request from the test's own connection."""
    import asyncio

    import nats

    async def ask() -> dict[str, Any]:
        nc = await nats.connect(servers=[n.url for n in cluster.nodes if n.proc is not None], connect_timeout=2)
        try:
            return dict(json.loads((await nc.request(subject, body, timeout=2)).data))
        finally:
            await nc.close()

    return asyncio.run(ask())


def _meta_leader(cluster: NatsCluster) -> int:
    names = [n.name for n in cluster.nodes]
    leader = next(str(m.get("leader")) for n in cluster.nodes
                  if isinstance(m := n.jsz().get("meta_cluster"), dict) and m.get("leader"))
    return names.index(leader)


def _hub_node(cluster: NatsCluster) -> int:
    """The node the hub's NATS connection is on (its monitoring endpoint lists the connection by name)."""
    for k, n in enumerate(cluster.nodes):
        with urllib.request.urlopen(f"http://127.0.0.1:{n.http_port}/connz", timeout=2) as r:
            conns = json.loads(r.read()).get("connections") or []
        if any(str(c.get("name", "")).startswith("bucketwire-hub-") for c in conns):
            return k
    raise AssertionError("the hub has no NATS connection")


def _stream_leader(cluster: NatsCluster, stream: str) -> str:
    return str(_js(cluster, f"$JS.API.STREAM.INFO.{stream}").get("cluster", {}).get("leader"))


def _meta_leader_serving_only_creation(cluster: NatsCluster, meta: int, streams: list[str]) -> None:
    """Move the leadership of `streams` off the meta leader `meta` (the hub is not connected to it: see `stack`),
    so that freezing it stops stream creation and nothing else the hub needs."""
    name = cluster.nodes[meta].name

    def arranged() -> bool:
        assert _meta_leader(cluster) == meta, "the meta leader moved"
        for s in streams:
            if _stream_leader(cluster, s) == name:
                _js(cluster, f"$JS.API.STREAM.LEADER.STEPDOWN.{s}")
                return False
        return True

    wait_for(arranged, 60, "the hub's streams led by other nodes than the meta leader")


class _Raw:
    """An HTTP request sent whole on a socket of its own, whose answer is read later: so the test can tell whether
    it has been answered yet without waiting for it."""

    def __init__(self, port: int, token: str, body: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                          + body)

    def answered(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def answer(self) -> tuple[int, dict[str, Any]]:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self.sock.recv(65536)
        self.sock.close()
        return int(head.split(b" ", 2)[1]), json.loads(body)


def _stack(cluster: NatsCluster, tmp_path: Path, avoid: int, extra: str = "", lease_ttl: float = 3.0,
           prefix: str = PREFIX) -> BackendStack:
    """A stack whose hub connects to the cluster's nodes other than `avoid` (not started). A `lease_ttl` of its own
    needs a `prefix` of its own: the lease bucket's TTL is its config."""
    servers = ", ".join(f'"{n.url}"' for k, n in enumerate(cluster.nodes) if k != avoid)
    everyone = ", ".join(f'"{u}"' for u in cluster.urls)
    table = journal_table(cluster, prefix, lease_ttl).replace(f"servers = [{everyone}]", f"servers = [{servers}]")
    assert f"servers = [{servers}]" in table
    return BackendStack(tmp_path, extra, backend="jetstream", journal=table + f"request_timeout = {TIMEOUT}\n")


@pytest.fixture
def stack(cluster: NatsCluster, tmp_path: Path) -> Iterator[tuple[BackendStack, int]]:
    """A hub connected to the cluster's nodes other than the meta leader, and that node's index."""
    meta = _meta_leader(cluster)
    s = _stack(cluster, tmp_path, meta)
    s.start_hub()
    yield s, meta
    s.stop()


def test_a_topic_whose_stream_cannot_be_created_waits_alone(cluster: NatsCluster,
                                                              stack: tuple[BackendStack, int]) -> None:
    s, frozen = stack
    # A healthy cluster creates a new topic's stream in tens of ms: its first event commits on the first try.
    code, doc = s.post("/events", ce("o1", "old"))
    assert code == 200 and doc["events"][0]["seq"] == 1, doc
    with s.client(10) as c:
        assert c.publish("old2", {"n": 1})["seq"] == 1

    assert _hub_node(cluster) != frozen
    _meta_leader_serving_only_creation(cluster, frozen,
                                       [f"{PREFIX}_ev_old", f"KV_{PREFIX}_leases", f"KV_{PREFIX}_cursors"])
    pid = cluster.nodes[frozen].proc.pid  # type: ignore[union-attr]
    os.killpg(pid, signal.SIGSTOP)
    try:
        new = _Raw(s.http_port, s.token, ce("a1", "fresh"))
        pubbed: list[object] = []  # the same over PUB, to a third new topic: its answer, or the refusal

        def pub_new() -> None:
            with s.client(10) as c:
                try:
                    pubbed.append(c.publish("fresh3", {"n": 1}, id="p1", source="urn:nt"))
                except HubRefused as e:
                    pubbed.append(e)

        puber = threading.Thread(target=pub_new)
        puber.start()
        # Sent after the new topic's event: answered (committed) while that one still waits for its stream.
        with s.client(10) as c:
            assert c.publish("old", {"n": 2})["seq"] == 2
        assert not new.answered(), "the new topic's request was answered before a later publish to another topic"
        with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/healthz", timeout=5) as r:
            assert r.status == 200
        assert not new.answered(), "the new topic's request was answered before a later /healthz"
        code, doc = new.answer()  # within request_timeout: refused, or committed if a new meta leader was quick
        if code == 503:
            assert f"{PREFIX}_ev_fresh" in doc["error"] and "'fresh'" in doc["error"], doc
        else:
            assert code == 200 and doc["events"][0]["seq"] == 1, doc
        refused = code == 503
        puber.join(15)
        if isinstance(pubbed[0], HubRefused):  # a PUBNACK naming the stream, like the 503
            assert f"{PREFIX}_ev_fresh3" in str(pubbed[0]), pubbed
        else:
            assert isinstance(pubbed[0], dict) and pubbed[0]["seq"] == 1, pubbed
        # Another new topic, whose stream becomes creatable while its event waits: committed, not refused.
        waits = _Raw(s.http_port, s.token, ce("b1", "fresh2"))
        with s.client(10) as c:
            assert c.publish("old", {"n": 3})["seq"] == 3
    finally:
        os.killpg(pid, signal.SIGCONT)
    code, doc = waits.answer()
    assert code == 200 and doc["events"][0]["seq"] == 1, doc
    cluster.wait_ready()
    # Nothing refused was stored: the same event again is new, and takes seq 1; nothing is reused after it.
    code, doc = s.post("/events", ce("a1", "fresh"))
    assert code == 200 and doc["events"][0]["seq"] == 1, doc
    assert doc["events"][0]["duplicate"] is (not refused), doc
    code, doc = s.post("/events", ce("a2", "fresh"))
    assert code == 200 and doc["events"][0]["seq"] == 2, doc


def _pub(sock: Any, req: int, events: list[tuple[str, str]]) -> None:
    from bucketwire import protocol as P
    from bucketwire.envelope import Event

    envs = [Event(id=eid, source="urn:nt", type="t", topic=topic, data={"n": eid}).to_dict() for topic, eid in events]
    sock.send_multipart([P.PUB, P.enc({"req": req, "events": envs})])


def _reply(sock: Any, timeout_ms: int = 15000) -> tuple[bytes, dict[str, Any]]:
    assert sock.poll(timeout_ms), "no answer from the hub"
    cmd, body = sock.recv_multipart()[:2]
    return cmd, json.loads(body)


def test_a_request_behind_one_waiting_for_a_stream_keeps_its_topics_order(cluster: NatsCluster,
                                                                          stack: tuple[BackendStack, int]) -> None:
    """A publish naming a topic that an earlier, waiting request also names (the earlier one waits for another
    topic's stream) waits behind it: events of one topic are committed in the order the hub read them, so a
    DELETE sent after a PUT of the same object is never handled first. A topic no waiting request names is not
    held."""
    import zmq

    from bucketwire import protocol as P

    s, frozen = stack
    with s.client(10) as c:
        assert c.publish("ord_a", {"n": 0})["seq"] == 1
        assert c.publish("ord_b", {"n": 0})["seq"] == 1
    _meta_leader_serving_only_creation(cluster, frozen, [f"{PREFIX}_ev_ord_a", f"{PREFIX}_ev_ord_b",
                                                         f"KV_{PREFIX}_leases", f"KV_{PREFIX}_cursors"])
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{s.work_port}")
    pid = cluster.nodes[frozen].proc.pid  # type: ignore[union-attr]
    os.killpg(pid, signal.SIGSTOP)
    try:
        _pub(sock, 1, [("ord_a", "put"), ("ord_new", "put-new")])  # waits for ord_new's stream
        _pub(sock, 2, [("ord_a", "delete")])  # same topic as request 1: must not overtake it
        _pub(sock, 3, [("ord_b", "x")])  # a topic no waiting request names: goes on
        cmd, doc = _reply(sock)
        assert (cmd, doc["req"]) == (P.PUBACK, 3), (cmd, doc)
        assert not sock.poll(0), "a request was answered before the unrelated one behind it"
    finally:
        os.killpg(pid, signal.SIGCONT)
    answers = dict((d["req"], (cmd, d)) for cmd, d in (_reply(sock), _reply(sock)))
    sock.close()
    first, second = answers[1], answers[2]
    assert second[0] == P.PUBACK, second
    if first[0] == P.PUBACK:  # committed once the stream came: before the request that followed it
        old_put = next(r["seq"] for r in first[1]["results"] if r["topic"] == "ord_a")
        old_delete = second[1]["results"][0]["seq"]
        assert old_put < old_delete, (first, second)


def _dlq(sock: Any, req: int, items: list[dict[str, Any]]) -> None:
    from bucketwire import protocol as P

    sock.send_multipart([P.DLQ, P.enc({"req": req, "action": "retry", "items": items, "by": "test"})])


def test_a_dlq_retry_whose_marker_topic_has_no_stream_does_not_hold_other_topics(cluster: NatsCluster,
                                                                                tmp_path: Path) -> None:
    """`dlq retry` commits the retried event with a marker on `<dead-letter topic>.handled`, a topic whose stream
    the first retry creates. It used to be created inside the loop's commit: with the meta leader frozen every
    other topic waited up to request_timeout, and the failed commit refused the requests behind it. It waits off
    the loop now, like a publish: a later publish to another topic is committed and delivered meanwhile, and the
    retry is answered with its commit, or refused naming the stream (and then stored by a later retry)."""
    import zmq

    from bucketwire import protocol as P

    meta = _meta_leader(cluster)
    s = _stack(cluster, tmp_path, meta, '[topics.dj]\nmax_attempts = 1\ndead_letter = "dj-dead"\n\n'
                                        '[groups.g]\ntopics = ["dj", "dold"]\nplugins = []\n')
    try:
        s.start_hub()
        s.start_worker("g", 1)
        with s.client(10) as c:
            assert c.publish("dj", {"permanent": True})["seq"] == 1
            wait_for(lambda: s.status()["groups"]["g"]["dead_lettered"] == 1, 20, "the event dead-lettered")
            assert c.publish("dold", {"n": 1})["seq"] == 1
        wait_for(lambda: any(h["t"] == "dold" for h in s.handled()), 20, "the first event of 'dold' handled")
        assert _hub_node(cluster) != meta
        _meta_leader_serving_only_creation(cluster, meta, [f"{PREFIX}_ev_dj", f"{PREFIX}_ev_dold",
                                                           f"{PREFIX}_ev_dj-dead", f"KV_{PREFIX}_leases",
                                                           f"KV_{PREFIX}_cursors"])
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{s.work_port}")
        pid = cluster.nodes[meta].proc.pid  # type: ignore[union-attr]
        os.killpg(pid, signal.SIGSTOP)
        try:
            _dlq(sock, 1, [{"topic": "dj-dead", "seq": 1}])  # its marker's topic has no stream yet
            with s.client(10) as c:  # read after it: committed, and delivered, while the retry waits
                assert c.publish("dold", {"n": 2})["seq"] == 2
            wait_for(lambda: any(h["t"] == "dold" and h["s"] == 2 for h in s.handled()), 10,
                     "the later event of 'dold' handled")
            early = _reply(sock) if sock.poll(0) else None
        finally:
            os.killpg(pid, signal.SIGCONT)
        assert early is None, f"the dlq retry was answered before a later publish to another topic was handled: {early}"
        cmd, doc = _reply(sock)
        sock.close()
        assert cmd == P.DLQR, (cmd, doc)
        cluster.wait_ready()
        if doc.get("error"):  # refused, naming the stream it waited for; nothing of it was stored
            assert f"{PREFIX}_ev___" in doc["error"] and "'dj-dead.handled'" in doc["error"], doc
            with s.client(10) as c:
                _, doc, _ = c.request(P.DLQ, {"action": "retry", "items": [{"topic": "dj-dead",
                                                                                       "seq": 1}], "by": "test"},
                                      {P.DLQR})
        assert [r.get("error") for r in doc["results"]] == [None], doc
        assert not doc["results"][0].get("duplicate"), doc  # handled now, not before
        # The retried event reaches group g (and fails again: a second dead letter).
        wait_for(lambda: s.status()["groups"]["g"]["dead_lettered"] == 2, 20, "the retried event delivered")
    finally:
        s.stop()


def _lead_on(cluster: NatsCluster, stream: str, node: int) -> None:
    """Move `stream`'s leadership to `node` (a stepdown naming it as preferred, asked again until it holds)."""
    name = cluster.nodes[node].name
    ask = json.dumps({"placement": {"preferred": name}}).encode()

    def there() -> bool:
        if _stream_leader(cluster, stream) == name:
            return True
        _js(cluster, f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", ask)
        return False

    wait_for(there, 60, f"{stream} led by {name}")


def _status(sock: Any, req: int) -> dict[str, Any]:
    """A STATUS request's answer, which must come within one attempt of a client (P.ATTEMPT_TIMEOUT: after that
    it sends again on a new socket, and a later answer reaches nobody)."""
    from bucketwire import protocol as P

    sock.send_multipart([P.STATUS, P.enc({"req": req})])
    assert sock.poll(int(P.ATTEMPT_TIMEOUT * 1000)), "status was not answered within one client attempt"
    cmd, body = sock.recv_multipart()[:2]
    assert cmd == P.STATUSR, cmd
    doc: dict[str, Any] = json.loads(body)
    assert doc["req"] == req, doc
    return doc


def test_status_never_waits_for_the_lease_bucket(cluster: NatsCluster, tmp_path: Path) -> None:
    """`status` says which hub dispatches each group, read from the lease bucket, and the hub renews its leases
    there. Both ran on the loop: with the bucket's stream leader frozen each status, and each lease round (a
    quarter of request_timeout per group), held every topic. Both run on the client's thread now: status answers
    at once with the last reading and how old it is, and a topic's publishes are answered and its events delivered
    meanwhile, each within one client attempt."""
    import time

    import zmq

    from bucketwire import protocol as P

    frozen = (_meta_leader(cluster) + 1) % len(cluster.nodes)  # not the meta leader: only the lease bucket's
    # A lease that outlives the window below (dispatch goes on: delivery shows the loop turning), renewed every
    # 3 s, each renewal round asking for 4 groups' leases.
    lease_ttl = 9.0
    groups = "".join(f'[groups.{g}]\ntopics = ["flow"]\nplugins = []\n\n' for g in ("sg", "sg2", "sg3", "sg4"))
    s = _stack(cluster, tmp_path, frozen, groups, lease_ttl=lease_ttl, prefix="ntl")
    try:
        s.start_hub()
        s.start_worker("sg", 1)
        with s.client(10) as c:
            assert c.publish("flow", {"n": 0})["seq"] == 1
        wait_for(lambda: any(h["t"] == "flow" for h in s.handled()), 20, "the first event handled")
        others = [k for k in range(len(cluster.nodes)) if k != frozen]
        for stream in ("ntl_ev_flow", "KV_ntl_cursors"):
            if _stream_leader(cluster, stream) == cluster.nodes[frozen].name:
                _lead_on(cluster, stream, others[0])
        _lead_on(cluster, "KV_ntl_leases", frozen)
        assert _hub_node(cluster) != frozen

        def committed() -> bool:
            try:
                with s.client(10) as c:
                    return bool(c.publish("flow", {"n": 1})["seq"] >= 2)
            except (HubRefused, HubUnavailable):
                return False

        # Moving a stream's leader is an election: a commit meanwhile waits for it (up to request_timeout), and the
        # loop with it (a CI run's first status below waited 3 s so). What this test holds to one attempt is the
        # frozen lease bucket's effect, so it starts once a commit goes through on the moved leaders.
        wait_for(committed, 60, "a commit once the moved streams have their leaders")
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{s.work_port}")
        st = _status(sock, 1)
        assert st["dispatch"]["sg"]["leader"] == s.cfg.hub.id and st["hub"]["leases_age"] is not None, st
        pid = cluster.nodes[frozen].proc.pid  # type: ignore[union-attr]
        os.killpg(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            ages: list[float] = []
            n = 1
            # Until status has said its reading is stale, and for longer than a lease round's interval: not a
            # timing assertion, the window that holds one round (a new leader is elected 4 s or more after the
            # freeze, and the lease stays valid 7 s after its last renewal).
            while max(ages, default=0.0) < 2.0 or time.monotonic() - frozen_at < lease_ttl / 3 + 0.5:
                n += 2
                # A guard, not a timing assertion: the loop is bounded by the clock, since a faster hub turns
                # it more often (a CI run went through 500 turns before the reading was 2 s old).
                assert time.monotonic() - frozen_at < 60.0, (n, ages[-5:])
                st = _status(sock, n)
                assert st["dispatch"]["sg"] == {"leader": s.cfg.hub.id, "endpoint": s.cfg.hub.advertise,
                                                "role": "dispatching"}, st
                ages.append(st["hub"]["leases_age"])
                _pub(sock, n + 1, [("flow", f"e{n}")])
                assert sock.poll(int(P.ATTEMPT_TIMEOUT * 1000)), "a publish was not answered within one attempt"
                cmd, doc = _reply(sock)
                assert (cmd, doc["req"]) == (P.PUBACK, n + 1), (cmd, doc)
                seq = doc["results"][0]["seq"]
                wait_for(lambda seq=seq: any(h["t"] == "flow" and h["s"] == seq for h in s.handled()), 10,
                         f"event {seq} handled")
        finally:
            os.killpg(pid, signal.SIGCONT)
        sock.close()
        cluster.wait_ready()
        wait_for(lambda: s.status()["hub"]["leases_age"] < 2.0, 30, "a fresh reading of the leases")
    finally:
        s.stop()
