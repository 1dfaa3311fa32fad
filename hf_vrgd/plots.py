"""Plots of the VRGD benchmark and large-batch experiment (matplotlib, no display)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from hf_common.reporting import plot_series, plt, save_figure


def plot_grouped_bars(
    path: Path,
    groups: Sequence[str],
    bars: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    reference: float | None = None,
) -> Path:
    """One cluster of bars per group, one bar per named series; an optional dashed reference line."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    width = 0.8 / max(1, len(bars))
    for index, (name, values) in enumerate(bars.items()):
        positions = [g + (index - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(positions, values, width, label=name)
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="black", label=f"target {reference:g}")
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_eval_curves(path_prefix: Path, records: list[dict]) -> list[Path]:
    """Held-out loss against epoch (mean over seeds), one PNG per batch at the 1x learning rate."""
    curves: dict[int, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        if record["lr_multiplier"] != 1.0:
            continue
        by_epoch = curves[record["batch"]][record["optimizer"]]
        for point in record["eval_curve"]:
            by_epoch.setdefault(round(point["epoch"], 3), []).append(point["eval_loss"])
    paths = []
    for batch, by_optimizer in sorted(curves.items()):
        series = {
            name: (sorted(points), [sum(points[e]) / len(points[e]) for e in sorted(points)])
            for name, points in by_optimizer.items()
        }
        title = f"Held-out loss, global batch {batch}"
        path = path_prefix.with_name(f"{path_prefix.name}_batch{batch}.png")
        paths.append(plot_series(path, series, title, "epoch", "eval loss (nats/byte)"))
    return paths


def plot_gaps(path: Path, summary: list[dict]) -> Path:
    """Generalisation gap (eval - train) per optimizer at each batch, 1x learning rate, mean over seeds."""
    rows = [row for row in summary if row["lr_multiplier"] == 1.0]
    optimizers = list(dict.fromkeys(row["optimizer"] for row in rows))
    batches = sorted({row["batch"] for row in rows})
    gap = {(row["optimizer"], row["batch"]): row["gap"] for row in rows}
    bars = {f"batch {b}": [gap.get((o, b), float("nan")) for o in optimizers] for b in batches}
    return plot_grouped_bars(path, optimizers, bars, "Generalisation gap (eval - train loss)", "gap (nats)")
