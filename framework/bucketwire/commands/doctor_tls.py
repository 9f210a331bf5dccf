"""`doctor`: the certificates the config names, before they expire.

An expired HTTPS certificate loads without a word and then every webhook fails its handshake while /healthz says
200; an expired NATS client certificate stops the journal at the next reconnect. Doctor reads each one's dates
(14 days ahead is a warning: time to renew; past or not yet valid is an error) and whether each key belongs to its
certificate, one line per file, config only.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

from bucketwire.commands.doctor import Finding
from bucketwire.config import Config, ConfigError
from bucketwire.tlsfiles import DAY, HTTPS_REFUSED, cert_info, dates_problem, load_pair

SOON_DAYS = 14


def _dates(where: str, path: Path, now: float, fix: str, why: str, suffix: str = "") -> Finding:
    info = cert_info(path)
    if info is None:
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            return Finding("error", f"{where} {path}: cannot read ({e.strerror or e})", fix)
        return Finding("error", f"{where} {path}: no PEM certificate in it", fix)
    problem = dates_problem(where, path, info, now, why)
    if problem is not None:
        return Finding("error", problem, fix)
    left = info.not_after - now
    if left < SOON_DAYS * DAY:
        span = f"{int(left // DAY)} days" if left >= DAY else f"{int(left // 3600)} hours"
        return Finding("warn", f"{where} {path} expires in {span} (on {info.not_after_text})", fix)
    return Finding("ok", f"{where} {path}: valid until {info.not_after_text}{suffix}")


def _pair(section: str, cert: Path, key: Path, now: float, fix: str, why: str) -> Finding:
    """One line for a certificate and its key: the key first (a pair that does not load is the worse news)."""
    try:
        load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key, section)
    except ConfigError as e:
        what, _, own_fix = str(e).partition("; ")  # the line says how to fix a file that does not load
        return Finding("error", what, own_fix or fix)
    return _dates(f"{section} tls_cert", cert, now, fix, why, ", tls_key matches")


def check_tls(cfg: Config) -> list[Finding]:
    now = time.time()
    out: list[Finding] = []
    hub, journal = cfg.hub, cfg.journal
    renew_hub = ("renew it; the running hub serves the renewed files within [security] reload_interval "
                 "(at once on kill -HUP)")
    if hub.tls_cert is not None and hub.tls_key is not None:
        out.append(_pair("[hub]", hub.tls_cert, hub.tls_key, now, renew_hub, HTTPS_REFUSED))
    if hub.tls_client_ca is not None:
        out.append(_dates("[hub] tls_client_ca", hub.tls_client_ca, now,
                          "renew the CA that signs the webhook clients' certificates, then restart the hub",
                          ": the hub refuses every client certificate it signed"))
    if journal.tls_cert is not None and journal.tls_key is not None:
        out.append(_pair("[journal]", journal.tls_cert, journal.tls_key, now,
                         "renew the NATS client certificate and restart the hub (it is read when it connects)",
                         ": the NATS servers refuse the hub's connection"))
    if journal.tls_ca is not None:
        out.append(_dates("[journal] tls_ca", journal.tls_ca, now, "renew the NATS servers' CA certificate",
                          ": the hub cannot verify the NATS servers"))
    return out
