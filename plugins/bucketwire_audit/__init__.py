"""bucketwire audit plugin: one hash-chained JSON line per event, verifiable with `bucketwire audit verify`.

Configured in `[plugins.audit]` (see docs/plugins.md). The log path comes only from the settings; nothing in an
event (keys with `..`, NUL bytes, absolute paths, huge names) ever becomes part of a file path: event fields are
only ever JSON-escaped values inside a line. The format, locking and verification live in `chain.py`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import click

from bucketwire import ConfigError, Context, Event, hookimpl, with_defaults

from .chain import AuditLog, ChainError, Incomplete, VerifyResult, canonical, dedup_key, seal, verify

PLUGIN_NAME = "audit"
MAX_FIELD = 2048
MAX_KEY_FIELD = 4096

DEFAULTS: dict[str, Any] = {
    "path": None,
    "dir": None,
    "max_bytes": 100 << 20,
    "rotate_daily": True,
    "fsync": "always",
    "fsync_interval": 1.0,
    "index_days": 30,
    "store": None,
    "bucket": None,
    "prefix": "audit/",
}

@hookimpl
def validate_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Exactly one of `path`/`dir`; positive limits; a known fsync policy. Defaults filled in."""
    s = with_defaults(settings, DEFAULTS)
    path, dir_ = s["path"], s["dir"]
    if (path is None) == (dir_ is None):
        raise ConfigError('path: set exactly one of path = "/var/log/bucketwire/audit.log" or dir = "/var/log/..."')
    for k in ("path", "dir"):
        if s[k] is not None and (not isinstance(s[k], str) or not s[k] or "\x00" in s[k]):
            raise ConfigError(f"{k}: expected a file system path string, got {s[k]!r}")
    p = Path(path) if path else Path(dir_) / "audit.log"
    s["path"] = str(p.expanduser().absolute())
    if Path(s["path"]).is_dir():
        raise ConfigError(f"path: {s['path']} is a directory; name the log file, or use dir = ...")
    for k in ("max_bytes", "index_days"):
        v = s[k]
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{k}: expected a number > 0, got {v!r}")
    if s["max_bytes"] < 4096:
        raise ConfigError(f"max_bytes: {s['max_bytes']} is too small for a rotation size; use 4096 or more")
    if s["fsync"] not in ("always", "never", "interval"):
        raise ConfigError(f'fsync: expected "always", "never" or "interval", got {s["fsync"]!r}')
    v = s["fsync_interval"]
    if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"fsync_interval: expected seconds > 0, got {v!r}")
    if not isinstance(s["rotate_daily"], bool):
        raise ConfigError(f"rotate_daily: expected true or false, got {s['rotate_daily']!r}")
    for k in ("store", "bucket"):
        if s[k] is not None and (not isinstance(s[k], str) or not s[k]):
            raise ConfigError(f"{k}: expected a non-empty string, got {s[k]!r}")
    if s["store"] is not None and s["bucket"] is None:
        raise ConfigError('bucket: store is set but bucket is not; add bucket = "audit" to copy records to a store')
    if not isinstance(s["prefix"], str) or "\x00" in s["prefix"] or ".." in s["prefix"].split("/"):
        raise ConfigError(f'prefix: expected a key prefix such as "audit/", got {s["prefix"]!r}')
    return s


def audit_log(ctx: Context) -> AuditLog:
    """This process's writer for the configured log, kept in `ctx.state` (locks and descriptors are per
    process): opened by `worker_startup`, or here if a caller skipped it."""
    lg: AuditLog | None = ctx.state.get("log")
    if lg is None:
        settings = ctx.settings
        lg = AuditLog(
            settings["path"], max_bytes=int(settings["max_bytes"]), rotate_daily=settings["rotate_daily"],
            fsync=settings["fsync"], fsync_interval=float(settings["fsync_interval"]),
            index_days=float(settings["index_days"]),
        )
        ctx.state["log"] = lg
    return lg


def _cap(v: Any, limit: int = MAX_FIELD) -> Any:
    if v is None or isinstance(v, bool | int | float):
        return v
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= limit else s[:limit] + "...[truncated]"


def build_record(event: Event, ctx: Context) -> dict[str, Any]:
    """The fields of one audit line. Everything is a JSON value; nothing here is used as a path."""
    d = event.data if isinstance(event.data, dict) else {}
    size = d.get("size")
    return {
        "time": _cap(event.time),
        "type": _cap(event.type),
        "event_id": _cap(event.id),
        "source": _cap(event.source),
        "subject": _cap(event.subject, MAX_KEY_FIELD),
        "topic": _cap(event.topic),
        "seq": event.seq,
        "hops": event.hops,
        "group": _cap(ctx.group),
        "store": _cap(d.get("store")),
        "bucket": _cap(d.get("bucket")),
        "key": _cap(d.get("key"), MAX_KEY_FIELD),
        "version": _cap(d.get("version_id")),
        "size": size if isinstance(size, int) and not isinstance(size, bool) else None,
        "etag": _cap(d.get("etag")),
        "principal": _cap(d.get("principal")),
        "source_ip": _cap(d.get("source_ip")),
        "user_agent": _cap(d.get("user_agent")),
    }


@hookimpl
def worker_startup(ctx: Context) -> None:
    """Open the log, lock file and index once per worker process (fails fast on an unwritable path)."""
    lg = audit_log(ctx)
    lg.prune_index()


@hookimpl
def worker_shutdown(ctx: Context) -> None:
    """Flush (fsync) and close this process's log."""
    lg = ctx.state.pop("log", None)
    if lg is not None:
        lg.close()


@hookimpl
def handle_event(event: Event, ctx: Context) -> None:
    """Append one line for this event (unless this event, its source and id, is already in the log); copy it to
    a store."""
    s = ctx.settings
    _new, n, line = audit_log(ctx).append(dedup_key(event.source, event.id), build_record(event, ctx),
                                          legacy=(event.source, _cap(event.id, 256)))
    if s["bucket"]:
        # Re-put on redelivery too: the first attempt may have written the line but failed here.
        digest = hashlib.sha256(event.id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        key = f"{s['prefix']}{n:012d}-{digest}.json"
        data = line + b"\n"
        ctx.store(s["store"]).put_object(
            s["bucket"], key, io.BytesIO(data), len(data), content_type="application/x-ndjson"
        )


@hookimpl
def register_commands(cli: click.Group) -> None:
    """`bucketwire audit verify PATH...`: check the hash chain; exit 1 naming the first bad line, 3 when only the
    last record is cut off or missing where an interrupted append left it (see `Incomplete`)."""

    @cli.group("audit")
    def audit_group() -> None:
        """Tools for the tamper-evident audit log."""

    @audit_group.command("verify")
    @click.argument("paths", nargs=-1, required=True, type=click.Path())
    @click.option("--partial", is_flag=True,
                  help="Accept a chain that starts after record 1, or that ends before the index head while the "
                       "active log is in place but not among PATHS (only some rotated files at hand).")
    def verify_cmd(paths: tuple[str, ...], partial: bool) -> None:
        """Verify audit log files (a directory means every log in it), in chain order."""
        try:
            r = verify(paths, partial=partial)
        except Incomplete as e:
            click.echo(f"audit verify: INCOMPLETE: {e}", err=True)
            raise SystemExit(3) from None
        except ChainError as e:
            click.echo(f"audit verify: FAILED: {e}", err=True)
            raise SystemExit(1) from None
        except OSError as e:
            click.echo(f"audit verify: cannot read: {e}", err=True)
            raise SystemExit(2) from None
        unanchored = ""
        if not r.anchored:
            unanchored = (f"; no index beside the log ({r.index}): lines cut from the end, or a chain rewritten whole, "
                          "cannot be told from an intact log; compare the head with the object copy")
        click.echo(f"audit verify: OK: {r.records} records in {r.files} file(s), chain intact (head n={r.head_n})"
                   f"{unanchored}")


__all__ = [
    "PLUGIN_NAME", "AuditLog", "ChainError", "Incomplete", "VerifyResult", "build_record", "canonical", "handle_event",
    "register_commands", "seal", "validate_settings", "verify",
]
