"""`bench/wakes.py` reads the kernel's scheduler trace: a hand-written trace whose path is known, in ftrace's own
text format, must come out as that path with its waits and run times; and without tracefs the tool says so in
one line. (The real recording needs root and a mounted tracefs; docs/performance.md, "Profile", holds its output.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bucketwire.devstack.bench import wakes

PUB, PUB_IO = 100, 101
HUB, HUB_IO = 200, 201
W, W_IO = 300, 301
TGID = {PUB: PUB, PUB_IO: PUB, HUB: HUB, HUB_IO: HUB, W: W, W_IO: W}
COMM = {PUB: "python", PUB_IO: "ZMQbg/IO/0", HUB: "python", HUB_IO: "ZMQbg/IO/0", W: "python", W_IO: "ZMQbg/IO/0"}


class Tr:
    """Writes trace lines as the kernel prints them with `record-tgid` (µs timestamps, mono clock)."""

    def __init__(self) -> None:
        self.lines = ["# tracer: nop", "#", "#           TASK-PID       TGID    CPU#  |||||  TIMESTAMP  FUNCTION"]

    def _head(self, tid: int, cpu: int, us: float) -> str:
        name = COMM.get(tid, f"swapper/{cpu}") if tid else "<idle>"
        tg = f"({TGID[tid]:>7})" if tid else "(-------)"
        return f"{name:>16}-{tid:<7} {tg} [{cpu:03d}] d..2. {us / 1e6 + 5000:.6f}:"

    def wake(self, by: int, cpu: int, us: float, tid: int, target: int) -> None:
        self.lines.append(f"{self._head(by, cpu, us)} sched_waking: comm={COMM[tid]} pid={tid} prio=120 "
                          f"target_cpu={target:03d}")

    def switch(self, cpu: int, us: float, prev: int, nxt: int, state: str = "S") -> None:
        pc = COMM.get(prev, f"swapper/{cpu}") if prev else f"swapper/{cpu}"
        nc = COMM.get(nxt, f"swapper/{cpu}") if nxt else f"swapper/{cpu}"
        self.lines.append(f"{self._head(prev, cpu, us)} sched_switch: prev_comm={pc} prev_pid={prev} prev_prio=120 "
                          f"prev_state={state} ==> next_comm={nc} next_pid={nxt} next_prio=120")


def one_event(t: Tr, at: float) -> None:
    """Publisher (CPU 0) -> its I/O thread (CPU 1) -> the hub's I/O thread -> the hub's loop (its work: 150 µs,
    then it stays on its CPU 20 µs more, so its I/O thread waits) -> the worker's I/O thread on CPU 0 -> the
    worker's main thread."""
    t.wake(0, 0, at - 20, PUB, 0)  # the publisher's timer: it wakes to pace the event out
    t.switch(0, at - 18, 0, PUB)
    t.wake(PUB, 0, at, PUB_IO, 1)
    t.switch(1, at + 30, 0, PUB_IO)  # waited 30 (the other CPU was halted)
    t.wake(PUB_IO, 1, at + 50, HUB_IO, 1)  # ran 20
    t.switch(1, at + 55, PUB_IO, HUB_IO)  # waited 5
    t.wake(HUB_IO, 1, at + 63, HUB, 1)  # ran 8
    t.switch(1, at + 66, HUB_IO, HUB)  # waited 3
    t.wake(HUB, 1, at + 216, HUB_IO, 1)  # ran 150
    t.switch(1, at + 236, HUB, 0)  # the hub sleeps 20 µs after its send
    t.switch(1, at + 237, 0, HUB_IO)  # waited 21
    t.wake(HUB_IO, 1, at + 251, W_IO, 0)  # ran 14
    t.switch(1, at + 255, HUB_IO, 0)
    t.switch(0, at + 260, PUB, 0)
    t.switch(0, at + 286, 0, W_IO)  # waited 35: the other CPU
    t.wake(W_IO, 0, at + 293, W, 0)  # ran 7
    t.switch(0, at + 296, W_IO, W)  # waited 3
    t.switch(0, at + 350, W, 0)


def trace(events: int = 5) -> list[str]:
    t = Tr()
    for i in range(events):
        one_event(t, 1000.0 * i + 10)
        if i == 1:
            # A wake-up that finds the hub's loop still on its CPU (about to sleep) pairs with nothing, not
            # with the loop's next switch-in (the next event's).
            t.switch(1, 1500, 0, HUB)
            t.wake(HUB_IO, 0, 1501, HUB, 1)
            t.switch(1, 1510, HUB, 0)
    return t.lines


def role(tid: int) -> str | None:
    return wakes._roles(PUB, {HUB: "hub"}, {W: "worker"}, COMM, TGID)(tid)


def test_the_path_of_an_event_is_read_off_the_scheduler_trace() -> None:
    tr = wakes.parse(trace())
    [p] = wakes.paths(wakes.chains(tr, role, "worker: main", "publisher: main"), role)
    assert p["path"] == ["publisher: main", "publisher: libzmq I/O", "hub: libzmq I/O", "hub: main",
                         "hub: libzmq I/O", "worker: libzmq I/O", "worker: main"]
    assert p["events"] == 5
    got = [(h["waker_ran_us"], h["wait_p50_us"], h["other_cpu"]) for h in p["hops"]]
    assert got == [(None, 30.0, 1.0), (20.0, 5.0, 0.0), (8.0, 3.0, 0.0), (150.0, 21.0, 0.0), (14.0, 35.0, 1.0),
                   (7.0, 3.0, 0.0)]
    assert p["p50_us"] == 296.0  # the publisher's I/O thread woken -> the worker's main thread on a CPU


def test_threads_and_wake_ups_are_counted_per_event() -> None:
    tr = wakes.parse(trace())
    rows = {r["thread"]: r for r in wakes.thread_table(tr, role, 5)}
    assert rows["hub: libzmq I/O"]["activations_per_event"] == 2.0
    assert rows["hub: main"]["activations_per_event"] == 1.0  # the wake-up of a running loop is not one
    assert rows["hub: main"]["cpu_us_per_event"] == 170.0 + 10 / 5  # 170 per event, and the last stretch's 10
    assert rows["worker: main"]["cpu_us_per_event"] == 54.0
    kinds = wakes.wake_kinds(tr, role)
    assert kinds["other CPU"]["wake_ups"] == 10 and kinds["other CPU"]["wait_p50_us"] == 35.0
    assert kinds["same CPU"]["wake_ups"] == 25  # 4 an event on the path, and the publisher's timer


def test_without_tracefs_one_line_says_how_to_get_it(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "BUCKETWIRE_TRACEFS": str(tmp_path), "TMPDIR": str(tmpdir)}
    p = subprocess.run([sys.executable, "-m", "bucketwire.devstack.bench.wakes", "bucketwire"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "tracefs" in lines[0] and "mount" in lines[0], p.stderr
    assert sorted(os.listdir(tmpdir)) == [], "the refused run left its bench dir behind"


def test_both_ends_come_from_the_handlers_rows_on_the_same_clock() -> None:
    """The bench's rows (index, intended send time, handled at) are CLOCK_MONOTONIC, as the trace: the
    publisher's own part and the worker's part before its handler are read against the path's ends."""
    tr = wakes.parse(trace())
    found = wakes.chains(tr, role, "worker: main", "publisher: main")
    base = 5000.0
    rows = [(i, base + (1000.0 * i + 10 - 12) / 1e6, base + (1000.0 * i + 10 + 296 + 40) / 1e6) for i in range(5)]
    got = wakes.ends(found, {W: rows, 999: [(9, base + 0.0001, base + 0.0002)]}, tr.first, tr.last)
    assert got == {"events": 5, "publisher_us": 12.0, "path_us": 296.0, "worker_us": 40.0, "total_us": 348.0}


def test_without_the_nats_extra_one_line_names_it() -> None:
    code = ("import sys; sys.modules['nats'] = None\n"  # what an interpreter without the package does
            "from bucketwire.devstack.bench import wakes\nsys.exit(wakes.main(['both']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "bucketwire[nats]" in lines[0], p.stderr


def test_the_recorder_puts_back_a_fresh_tracefs_settings_as_it_found_them(tmp_path: Path) -> None:
    """A freshly mounted tracefs reads `buffer_size_kb` as "7 (expanded: 1408)", which the kernel refuses as a
    value; the recorder puts back the number (a plain directory stands in for tracefs)."""
    found = {"trace": "", "tracing_on": "1\n", "trace_clock": "[local] global counter mono\n",
             "buffer_size_kb": "7 (expanded: 1408)\n", "options/record-tgid": "0\n"}
    (tmp_path / "options").mkdir()
    for e in wakes.EVENTS:
        (tmp_path / "events" / e).mkdir(parents=True)
    for name, text in found.items():
        (tmp_path / name).write_text(text)
    with wakes.Recorder(tmp_path):
        assert (tmp_path / "buffer_size_kb").read_text() == "32768"
        assert (tmp_path / "trace_clock").read_text() == "mono"
    back = {name: (tmp_path / name).read_text() for name in found if name != "trace"}
    assert back == {"tracing_on": "1", "trace_clock": "local", "buffer_size_kb": "7", "options/record-tgid": "0"}
