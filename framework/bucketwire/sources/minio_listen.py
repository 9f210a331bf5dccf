"""MinIO ListenBucketNotification source: zero server-side config, but lossy.

`minio.Minio.listen_bucket_notification` keeps a long GET open; MinIO writes one `{"Records": [...]}` JSON
document per line and blank keep-alive lines in between. Inside this stream the object key is *not*
URL-encoded (unlike the webhook target), so records go through `record_to_event(..., key_encoded=False)`.

Why it is not the durable path: MinIO only streams what happens while a listener is connected; anything during
a disconnect or a hub outage longer than our retry is gone. For production use MinIO's webhook target with
`queue_dir` (MinIO persists undelivered events on disk and replays them) pointed at the hub's `/minio/events`.
This source is for development, for stores you cannot reconfigure, and as a second opinion.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from bucketwire.envelope import NESTING_REFUSAL, Event
from bucketwire.formats.s3_records import RecordError, record_to_event
from bucketwire.sources import Publish, PublishRefused, publish_until_acked

if TYPE_CHECKING:  # an annotation only: every `bucketwire` process imports this module through the CLI
    import minio

log = logging.getLogger("bucketwire.sources.minio_listen")

DEFAULT_EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")
MAX_LINE_BYTES = 4 << 20
"""Longest line of the listen stream read: MinIO writes a line per notification, a few KB (S3 caps an object's
user metadata at 2 KB). A longer one is skipped unread; without a limit, an endless line (a hostile endpoint, a
broken proxy) grew the source's memory until the process died."""


def parse_line(line: bytes | str, *, store: str | None) -> list[Event]:
    """One line of the listen stream -> envelopes; keep-alive (blank) lines give []; garbage -> RecordError."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError("listen stream line is not UTF-8") from None
    line = line.strip()
    if not line:
        return []
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise RecordError(f"listen stream line is not JSON: {e}") from None
    except RecursionError:  # an unreadable line, not a broken connection: skipped, the stream kept
        raise RecordError(f"listen stream line {NESTING_REFUSAL}") from None
    return parse_document(doc, store=store)


def parse_document(doc: Any, *, store: str | None) -> list[Event]:
    """One decoded `{"Records": [...]}` document (what minio-py's iterator yields) -> envelopes."""
    if not isinstance(doc, dict):
        raise RecordError("listen stream document must be a JSON object")
    records = doc.get("Records")
    if records is None:
        return []  # MinIO may send an empty object as keep-alive
    if not isinstance(records, list):
        raise RecordError("listen stream 'Records' must be an array")
    return [record_to_event(r, store=store, key_encoded=False, index=i) for i, r in enumerate(records)]


class MinioListenSource:
    """Follow one bucket's notifications and publish them through the hub, reconnecting with backoff."""

    def __init__(
        self,
        publish: Publish,
        client: minio.Minio,
        *,
        bucket: str,
        store: str | None,
        prefix: str = "",
        suffix: str = "",
        events: tuple[str, ...] = DEFAULT_EVENTS,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.publish = publish
        self.client = client
        self.bucket = bucket
        self.store = store
        self.prefix = prefix
        self.suffix = suffix
        self.events = tuple(events)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stop_event = threading.Event()
        self.published = 0
        self.connects = 0
        self._response: Any = None

    def stop(self) -> None:
        """Ask run() to return; closes the open response so a blocked read ends now, not at the next keep-alive."""
        self.stop_event.set()
        resp = self._response
        if resp is not None:
            try:
                resp.close()
            except Exception:  # closing from another thread may race with the reader; either way it ends
                pass

    def _lines(self) -> Iterator[bytes]:
        """Raw lines of one listen connection.

        minio-py's EventIterable hides EOFs and bad lines by silently reconnecting at once, in a tight loop; we
        want backoff and a log line instead, so we take the request it would make (`_func`, the bound request
        of its public listen_bucket_notification) and read the lines ourselves.
        """
        iterable = self.client.listen_bucket_notification(self.bucket, self.prefix, self.suffix, self.events)
        func = getattr(iterable, "_func", None)
        if func is None:  # a future minio-py: fall back to its iterator (documents, not lines)
            with iterable:
                for doc in iterable:
                    yield json.dumps(doc).encode()
            return
        resp = func()
        self._response = resp
        try:
            while True:
                limit = MAX_LINE_BYTES
                line = resp.readline(limit)
                if not line:
                    return
                if len(line) < limit or line.endswith(b"\n"):
                    yield line
                    continue
                skipped = len(line)
                while line and not line.endswith(b"\n"):  # the rest of it, a limit at a time, kept nowhere
                    line = resp.readline(limit)
                    skipped += len(line)
                log.error("skipping a notification line from %s longer than %d bytes (%d bytes read%s): a MinIO "
                          "notification is a few KB; check the endpoint (or a proxy before it) the source listens "
                          "to", self.bucket, limit, skipped, "" if line else ", then the stream ended")
        finally:
            self._response = None
            resp.close()
            resp.release_conn()

    def run(self) -> None:
        """Listen, publish, reconnect with exponential backoff; returns after stop()."""
        delay = self.backoff_base
        while not self.stop_event.is_set():
            self.connects += 1
            try:
                for line in self._lines():
                    try:
                        evs = parse_line(line, store=self.store)
                    except RecordError as e:
                        log.error("skipping unreadable notification from %s: %s", self.bucket, e)
                        continue
                    delay = self.backoff_base  # real data flowed: the connection is healthy
                    if evs:
                        res = publish_until_acked(
                            self.publish, evs, self.stop_event, what=f"minio listen {self.bucket}"
                        )
                        if res is None:
                            return
                        self.published += len(evs)
                    if self.stop_event.is_set():
                        return
                log.warning("listen stream for %s ended; reconnecting in %.1fs", self.bucket, delay)
            except PublishRefused:
                raise  # the hub will not take these events: stop, not reconnect and refuse them again
            except Exception as e:
                if self.stop_event.is_set():
                    return
                log.warning("listen on %s failed (%s); reconnecting in %.1fs", self.bucket, e, delay)
            if self.stop_event.wait(delay):
                return
            delay = min(self.backoff_cap, delay * 2)
