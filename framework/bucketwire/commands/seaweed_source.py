"""`bucketwire seaweed-source`: the durable SeaweedFS source (filer metadata log -> hub, resumable)."""

from __future__ import annotations

from pathlib import Path

import click

from bucketwire.commands._common import config_option, load_config, run_source
from bucketwire.devstack.seaweedfs import WeedError, find_weed
from bucketwire.sources import hub_publisher
from bucketwire.sources.seaweed_meta import SeaweedMetaSource, read_state


@click.command(name="seaweed-source")
@config_option
@click.option("--filer", required=True, help="SeaweedFS filer HOST:PORT (HTTP port; gRPC is PORT+10000).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Where to remember the last acked position (default: <hub state_dir>/seaweed-<filer>.json).")
@click.option("--store", "store_name", help="Store name put into events (default: the hub's default store).")
@click.option("--path-prefix", default="/buckets", show_default=True, help="Filer path to follow.")
@click.option("--since", type=float, default=0.0, show_default=True,
              help="On first start (no state file), replay this many seconds of history.")
@click.option("--reset-state", is_flag=True,
              help="Forget the saved position (e.g. the filer was replaced) and start as on first start.")
def seaweed_source(config_path: str | None, filer: str, state_path: str | None, store_name: str | None,
                   path_prefix: str, since: float, reset_state: bool) -> None:
    """Follow a SeaweedFS filer's metadata log and publish object changes through the hub, resumably."""
    cfg = load_config(config_path)
    if ":" not in filer:
        raise click.ClickException(f"--filer {filer!r} must be HOST:PORT, e.g. 127.0.0.1:8888")
    if store_name is not None and store_name not in cfg.stores:
        known = ", ".join(sorted(cfg.stores)) or "none"
        raise click.ClickException(f"unknown store {store_name!r} (configured: {known})")
    state = Path(state_path) if state_path else Path(cfg.hub.state_dir) / f"seaweed-{filer.replace(':', '_')}.json"
    try:
        weed = find_weed()
        if reset_state and state.exists():
            try:
                state.unlink()
            except OSError as e:
                raise click.ClickException(f"--reset-state: cannot remove {state}: {e.strerror}") from None
            click.echo(f"forgot the saved position in {state}", err=True)
        resume = read_state(state)
    except WeedError as e:
        raise click.ClickException(str(e)) from None
    publish, close = hub_publisher(cfg)
    src = SeaweedMetaSource(publish, filer=filer, state_path=state, store=store_name or cfg.hub.default_store,
                            path_prefix=path_prefix, start_ago=since, weed=weed)
    where = "from now" if resume is None and not since else "from the saved position" if resume else f"{since}s back"
    click.echo(f"following {filer}{path_prefix} {where}; state in {state}; Ctrl+C stops", err=True)
    run_source(src, close, "seaweed-meta")
