"""The durable SeaweedFS source with a real hub: nothing is lost while the hub or the source is down,
and nothing arrives twice."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bucketwire.devstack.seaweedfs import WeedServer
from tests.fixtures_hub import Stack, wait_for
from tests.test_security import authorize, client_config, make_keys, security_toml

BUCKETWIRE = str(Path(sys.executable).parent / "bucketwire")


def journal(stack: Stack, topic: str) -> list[dict[str, Any]]:
    with stack.client(5) as c:
        _, bodies = c.fetch(topic, 1)
    return [json.loads(b) for b in bodies]


def routed_to_store(weed: WeedServer, bucket: str) -> str:
    """Config: every event of `bucket` to topic "objects", and the server as store "primary"."""
    return f"""
[[routes]]
events = ["s3:*"]
bucket = "{bucket}"
topic = "objects"

[stores.primary]
endpoint = "{weed.s3_endpoint}"
access_key = "{weed.access_key}"
secret_key = "{weed.secret_key}"
"""


def start_source(stack: Stack, weed: WeedServer, bucket: str, state: Path, log: Path,
                 cfg: Path | None = None, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [BUCKETWIRE, "seaweed-source", "-c", str(cfg or stack.cfg_path), "--filer", weed.filer_address,
         "--state", str(state), "--path-prefix", f"/buckets/{bucket}", "--since", "30", *extra],
        env=stack.env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(15)


def the_one_error(stack: Stack, src: subprocess.Popen, log: Path) -> tuple[str, str]:
    """Wait for a source that cannot go on to exit; its one `Error:` line (exit status 1, no traceback) and its
    whole output."""
    try:
        wait_for(lambda: src.poll() is not None, 60, "the source to stop on what it cannot outwait")
    finally:
        if src.poll() is None:
            stop(src)
        print(log.read_text()[-3000:], stack.dump_logs())
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert src.returncode == 1 and len(errors) == 1 and "Traceback" not in out, out
    return errors[0], out


def test_hub_down_then_up_every_object_arrives_once(
    weed: WeedServer, bucket: str, stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    # [client] timeout: how long the source waits for the dead hub before it says so and retries (10 s by default)
    stack = stack_factory("\n[client]\ntimeout = 3\n" + routed_to_store(weed, bucket))
    stack.start_hub()
    state, log = tmp_path / "src-state.json", tmp_path / "source.log"
    src = start_source(stack, weed, bucket, state, log)
    c = weed.client()
    try:
        c.put_object(bucket, "before.txt", io.BytesIO(b"0"), 1)
        wait_for(lambda: len(journal(stack, "objects")) == 1, 30, "first event")

        stack.kill_hub(signal.SIGTERM)
        failed_before = log.read_text().count("failed (") if log.exists() else 0
        for i in range(5):
            c.put_object(bucket, f"during-{i}.txt", io.BytesIO(b"x"), 1)
        wait_for(lambda: log.read_text().count("failed (") > failed_before, 60,
                 "the source to retry against the dead hub")
        stack.start_hub()
        wait_for(lambda: len(journal(stack, "objects")) >= 6, 60, "events published while the hub was down")

        stop(src)  # the source itself goes away; changes meanwhile come from the filer log on restart
        c.put_object(bucket, "source-down.txt", io.BytesIO(b"y"), 1)
        c.remove_object(bucket, "before.txt")
        src = start_source(stack, weed, bucket, state, log)
        wait_for(lambda: len(journal(stack, "objects")) >= 8, 60, "events from while the source was down")
        # A last object: the source publishes in filer-log order, so a duplicate would be committed before it.
        c.put_object(bucket, "last.txt", io.BytesIO(b"z"), 1)
        wait_for(lambda: any(e["data"]["key"] == "last.txt" for e in journal(stack, "objects")), 60, "last event")
    finally:
        if src.poll() is None:
            stop(src)
        print(log.read_text()[-3000:] if log.exists() else "", stack.dump_logs())
    evs = journal(stack, "objects")
    got = sorted((e["type"], e["data"]["key"]) for e in evs)
    want = sorted(
        [("s3:ObjectCreated:Put", k)
         for k in ["before.txt", "source-down.txt", "last.txt"] + [f"during-{i}.txt" for i in range(5)]]
        + [("s3:ObjectRemoved:Delete", "before.txt")]
    )
    assert got == want
    assert [int(e["seq"]) for e in evs] == list(range(1, 10))
    assert all(e["data"]["store"] == "primary" and e["source"] == f"seaweedfs:filer/{bucket}" for e in evs)


def test_a_versioned_bucket_gets_thumbnails_and_loses_them_on_delete(
    weed: WeedServer, bucket: str, stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """SeaweedFS with versioning on keeps each version as a file `k.versions/v_<id>`: the events must be the
    object's (`k`, with its version id), or the thumbnail plugin looks for a key that is not in S3 (and a delete,
    a new delete-marker file, looked like a creation, so a deleted photo kept its thumbnails)."""
    from minio.versioningconfig import ENABLED, VersioningConfig
    from PIL import Image

    c = weed.client()
    c.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    stack = stack_factory(routed_to_store(weed, bucket) + """
[groups.media]
topics = ["objects"]
plugins = ["thumbnail"]

[plugins.thumbnail]
sizes = [64]
""")
    stack.start_hub()
    stack.start_worker("media", 1)
    state, log = tmp_path / "src-state.json", tmp_path / "source.log"
    src = start_source(stack, weed, bucket, state, log)
    buf = io.BytesIO()
    Image.new("RGB", (320, 200), (200, 30, 30)).save(buf, "JPEG")
    data = buf.getvalue()

    def thumb() -> Any:
        try:
            return c.stat_object(bucket, "64/cam/v.jpg.webp")
        except Exception:
            return None

    try:
        c.put_object(bucket, "cam/v.jpg", io.BytesIO(data), len(data), content_type="image/jpeg")
        wait_for(thumb, 60, "the thumbnail of a photo in a versioned bucket")
        c.remove_object(bucket, "cam/v.jpg")  # a delete marker: the photo is gone for S3 readers
        wait_for(lambda: thumb() is None, 60, "the thumbnail to go with its photo")
    finally:
        if src.poll() is None:
            stop(src)
        print(log.read_text()[-2000:] if log.exists() else "", stack.dump_logs()[-4000:])
    evs = journal(stack, "objects")
    assert [(e["type"], e["data"]["key"]) for e in evs if not e["data"]["key"].startswith("64/")] == [
        ("s3:ObjectCreated:Put", "cam/v.jpg"), ("s3:ObjectRemoved:DeleteMarkerCreated", "cam/v.jpg")]


def test_a_refusal_for_good_stops_the_source_and_skips_nothing(
    weed: WeedServer, bucket: str, stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """A hub that will refuse a batch every time (here the source's key may not publish to the route's topic)
    used to be retried for ever, the source looking alive. It stops with the hub's reason in one line and exit
    status 1, saving no position past the refused events: once the config is fixed, they arrive."""
    d = tmp_path / "sec"
    make_keys(d, "hub", "admin", "src")
    authorize(d, "admin")
    authorize(d, "src")
    roles = '\n[security.roles.src]\npublish = ["elsewhere"]\n'
    stack = stack_factory(routed_to_store(weed, bucket) + security_toml(d, roles=roles))
    stack.start_hub()
    src_cfg = client_config(stack, d, "src")
    state, log = tmp_path / "src-state.json", tmp_path / "source.log"
    weed.client().put_object(bucket, "refused.txt", io.BytesIO(b"0"), 1)
    error, out = the_one_error(stack, start_source(stack, weed, bucket, state, log, src_cfg), log)
    assert "may not publish to topic 'objects'" in error and "retrying" not in out, out
    assert not state.exists(), "no position may be saved past events the hub never took"

    # Fixed (the role allows the topic): started again, the source publishes what was refused.
    src_cfg.write_text(src_cfg.read_text().replace('publish = ["elsewhere"]', 'publish = ["objects"]'))
    stack.cfg_path.write_text(stack.cfg_path.read_text().replace('publish = ["elsewhere"]', 'publish = ["objects"]'))
    stack.kill_hub(signal.SIGTERM)
    stack.start_hub()
    src = start_source(stack, weed, bucket, state, log, src_cfg)
    try:
        wait_for(lambda: journal(stack, "objects"), 60, "the once-refused event")
    finally:
        stop(src)
    assert [e["data"]["key"] for e in journal(stack, "objects")] == ["refused.txt"]


def test_a_state_file_of_another_filer_is_refused_until_reset(
    weed: WeedServer, weed2: WeedServer, bucket: str, stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """The state file's position is one filer's log time: followed from another filer (a new one at the same
    address, or --state pointed at the wrong file) it skipped that filer's older changes without a word. The
    state records the filer's signature (weed keeps it in its store; every logged change carries it); a change
    signed by another filer stops the source before anything of it is published, and --reset-state starts over."""
    stack = stack_factory(routed_to_store(weed, bucket))
    stack.start_hub()
    state, log = tmp_path / "src-state.json", tmp_path / "source.log"
    src = start_source(stack, weed, bucket, state, log)
    try:
        weed.client().put_object(bucket, "on-first.txt", io.BytesIO(b"0"), 1)
        wait_for(lambda: state.exists() and journal(stack, "objects"), 60, "the first filer's event and state")
    finally:
        stop(src)
    saved = state.read_text()

    weed2.client().make_bucket(bucket)
    weed2.client().put_object(bucket, "on-second.txt", io.BytesIO(b"1"), 1)
    error, out = the_one_error(stack, start_source(stack, weed2, bucket, state, log), log)
    assert "--reset-state" in error and weed2.filer_address in error, out
    assert [e["data"]["key"] for e in journal(stack, "objects")] == ["on-first.txt"], "nothing of it published"
    assert state.read_text() == saved

    src = start_source(stack, weed2, bucket, state, log, None, "--reset-state")
    try:
        wait_for(lambda: len(journal(stack, "objects")) == 2, 60, "the second filer's event after --reset-state")
    finally:
        stop(src)
    assert [e["data"]["key"] for e in journal(stack, "objects")] == ["on-first.txt", "on-second.txt"]
