"""Draws the demo's chart: latency and requests in flight over time, one column per run.

Uses matplotlib's non-GUI Agg backend, so it works on servers and in CI; matplotlib is
imported only when a chart is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from guardrails.tools.demo.load import Outcome

__all__ = ["COLORS", "in_flight_series", "plot"]

COLORS = {
    "ok": "#2ca02c",
    "stale": "#1f77b4",
    "503 overloaded": "#ff7f0e",
    "503 unavailable": "#9467bd",
    "503 read_only": "#8c564b",
    "503 timeout": "#e377c2",
    "500": "#d62728",
    "client timeout": "#000000",
}
"""Colour of each outcome kind (``Outcome.kind``); anything else is grey."""
_OTHER = "#7f7f7f"
_FLOOR_S = 0.001  # the log axis needs a floor: a 0.3 ms answer is drawn at 1 ms


def in_flight_series(outcomes: Sequence[Outcome]) -> tuple[list[float], list[int]]:
    """Requests sent and not yet answered, as a step function: ``(times, counts)``.

    Counted from the client's side (from each send to its answer or failure), the same
    way for both runs, so a stall shows as a pile-up whatever the server does.
    """
    events: list[tuple[float, int]] = []
    for outcome in outcomes:
        sent = outcome.arrival.at + max(0.0, outcome.lag)
        events.append((sent, 1))
        events.append((outcome.arrival.at + outcome.latency, -1))
    # Answers before sends at the same instant, so the count never overshoots.
    events.sort()
    times, counts, level = [0.0], [0], 0
    for at, step in events:
        level += step
        times.append(at)
        counts.append(level)
    return times, counts


def plot(
    runs: Sequence[tuple[str, Sequence[Outcome]]],
    path: Path,
    *,
    bursts: Sequence[tuple[float, float]] = (),
    title: str = "",
) -> Path:
    """Draw ``runs`` (label and outcomes each) side by side into the PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2,
        len(runs),
        figsize=(5.2 * len(runs), 6.4),
        sharex=True,
        sharey="row",
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    end = max(
        (o.arrival.at + o.latency for _, outcomes in runs for o in outcomes),
        default=1.0,
    )
    for column, (label, outcomes) in enumerate(runs):
        top, bottom = axes[0][column], axes[1][column]
        for start, stop in bursts:
            for ax in (top, bottom):
                ax.axvspan(start, stop, color="#000000", alpha=0.05, linewidth=0)
        kinds = sorted({o.kind for o in outcomes}, key=_kind_order)
        for kind in kinds:
            chosen = [o for o in outcomes if o.kind == kind]
            top.scatter(
                [o.arrival.at for o in chosen],
                [max(o.latency, _FLOOR_S) for o in chosen],
                s=7,
                color=COLORS.get(kind, _OTHER),
                marker="x" if kind == "client timeout" else "o",
                linewidths=0.8 if kind == "client timeout" else 0,
                alpha=0.75,
                label=f"{kind} ({len(chosen):,})",
            )
        top.set_yscale("log")
        top.set_title(label, fontsize=11)
        top.grid(True, which="major", alpha=0.3)
        top.legend(loc="upper left", fontsize=7, markerscale=1.6, framealpha=0.85)
        times, counts = in_flight_series(outcomes)
        bottom.step(times, counts, where="post", color="#333333", linewidth=1)
        bottom.fill_between(times, counts, step="post", color="#333333", alpha=0.15)
        bottom.grid(True, alpha=0.3)
        bottom.set_xlabel("seconds since the load started (shaded: bursts)")
        bottom.set_xlim(0, end * 1.02)
    axes[0][0].set_ylabel("latency from scheduled send (s, log)")
    axes[1][0].set_ylabel("requests in flight")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _kind_order(kind: str) -> tuple[int, str]:
    known = list(COLORS)
    return (known.index(kind) if kind in known else len(known), kind)
