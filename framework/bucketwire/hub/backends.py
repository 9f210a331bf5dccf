"""Opens the journal `[journal] backend` names: the embedded SQLite file, or a NATS JetStream cluster."""

from __future__ import annotations

from bucketwire.config import Config
from bucketwire.hub.journal import Journal
from bucketwire.hub.journal_jetstream import JetStreamJournal, JetStreamSettings


def jetstream_settings(cfg: Config) -> JetStreamSettings:
    j = cfg.journal
    return JetStreamSettings(
        servers=list(j.servers), replicas=j.replicas, prefix=j.prefix, duplicate_window=j.duplicate_window,
        max_age=cfg.hub.retention_age, max_bytes=-1 if cfg.raw.get("hub", {}).get("retention_mb") is None
        else cfg.hub.retention_bytes, user=j.user, password=j.password, token=j.token,
        creds=str(j.creds) if j.creds else None, tls_ca=str(j.tls_ca) if j.tls_ca else None,
        tls_cert=str(j.tls_cert) if j.tls_cert else None, tls_key=str(j.tls_key) if j.tls_key else None,
        connect_timeout=j.connect_timeout, request_timeout=j.request_timeout, lease_ttl=j.lease_ttl,
        start_timeout=j.start_timeout,
    )


def open_journal(cfg: Config) -> Journal | JetStreamJournal:
    """Raises JournalError (one line: what to fix) when the journal cannot be opened."""
    if cfg.journal.backend == "jetstream":
        return JetStreamJournal(jetstream_settings(cfg), cfg.hub.id, cfg.hub.advertise)
    return Journal(cfg.hub.state_dir / "journal.db", cfg.hub.durability)
