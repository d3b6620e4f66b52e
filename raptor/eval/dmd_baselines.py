"""`raptor dmd CONFIG [key=value ...]`: DMD baselines along the teacher's depth, standalone.

Streams `dmd.calib_images` training images through the teacher, accumulating
second moments (`dmd.MomentAccumulator`: products in `dmd.compute_dtype` summed into
float64, at most `dmd.update_memory_mib` allocated per batch; the moments of the
first B images for every `dmd.sweep.budgets` B from the same stream
(`dmd.sweeps.BudgetMoments`); one accumulator per other `dmd.sweep.token_groups` group),
fits every variant (`dmd.selections` x `dmd.solvers`, plus identity) on every
span and every sweep point, then streams `dmd.eval_images` validation images
and scores them all on the same batches (`dmd.evaluate.Evaluator`).

Fits read `dmd.alpha` as `dmd.alpha_mode` says (relative or absolute, see
`dmd.solvers`); a fit that drops directions or meets float32 products with a small
ridge warns (`dmd.fit.DMDFitWarning`). The `replaceme` selection (spans with
i >= 1) also streams the teacher's MLP outputs (`Teacher.trajectory(mlp_out=True)`).

Spans (i, p) are `dmd.spans`, else the phases of `model.k` (`phases.boundaries`
or `phases.file`), else the whole depth (0, L). Sweeps vary one choice at a
time around the base fit: the first span, selection `span`, solver `rrr` when
listed (else the first solver), `dmd.rank`, `dmd.alpha` (see `dmd.sweeps`).

Writes into the run folder (`run_dir`):
- `dmd_report.json`: settings, image counts, per variant and span the metrics per
  layer and token group, the downstream metrics and top-1, the spectrum summary;
  every sweep's rows and the budget fit error(B) = C / B^gamma (error: rel_l2 at
  the span end, all tokens);
- `dmd_metrics.csv` (variant, span, q, layer, group, metrics), `dmd_downstream.csv`,
  `dmd_eigenvalues.csv`, `dmd_sweep_{name}.csv`;
- PNGs: `dmd_eigenvalues`, `dmd_q_{metric}` (metric vs q per span, every variant and
  identity), `dmd_sweep_{name}`, `dmd_budget`.
An existing `dmd_report.json` is not replaced unless `--overwrite`.
Under torchrun every rank streams its share of the images; moments and metrics
are summed over ranks and rank 0 writes the files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from omegaconf import DictConfig

from dmd import MomentAccumulator, fit
from dmd.evaluate import Entry, Evaluator, fit_entries
from dmd.fit import NO_SPECTRUM, check_span, endpoint_pairs, fits_span
from dmd.metrics import FidelityTable, metric_key
from dmd.moments import MiB, block_rows, moment_dtype
from dmd.plots import curve_figure, eigenvalue_figure, power_law_figure, save_figure, sweep_figure
from dmd.stream import rank_share, stream_trajectories
from dmd.sweeps import BudgetMoments, FitSpec, plan_sweeps, power_law, sweep_rows
from raptor import distributed
from raptor.config import ConfigError
from raptor.model.partition import Partition
from raptor.train.runs import prepare_run_dir

REPORT_FILE = "dmd_report.json"
BUDGET_METRIC = "rel_l2"  # the error whose power law in the calibration budget is fitted


# --------------------------------------------------------------------------- settings


def resolve_spans(cfg: DictConfig, num_layers: int) -> List[tuple[int, int]]:
    """dmd.spans, else the phases of model.k, else the whole depth."""
    if cfg.dmd.spans:
        spans = []
        for span in cfg.dmd.spans:
            try:
                spans.append(check_span(span, num_layers))
            except ValueError as exc:
                raise ConfigError(f"dmd.spans: {exc}") from None
        return spans
    if cfg.phases.boundaries is None and not cfg.phases.file:
        return Partition(num_layers).spans
    return Partition.from_config(cfg, num_layers).spans


def check_settings(cfg: DictConfig, num_layers: int, dim: int, groups: Iterable[str]) -> None:
    """The dmd.* values that depend on the teacher or on each other, before any image
    is read."""
    d = cfg.dmd  # choices and ranges of single keys: checked by the schema (load_config)
    for key, ranks in (
        ("dmd.rank", [d.rank] if d.rank is not None else []),
        ("dmd.sweep.ranks", d.sweep.ranks),
    ):
        for r in ranks:
            if not 1 <= r <= dim:
                raise ConfigError(f"{key}: rank {r} outside 1..{dim} (the teacher's width)")
    for b in d.sweep.budgets:
        if not 1 <= b <= d.calib_images:
            raise ConfigError(
                f"dmd.sweep.budgets: {b} must be in 1..dmd.calib_images={d.calib_images}"
            )
    known = list(groups) + ["all"]
    for g in d.sweep.token_groups:
        if g not in known:
            raise ConfigError(
                f"dmd.sweep.token_groups: unknown group '{g}'; the teacher has {known}"
            )
    try:
        block_rows(dim, moment_dtype_or_fail(d.compute_dtype), int(d.update_memory_mib * MiB))
    except ValueError as exc:
        raise ConfigError(f"dmd.update_memory_mib={d.update_memory_mib}: {exc}") from None


def moment_dtype_or_fail(name: str) -> torch.dtype:
    try:
        return moment_dtype(name)
    except ValueError as exc:
        raise ConfigError(f"dmd.compute_dtype: {exc}") from None


def base_spec(cfg: DictConfig, spans: List[tuple[int, int]]) -> FitSpec:
    solvers = list(cfg.dmd.solvers)
    solver = "rrr" if "rrr" in solvers else solvers[0]
    return FitSpec(
        span=spans[0],
        selection="span",
        solver=solver,
        rank=cfg.dmd.rank,
        alpha=float(cfg.dmd.alpha),
        center=bool(cfg.dmd.center),
        alpha_mode=str(cfg.dmd.alpha_mode),
    )


def sweep_points(cfg: DictConfig, base: FitSpec, num_layers: int):
    sw = cfg.dmd.sweep
    points = plan_sweeps(
        base,
        list(cfg.dmd.solvers),
        list(cfg.dmd.selections),
        ranks=list(sw.ranks),
        alphas=list(sw.alphas),
        budgets=list(sw.budgets),
        cut_starts=list(sw.cut_starts),
        prune_lengths=list(sw.prune_lengths),
        token_groups=list(sw.token_groups),
    )
    for pt in points:
        try:
            check_span(pt.spec.span, num_layers)
        except ValueError as exc:
            key = "cut_starts" if pt.sweep == "cut_start" else "prune_lengths"
            raise ConfigError(
                f"dmd.sweep.{key}={pt.value} around the base span {base.span}: {exc}"
            ) from None
    return points


# --------------------------------------------------------------------------- streaming


def _images(
    loader: Iterable,
    teacher: Any,
    device: torch.device,
    images: int,
    what: str,
    mlp_out: bool = False,
):
    """This rank's share of the first `images` valid images of `loader` through the
    teacher (with its MLP outputs when `mlp_out`), with a progress bar on rank 0
    (`dmd.stream.stream_trajectories`)."""
    return stream_trajectories(
        loader,
        teacher.trajectory,
        device,
        images=images,
        ranks=distributed.world_size(),
        progress=f"dmd: {what}" if distributed.is_rank_zero() else None,
        mlp_out=mlp_out,
    )


def _short(what: str, seen: int, images: int) -> None:
    """Say so when this rank's stream ended before its share of `images`."""
    share = rank_share(images, distributed.world_size())
    if seen < share:
        print(
            f"raptor dmd: dmd: {what}: only {seen} of {share} images available on rank "
            f"{distributed.global_rank()}"
        )


def calibrate(cfg, teacher, loader, spans_needed, device) -> Dict[str, Any]:
    """Stream calibration images into the moments: {"main", "budgets": {B: moments of
    the first B images}, "groups": {name: accumulator}}, all merged over ranks; one set
    of moments per budget and per token group ("all": the main moments)."""
    d = cfg.dmd
    L, D = teacher.num_layers, teacher.embed_dim
    dtype = moment_dtype_or_fail(d.compute_dtype)
    limit = int(d.update_memory_mib * MiB)
    ends = endpoint_pairs(spans_needed)
    world = distributed.world_size()
    mlp_out = "replaceme" in d.selections
    mlp_spans = sorted({tuple(s) for s in spans_needed if mlp_out and fits_span("replaceme", s)})

    def accumulator(tokens: slice = slice(None), mlp_spans=()) -> MomentAccumulator:
        return MomentAccumulator(
            L,
            D,
            ends,
            tokens=tokens,
            device=device,
            compute_dtype=dtype,
            mlp_spans=mlp_spans,
            max_update_bytes=limit,
        )

    total = rank_share(d.calib_images, world)
    stream = BudgetMoments(
        [rank_share(b, world) for b in d.sweep.budgets] + [total],
        lambda: accumulator(mlp_spans=mlp_spans),
    )
    groups = {g: accumulator(teacher.groups[g]) for g in d.sweep.token_groups if g != "all"}
    for out in _images(loader, teacher, device, d.calib_images, "calibration", mlp_out):
        stream.update(out.trajectory, out.valid, out.mlp if mlp_out else None)
        for acc in groups.values():
            acc.update(out.trajectory, out.valid)
    _short("calibration", stream.images, d.calib_images)
    totals = stream.totals()
    main = totals[total]
    groups = {g: acc.all_reduce() for g, acc in groups.items()}
    if "all" in d.sweep.token_groups:
        groups["all"] = main
    return {
        "main": main,
        "budgets": {b: totals[rank_share(b, world)] for b in d.sweep.budgets},
        "groups": groups,
    }


def build_entries(cfg, moments, spans, points) -> List[Entry]:
    d = cfg.dmd
    entries = fit_entries(
        moments["main"],
        spans,
        list(d.solvers),
        list(d.selections),
        d.rank,
        float(d.alpha),
        bool(d.center),
        joint=False,
        alpha_mode=str(d.alpha_mode),
    )
    for e in entries:
        e.downstream = bool(d.downstream)
    for pt in points:
        spec = pt.spec
        if spec.budget is not None:
            acc = moments["budgets"][spec.budget]
        elif spec.group != "all" or pt.sweep == "token_group":
            acc = moments["groups"][spec.group]
        else:
            acc = moments["main"]
        op = fit(acc, **spec.fit_kwargs())
        meta = dict(
            op.info,
            variant=spec.variant,
            sweep=pt.sweep,
            value=pt.value,
            budget=spec.budget,
            group=spec.group,
        )
        entries.append(Entry(pt.name, [(spec.span, op)], downstream=False, meta=meta))
    return entries


# --------------------------------------------------------------------------- outputs


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _spectrum_summary(op) -> Dict[str, Any]:
    lam = op.eigenvalues()
    mod = lam.abs()
    return {
        "spectral_radius": float(mod.max()) if len(mod) else 0.0,
        "outside_unit_circle": int((mod > 1).sum()),
        "count": int(len(lam)),
    }


def write_outputs(
    run_dir: Path, cfg, entries: List[Entry], results, points, moments, eval_images: int
) -> Dict[str, Any]:
    main_entries = [e for e in entries if "sweep" not in e.meta]
    metric_rows, down_rows, eig_rows, variants = [], [], [], {}
    for e in main_entries:
        res = results[e.name]
        (i, p), op = e.parts[0]
        head = dict(
            variant=e.meta["variant"],
            i=i,
            p=p,
            selection=e.meta["selection"],
            solver=e.meta["solver"],
        )
        table = FidelityTable.from_metrics(res["fidelity"], res["layers"])
        metric_rows += [dict(head, q=row["layer"] - i, **row) for row in table.rows()]
        if res["final"] is not None:
            final = FidelityTable.from_metrics(res["final"], [i + p])
            for row in final.rows():
                top = (
                    {"top1": res["top1"][0], "agree": res["agree"][0]}
                    if res["top1"] is not None and row["group"] == "all"
                    else {}
                )
                down_rows.append(dict(head, **row, **top))
        if e.meta["selection"] not in NO_SPECTRUM:
            for k, lam in enumerate(op.eigenvalues().tolist()):
                eig_rows.append(dict(head, index=k, real=lam.real, imag=lam.imag, abs=abs(lam)))
        variants[e.name] = {
            **head,
            "rank": op.info.get("rank"),
            "alpha": op.info.get("alpha"),
            "alpha_mode": op.info.get("alpha_mode"),
            "dropped": op.info.get("dropped"),
            "cond": op.info.get("cond"),
            "train_rel_mse": op.info.get("train_rel_mse"),
            "layers": res["layers"],
            "fidelity": res["fidelity"],
            "final": res["final"],
            "top1": res["top1"],
            "agree": res["agree"],
            "spectrum": _spectrum_summary(op),
        }
    _write_csv(run_dir / "dmd_metrics.csv", metric_rows)
    _write_csv(run_dir / "dmd_downstream.csv", down_rows)
    _write_csv(run_dir / "dmd_eigenvalues.csv", eig_rows)

    tables = sweep_rows(points, results)
    budget_fit = None
    for name, rows in tables.items():
        _write_csv(run_dir / f"dmd_sweep_{name}.csv", rows)
    if len({r["value"] for r in tables.get("budget", [])}) >= 2:
        rows = tables["budget"]
        budget_fit = dict(
            power_law([r["value"] for r in rows], [r[BUDGET_METRIC] for r in rows]),
            metric=BUDGET_METRIC,
        )

    _plots(run_dir, main_entries, results, tables, budget_fit)
    report = {
        "teacher": cfg.teacher.name,
        "num_layers": moments["main"].num_layers,
        "dim": moments["main"].dim,
        "calib_images": moments["main"].images,
        "eval_images": eval_images,
        "settings": {k: v for k, v in _plain(cfg.dmd).items() if k != "sweep"},
        "spans": sorted({(v["i"], v["p"]) for v in variants.values()}),
        "variants": variants,
        "sweeps": tables,
        "budget_fit": budget_fit,
    }
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def _plain(node) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _plots(run_dir: Path, entries: List[Entry], results, tables, budget_fit) -> None:
    spans = list(dict.fromkeys(e.parts[0][0] for e in entries))
    panels: Dict[str, Dict[str, Any]] = {}
    for e in entries:
        (i, p), op = e.parts[0]
        if e.meta["selection"] not in NO_SPECTRUM:
            panels.setdefault(f"layers {i} -> {i + p}", {})[e.meta["variant"]] = op.eigenvalues()
    if panels:
        save_figure(eigenvalue_figure(panels), run_dir, "dmd_eigenvalues")
    for metric in ("cos", "r2", "rel_l2"):
        for i, p in spans:
            curves = {}
            for e in entries:
                if e.parts[0][0] == (i, p):
                    res = results[e.name]
                    curves[e.meta["variant"]] = (
                        [layer - i for layer in res["layers"]],
                        res["fidelity"][metric_key(metric, "all")],
                    )
            fig = curve_figure(
                curves,
                metric,
                xlabel="q (layers after the cut)",
                title=f"{metric}, span i={i}, p={p}",
            )
            save_figure(fig, run_dir, f"dmd_q_{metric}_i{i}_p{p}")
    for name, rows in tables.items():
        fig = sweep_figure(rows, "cos", title=name, logx=name in ("rank", "alpha", "budget"))
        save_figure(fig, run_dir, f"dmd_sweep_{name}")
    if budget_fit is not None:
        rows = tables["budget"]
        fig = power_law_figure(
            [r["value"] for r in rows], [r[BUDGET_METRIC] for r in rows], budget_fit, BUDGET_METRIC
        )
        save_figure(fig, run_dir, "dmd_budget")


# --------------------------------------------------------------------------- entry points


def run_dmd(
    cfg: DictConfig, run_dir: Optional[str | Path] = None, overwrite: bool = False
) -> Dict[str, Any]:
    """The whole `raptor dmd` job; returns the report (also written to run_dir/dmd_report.json)."""
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher

    run_dir = Path(run_dir or cfg.run_dir)
    if (run_dir / REPORT_FILE).exists() and not overwrite:
        raise ConfigError(
            f"{run_dir / REPORT_FILE} exists; pass --overwrite to replace it, or choose another run_dir"
        )
    run_dir = prepare_run_dir(cfg, run_dir)
    device = distributed.device(cfg.trainer.accelerator)
    teacher = Teacher.from_config(cfg.teacher).to(device)
    L, D = teacher.num_layers, teacher.embed_dim
    check_settings(cfg, L, D, teacher.groups)
    spans = resolve_spans(cfg, L)
    points = sweep_points(cfg, base_spec(cfg, spans), L)
    dm = ShardDataModule(cfg.data, teacher.data_config)

    moments = calibrate(
        cfg, teacher, dm.train_dataloader(), spans + [pt.spec.span for pt in points], device
    )
    entries = build_entries(cfg, moments, spans, points)
    evaluator = Evaluator(
        entries,
        teacher.groups,
        finish=teacher.finish if cfg.dmd.downstream else None,
        top1=teacher.num_classes > 0,
    ).to(device)
    seen = 0
    mlp_out = evaluator.needs_mlp
    for out in _images(
        dm.val_dataloader(), teacher, device, cfg.dmd.eval_images, "evaluation", mlp_out
    ):
        evaluator.update(out.trajectory, out.valid, out.labels, out.mlp if mlp_out else None)
        seen += int(out.valid.sum())
    _short("evaluation", seen, cfg.dmd.eval_images)
    if distributed.initialised():
        count = torch.tensor([seen], device=device)
        torch.distributed.all_reduce(count)
        seen = int(count)
    results = evaluator.compute()
    if not distributed.is_rank_zero():
        return {}
    return write_outputs(run_dir, cfg, entries, results, points, moments, seen)
