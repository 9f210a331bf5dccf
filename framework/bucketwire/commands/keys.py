"""`bucketwire keys generate|list|revoke|unrevoke`: CURVE keypairs for the hub and its clients, and revocation.

A separate command (not a shell recipe) so the secret file is created with mode 600 from the start and so the
listing can show public keys and warn about loose permissions without ever printing a secret.

`revoke` exists because deleting a key file only shuts a key out of the hub whose directory it was deleted from:
with several hubs on one JetStream cluster a revoked worker just reconnected to another. The revocation is
recorded where every hub reads it (the cluster's `<prefix>_revoked` KV bucket; with the SQLite journal, the one
hub's state_dir), so it holds whatever any hub's directory says, across restarts and for hubs started later.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from bucketwire.commands._common import config_option, load_config
from bucketwire.config import Config, ConfigError
from bucketwire.security import (
    REVOKED_FILE,
    client_keys,
    generate,
    key_hex,
    key_names,
    key_of_hex,
    list_keys,
    load_keypair,
    public_key_of,
    read_local_revocations,
    require_curve,
    revocation_record,
    server_public_keys,
    write_local_revocations,
)

Records = dict[str, dict[str, Any]]
"""hex of the raw public key -> what `keys revoke` recorded (public_key, name, by, at, reason)."""


class UsageProblem(click.ClickException):
    """A key argument that names nothing, or one that must not be revoked: one line, exit 2."""

    exit_code = 2


@click.group(name="keys")
def keys() -> None:
    """Create, list and revoke CURVE keypairs (see docs/security.md)."""


@keys.command(name="generate")
@click.argument("name")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for NAME.key (public) and NAME.key_secret (secret, mode 600).")
def generate_cmd(name: str, directory: Path) -> None:
    """Create NAME.key and NAME.key_secret in DIR. Copy NAME.key into the hub's authorized_keys_dir."""
    try:
        require_curve()
        pub, sec = generate(name, directory)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"public key: {pub}")
    click.echo(f"secret key: {sec} (mode 600; keep it on the host that uses it)")


@keys.command(name="list")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Directory holding key files (default with -c: the hub's authorized_keys_dir).")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(directory: Path | None, config_path: str | None, as_json: bool) -> None:
    """List key files with their public keys; secret keys are never printed. With -c, keys revoked with
    `keys revoke` are shown as revoked (also ones whose file is gone)."""
    cfg = load_config(config_path) if config_path else None
    if directory is None:
        d = cfg.security.authorized_keys_dir if cfg is not None else None
        if d is None:
            raise click.UsageError("give --dir DIR, or -c CONFIG whose [security] sets authorized_keys_dir")
        directory = d
    rows = list_keys(directory)
    records: Records = _read(cfg) if cfg is not None and cfg.security.curve else {}
    for r in rows:
        rec = records.get(_hex_or_empty(r["public_key"]))
        r["revoked"] = rec
        if rec is not None and r["kind"] == "public":
            r["warning"] = f"REVOKED {rec.get('at', '')} by {rec.get('by', '?')}; every hub refuses it"
    listed = {_hex_or_empty(r["public_key"]) for r in rows}
    for h, rec in sorted(records.items()):
        if h not in listed:
            rows.append({"name": rec.get("name") or "-", "file": None, "kind": "revoked", "public_key":
                         rec.get("public_key", ""), "mode": "", "has_secret": False, "revoked": rec,
                         "warning": f"REVOKED {rec.get('at', '')} by {rec.get('by', '?')} (no file here)"})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        warn = f"  {'' if r['revoked'] else 'WARNING: '}{r['warning']}" if r["warning"] else ""
        click.echo(f"{r['name']:<24} {r['kind']:<7} {r['mode']:>4}  {r['public_key']}{warn}")


class _KeyCommand(click.Command):
    """Z85 has '-' among its characters, so one public key in 85 starts with it, and click read it as options (a
    cluster of short ones, `-c` among them): such an argument is moved behind `--`, where it can only be KEY."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        keys = [a for a in args if a.startswith("-") and public_key_of(a) is not None]
        if keys and "--" not in args:
            args = [a for a in args if a not in keys] + ["--", *keys]
        return super().parse_args(ctx, args)


@keys.command(name="revoke", cls=_KeyCommand)
@click.argument("key")
@config_option
@click.option("--reason", default="", help="Why; recorded with who and when.")
def revoke_cmd(key: str, config_path: str | None, reason: str) -> None:
    """Refuse KEY on every hub: a file stem in authorized_keys_dir, or the 40-character public key itself.

    With [journal] backend = "jetstream" the revocation is recorded in the cluster, so every hub refuses the key
    (new handshakes, live connections, subscribers) within reload_interval, even with its file still in a hub's
    directory, across restarts, and on hubs started later. With the SQLite journal it goes to the hub's
    state_dir."""
    cfg = _secure_config(config_path)
    records = _read(cfg)
    public, name = _resolve(cfg, key, records)
    _refuse_own(cfg, public)
    h = key_hex(public)
    shown = f"{name} ({public.decode()})" if name else public.decode()
    if h in records:
        rec = records[h]
        click.echo(f"{shown} is already revoked (since {rec.get('at', '?')} by {rec.get('by', '?')})")
        return
    rec = revocation_record(public, name, reason)
    _write(cfg, lambda recs: recs.__setitem__(h, rec))
    click.echo(f"revoked {shown}: {_where(cfg)} refuses it within [security] reload_interval = "
               f"{cfg.security.reload_interval:g} s (at once after kill -HUP); `keys unrevoke` lifts it")
    _no_hub_here(cfg, "revoke")


def _no_hub_here(cfg: Config, verb: str) -> None:
    """With SQLite the list is the hub's own file, read from its state_dir on its host. Run elsewhere (a worker's
    copy of the config, a laptop's), `keys revoke` wrote a file no hub reads and said the hub refuses the key:
    the key went on working. No journal beside the list: no hub has run with it on this host, and that is said."""
    if cfg.journal.backend == "jetstream":
        return
    journal = cfg.hub.state_dir / "journal.db"
    if not journal.exists():
        click.echo(f"warning: no hub journal at {journal}: no hub has run with this state_dir on this host, and the "
                   f"hub reads the list from its own state_dir ({REVOKED_FILE}); run `bucketwire keys {verb}` on the "
                   "hub's host with its config, unless this hub has yet to start", err=True)


@keys.command(name="unrevoke", cls=_KeyCommand)
@click.argument("key")
@config_option
def unrevoke_cmd(key: str, config_path: str | None) -> None:
    """Lift a revocation made with `keys revoke` (KEY: its name or its public key). The key is admitted again
    by the hubs whose authorized_keys_dir holds its file."""
    cfg = _secure_config(config_path)
    records = _read(cfg)
    public, name = _resolve(cfg, key, records)
    h = key_hex(public)
    shown = f"{name} ({public.decode()})" if name else public.decode()
    if h not in records:
        click.echo(f"{shown} is not revoked; nothing to do")
        return
    _write(cfg, lambda recs: recs.pop(h, None))
    click.echo(f"unrevoked {shown}: {_where(cfg)} admits it again within [security] reload_interval = "
               f"{cfg.security.reload_interval:g} s wherever its .key file is in authorized_keys_dir")
    _no_hub_here(cfg, "unrevoke")


# -- helpers -------------------------------------------------------------------------------------------------------
_NAME = re.compile(r"[^/\0]{1,128}")


def _secure_config(path: str | None) -> Config:
    cfg = load_config(path)
    if not cfg.security.curve:
        raise click.ClickException(f"[security] curve is off in {cfg.path}: the hub admits every client, so there "
                                   "is nothing to revoke; turn CURVE on (docs/security.md)")
    return cfg


def _hex_or_empty(public: str) -> str:
    p = public_key_of(public)
    return key_hex(p) if p is not None else ""


def _resolve(cfg: Config, arg: str, records: Records) -> tuple[bytes, str]:
    """(Z85 public key, its name or "") that `arg` means: a public key, or a name in authorized_keys_dir, or the
    name a revocation recorded (its file may be gone)."""
    d = cfg.security.authorized_keys_dir
    public = public_key_of(arg)
    if public is not None:
        names = key_names(d) if d is not None and d.is_dir() else {}
        rec = records.get(key_hex(public))
        return public, names.get(public) or (str(rec.get("name") or "") if rec else "")
    if not arg.strip() or not _NAME.fullmatch(arg) or arg.startswith("."):
        raise UsageProblem(f"{arg!r} is neither a key name nor a 40-character Z85 public key; give the file stem "
                           "of a .key in authorized_keys_dir (`bucketwire keys list -c CONFIG`) or the public key")
    f = d / f"{arg}.key" if d is not None else None
    if f is not None and f.exists():
        try:
            return load_keypair(f, secret=False, what="key")[0], arg
        except ConfigError as e:
            raise UsageProblem(f"{e}; give the public key itself instead") from None
    for rec in records.values():
        if rec.get("name") == arg and (p := public_key_of(str(rec.get("public_key", "")))) is not None:
            return p, arg
    raise UsageProblem(f"no key named {arg!r}: there is no {arg}.key in authorized_keys_dir {d} and no revoked "
                       "key by that name; see `bucketwire keys list -c CONFIG`, or give the public key itself")


def _refuse_own(cfg: Config, public: bytes) -> None:
    """The hub's own key, or the one this config's commands use, would lock the operator out: refused."""
    own = server_public_keys(cfg.security)
    if public in own:
        raise UsageProblem(f"that is the hub's own server key ({own[public]}); clients would still connect with it "
                           "-- to replace it, rotate the server key (docs/security.md, \"Rotating the server key\")")
    try:
        mine = client_keys(cfg)
    except ConfigError:
        mine = None
    if mine is not None and mine.public == public:
        raise UsageProblem("that is the client key this config uses ([security] client_secret_key): revoking it "
                           "would shut out the commands you run with it; run `keys revoke` with another admin "
                           "key's config")


def _where(cfg: Config) -> str:
    return "every hub on the cluster" if cfg.journal.backend == "jetstream" else "the hub"


def _read(cfg: Config) -> Records:
    try:
        if cfg.journal.backend == "jetstream":
            return _cluster(cfg, None)
        return read_local_revocations(cfg.hub.state_dir / REVOKED_FILE)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _write(cfg: Config, change: Callable[[Records], object]) -> None:
    try:
        if cfg.journal.backend == "jetstream":
            _cluster(cfg, change)
            return
        path = cfg.hub.state_dir / REVOKED_FILE
        with _locked(path):
            recs = read_local_revocations(path)
            change(recs)
            write_local_revocations(path, recs)
    except OSError as e:
        raise click.ClickException(f"cannot write the revocation list under {cfg.hub.state_dir} ({e.strerror or e});"
                                   " run this as the user the hub runs as") from None
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One `keys revoke`/`unrevoke` at a time changes the local list: two at once must not lose one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _cluster(cfg: Config, change: Callable[[Records], object] | None) -> Records:
    """The cluster's revocation records; with `change`, applied to the bucket (put new keys, purge gone ones)."""
    try:
        return asyncio.run(_cluster_async(cfg, change))
    except ConfigError:
        raise
    except Exception as e:  # unreachable, refused, no quorum: one line
        raise ConfigError(f"cannot reach the revocation list on the NATS cluster at "
                          f"{', '.join(cfg.journal.servers)} ({str(e) or type(e).__name__}); check [journal] "
                          "servers and that a majority of the cluster is up") from None


async def _cluster_async(cfg: Config, change: Callable[[Records], object] | None) -> Records:
    import nats

    from bucketwire.hub.backends import jetstream_settings
    from bucketwire.hub.journal_jetstream import auth_options, kv_latest, revoked_bucket

    s = jetstream_settings(cfg)

    async def quiet(e: Exception) -> None:
        return None

    opts: dict[str, Any] = {"servers": s.servers, "connect_timeout": s.connect_timeout, "allow_reconnect": False,
                            "max_reconnect_attempts": 0, "name": "bucketwire-keys", "error_cb": quiet}
    opts.update(auth_options(s))
    nc = await asyncio.wait_for(nats.connect(**opts), (s.connect_timeout + 1) * len(s.servers))
    try:
        bucket = revoked_bucket(s)
        if change is None:
            got = await kv_latest(nc, bucket.bucket, s.request_timeout, missing_ok=True)
            return {h: _record(v) for h, (v, _) in got.items() if key_of_hex(h)}
        js = nc.jetstream(timeout=s.request_timeout)
        kv = await js.create_key_value(bucket)  # the hubs create it the same way: whichever comes first
        before = {h: _record(v) for h, (v, _) in
                  (await kv_latest(nc, bucket.bucket, s.request_timeout)).items() if key_of_hex(h)}
        after = dict(before)
        change(after)
        for h, rec in after.items():
            if h not in before:
                await kv.put(h, json.dumps(rec).encode())
        for h in before:
            if h not in after:
                await kv.purge(h)
        return after
    finally:
        await nc.close()


def _record(value: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(value)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}
