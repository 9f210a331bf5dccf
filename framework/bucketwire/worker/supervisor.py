"""The worker supervisor: N child processes (Python has a GIL, so a pool is processes), restarted on crash,
drained on SIGTERM. The supervisor holds no durable state: kill it or any child at any moment and the hub
redelivers what was in flight.

It watches what each child is running (worker/running.py): a handler past its `handler_timeout` gets its child
killed and replaced, and when a child dies the supervisor tells the hub over its one socket which event was
running, so that event alone is charged an attempt.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from typing import Any

import zmq

from bucketwire import config as config_mod
from bucketwire import logs, security, zmtp
from bucketwire import protocol as P
from bucketwire.config import Config, ConfigError, GroupConfig
from bucketwire.procutil import on_stop_signals, stop_with_parent
from bucketwire.worker.child import EXIT_EXHAUSTED, Plugins, WorkerSpec, child_main
from bucketwire.worker.running import Running, RunningSlot
from bucketwire.worker.startup_failures import StartupFailures, read_note
from bucketwire.worker.stop_signals import sigint_ignored_by_children
from bucketwire.zmtp import LocalDealer

log = logging.getLogger("bucketwire.worker")


def _child(cfg_path: str | None, cfg: Config | None, spec: WorkerSpec, log_format: str, verbosity: int,
           raw_slot: Any, supervisor: int) -> None:
    stop_with_parent(supervisor)
    logs.setup(log_format, verbosity)
    if cfg is None:
        cfg = config_mod.load(cfg_path, warn=False)
    os._exit(child_main(cfg, spec, RunningSlot(raw_slot)))


class DeathNotices:
    """The supervisor's sockets: tell the hub, the moment a child dies, which event its handler was running, and
    heartbeat for a child inside a long handler (which also reports that run to a hub the child does not know).

    Without them the hub only learns of the death by heartbeat timeout and cannot tell the poison from the innocent
    events queued behind it in the same child. One socket per hub of `[client] work`, each notice to every hub that
    is connected: the child's connection cannot follow the group to the next dispatcher while its one thread is in
    a handler, so the supervisor tells that hub what the child still runs (hub/reports.py), and a hub that does not
    dispatch the group ignores the notice or keeps it for when it does. Fire and forget: a notice is sent only on
    a connection that is up (ZMQ_IMMEDIATE: none queues for a hub that is down, to arrive stale after its
    restart); when no hub can be reached it is dropped and the hub falls back to the heartbeat timeout (see
    GroupState.worker_gone).
    """

    def __init__(self, cfg: Config, group: str) -> None:
        self.group = group
        self.startfail_refused = False  # a hub answered STARTFAIL `unknown command` (said once)
        self.zctx = zmq.Context()
        self.socks: list[zmq.Socket[bytes] | LocalDealer] = []
        for endpoint in dict.fromkeys(cfg.client.work_endpoints):
            local = zmtp.dealer(endpoint, linger_ms=1000)
            if local is not None:  # the hub's local socket: no CURVE there (the OS account admits)
                self.socks.append(local)
                continue
            sock: zmq.Socket[bytes] = self.zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            security.apply_client(sock, cfg)
            sock.connect(endpoint)
            self.socks.append(sock)

    def read_answers(self) -> None:
        """Read what the hubs answered (nothing, unless they refused a notice), without waiting. A hub that
        predates STARTFAIL refuses each with `ERR unknown command`: said once, as `status` will not show the
        failing starts, and not again for each report it refuses."""
        for sock in self.socks:
            while True:
                try:
                    if isinstance(sock, LocalDealer):
                        if not sock.readable():
                            break
                        frames = sock.recv_frames(zmq.NOBLOCK)
                    else:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) >= 2 and frames[0] == P.ERR and not self.startfail_refused:
                    try:
                        error = P.decode(frames[1], P.Err).error
                    except Exception:  # an answer this pool cannot read is no reason to stop it
                        continue
                    if "unknown command" in error and "STARTFAIL" in error:
                        self.startfail_refused = True
                        log.warning("hub does not support startup-failure reports; upgrade the hub to see them in "
                                    "status", extra={"group": self.group})

    def _send(self, cmd: bytes, hdr: dict[str, Any]) -> bool:
        """To every hub connected now; False when none is."""
        frames, sent = [cmd, P.enc(hdr)], False
        self.read_answers()  # a DEALER's unread answers would pile up to its HWM
        for sock in self.socks:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                sent = True
            except zmq.Again:
                pass
        return sent

    def child_died(self, ident: bytes, running: Running | None, reason: str) -> None:
        hdr = {"g": self.group, "w": ident.hex(), "running": [running.topic, running.seq] if running else None,
               "reason": reason}
        if not self._send(P.GONE, hdr):
            log.warning("hub not reachable; it will notice the dead child by heartbeat timeout")

    def running(self, ident: bytes, r: Running, now: float) -> bool:
        """Heartbeat for a child whose one thread is inside a handler and so cannot (see worker/child.py). When the
        hub is unreachable nothing goes out (the child's own heartbeats would not get through either), and False
        says so: the next tick tries again, so a restarted hub hears of the run within a tick of its start."""
        return self._send(P.RUNNING, {"g": self.group, "w": ident.hex(),
                                      "run": [r.topic, r.seq, round(now - r.started, 3), r.timeout]})

    def ended(self, ident: bytes, topic: str, seq: int) -> None:
        """The handler `running` spoke for has ended (the child lives on): a hub that holds that event only
        because of those notices gives it back, uncharged, unless the child's ACK reaches it first. A hub that
        knows the child itself just stops showing the run."""
        self._send(P.RUNNING, {"g": self.group, "w": ident.hex(), "ended": [topic, seq]})

    def startup_failing(self, plugin: str, line: str, count: int, retry_in: float) -> None:
        """The pool's children cannot start: `plugin`'s worker_startup raised `line`, `count` times in a row (0:
        it has started since), shown by `status` (hub/startfail.py). A hub not reachable now hears the next one."""
        self._send(P.STARTFAIL, {"g": self.group, "host": socket.gethostname()[:64], "pid": os.getpid(),
                                 "plugin": plugin[:200], "line": line[:1024], "count": count,
                                 "retry_in": round(retry_in, 3)})

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.zctx.term()


class Exits:
    """Per slot, a descriptor that becomes readable once that slot's child has ended: a pidfd.

    Why not the child's `Process.sentinel`: that is a pipe whose writing end the child holds, and any process a
    handler forks (`os.fork()`, `subprocess` with `close_fds=False`, a daemonizing library) inherits it. While
    such a leftover lives the sentinel never fires: the pool did not see its child die, kept telling the hub the
    dead child's handler was running, and every event the child held stalled. A pidfd is about the process
    alone. Kernels before 5.3 have none; there the sentinel it is, as before.
    """

    def __init__(self) -> None:
        self._fds: dict[int, tuple[int, Any]] = {}

    def watch(self, slot: int, p: Any) -> None:
        self.forget(slot)
        try:
            fd = os.pidfd_open(p.pid)
        except (OSError, AttributeError):
            fd = -1
        self._fds[slot] = (fd, p)

    def fd(self, slot: int) -> int:
        fd, p = self._fds[slot]
        return fd if fd >= 0 else int(p.sentinel)

    def wait(self, slot: int, timeout: float) -> None:
        """Return once the slot's child has ended, or after `timeout` seconds."""
        wait([self.fd(slot)], timeout=timeout)

    def forget(self, slot: int) -> None:
        fd, _ = self._fds.pop(slot, (-1, None))
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        for slot in list(self._fds):
            self.forget(slot)


def frozen(pid: int | None) -> bool:
    """A stopped child (SIGSTOP, a debugger) is not working on its event: the supervisor does not speak for it,
    so the hub finds it by heartbeat timeout as it would a vanished host."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def death_reason(exitcode: int | None, running: bool = True) -> str:
    """The dead letter's line for a child's death. `running`: a handler was running (its event is the one
    charged); else the hub charges the oldest event the child held, whose handlers ran first."""
    if exitcode is not None and exitcode < 0:
        try:
            how = signal.Signals(-exitcode).name
        except ValueError:
            how = f"signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    if running:
        return f"worker child died ({how}) while handling the event"
    return (f"worker child died ({how}) after the event's handlers returned, before its ack was sent (it was the "
            "oldest event the child held; a handler can break its process for later, by closing its descriptors)")


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
    if gc is None:  # a group only the command line names: the schema's defaults, written once in config.py
        gc = GroupConfig(name=group, topics=topics or [])
    return WorkerSpec(
        group=group,
        topics=topics or gc.topics,
        credit=credit or gc.credit,
        local_plugins=local_plugins,
        start=start or gc.start,
        heartbeat_interval=cfg.hub.heartbeat_interval,
        heartbeat_timeout=cfg.hub.heartbeat_timeout,
    )


RESTART_BACKOFF = (0.1, 30.0)
"""A crashing child is replaced after base * 2**(crashes in the last minute - 1) seconds, at most max."""


def _stop_wakeup(stop: threading.Event, reload: threading.Event) -> int:
    """SIGTERM/SIGINT set `stop`, SIGHUP sets `reload`, and either makes the returned fd readable: the loop below
    waits on it with the children, so a stop during a long restart backoff (up to 30 s) drains at once instead of
    when the wait times out."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)

    def wake() -> None:
        try:
            os.write(w, b"\0")
        except BlockingIOError:
            pass

    def on_stop() -> None:
        stop.set()
        wake()

    def on_hup(signum: int, frame: Any) -> None:
        reload.set()
        wake()

    on_stop_signals(on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    return r


def _warn_misspelt_sections(cfg: Config, running: list[str]) -> None:
    """A `[plugins.X]` section whose name is close to a plugin this pool runs but is none: its settings are not
    used, and the plugin runs with its defaults. Only close names are said: a section for a plugin that other
    pools run (on other hosts, with other plugins installed) is not a mistake."""
    for name in cfg.plugins:
        if name in running:
            continue
        close = difflib.get_close_matches(name, running, n=1, cutoff=0.8)
        if close and close[0] not in cfg.plugins:
            log.warning(f"[plugins.{name}] names no plugin this pool runs (it runs: {', '.join(running)}); did you "
                        f"mean [plugins.{close[0]}]? its settings are not used")


def run_pool(cfg: Config, spec: WorkerSpec, processes: int, *, log_format: str = "text", verbosity: int = 0,
             drain_timeout: float = 30.0, metrics: str | None = None, metrics_setting: str = "--metrics",
             restart_backoff: tuple[float, float] = RESTART_BACKOFF) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code. `metrics` HOST:PORT serves the pool's /metrics
    (`metrics_setting`: the flag or config key it came from, for the line when it cannot be served)."""
    # Validate once here so a config mistake is one line, not N children crash-looping.
    _warn_misspelt_sections(cfg, Plugins(cfg, spec).loaded.names)
    ctx = mp.get_context("spawn")
    cfg_path = str(cfg.path) if cfg.path else None
    stop = threading.Event()
    reload = threading.Event()
    woken = _stop_wakeup(stop, reload)
    reloading: set[int] = set()  # slots whose child was asked to drain by a SIGHUP: replaced at once, not a crash
    # When each of those is killed if it has not exited: a reload is bounded by drain_timeout as a stop is (a
    # worker_shutdown that hangs kept its slot empty for good, the pool taking no event again).
    reload_by: dict[int, float] = {}
    children: dict[int, Any] = {}
    exits = Exits()
    slots: dict[int, RunningSlot] = {}
    timed_out: dict[int, Running] = {}
    respawn_at: dict[int, float] = {}  # slot -> when its crashed child is replaced (crash-loop backoff)
    restarts: dict[int, list[float]] = {}
    restarted = [0]
    served = None
    if metrics:  # before the first spawn: children inherit the multiprocess directory from the environment
        from bucketwire.worker.metrics import Supervisor

        served = Supervisor(metrics, spec.group, lambda: sum(p.is_alive() for p in children.values()),
                            lambda: restarted[0], metrics_setting, lambda: len(failing.in_a_row))
    notices = DeathNotices(cfg, spec.group)
    failing = StartupFailures(restart_backoff, notices.startup_failing)  # children whose worker_startup raised

    def spawn(slot: int) -> None:
        rs = slots.get(slot) or slots.setdefault(slot, RunningSlot.shared(ctx))
        rs.reset()
        p = ctx.Process(target=_child,
                        args=(cfg_path, None if cfg_path else cfg, spec, log_format, verbosity, rs.raw,
                              os.getpid()),
                        name=f"bucketwire-worker-{spec.group}-{slot}", daemon=False)
        with sigint_ignored_by_children():
            p.start()
        children[slot] = p
        exits.watch(slot, p)

    tick = min(0.5, spec.heartbeat_interval / 2)
    spoke: dict[int, float] = {}  # slot -> when we last heartbeated for its child
    spoke_for: dict[int, tuple[bytes, str, int]] = {}  # slot -> the child and the run we last heartbeated for

    def kill_overdue(now: float) -> float:
        """Kill the children whose handler passed its handler_timeout, heartbeat for those inside a handler;
        returns when to look again."""
        nxt = now + tick
        for slot, p in children.items():
            r = slots[slot].read()
            was = spoke_for.get(slot)
            if was is not None and (r is None or (r.topic, r.seq) != was[1:]) and slot not in respawn_at:
                del spoke_for[slot]
                notices.ended(*was)
            if r is None or slot in timed_out or slot in respawn_at:
                continue
            if now < r.deadline:
                nxt = min(nxt, r.deadline)
                if (now - r.started >= tick and now - spoke.get(slot, 0.0) >= spec.heartbeat_interval
                        and not frozen(p.pid)):
                    ident = slots[slot].ident()
                    if ident and notices.running(ident, r, now):
                        spoke[slot] = now
                        spoke_for[slot] = (ident, r.topic, r.seq)
                continue
            log.warning("handler timed out; killing its worker child", extra={
                "topic": r.topic, "seq": r.seq, "handler_timeout": r.timeout, "pid": p.pid})
            timed_out[slot] = r
            p.kill()
        return nxt

    def report(slot: int, running: Running | None, reason: str) -> None:
        spoke_for.pop(slot, None)  # its GONE says it all
        ident = slots[slot].ident()
        if ident:
            notices.child_died(ident, running, reason)

    for i in range(processes):
        spawn(i)
    log.info("worker pool started", extra={"group": spec.group, "processes": processes, "topics": spec.topics})
    code = 0
    try:
        while not stop.is_set():
            if reload.is_set():
                # SIGHUP: every child drains (finishes the event in hand, gives back the rest) and is replaced by a
                # fresh process, which imports the plugins again: how an author loads an edited plugin.
                reload.clear()
                with contextlib.suppress(BlockingIOError):
                    os.read(woken, 64)
                live = [slot for slot, p in children.items() if slot not in respawn_at and p.is_alive()]
                log.info("reloading: each worker child drains and is replaced", extra={
                    "group": spec.group, "children": len(live), "waiting": len(respawn_at)})
                for slot in live:
                    reloading.add(slot)
                    reload_by[slot] = time.monotonic() + drain_timeout
                    os.kill(children[slot].pid, signal.SIGTERM)
                # A slot waiting out its restart backoff (a worker_startup that failed, up to 30 s) starts its
                # child now: the author who fixed the plugin and sent SIGHUP was left waiting, told nothing.
                for slot in respawn_at:
                    respawn_at[slot] = 0.0
            now = time.monotonic()
            for slot in [s for s, t in reload_by.items() if t <= now]:
                del reload_by[slot]
                if children[slot].is_alive():
                    log.warning("child did not drain in time for the reload; killing", extra={
                        "pid": children[slot].pid, "slot": slot, "drain_timeout": drain_timeout})
                    children[slot].kill()
            for slot in [s for s, t in respawn_at.items() if t <= now]:
                del respawn_at[slot]
                spawn(slot)
            failing.check_started(slots)
            notices.read_answers()
            wake = min([kill_overdue(now), *respawn_at.values(), *reload_by.values()])
            sentinels: dict[Any, int] = {exits.fd(slot): slot for slot in children if slot not in respawn_at}
            ready = wait([*sentinels, woken], timeout=max(0.0, wake - time.monotonic()))
            for s in ready:
                if s == woken:
                    break  # stopping: the while condition ends the loop
                slot = sentinels[s]
                p = children[slot]
                p.join()
                if stop.is_set():
                    break
                if slot in reloading:
                    reloading.discard(slot)
                    overdue = slot not in reload_by  # killed above, past drain_timeout
                    reload_by.pop(slot, None)
                    if p.exitcode == 0 or (overdue and p.exitcode == -signal.SIGKILL):
                        if p.exitcode != 0:  # as a stop does: a handler still running is charged, the rest given back
                            report(slot, slots[slot].read(),
                                   f"handler still running after the {drain_timeout:g} s drain timeout")
                        spawn(slot)
                        log.info("worker child restarted to load the plugins again", extra={"slot": slot})
                        continue
                running = slots[slot].read()
                # Exit code 2 is a child's configuration error (plugin settings, a hub that refused the worker for
                # good), said before or between events. A handler that ends its process with that code
                # (os._exit(2)) is a crash of its event, charged like any other, not a reason to stop the pool.
                if p.exitcode == 2 and running is None and slot not in timed_out:
                    log.error("worker child exited with a configuration error; stopping the pool")
                    stop.set()
                    code = 2
                    break
                r = timed_out.pop(slot, None)
                exhausted = r is None and p.exitcode == EXIT_EXHAUSTED and running is None
                startup = read_note(slots[slot]) if r is None and running is None else None
                if startup is not None:  # it never joined the hub: nothing to report there
                    delay = failing.failed(slot, startup)  # says it, once whole and then counted
                elif r is not None:  # our kill, not a crash: replace it at once
                    report(slot, r, f"handler timed out after {r.timeout:g} s (handler_timeout)")
                    delay = 0.0
                elif exhausted:
                    # It ended itself, out of descriptors or memory (a plugin leaks them), after giving its events
                    # back and saying why: a replacement at once, not a crash to back off from.
                    report(slot, None, death_reason(p.exitcode, False))
                    delay = 0.0
                else:
                    report(slot, running, death_reason(p.exitcode, running is not None))
                    hist = [t for t in restarts.get(slot, []) if time.monotonic() - t < 60] + [time.monotonic()]
                    restarts[slot] = hist
                    delay = min(restart_backoff[1], restart_backoff[0] * 2 ** (len(hist) - 1))
                restarted[0] += 1
                if served is not None:
                    served.child_died(p.pid)
                if exhausted:
                    log.warning("worker child replaced: it ran out of file descriptors or memory (its line above "
                                "names the plugin)", extra={"slot": slot, "exitcode": p.exitcode})
                elif startup is None:
                    log.warning("worker child died; restarting", extra={"slot": slot, "exitcode": p.exitcode,
                                                                        "delay": round(delay, 2)})
                respawn_at[slot] = time.monotonic() + delay
        log.info("draining worker pool", extra={"group": spec.group})
        for slot, p in children.items():
            if slot not in respawn_at and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + drain_timeout
        for slot, p in children.items():
            if slot in respawn_at:
                continue
            exits.wait(slot, max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("child did not drain in time; killing", extra={"pid": p.pid})
                p.kill()
                p.join()
                r = slots[slot].read()
                report(slot, r, f"handler still running after the {drain_timeout:g} s drain timeout")
    finally:
        os.close(woken)
        exits.close()
        failing.close()
        notices.close()
        if served is not None:
            served.stop()
    log.info("worker pool stopped", extra={"group": spec.group})
    return code


def default_processes(cfg: Config, group: str) -> int:
    gc = cfg.groups.get(group)
    return gc.processes if gc else GroupConfig(name=group, topics=[]).processes


