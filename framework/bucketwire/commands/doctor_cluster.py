"""`doctor` with `[journal] backend = "jetstream"`: is the cluster that holds the journal healthy?

Several hubs share one JetStream cluster, so the questions at 3 a.m. are about the cluster, not one hub: is every
server up, are the topic streams' copies current (a node that fell behind is one more failure away from losing
the majority), which hub dispatches each group (a group nobody leads is a group nobody works on), and how far each
group is behind. Everything is read from JetStream itself (stream info, the lease and cursor KV buckets), so the
answer is the same whichever host runs doctor and whether or not a hub is up.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bucketwire.commands.doctor import Finding
from bucketwire.config import Config
from bucketwire.hub.backends import jetstream_settings
from bucketwire.hub.journal_jetstream import JetStreamSettings, auth_options, kv_latest, stream_list, token, untoken

_FIX_SERVER = "start nats-server (with -js) there, or fix [journal] servers"


def _connect_options(s: JetStreamSettings, servers: list[str], timeout: float) -> dict[str, Any]:
    """The hub's own credentials and TLS, without reconnects: doctor wants a yes or no, not a retry loop."""
    opts: dict[str, Any] = {"servers": servers, "connect_timeout": timeout, "allow_reconnect": False,
                            "max_reconnect_attempts": 0, "name": "bucketwire-doctor"}
    opts.update(auth_options(s))

    async def quiet(e: Exception) -> None:  # a down server is a finding, not log noise
        return None

    opts["error_cb"] = quiet
    return opts


async def _reachable(s: JetStreamSettings, url: str, timeout: float) -> Finding:
    import nats

    try:
        nc = await asyncio.wait_for(nats.connect(**_connect_options(s, [url], timeout)), timeout + 1)
    except Exception as e:  # refused, timed out, auth: each is the same finding with its reason
        if isinstance(e, TimeoutError):
            why = f"no answer within {timeout:g}s"
        else:
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        if "authorization" in why.lower() or "authentication" in why.lower():
            # Up and answering: the server list is right and the credentials are not (the hub says the same).
            return Finding("error", f"[journal] server {url}: refused the credentials ({why})",
                           "check [journal] user and password (or token, creds) against the server's")
        return Finding("error", f"[journal] server {url}: not reachable ({why})", _FIX_SERVER)
    try:
        js_on = bool(nc._server_info.get("jetstream"))
    finally:
        await nc.close()
    if not js_on:
        return Finding("error", f"[journal] server {url}: answers but JetStream is off",
                       "run nats-server with -js (JetStream) on that node")
    return Finding("ok", f"[journal] server {url}: reachable, JetStream on")


async def _streams(nc: Any, prefix: str, timeout: float) -> dict[str, dict[str, Any]]:
    """topic -> raw stream info of every topic stream under `prefix`."""
    want = f"{prefix}_ev_"
    return {untoken(str(info.get("config", {}).get("name", ""))[len(want):]): info
            async for info in stream_list(nc, timeout)
            if str(info.get("config", {}).get("name", "")).startswith(want)}


async def _kv(nc: Any, bucket: str, timeout: float) -> dict[str, bytes]:
    """Every live key of a KV bucket with its value, read through the bucket's stream leader (nats-py's `keys()`
    answers "no keys" now and then while keys are being rewritten, and hubs rewrite their leases all the time);
    empty when the bucket does not exist yet."""
    return {k: v for k, (v, _) in (await kv_latest(nc, bucket, timeout, missing_ok=True)).items()}


def _replica_findings(topic: str, info: dict[str, Any]) -> list[Finding]:
    cl = info.get("cluster") or {}
    where = f"topic {topic!r} stream {info['config']['name']}"
    if not cl.get("leader"):
        return [Finding("error", f"{where}: no stream leader (fewer than a majority of its replicas are up)",
                        "bring the stopped NATS nodes back; hubs cannot commit to this topic until then")]
    out: list[Finding] = []
    for r in cl.get("replicas") or []:
        if r.get("offline") or not r.get("current"):
            heard = float(r.get("active", 0)) / 1e9  # nanoseconds since the leader last heard from it
            state = "offline" if r.get("offline") else \
                f"not current ({int(r.get('lag', 0))} op(s) behind, last heard {heard:.1f}s ago)"
            out.append(Finding("warn", f"{where}: replica on {r.get('name')} is {state}",
                               "bring that node back; one more node down and commits stop"))
    if not out:
        n = 1 + len(cl.get("replicas") or [])
        out.append(Finding("ok", f"{where}: leader {cl['leader']}, {n} replica(s) current"))
    return out


async def _cluster(cfg: Config) -> list[Finding]:
    import nats

    s = jetstream_settings(cfg)
    timeout = min(s.connect_timeout, 2.0)
    out = list(await asyncio.gather(*(_reachable(s, u, timeout) for u in s.servers)))
    if not any(f.level == "ok" for f in out):
        return out
    try:
        nc = await asyncio.wait_for(nats.connect(**_connect_options(s, s.servers, timeout)),
                                    (timeout + 1) * len(s.servers))
    except Exception as e:  # reachable one by one a moment ago: say so and stop here
        return out + [Finding("error", f"[journal] servers: cannot connect ({e})", _FIX_SERVER)]
    try:
        req = min(s.request_timeout, 5.0)
        try:
            streams = await _streams(nc, s.prefix, req)
            leases = await _kv(nc, f"{s.prefix}_leases", req)
            cursors = await _kv(nc, f"{s.prefix}_cursors", req)
        except Exception as e:  # no JetStream quorum answers the API
            return out + [Finding("error", f"JetStream does not answer ({str(e) or type(e).__name__})",
                                  "bring a majority of the NATS nodes back")]
        for topic in sorted(streams):
            out += _replica_findings(topic, streams[topic])
    finally:
        await nc.close()
    for g, gc in sorted(cfg.groups.items()):
        raw = leases.get(f"g.{token(g)}")
        if raw is None:
            out.append(Finding("error", f"group {g}: no hub leads group {g}, so nothing dispatches its events",
                               "start a hub with this [journal] (`bucketwire hub -c CONFIG`)"))
        else:
            try:
                doc = json.loads(raw)
                hub, work = str(doc["hub"]), str(doc.get("work", ""))
            except (ValueError, KeyError, TypeError):
                hub, work = raw.decode(errors="replace"), ""
            out.append(Finding("ok", f"group {g}: hub {hub} leads" + (f" (work {work})" if work else "")))
        lag = 0
        for t in gc.topics:
            info = streams.get(t)
            if info is None:
                continue  # no event ever published to it
            last = int(info.get("state", {}).get("last_seq", 0))
            c = cursors.get(f"c.{token(g)}.{token(t)}")
            acked = int(json.loads(c)["acked"]) if c else int(info.get("state", {}).get("first_seq", 1)) - 1
            lag += max(0, last - acked)
        out.append(Finding("ok", f"group {g}: {lag} event(s) committed and not yet acked"))
    return out


def check_cluster(cfg: Config) -> list[Finding]:
    """One finding per server, per topic stream's replicas, per group's leader and lag."""
    if cfg.journal.backend != "jetstream":
        return []
    try:
        import nats  # noqa: F401
    except ImportError:
        return [Finding("error", "[journal] backend = \"jetstream\" but the NATS client is not installed",
                        "pip install 'bucketwire[nats]'")]
    return asyncio.run(_cluster(cfg))
