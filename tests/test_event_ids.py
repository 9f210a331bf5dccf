"""Event ids grow with the event's time, so the journal's (source, id) index is appended to, not written all over.

Why it matters (README "Event ids"): with random ids (a bare hash, a uuid4) each event of a commit lands on a
different page of that B-tree, and with a million events in the journal a commit cost ~4x the CPU per event.
What is asserted here is the property the index needs, and that ids stay deterministic for deduplication;
the cost itself is measured by `python -m bucketwire.devstack.bench.ids`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bucketwire.envelope import follow_on_id, iso_ms, new_event_id, ordered_id, stable_id
from bucketwire.formats.s3_records import parse_body
from bucketwire.formats.seaweedfs_events import parse_body as filer_body
from tests.minio_payloads import body, record

T0 = datetime(2026, 11, 29, 20, 0, 0, 123000, tzinfo=UTC)


def _minio(at: datetime, n: int) -> dict:
    r = record("s3:ObjectCreated:Put", "photos", f"a/{n}.jpg", size=5, request_id=f"{0x17C5D1A3B6C2A1F0 + n:X}")
    r["eventTime"] = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    return r


def test_minio_notifications_in_time_order_get_ids_in_that_order_and_a_retry_keeps_its_id() -> None:
    times = [T0 + timedelta(milliseconds=7 * k) for k in range(50)]
    ids = [parse_body(body(_minio(t, k)), store=None)[0].id for k, t in enumerate(times)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # MinIO retrying from its queue_dir sends the same record: same id, so the journal commits it once
    assert parse_body(body(_minio(times[3], 3)), store=None)[0].id == ids[3]
    # ... and a record without a usable eventTime still gets a deterministic id
    r = _minio(T0, 1)
    r["eventTime"] = "yesterday"
    a, b = (parse_body(body(r), store=None)[0].id for _ in range(2))
    assert a == b and len(a) == 32


def _filer(mtime: int, n: int) -> bytes:
    entry = {"name": f"{n}.jpg", "attributes": {"file_size": 5, "mtime": mtime, "mime": "image/jpeg"},
             "chunks": [{"size": 5, "modified_ts_ns": mtime * 10**9, "e_tag": "dnti+798Sldn4KBQCl6W7Q=="}]}
    return json.dumps({"key": f"/buckets/photos/{n}.jpg",
                       "message": {"new_entry": entry, "new_parent_path": "/buckets/photos"}}).encode()


def test_seaweedfs_events_in_mtime_order_get_ids_in_that_order() -> None:
    ids = [filer_body(_filer(1795984447 + k, k), store=None)[0].id for k in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert filer_body(_filer(1795984447, 0), store=None)[0].id == ids[0]


def test_follow_on_ids_grow_with_their_causes_time_and_a_redelivery_makes_the_same_ones() -> None:
    times = [(T0 + timedelta(milliseconds=3 * k)).isoformat().replace("+00:00", "Z") for k in range(50)]
    ids = [follow_on_id(f"cause-{k:x}", "g", "thumbnail", 0, "thumbnail-ready", t) for k, t in enumerate(times)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert follow_on_id("cause-3", "g", "thumbnail", 0, "thumbnail-ready", times[3]) == ids[3]
    assert follow_on_id("cause-3", "g", "thumbnail", 1, "thumbnail-ready", times[3]) != ids[3]


def test_ids_made_without_a_name_grow_with_time_and_do_not_repeat() -> None:
    ids = [new_event_id() for _ in range(2000)]  # many within one millisecond: a counter orders those
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
    assert ids == sorted(ids)


@settings(max_examples=200)
@given(st.integers(min_value=-(1 << 50), max_value=1 << 50), st.text(max_size=20))
def test_ordered_id_is_deterministic_32_hex_digits_and_falls_back_without_a_time(ms: int, part: str) -> None:
    a = ordered_id(ms, part)
    assert a == ordered_id(ms, part) and len(a) == 32 and int(a, 16) >= 0
    if 0 < ms < 1 << 48:
        assert int(a[:12], 16) == ms
    else:
        assert a == stable_id(part)


def test_iso_ms_reads_rfc3339_and_refuses_the_rest() -> None:
    assert iso_ms("2026-11-29T20:00:00.123Z") == int(T0.timestamp() * 1000)
    assert iso_ms("2026-11-29T21:00:00.123+01:00") == int(T0.timestamp() * 1000)
    assert iso_ms("not a time") is None and iso_ms("") is None


def test_the_client_names_an_unnamed_event_with_an_id_that_grows_with_time(stack_factory: Any) -> None:
    s = stack_factory()
    s.start_hub()
    with s.client() as c:
        for n in range(3):
            c.publish("t", {"n": n})
        _, bodies = c.fetch("t", 1)
    ids = [json.loads(b)["id"] for b in bodies]
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
    assert abs(int(ids[0][:12], 16) - time.time() * 1000) < 600_000, ids  # led by the time it was made


def test_follow_ons_published_from_threads_get_the_same_ids_whatever_order_the_threads_ran_in(
        make_event: Any) -> None:
    """A redelivered event re-publishes its follow-ons under the ids of its first run, so the journal drops the
    repeats. Ids taken from the call order gave a follow-on another one's id when the handler's threads ran in
    another order: after a failover both were committed, one of them twice."""
    import random
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import bucketwire
    from bucketwire.testing import PluginHarness

    class Fanout:
        @bucketwire.hookimpl
        def handle_event(self, event: bucketwire.Event, ctx: bucketwire.Context) -> None:
            gate = threading.Barrier(8)

            def one(k: int) -> None:
                gate.wait()
                time.sleep(random.random() / 200)
                ctx.publish("sized", {"k": k}, subject=f"photo-{k}.webp")

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(8)))

    h = PluginHarness(Fanout(), name="fanout")
    ev = make_event("b", "photo.jpg")
    runs = [{f.subject: f.id for f in h.handle(ev)} for _ in range(6)]
    assert all(len(r) == 8 for r in runs)
    assert all(r == runs[0] for r in runs), "a follow-on's id depends on the order its thread ran in"
