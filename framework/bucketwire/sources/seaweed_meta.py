"""Durable SeaweedFS source: follow the filer's metadata log with `weed filer.meta.tail`.

Why: SeaweedFS's webhook notification queue is in memory; if the hub is down longer than its retries, or weed
restarts, those events are gone. The filer's metadata log is persistent, and `weed filer.meta.tail -timeAgo D`
replays it from any point. So this source runs meta.tail, turns each change into envelopes with
`formats.seaweedfs_events.meta_tail_to_events` (same ids as the webhook would give, so running both is harmless),
publishes a batch, and only after the hub acked writes the newest log timestamp to a state file (atomically).
After a restart it resumes a little before that timestamp: the overlap is re-published and deduplicated by the
hub, so every change arrives exactly once in the journal.

That timestamp is a position in one filer's log only. The state file also records the filer's signature, which
weed keeps in its filer store (stable across restarts, new with a new store) and puts on every change it logs;
a change signed by none of the recorded ones means another filer (a rebuilt one at the same address, or --state
pointing at another filer's file), and the source stops before publishing it instead of resuming from a foreign
position (which silently skips or replays that filer's changes).

meta.tail prints protojson objects pretty-printed over many lines, one after another; `JsonStreamSplitter`
cuts that stream into objects without needing newlines between them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from bucketwire.devstack.seaweedfs import WeedError, find_weed
from bucketwire.envelope import Event
from bucketwire.formats.s3_records import RecordError
from bucketwire.formats.seaweedfs_events import meta_tail_to_events
from bucketwire.sources import Publish, SourceFailed, publish_until_acked

log = logging.getLogger("bucketwire.sources.seaweed_meta")

OVERLAP_NS = 2_000_000_000
"""Resume this far before the last acked change: clocks and log flushes are not perfectly ordered."""

MAX_OBJECT_BYTES = 64 << 20


class StreamError(ValueError):
    """The meta.tail output is not a stream of JSON objects."""


class JsonStreamSplitter:
    """Split a byte stream of concatenated JSON objects (pretty-printed or not) into parsed objects.

    Tracks brace depth outside strings, so it never has to guess whether a parse error means "incomplete"
    or "malformed", and works however the producer chunks its writes.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._start = -1
        self._pos = 0

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        buf = self._buf
        i = self._pos
        n = len(buf)
        while i < n:
            c = buf[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:  # backslash
                    self._esc = True
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c == 0x7B:  # {
                if self._depth == 0:
                    self._start = i
                self._depth += 1
            elif c == 0x7D:  # }
                self._depth -= 1
                if self._depth < 0:
                    raise StreamError("unbalanced '}' in meta.tail output")
                if self._depth == 0:
                    raw = bytes(buf[self._start : i + 1])
                    try:
                        out.append(json.loads(raw))
                    except ValueError as e:
                        raise StreamError(f"bad JSON object in meta.tail output: {e}") from None
                    self._start = -1
            elif self._depth == 0 and c not in b" \t\r\n":
                # Text where an object should start is weed's own message (a filer it cannot reach, a flag it
                # refuses): say it in its words.
                end = buf.find(b"\n", i, i + 300)
                text = bytes(buf[i: end if end >= 0 else i + 300]).decode(errors="replace").strip()
                raise StreamError(f"meta.tail printed {text!r} where filer events were expected")
            i += 1
        # Drop what has been consumed; keep an unfinished object.
        keep_from = self._start if self._depth > 0 else n
        del buf[:keep_from]
        self._pos = len(buf)
        if self._depth > 0:
            self._start = 0
        if len(buf) > MAX_OBJECT_BYTES:
            raise StreamError("a meta.tail object exceeds 64 MiB")
        return out


MAX_SIGNATURES = 16
"""Filer signatures a state file keeps (peers of a filer cluster log each other's changes under their own)."""


class FilerMismatch(SourceFailed):
    """The state file's position belongs to another filer's log."""


class Saved(NamedTuple):
    """What a state file holds: the position, and whose log it is in."""

    ts_ns: int
    filer: str | None  # the address it was saved following
    signatures: tuple[int, ...]  # the filer signatures its changes carried (empty: a file from before them)


def read_saved(path: Path) -> Saved | None:
    """The state file, or None when starting fresh."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise WeedError(f"cannot read source state {path}: {e}; start with --reset-state to follow from now") from None
    ts = doc.get("ts_ns") if isinstance(doc, dict) else None
    if not isinstance(ts, int) or ts < 0:
        raise WeedError(f"source state {path} has no valid ts_ns; start with --reset-state to follow from now")
    filer = doc.get("filer")
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not all(type(x) is int for x in sigs):
        sigs = []
    return Saved(ts, filer if isinstance(filer, str) else None, tuple(sigs[-MAX_SIGNATURES:]))


def read_state(path: Path) -> int | None:
    """Last acked filer log timestamp (ns), or None when starting fresh."""
    saved = read_saved(path)
    return None if saved is None else saved.ts_ns


def write_state(path: Path, ts_ns: int, filer: str, signatures: tuple[int, ...] = ()) -> None:
    """Atomically replace the state file (write temp, fsync, rename, fsync dir): a crash leaves old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"ts_ns": ts_ns, "filer": filer, "signatures": list(signatures), "saved": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def doc_signatures(doc: Any) -> list[int]:
    """The filer signatures on the changes of one meta.tail object (the filer that logged a change adds its own
    last; one that came through `filer.sync` carries the other cluster's before it)."""
    if not isinstance(doc, dict):
        return []
    note = doc.get("eventNotification") or doc.get("event_notification")
    sigs = note.get("signatures") if isinstance(note, dict) else None
    out = [x for x in sigs if type(x) is int] if isinstance(sigs, list) else []
    nested = doc.get("events")
    for sub in nested if isinstance(nested, list) else []:
        out += doc_signatures(sub)
    return out


def doc_events(doc: Any, store: str | None) -> tuple[list[Event], int]:
    """Envelopes and the newest tsNs in one meta.tail object (which may batch further ones in `events`)."""
    if not isinstance(doc, dict):
        raise RecordError("meta.tail record must be a JSON object")
    events: list[Event] = []
    ts = 0
    nested = doc.get("events") or []
    if "eventNotification" in doc or "event_notification" in doc:
        events += meta_tail_to_events(doc, store=store)
        ts = max(ts, int(doc.get("tsNs") or doc.get("ts_ns") or 0))
    for sub in nested if isinstance(nested, list) else []:
        evs, t = doc_events(sub, store)
        events += evs
        ts = max(ts, t)
    return events, ts


class SeaweedMetaSource:
    """Follow one filer's metadata log and publish S3 object changes through the hub."""

    def __init__(
        self,
        publish: Publish,
        *,
        filer: str,
        state_path: Path,
        store: str | None = None,
        path_prefix: str = "/buckets",
        start_ago: float = 0.0,
        batch_size: int = 200,
        linger: float = 0.2,
        weed: str | None = None,
    ) -> None:
        self.publish = publish
        self.filer = filer
        self.state_path = Path(state_path)
        self.store = store
        self.path_prefix = path_prefix
        self.start_ago = start_ago
        self.batch_size = batch_size
        self.linger = linger
        self.weed = weed or find_weed()
        self.stop_event = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.published = 0
        self.acked_ts: int | None = None
        self.saved: Saved | None = None
        self.signatures: tuple[int, ...] = ()  # this filer's, as its changes carry them (saved with the state)
        self.verified = False  # a change since the start carried a signature the state file knows

    def stop(self) -> None:
        self.stop_event.set()
        self._kill()

    def _kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def command(self, since_ns: int | None) -> list[str]:
        if since_ns is None:
            ago_ns = int(self.start_ago * 1e9)
        else:
            ago_ns = max(0, time.time_ns() - since_ns + OVERLAP_NS)
        argv = [self.weed, "filer.meta.tail", f"-filer={self.filer}", f"-pathPrefix={self.path_prefix}"]
        if ago_ns > 0:
            argv.append(f"-timeAgo={ago_ns}ns")
        return argv

    def run(self) -> None:
        """Run until stop(): (re)start meta.tail from the saved position, publish, save after each ack."""
        self.saved = read_saved(self.state_path)
        self.acked_ts = None if self.saved is None else self.saved.ts_ns
        self.signatures = () if self.saved is None else self.saved.signatures
        self.verified = not self.signatures
        if self.saved is not None and not self.signatures and self.saved.filer not in (None, self.filer):
            # A file from before signatures were kept: its address is all there is to go by.
            raise FilerMismatch(self._mismatch(f"was saved following {self.saved.filer}"))
        delay = 0.5
        while not self.stop_event.is_set():
            started = time.monotonic()
            self._run_once()
            if self.stop_event.is_set():
                break
            if time.monotonic() - started > 30:
                delay = 0.5
            log.warning("filer.meta.tail for %s ended; restarting in %.1fs", self.filer, delay)
            if self.stop_event.wait(delay):
                break
            delay = min(30.0, delay * 2)

    def _run_once(self) -> None:
        argv = self.command(self.acked_ts)
        log.info("following %s: %s", self.filer, " ".join(argv[1:]))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=256)
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            while data := proc.stdout.read1(1 << 16):  # type: ignore[attr-defined]  # a BufferedReader
                chunks.put(data)
            chunks.put(None)

        def errors() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                text = line.decode(errors="replace").strip()
                if text:
                    log.warning("filer.meta.tail: %s", text[:500])

        threading.Thread(target=pump, daemon=True, name="meta-tail-out").start()
        threading.Thread(target=errors, daemon=True, name="meta-tail-err").start()
        splitter = JsonStreamSplitter()
        pending: list[Event] = []
        pending_ts = 0
        first_at = 0.0
        try:
            while not self.stop_event.is_set():
                try:
                    data = chunks.get(timeout=self.linger)
                except queue.Empty:
                    data = b""
                if data is None:
                    break
                if data:
                    try:
                        docs = splitter.feed(data)
                    except StreamError as e:
                        log.error("%s; restarting meta.tail (is the filer at %s up?)", e, self.filer)
                        break
                    for doc in docs:
                        self._check_filer(doc_signatures(doc))
                        try:
                            evs, ts = doc_events(doc, self.store)
                        except RecordError as e:
                            log.error("skipping unreadable filer event: %s", e)
                            continue
                        if evs and not pending:
                            first_at = time.monotonic()
                        pending += evs
                        pending_ts = max(pending_ts, ts)
                due = pending and (len(pending) >= self.batch_size or time.monotonic() - first_at >= self.linger)
                if due or (not pending and pending_ts and data == b""):
                    if not self._flush(pending, pending_ts):
                        return
                    pending, pending_ts = [], 0
            if pending or pending_ts:
                self._flush(pending, pending_ts)
        finally:
            self._kill()

    def _flush(self, events: list[Event], ts: int) -> bool:
        """Publish and then persist `ts`; False if stopped before the hub acked."""
        if events:
            res = publish_until_acked(self.publish, events, self.stop_event, what=f"seaweedfs {self.filer}")
            if res is None:
                return False
            self.published += len(events)
            unrouted = sum(1 for r in res if r.get("unrouted"))
            log.info("published %d event(s) from %s (%d unrouted)", len(events), self.filer, unrouted)
        if ts and (self.acked_ts is None or ts > self.acked_ts):
            write_state(self.state_path, ts, self.filer, self.signatures)
            self.acked_ts = ts
        return True

    def _check_filer(self, sigs: list[int]) -> None:
        """Raise FilerMismatch for the first change since the start when no signature on it is one the state file
        recorded (before anything of it is published); learn the signature of the filer that logged it."""
        if not sigs:
            return
        if not self.verified:
            if self.signatures and not set(sigs) & set(self.signatures):
                known = ", ".join(map(str, self.signatures))
                where = self.saved.filer if self.saved is not None and self.saved.filer else "another filer"
                raise FilerMismatch(self._mismatch(
                    f"was saved following {where} (filer signature {known}), and {self.filer} logs changes "
                    f"signed {sigs[-1]}"))
            self.verified = True
        if sigs[-1] not in self.signatures:
            self.signatures = (*self.signatures, sigs[-1])[-MAX_SIGNATURES:]

    def _mismatch(self, why: str) -> str:
        return (f"source state {self.state_path} {why}: another filer's log, whose positions mean nothing in "
                f"this one's (resuming would skip or replay its changes); start with --reset-state to follow "
                f"{self.filer} from now (add --since SECONDS to replay its recent history), or pass --state with "
                "this filer's own state file")
