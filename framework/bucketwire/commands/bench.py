"""The `bucketwire bench` command group."""

from __future__ import annotations

import json

import click


@click.group()
def bench() -> None:
    """Benchmarks; each prints its baseline from the same run and the ratio."""


@bench.command()
@click.option("--events", "-n", type=click.IntRange(100), default=20_000, show_default=True,
              help="Events for the saturation run (per round with --against nats).")
@click.option("--processes", "-p", multiple=True, type=click.IntRange(1, 64),
              help="Worker processes (repeat for several runs)  [default: 1 and 2; 2 with --against nats]")
@click.option("--durability", "-d", multiple=True, type=click.Choice(["os", "fsync"]),
              help="[default: os and fsync; os with --against nats]")
@click.option("--rate", multiple=True, type=click.IntRange(1),
              help="Fixed offered rates for latency (events/s)  [default: 1000 and 10000; 1000 with --against nats]")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Seconds per fixed-rate phase.")
@click.option("--against", type=click.Choice(["raw", "nats"]), default="raw", show_default=True,
              help="raw: a raw pyzmq PUSH/PULL baseline; nats: NATS JetStream set up the same way (needs the "
                   "'nats' extra).")
@click.option("--rounds", type=click.IntRange(1, 99), default=3, show_default=True,
              help="With --against nats: rounds per system, alternating; medians are compared.")
@click.option("--busy", is_flag=True, help="With --against nats: rerun the latency phase with one core kept busy.")
@click.option("--max-steal", type=click.FloatRange(0, 100), default=None,
              help="With --against nats: a round in which either system lost more than this percent of the "
                   "machine's CPU to the hypervisor in a phase (steal) is run again, both systems, up to "
                   "3 more times; the rounds set aside stay in --json.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="With --against nats: draw events/s and latency percentiles to this SVG (needs the 'plot' "
                   "extra).")
@click.option("--backend", type=click.Choice(["sqlite", "jetstream", "both"]), default="sqlite", show_default=True,
              help="The hub's journal: the SQLite file, a 3-node JetStream cluster (replicas 3), or both side by "
                   "side with the ratio jetstream/sqlite.")
@click.option("--transport", type=click.Choice(["local", "tcp"]), default="local", show_default=True,
              help="With --against nats: how the publisher and the workers reach the hub: its local socket "
                   "([hub] local, what one host should use) or TCP on loopback (what other hosts use).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bus(events: int, processes: tuple[int, ...], durability: tuple[str, ...], rate: tuple[int, ...], seconds: float,
        against: str, rounds: int, busy: bool, max_steal: float | None, plot_file: str | None, backend: str,
        transport: str, as_json: bool) -> None:
    """Publish -> commit -> worker no-op -> ack, against raw pyzmq PUSH/PULL or NATS JetStream."""
    if against == "nats":
        from bucketwire.devstack.bench import versus

        if backend != "sqlite":
            raise click.UsageError("--backend goes with the default --against raw")

        if len(processes) > 1 or len(durability) > 1:
            raise click.UsageError("--against nats compares one setup: give at most one -p and one -d")
        if plot_file:
            from bucketwire.devstack.bench import plot

            plot.require_matplotlib()
        res = versus.run(events, processes[0] if processes else 2, durability[0] if durability else "os",
                         list(rate or (1000,)), seconds, rounds, busy, transport,
                         None if max_steal is None else max_steal / 100)
        if plot_file:
            plot.draw(res, plot_file)
        click.echo(json.dumps(res, indent=2) if as_json else versus.render(res))
        return
    if plot_file or busy or max_steal is not None:
        raise click.UsageError("--plot, --busy and --max-steal go with --against nats")
    backends = ("sqlite", "jetstream") if backend == "both" else (backend,)
    if "jetstream" in backends:
        from bucketwire.devstack.nats import NatsError, find_nats_server

        try:
            find_nats_server()
        except NatsError as e:
            raise click.ClickException(str(e)) from None
    from bucketwire.devstack.bench import bus as bus_mod

    res = bus_mod.run(events, list(processes or (1, 2)), list(durability or ("os", "fsync")),
                      {r: seconds for r in rate or (1000, 10000)}, backends)
    click.echo(json.dumps(res, indent=2) if as_json else bus_mod.render(res))


@bench.command()
@click.option("--requests", "-n", type=click.IntRange(10), default=20_000, show_default=True,
              help="Requests per saturation round (each side).")
@click.option("--processes", "-p", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Client processes.")
@click.option("--connections", "-c", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Keep-alive connections per client process.")
@click.option("--durability", "-d", type=click.Choice(["os", "fsync"]), default="os", show_default=True)
@click.option("--rate", multiple=True, type=click.IntRange(1), default=(500,), show_default=True,
              help="Fixed offered rates for latency (requests/s, repeatable).")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Seconds per fixed-rate phase.")
@click.option("--rounds", type=click.IntRange(1, 99), default=3, show_default=True,
              help="Saturation rounds per side, alternating; the medians are compared.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also measure a no-work stdlib http.server, for reference.")
@click.option("--warmup", type=click.IntRange(0), default=200, show_default=True,
              help="Unmeasured requests sent to each server before its first round (at most --requests; 0: none).")
@click.option("--new-connections", is_flag=True,
              help="A fresh TCP connection per request (as Go clients such as MinIO often do), on both sides.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def webhook(requests: int, processes: int, connections: int, durability: str, rate: tuple[int, ...],
            seconds: float, rounds: int, reference: bool, warmup: int, new_connections: bool, as_json: bool) -> None:
    """MinIO webhook POSTs into the hub (200 after commit), against a no-work server on the same HTTP stack."""
    from bucketwire.devstack.bench import webhook as mod

    res = mod.run(requests, processes, connections, durability, {r: seconds for r in rate}, reference, rounds,
                  new_connections, warmup)
    click.echo(json.dumps(res, indent=2) if as_json else mod.render(res))


@bench.command()
@click.option("--width", type=click.IntRange(8), default=4000, show_default=True, help="Source JPEG width.")
@click.option("--height", type=click.IntRange(8), default=3000, show_default=True, help="Source JPEG height.")
@click.option("--size", "-s", "sizes", multiple=True, type=click.IntRange(1, 16384), default=(256, 1024),
              show_default=True, help="Thumbnail longest edge (repeatable).")
@click.option("--iterations", "-n", type=click.IntRange(1), default=20, show_default=True,
              help="Thumbnails per size, each side.")
@click.option("--format", "fmt", type=click.Choice(["webp", "jpeg", "png"]), default=None,
              help="Output format [default: the plugin's default].")
@click.option("--quality", type=click.IntRange(1, 100), default=None,
              help="Output quality [default: the plugin's default].")
@click.option("--grain", type=click.FloatRange(0, 64), default=3.0, show_default=True,
              help="Sensor noise in the source; more = more bits/pixel = slower entropy decode on both sides.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def thumbnail(width: int, height: int, sizes: tuple[int, ...], iterations: int, fmt: str | None,
              quality: int | None, grain: float, as_json: bool) -> None:
    """The thumbnail plugin's render path on a 12 MP JPEG, against plain Pillow (full decode + LANCZOS)."""
    from bucketwire.devstack.bench import thumbnail as mod

    res = mod.run(width, height, list(sizes), iterations, fmt, quality, grain)
    click.echo(json.dumps(res, indent=2) if as_json else mod.render_text(res))


@bench.command()
@click.option("--small", "small_count", type=click.IntRange(0), default=300, show_default=True,
              help="Number of small objects (0 skips the phase).")
@click.option("--small-kb", type=click.IntRange(1), default=64, show_default=True, help="Size of each small object.")
@click.option("--large-mb", type=click.IntRange(0), default=256, show_default=True,
              help="Size of the large object in MiB (0 skips the phase).")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True,
              help="Rounds over the same objects, baseline and subject each first in turn.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replicate(small_count: int, small_kb: int, large_mb: int, rounds: int, as_json: bool) -> None:
    """The replication plugin between two local SeaweedFS servers, against a plain get_object/put_object loop."""
    from bucketwire.devstack.bench import replicate as mod

    res = mod.run(small_count, small_kb, large_mb, rounds)
    click.echo(json.dumps(res, indent=2) if as_json else mod.render(res))


@bench.command()
@click.option("--prefill", type=click.IntRange(0), default=1_000_000, show_default=True,
              help="Events in the journal before the measured commits.")
@click.option("--events", "-n", type=click.IntRange(100), default=20_000, show_default=True,
              help="Events committed and measured, each side, each round.")
@click.option("--batch", type=click.IntRange(1), default=470, show_default=True,
              help="Events per commit (the hub's typical commit at saturation).")
@click.option("--rounds", type=click.IntRange(1, 99), default=2, show_default=True,
              help="Rounds per side, alternating; medians are compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ids(prefill: int, events: int, batch: int, rounds: int, as_json: bool) -> None:
    """What an event's id costs the journal: ids that grow with time against random ones, same events."""
    from bucketwire.devstack.bench import ids as mod

    res = mod.run(prefill, events, batch, rounds, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(res, indent=2) if as_json else mod.render(res))


@bench.command()
@click.option("--topics", "-t", type=click.IntRange(1), default=60_000, show_default=True,
              help="Other topics, each committed to once just before the measured phase.")
@click.option("--subscriber", is_flag=True, help="Also run a subscriber to every topic (every heartbeat is sent).")
@click.option("--rate", type=click.IntRange(1), default=1000, show_default=True, help="Events per second measured.")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Seconds of the measured phase.")
@click.option("--rounds", type=click.IntRange(1, 99), default=2, show_default=True,
              help="Rounds per side, alternating; medians are compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def topics(topics: int, subscriber: bool, rate: int, seconds: float, rounds: int, as_json: bool) -> None:
    """What many live topics cost other events: latency with them against the same hub without."""
    from bucketwire.devstack.bench import topics as mod

    res = mod.run(topics, subscriber, rate, seconds, rounds, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(res, indent=2) if as_json else mod.render(res))
