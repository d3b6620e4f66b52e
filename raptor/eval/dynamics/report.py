"""What `raptor analyze` writes: analysis.json, one CSV table per analysis, analysis.md
with a short comparison of every Raptor against the teacher per analysis."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

REPORT_FILE = "analysis.json"
MARKDOWN_FILE = "analysis.md"
# per-layer statistics: key -> (CSV / title, first layer, what the layer index means)
PER_LAYER = {
    "norm": ("feature norm |x_l|", 0),
    "gamma": ("directional convergence gamma_l", 0),
    "speed": ("angular speed s (layer l-1 -> l)", 1),
    "sensitivity": ("sensitivity d_cos/eps (injection layer l)", 0),
    "stable_rank": ("stable rank of the updates into layer l", 1),
    "effective_rank": ("effective rank of the updates into layer l", 1),
    "coherence": ("coherence kappa of the updates into layer l", 1),
}


def csv_rows(stats: Dict[str, Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    """Rows model, group, layer, mean, std of one per-layer statistic."""
    first = PER_LAYER[key][1]
    return [
        {"model": name, "group": g, "layer": first + i, "mean": m, "std": s}
        for name, st in stats.items()
        for g, entry in st[key].items()
        for i, (m, s) in enumerate(zip(entry["mean"], entry["std"]))
    ]


def eigen_rows(stats: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows model, group, real, imag, radius, angle of every DMD eigenvalue."""
    import math

    return [
        {
            "model": name,
            "group": g,
            "real": re,
            "imag": im,
            "radius": math.hypot(re, im),
            "angle": math.atan2(im, re),
        }
        for name, st in stats.items()
        for g, e in st["dmd"].items()
        for re, im in zip(e["real"], e["imag"])
    ]


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def largest_gap(ref: Dict[str, Any], other: Dict[str, Any], first: int) -> Optional[tuple]:
    """(|gap|, signed gap, group, layer) of the largest difference of the means, or None."""
    best = None
    for g, entry in other.items():
        if g not in ref:
            continue
        for i, (a, b) in enumerate(zip(ref[g]["mean"], entry["mean"])):
            if a == a and b == b and (best is None or abs(b - a) > best[0]):
                best = (abs(b - a), b - a, g, first + i)
    return best


def comparison(stats: Dict[str, Dict[str, Any]]) -> List[str]:
    """Markdown lines: per analysis, each Raptor's largest gap to the teacher (the first
    model) and where; for DMD, the median eigenvalue radius and mean |angle| per group."""
    names = list(stats)
    ref, lines = names[0], []
    for key, (title, first) in PER_LAYER.items():
        parts = []
        for name in names[1:]:
            gap = largest_gap(stats[ref][key], stats[name][key], first)
            if gap:
                parts.append(f"{name} {gap[1]:+.3g} ({gap[2]}, layer {gap[3]})")
        if parts:
            lines.append(f"- {title}: largest gap to {ref}: " + "; ".join(parts))
    for name in names:
        dmd = stats[name]["dmd"]
        cells = [
            f"{g} |lambda| median {e['radius_median']:.3f}, mean |arg| {e['angle_mean']:.3f}"
            for g, e in dmd.items()
            if e["radius_median"] is not None
        ]
        if cells:
            lines.append(f"- DMD {name}: " + "; ".join(cells))
    return lines


def write_report(folder: Path, result: Dict[str, Any]) -> Dict[str, Any]:
    """analysis.json (the result), {statistic}.csv, dmd_eigenvalues.csv and analysis.md in
    `folder`; returns {"summary": markdown lines, "tables": {name: rows}}."""
    stats = result["stats"]
    (folder / REPORT_FILE).write_text(json.dumps(result, indent=1))
    tables = {key: csv_rows(stats, key) for key in PER_LAYER}
    tables["dmd_eigenvalues"] = eigen_rows(stats)
    for name, rows in tables.items():
        write_csv(folder / f"{name}.csv", rows)
    lines = comparison(stats)
    models = ", ".join(f"{m['name']} ({m['source']})" for m in result["models"])
    md = [
        "# Dynamical interpretability",
        "",
        f"{result['images']} validation images, the same for every model: {models}. "
        f"Perturbation eps = {result['epsilon']}, DMD rank {result['dmd_rank']}.",
        "",
        "## Teacher vs Raptors",
        "",
        *lines,
        "",
        "## Plots",
        "",
        *[f"![{p}]({p}.png)" for p in result["plots"]],
        "",
    ]
    (folder / MARKDOWN_FILE).write_text("\n".join(md))
    return {"summary": lines, "tables": tables}
