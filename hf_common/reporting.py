"""Saving results: JSON records, a Markdown report, line plots (matplotlib, no display), machine info."""

from __future__ import annotations

import json
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def machine() -> str:
    """The accelerator (or CPU), torch's CPU thread count and torch version, for every saved result."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"{device}, {torch.get_num_threads()} torch CPU threads, torch {torch.__version__}"


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a run, e.g. ``hf-adamas passkey --budgets 64``."""
    return shlex.join([prog, *argv])


def write_report(
    output_dir: Path, stem: str, command: str, payload: dict, title: str, body: str
) -> tuple[Path, Path]:
    """``stem.json`` (command, machine and ``payload``) and ``stem.md`` (title, command, machine, body)."""
    json_path = save_json(output_dir / f"{stem}.json", {"command": command, "machine": machine(), **payload})
    md_path = output_dir / f"{stem}.md"
    md_path.write_text(f"# {title}\n\nCommand: `{command}`\n\nMachine: {machine()}\n\n{body}")
    return json_path, md_path


def save_json(path: Path, payload: object) -> Path:
    """Writes ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (floats with 4 significant digits)."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_series(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    baselines: dict[str, float] | None = None,
    log_x: bool = False,
    log_y: bool = False,
) -> Path:
    """One marked line per named series ``(xs, ys)``, plus dashed horizontal baselines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    for index, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{len(series) + index}", label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Adds the legend, writes ``fig`` as a 120-dpi PNG (creating the folder) and closes it."""
    fig.axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
