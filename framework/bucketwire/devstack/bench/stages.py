"""Where one event's latency goes at a fixed rate: the numbers behind docs/performance.md, "Closing the gap".

    python -m bucketwire.devstack.bench.stages [RATE] [SECONDS] [busy] [tcp]

The same hub, worker pool (2 processes, the bench's no-op plugin) and publisher as `bench bus --against nats`;
the hub runs with a timestamp per event at three points of its loop (`--stage-probe`, below), the handler notes
its own. For each event: publisher send -> the hub's loop turn that reads it; -> its commit done (split: the turn
until the PUB is read, until the commit begins, the commit); -> its DELIVER sent; -> its handler. With `busy` a
spinning process holds one core; with `tcp` the publisher and workers reach the hub over TCP instead of its
local socket. Prints percentiles per stage, and the journal commit's own time.

The probe also keeps when each loop turn and each journal `settle` ran, so the tail of the first stage can be
told apart (`loop_waits`): an event whose turn came late either found the loop in a turn of its own (busy: a long
turn, a settle) or asleep (the wake-up itself was slow: the scheduler, or the hypervisor waking an idle vCPU).
"""

from __future__ import annotations

import atexit
import bisect
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson


def probe_hub(out: str, argv: list[str]) -> None:
    """Run `bucketwire hub` with the timestamps (in the hub's process; this changes nothing in its code)."""
    import bucketwire.hub.loop as loop
    from bucketwire import protocol as P
    from bucketwire.cli import main

    recv: dict[int, float] = {}
    onpub: dict[int, float] = {}
    begun: dict[int, float] = {}
    committed: dict[int, float] = {}
    sent: dict[int, float] = {}
    commit_s: list[float] = []
    turns: list[tuple[float, float]] = []
    settles: list[tuple[float, float]] = []
    turn = [0.0]
    tick, read_pub, init = loop.Hub.tick, loop.read_pub, loop.Hub.__init__  # type: ignore[attr-defined]

    def p_tick(self: loop.Hub, *rest: Any, **kw: Any) -> None:
        turn[0] = t0 = time.monotonic()
        tick(self, *rest, **kw)
        turns.append((t0, time.monotonic()))

    def p_read_pub(raw: bytes) -> Any:  # the hub's PUB handling starts by reading the request
        now = time.monotonic()
        req, envs, typed = read_pub(raw)
        for d in envs:
            recv[d["data"]["i"]] = turn[0]
            onpub[d["data"]["i"]] = now
        return req, envs, typed

    def p_init(self: loop.Hub, cfg: Any) -> None:
        init(self, cfg)
        send, commit, settle = self.net.send, self.journal.commit, self.journal.settle

        def p_send(frames: list[bytes]) -> bool:
            if frames[1] == P.DELIVER:
                now = time.monotonic()
                for b in frames[3:]:
                    got = orjson.loads(b)  # an envelope, or (proto 3) the batch's envelopes in one frame
                    for env in got if isinstance(got, list) else [got]:
                        sent[env["data"]["i"]] = now
            return send(frames)

        def p_commit(batch: Any) -> Any:
            t0 = time.monotonic()
            res = commit(batch)
            now = time.monotonic()
            commit_s.append(now - t0)
            for a in res:
                data = orjson.loads(a.body).get("data")
                if isinstance(data, dict) and "i" in data:
                    committed[data["i"]] = now
                    begun[data["i"]] = t0
            return res

        def p_settle(now: float | None = None) -> float | None:
            t0 = time.monotonic()
            pending = getattr(self.journal, "_pending", None) is not None  # staged rows (the SQLite journal)
            res = settle(now)
            if pending and (res is None or now is None):  # it wrote something (a settle that waits returns at once)
                settles.append((t0, time.monotonic()))
            return res

        self.journal.settle = p_settle  # type: ignore[method-assign]
        self.net.send = p_send  # type: ignore[method-assign]
        self.journal.commit = p_commit  # type: ignore[method-assign]

    def dump() -> None:
        with open(out, "w") as f:
            f.write(orjson.dumps({"commit_s": commit_s, "turns": turns, "settles": settles, "events": {
                i: [t, committed.get(i, 0.0), sent.get(i, 0.0), onpub[i], begun.get(i, 0.0)] for i, t in recv.items()}},
                option=orjson.OPT_NON_STR_KEYS).decode())

    loop.Hub.tick, loop.Hub.__init__ = p_tick, p_init  # type: ignore[method-assign]
    loop.read_pub = p_read_pub  # type: ignore[attr-defined]
    atexit.register(dump)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    sys.argv = ["bucketwire", "-q", *argv]
    main()


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))] * 1000 if xs else float("nan")


def loop_waits(sent_turn: list[tuple[float, float]], turns: list[tuple[float, float]],
               settles: list[tuple[float, float]], late: float = 0.0005) -> dict[str, int]:
    """Of the events whose loop turn began more than `late` seconds after they were sent (`sent_turn`: (sent, the
    turn that read it) per event), how many the loop was busy for when they were sent (a turn under way), of those
    how many it was settling the journal for, and how many found it asleep. `turns` and `settles`: (start, end),
    each list in time order."""
    starts = [a for a, _ in turns]
    settle_starts = [a for a, _ in settles]
    out = {"late": 0, "busy": 0, "settling": 0, "asleep": 0}
    for sent, turn in sent_turn:
        if turn - sent <= late:
            continue
        out["late"] += 1
        i = bisect.bisect_right(starts, sent) - 1
        if i >= 0 and turns[i][1] > sent:
            out["busy"] += 1
            j = bisect.bisect_right(settle_starts, sent) - 1
            if j >= 0 and settles[j][1] > sent:
                out["settling"] += 1
        else:
            out["asleep"] += 1
    return out


def run(rate: int, seconds: float, busy: bool, local: bool = True) -> None:
    from bucketwire.devstack.bench.bus import Publisher, _wait_handled, payload
    from bucketwire.devstack.bench.common import Stack, precise_sleeps
    from bucketwire.devstack.bench.versus import Spinner, read_rows

    precise_sleeps()
    st = Stack("os", local=local)
    out = st.tmp / "stages.json"
    hub = subprocess.Popen([sys.executable, "-m", "bucketwire.devstack.bench.stages", "--stage-probe", str(out),
                            "hub", "-c", str(st.cfg_path)], stdout=subprocess.DEVNULL,
                           stderr=(st.tmp / "hub.log").open("wb"), start_new_session=True)
    st.procs.append(hub)
    st.spawn("worker", "--group", "bench", "-n", "2", "--plugin", "bucketwire.devstack.bench.noop_plugin")
    first, k = 200, int(rate * seconds)
    try:
        st.wait_workers(2)
        pub = Publisher(st.config().client.work_endpoints[0])
        for j in range(first):  # warm-up, not measured
            pub.send([payload(j, time.monotonic())])
        pub.drain()
        _wait_handled(st, first, "stages")
        spinner = Spinner() if busy else None
        if spinner is not None:
            spinner.__enter__()
        try:
            start = time.monotonic() + 0.05
            for j in range(k):
                t = start + j / rate
                pub.send_at(t, [payload(first + j, t)])
            pub.drain()
            _wait_handled(st, first + k, "stages")
        finally:
            if spinner is not None:
                spinner.__exit__(None, None, None)
        pub.close()
        st.stop()
        handled = {i: (t, r) for rows in read_rows(st.tmp).values() for i, t, r in rows}
        probe = orjson.loads(Path(out).read_bytes())
    finally:
        st.close()
    stages: dict[str, list[float]] = {n: [] for n in (
        "publisher send -> hub loop turn", "hub loop turn -> commit done", "commit done -> DELIVER sent",
        "DELIVER sent -> handler", "total", "  of which: turn -> PUB read", "  PUB read -> commit begins",
        "  the commit")}
    lists = list(stages.values())
    sent_turn: list[tuple[float, float]] = []
    for key, (turn, done, sent, read, begins) in probe["events"].items():
        i = int(key)
        if first <= i < first + k and i in handled and done and sent:
            t, r = handled[i]
            sent_turn.append((t, turn))
            for lst, v in zip(lists, (turn - t, done - turn, sent - done, r - sent, r - t, read - turn,
                                      begins - read, done - begins), strict=True):
                lst.append(v)
    print(f"{rate}/s for {seconds:g} s{', one core busy' if busy else ''}: {len(lists[-1])} events")
    for name, xs in stages.items():
        print(f"  {name:32s} p50 {q(xs, .5):8.3f} ms   p90 {q(xs, .9):8.3f}   p99 {q(xs, .99):8.3f}")
    cs = probe["commit_s"]
    print(f"  journal commits: {len(cs)} ({len(cs) / max(1, k + first):.2f} per event), "
          f"each p50 {statistics.median(cs) * 1e6:.0f} us")
    turns = [(a, b) for a, b in probe["turns"]]
    settles = [(a, b) for a, b in probe["settles"]]
    w = loop_waits(sent_turn, turns, settles)
    print(f"  loop turns: {len(turns)}, p50 {q([b - a for a, b in turns], .5):.3f} ms, "
          f"p99 {q([b - a for a, b in turns], .99):.3f}; journal settles: {len(settles)}, "
          f"p50 {q([b - a for a, b in settles], .5):.3f} ms")
    print(f"  events whose turn began > 0.5 ms after the send: {w['late']}; the loop was busy in a turn for "
          f"{w['busy']} (settling the journal for {w['settling']}), asleep for {w['asleep']}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--stage-probe":
        probe_hub(sys.argv[2], sys.argv[3:])
    else:
        args = sys.argv[1:]
        run(int(args[0]) if args else 1000, float(args[1]) if len(args) > 1 else 3.0, "busy" in args[2:],
            "tcp" not in args[2:])
