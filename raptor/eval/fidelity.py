"""Evaluation of a trained Raptor: one full validation pass against its teacher.

`evaluate(cfg, checkpoint, run_dir)` rolls the whole student out from a_0 over
all L layers on every validation batch (`cfg.data`), next to the teacher on the
same batches, and writes into `run_dir`:
- `eval.json`: {"checkpoint", "stage", "num_layers", "boundaries", "images",
  "layers": [1..L], "student" and "identity": {metric: {group: [value per layer]}}
  (metrics r2, r2_ref, r2_affine, cos, rel_l2, norm_ratio of `dmd.metrics`; groups all, cls,
  reg, patch; identity = a_l predicted as a_0), "loss": [per layer],
  "top1": {"teacher", "student", "ratio"} or null (no head or no labels),
  "complete": false when validation samples were missing or bad ("missing": how many),
  "dmd": DMD baselines fitted on the teacher (one span per phase, `cfg.dmd`) and
  scored on the same batches, {variant: {metric: {group: [value or None per layer]}}},
  or null when dmd.enabled is false};
- `fidelity.png`: R^2, cosine and relative l2 per layer, student per token group
  and the identity baseline, phase boundaries marked (also sent to W&B);
- the same values in `metrics.csv` / W&B under the names `raptor.eval.validation` logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from dmd.metrics import FidelityTable
from dmd.plots import save_figure
from raptor import distributed
from raptor.config import ConfigError
from raptor.eval.validation import Fidelity, block_losses
from raptor.train.checkpoints import load_raptor
from raptor.train.runs import make_loggers, make_trainer, prepare_run_dir
from raptor.train.schedules import stage_config

EVAL_FILE = "eval.json"


def run_validation(
    cfg: DictConfig,
    teacher: Any,
    raptor: Any,
    run_dir: Path,
    rollout: str = "full",
    loggers: Optional[List[Any]] = None,
    datamodule: Any = None,
    limit_batches: Optional[int] = None,
    callbacks: Sequence[Any] = (),
) -> Dict[str, Any]:
    """One validation pass of `raptor` against `teacher` over cfg.data's validation set
    (its first `limit_batches` batches per rank when given), with the losses of
    cfg.train.stage; returns the structured results of `Fidelity.compute_validation`
    (the same on every rank) and "metrics", the flat logged values."""
    if datamodule is None:
        from raptor.data.stream import ShardDataModule

        datamodule = ShardDataModule(cfg.data, teacher.data_config, teacher.num_classes)
    stage = int(cfg.train.stage)
    loss_fns = block_losses(stage_config(cfg), stage, teacher.groups, raptor)
    module = Fidelity(teacher, raptor, loss_fns, rollout=rollout)
    trainer = make_trainer(
        cfg,
        run_dir,
        loggers=loggers if loggers is not None else [],
        callbacks=callbacks,
        limit_val_batches=limit_batches if limit_batches is not None else 1.0,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {**module.results, "metrics": module.last_val}


def evaluate(
    cfg: DictConfig, checkpoint: str | Path, run_dir: Optional[str | Path] = None
) -> Dict[str, Any]:
    """Evaluate the student in `checkpoint` (a .ckpt or a run folder; stage-1 runs of
    separate blocks joined by commas, as for export) on cfg's validation
    data; writes eval.json and fidelity.png into run_dir (default cfg.run_dir) and
    returns the eval.json content."""
    from raptor.model.teacher import Teacher

    run_dir = prepare_run_dir(cfg, run_dir)
    raptor, ckpts, paths = load_raptor(checkpoint)
    path, hp = ",".join(map(str, paths)), ckpts[0]["hyper_parameters"]
    teacher = Teacher.from_config(cfg.teacher)
    if teacher.num_layers != raptor.num_layers or teacher.embed_dim != raptor.dim:
        raise ConfigError(
            f"{path}: the student has {raptor.num_layers} layers of width {raptor.dim}, the "
            f"configured teacher {teacher.num_layers} of width {teacher.embed_dim}"
        )
    loggers = make_loggers(cfg, run_dir, "eval")
    dmd = None
    if cfg.dmd.enabled:  # DMD baselines on the same validation batches as the student
        from dmd.callback import DMDCallback

        dmd = DMDCallback.from_config(
            cfg.dmd, default_spans=raptor.partition.spans, out_dir=run_dir
        )
    res = run_validation(
        cfg, teacher, raptor, run_dir, loggers=loggers, callbacks=[dmd] if dmd else []
    )
    top1 = res["top1"]
    if top1:
        top1 = {"teacher": top1["teacher"], "student": top1["student"]}
        top1["ratio"] = top1["student"] / top1["teacher"] if top1["teacher"] else None
    out = {
        "checkpoint": path,
        "stage": hp.get("stage"),
        "num_layers": raptor.num_layers,
        "boundaries": list(raptor.boundaries),
        "images": res["images"],
        "layers": res["layers"],
        "student": res["student"],
        "identity": res["identity"],
        "loss": res["loss"],
        "top1": top1,
        "complete": res["complete"],
        "missing": res["missing"],
        "dmd": dmd_per_layer(dmd.last_results, res["layers"]) if dmd else None,
    }
    if distributed.is_rank_zero():
        (run_dir / EVAL_FILE).write_text(json.dumps(out, indent=1))
        save_figure(fidelity_figure(out), run_dir, "fidelity", loggers)
    for logger in loggers:
        logger.finalize("success")
    return out


def dmd_per_layer(results: Dict[str, Any], layers: List[int]) -> Dict[str, Any]:
    """DMDCallback results -> {variant: {metric: {group: [value or None per layer]}}},
    aligned with `layers` (a variant predicts only the layers of its spans; an
    endpoint map only each span's last layer)."""
    return {
        name: FidelityTable.from_metrics(res["fidelity"], res["layers"]).aligned(layers)
        for name, res in results.items()
    }


def fidelity_figure(result: Dict[str, Any]):
    """Per-layer R^2, cosine and relative l2 of the student (per token group) and of the
    identity baseline, with the phase boundaries as dotted lines."""
    from matplotlib.figure import Figure

    layers = result["layers"]
    panels = [("r2", "R$^2$"), ("cos", "cosine"), ("rel_l2", "relative $\\ell_2$")]
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        for group, values in result["student"][metric].items():
            ax.plot(
                layers,
                values,
                marker="o",
                ms=3,
                lw=2 if group == "all" else 1,
                label=f"student {group}",
            )
        ax.plot(
            layers,
            result["identity"][metric]["all"],
            ls="--",
            color="gray",
            label="identity ($a_0$)",
        )
        for b in result.get("boundaries", []):
            ax.axvline(b + 0.5, ls=":", color="k", lw=0.8)
        if metric == "r2":  # tiny-variance groups (cls at early layers) can go far below 0
            ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.02)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


__all__ = ["evaluate", "run_validation", "fidelity_figure"]
