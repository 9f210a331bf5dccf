"""Audit plugin: hash chain, verify command, de-duplication, rotation, several processes, path safety."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import bucketwire_audit as audit
from bucketwire import ConfigError, Event
from bucketwire.config import StoreConfig
from bucketwire.testing import PluginHarness
from bucketwire_audit.chain import INDEX_SUFFIX, seal


def ev(i: int, key: str | None = None, **data: Any) -> Event:
    return Event(
        id=f"evt-{i}", source="test", type="s3:ObjectCreated:Put", subject=key or f"k/{i}.jpg", topic="t",
        seq=i,
        data={"bucket": "photos", "key": key or f"k/{i}.jpg", "size": i, "etag": f"e{i}", "version_id": "",
              "principal": "alice", "source_ip": "10.0.0.1", "user_agent": "aws-cli", "store": "primary",
              "content_type": "image/jpeg", "user_metadata": {}, "records": [], **data},
    )


def write_events(path: Path, ids: range, **settings: Any) -> None:
    with PluginHarness(audit, settings={"path": str(path), **settings}) as h:
        for i in ids:
            h.handle(ev(i))


def cli_verify(*paths: Path | str, extra: tuple[str, ...] = ()) -> Any:
    cli = click.Group("bucketwire")
    audit.register_commands(cli)
    return CliRunner().invoke(cli, ["audit", "verify", *extra, *map(str, paths)])


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- writing and verifying ----------------------------------------------------------------------------------
def test_n_events_n_lines_and_verify_passes(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_events(log, range(1, 21))
    got = [json.loads(x) for x in lines(log)]
    assert [r["n"] for r in got] == list(range(1, 21))
    r = got[4]
    assert (r["type"], r["bucket"], r["key"], r["size"], r["etag"], r["principal"], r["source_ip"],
            r["user_agent"], r["event_id"], r["topic"], r["seq"]) == (
        "s3:ObjectCreated:Put", "photos", "k/5.jpg", 5, "e5", "alice", "10.0.0.1", "aws-cli", "evt-5", "t", 5)
    assert r["prev"] == got[3]["h"] and got[0]["prev"] == "0" * 64
    res = cli_verify(log)
    assert res.exit_code == 0, res.output
    assert "OK: 20 records" in res.output


def test_redelivery_writes_nothing_new_even_after_restart(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_events(log, range(1, 6))
    before = log.read_bytes()
    write_events(log, range(1, 6))  # a new process-equivalent: new harness, new writer, same index
    assert log.read_bytes() == before
    write_events(log, range(5, 8))
    assert len(lines(log)) == 7
    assert cli_verify(log).exit_code == 0


def _tamper_cases() -> list[tuple[str, Any, int, str]]:
    def edit_value(ls: list[bytes]) -> None:
        ls[4] = ls[4].replace(b'"alice"', b'"mallory"')

    def edit_and_rehash(ls: list[bytes]) -> None:
        rec = json.loads(ls[4])
        rec["principal"] = "mallory"
        line, _ = seal(rec, rec["n"], rec["prev"])
        ls[4] = line + b"\n"

    def delete(ls: list[bytes]) -> None:
        del ls[4]

    def swap(ls: list[bytes]) -> None:
        ls[4], ls[5] = ls[5], ls[4]

    def torn_tail(ls: list[bytes]) -> None:
        # Cut off, and what is left is not what the writer wrote (a cut that is a prefix of it is a crash's
        # leftover: test_an_append_cut_short_by_a_crash_is_incomplete_not_tampered).
        ls[-1] = ls[-1][:30].replace(b"bucket", b"bukket")

    def whitespace(ls: list[bytes]) -> None:
        ls[4] = ls[4].replace(b",", b", ", 1)

    return [
        ("edited", edit_value, 5, "edited"),
        ("edited-rehashed", edit_and_rehash, 5, "differs from record n=5 as written"),
        ("deleted", delete, 5, "deleted"),
        ("swapped", swap, 5, "reordered"),
        ("torn", torn_tail, 10, "truncated line"),
        ("reformatted", whitespace, 5, "edited"),
    ]


@pytest.mark.parametrize("name,tamper,bad_line,why", _tamper_cases(), ids=[c[0] for c in _tamper_cases()])
def test_tampering_is_reported_at_the_line(tmp_path: Path, name: str, tamper: Any, bad_line: int,
                                           why: str) -> None:
    log = tmp_path / "audit.log"
    write_events(log, range(1, 11))
    ls = lines(log)
    tamper(ls)
    log.write_bytes(b"".join(ls))
    res = cli_verify(log)
    assert res.exit_code == 1
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert f"{log}:{bad_line}: " in out and why in out, out


def test_lines_cut_from_the_end_are_caught_by_the_index(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_events(log, range(1, 8))
    log.write_bytes(b"".join(lines(log)[:5]))
    res = cli_verify(log)
    assert res.exit_code == 1 and "log truncated" in res.output and "7 entries" in res.output


def test_lines_added_by_hand_are_reported_and_never_adopted(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A forged record appended with a correct-looking chain (n, prev and h all recomputed) is not one the writer
    logged: verify names it, and the writer does not continue the chain from it."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 6))
    last = json.loads(lines(log)[-1])
    forged = {**{k: v for k, v in last.items() if k not in ("n", "prev", "h")}, "event_id": "x", "key": "planted"}
    line6, h6 = seal(forged, 6, last["h"])
    line7, _ = seal({**forged, "event_id": "y"}, 7, h6)
    with open(log, "ab") as f:
        f.write(line6 + b"\n" + line7 + b"\n")
    res = cli_verify(log)
    assert res.exit_code == 1 and f"{log}:6: record n=6 is past the last one the writer logged" in res.output, \
        res.output
    with caplog.at_level(logging.WARNING, logger="bucketwire.plugin.audit"):
        write_events(log, range(6, 8))
    assert "did not write (added by hand?); not adopting them" in caplog.text
    res = cli_verify(log)
    assert res.exit_code == 1 and f"{log}:6: line differs from record n=6 as written" in res.output, res.output
    assert [json.loads(x)["event_id"] for x in lines(log)][5:] == ["x", "y", "evt-6", "evt-7"]


def test_a_line_lost_in_a_crash_is_written_again_from_the_index(tmp_path: Path) -> None:
    """The index is committed before the line is written; a crash in between (the event not acknowledged, so
    it is redelivered) must not leave a gap in the chain."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 6))
    log.write_bytes(b"".join(lines(log)[:4]) + lines(log)[4][:17])  # line 5 torn mid-write
    assert "audit.log:5: record n=5 was cut off mid-write" in cli_verify(log).output
    write_events(log, range(5, 7))  # the redelivery of event 5, then event 6
    assert [json.loads(x)["event_id"] for x in lines(log)] == [f"evt-{i}" for i in range(1, 7)]
    assert cli_verify(log).exit_code == 0
    # The same right after a rotation: the new active file is empty, its first lines are in the index.
    write_events(log, range(7, 60), max_bytes=4096)
    active = len(lines(log))
    log.write_bytes(b"")
    write_events(log, range(60, 61), max_bytes=4096)
    assert len(lines(log)) == active + 1
    assert "OK: 60 records" in cli_verify(tmp_path).output
    # A rotation whose index commit then failed (rolled back): the renamed file holds every line, the index
    # still names the old active file's first n; nothing may be written twice.
    log.rename(log.with_name("audit.log.2000-01-02.000000000099"))
    write_events(log, range(61, 62), max_bytes=4096)
    assert [json.loads(x)["n"] for x in lines(log)] == [61]
    assert "OK: 61 records" in cli_verify(tmp_path).output


def _append_until(path: str, stop: Any) -> None:
    with PluginHarness(audit, settings={"path": path, "fsync": "never"}) as h:
        i = 1000
        while not stop.is_set():
            h.handle(ev(i))
            i += 1


def test_verify_of_a_log_being_written_passes(tmp_path: Path) -> None:
    """Operators verify the live log: lines a worker appends while verify reads are not 'added by hand', and
    the index moving on meanwhile is not a truncated log."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 50), fsync="never")
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_append_until, args=(str(log), stop))
    writer.start()
    try:
        start = len(lines(log))
        results = []
        while len(results) < 20 or len(lines(log)) < start + 20:  # verify while at least 20 lines arrive
            results.append(cli_verify(log).output.strip())
            assert writer.is_alive()
    finally:
        stop.set()
        writer.join(30)
    bad = [r for r in results if "OK:" not in r]
    assert not bad, f"{len(bad)} of {len(results)} verifies of the live log failed, e.g. {bad[0]}"


def test_rotation_by_size_and_day_keeps_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_events(log, range(1, 41), max_bytes=4096)
    rotated = sorted(p for p in tmp_path.iterdir() if p.name.startswith("audit.log.2"))
    assert len(rotated) >= 2
    assert all(p.stat().st_size <= 4096 for p in rotated)
    # Day change: pretend the active file was started yesterday.
    db = sqlite3.connect(str(log) + INDEX_SUFFIX)
    db.execute("UPDATE head SET v = '2000-01-01' WHERE k = 'day'")
    db.commit()
    db.close()
    write_events(log, range(41, 43), max_bytes=4096)
    assert any(p.name.startswith("audit.log.2000-01-01.") for p in tmp_path.iterdir())
    assert [json.loads(x)["n"] for x in lines(log)] == [41, 42]
    # Given in any order, or as the directory, the files verify as one chain of 42 records.
    everything = [p for p in tmp_path.iterdir() if p.name.startswith("audit.log") and p.suffix != ".lock"]
    res = cli_verify(*reversed(sorted(everything)))
    assert res.exit_code == 0 and "OK: 42 records" in res.output, res.output
    assert cli_verify(tmp_path).exit_code == 0
    # A missing rotated file is a gap.
    middle = sorted(rotated)[1]
    res = cli_verify(*(p for p in everything if p != middle))
    assert res.exit_code == 1 and "rotated file is missing" in res.output
    # Only the newest file: refused unless --partial.
    assert cli_verify(log).exit_code == 1
    assert cli_verify(log, extra=("--partial",)).exit_code == 0


def _worker(path: str, start: int, count: int) -> None:
    write_events(Path(path), range(start, start + count), max_bytes=8192, fsync="never")


def test_several_processes_write_one_valid_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("fork")
    # Overlapping id ranges: each event must still be logged exactly once.
    procs = [ctx.Process(target=_worker, args=(str(log), 1 + i * 40, 60)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = [p for p in tmp_path.iterdir() if p.name.startswith("audit.log") and not p.name.endswith(
        (".lock", ".sqlite", "-wal", "-shm"))]
    recs = [json.loads(x) for f in files for x in lines(f)]
    assert all(x.endswith(b"\n") for f in files for x in lines(f))
    ids = [r["event_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 180  # events 1..180
    assert sorted(r["n"] for r in recs) == list(range(1, 181))
    res = cli_verify(tmp_path)
    assert res.exit_code == 0, res.output


def test_crash_leftovers_are_repaired(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_events(log, range(1, 4))
    with open(log, "ab") as f:  # a torn write that was never acknowledged
        f.write(b'{"bucket":"photos","ev')
    write_events(log, range(4, 5))
    assert cli_verify(log).exit_code == 0
    # A line written but not recorded in the index (crash between the two): not written twice.
    idx = Path(str(log) + INDEX_SUFFIX)
    for suffix in ("", "-wal", "-shm"):
        Path(str(idx) + suffix).unlink(missing_ok=True)
    write_events(log, range(1, 6))
    assert [json.loads(x)["n"] for x in lines(log)] == [1, 2, 3, 4, 5]
    assert cli_verify(log).exit_code == 0


def test_hostile_keys_never_touch_paths(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    keys = ["../../escape", "/etc/passwd", "a\x00b", "x" * 20000, "..", "\u202e.gpj"]
    with PluginHarness(audit, settings={"dir": str(logdir)}) as h:
        for i, k in enumerate(keys):
            h.handle(ev(i, key=k))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))) == [
        "audit.log", "audit.log.index.sqlite", "audit.log.lock"]
    recs = [json.loads(x) for x in lines(logdir / "audit.log")]
    assert [r["key"] for r in recs[:3]] == keys[:3]
    assert len(recs[3]["key"]) < 5000 and recs[3]["key"].endswith("[truncated]")
    assert cli_verify(logdir).exit_code == 0


@pytest.mark.parametrize(
    "settings,match",
    [
        ({}, "path"),
        ({"path": "/tmp/a.log", "dir": "/tmp"}, "path"),
        ({"path": "/tmp/a.log", "fsync": "sometimes"}, "fsync"),
        ({"path": "/tmp/a.log", "max_bytes": 10}, "max_bytes"),
        ({"path": "/tmp/a.log", "store": "primary"}, "bucket"),
        ({"path": "/tmp/a.log", "rotation": 1}, "rotation"),
    ],
)
def test_bad_settings(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PluginHarness(audit, settings=settings)


def test_records_also_go_to_a_bucket(tmp_path: Path, weed: Any, bucket: str) -> None:
    store = StoreConfig(name="primary", endpoint=weed.s3_endpoint, access_key=weed.access_key,
                        secret_key=weed.secret_key)
    settings = {"path": str(tmp_path / "a.log"), "store": "primary", "bucket": bucket, "prefix": "trail/"}
    with PluginHarness(audit, settings=settings, stores={"primary": store}) as h:
        h.handle(ev(1))
        h.handle(ev(1))
        h.handle(ev(2))
    c = weed.client()
    objs = sorted(o.object_name for o in c.list_objects(bucket, prefix="trail/", recursive=True))
    assert len(objs) == 2 and objs[0].startswith("trail/000000000001-")
    resp = c.get_object(bucket, objs[1])
    assert json.loads(resp.read())["event_id"] == "evt-2"
    resp.close()
    resp.release_conn()


def test_real_cli_has_the_command(tmp_path: Path) -> None:
    """The installed `bucketwire` CLI picks the command up through the register_commands hook."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 4))
    ok = subprocess.run([sys.executable, "-c", "from bucketwire.cli import main; main()", "audit", "verify",
                         str(log)], capture_output=True, text=True, timeout=60)
    if "No such command 'audit'" in ok.stderr:
        pytest.skip("CLI does not load plugin commands without a config")
    assert ok.returncode == 0, ok.stderr
    log.write_bytes(log.read_bytes().replace(b"alice", b"bob", 1))
    bad = subprocess.run([sys.executable, "-c", "from bucketwire.cli import main; main()", "audit", "verify",
                          str(log)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and f"{log}:1:" in bad.stderr and "Traceback" not in bad.stderr


def test_a_deleted_active_log_is_a_truncation_even_when_only_rotated_files_remain(tmp_path: Path) -> None:
    """The index that anchors the chain's head sits beside the active log (`audit.log.index.sqlite`); verify
    looked for it only beside the files it was given. Deleting `audit.log` (and any newest rotated files with it)
    left a shorter chain verify called intact, the index untouched beside it."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 60), max_bytes=4096)
    rotated = sorted((p for p in tmp_path.iterdir() if p.name.startswith("audit.log.2")), key=lambda p: p.name)
    assert len(rotated) >= 3 and lines(log)
    log.unlink()
    res = cli_verify(tmp_path)
    assert res.exit_code == 1, res.output
    assert "log truncated: the index records 59 entries" in res.output and f"{log} is missing" in res.output, \
        res.output
    rotated[-1].unlink()  # the newest rotated file too
    res = cli_verify(tmp_path)
    assert res.exit_code == 1 and "log truncated" in res.output, res.output
    # Rotated files named one by one find the index as well; --partial accepts them only while the active log
    # is there (a subset of the files at hand), never when it is gone.
    res = cli_verify(*rotated[:-1], extra=("--partial",))
    assert res.exit_code == 1 and f"{log} is missing" in res.output, res.output
    # The next append writes the lost lines again from the index, and the chain is whole.
    write_events(log, range(60, 61), max_bytes=4096)
    res = cli_verify(tmp_path)
    assert res.exit_code == 0 and "OK: 60 records" in res.output, res.output


def test_only_some_rotated_files_with_the_active_log_present(tmp_path: Path) -> None:
    """The oldest rotated files alone, with the active log still in place: the tail check says which file to add,
    and --partial accepts them (a subset at hand, nothing gone)."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 40), max_bytes=4096)
    oldest = sorted((p for p in tmp_path.iterdir() if p.name.startswith("audit.log.2")), key=lambda p: p.name)[0]
    res = cli_verify(oldest)
    assert res.exit_code == 1 and f"{log} is not among the files given" in res.output, res.output
    res = cli_verify(oldest, extra=("--partial",))
    assert res.exit_code == 0 and "OK:" in res.output, res.output


@pytest.mark.parametrize("cut", ["torn", "newline", "whole"])
def test_an_append_cut_short_by_a_crash_is_incomplete_not_tampered(tmp_path: Path, cut: str) -> None:
    """The index is committed before the line is written; a crash or a full disk in between leaves the last
    record half-written (or not written at all) while the index holds it whole. That is what an honest log looks
    like until the next append writes the line again, and verify called it tampering ('truncated line', 'log
    truncated', exit 1). It is now INCOMPLETE (exit 3), naming the record; anything else stays FAILED."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 6))
    ls = lines(log)
    last = {"torn": ls[4][:40], "newline": ls[4][:-1], "whole": b""}[cut]
    log.write_bytes(b"".join(ls[:4]) + last)
    res = cli_verify(log)
    assert res.exit_code == 3, res.output
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("audit verify: INCOMPLETE: "), out
    assert "record n=5" in out and "the next append writes it again from the index" in out, out
    # Two records short is no crash of one append: FAILED as before.
    log.write_bytes(b"".join(ls[:3]))
    res = cli_verify(log)
    assert res.exit_code == 1 and "log truncated" in res.output, res.output
    # Cut, then edited: not what the writer wrote.
    log.write_bytes(b"".join(ls[:4]) + ls[4][:40].replace(b"bucket", b"bukket"))
    res = cli_verify(log)
    assert res.exit_code == 1 and "audit.log:5: truncated line" in res.output, res.output
    # The next append repairs it.
    log.write_bytes(b"".join(ls[:4]) + last)
    write_events(log, range(6, 7))
    res = cli_verify(log)
    assert res.exit_code == 0 and "OK: 6 records" in res.output, res.output


def test_an_active_log_lost_with_its_first_record_right_after_a_rotation_is_incomplete(tmp_path: Path) -> None:
    """A rotation renames the active log and the same append writes the new one's first line; a crash between
    the index commit and that write leaves no active log at all while the index holds record n. INCOMPLETE
    (exit 3), not 'missing'; the next append writes it again."""
    log = tmp_path / "audit.log"
    i = 1
    with PluginHarness(audit, settings={"path": str(log), "max_bytes": 4096}) as h:
        while i < 5 or len(lines(log)) != 1:
            h.handle(ev(i))
            i += 1
    log.unlink()
    res = cli_verify(tmp_path)
    assert res.exit_code == 3, res.output
    assert f"INCOMPLETE: {log} is missing, and record n={i - 1}, its first, is in the index only" in res.output
    write_events(log, range(i, i + 1), max_bytes=4096)
    res = cli_verify(tmp_path)
    assert res.exit_code == 0 and f"OK: {i} records" in res.output, res.output


def test_without_its_index_verify_says_what_it_cannot_see(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The index is what anchors the chain's head. Deleted with the last lines of the log, what is left is a valid
    shorter chain, and verify said 'OK ... chain intact' as if it had checked the end; the writer then rebuilt the
    index from the shortened log without a word, anchoring the cut. Neither can be detected from the log alone:
    verify now says so in its OK line, and the writer logs the rebuild as a warning."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 8))
    for suffix in ("", "-wal", "-shm"):
        Path(str(log) + INDEX_SUFFIX + suffix).unlink(missing_ok=True)
    log.write_bytes(b"".join(lines(log)[:5]))
    res = cli_verify(log)
    assert res.exit_code == 0 and "OK: 5 records" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert f"no index beside the log ({log}{INDEX_SUFFIX}): lines cut from the end" in res.output, res.output
    with caplog.at_level(logging.WARNING, logger="bucketwire.plugin.audit"):
        write_events(log, range(8, 9))
    assert f"{log}{INDEX_SUFFIX} was missing; rebuilt from the log files (head n=5)" in caplog.text, caplog.text
    res = cli_verify(log)
    assert res.exit_code == 0 and "no index" not in res.output, res.output
    # A new log starts its index without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bucketwire.plugin.audit"):
        write_events(tmp_path / "new.log", range(1, 2))
    assert "rebuilt" not in caplog.text


def test_the_same_id_from_two_sources_is_two_events_and_two_lines(tmp_path: Path) -> None:
    """CloudEvents ids are unique per source (the hub keeps both: its journal is unique on (source, id)), and
    per-source counters ('1', '2', ...) are common. The log de-duplicated on the id alone, so an event whose id
    another source had used was taken for a redelivery and never logged: one publisher could keep another's
    events out of the audit trail by using their ids first. A redelivery (same source, same id) still writes
    nothing, also for lines written before the key included the source."""
    log = tmp_path / "audit.log"
    first, second = ev(1), ev(1)
    second.source = "other-app"
    with PluginHarness(audit, settings={"path": str(log)}) as h:
        h.handle(first)
        h.handle(second)
        h.handle(first)
        h.handle(second)
    assert [(r["source"], r["event_id"]) for r in map(json.loads, lines(log))] == [
        ("test", "evt-1"), ("other-app", "evt-1")]
    # An index written before the source was part of the key knows its lines by the id alone.
    db = sqlite3.connect(str(log) + INDEX_SUFFIX)
    db.execute("UPDATE written SET event_id = 'evt-1' WHERE n = 1")
    db.commit()
    db.close()
    with PluginHarness(audit, settings={"path": str(log)}) as h:
        h.handle(first)  # its line is there: nothing new
        h.handle(second)
        third = ev(1)
        third.source = "third-app"
        h.handle(third)  # the old row names another source: logged
    assert [r["source"] for r in map(json.loads, lines(log))] == ["test", "other-app", "third-app"]
    # A rebuilt index keys its lines the same way.
    for suffix in ("", "-wal", "-shm"):
        Path(str(log) + INDEX_SUFFIX + suffix).unlink(missing_ok=True)
    write_events(log, range(1, 2))
    assert len(lines(log)) == 3
    assert cli_verify(log).exit_code == 0


def _append_rotating(path: str, stop: Any) -> None:
    with PluginHarness(audit, settings={"path": path, "fsync": "never", "max_bytes": 4096}) as h:
        i = 1000
        while not stop.is_set():
            h.handle(ev(i))
            i += 1


def test_verify_of_a_log_rotating_under_it_passes(tmp_path: Path) -> None:
    """A rotation renames the active log while verify reads the directory: the files are listed and opened under
    the writers' lock with the head, so a file renamed after that is still read whole under the name it had."""
    log = tmp_path / "audit.log"
    write_events(log, range(1, 30), fsync="never", max_bytes=4096)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_append_rotating, args=(str(log), stop))
    writer.start()
    try:
        results = []
        while len(results) < 15 or len(list(tmp_path.glob("audit.log.2*"))) < 8:
            results.append(cli_verify(tmp_path).output.strip())
            assert writer.is_alive()
    finally:
        stop.set()
        writer.join(30)
    bad = [r for r in results if "OK:" not in r]
    assert not bad, f"{len(bad)} of {len(results)} verifies of the rotating log failed, e.g. {bad[0]}"
