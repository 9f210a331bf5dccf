"""`bench bus --against nats --plot FILE.svg`: the comparison as a picture (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from typing import Any

import click

INSTALL_HINT = "--plot needs matplotlib: pip install 'bucketwire[plot]'"
COLOURS = {"bucketwire": "#1f6fb4", "nats": "#3aa757"}
LABELS = [("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]


def require_matplotlib() -> None:
    """Fail before a long run, in one line, rather than after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(INSTALL_HINT) from None


def draw(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # real <text>: smaller, searchable, and sharp at any zoom
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    systems: dict[str, Any] = res["systems"]
    names = list(systems)
    rate = str(res["rates"][0])
    panels = [("latency", f"latency at {int(rate):,} events/s")]
    if res.get("busy"):
        panels.append(("latency_busy", f"latency at {int(rate):,} events/s, one core busy"))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 + 4.5 * len(panels), 4.2),
                             gridspec_kw={"width_ratios": [0.7] + [1.0] * len(panels)})
    ax = axes[0]
    eps = [systems[n]["events_per_s"] for n in names]
    bars = ax.bar(names, eps, color=[COLOURS.get(n, "grey") for n in names])
    top = max(eps)
    for b, n in zip(bars, names, strict=True):
        rounds = [r["events_per_s"] for r in systems[n]["rounds"]]
        top = max(top, *rounds)
        ax.vlines(b.get_x() + b.get_width() * 0.75, min(rounds), max(rounds), colors="black", linewidth=1.2)
        ax.annotate(f"{b.get_height():,.0f}", (b.get_x() + b.get_width() * 0.35, b.get_height()),
                    ha="center", va="bottom", xytext=(0, 3), textcoords="offset points", fontsize=9)
    ax.set_title(f"throughput, {res['events']:,} events\n(median of {res['rounds']} rounds; line: range)",
                 fontsize=10)
    ax.set_ylabel("events/s (higher is better)")
    ax.set_ylim(0, top * 1.12)
    for ax, (which, title) in zip(axes[1:], panels, strict=True):
        width = 0.8 / len(names)
        for k, n in enumerate(names):
            v = systems[n][which][rate]
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(LABELS))]
            ys = [v[key] for key, _ in LABELS]
            bs = ax.bar(xs, ys, width, label=n, color=COLOURS.get(n, "grey"))
            for b, y in zip(bs, ys, strict=True):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                            xytext=(0, 2), textcoords="offset points", fontsize=7)
        ax.set_xticks(range(len(LABELS)), [lab for _, lab in LABELS])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("ms after intended send (log scale; lower is better)", fontsize=9)
        ax.set_title(f"{title}\n(median of rounds)", fontsize=10)
        ax.legend(fontsize=9)
    m = res["machine"]
    fig.suptitle(f"bucketwire vs NATS JetStream {m['nats_server']}: {res['processes']} worker processes, "
                 f"durability {res['durability']}, {m['cpus']} CPUs, Python {m['python']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png" if path.lower().endswith(".png") else "svg")
    plt.close(fig)
