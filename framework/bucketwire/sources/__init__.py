"""Event sources that *pull* changes from a store and publish them through the hub with acknowledgements.

Webhooks push and are the primary path; these exist for when a push can be lost: SeaweedFS's webhook queue
lives in memory (a crash or a long hub outage drops events), so `seaweed_meta` follows the filer's durable
metadata log instead and remembers where it was. `minio_listen` follows MinIO's ListenBucketNotification,
which is convenient (no server-side config) but lossy by design; MinIO's webhook target with `queue_dir` is
the durable path there.

Both publish with `HubClient.publish_events` and retry until the hub commits: an event counts as delivered only
when the hub says so, and re-sending is safe because ids are deterministic and the journal deduplicates. A
refusal the hub says it would repeat stops the source instead (`PublishRefused`), with nothing skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from bucketwire.envelope import Event

log = logging.getLogger("bucketwire.sources")

Publish = Callable[[list[Event]], list[dict[str, Any]]]


class SourceFailed(Exception):
    """The source cannot go on without the operator: its message is the one line the command exits with."""


class PublishRefused(SourceFailed):
    """The hub refuses a batch for good (`HubRefused.permanent`): the source stops rather than skip the batch.

    Skipping would lose events silently, and retrying would wedge the source while it looked alive; stopping
    keeps them (the durable source has not saved a position past them) and the command exits non-zero with the
    hub's reason, which says what to change."""


def publish_until_acked(
    publish: Publish,
    events: list[Event],
    stop: threading.Event,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    what: str = "source",
) -> list[dict[str, Any]] | None:
    """Publish, retrying with exponential backoff until the hub acks; None if `stop` was set first.

    A failure that may pass (hub down or silent, its journal unavailable) is retried: giving up would lose the
    events, and a stuck source is visible in logs and in the hub's lag metrics. A refusal the hub says it would
    repeat (a role that forbids the topic, [hub] max_topics reached, an envelope it cannot read) raises
    `PublishRefused` at once: retrying it could only wedge the source. One event too large to ever commit is
    dropped, loudly, and the rest published.
    """
    from bucketwire.client import EventTooLarge, HubRefused

    delay = base
    dropped: list[int] = []  # indices into the caller's `events`, so the results still line up with them
    idx = list(range(len(events)))
    while True:
        try:
            res = publish([events[i] for i in idx]) if idx else []
            for i in dropped:
                res.insert(i, {"id": events[i].id, "error": "too large; dropped"})
            return res
        except EventTooLarge as e:
            # Never storable, so retrying would wedge the source on it for good: dropped, loudly, and the
            # rest of the batch goes again at once.
            i = idx.pop(e.index)
            dropped.append(i)
            dropped.sort()
            log.error("%s: event %s dropped: the hub refuses it as too large (%s)", what, events[i].id, e)
            continue
        except HubRefused as e:
            if e.permanent:
                raise PublishRefused(
                    f"{what}: the hub refuses {len(idx)} event(s) and would refuse them again: {e}; the source "
                    "stopped without skipping them: fix that, then start it again") from None
            log.warning("%s: publishing %d event(s) failed (%s); retrying in %.1fs", what, len(events), e, delay)
        except Exception as e:  # HubUnavailable, zmq errors: all transient from here
            log.warning("%s: publishing %d event(s) failed (%s); retrying in %.1fs", what, len(events), e, delay)
        if stop.wait(delay):
            return None
        delay = min(cap, delay * 2)


def hub_publisher(cfg: Any, timeout: float | None = None) -> tuple[Publish, Callable[[], None]]:
    """A publish function backed by a HubClient, and its close function."""
    from bucketwire.client import HubClient

    client = HubClient(cfg)

    def publish(events: list[Event]) -> list[dict[str, Any]]:
        return client.publish_events(events, timeout=timeout)

    return publish, client.close
