"""`bucketwire keys generate|list`: CURVE keypairs for the hub and its clients.

A separate command (not a shell recipe) so the secret file is created with mode 600 from the start and so the
listing can show public keys and warn about loose permissions without ever printing a secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from bucketwire.config import ConfigError
from bucketwire.security import generate, list_keys, require_curve


@click.group(name="keys")
def keys() -> None:
    """Create and list CURVE keypairs (see docs/security.md)."""


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
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Directory holding key files (e.g. authorized_keys_dir).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(directory: Path, as_json: bool) -> None:
    """List key files with their public keys; secret keys are never printed."""
    rows = list_keys(directory)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        warn = f"  WARNING: {r['warning']}" if r["warning"] else ""
        click.echo(f"{r['name']:<24} {r['kind']:<7} {r['mode']:>4}  {r['public_key']}{warn}")
