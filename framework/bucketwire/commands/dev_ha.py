"""`bucketwire dev --ha`: the HA setup of docs/deployment.md on one machine, to watch a takeover happen.

Three JetStream nodes, two hubs on them (each its own addresses, state_dir and id), one worker pool per group
that knows both hubs' work endpoints and follows the dispatcher, and SeaweedFS. SeaweedFS's filer notifies one
webhook URL, so it points at hub b while hub a (started first) dispatches: killing the dispatcher then shows the
takeover without losing the store's events. Stop order: workers drain, then hubs, then NATS, then SeaweedFS.
"""

from __future__ import annotations

import os
import secrets
import shlex
import threading
from pathlib import Path
from typing import Any

import click

from bucketwire.commands.dev import (
    Children,
    DevError,
    Interrupted,
    _demo,
    banner,
    bucketwire_argv,
    effective_config,
    make_buckets,
    wait_healthy,
    wait_pools,
    write_config,
)
from bucketwire.devstack.nats import NatsCluster, NatsError, find_nats_server
from bucketwire.devstack.seaweedfs import WeedError, WeedServer
from bucketwire.procutil import free_port, on_stop_signals

HUBS = ("a", "b")
WEBHOOK_HUB = "b"


def ha_configs(base: dict[str, Any], root: Path, weed: WeedServer, token: str, nats_urls: list[str],
               ports: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """One effective config per hub: its own addresses, state_dir and id; the same journal; clients list both."""
    docs: dict[str, dict[str, Any]] = {}
    for name in HUBS:
        b = dict(base)
        b["hub"] = {**base.get("hub", {}), "state_dir": f"hub-{name}"}
        doc = effective_config(b, root, weed, token, ports[name])
        doc["hub"]["id"] = f"hub-{name}"
        doc["journal"] = {"backend": "jetstream", "servers": nats_urls, "replicas": 3, "prefix": "bucketwire_dev"}
        docs[name] = doc
    for name, doc in docs.items():
        order = [name] + [o for o in HUBS if o != name]  # its own hub first
        doc["client"] = {"work": [docs[o]["hub"]["work"] for o in order],
                         "publish": [docs[o]["hub"]["publish"] for o in order]}
    return docs


def run_ha(root: Path, base: dict[str, Any], buckets: list[str], demo: bool, s3_port: int | None) -> None:
    try:
        find_nats_server()
    except NatsError as e:
        raise DevError(str(e)) from None
    ports = {n: {"http": free_port(), "publish": free_port(), "work": free_port()} for n in HUBS}
    token = secrets.token_urlsafe(24)
    weed = WeedServer(root / "seaweedfs",
                      webhook_url=f"http://127.0.0.1:{ports[WEBHOOK_HUB]['http']}/seaweedfs/events",
                      webhook_token=token, ports={"s3": s3_port} if s3_port else None, die_with_parent=True)
    cluster = NatsCluster(root / "nats", size=3, die_with_parent=True)
    children = Children(root / "logs")
    stopping = threading.Event()
    on_stop_signals(stopping.set)

    def check_stop() -> None:
        if stopping.is_set():
            raise Interrupted

    try:
        try:
            cluster.start()
        except NatsError as e:
            raise DevError(str(e)) from None
        try:
            weed.start(timeout=60)
        except WeedError as e:
            raise DevError(str(e)) from None
        check_stop()
        docs = ha_configs(base, root, weed, token, cluster.urls, ports)
        paths = {n: root / f"bucketwire-{n}.toml" for n in HUBS}
        cfgs = {n: write_config(paths[n], docs[n], "bucketwire dev --ha") for n in HUBS}
        make_buckets(weed, buckets)
        argv0 = bucketwire_argv()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        pids: dict[str, int] = {}
        for n in HUBS:  # a first: it takes the leases, so the webhook hub b starts as the standby
            pids[n] = children.spawn(f"hub-{n}", [*argv0, "hub", "-c", str(paths[n])], env).pid
            wait_healthy(f"http://{docs[n]['hub']['http']}/healthz", children, stopping)
            check_stop()
        for group in cfgs["a"].groups:
            children.spawn(f"worker-{group}", [*argv0, "worker", "-c", str(paths["a"]), "--group", group], env,
                           worker=True)
        wait_pools(cfgs["a"], children, stopping)
        check_stop()
        w = WEBHOOK_HUB  # the top lines describe the hub the store notifies; its config lists both hubs
        click.echo(banner(weed, buckets, docs[w], paths[w], children.log_dir, argv0))
        click.echo(ha_banner(docs, paths, pids, cluster.urls, argv0))
        if demo:
            _demo(cfgs[WEBHOOK_HUB], weed, stopping, children)
        while not stopping.wait(0.5):
            dead = [d for d in children.dead() if not d[0].startswith("hub-")]  # a killed hub is the point
            if dead:
                raise DevError("{} stopped unexpectedly {}".format(*dead[0]))
    except Interrupted:
        pass  # stopped during startup: the finally below stops what was started
    finally:
        click.echo("stopping...", err=True)
        children.stop()  # workers drain first, then the hubs
        cluster.stop()
        weed.stop()
    click.echo("stopped", err=True)


def ha_banner(docs: dict[str, dict[str, Any]], paths: dict[str, Path], pids: dict[str, int], nats_urls: list[str],
              argv0: list[str]) -> str:
    def cmd(*args: str) -> str:
        return shlex.join([*argv0, *args])

    lines = [f"  nats          {', '.join(nats_urls)}"]
    for n in HUBS:
        h = docs[n]["hub"]
        lines.append(f"  hub {n}         pid {pids[n]}  http {h['http']}  work {h['work']}  config {paths[n]}")
    lines += [
        f"  webhook hub   {WEBHOOK_HUB} (SeaweedFS notifies one URL)",
        f"  leader        {cmd('status', '--json', '-c', str(paths['b']))}  (\"dispatch\": leader per group)",
        f"  takeover      kill {pids['a']}  (hub a dispatches now; hub b takes over within [journal] lease_ttl)",
    ]
    return "\n".join(lines)
