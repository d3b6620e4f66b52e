"""One figure per analysis, every model on the same axes (teacher solid, Raptors dashed,
one colour each) and each Raptor's phase boundaries as dotted lines in its colour, between
the last layer of a phase and the first of the next. `stats`: model name -> `Dynamics.compute()`;
`boundaries`: model name -> boundaries."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
from matplotlib.figure import Figure

from dmd.plots import eigenvalue_figure

Stats = Dict[str, Dict[str, Any]]
COLOURS = ["k", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _style(i: int) -> Dict[str, Any]:
    return {"color": COLOURS[i % len(COLOURS)], "ls": "-" if i == 0 else "--", "lw": 1.5}


def _grid(rows: int, cols: int):
    """A figure of rows x cols panels with fixed margins (a layout engine costs more time
    than the analysis on the demo)."""
    height = 2.9 * rows + 0.6
    fig = Figure(figsize=(3.6 * cols, height))
    fig.subplots_adjust(
        left=0.08, right=0.98, bottom=0.5 / height, top=1 - 0.7 / height, wspace=0.35, hspace=0.5
    )
    return fig, fig.subplots(rows, cols, squeeze=False)


def _groups(entries: Dict[str, Any]) -> List[str]:
    """The token groups drawn: the model's own (cls, reg, patch); "all" stays in the tables."""
    return [g for g in entries if g != "all"]


def _phases(ax, boundaries: Dict[str, List[int]], names: List[str]) -> None:
    for i, name in enumerate(names):
        for b in boundaries.get(name, []):
            ax.axvline(b + 0.5, color=_style(i)["color"], ls=":", lw=1)


def layer_figure(
    stats: Stats,
    boundaries: Dict[str, List[int]],
    rows: List[tuple[str, str, str]],
    first_layer: int,
    title: str,
    log: bool = False,
) -> Figure:
    """rows: (statistic key, "mean" | "std" | "var", y label); one column per token group
    present in the first model; x = layer first_layer.. (states from 0, transitions from 1)."""
    names = list(stats)
    groups = _groups(stats[names[0]][rows[0][0]])
    fig, axes = _grid(len(rows), len(groups))
    for r, (key, what, ylabel) in enumerate(rows):
        for c, g in enumerate(groups):
            ax = axes[r][c]
            for i, name in enumerate(names):
                entry = stats[name][key].get(g)
                if not entry:
                    continue
                y = np.asarray(entry["std" if what != "mean" else "mean"], dtype=float)
                y = y**2 if what == "var" else y
                x = np.arange(first_layer, first_layer + len(y))
                ax.plot(x, y, marker="o", ms=3, label=name, **_style(i))
                if what == "mean" and key in ("gamma", "norm"):
                    s = np.asarray(entry["std"], dtype=float)
                    ax.fill_between(x, y - s, y + s, color=_style(i)["color"], alpha=0.12)
            _phases(ax, boundaries, names)
            if log:
                ax.set_yscale("log")
            ax.set(title=f"{g}", xlabel="layer", ylabel=ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return fig


def path_figure(stats: Stats, groups: List[str] = ("cls", "patch")) -> Figure:
    """The PCA view: class-averaged unit paths of every model projected on the two leading
    principal components of the first model's (all classes and layers); one colour per
    class, line style per model, the start of each path marked by a circle."""
    names = list(stats)
    groups = [g for g in groups if g in stats[names[0]]["class_paths"]["paths"]]
    fig, axes = _grid(1, max(len(groups), 1))
    for c, g in enumerate(groups):
        ax = axes[0][c]
        ref = np.asarray(stats[names[0]]["class_paths"]["paths"][g], dtype=float)
        if ref.size == 0:
            continue
        flat = ref.reshape(-1, ref.shape[-1])
        mean = flat.mean(0)
        basis = np.linalg.svd(flat - mean, full_matrices=False)[2][:2].T
        classes = stats[names[0]]["class_paths"]["classes"]
        for i, name in enumerate(names):
            paths = np.asarray(stats[name]["class_paths"]["paths"][g], dtype=float)
            for j, (cls, path) in enumerate(zip(classes, paths)):
                p = (path - mean) @ basis
                colour = COLOURS[(j + 1) % len(COLOURS)]
                ax.plot(
                    p[:, 0],
                    p[:, 1],
                    ls=_style(i)["ls"],
                    color=colour,
                    lw=1.2,
                    label=f"class {cls}" if i == 0 else None,
                )
                ax.plot(p[:1, 0], p[:1, 1], "o", color=colour, ms=3)
        ax.set(title=f"{g}: class paths, PCA of {names[0]}", xlabel="PC 1", ylabel="PC 2")
        ax.legend(fontsize=6)
    return fig


def eigen_figure(stats: Stats) -> Figure:
    """DMD eigenvalues per token group in the complex plane, with the unit circle."""
    names = list(stats)
    panels = {
        g: {
            n: np.asarray(stats[n]["dmd"][g]["real"]) + 1j * np.asarray(stats[n]["dmd"][g]["imag"])
            for n in names
        }
        for g in _groups(stats[names[0]]["dmd"])
    }
    return eigenvalue_figure(panels, "exact DMD eigenvalues of group-averaged unit states")


def spectrum_figure(stats: Stats) -> Figure:
    """Spectral decay: singular values of X1 over the largest, mean over images, per group."""
    names = list(stats)
    groups = _groups(stats[names[0]]["dmd"])
    fig, axes = _grid(1, len(groups))
    for c, g in enumerate(groups):
        ax = axes[0][c]
        for i, name in enumerate(names):
            y = np.asarray(stats[name]["dmd"][g]["singular_values"]["mean"], dtype=float)
            ax.semilogy(
                np.arange(1, len(y) + 1),
                np.clip(y, 1e-12, None),
                marker="o",
                ms=3,
                label=name,
                **_style(i),
            )
        ax.set(title=g, xlabel="index i", ylabel="sigma_i / sigma_1")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("DMD: singular spectrum of the stacked depth states")
    return fig


def figures(stats: Stats, boundaries: Dict[str, List[int]]) -> Dict[str, Figure]:
    """Every analysis's figure by file stem."""
    b = boundaries
    return {
        "norms": layer_figure(stats, b, [("norm", "mean", "|x_l|")], 0, "feature norms"),
        "convergence": layer_figure(
            stats, b, [("gamma", "mean", "gamma_l")], 0, "directional convergence <x_l, x_L>"
        ),
        "class_paths": path_figure(stats),
        "angular_speed": layer_figure(
            stats,
            b,
            [("speed", "mean", "mean s_l (rad)"), ("speed", "var", "var s_l")],
            1,
            "angular speed (angle from layer l-1 to l)",
        ),
        "sensitivity": layer_figure(
            stats,
            b,
            [("sensitivity", "mean", "d_cos / eps")],
            0,
            "perturbation sensitivity by injection layer",
            log=True,
        ),
        "update_rank": layer_figure(
            stats,
            b,
            [
                ("stable_rank", "mean", "stable rank"),
                ("effective_rank", "mean", "effective rank"),
                ("coherence", "mean", "coherence kappa_l"),
            ],
            1,
            "angular updates into layer l",
        ),
        "dmd_eigenvalues": eigen_figure(stats),
        "dmd_spectrum": spectrum_figure(stats),
    }
