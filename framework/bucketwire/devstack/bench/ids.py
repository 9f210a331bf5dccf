"""What an event's id costs the journal: commits of the same events with ids that grow with time (what the hub's
ingress and the client make, `ordered_id` / `new_event_id`) against random ones (a bare hash, a uuid4, as ids
were before), into a journal that already holds `prefill` events.

    bucketwire bench ids [--prefill N] [--events N] [--batch N] [--rounds N]

The journal is unique on (source, id) through a B-tree index: an id that grows is appended at the index's right
edge, a random one lands on a page of its own, which the commit then writes. Measured in-process, as the commit's
own thread CPU time (`time.thread_time`), so a busy machine moves both sides alike; rounds alternate.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bucketwire.envelope import ordered_id
from bucketwire.hub.journal import Batch, Journal, NewEvent

BODY = b'{"specversion":"1.0","seq":"","data":{"pad":"' + b"x" * 600 + b'"}}'
"""~700 bytes, the size of the bench's S3 envelope."""

T0_MS = 1_795_900_000_000


def _event(eid: str, i: int) -> NewEvent:
    return NewEvent("bench", "minio..bench", eid, f"photos/obj-{i:09d}.jpg", BODY)


def _ordered(i: int, per_ms: int) -> str:
    return ordered_id(T0_MS + i // per_ms, "bench", i)


def _random(i: int, per_ms: int) -> str:
    return hashlib.sha256(b"%d" % i).hexdigest()[:32]


def _one(make: Callable[[int, int], str], prefill: int, events: int, batch: int, per_ms: int,
         progress: Callable[[str], None]) -> float:
    """Thread CPU µs per event of `events` commits of `batch` events, into a journal of `prefill` events."""
    with tempfile.TemporaryDirectory(prefix="bw-bench-ids-") as d:
        j = Journal(Path(d) / "journal.db")
        try:
            for lo in range(0, prefill, 5000):
                j.commit(Batch(events=[_event(make(i, per_ms), i) for i in range(lo, min(prefill, lo + 5000))]))
                if lo and lo % 200_000 == 0:
                    progress(f"  {make.__name__[1:]}: journal filled to {lo:,} events")
            todo = [_event(make(i, per_ms), i) for i in range(prefill, prefill + events)]
            t = time.thread_time()
            for lo in range(0, events, batch):
                j.commit(Batch(events=todo[lo:lo + batch]))
            return (time.thread_time() - t) / events * 1e6
        finally:
            j.close()


def run(prefill: int, events: int, batch: int, rounds: int, per_ms: int = 40,
        progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    res: dict[str, list[float]] = {"ordered": [], "random": []}
    for r in range(rounds):
        for name, make in (("random", _random), ("ordered", _ordered)) if r % 2 else (
                ("ordered", _ordered), ("random", _random)):
            progress(f"round {r + 1}/{rounds}: {name} ids")
            res[name].append(_one(make, prefill, events, batch, per_ms, progress))
    o, x = statistics.median(res["ordered"]), statistics.median(res["random"])
    return {"prefill": prefill, "events": events, "batch": batch, "rounds": rounds,
            "ordered_us": res["ordered"], "random_us": res["random"],
            "ordered_median_us": o, "random_median_us": x, "ratio": x / o}


def render(res: dict[str, Any]) -> str:
    return (f"journal commit CPU per event, {res['events']:,} events in commits of {res['batch']} into a journal of "
            f"{res['prefill']:,}, {res['rounds']} rounds alternating:\n"
            f"  ids that grow with time (ordered_id): {res['ordered_median_us']:.2f} us "
            f"{[round(v, 2) for v in res['ordered_us']]}\n"
            f"  random ids (a hash, a uuid4):        {res['random_median_us']:.2f} us "
            f"{[round(v, 2) for v in res['random_us']]}\n"
            f"random/ordered: {res['ratio']:.2f}x (the journal's CPU per event with random ids, over ordered ones)")
