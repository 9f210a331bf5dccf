"""The `bucketwire bench` command group."""

from __future__ import annotations

import json

import click


@click.group()
def bench() -> None:
    """Benchmarks; each prints its baseline from the same run and the ratio."""


@bench.command()
@click.option("--events", "-n", type=click.IntRange(100), default=20_000, show_default=True,
              help="Events for the saturation run.")
@click.option("--processes", "-p", multiple=True, type=click.IntRange(1, 64), default=(1, 2), show_default=True,
              help="Worker processes (repeat for several runs).")
@click.option("--durability", "-d", multiple=True, type=click.Choice(["os", "fsync"]), default=("os", "fsync"),
              show_default=True)
@click.option("--rate", multiple=True, type=click.IntRange(1), default=(1000, 10000), show_default=True,
              help="Fixed offered rates for latency (events/s).")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Seconds per fixed-rate phase.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bus(events: int, processes: tuple[int, ...], durability: tuple[str, ...], rate: tuple[int, ...], seconds: float,
        as_json: bool) -> None:
    """Publish -> commit -> worker no-op -> ack, against raw pyzmq PUSH/PULL."""
    from . import bus as bus_mod

    res = bus_mod.run(events, list(processes), list(durability), {r: seconds for r in rate})
    click.echo(json.dumps(res, indent=2) if as_json else bus_mod.render(res))
