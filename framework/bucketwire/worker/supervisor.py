"""The worker supervisor: N child processes (Python has a GIL, so a pool is processes), restarted on crash,
drained on SIGTERM. The supervisor holds no durable state and no socket: kill it or any child at any moment
and the hub redelivers what was in flight.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any

from bucketwire import config as config_mod
from bucketwire import logs
from bucketwire.config import Config, ConfigError
from bucketwire.procutil import on_stop_signals
from bucketwire.worker.child import Plugins, WorkerSpec, child_main

log = logging.getLogger("bucketwire.worker")


def _child(cfg_path: str | None, cfg: Config | None, spec: WorkerSpec, log_format: str, verbosity: int) -> None:
    logs.setup(log_format, verbosity)
    if cfg is None:
        cfg = config_mod.load(cfg_path, warn=False)
    os._exit(child_main(cfg, spec))


def make_spec(cfg: Config, group: str, topics: list[str] | None, local_plugins: list[str],
              credit: int | None = None, start: str | None = None) -> WorkerSpec:
    gc = cfg.groups.get(group)
    if gc is None and not topics:
        known = ", ".join(sorted(cfg.groups)) or "none"
        raise ConfigError(f"{cfg.path}: no [groups.{group}] section (groups: {known}); add it or pass --topic")
    if gc is not None and topics:
        extra = [t for t in topics if t not in gc.topics]
        if extra:
            raise ConfigError(f"--topic {extra[0]}: group {group!r} consumes {gc.topics}; add it to "
                              f"[groups.{group}] topics")
    return WorkerSpec(
        group=group,
        topics=topics or (gc.topics if gc else []),
        credit=credit or (gc.credit if gc else 16),
        local_plugins=local_plugins,
        start=start or (gc.start if gc else "latest"),
        heartbeat_interval=cfg.hub.heartbeat_interval,
        heartbeat_timeout=cfg.hub.heartbeat_timeout,
    )


def run_pool(cfg: Config, spec: WorkerSpec, processes: int, *, log_format: str = "text", verbosity: int = 0,
             drain_timeout: float = 30.0, metrics: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code. `metrics` HOST:PORT serves the pool's /metrics."""
    # Validate once here so a config mistake is one line, not N children crash-looping.
    Plugins(cfg, spec)
    ctx = mp.get_context("spawn")
    cfg_path = str(cfg.path) if cfg.path else None
    stop = threading.Event()
    on_stop_signals(stop.set)
    children: dict[int, Any] = {}
    restarts: dict[int, list[float]] = {}
    restarted = [0]
    served = None
    if metrics:  # before the first spawn: children inherit the multiprocess directory from the environment
        from bucketwire.worker.metrics import Supervisor

        served = Supervisor(metrics, spec.group, lambda: sum(p.is_alive() for p in children.values()),
                            lambda: restarted[0])

    def spawn(slot: int) -> None:
        p = ctx.Process(target=_child, args=(cfg_path, None if cfg_path else cfg, spec, log_format, verbosity),
                        name=f"bucketwire-worker-{spec.group}-{slot}", daemon=False)
        p.start()
        children[slot] = p

    for i in range(processes):
        spawn(i)
    log.info("worker pool started", extra={"group": spec.group, "processes": processes, "topics": spec.topics})
    code = 0
    while not stop.is_set():
        sentinels = {p.sentinel: slot for slot, p in children.items()}
        ready = wait(list(sentinels), timeout=0.5)
        for s in ready:
            slot = sentinels[s]
            p = children[slot]
            p.join()
            if stop.is_set():
                break
            if p.exitcode == 2:
                log.error("worker child exited with a configuration error; stopping the pool")
                stop.set()
                code = 2
                break
            hist = [t for t in restarts.get(slot, []) if time.monotonic() - t < 60] + [time.monotonic()]
            restarts[slot] = hist
            delay = min(30.0, 0.1 * 2 ** (len(hist) - 1))
            restarted[0] += 1
            if served is not None:
                served.child_died(p.pid)
            log.warning("worker child died; restarting", extra={"slot": slot, "exitcode": p.exitcode,
                                                                "delay": round(delay, 2)})
            time.sleep(delay)
            spawn(slot)
    log.info("draining worker pool", extra={"group": spec.group})
    for p in children.values():
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout
    for p in children.values():
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("child did not drain in time; killing", extra={"pid": p.pid})
            p.kill()
            p.join()
    if served is not None:
        served.stop()
    log.info("worker pool stopped", extra={"group": spec.group})
    return code


def default_processes(cfg: Config, group: str) -> int:
    gc = cfg.groups.get(group)
    return gc.processes if gc else 2


