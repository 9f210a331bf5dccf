"""`bucketwire listen`: follow a MinIO bucket's ListenBucketNotification stream into the hub.

Convenient because MinIO needs no configuration for it, but lossy while disconnected; see docs/sources.md for
the durable webhook + `queue_dir` setup.
"""

from __future__ import annotations

import logging

import click

from bucketwire.commands._common import config_option, load_config, run_source
from bucketwire.sources import hub_publisher
from bucketwire.sources.minio_listen import DEFAULT_EVENTS, MinioListenSource

log = logging.getLogger("bucketwire.listen")


@click.command(name="listen")
@config_option
@click.option("--store", "store_name", required=True, help="[stores.NAME] of the MinIO server to listen to.")
@click.option("--bucket", "-b", required=True, help="Bucket to follow.")
@click.option("--prefix", default="", help="Only keys starting with this.")
@click.option("--suffix", default="", help="Only keys ending with this.")
@click.option("--events", "-e", "event_names", multiple=True,
              help=f"Event names to listen for (repeatable; default {' '.join(DEFAULT_EVENTS)}).")
def listen(config_path: str | None, store_name: str, bucket: str, prefix: str, suffix: str,
           event_names: tuple[str, ...]) -> None:
    """Publish a MinIO bucket's notifications through the hub (ListenBucketNotification, lossy)."""
    cfg = load_config(config_path)
    store = cfg.stores.get(store_name)
    if store is None:
        known = ", ".join(sorted(cfg.stores)) or "none"
        raise click.ClickException(f"unknown store {store_name!r} (configured: {known}); add [stores.{store_name}]")
    import minio
    from minio.helpers import check_bucket_name

    try:  # a name S3 refuses is refused on every reconnect: say so once instead of retrying it forever
        check_bucket_name(bucket)
    except ValueError as e:
        raise click.ClickException(f"--bucket {bucket}: {e}; S3 bucket names are 3 to 63 characters: lower-case "
                                   "letters, digits, '.' and '-'") from None
    try:
        client = minio.Minio(store.endpoint, access_key=store.access_key or None, secret_key=store.secret_key or None,
                             secure=store.secure, region=store.region or "us-east-1")
    except ValueError as e:
        raise click.ClickException(f"store {store_name!r}: {e}") from None
    publish, close = hub_publisher(cfg)
    src = MinioListenSource(publish, client, bucket=bucket, store=store_name, prefix=prefix, suffix=suffix,
                            events=tuple(event_names) or DEFAULT_EVENTS)
    click.echo(f"listening to {store.endpoint}/{bucket} (prefix {prefix!r}, suffix {suffix!r}); Ctrl+C stops",
               err=True)
    run_source(src, close, "minio-listen")
