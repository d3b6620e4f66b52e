"""Figures of DMD results (matplotlib `Figure`s, no pyplot state, headless-safe).

- `eigenvalue_figure`: spectra in the complex plane with the unit circle;
- `curve_figure`: a metric against layer (or q) for several predictors;
- `sweep_figure`: a score against a swept value, one line per variant;
- `power_law_figure`: error against calibration budget, log-log, with the fit;
- `save_figure`: PNG into a folder, and to every logger with `log_image` (W&B, TensorBoard).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure


def eigenvalue_figure(
    panels: Mapping[str, Mapping[str, Any]], title: str = "DMD eigenvalues"
) -> Figure:
    """panels: panel title (e.g. a span) -> {label: complex eigenvalues (tensor or array)};
    one complex plane per panel, with the unit circle."""
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 4.2 * rows))
    t = np.linspace(0, 2 * np.pi, 400)
    markers = "o^sDvP*X"
    for k, (panel, spectra) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.plot(np.cos(t), np.sin(t), color="0.6", lw=1, ls="--", label="unit circle")
        radius = 1.0
        for j, (label, lam) in enumerate(spectra.items()):
            lam = np.asarray(lam.cpu() if hasattr(lam, "cpu") else lam).astype(np.complex128)
            if lam.size:
                radius = max(radius, float(np.abs(lam).max()))
            ax.scatter(
                lam.real, lam.imag, s=12, alpha=0.6, marker=markers[j % len(markers)], label=label
            )
        lim = 1.08 * radius
        ax.set(
            xlim=(-lim, lim),
            ylim=(-lim, lim),
            xlabel="Re",
            ylabel="Im",
            title=panel,
            aspect="equal",
        )
        ax.axhline(0, color="0.85", lw=0.5)
        ax.axvline(0, color="0.85", lw=0.5)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curve_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    xlabel: str = "layer",
    title: str = "",
) -> Figure:
    """curves: label -> (x values, y values); single points are drawn as markers."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for label, (x, y) in curves.items():
        style = "-o" if len(x) > 1 else "D"
        ax.plot(list(x), list(y), style, ms=4, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def sweep_figure(
    rows: Sequence[Mapping[str, Any]], metric: str, title: str, logx: bool = False
) -> Figure:
    """rows (dmd.sweeps.sweep_rows): metric against "value", one line per variant."""
    by_variant: dict[str, tuple[list, list]] = {}
    for row in rows:
        xs, ys = by_variant.setdefault(row["variant"], ([], []))
        xs.append(row["value"])
        ys.append(row[metric])
    categorical = any(isinstance(r["value"], str) for r in rows)
    fig = curve_figure(by_variant, ylabel=metric, xlabel=title, title=f"{metric} vs {title}")
    ax = fig.axes[0]
    if logx and not categorical:
        ax.set_xscale("log")
    return fig


def power_law_figure(
    budgets: Sequence[float], errors: Sequence[float], fit: Mapping[str, float], ylabel: str
) -> Figure:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    B = np.asarray(budgets, dtype=np.float64)
    ax.loglog(B, errors, "o", label="measured")
    grid = np.geomspace(B.min(), B.max(), 50)
    ax.loglog(
        grid, fit["C"] / grid ** fit["gamma"], "-", label=f"C / B^gamma, gamma = {fit['gamma']:.3f}"
    )
    ax.set(xlabel="calibration images B", ylabel=ylabel, title="calibration budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def save_figure(
    fig: Figure,
    folder: str | Path,
    name: str,
    loggers: Iterable[Any] = (),
    step: Optional[int] = None,
) -> Path:
    """Write `folder/name.png` and send it to loggers that have `log_image` (W&B,
    raptor's TensorBoard logger)."""
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=name, images=[str(path)], step=step)
    return path
