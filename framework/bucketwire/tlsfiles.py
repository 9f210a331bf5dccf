"""The PEM certificate files a config names: their dates, and whether a certificate and its key load together.

The hub reads them at start and again when they are renewed (hub/cert_reload.py), and `doctor` checks them before
they expire; all three say what is wrong in the same words, naming the file.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketwire.config import ConfigError

DAY = 86400.0
RENEW_FIX = ("renew it: the running hub serves the renewed files within [security] reload_interval (at once on "
             "kill -HUP), no restart needed")


@dataclass(frozen=True, slots=True)
class CertInfo:
    serial: str
    not_before: float
    not_after: float
    not_before_text: str
    not_after_text: str


def _decoder() -> Callable[[str], dict[str, Any]] | None:
    """The standard library has no public way to read a certificate file's dates; `_test_decode_cert` has read
    them since Python 2.7. If it ever goes, the date checks are skipped rather than anything stopped."""
    decode: Callable[[str], dict[str, Any]] | None = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    return decode


def cert_info(path: Path | str) -> CertInfo | None:
    """The first certificate in `path` (the leaf, in a chain file such as certbot's fullchain.pem), or None when
    the file cannot be read as one (or the dates cannot be read on this Python)."""
    decode = _decoder()
    if decode is None:
        return None
    try:
        c = decode(str(path))
        return CertInfo(str(c.get("serialNumber", "")), ssl.cert_time_to_seconds(c["notBefore"]),
                        ssl.cert_time_to_seconds(c["notAfter"]), str(c["notBefore"]), str(c["notAfter"]))
    except (OSError, ssl.SSLError, KeyError, ValueError, TypeError):
        return None


def dates_problem(where: str, path: Path | str, info: CertInfo, now: float, why: str = "") -> str | None:
    """Why clients refuse the certificate at `now` (expired, not valid yet), or None; `why` says what that stops."""
    if now > info.not_after:
        return f"{where} {path} expired on {info.not_after_text}{why}"
    if now < info.not_before:
        return (f"{where} {path} is not valid before {info.not_before_text}{why}; check the certificate's dates and "
                "this host's clock")
    return None


HTTPS_REFUSED = ": clients that check it (MinIO does) refuse every HTTPS connection"


def _no_password() -> bytes:
    """An encrypted key is refused instead of OpenSSL asking for its pass phrase on a terminal the hub has not got."""
    return b""


def load_pair(ctx: ssl.SSLContext, cert: Path, key: Path, where: str = "[hub]") -> None:
    """Load `cert` and `key` into `ctx`; a ConfigError that says which file is wrong and how.

    OpenSSL's own words for most of these are `[SSL] PEM lib`, whichever file it was."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{where} {name} {path}: cannot load ({e.strerror or e}); give a PEM file the hub can "
                              "read") from None
    if _decoder() is not None and cert_info(cert) is None:
        raise ConfigError(f"{where} tls_cert {cert}: cannot load (no PEM certificate in it); give the "
                          "certificate (or fullchain) PEM file")
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if getattr(e, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{where} tls_key {key} does not match tls_cert {cert}: give the key the certificate "
                              "was issued for (both files of one renewal)") from None
        raise ConfigError(f"{where} tls_key {key}: cannot load (not a PEM private key, or an encrypted one); give "
                          f"the unencrypted PEM key of tls_cert {cert}") from None
    except OSError as e:
        raise ConfigError(f"{where} tls_cert/tls_key: cannot load ({e}); give PEM files the hub can read") from None


def server_context(cert: Path, key: Path, client_ca: Path | None, *, strict_dates: bool,
                   where: str = "[hub]") -> tuple[ssl.SSLContext, CertInfo | None, str | None]:
    """A server context for the pair (TLS 1.2+; with `client_ca` a client certificate signed by it is required),
    the certificate's details, and why clients would refuse it now (its dates), if they would.

    `strict_dates`: a certificate out of its dates is a ConfigError (a renewal that would take HTTPS down is
    refused; at start the hub only warns, since its ZeroMQ side does not need the certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_pair(ctx, cert, key, where)
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{where} tls_client_ca {client_ca}: cannot load ({e}); give the PEM file of the CA "
                              "that signs client certificates") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    info = cert_info(cert)
    problem = dates_problem(f"{where} tls_cert", cert, info, time.time(), HTTPS_REFUSED) if info else None
    if problem is not None and strict_dates:
        raise ConfigError(problem)
    return ctx, info, problem
