"""What a plugin's hook receives as `ctx`: its settings, the stores, and a way to publish follow-on events."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bucketwire.envelope import (
    EnvelopeError,
    Event,
    envelope_bytes,
    follow_on_id,
    follow_on_source,
    object_name_problem,
    read_envelope,
    topic_problem,
)

if TYPE_CHECKING:
    import minio

    from bucketwire.config import StoreConfig


class PluginError(Exception):
    """Raised by plugins for an expected failure; the message ends up in the dead-letter record."""


class PermanentError(PluginError):
    """A failure that retrying cannot fix (corrupt input, a decompression bomb): dead-letter at once."""


class Retry(PluginError):
    """Ask for another attempt no sooner than `delay` seconds from now (a rate limit, a dependency that is
    warming up). It counts toward the topic's `max_attempts` like any failure, so a plugin that keeps asking
    ends in the dead letter instead of looping forever::

        raise Retry(delay=30, reason="thumbnail service answered 429")
    """

    def __init__(self, delay: float = 0.0, reason: str = "retry requested") -> None:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
            raise ValueError(f"Retry(delay=...) needs seconds >= 0, got {delay!r}")
        super().__init__(f"{reason} (retry in {delay:g}s)")
        self.delay = float(delay)
        self.reason = reason

    def __reduce__(self) -> tuple[type[Retry], tuple[float, str]]:
        # pickle calls the class with `args`, the message, which would be read as the delay (a plugin running
        # its work in a process pool got a ValueError back instead of its Retry)
        return (type(self), (self.delay, self.reason))


class FollowOnTooLarge(ValueError):
    """`ctx.publish` was given a follow-on larger than the hub accepts, or one event's follow-ons together pass
    FOLLOW_ONS_MAX. Raised out of the handler, the event is retried and dead-lettered as for any failure; a plugin
    may catch it and publish a reference instead."""


for _public in (PluginError, PermanentError, Retry, FollowOnTooLarge):
    # Named as a plugin imports them (`from bucketwire import PermanentError`): a traceback's last line, which
    # dead letters, `status` and the worker's log quote, said `bucketwire.context.PermanentError`, a module no
    # plugin should import from. Pickle finds them under this name too (the package exports every one).
    _public.__module__ = "bucketwire"


PUBLISHING = threading.Lock()
"""Held by `Context.publish` from the index it derives a follow-on's id from to the follow-on's place in
`published`: a handler may publish from the threads of a pool it waits for, and two calls at once took one index,
so two follow-ons got one id and the hub kept only one of them (a repeat, to it). One lock for every context:
publishing is a few calls per event, and uncontended it costs less than a lock made per context would. The worker
waits for it as a handler returns while a thread of the handler's holds it (`PluginRunner.run`)."""

FOLLOW_ONS_MAX = 32 << 20
"""Bytes of envelope all the follow-ons of one event may take together. They travel to the hub in the event's
acknowledgement, one JSON header the hub reads up to 64 MiB; past that it refuses the whole message, and the
event (with every other one acknowledged with it) would stay in flight for as long as its worker lives. Half of
it, so one event's outcome always fits a message of its own."""


def _checked(*fields: Any) -> None:
    """`read_envelope`'s builder for a follow-on that is only checked: its checks run, nothing is built."""
    return None


class Stores:
    """Opens one `minio.Minio` client per named store per process and reuses it (it pools connections)."""

    def __init__(self, configs: dict[str, StoreConfig], default: str | None = None) -> None:
        self._configs = configs
        self._default = default
        self._clients: dict[str, minio.Minio] = {}

    @property
    def names(self) -> list[str]:
        return list(self._configs)

    def get(self, name: str | None = None) -> minio.Minio:
        name = name or self._default
        if name is None:
            raise PluginError("no store named and no default store; add a [stores.NAME] section to the config")
        client = self._clients.get(name)
        if client is None:
            cfg = self._configs.get(name)
            if cfg is None:
                known = ", ".join(sorted(self._configs)) or "none"
                raise PluginError(f"unknown store {name!r} (configured: {known}); add [stores.{name}]")
            import minio

            client = minio.Minio(
                cfg.endpoint,
                access_key=cfg.access_key or None,
                secret_key=cfg.secret_key or None,
                secure=cfg.secure,
                region=cfg.region,
            )
            self._clients[name] = client
        return client


class PublishOutsideHandler(RuntimeError):
    """`ctx.publish()` where there is no event to carry the follow-on (worker_startup, worker_shutdown). Its own
    type so a worker can tell this mistake, which fails every time, from a startup that may work when retried."""


@dataclass(slots=True)
class Context:
    """Per plugin, per event. `event` is None in `worker_startup`/`worker_shutdown`.

    `state` is this plugin's own dict in this worker process, the same object for every hook call of the
    plugin: the place for what `worker_startup` opens (clients, file handles, thread pools) and
    `worker_shutdown` closes. Each plugin has its own, and each process (each pool child) has its own.
    """

    plugin: str
    group: str
    settings: dict[str, Any]
    stores: Stores
    log: logging.Logger
    event: Event | None = None
    attempt: int = 1
    state: dict[str, Any] = field(default_factory=dict)
    max_event_bytes: int | None = None
    """[hub] max_event_bytes: `publish` refuses a larger follow-on here, where the plugin can see why, rather
    than the hub dead-lettering it after the handler reported success."""
    published_bytes: int = 0
    """Bytes of envelope of `published`, held against FOLLOW_ONS_MAX."""
    done: bool = False
    """The handler this ctx was made for has returned: its event's outcome (and follow-ons) are on their way."""
    _follow: list[tuple[Event, str]] | tuple[()] = field(default=(), init=False, repr=False)
    """Each follow-on `publish` queued, with the id it derived for it: the id is put back as the handler returns,
    so a plugin that set its own through the returned Event (a random one) cannot make a redelivery commit its
    follow-ons again. Private, and shown to the plugin read-only (`published`): a plugin that edited the list
    itself (appended a raw dict, cleared it, replaced an item) broke the pairing of follow-ons with their ids,
    and the worker child died as the handler returned, its whole batch delivered again and again."""
    _kinds: dict[tuple[str, str | None, str | None], int] | None = field(default=None, repr=False)
    """How many follow-ons of each (topic, type, subject) `publish` has made for this event: a follow-on's id
    counts only those like it, so handler threads that publish in another order on a redelivery still give each
    follow-on the id of its first run (an index over all of them gave one follow-on another's id).

    Both are made by the first `publish`: a Context is built per plugin per event, and most handlers publish
    nothing (two containers fewer per event, performance.md change 26)."""

    @property
    def published(self) -> Published:
        """The follow-ons `publish` has queued for this event, in order; read-only (publish with `publish`)."""
        return Published(ev for ev, _ in self._follow)

    @published.setter
    def published(self, value: object) -> None:
        raise TypeError(READ_ONLY)

    def store(self, name: str | None = None) -> minio.Minio:
        """A `minio.Minio` client for store `name`; by default the event's store, else the configured default."""
        if name is None and self.event is not None:
            name = self.event.store
        return self.stores.get(name)

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        type: str | None = None,  # noqa: A002 - CloudEvents calls it "type"
        subject: str | None = None,
    ) -> Event:
        """Queue a follow-on event. It reaches the hub with this event's ack and is committed with it.

        The id is derived from the causing event, so a redelivery re-publishes the same ids and the hub
        drops the repeats: publishing is exactly-once per handled event.
        """
        if not topic or not isinstance(topic, str):
            raise ValueError("publish needs a topic name")
        cause = self.event
        # A follow-on travels with its event's ack: queued after the handler returned, or where there is no event
        # (worker_startup/shutdown), nothing would ever send it.
        if cause is None:
            raise PublishOutsideHandler(
                "ctx.publish() works only inside handle_event (a follow-on is committed with the ack of the event "
                "that caused it); publish other events with bucketwire.client.HubClient")
        with PUBLISHING:
            return self._publish(cause, topic, data, type, subject)

    def _publish(self, cause: Event, topic: str, data: Any, type: str | None,  # noqa: A002
                 subject: str | None) -> Event:
        """`publish`, under its lock."""
        if self.done:
            raise RuntimeError(f"ctx.publish() after handle_event returned for event {cause.id}: its ack has gone, so "
                               "this follow-on would be lost; wait for your threads before the handler returns")
        # The hub's own refusals of a topic and of an object event's bucket/key (Hub._refusal), said here.
        bad = topic_problem(topic) or object_name_problem(data)
        if bad is not None:
            raise ValueError(f"follow-on to topic {topic[:80]!r} would be refused by the hub: {bad}")
        kind = (topic, type, subject)
        kinds = self._kinds
        if kinds is None:
            kinds = self._kinds = {}
        ev = Event(
            id=follow_on_id(cause.id, self.group, self.plugin, kinds.get(kind, 0),
                            topic if type is None and subject is None else f"{topic}\0{type or ''}\0{subject or ''}",
                            cause.time, cause.source),
            source=follow_on_source(self.group, self.plugin),
            type=type or f"bucketwire.{topic}",
            subject=subject,
            data=data,
            topic=topic,
            causationid=cause.id,
            hops=cause.hops + 1,
        )
        # Checked here, as the hub will check it, so that a follow-on the hub would refuse fails this event in
        # the plugin's own handler. Refused at the hub, it took the whole ACK it came in with it: its event and
        # the innocent ones acked with it stayed in flight, neither retried nor dead-lettered.
        try:
            read_envelope(_checked, ev.to_dict())
        except EnvelopeError as e:
            raise ValueError(f"follow-on to topic {topic!r} would be refused by the hub: {e}") from None
        try:
            n = envelope_bytes(ev, topic)
        except (TypeError, ValueError, OverflowError) as e:
            # json's own words ("Object of type set is not JSON serializable") named neither the follow-on nor
            # what to do about it
            raise TypeError(f"follow-on to topic {topic!r} cannot be sent to the hub: its data must be what JSON "
                            f"holds ({e}); publish dicts, lists, strings, numbers, booleans and None: a set as a "
                            "list, bytes as text (base64) or as an object in the store") from None
        limit = self.max_event_bytes
        if limit is not None and n > limit:
            raise FollowOnTooLarge(f"follow-on to topic {topic!r} would be a {n}-byte envelope, over the hub's "
                                   f"limit of {limit} bytes ([hub] max_event_bytes); put large data in the "
                                   "object store and publish a reference to it")
        if self.published_bytes + n > FOLLOW_ONS_MAX:
            raise FollowOnTooLarge(too_many_follow_ons(len(self._follow) + 1, self.published_bytes + n))
        self.published_bytes += n
        kinds[kind] = kinds.get(kind, 0) + 1
        follow = self._follow
        if not isinstance(follow, list):
            follow = self._follow = []
        follow.append((ev, ev.id))
        return ev


READ_ONLY = ("ctx.published is read-only: publish follow-ons with ctx.publish(topic, data), which derives each "
             "one's id (exactly-once rests on it) and checks it as the hub will; to drop a follow-on, do not "
             "publish it")


class Published(tuple[Event, ...]):
    """`ctx.published`: a tuple whose list methods say what to do instead of "'tuple' object has no attribute
    'append'", which named neither `ctx.published` nor `ctx.publish`."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError(READ_ONLY)

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


def changed_follow_on(ev: Event) -> str | None:
    """Why the hub would refuse follow-on `ev` now, or None. `publish` checked it, but returned the Event, and a
    plugin may change it after (a subject set from a number, a type cleared); the hub refused the whole ACK such a
    follow-on came in, leaving its event and the ones acked after it in flight for as long as the worker lived.
    Checked again as its handler returns, so it fails its own event as `publish` would have."""
    topic = ev.topic
    bad = (topic_problem(topic) if isinstance(topic, str) and topic else "it has no topic")
    if bad is None:
        bad = object_name_problem(ev.data)
    if bad is None:
        try:
            read_envelope(_checked, ev.to_dict())
        except (EnvelopeError, TypeError, ValueError) as e:
            bad = str(e)
    if bad is None:
        return None
    return (f"follow-on {ev.id} to topic {str(topic)[:80]!r} was changed after ctx.publish checked it, and the hub "
            f"would refuse it now: {bad}; change what you publish before calling ctx.publish, not the Event it "
            "returns")


def measured_again(ev: Event, limit: int | None) -> int:
    """Bytes of follow-on `ev`'s envelope as its handler returns; raises `FollowOnTooLarge` for one over `limit`
    ([hub] max_event_bytes), `ValueError` for one that cannot be encoded any more. `publish` measured it, but the
    data it was given stays the plugin's own object, which it may go on filling after the call (a list of results
    appended to): grown past what one message to the hub carries, the follow-on went out whole in its event's ACK,
    and the hub refused that ACK, leaving its event and the innocent ones acked with it in flight for as long as
    the worker lived. Measured here, it fails its own event as `publish` would have."""
    said = (f"follow-on {ev.id} to topic {str(ev.topic)[:80]!r} was changed after ctx.publish checked it")
    try:
        n = envelope_bytes(ev, ev.topic)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{said}, and cannot be sent to the hub now: {e}; finish its data before calling "
                         "ctx.publish (it is sent as it is when the handler returns)") from None
    if limit is not None and n > limit:
        raise FollowOnTooLarge(f"{said}: its envelope is now {n} bytes, over the hub's limit of {limit} bytes "
                               "([hub] max_event_bytes); finish its data before calling ctx.publish (it is sent "
                               "as it is when the handler returns), and put large data in the object store and "
                               "publish a reference to it")
    return n


def too_many_follow_ons(count: int, total: int) -> str:
    return (f"the follow-ons of one event would take {total} bytes ({count} events), over the "
            f"{FOLLOW_ONS_MAX >> 20} MiB that one acknowledgement to the hub carries; publish a reference (an "
            "object listing the items) for a consumer to fan out, or publish them with HubClient.publish_events")
