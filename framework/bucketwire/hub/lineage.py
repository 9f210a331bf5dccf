"""Which upload a follow-on descends from, and how many descendants each upload has had.

`max_hops` bounds how deep follow-ons go, not how wide: a plugin that consumes a topic it publishes to, F
follow-ons per event, made F^max_hops events from one upload (10^8 for F = 10 at the default 8), each committed
and handled. So the hub stamps every follow-on with the upload it descends from (the extensions `rootsource` and
`rootid`: the source and id of the first event of the chain, which no publisher or plugin may set) and commits at
most `[hub] max_descendants` follow-ons per upload. The counts live in the hub's memory: a restart, or the next
hub to dispatch a group, counts afresh (README "Known limits").
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import msgspec

MAX_ROOTS = 50_000
"""Uploads whose counts are kept (the least recently charged go first), each by a 16-byte digest of its source
and id (up to 1,280 characters between them): ~8 MB at most, whatever publishers name their events. An upload
forgotten while its chain still runs starts a new budget, so a runaway is bounded by this many uploads charged in
between."""

Root = tuple[str, str]
"""An upload: its source and id, the journal's own key for an event."""


class _Lineage(msgspec.Struct):
    hops: int = 0
    id: str = ""
    source: str = ""
    rootsource: str | None = None
    rootid: str | None = None


_DECODER = msgspec.json.Decoder(_Lineage)


def lineage_of(body: bytes) -> tuple[int, Root]:
    """The `hops` of a journal envelope and the upload it descends from: its own root extensions, or itself when
    it has none (a published event is its own upload). msgspec reads the five keys and skips the rest."""
    try:
        got = _DECODER.decode(body)
    except msgspec.DecodeError:  # ValidationError too (a subclass): the hub wrote it, so it does not happen
        return 0, ("", "")
    if got.rootsource is not None and got.rootid is not None:
        return max(0, got.hops), (got.rootsource, got.rootid)
    return max(0, got.hops), (got.source, got.id)


class Descendants:
    """Follow-ons committed per upload, against a budget."""

    def __init__(self, limit: int, max_roots: int = MAX_ROOTS) -> None:
        self.limit = limit
        self.max_roots = max_roots
        self._counts: OrderedDict[bytes, int] = OrderedDict()

    def take(self, root: Root) -> bool:
        """Count one more follow-on of `root`; False (and nothing counted) when its budget is spent."""
        key = hashlib.blake2b(f"{root[0]}\0{root[1]}".encode(errors="surrogatepass"), digest_size=16).digest()
        n = self._counts.get(key, 0)
        if n:
            self._counts.move_to_end(key)
        if n >= self.limit:
            return False
        self._counts[key] = n + 1
        if len(self._counts) > self.max_roots:
            self._counts.popitem(last=False)
        return True
