"""A study's results: study.json, study.md and plots in the study folder, from the cells'
eval.json files (written after every cell and by `raptor study FILE --aggregate`).

Per cell and per k of its pipeline.ks, a row of final-layer fidelity read from
`cells/NAME/k{K}/eval/eval.json` (layer L, the last entry of each per-layer list):
    r2, r2_cls          student R^2 over all tokens / the CLS token (`dmd.metrics` r2)
    r2_b2, r2_b2_cls    the Raptor paper's regression R^2 (Appendix B.2, `r2_affine`)
                        where the eval.json has it, else null
    top1_teacher, top1_student, top1_ratio   through the teacher's head
and, from the similarity matrix S of the cell's teacher (its shared phases step's
similarity.npy; layers 1..L), for the partition the cell used (eval.json's boundaries):
    intra      mean S[i, j] over pairs i < j of layers in the same phase (Fig. 11B of the
               Raptor paper: mean intra-block similarity)
    contrast   intra minus the mean S[i, j] over pairs in different phases: how much more
               alike layers are within phases than across them, the quantity the max-cut
               partition maximises (within-block similarity up, cross-block down)
    maxcut_contrast   the contrast of the teacher's own max-cut partition for this k.

Groups: rows with the same cell name but the seed, and the same k: mean, sample standard
deviation (ddof = 1; null for one seed) and count of every metric.
The study's `report` adds:
- `x: KEY` (a grid key): every metric against KEY, mean +- std over seeds (plot x.png);
- `compare: {best: ENTRY, against: ENTRY}`: per seed and k, the `best` cell's metric
  against the mean and std of the `against` cells', with the gap in standard deviations
  (best - mean) / std; and over all seeds, the mean gap (plot compare.png);
and always, when at least 3 teachers are known: across teachers, the association between
the max-cut contrast and the mean r2 (and r2_b2) of the cells that used that partition:
Pearson r, Spearman rho, n (plot association.png). Without `x`, a bar chart of each group
(groups.png).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from raptor.errors import read_json
from raptor.study.spec import Study

METRICS = ("r2", "r2_cls", "r2_b2", "r2_b2_cls", "top1_teacher", "top1_student", "top1_ratio")
SIMILARITY = ("intra", "contrast", "maxcut_contrast")
PLOTTED = ("r2", "r2_b2", "top1_student", "top1_ratio")
STUDY_JSON, STUDY_MD = "study.json", "study.md"


def partition_contrast(similarity: np.ndarray, boundaries: Sequence[int]) -> Dict[str, float]:
    """{"intra", "contrast"} of a partition (boundaries of layers 1..L) on an L x L
    similarity matrix (module docstring); intra is nan when every phase has one layer."""
    n = similarity.shape[0]
    phase = np.searchsorted(np.asarray(list(boundaries), dtype=int), np.arange(1, n + 1))
    i, j = np.triu_indices(n, 1)
    same = phase[i] == phase[j]
    s = (similarity + similarity.T)[i, j] / 2
    intra = float(s[same].mean()) if same.any() else math.nan
    across = float(s[~same].mean()) if (~same).any() else math.nan
    return {"intra": intra, "contrast": intra - across}


def _final(ev: Dict[str, Any], metric: str, group: str) -> Optional[float]:
    values = ev["student"].get(metric, {}).get(group)
    return float(values[-1]) if values else None


def _num(x: Any) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def cell_rows(study: Study) -> List[Dict[str, Any]]:
    """One row per cell and k (module docstring); unfinished cells give a row with their
    status and no metrics."""
    from raptor.study.execute import cell_config, cell_record

    records = {c.name: cell_record(study, c) for c in study.cells}
    phases_of = {}  # teacher folder -> its phases folder (any cell that ran phases)
    for rec in records.values():
        steps = (rec or {}).get("steps", {})
        if "phases" in steps:
            phases_of[steps.get("teacher", "")] = steps["phases"]
    rows = []
    for cell in study.cells:
        rec = records[cell.name] or {"status": "unfinished", "steps": {}, "error": ""}
        base = {"cell": cell.name, "group": cell.group, "entry": cell.entry, "seed": cell.seed}
        base.update(values=cell.values, status=rec["status"], error=rec.get("error", ""))
        teacher = rec["steps"].get("teacher", "")
        base["teacher"] = teacher
        phases = phases_of.get(teacher)
        for k in cell_config(study, cell).pipeline.ks:
            row = dict(base, k=int(k))
            ev_path = study.cell_dir(cell) / f"k{k}" / "eval" / "eval.json"
            if rec["status"] != "ok" or not ev_path.is_file():
                rows.append(row)
                continue
            ev = read_json(ev_path, "eval result")
            row["boundaries"] = ev["boundaries"]
            row.update(r2=_final(ev, "r2", "all"), r2_cls=_final(ev, "r2", "cls"))
            row.update(
                r2_b2=_final(ev, "r2_affine", "all"), r2_b2_cls=_final(ev, "r2_affine", "cls")
            )
            top1 = ev.get("top1") or {}
            row.update({f"top1_{n}": top1.get(n) for n in ("teacher", "student", "ratio")})
            if phases:
                sim = np.load(Path(phases) / "similarity.npy")
                row.update(
                    {k_: _num(v) for k_, v in partition_contrast(sim, ev["boundaries"]).items()}
                )
                maxcut = read_json(Path(phases) / "phases.json", "phases file")["partitions"].get(
                    str(k)
                )
                if maxcut is not None:
                    row["maxcut_contrast"] = _num(partition_contrast(sim, maxcut)["contrast"])
                    row["maxcut"] = list(maxcut) == list(ev["boundaries"])
            rows.append(row)
    return rows


def stats(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """mean, sample std (ddof=1; null for fewer than 2) and n of the values not null."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=1)) if len(v) > 1 else None,
        "n": int(len(v)),
    }


def group_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows with the same group and k merged: stats of every metric over their seeds."""
    by: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[(row["group"], row["k"])].append(row)
    out = []
    for (group, k), members in by.items():
        g = {"group": group, "k": k, "entry": members[0]["entry"], "values": members[0]["values"]}
        g["cells"] = [m["cell"] for m in members]
        g["ok"] = sum(m["status"] == "ok" for m in members)
        for metric in METRICS + SIMILARITY:
            g[metric] = stats([m.get(metric) for m in members])
        out.append(g)
    return out


def compare(rows: List[Dict[str, Any]], best: str, against: str) -> Dict[str, Any]:
    """Per seed and k: the `best` entry's cell against the distribution over the `against`
    entry's cells (mean, std, gap in std) for each metric; `pooled`: over seeds, the mean
    of the best values, of the against means and of the gaps."""
    out: Dict[str, Any] = {"per_seed": [], "pooled": {}}
    keys = sorted({(r["seed"] if r["seed"] is not None else -1, r["k"]) for r in rows})
    gaps: Dict[str, List[float]] = defaultdict(list)
    for seed, k in keys:
        mine = [
            r for r in rows if (r["seed"] if r["seed"] is not None else -1, r["k"]) == (seed, k)
        ]
        tops = [r for r in mine if r["entry"] == best and r.get("r2") is not None]
        others = [r for r in mine if r["entry"] == against and r.get("r2") is not None]
        if not tops or not others:
            continue
        item = {"seed": None if seed == -1 else seed, "k": k, "n_against": len(others)}
        item["best_boundaries"] = tops[0]["boundaries"]
        for metric in METRICS + ("contrast",):
            vals = [r.get(metric) for r in others]
            dist = stats(vals)
            top = tops[0].get(metric)
            gap = None
            if top is not None and dist["std"]:
                gap = (top - dist["mean"]) / dist["std"]
                gaps[metric].append(gap)
            item[metric] = {"best": top, "values": vals, **dist, "gap_std": gap}
        out["per_seed"].append(item)
    for metric in METRICS + ("contrast",):
        tops = [i[metric]["best"] for i in out["per_seed"] if i[metric]["best"] is not None]
        means = [i[metric]["mean"] for i in out["per_seed"] if i[metric]["mean"] is not None]
        out["pooled"][metric] = {
            "best_mean": float(np.mean(tops)) if tops else None,
            "against_mean": float(np.mean(means)) if means else None,
            "gap_std_mean": float(np.mean(gaps[metric])) if gaps[metric] else None,
        }
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def association(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Across teachers (per k): the max-cut contrast against the mean r2 and r2_b2 of the
    cells that used the max-cut partition; Pearson r and Spearman rho. None under 3."""
    out = {}
    for k in sorted({r["k"] for r in rows}):
        by: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["k"] == k and r.get("maxcut") and r.get("r2") is not None:
                by[r["teacher"]].append(r)
        if len(by) < 3:
            continue
        points = []
        for teacher, members in by.items():
            points.append(
                {
                    "teacher": teacher,
                    "cells": [m["cell"] for m in members],
                    "contrast": members[0]["maxcut_contrast"],
                    "r2": float(np.mean([m["r2"] for m in members])),
                    "r2_b2": stats([m.get("r2_b2") for m in members])["mean"],
                }
            )
        item: Dict[str, Any] = {"points": points}
        x = np.array([p["contrast"] for p in points])
        for metric in ("r2", "r2_b2"):
            if any(p[metric] is None for p in points):
                continue
            y = np.array([p[metric] for p in points])
            item[metric] = {
                "pearson": float(np.corrcoef(x, y)[0, 1]),
                "spearman": float(np.corrcoef(_ranks(x), _ranks(y))[0, 1]),
                "n": len(points),
            }
        out[str(k)] = item
    return out or None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pm(s: Dict[str, Any]) -> str:
    if s["mean"] is None:
        return "-"
    return _fmt(s["mean"]) + ("" if s["std"] is None else f" ± {_fmt(s['std'])}")


def markdown(result: Dict[str, Any]) -> str:
    """study.md: the groups' table (mean ± std over seeds), the comparison and the
    association when present, and the cells that did not finish."""
    from raptor.train.runs import markdown_table

    lines = [
        f"# Study {result['study']}",
        "",
        f"{result['finished']} of {len(result['cells'])} cells finished.",
        "",
    ]
    cols = ["group", "k", "seeds", *METRICS, "contrast"]
    data = [
        [g["group"], g["k"], g["r2"]["n"], *(_pm(g[m]) for m in METRICS), _pm(g["contrast"])]
        for g in result["groups"]
    ]
    lines += [markdown_table(cols, data), ""]
    if result.get("compare"):
        c = result["compare"]
        lines += [f"## {c['best']} against {c['against']}", ""]
        data = []
        for item in c["per_seed"]:
            for metric in ("r2", "r2_b2", "top1_student", "contrast"):
                m = item[metric]
                data.append(
                    [
                        item["seed"],
                        item["k"],
                        metric,
                        _fmt(m["best"]),
                        _pm(m),
                        m["n"],
                        _fmt(m["gap_std"], 2),
                    ]
                )
        cols = ["seed", "k", "metric", c["best"], f"{c['against']} mean ± std", "n", "gap (std)"]
        lines += [markdown_table(cols, data), ""]
        pooled = c["pooled"]
        lines += [
            f"Mean gap over seeds: r2 {_fmt(pooled['r2']['gap_std_mean'], 2)} std, "
            f"top-1 {_fmt(pooled['top1_student']['gap_std_mean'], 2)} std.",
            "",
        ]
    for k, item in (result.get("association") or {}).items():
        lines += [f"## Similarity contrast against Raptor R^2 across teachers (k={k})", ""]
        for metric in ("r2", "r2_b2"):
            if metric in item:
                a = item[metric]
                lines.append(
                    f"- {metric}: Pearson r = {a['pearson']:.3f}, Spearman rho = {a['spearman']:.3f} (n = {a['n']} teachers)"
                )
        lines.append("")
    bad = [c for c in result["cells"] if c["status"] != "ok"]
    if bad:
        lines += ["## Cells not finished", ""]
        lines += [f"- {c['cell']}: {c['status']} {c.get('error', '')}".rstrip() for c in bad]
        lines.append("")
    return "\n".join(lines)


def _plots(result: Dict[str, Any], out: Path, x_key: Optional[str]) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = [g for g in result["groups"] if g["r2"]["n"]]
    if not groups:
        return paths
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(3.2 * len(PLOTTED), 2.8))
    if x_key:
        for ax, metric in zip(axes, PLOTTED, strict=True):
            for k in sorted({g["k"] for g in groups}):
                gs = sorted((g for g in groups if g["k"] == k), key=lambda g: g["values"][x_key])
                xs = [g["values"][x_key] for g in gs]
                ys = [g[metric]["mean"] if g[metric]["mean"] is not None else np.nan for g in gs]
                es = [g[metric]["std"] or 0.0 for g in gs]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"k={k}")
            ax.set_xlabel(x_key.rsplit(".", 1)[-1])
            ax.set_title(metric)
        axes[0].legend(fontsize=7)
        name = "x"
    else:
        labels = [f"{g['group']} k{g['k']}" for g in groups]
        for ax, metric in zip(axes, PLOTTED, strict=True):
            ys = [g[metric]["mean"] if g[metric]["mean"] is not None else np.nan for g in groups]
            es = [g[metric]["std"] or 0.0 for g in groups]
            ax.bar(range(len(groups)), ys, yerr=es, capsize=3)
            ax.set_xticks(range(len(groups)), labels, rotation=60, ha="right", fontsize=6)
            ax.set_title(metric)
        name = "groups"
    fig.tight_layout()
    paths.append(out / f"{name}.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    if result.get("compare") and result["compare"]["per_seed"]:
        c = result["compare"]
        items = c["per_seed"]
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 2.8))
        for ax, metric in zip(axes, ("r2", "top1_student"), strict=True):
            for i, item in enumerate(items):
                vals = [v for v in item[metric]["values"] if v is not None]
                ax.scatter(
                    [i] * len(vals),
                    vals,
                    s=12,
                    color="gray",
                    label=c["against"] if i == 0 else None,
                )
                ax.scatter(
                    [i],
                    [item[metric]["best"]],
                    marker="*",
                    s=90,
                    color="red",
                    label=c["best"] if i == 0 else None,
                )
            ax.set_xticks(
                range(len(items)), [f"seed {it['seed']} k{it['k']}" for it in items], fontsize=7
            )
            ax.set_title(metric)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "compare.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    for k, item in (result.get("association") or {}).items():
        fig, ax = plt.subplots(figsize=(3.4, 2.8))
        pts = item["points"]
        ax.scatter([p["contrast"] for p in pts], [p["r2"] for p in pts])
        ax.set_xlabel("max-cut similarity contrast")
        ax.set_ylabel("Raptor final-layer R^2")
        if "r2" in item:
            ax.set_title(f"k={k}: Pearson {item['r2']['pearson']:.2f}", fontsize=9)
        fig.tight_layout()
        paths.append(out / f"association_k{k}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def aggregate(study: Study) -> Dict[str, Any]:
    """Write study.json, study.md and the plots into the study folder (under its lock, as
    cells finishing in parallel call it); log them to W&B when the cells' config has W&B
    on (a run of job type `study` in the study's group). Returns study.json's content."""
    from raptor.study.share import folder_lock

    rows = cell_rows(study)
    report = study.report
    result: Dict[str, Any] = {
        "study": study.name,
        "file": str(study.file),
        "finished": sum(r["status"] == "ok" for r in {r["cell"]: r for r in rows}.values()),
        "cells": rows,
        "groups": group_rows(rows),
        "association": association(rows),
    }
    if report.get("compare"):
        best, against = report["compare"]["best"], report["compare"]["against"]
        result["compare"] = {"best": best, "against": against, **compare(rows, best, against)}
    with folder_lock(study.out / "aggregate"):
        study.out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for p in _plots(result, study.out, report.get("x"))]
        tmp = study.out / (STUDY_JSON + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(study.out / STUDY_JSON)
        (study.out / STUDY_MD).write_text(markdown(result))
        _log_wandb(study, result)
    return result


def _log_wandb(study: Study, result: Dict[str, Any]) -> None:
    from raptor.study.execute import cell_config
    from raptor.train.runs import wandb_run_id

    cfg = cell_config(study, study.cells[0])
    if cfg.logging.wandb == "disabled":
        return
    import wandb

    run = wandb.init(
        project=cfg.logging.project,
        entity=cfg.logging.entity,
        name=f"{study.name}/study",
        group=study.name,
        job_type="study",
        dir=str(study.out),
        id=wandb_run_id(study.out),
        resume="allow",
        mode=cfg.logging.wandb,
    )
    cols = ["cell", "k", "status", *METRICS, *SIMILARITY]
    run.log(
        {
            "cells": wandb.Table(
                columns=cols, data=[[r.get(c) for c in cols] for r in result["cells"]]
            ),
            **{Path(p).stem: wandb.Image(p) for p in result["plots"]},
        }
    )
    wandb.finish()
