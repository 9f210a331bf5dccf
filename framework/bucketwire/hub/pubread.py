"""Reading a PUB request into the envelopes the hub will commit (`unsent_envelope`s), or its refusal.

Two ways, one answer. First a typed schema (`TypedPub`): each envelope's CloudEvents attributes decoded with
their types and limits declared, so msgspec checks them in C while it reads the request, and the envelope dict is
built straight from the Struct. It takes only what `read_envelope` and the time check accept, as they would read
it (performance.md, change 18). Whatever it refuses, whatever the reason (an extension, a wrong type, a lone
surrogate, a time that is no RFC 3339 one, a `seq` `parse_seq` refuses), the request is read again the way it
always was (`decode_pub`, then `read_checked`), which accepts it or says exactly what it always said: the typed
schema never words a refusal itself.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from bucketwire import envelope as E
from bucketwire import protocol as P
from bucketwire.envelope import (
    DATA_BASE64,
    NESTING_REFUSAL,
    Attributes,
    Detour,
    EnvelopeError,
    data_base64_problem,
    is_rfc3339,
    read_envelope,
    seq_or_none,
    time_problem,
    unsent_envelope,
)


class TypedPub(msgspec.Struct, forbid_unknown_fields=True):
    """`P.Pub` with each event as `Attributes`."""

    events: Annotated[list[Attributes], Meta(min_length=1, max_length=P.MAX_PUB_EVENTS)]
    req: P.Req = None


_TYPED = msgspec.json.Decoder(TypedPub)
_PUB = msgspec.json.Decoder(P.Pub)


class PubRefused(Exception):
    """An envelope of a PUB the hub refuses (PUBNACK): the request's id and the refusal."""

    def __init__(self, req: P.Req, error: EnvelopeError) -> None:
        super().__init__(str(error))
        self.req = req
        self.error = error


def read_typed(raw: bytes) -> tuple[P.Req, list[dict[str, Any]]] | None:
    """The request's id and envelopes, by the typed schema; None for anything it does not take (see above)."""
    if len(raw) > P.MAX_HEADER:
        return None
    try:
        pub = _TYPED.decode(raw)
    except (msgspec.MsgspecError, RecursionError):
        return None
    envs = []
    for e in pub.events:
        t = e.time
        if t is None:
            t = E.now_iso()  # through the module: tests fix the clock there
        elif not is_rfc3339(t):  # time_problem's test for a string
            return None
        if e.seq is not None and seq_or_none(e.seq) is None:
            return None
        envs.append(unsent_envelope(e.id, e.source, e.type, e.data, e.subject, t,
                                    e.datacontenttype or "application/json", e.topic, None, e.causationid, e.hops,
                                    e.schemaversion, {}))
    return pub.req, envs


def decode_pub(raw: bytes) -> tuple[P.Pub, bool]:
    """A PUB header, and whether msgspec read it: it refuses lone surrogates, so then every string in it is valid
    Unicode and `Event.from_dict` need not render each envelope to check. Anything else (msgspec refused it)
    goes through `P.decode`, which reads what the json module reads, or raises the error the peer is told."""
    if len(raw) <= P.MAX_HEADER:
        try:
            return _PUB.decode(raw), True
        except msgspec.MsgspecError:
            pass
        except RecursionError:  # msgspec's, past its depth: said as the hub says it of every way in
            raise P.ProtocolError(f"header frame {NESTING_REFUSAL}") from None
    return P.decode(raw, P.Pub), False


def read_checked(events: list[dict[str, Any]], strict: bool) -> list[dict[str, Any]]:
    """Each event read straight into the envelope the hub will commit (`read_envelope` building an
    `unsent_envelope`), then every `time` and `data_base64` checked; raises the EnvelopeError the publisher is
    told. `strict`: see `decode_pub`."""
    envs = [read_envelope(unsent_envelope, d, strict) for d in events]
    for d in events:
        if "time" in d and (why := time_problem(d["time"])) is not None:
            raise EnvelopeError(why)
        if DATA_BASE64 in d and (why := data_base64_problem(d)) is not None:
            raise EnvelopeError(why)
    return envs


_detour = Detour()  # this module's own count (the hub's loop is its only caller)


def read_pub(raw: bytes) -> tuple[P.Req, list[dict[str, Any]], bool]:
    """A PUB header's request id and envelopes, the typed way when it takes the request, else the checked one,
    and whether the typed way read it: then no envelope carries an extension (`Attributes` takes none), so the
    hub's loop need not look for the hub's own among them. Raises ProtocolError for a header that does not
    follow the protocol (ERR) and PubRefused for an envelope the hub refuses (PUBNACK). After a request the typed
    schema passed on, the next ones go the checked way directly for a while (`Detour`)."""
    if _detour.taken():
        tried = False
    else:
        got = read_typed(raw)
        if got is not None:
            return got[0], got[1], True
        tried = True
    pub, strict = decode_pub(raw)
    try:
        envs = read_checked(pub.events, strict)
    except EnvelopeError as e:
        raise PubRefused(pub.req, e) from None
    if tried:
        _detour.start()
    return pub.req, envs, False
