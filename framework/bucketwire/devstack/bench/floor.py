"""The floor under bucketwire's latency at a fixed rate: what two bare ZeroMQ hops cost on this machine.

    python -m bucketwire.devstack.bench.floor [RATE] [SECONDS] [commit] [after=US]

A publisher (DEALER, paced like `bench bus`'s) sends a ~700-byte message to a relay process (ROUTER), which
forwards it to a sink process (ROUTER -> DEALER) and answers the publisher; the sink notes when it arrived and
answers the relay. That is the shape of publisher -> hub -> worker child with nothing of bucketwire in it.
`commit`: the relay commits each message to SQLite first (WAL, `synchronous=NORMAL`, an events table with two
unique indexes, as the journal's), the way the hub must before it delivers. `after=US`: the relay spins US
microseconds after forwarding and before answering the publisher, to see what work after a send costs the
message already sent. Prints p50/p90/p99 from the publisher's send to the sink's receive.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from multiprocessing.queues import Queue

import zmq

from bucketwire.devstack.bench.common import pace_until, precise_sleeps
from bucketwire.procutil import free_port

WARMUP = 200
PAD = b" " * 670


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def relay(front: str, back: str, commit: bool, after: float) -> None:
    # The commit variant's journal: removed when the relay ends (each run once left one in $TMPDIR).
    with tempfile.TemporaryDirectory(prefix="bucketwire-floor-") as tmp:
        _relay(front, back, os.path.join(tmp, "j.db") if commit else None, after)


def _relay(front: str, back: str, db_path: str | None, after: float) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    a.bind(front)
    b.bind(back)
    db = None
    if db_path is not None:
        db = sqlite3.connect(db_path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE e(topic TEXT, seq INT, source TEXT, id TEXT, body BLOB, UNIQUE(topic, seq))")
        db.execute("CREATE UNIQUE INDEX d ON e(source, id)")
    sink, _ = b.recv_multipart()  # the sink's HI, before anything is read from the publisher
    poller = zmq.Poller()
    poller.register(a, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    seq = 0
    while True:
        ready = dict(poller.poll())
        if b in ready and b.recv_multipart()[1] == b"STOP":
            if db is not None:
                db.close()
            return
        if a in ready:
            ident, body = a.recv_multipart()
            seq += 1
            if db is not None:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO e VALUES('t', ?, 's', ?, ?)", (seq, str(seq), body))
                db.execute("COMMIT")
            b.send_multipart([sink, body])
            if after:
                _spin(after)
            a.send_multipart([ident, b"ok"])


def sink(back: str, out: Queue[list[float]], n: int) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send(b"HI")
    took = []
    for _ in range(n):
        body = s.recv()
        took.append(time.monotonic() - float(body[:30]))
        s.send(b"ACK")
    out.put(took[WARMUP:])
    s.send(b"STOP")
    s.close(linger=1000)


def run(rate: int, seconds: float, commit: bool, after: float) -> list[float]:
    n = int(rate * seconds)
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    out: Queue[list[float]] = mp.Queue()
    procs = [mp.Process(target=relay, args=(front, back, commit, after)),
             mp.Process(target=sink, args=(back, out, n + WARMUP))]
    for p in procs:
        p.start()
    precise_sleeps()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.DEALER)
    pub.connect(front)
    try:
        for _ in range(WARMUP):  # answered one by one: both connections are up before the paced run
            pub.send(b"%-30r" % time.monotonic() + PAD)
            pub.recv()
        start = time.monotonic() + 0.05
        for j in range(n):
            t = start + j / rate
            pace_until(t)
            pub.send(b"%-30r" % t + PAD)
            while pub.poll(0):
                pub.recv()
        return sorted(out.get(timeout=60))
    finally:
        pub.close(0)
        ctx.term()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def main(argv: list[str]) -> None:
    nums = [a for a in argv if a.replace(".", "", 1).isdigit()]
    rate = int(nums[0]) if nums else 1000
    seconds = float(nums[1]) if len(nums) > 1 else 3.0
    after = next((float(a.split("=", 1)[1]) / 1e6 for a in argv if a.startswith("after=")), 0.0)
    took = run(rate, seconds, "commit" in argv, after)
    q = [took[int(p * (len(took) - 1))] * 1e6 for p in (0.5, 0.9, 0.99)]
    what = "two ZeroMQ hops" + (" + a SQLite commit" if "commit" in argv else "")
    what += f", {after * 1e6:.0f} us of work after the forward" if after else ""
    print(f"{what}, {rate}/s for {seconds:g} s: p50 {q[0]:.0f} us  p90 {q[1]:.0f}  p99 {q[2]:.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
