"""A renewed HTTPS certificate served without a hub restart.

ACME certificates are renewed every 60-90 days, in place: certbot writes the new pair and re-points the configured
paths at it. The hub read the pair at start only, so it served the old certificate until that expired, and then
every webhook failed its handshake. The loop now looks at the files every `[security] reload_interval` (the
allow-list's pace; at once on SIGHUP) and, when they changed, loads the new pair into a new context that the
server hands to new connections; connections already open keep their session. A pair that does not load (a key of
another pair, out of its dates, not PEM, gone) is refused in one line and the old one goes on serving.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from bucketwire.config import ConfigError, HubConfig
from bucketwire.hub.http_server import Server
from bucketwire.tlsfiles import CertInfo, server_context

log = logging.getLogger("bucketwire.hub")

Signature = tuple[tuple[int, ...], ...]


def _signature(paths: list[Path]) -> Signature:
    """What the files are now: a renewal changes the inode (a new file, or a link re-pointed) or the mtime."""
    out: list[tuple[int, ...]] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError as e:
            out.append((-1, e.errno or 0))
    return tuple(out)


class CertReload:
    """Made before the server loads the pair at start, so the files are seen as they were before that load."""

    def __init__(self, cfg: HubConfig, interval: float,
                 on_loaded: Callable[[CertInfo | None], None] = lambda info: None) -> None:
        """`on_loaded`: told the details of each pair loaded, at start and after a renewal (the expiry gauge)."""
        assert cfg.tls_cert is not None and cfg.tls_key is not None
        self.cert, self.key, self.client_ca = cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca
        self.paths = [p for p in (self.cert, self.key, self.client_ca) if p is not None]
        self.interval = interval
        self.on_loaded = on_loaded
        self.loaded = _signature(self.paths)
        """The files as they were when the pair being served was loaded (taken before loading it: a renewal under
        way then is seen as a change and loaded at the next look)."""
        self.refused: tuple[Signature, str] | None = None
        """The last pair refused, with what was said: the same files are not said again."""
        self.pending: Signature | None = None
        self._hup = threading.Event()
        self._next = 0.0

    def request(self) -> None:
        """Thread/signal-safe: look at the files on the next turn (SIGHUP)."""
        self._hup.set()

    def tick(self, now: float, server: Server) -> None:
        hup = self._hup.is_set()
        if not hup and now < self._next:
            return
        self._next = now + self.interval
        self._hup.clear()
        sig = _signature(self.paths)
        if sig == self.loaded:
            self.pending = None
            return
        if not hup and self.refused is not None and self.refused[0] == sig:
            return  # refused as they are; SIGHUP tries them again (a certificate not valid yet may be by now)
        try:
            ctx, info, _ = server_context(self.cert, self.key, self.client_ca, strict_dates=True)
        except ConfigError as e:
            if not hup and self.pending != sig:
                # Not said at the first look: certbot re-points the certificate and the key one after the other,
                # and a look between the two sees a key of another pair for a moment.
                self.pending = sig
                return
            self.pending = None
            said = str(e)
            if self.refused != (sig, said):
                log.error(f"{said}; the hub keeps serving the certificate it loaded before")
            self.refused = (sig, said)
            return
        server.tls = ctx
        self.loaded, self.refused, self.pending = sig, None, None
        self.on_loaded(info)
        log.info(f"[hub] tls_cert {self.cert} reloaded: new connections get serial "
                 f"{info.serial if info else '?'}, valid until {info.not_after_text if info else '?'}")
