"""The pipeline's closing report: `summary.md`, `summary.json`, plots beside them, and
the table printed at the end of `raptor pipeline`.

Reads only what the steps wrote (their `step.json` results: the content of eval.json and
probe.json), so it can be rebuilt from a finished run folder at any time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _evals(steps: Dict[str, Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    """k -> eval.json content, for every evaluated Raptor."""
    out = {}
    for name, step in steps.items():
        if name.endswith("/eval"):
            out[int(name.split("/")[0][1:])] = step["result"]
    return dict(sorted(out.items()))


def summary_tables(steps: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """Markdown tables: headline (top-1, final-layer R^2 and the regression R^2 of the
    Raptor paper's Appendix B.2 per k), per-layer R^2, wall time per step."""
    evals = _evals(steps)
    headline_rows = []
    for k, ev in evals.items():
        top1 = ev.get("top1") or {}
        r2 = ev["student"]["r2"]["all"]
        r2_affine = ev["student"].get("r2_affine", {}).get("all")  # absent in older eval.json
        partial = "" if ev.get("complete", True) else " (incomplete)"  # val samples missing
        headline_rows.append(
            [
                str(k),
                str(ev["boundaries"]),
                _pct(top1.get("teacher")) + partial,
                _pct(top1.get("student")) + partial,
                _num(top1.get("ratio")),
                _num(r2[-1]),
                _num(r2_affine[-1] if r2_affine else None),
                _num(ev["identity"]["r2"]["all"][-1]),
            ]
        )
    headline = _md_table(
        [
            "k",
            "boundaries",
            "teacher top-1",
            "Raptor top-1",
            "ratio",
            "final-layer R^2",
            "final-layer regression R^2",
            "identity R^2",
        ],
        headline_rows,
    )

    per_layer = ""
    if evals:
        first = next(iter(evals.values()))
        k_dmd, last = list(evals.items())[-1]  # DMD spans follow this Raptor's phases
        cols = [f"Raptor k={k}" for k in evals]
        baselines = {"identity (a_0)": first["identity"]["r2"]["all"]}
        for name, values in (last.get("dmd") or {}).items():  # endpoint, replaceme: span ends
            baselines[f"DMD {name} (k={k_dmd})"] = values["r2"]["all"]
        rows = []
        for i, layer in enumerate(first["layers"]):
            row = [str(layer)] + [_num(ev["student"]["r2"]["all"][i]) for ev in evals.values()]
            row += [_num(v[i]) for v in baselines.values()]
            rows.append(row)
        per_layer = _md_table(["layer"] + cols + list(baselines), rows)

    times = _md_table(
        ["step", "wall time (s)"], [[n, f"{s['wall_s']:.1f}"] for n, s in steps.items()]
    )
    return {
        "headline": headline,
        "per_layer_r2": per_layer,
        "probes": probe_tables(steps),
        "wall_time": times,
    }


def probe_tables(steps: Dict[str, Dict[str, Any]]) -> str:
    """One markdown table per probe step (`probe/TASK`), under a heading naming the task
    and layer, or "" without probe steps."""
    from raptor.eval.probe.run import probe_table, training_note

    parts = []
    for name, step in steps.items():
        if name.startswith("probe/"):
            out = step["result"]
            title = f"### {out['task']}, layer {out['layer']} of {out['num_layers']}"
            parts.append(f"{title}\n\n{probe_table(out)}\n\n{training_note(out)}".rstrip())
    return "\n\n".join(parts)


def write_summary(cfg: DictConfig, root: Path, steps: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Write summary.md / summary.json into `root`, copy the plots beside them, and
    return {"table": text to print, "where": where things are, "tables": ...}."""
    tables = summary_tables(steps)
    plots = _collect_plots(root, steps)
    exports = [s["result"]["dir"] for n, s in steps.items() if n.endswith("/export")]
    wandb_dirs = sorted(  # the steps' own runs, not those of folders moved aside
        str(p) for s in steps.values() for p in Path(s["folder"]).glob("wandb/offline-run-*")
    )

    md = [f"# Raptor pipeline: {cfg.name}", ""]
    md += ["## Teacher vs Raptor", "", tables["headline"], ""]
    if tables["per_layer_r2"]:
        md += ["## Per-layer R^2 (validation, same batches)", "", tables["per_layer_r2"], ""]
        md += [
            "n/a: a layer the baseline does not predict (endpoint and ReplaceMe maps predict each "
            "span's last layer only; ReplaceMe needs a block before the span, so not the first).",
            "",
        ]
    if tables["probes"]:
        md += ["## Probes (frozen features, validation split)", "", tables["probes"], ""]
    if "analyze" in steps:  # raptor analyze: one comparison line per analysis
        md += ["## Dynamics: teacher vs Raptors", ""]
        md += steps["analyze"]["result"]["summary"]
        md += ["", f"Tables and analysis.md in `{steps['analyze']['folder']}`.", ""]
    md += ["## Wall time per step", "", tables["wall_time"], ""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["## Artefacts", ""] + [f"- exported backbone: `{e}`" for e in exports]
    (root / "summary.md").write_text("\n".join(md) + "\n")
    (root / "summary.json").write_text(json.dumps({"steps": steps}, indent=1, default=str))

    where = [f"summary:  {root / 'summary.md'}", f"plots:    {root}/*.png ({len(plots)} files)"]
    where += [f"backbone: {e}" for e in exports]
    if wandb_dirs:
        where += [f"W&B (offline): {d}" for d in wandb_dirs]
        where += [f"sync to W&B:   raptor sync {root}"]
    if any(Path(s["folder"]).glob("events.out.tfevents.*") for s in steps.values()):
        where += [f"dashboard:     raptor dashboard {root}"]
    table = "\n\n".join(
        t
        for t in (tables["headline"], tables["per_layer_r2"], tables["probes"], tables["wall_time"])
        if t
    )
    return {"table": table, "where": "\n".join(where), "tables": tables}


def report_files(root: Path) -> List[Path]:
    """The files `write_summary` leaves in `root`: summary.md, summary.json, the plots."""
    return [p for p in (root / "summary.md", root / "summary.json") if p.is_file()] + sorted(
        root.glob("*.png")
    )


def _collect_plots(root: Path, steps: Dict[str, Dict[str, Any]]) -> List[Path]:
    """Copy the final plots (phases heat-map; per Raptor: fidelity per layer, DMD
    eigenvalues and DMD vs student; per probe: its curves; the dynamics analyses) to the run
    root as `<step>_<name>.png`."""
    out = []
    for name in (
        n
        for n in steps
        if n in ("phases", "analyze") or n.endswith("/eval") or n.startswith("probe/")
    ):
        folder = Path(steps[name]["folder"])  # analyze: runs/NAME/analysis
        for png in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            dest = root / f"{name.replace('/', '_')}_{png.name}"
            shutil.copyfile(png, dest)
            out.append(dest)
    return out
