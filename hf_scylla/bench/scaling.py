"""Log-linear scaling fits (Scylla, arXiv 2505.07858, Theorems 1.1-1.2) and their plots.

The paper states that the acceptance length grows linearly in the logarithm of the draft's training
tokens and of its depth: ``tau(x) = a + b * ln(x)``. `fit_log_linear` is that least-squares line in
``ln x`` with its coefficient of determination; `plot_log_linear` draws measured points and the fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["LogLinearFit", "fit_log_linear", "plot_log_linear"]


@dataclass(frozen=True)
class LogLinearFit:
    """``tau = a + b * ln(x)`` fitted to ``points`` measurements; ``r2`` is 1 - SS_res / SS_tot."""

    a: float
    b: float
    r2: float
    points: int

    def predict(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted tau at ``x`` (> 0)."""
        return self.a + self.b * np.log(np.asarray(x, dtype=float))

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_log_linear(x: Sequence[float], tau: Sequence[float]) -> LogLinearFit:
    """Least-squares fit of ``tau = a + b * ln(x)``.

    Raises a `ValueError` for fewer than two points, lengths that differ, non-finite values,
    non-positive ``x`` (no logarithm) or a single distinct ``x`` (no slope). ``r2`` is NaN when all
    ``tau`` are equal (no variance to explain).
    """
    xs, taus = np.asarray(x, dtype=float), np.asarray(tau, dtype=float)
    if xs.ndim != 1 or taus.ndim != 1 or xs.shape != taus.shape:
        raise ValueError(
            f"x and tau must be 1-D and of the same length, got shapes {xs.shape} and {taus.shape}"
        )
    if len(xs) < 2:
        raise ValueError(f"a log-linear fit needs at least 2 points, got {len(xs)}")
    if not (np.isfinite(xs).all() and np.isfinite(taus).all()):
        raise ValueError("x and tau must be finite numbers")
    if (xs <= 0).any():
        raise ValueError(f"x must be positive (it enters as ln x), got {xs[xs <= 0].tolist()}")
    log_x = np.log(xs)
    if np.ptp(log_x) == 0:
        raise ValueError(f"x needs at least 2 distinct values to fit a slope, got only {xs[0]}")
    b, a = np.polyfit(log_x, taus, 1)
    residual = float(((taus - (a + b * log_x)) ** 2).sum())
    total = float(((taus - taus.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else math.nan
    return LogLinearFit(a=float(a), b=float(b), r2=r2, points=len(xs))


def plot_log_linear(
    path: Path,
    x: Sequence[float],
    tau: Sequence[float],
    fit: LogLinearFit | None,
    title: str,
    xlabel: str,
) -> Path:
    """Measured ``(x, tau)`` as markers and, if given, the fitted line on a log x axis; a PNG at ``path``."""
    from hf_common.reporting import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, tau, "o", color="C0", label="measured")
    if fit is not None:
        grid = np.geomspace(min(x), max(x), 50)
        label = f"fit: {fit.a:.3f} + {fit.b:.3f} ln x (R² {fit.r2:.3f})"
        ax.plot(grid, fit.predict(grid), "--", color="C1", label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(x)), [f"{value:g}" for value in sorted(set(x))])  # label the measured x
    ax.minorticks_off()
    ax.set(title=title, xlabel=xlabel, ylabel="acceptance length τ")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
